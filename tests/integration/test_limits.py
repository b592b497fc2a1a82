"""Resource limits against a real server on loopback: each limit hit gives its status, the
server keeps serving and committed data stays intact (small limits keep this file fast)."""

from __future__ import annotations

import contextlib
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.errors import UplinkError
from common.models import ClassifierConfig
from common.records import EnergyProfile, NodeRegistration, UploadMode
from common.serde import registration_to_proto, tensor_to_proto
from common.tensors import to_wire
from edge.uplink import UplinkClient
from protos import uplink_pb2, uplink_pb2_grpc
from server.classifier import ClassifierMode
from server.core import IngestLimits, SplitLearningServer
from server.grpc_app import create_server
from server.limits import StreamLimits
from server.segments import segment_dir_for
from server.servicer import UplinkServicer
from server.store import SqliteStore
from tests.support_grpc import RunningServer

DIM = 8
ROW_BYTES = DIM * 4 + 1
"""Payload of one sample: float32 latents + a uint8 label."""


@contextlib.contextmanager
def _serve(
    tmp_path: Path,
    *,
    limits: IngestLimits | None = None,
    streams: StreamLimits | None = None,
    max_concurrent_rpcs: int = 128,
    retrain_min_interval_s: float = 0.0,
    servicer_cls: type[UplinkServicer] = UplinkServicer,
) -> Iterator[RunningServer]:
    store = SqliteStore(tmp_path / "server.db")
    core = SplitLearningServer(
        store,
        limits=limits or IngestLimits(max_upload_bytes=1_000_000),
        classifier_mode=ClassifierMode.PER_NODE,
        classifier_config=ClassifierConfig(epochs=5),
        retrain_min_interval_s=retrain_min_interval_s,
    )
    core.start()
    servicer = servicer_cls(core, stream_limits=streams or StreamLimits())
    server, port, _health = create_server(
        "127.0.0.1:0", servicer, max_concurrent_rpcs=max_concurrent_rpcs
    )
    address = f"127.0.0.1:{port}"
    channel = grpc.insecure_channel(address)
    try:
        yield RunningServer(address=address, db=tmp_path / "server.db", core=core, channel=channel)
    finally:
        channel.close()
        server.stop(grace=None).wait()
        core.stop()
        store.close()


def _data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, DIM)).astype(np.float32), rng.integers(0, 10, n)


def _chunk(
    n: int, *, node_id: str = "n0", upload_id: str = "u", seq: int = 0, last: bool = True
) -> uplink_pb2.LatentChunk:
    x, y = _data(n, seed=seq)
    return uplink_pb2.LatentChunk(
        node_id=node_id,
        upload_id=upload_id,
        seq=seq,
        last=last,
        latents=tensor_to_proto(to_wire(x)),
        labels=tensor_to_proto(to_wire(y.astype(np.uint8))),
    )


def _stalled(
    first: uplink_pb2.LatentChunk, release: threading.Event
) -> Iterator[uplink_pb2.LatentChunk]:
    """A client that sends its first chunk, then nothing until ``release``."""
    yield first
    release.wait(30)


def _register(server: RunningServer, node_id: str = "n0") -> None:
    with UplinkClient(server.address) as client:
        client.register(NodeRegistration(node_id, DIM, 10, samples=10))


def _rows(server: RunningServer, sql: str, *args: object) -> int:
    with contextlib.closing(sqlite3.connect(server.db)) as conn:
        (count,) = conn.execute(sql, args).fetchone()
    return int(count)


def _segments_written(server: RunningServer) -> int:
    """Uploads whose first chunk reached the server: segment files with payload bytes in them
    (chunk rows are inserted only at commit)."""
    return sum(1 for f in segment_dir_for(Path(server.db)).iterdir() if f.stat().st_size > 0)


def _wait_until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def _health_ok(server: RunningServer) -> bool:
    stub = health_pb2_grpc.HealthStub(server.channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _refusal(exc: BaseException | None) -> tuple[grpc.StatusCode, str]:
    """Status code and details of a failed call."""
    assert isinstance(exc, grpc.Call), f"expected an RPC error, got {exc!r}"
    return exc.code(), exc.details() or ""


def _status_code(call: grpc.Future[Any]) -> grpc.StatusCode:
    return _refusal(call.exception())[0]  # bounded by the call's own timeout


# --- 1. max_nodes ------------------------------------------------------------------------------


def test_max_nodes_refuses_a_new_node_but_not_a_known_one(tmp_path: Path) -> None:
    limits = IngestLimits(max_upload_bytes=1_000_000, max_nodes=3)
    with _serve(tmp_path, limits=limits) as server, UplinkClient(server.address) as client:
        for i in range(3):
            client.register(NodeRegistration(f"n{i}", DIM, 10))
        x, y = _data(20)
        client.push_latents("n0", x, y, num_classes=10)
        with pytest.raises(UplinkError, match=r"RESOURCE_EXHAUSTED.*server\.max_nodes = 3") as info:
            client.register(NodeRegistration("n3", DIM, 10))
        assert info.value.code == "RESOURCE_EXHAUSTED"
        assert client.register(NodeRegistration("n0", DIM, 10, samples=99)) == 20
        assert [n.node_id for n in client.status().nodes] == ["n0", "n1", "n2"]
        assert _health_ok(server)


# --- 2. max_node_bytes -------------------------------------------------------------------------


def test_max_node_bytes_refuses_an_upload_and_keeps_earlier_data(tmp_path: Path) -> None:
    limits = IngestLimits(max_upload_bytes=1_000_000, max_node_bytes=100 * ROW_BYTES)
    with _serve(tmp_path, limits=limits) as server, UplinkClient(server.address) as client:
        client.register(NodeRegistration("n0", DIM, 10))
        x, y = _data(160)
        client.push_latents("n0", x[:60], y[:60], num_classes=10, chunk_bytes=10 * ROW_BYTES)
        with pytest.raises(UplinkError, match=r"RESOURCE_EXHAUSTED.*server\.max_node_bytes"):
            client.push_latents(
                "n0",
                x[60:],
                y[60:],
                num_classes=10,
                mode=UploadMode.APPEND,
                chunk_bytes=10 * ROW_BYTES,
            )
        got_x, _ = server.core.store.node_data("n0")
        np.testing.assert_array_equal(got_x, x[:60])
        _wait_until(lambda: _rows(server, "SELECT COUNT(*) FROM uploads WHERE state='open'") == 0)
        assert _rows(server, "SELECT COUNT(*) FROM chunks") == 6  # only the first upload's
        # what fits still goes in: 40 more appended (100 rows), or a replacing upload
        ack = client.push_latents(
            "n0", x[60:100], y[60:100], num_classes=10, mode=UploadMode.APPEND
        )
        assert ack.stored_samples == 100
        ack = client.push_latents("n0", x[:100], y[:100], num_classes=10)
        assert ack.stored_samples == 100


# --- 3. concurrent streams and RPCs --------------------------------------------------------------


def test_stream_limit_refuses_at_once_while_unary_rpcs_keep_working(tmp_path: Path) -> None:
    streams = StreamLimits(max_concurrent_streams=3, stream_idle_timeout_s=20)
    with _serve(tmp_path, streams=streams, max_concurrent_rpcs=6) as server:
        _register(server)
        stub = uplink_pb2_grpc.UplinkStub(server.channel)
        release = threading.Event()
        stalled = [
            stub.PushLatents.future(
                _stalled(_chunk(4, upload_id=f"s{i}", last=False), release), timeout=30
            )
            for i in range(3)
        ]
        try:
            _wait_until(lambda: _segments_written(server) == 3)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                stub.PushLatents(iter([_chunk(4, upload_id="extra")]), timeout=10)
            assert time.monotonic() - started < 5  # refused, not queued
            code, details = _refusal(info.value)
            assert code == grpc.StatusCode.UNAVAILABLE  # transient: clients back off and retry
            assert "server.max_concurrent_streams = 3" in details
            for _ in range(20):  # the worker pool still has threads for unary RPCs and health
                stub.GetStatus(uplink_pb2.GetStatusRequest(), timeout=5)
                assert _health_ok(server)
        finally:
            release.set()
        for call in stalled:  # they ended without a last chunk
            assert _status_code(call) == grpc.StatusCode.INVALID_ARGUMENT
        with UplinkClient(server.address) as client:
            x, y = _data(30)
            assert client.push_latents("n0", x, y, num_classes=10).stored_samples == 30


class _SlowStatus(UplinkServicer):
    """GetStatus blocks until released: RPCs held in flight."""

    entered = threading.Semaphore(0)
    release = threading.Event()

    def GetStatus(
        self, request: uplink_pb2.GetStatusRequest, context: grpc.ServicerContext
    ) -> uplink_pb2.GetStatusReply:
        type(self).entered.release()
        type(self).release.wait(30)
        return super().GetStatus(request, context)


def test_rpcs_over_max_concurrent_rpcs_are_refused_at_once(tmp_path: Path) -> None:
    streams = StreamLimits(max_concurrent_streams=1, stream_idle_timeout_s=20)
    _SlowStatus.release.clear()
    with _serve(
        tmp_path, streams=streams, max_concurrent_rpcs=3, servicer_cls=_SlowStatus
    ) as server:
        stub = uplink_pb2_grpc.UplinkStub(server.channel)
        held = [stub.GetStatus.future(uplink_pb2.GetStatusRequest(), timeout=30) for _ in range(3)]
        try:
            for _ in range(3):
                assert _SlowStatus.entered.acquire(timeout=10)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                _health_ok(server)
            assert time.monotonic() - started < 5
            assert _refusal(info.value)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            _SlowStatus.release.set()
        for call in held:
            call.result(timeout=30)
        assert _health_ok(server)


# --- 4. idle timeout -----------------------------------------------------------------------------


def test_stalled_upload_is_cut_off_and_does_not_block_50_clients(tmp_path: Path) -> None:
    idle_s = 2.0
    streams = StreamLimits(max_concurrent_streams=64, stream_idle_timeout_s=idle_s)
    with _serve(tmp_path, streams=streams) as server:
        _register(server)
        stub = uplink_pb2_grpc.UplinkStub(server.channel)
        release = threading.Event()
        started = time.monotonic()
        stalled = stub.PushLatents.future(
            _stalled(_chunk(4, upload_id="stall", last=False), release), timeout=30
        )
        try:
            _wait_until(lambda: _segments_written(server) == 1)

            def one_client(i: int) -> int:
                with UplinkClient(server.address) as c:
                    c.register(NodeRegistration(f"c{i}", DIM, 10, samples=10))
                    if i % 2:
                        x, y = _data(10, seed=i)
                        return c.push_latents(f"c{i}", x, y, num_classes=10).samples
                    return len(c.status().nodes)

            with futures.ThreadPoolExecutor(50) as pool:
                results = list(pool.map(one_client, range(50)))
            assert results[1::2] == [10] * 25 and min(results[::2]) >= 1
            assert _status_code(stalled) == grpc.StatusCode.CANCELLED
            cut_after = time.monotonic() - started
        finally:
            release.set()
        assert idle_s <= cut_after < idle_s + 10
        # the stalled upload's staged chunk is gone; the 25 small uploads are intact
        _wait_until(lambda: _rows(server, "SELECT COUNT(*) FROM uploads WHERE state='open'") == 0)
        assert _rows(server, "SELECT COUNT(*) FROM chunks WHERE upload_id='stall'") == 0
        assert _rows(server, "SELECT COUNT(*) FROM uploads WHERE state='committed'") == 25
        with UplinkClient(server.address) as client:
            x, y = _data(30)
            ack = client.push_latents("n0", x, y, num_classes=10, upload_id="stall")
        assert ack.stored_samples == 30 and not ack.deduplicated


# --- 5. bounded dedupe drain ---------------------------------------------------------------------


def _endless(upload_id: str, n: int, pause_s: float = 0.0) -> Iterator[uplink_pb2.LatentChunk]:
    """A re-sent upload that never marks a chunk last (at most 10,000 chunks)."""
    for seq in range(10_000):
        yield _chunk(n, upload_id=upload_id, seq=seq, last=False)
        if pause_s:
            time.sleep(pause_s)


def test_dedupe_drain_stops_after_the_original_bytes(tmp_path: Path) -> None:
    with _serve(tmp_path) as server:
        _register(server)
        x, y = _data(300)
        with UplinkClient(server.address) as client:
            first = client.push_latents("n0", x, y, num_classes=10, upload_id="u-1")
        stub = uplink_pb2_grpc.UplinkStub(server.channel)
        started = time.monotonic()
        reply = stub.PushLatents(_endless("u-1", 50), timeout=30)  # 10,000 x 1650 bytes offered
        assert time.monotonic() - started < 10
        assert reply.deduplicated and reply.samples == first.samples == 300
        assert len(server.core.store.node_data("n0")[1]) == 300


def test_dedupe_drain_stops_after_its_timeout(tmp_path: Path) -> None:
    limits = IngestLimits(max_upload_bytes=1_000_000, dedupe_drain_timeout_s=1.0)
    with _serve(tmp_path, limits=limits) as server:
        _register(server)
        x, y = _data(300)
        with UplinkClient(server.address) as client:
            client.push_latents("n0", x, y, num_classes=10, upload_id="u-1")
        stub = uplink_pb2_grpc.UplinkStub(server.channel)
        started = time.monotonic()
        # one sample every 0.1 s: 300 samples' worth of bytes would take 30 s
        reply = stub.PushLatents(_endless("u-1", 1, pause_s=0.1), timeout=30)
        elapsed = time.monotonic() - started
        assert reply.deduplicated and reply.samples == 300
        assert 1.0 <= elapsed < 6


# --- 6. registration fields ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reg", "needle"),
    [
        (NodeRegistration("n0", DIM, 10, samples=2**63), "samples must be in 0.."),
        (NodeRegistration("n0", DIM, 10, samples=2**64 - 1), "samples must be in 0.."),
        (NodeRegistration("n0", 0, 10), "latent_dim must be in"),
        (NodeRegistration("n0", DIM, 2**32 - 1), "num_classes must be in"),
        (
            NodeRegistration(
                "n0", DIM, 10, 5, EnergyProfile(math.inf, 1e-28, 0.2, 1e-6, 5.0, upload_bits=1e6)
            ),
            "profile.cpu_hz must be finite",
        ),
        (
            NodeRegistration(
                "n0", DIM, 10, 5, EnergyProfile(1e9, 1e-28, 0.0, 1e-6, 5.0, upload_bits=1e6)
            ),
            "tx_power_w must be a number > 0",
        ),
    ],
)
def test_out_of_range_registration_is_invalid_argument(
    grpc_server: RunningServer, reg: NodeRegistration, needle: str
) -> None:
    stub = uplink_pb2_grpc.UplinkStub(grpc_server.channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.RegisterNode(registration_to_proto(reg), timeout=10)
    code, details = _refusal(info.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in details
    assert grpc_server.core.store.list_nodes() == []
    _register(grpc_server)
    assert _health_ok(grpc_server)


# --- 7. debounced retraining ---------------------------------------------------------------------


def test_retraining_is_debounced_and_the_last_upload_is_trained_on(tmp_path: Path) -> None:
    interval_s = 1.5
    with _serve(tmp_path, retrain_min_interval_s=interval_s) as server:
        _register(server)
        x, y = _data(400)
        started = time.monotonic()
        with UplinkClient(server.address) as client:
            for i in range(8):
                part = slice(50 * i, 50 * (i + 1))
                client.push_latents("n0", x[part], y[part], num_classes=10, mode=UploadMode.APPEND)
        uploading_s = time.monotonic() - started

        def trained_on_all() -> bool:
            status = server.core.status().classifier
            return status.samples == 400 and not status.training

        _wait_until(trained_on_all, timeout_s=30)
        trainings = server.core.status().classifier.version
        # one training at the first upload, then at most one per interval
        assert 1 <= trainings <= 2 + math.ceil(uploading_s / interval_s)
        time.sleep(interval_s + 0.5)  # nothing new: no further training
        assert server.core.status().classifier.version == trainings
