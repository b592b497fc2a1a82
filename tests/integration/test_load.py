"""Load: 200 concurrent nodes register and upload over TLS with their own tokens."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from common.records import NodeRegistration
from common.tls import ClientTls, ServerTls
from edge.uplink import RetryPolicy, UplinkClient
from server.auth import issue_token
from server.store import SqliteStore
from tests.support_grpc import running_server
from tests.support_tls import make_pki

NODES = 200
SAMPLES = 40


def _node(
    address: str,
    tls: ClientTls | None,
    token: str,
    seed: int,
    start: threading.Barrier,
    errors: list[str],
) -> None:
    """One node: register, upload, re-send the same upload (deduplicated)."""
    node_id = f"load-{seed:03d}"
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(SAMPLES, 8)).astype(np.float32)
    y = rng.integers(0, 4, SAMPLES)
    retry = RetryPolicy(window_s=120.0, initial_backoff_s=0.2)
    try:
        with UplinkClient(address, retry=retry, tls=tls, token=token) as client:
            start.wait(timeout=60)
            client.register(NodeRegistration(node_id, 8, 4, samples=SAMPLES))
            upload = f"{node_id}-u1"
            ack = client.push_latents(node_id, x, y, num_classes=4, upload_id=upload)
            again = client.push_latents(node_id, x, y, num_classes=4, upload_id=upload)
            assert (ack.samples, again.deduplicated) == (SAMPLES, True), (ack, again)
    except Exception as exc:  # collected and asserted by the test
        errors.append(f"{node_id}: {type(exc).__name__}: {exc}")


def test_200_concurrent_nodes_each_stored_exactly_once(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    tls = ServerTls.from_paths(str(pki.server_cert), str(pki.server_key))
    client_tls = ClientTls.from_paths(str(pki.ca))
    for server in running_server(tmp_path, tls=tls, auth=True):
        store = SqliteStore(server.db)
        tokens = {}
        for i in range(NODES):
            tokens[f"load-{i:03d}"] = issue_token(store, f"load-{i:03d}")[0]
        store.close()
        start = threading.Barrier(NODES)
        errors: list[str] = []

        threads = [
            threading.Thread(
                target=_node,
                args=(server.address, client_tls, tokens[f"load-{i:03d}"], i, start, errors),
            )
            for i in range(NODES)
        ]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not errors, errors[:5]
        assert time.monotonic() - started < 300
        nodes = {n.node_id: n for n in server.core.status().nodes}
        assert len(nodes) == NODES
        assert all((n.samples, n.uploads) == (SAMPLES, 1) for n in nodes.values())
        reader = SqliteStore(server.db)
        latents, _ = reader.node_data("load-007")
        reader.close()
        expected = np.random.default_rng(7).normal(size=(SAMPLES, 8)).astype(np.float32)
        np.testing.assert_array_equal(latents, expected)
