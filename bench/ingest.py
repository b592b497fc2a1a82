"""Ingest benchmark: concurrent edge processes streaming latents to one durable server.

Each repeat measures, in the same run and on the same loopback:

* **ingest**: ``--clients`` edge processes (multiprocessing, spawn), each with its own
  :class:`~edge.uplink.UplinkClient`, register a node and push ``--samples`` x ``--latent-dim``
  float32 latents (+ uint8 labels) to ONE ``latentedge server`` process on a fresh store
  (payload appended to segment files beside the SQLite file, metadata in SQLite; every ack
  follows the segment fsync and a ``synchronous=FULL`` commit);
* **raw**: the same processes stream the same number of chunks of the same byte size to a
  bare gRPC service (no protoc, identity (de)serialisers on raw bytes, the server's gRPC
  options) that only counts them;
* **store**: the storage ceiling, the same chunks written through ``SqliteStore`` directly
  by one thread (no gRPC, no validation).

Throughput = payload bytes (latents + labels) / wall time from the first client's first byte
to the last client's ack. The server's RSS is sampled with psutil during ingest. A final,
larger ingest run (``--large-total-mb``) shows whether RSS grows with payload size; with
``--after-s`` it keeps sampling that long after the last ack (the classifier trainer reading
what was stored).

    .venv/bin/python bench/ingest.py [--clients 8] [--samples 200000] [--latent-dim 64]
        [--repeats 5] [--large-total-mb 1024] [--after-s 0] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing as mp
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import asdict, dataclass, replace
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil

from common.constants import CHUNK_BYTES, MAX_MESSAGE_BYTES
from common.records import NodeRegistration, UploadMode
from common.tensors import to_wire
from edge.uplink import UplinkClient, label_dtype_for
from server.store import SqliteStore

logger = logging.getLogger("bench.ingest")

NUM_CLASSES = 10
RAW_METHOD = "/bench.RawSink/Push"
_CLIENT_OPTIONS = [  # as UplinkClient opens its channel
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
_MB = 1e6


@dataclass(frozen=True)
class ClientResult:
    """What one client process reports (monotonic clock, shared by all processes on Linux)."""

    started_s: float
    acked_s: float
    payload_bytes: int
    samples: int


@dataclass(frozen=True)
class RunResult:
    """One measured run of all clients."""

    kind: str
    """raw, ingest, ingest-large or store."""
    wall_s: float
    payload_bytes: int
    samples: int
    repeat: int = 0
    rss_start_mb: float = 0.0
    rss_peak_mb: float = 0.0
    rss_end_mb: float = 0.0
    rss_peak_before_first_ack_mb: float = 0.0
    rss_after_peak_mb: float = 0.0
    """Peak over ``--after-s`` seconds after the last ack (the classifier trainer's memory)."""

    @property
    def mb_per_s(self) -> float:
        return self.payload_bytes / _MB / self.wall_s

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.wall_s


# -- payload ------------------------------------------------------------------------------------


def make_payload(samples: int, latent_dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random float32 latents (samples, latent_dim) and labels in [0, NUM_CLASSES)."""
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((samples, latent_dim), dtype=np.float32)
    labels = rng.integers(0, NUM_CLASSES, samples).astype(np.int64)
    return latents, labels


def chunk_slices(samples: int, latent_dim: int, chunk_bytes: int) -> list[slice]:
    """The row slices :meth:`UplinkClient.push_latents` cuts an upload into."""
    rows = max(1, chunk_bytes // max(1, latent_dim * np.dtype(np.float32).itemsize))
    count = max(1, math.ceil(samples / rows))
    return [slice(i * rows, min(samples, (i + 1) * rows)) for i in range(count)]


# -- raw gRPC baseline --------------------------------------------------------------------------


def _raw_push(request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    total = 0
    for chunk in request_iterator:
        total += len(chunk)
    return total.to_bytes(8, "little")


def raw_server_main(port_queue: mp.Queue[int], stop: Any) -> None:
    """A gRPC server (same executor and options as ``create_server``) that counts bytes."""
    # imported here: server.grpc_app pulls in torch, which the client processes do not need
    from server.grpc_app import SERVER_OPTIONS  # noqa: PLC0415

    handler = grpc.method_handlers_generic_handler(
        "bench.RawSink",
        {"Push": grpc.stream_unary_rpc_method_handler(_raw_push)},  # None (de)serialisers
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    port_queue.put(port)
    stop.wait()
    server.stop(grace=1.0).wait()


def raw_client_main(
    address: str, index: int, args: dict[str, int], barrier: Barrier, results: mp.Queue[Any]
) -> None:
    """Stream the same chunks (latents + labels bytes) to the raw sink."""
    latents, labels = make_payload(args["samples"], args["latent_dim"], seed=index)
    label_dtype = label_dtype_for(NUM_CLASSES)
    slices = chunk_slices(args["samples"], args["latent_dim"], args["chunk_bytes"])

    def chunks() -> Iterator[bytes]:
        for sl in slices:
            yield latents[sl].tobytes() + labels[sl].astype(label_dtype).tobytes()

    with grpc.insecure_channel(address, options=_CLIENT_OPTIONS) as channel:
        grpc.channel_ready_future(channel).result(timeout=60)
        push = channel.stream_unary(RAW_METHOD, None, None)  # raw bytes both ways
        barrier.wait()
        started = time.monotonic()
        reply = push(chunks(), timeout=600)
        acked = time.monotonic()
    results.put(ClientResult(started, acked, int.from_bytes(reply, "little"), args["samples"]))


# -- ingest into latentedge server --------------------------------------------------------------


def ingest_client_main(
    address: str, index: int, args: dict[str, int], barrier: Barrier, results: mp.Queue[Any]
) -> None:
    """Register a node, then push its latents through :class:`UplinkClient`."""
    latents, labels = make_payload(args["samples"], args["latent_dim"], seed=index)
    node_id = f"bench-{index}"
    with UplinkClient(address) as client:
        client.register(
            NodeRegistration(
                node_id=node_id,
                latent_dim=args["latent_dim"],
                num_classes=NUM_CLASSES,
                samples=args["samples"],
            )
        )
        barrier.wait()
        started = time.monotonic()
        ack = client.push_latents(
            node_id, latents, labels, num_classes=NUM_CLASSES, chunk_bytes=args["chunk_bytes"]
        )
        acked = time.monotonic()
    results.put(ClientResult(started, acked, ack.payload_bytes, ack.samples))


class RssSampler:
    """Samples a process's RSS every ``interval_s`` in a daemon thread."""

    def __init__(self, pid: int, interval_s: float) -> None:
        self._proc = psutil.Process(pid)
        self._interval_s = interval_s
        self._stop = threading.Event()
        self.samples: list[tuple[float, int]] = []
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), self._proc.memory_info().rss))
            except psutil.NoSuchProcess:
                return
            self._stop.wait(self._interval_s)

    def at(self, t: float) -> int:
        """The last sample at or before ``t`` (the first sample if none is)."""
        before = [r for s, r in self.samples if s <= t]
        return before[-1] if before else self.samples[0][1]

    def peak(self, t0: float, t1: float) -> int:
        """Largest sample in [t0, t1]."""
        inside = [r for s, r in self.samples if t0 <= s <= t1]
        return max(inside) if inside else self.at(t1)


def start_latentedge_server(
    db: Path | str, log_path: Path, *extra: str
) -> tuple[subprocess.Popen[str], str]:
    """``latentedge server --listen 127.0.0.1:0 --db DB [EXTRA]``; the process and its address."""
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "latentedge",
                "server",
                "--listen",
                "127.0.0.1:0",
                "--db",
                str(db),
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"listening on (\S+)", line)
    if match is None:
        proc.kill()
        raise RuntimeError(f"server did not start (see {log_path}): {line!r}")
    return proc, match.group(1)


def stop_process(proc: subprocess.Popen[str]) -> None:
    """SIGTERM, then SIGKILL after 5 s (a classifier retraining can delay a clean stop)."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        logger.info("server still busy 5 s after SIGTERM (classifier training): killing it")
        proc.kill()
        proc.wait()


def run_clients(
    ctx: mp.context.SpawnContext, target: Any, address: str, clients: int, args: dict[str, int]
) -> list[ClientResult]:
    """Start ``clients`` processes, release them together; return what each reports."""
    barrier = ctx.Barrier(clients + 1)
    results: mp.Queue[Any] = ctx.Queue()
    procs = [
        ctx.Process(target=target, args=(address, i, args, barrier, results))
        for i in range(clients)
    ]
    for p in procs:
        p.start()
    barrier.wait(timeout=300)
    out = [results.get(timeout=900) for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"client process exited with {p.exitcode}")
    return out


def summarise(kind: str, out: list[ClientResult], rss: RssSampler, interval_s: float) -> RunResult:
    """Throughput over [first byte, last ack] and the server's RSS around that window."""
    start = min(r.started_s for r in out)
    end = max(r.acked_s for r in out)
    first_ack = min(r.acked_s for r in out)
    return RunResult(
        kind=kind,
        wall_s=end - start,
        payload_bytes=sum(r.payload_bytes for r in out),
        samples=sum(r.samples for r in out),
        rss_start_mb=rss.at(start) / _MB,
        rss_peak_mb=rss.peak(start, end) / _MB,
        rss_end_mb=rss.at(end + interval_s) / _MB,
        rss_peak_before_first_ack_mb=rss.peak(start, first_ack) / _MB,
    )


def run_raw(
    ctx: mp.context.SpawnContext, clients: int, args: dict[str, int], interval_s: float
) -> RunResult:
    port_queue: mp.Queue[int] = ctx.Queue()
    stop = ctx.Event()
    server = ctx.Process(target=raw_server_main, args=(port_queue, stop))
    server.start()
    try:
        address = f"127.0.0.1:{port_queue.get(timeout=60)}"
        assert server.pid is not None
        with RssSampler(server.pid, interval_s) as rss:
            out = run_clients(ctx, raw_client_main, address, clients, args)
            time.sleep(2 * interval_s)
    finally:
        stop.set()
        server.join(timeout=30)
    return summarise("raw", out, rss, interval_s)


def run_ingest(
    ctx: mp.context.SpawnContext,
    clients: int,
    args: dict[str, int],
    workdir: Path,
    interval_s: float,
    after_s: float = 0.0,
) -> RunResult:
    run_dir = Path(tempfile.mkdtemp(prefix="ingest-", dir=workdir))
    proc, address = start_latentedge_server(run_dir / "server.db", run_dir / "server.log")
    try:
        with RssSampler(proc.pid, interval_s) as rss:
            out = run_clients(ctx, ingest_client_main, address, clients, args)
            time.sleep(max(2 * interval_s, after_s))
        db_bytes = sum(f.stat().st_size for f in run_dir.rglob("*") if f.is_file())
        logger.info("database and segment files after ingest: %.0f MB", db_bytes / _MB)
    finally:
        stop_process(proc)
        shutil.rmtree(run_dir)
    result = summarise("ingest", out, rss, interval_s)
    end = max(r.acked_s for r in out)
    return replace(result, rss_after_peak_mb=rss.peak(end, end + after_s) / _MB)


def run_store(clients: int, args: dict[str, int], workdir: Path) -> RunResult:
    """The storage ceiling: the same chunks through ``SqliteStore`` in one thread, no gRPC.

    Chunks are encoded before the clock starts; the clock covers begin, put every chunk and
    commit for each client's upload, on a fresh file with the server's SQLite settings.
    """
    run_dir = Path(tempfile.mkdtemp(prefix="store-", dir=workdir))
    store = SqliteStore(run_dir / "store.db")
    label_dtype = label_dtype_for(NUM_CLASSES)
    slices = chunk_slices(args["samples"], args["latent_dim"], args["chunk_bytes"])
    uploads = []
    for i in range(clients):
        latents, labels = make_payload(args["samples"], args["latent_dim"], seed=i)
        store.register_node(
            NodeRegistration(
                node_id=f"bench-{i}",
                latent_dim=args["latent_dim"],
                num_classes=NUM_CLASSES,
                samples=args["samples"],
            )
        )
        uploads.append(
            [(to_wire(latents[sl]), to_wire(labels[sl].astype(label_dtype))) for sl in slices]
        )
    payload = samples = 0
    started = time.monotonic()
    for i, chunks in enumerate(uploads):
        upload_id = f"store-{i}"
        store.begin_upload(upload_id, f"bench-{i}", UploadMode.REPLACE)
        for seq, (lat, lab) in enumerate(chunks):
            store.put_chunk(upload_id, seq, lat, lab, lab.shape[0])
        ack = store.commit_upload(upload_id, len(chunks))
        payload += ack.payload_bytes
        samples += ack.samples
    wall_s = time.monotonic() - started
    store.close()
    shutil.rmtree(run_dir)
    return RunResult(kind="store", wall_s=wall_s, payload_bytes=payload, samples=samples)


# -- report -------------------------------------------------------------------------------------


def table(rows: list[RunResult]) -> str:
    head = (
        f"{'run':<15} {'MB':>7} {'wall s':>7} {'MB/s':>7} {'samples/s':>10} | server RSS MB: "
        f"{'start':>6} {'peak<1st ack':>12} {'peak':>6} {'end':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        label = f"{r.kind} #{r.repeat}" if r.repeat else r.kind
        rss = (
            f"{r.rss_start_mb:6.0f} {r.rss_peak_before_first_ack_mb:12.0f} "
            f"{r.rss_peak_mb:6.0f} {r.rss_end_mb:6.0f}"
            if r.kind != "store"
            else "(no server)"
        )
        lines.append(
            f"{label:<15} {r.payload_bytes / _MB:7.1f} {r.wall_s:7.2f} {r.mb_per_s:7.1f} "
            f"{r.samples_per_s:10.0f} | {'':14}{rss}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--clients", type=int, default=8, help="concurrent edge processes")
    p.add_argument("--samples", type=int, default=200_000, help="latent rows per client")
    p.add_argument("--latent-dim", type=int, default=64, help="latent size (float32)")
    p.add_argument(
        "--chunk-bytes", type=int, default=CHUNK_BYTES, help="latents bytes per streamed chunk"
    )
    p.add_argument(
        "--repeats", type=int, default=5, help="raw + ingest + store rounds (medians quoted)"
    )
    p.add_argument(
        "--large-total-mb",
        type=float,
        default=1024.0,
        help="payload (MB, all clients) of the final RSS-scaling ingest run; 0 skips it",
    )
    p.add_argument("--rss-interval-s", type=float, default=0.02, help="RSS sampling period")
    p.add_argument(
        "--after-s",
        type=float,
        default=0.0,
        help="large run: keep sampling RSS this long after the last ack (classifier training)",
    )
    p.add_argument("--workdir", type=Path, default=None, help="where the SQLite files go")
    p.add_argument("--out", type=Path, default=None, help="write all results as JSON here")
    args = p.parse_args(argv)
    for name in ("clients", "samples", "latent_dim", "chunk_bytes", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr
    )
    args = parse_args(argv)
    ctx = mp.get_context("spawn")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    workdir.mkdir(parents=True, exist_ok=True)
    sizes = {
        "samples": args.samples,
        "latent_dim": args.latent_dim,
        "chunk_bytes": args.chunk_bytes,
    }
    per_sample = args.latent_dim * 4 + 1
    logger.info(
        "%d clients x %d samples x %d float32 = %.1f MB per repeat, %d chunk(s) per client",
        args.clients,
        args.samples,
        args.latent_dim,
        args.clients * args.samples * per_sample / _MB,
        len(chunk_slices(args.samples, args.latent_dim, args.chunk_bytes)),
    )
    rows: list[RunResult] = []
    for rep in range(1, args.repeats + 1):
        for kind in ("raw", "ingest", "store"):
            if kind == "raw":
                r = run_raw(ctx, args.clients, sizes, args.rss_interval_s)
            elif kind == "ingest":
                r = run_ingest(ctx, args.clients, sizes, workdir, args.rss_interval_s)
            else:
                r = run_store(args.clients, sizes, workdir)
            logger.info(
                "repeat %d/%d %s: %.1f MB/s, %.2f s", rep, args.repeats, kind, r.mb_per_s, r.wall_s
            )
            rows.append(replace(r, repeat=rep))
    if args.large_total_mb > 0:
        large_samples = int(args.large_total_mb * _MB / args.clients / per_sample)
        logger.info("large ingest run: %d samples per client", large_samples)
        large = run_ingest(
            ctx,
            args.clients,
            {**sizes, "samples": large_samples},
            workdir,
            args.rss_interval_s,
            args.after_s,
        )
        rows.append(replace(large, kind="ingest-large"))
    if args.workdir is None:
        shutil.rmtree(workdir)
    raw_mbs = statistics.median(r.mb_per_s for r in rows if r.kind == "raw")
    ingest = [r for r in rows if r.kind == "ingest"]
    ingest_mbs = statistics.median(r.mb_per_s for r in ingest)
    ingest_sps = statistics.median(r.samples_per_s for r in ingest)
    store_mbs = statistics.median(r.mb_per_s for r in rows if r.kind == "store")
    sys.stdout.write(table(rows) + "\n\n")
    sys.stdout.write(
        f"median over {args.repeats}: ingest {ingest_mbs:.1f} MB/s ({ingest_sps:,.0f} samples/s), "
        f"raw gRPC {raw_mbs:.1f} MB/s; ratio ingest/raw = {ingest_mbs / raw_mbs:.2f} "
        "(goal >= 0.5)\n"
        f"storage ceiling (SqliteStore alone, one thread, no gRPC): {store_mbs:.1f} MB/s, "
        f"ratio store/raw = {store_mbs / raw_mbs:.2f}, "
        f"ingest/store = {ingest_mbs / store_mbs:.2f}\n"
    )

    def growth(kind: str) -> float:
        return statistics.median(
            r.rss_peak_before_first_ack_mb - r.rss_start_mb for r in rows if r.kind == kind
        )

    sys.stdout.write(
        "server RSS growth while streaming (peak before the first ack - start), median: "
        f"ingest {growth('ingest'):.0f} MB for {ingest[0].payload_bytes / _MB:.0f} MB, "
        f"raw gRPC sink {growth('raw'):.0f} MB"
        + (
            f"; large ingest {growth('ingest-large'):.0f} MB for "
            f"{rows[-1].payload_bytes / _MB:.0f} MB"
            if rows[-1].kind == "ingest-large"
            else ""
        )
        + "\n"
    )
    if rows[-1].kind == "ingest-large" and args.after_s > 0:
        sys.stdout.write(
            f"server RSS peak within {args.after_s:g} s after the large run's last ack "
            f"(classifier training on {rows[-1].payload_bytes / _MB:.0f} MB stored): "
            f"{rows[-1].rss_after_peak_mb:.0f} MB (start {rows[-1].rss_start_mb:.0f} MB)\n"
        )
    if args.out is not None:
        args.out.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "runs": [{**asdict(r), "mb_per_s": r.mb_per_s} for r in rows],
                    "median_ingest_mb_per_s": ingest_mbs,
                    "median_ingest_samples_per_s": ingest_sps,
                    "median_raw_mb_per_s": raw_mbs,
                    "median_store_mb_per_s": store_mbs,
                    "ratio": ingest_mbs / raw_mbs,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
