"""What TLS, credentials and metrics cost per RPC, measured in one run on loopback.

Four real servers over the same kind of SQLite store, one client each, the same unary RPC:
``GetStatus`` on a server with one node (a read of the store and a small reply).

* **plain**: loopback plaintext, no credentials (the demo's set-up) — the baseline;
* **tls**: TLS, credentials not checked;
* **tls+token**: TLS and a node token on every call (what ``latentedge server`` with TLS does:
  token lookup in SQLite + SHA-256 per RPC);
* **tls+token+metrics**: the same with the Prometheus interceptor.

Each repeat times ``--calls`` sequential calls per configuration (interleaved, so machine
noise hits all alike); the figure is the median latency per call and its ratio to plain.

    .venv/bin/python bench/security_overhead.py [--calls 500] [--repeats 5] [--out r.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc

from common.models import ClassifierConfig
from common.records import NodeRegistration
from common.tls import ServerTls
from protos import uplink_pb2, uplink_pb2_grpc
from server.auth import Authenticator, issue_token
from server.classifier import ClassifierMode
from server.core import IngestLimits, SplitLearningServer
from server.grpc_app import create_server
from server.metrics import ServerMetrics
from server.servicer import UplinkServicer
from server.store import SqliteStore

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.support_tls import make_pki  # noqa: E402  (the tests' openssl PKI helper)

CONFIGS = ("plain", "tls", "tls+token", "tls+token+metrics")


@contextmanager
def _server(
    folder: Path, name: str, pki_dir: Path
) -> Iterator[Callable[[], uplink_pb2.GetStatusReply]]:
    """A running server of configuration ``name`` and a zero-argument call against it."""
    store = SqliteStore(folder / f"{name.replace('+', '_')}.db")
    core = SplitLearningServer(
        store,
        limits=IngestLimits(max_upload_bytes=1_000_000),
        classifier_mode=ClassifierMode.PER_NODE,
        classifier_config=ClassifierConfig(epochs=1),
    )
    core.start()
    core.register(NodeRegistration("node-1", 8, 4))
    tls = None
    if name != "plain":
        tls = ServerTls.from_paths(str(pki_dir / "server.pem"), str(pki_dir / "server.key"))
    metrics = ServerMetrics(core.status) if name.endswith("metrics") else None
    servicer = UplinkServicer(core, auth=Authenticator(store, required="token" in name))
    server, port, _ = create_server("127.0.0.1:0", servicer, tls=tls, metrics=metrics)
    metadata: list[tuple[str, str]] = []
    if "token" in name:
        text, _ = issue_token(store, "node-1", admin=True)
        metadata = [("authorization", f"Bearer {text}")]
    if tls is None:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    else:
        creds = grpc.ssl_channel_credentials((pki_dir / "ca.pem").read_bytes())
        channel = grpc.secure_channel(f"localhost:{port}", creds)
    stub = uplink_pb2_grpc.UplinkStub(channel)
    request = uplink_pb2.GetStatusRequest()
    try:
        yield lambda: stub.GetStatus(request, metadata=metadata, timeout=10)
    finally:
        channel.close()
        server.stop(grace=None).wait()
        core.stop()
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        folder = Path(tmp)
        pki = make_pki(folder / "pki")
        calls = {
            name: stack.enter_context(_server(folder, name, pki.server_cert.parent))
            for name in CONFIGS
        }
        for call in calls.values():  # warm up connections and handshakes
            for _ in range(20):
                call()
        per_call: dict[str, list[float]] = {name: [] for name in CONFIGS}
        for _ in range(args.repeats):
            for name, call in calls.items():
                started = time.perf_counter()
                for _ in range(args.calls):
                    call()
                per_call[name].append((time.perf_counter() - started) / args.calls)
    base = statistics.median(per_call["plain"])
    result = {
        "calls": args.calls,
        "repeats": args.repeats,
        "median_us": {n: statistics.median(v) * 1e6 for n, v in per_call.items()},
        "ratio_to_plain": {n: statistics.median(v) / base for n, v in per_call.items()},
    }
    for name in CONFIGS:
        sys.stdout.write(
            f"{name:20s} {result['median_us'][name]:8.1f} us/call  "
            f"x{result['ratio_to_plain'][name]:.2f} of plain\n"
        )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
