"""SIGKILL the server mid-upload, restart it on the same database: nothing lost or doubled."""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from common.records import LatentChunk, NodeRegistration
from common.serde import latent_chunk_to_proto
from common.tensors import to_wire
from edge.uplink import RetryPolicy, UplinkClient
from protos import uplink_pb2, uplink_pb2_grpc
from server.segments import segment_dir_for
from server.store import SqliteStore
from tests.conftest import ServerProcess, start_server_process

DIM = 16
ROWS = 500


def _chunks(x: np.ndarray, y: np.ndarray, upload_id: str) -> list[uplink_pb2.LatentChunk]:
    count = len(x) // ROWS
    return [
        latent_chunk_to_proto(
            LatentChunk(
                node_id="n0",
                upload_id=upload_id,
                seq=i,
                last=i == count - 1,
                latents=to_wire(x[i * ROWS : (i + 1) * ROWS]),
                labels=to_wire(y[i * ROWS : (i + 1) * ROWS].astype(np.uint8)),
                total_samples=len(x),
            )
        )
        for i in range(count)
    ]


def _staged_chunks(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM chunks").fetchone()[0])


def _segment_bytes(db: Path) -> int:
    folder = segment_dir_for(db)
    return sum(f.stat().st_size for f in folder.iterdir()) if folder.exists() else 0


def _kill(server: ServerProcess) -> None:
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(timeout=10)


def test_sigkill_mid_upload_then_resend(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10 * ROWS, DIM)).astype(np.float32)
    y = rng.integers(0, 10, len(x))
    chunks = _chunks(x, y, "upload-1")
    server = start_server_process(db)
    try:
        with UplinkClient(server.address) as client:
            client.register(NodeRegistration(node_id="n0", latent_dim=DIM, num_classes=10))
        release = threading.Event()

        def half_then_wait() -> Iterator[uplink_pb2.LatentChunk]:
            yield from chunks[:5]
            release.wait(30)
            yield from chunks[5:]

        channel = grpc.insecure_channel(server.address)
        future = uplink_pb2_grpc.UplinkStub(channel).PushLatents.future(
            half_then_wait(), timeout=60
        )
        half_bytes = 5 * ROWS * (DIM * 4 + 1)
        deadline = time.monotonic() + 30
        while _segment_bytes(db) < half_bytes and time.monotonic() < deadline:
            time.sleep(0.05)
        # half the upload is staged: its bytes in a segment (its chunk rows wait for the commit)
        (partial,) = segment_dir_for(db).iterdir()
        assert partial.stat().st_size == half_bytes
        _kill(server)
        release.set()
        with pytest.raises(grpc.RpcError) as info:
            future.result()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        channel.close()
    finally:
        server.stop()

    server = start_server_process(db)  # same database, new process
    try:
        with UplinkClient(server.address) as client:
            status = client.status()
            assert status.nodes[0].samples == 0  # ... but none of it is visible
            assert _staged_chunks(db) == 0  # and the leftovers were swept
            assert not partial.exists()  # with their segment
            ack = client.push_latents("n0", x, y, num_classes=10, upload_id="upload-1")
            assert (ack.samples, ack.deduplicated, ack.stored_samples) == (len(x), False, len(x))
            again = client.push_latents("n0", x, y, num_classes=10, upload_id="upload-1")
            assert again.deduplicated and again.stored_samples == len(x)
    finally:
        server.stop()
    store = SqliteStore(db)
    try:
        stored, labels = store.node_data("n0")
    finally:
        store.close()
    np.testing.assert_array_equal(stored, x)
    np.testing.assert_array_equal(labels, y)
    # one segment: the committed upload's bytes, once (the killed attempt's was reclaimed)
    (segment,) = segment_dir_for(db).iterdir()
    assert segment.stat().st_size == x.nbytes + len(y)


def test_acknowledged_upload_survives_sigkill(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    x = np.arange(40 * DIM, dtype=np.float32).reshape(40, DIM)
    y = np.arange(40) % 10
    server = start_server_process(db)
    try:
        with UplinkClient(server.address) as client:
            client.register(NodeRegistration(node_id="n0", latent_dim=DIM, num_classes=10))
            client.push_latents("n0", x, y, num_classes=10)
        _kill(server)  # immediately after the acknowledgement
    finally:
        server.stop()
    server = start_server_process(db)
    try:
        with UplinkClient(server.address) as client:
            assert client.status().nodes[0].samples == 40
    finally:
        server.stop()


def test_client_retries_until_server_returns(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    server = start_server_process(db)
    port = server.address.rsplit(":", 1)[1]
    x = np.ones((30, DIM), np.float32)
    y = np.zeros(30, np.int64)
    try:
        with UplinkClient(server.address) as client:
            client.register(NodeRegistration(node_id="n0", latent_dim=DIM, num_classes=10))
        _kill(server)
        restarted: list[ServerProcess] = []

        def restart_later() -> None:
            time.sleep(2.0)
            restarted.append(start_server_process(db, listen=f"127.0.0.1:{port}"))

        thread = threading.Thread(target=restart_later)
        thread.start()
        retry = RetryPolicy(window_s=60, initial_backoff_s=0.2, max_backoff_s=1.0)
        with UplinkClient(server.address, retry=retry, rpc_timeout_s=2.0) as client:
            ack = client.push_latents("n0", x, y, num_classes=10)
        thread.join()
        assert ack.stored_samples == 30
    finally:
        server.stop()
        for s in restarted:
            s.stop()
