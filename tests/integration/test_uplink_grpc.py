"""Real gRPC round trips against a real server over a real SQLite file."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.errors import ServerUnreachableError, UplinkError
from common.records import NodeRegistration, UploadMode
from common.serde import registration_to_proto, tensor_to_proto
from common.tensors import WireTensor, to_wire
from edge.uplink import RetryPolicy, UplinkClient
from protos import uplink_pb2, uplink_pb2_grpc
from tests.support_grpc import RunningServer

DIM = 8


def _register(client: UplinkClient, node_id: str = "n0", dim: int = DIM) -> None:
    client.register(NodeRegistration(node_id=node_id, latent_dim=dim, num_classes=10, samples=10))


def _data(n: int, dim: int = DIM, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dim)).astype(np.float32), rng.integers(0, 10, n)


def _stored(server: RunningServer, node_id: str = "n0") -> tuple[np.ndarray, np.ndarray]:
    return server.core.store.node_data(node_id)


def test_health_service_reports_serving(grpc_server: RunningServer) -> None:
    stub = health_pb2_grpc.HealthStub(grpc_server.channel)
    for service in ("", "latentedge.v1.Uplink"):
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_upload_roundtrip_is_exact_and_durable(grpc_server: RunningServer) -> None:
    x, y = _data(1000)
    with UplinkClient(grpc_server.address) as client:
        _register(client)
        ack = client.push_latents("n0", x, y, num_classes=10, chunk_bytes=(DIM * 4 + 1) * 64)
    assert ack.samples == 1000 and not ack.deduplicated and ack.stored_samples == 1000
    assert ack.payload_bytes == x.nbytes + y.size  # float32 latents + uint8 labels
    got_x, got_y = _stored(grpc_server)
    np.testing.assert_array_equal(got_x, x)
    np.testing.assert_array_equal(got_y, y)
    # committed means on disk: an independent connection sees all 16 chunks
    with sqlite3.connect(grpc_server.db) as conn:
        (chunks,) = conn.execute("SELECT COUNT(*) FROM chunks").fetchone()
        (state,) = conn.execute("SELECT state FROM uploads").fetchone()
    assert chunks == 16 and state == "committed"


def test_resent_upload_is_deduplicated(grpc_server: RunningServer) -> None:
    x, y = _data(300)
    with UplinkClient(grpc_server.address) as client:
        _register(client)
        first = client.push_latents("n0", x, y, num_classes=10, upload_id="u-1", chunk_bytes=512)
        again = client.push_latents("n0", x, y, num_classes=10, upload_id="u-1", chunk_bytes=512)
        status = client.status()
    assert not first.deduplicated and again.deduplicated
    assert again.samples == 300 and again.stored_samples == 300
    assert status.nodes[0].samples == 300
    assert len(_stored(grpc_server)[0]) == 300


def test_append_adds_and_replace_replaces(grpc_server: RunningServer) -> None:
    x, y = _data(50)
    with UplinkClient(grpc_server.address) as client:
        _register(client)
        client.push_latents("n0", x, y, num_classes=10)
        ack = client.push_latents("n0", x[:20], y[:20], num_classes=10, mode=UploadMode.APPEND)
        assert ack.stored_samples == 70
        ack = client.push_latents("n0", x[:5], y[:5], num_classes=10, mode=UploadMode.REPLACE)
        assert ack.stored_samples == 5
    np.testing.assert_array_equal(_stored(grpc_server)[0], x[:5])


@pytest.mark.parametrize(
    ("encoding", "tol", "bytes_per_value"), [("float16", 1e-2, 2), ("int8", 0.05, 1)]
)
def test_compressed_latent_encodings(
    grpc_server: RunningServer, encoding: str, tol: float, bytes_per_value: int
) -> None:
    x, y = _data(200)
    with UplinkClient(grpc_server.address) as client:
        _register(client)
        ack = client.push_latents("n0", x, y, num_classes=10, encoding=encoding)
    assert ack.payload_bytes == x.size * bytes_per_value + y.size
    got, _ = _stored(grpc_server)
    assert got.dtype == np.float32
    assert np.max(np.abs(got - x)) < tol * np.max(np.abs(x))


def test_classify_after_training(grpc_server: RunningServer) -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 600)
    x = (np.eye(DIM, dtype=np.float32)[y] * 3 + rng.normal(scale=0.3, size=(600, DIM))).astype(
        np.float32
    )
    with UplinkClient(grpc_server.address) as client:
        client.register(NodeRegistration(node_id="a", latent_dim=DIM, num_classes=3))
        with pytest.raises(UplinkError, match=r"FAILED_PRECONDITION.*no trained classifier"):
            client.classify("a", x[:4])
        client.push_latents("a", x, y, num_classes=3)
        status = client.wait_for_classifier("a", timeout_s=120)
        pred = client.classify("a", x[:100])
    assert status.classifier.nodes == ("a",) and status.classifier.version >= 1
    assert pred.labels.shape == (100,) and pred.probabilities.shape == (100, 3)
    np.testing.assert_allclose(pred.probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert np.mean(pred.labels == y[:100]) > 0.95


# --- the bad-input matrix: precise status codes, nothing stored, server keeps serving -------


def _chunk(
    latents: WireTensor,
    labels: WireTensor,
    *,
    node_id: str = "n0",
    upload_id: str = "bad",
    seq: int = 0,
    last: bool = True,
) -> uplink_pb2.LatentChunk:
    return uplink_pb2.LatentChunk(
        node_id=node_id,
        upload_id=upload_id,
        seq=seq,
        last=last,
        latents=tensor_to_proto(latents),
        labels=tensor_to_proto(labels),
    )


def _good(n: int = 4) -> tuple[WireTensor, WireTensor]:
    x, y = _data(n)
    return to_wire(x), to_wire(y.astype(np.uint8))


def _bad_matrix() -> dict[str, tuple[list[uplink_pb2.LatentChunk], grpc.StatusCode, str]]:
    lat, lab = _good()
    x, y = _data(4)
    nan = x.copy()
    nan[1, 2] = np.nan
    inf = x.copy()
    inf[0, 0] = np.inf
    return {
        "wrong dtype": (
            [_chunk(to_wire(x.astype(np.int64)), lab)],
            grpc.StatusCode.INVALID_ARGUMENT,
            "latents.dtype must be one of",
        ),
        "unknown dtype": (
            [_chunk(WireTensor(lat.data, "complex64", lat.shape), lab)],
            grpc.StatusCode.INVALID_ARGUMENT,
            "latents.dtype",
        ),
        "bytes vs shape": (
            [_chunk(WireTensor(lat.data[:-4], "float32", lat.shape), lab)],
            grpc.StatusCode.INVALID_ARGUMENT,
            "latents.data has 124 bytes, expected 128",
        ),
        "latent size": (
            [_chunk(to_wire(_data(4, dim=DIM + 1)[0]), lab)],
            grpc.StatusCode.INVALID_ARGUMENT,
            f"latents.shape must be (n, {DIM})",
        ),
        "rank": (
            [_chunk(to_wire(x.reshape(4, 2, 4)), lab)],
            grpc.StatusCode.INVALID_ARGUMENT,
            "latents.shape",
        ),
        "nan": ([_chunk(to_wire(nan), lab)], grpc.StatusCode.INVALID_ARGUMENT, "NaN/Inf"),
        "inf": ([_chunk(to_wire(inf), lab)], grpc.StatusCode.INVALID_ARGUMENT, "NaN/Inf"),
        "label range": (
            [_chunk(lat, to_wire(np.array([0, 1, 10, 2], np.uint8)))],
            grpc.StatusCode.INVALID_ARGUMENT,
            "labels must be in [0, 10)",
        ),
        "label count": (
            [_chunk(lat, to_wire(np.array([0, 1, 2], np.uint8)))],
            grpc.StatusCode.INVALID_ARGUMENT,
            "labels.shape must be (4,)",
        ),
        "label dtype": (
            [_chunk(lat, to_wire(y.astype(np.float32)))],
            grpc.StatusCode.INVALID_ARGUMENT,
            "labels.dtype",
        ),
        "unknown node": (
            [_chunk(lat, lab, node_id="ghost")],
            grpc.StatusCode.NOT_FOUND,
            "node_id 'ghost' is not registered",
        ),
        "bad node id": (
            [_chunk(lat, lab, node_id="../etc")],
            grpc.StatusCode.INVALID_ARGUMENT,
            "node_id must match",
        ),
        "truncated": (
            [_chunk(lat, lab, last=False), _chunk(lat, lab, seq=1, last=False)],
            grpc.StatusCode.INVALID_ARGUMENT,
            "without a chunk marked last",
        ),
        "seq gap": (
            [_chunk(lat, lab, last=False), _chunk(lat, lab, seq=2)],
            grpc.StatusCode.INVALID_ARGUMENT,
            "seq must be 1",
        ),
        "first seq": (
            [_chunk(lat, lab, seq=3)],
            grpc.StatusCode.INVALID_ARGUMENT,
            "seq of the first chunk must be 0",
        ),
        "upload id switch": (
            [_chunk(lat, lab, last=False), _chunk(lat, lab, seq=1, upload_id="other")],
            grpc.StatusCode.INVALID_ARGUMENT,
            "changed mid-stream",
        ),
        "after last": (
            [_chunk(lat, lab), _chunk(lat, lab, seq=1)],
            grpc.StatusCode.INVALID_ARGUMENT,
            "after the one marked last",
        ),
        "oversized upload": (
            [_chunk(*_good(10_000), seq=i, last=i == 29) for i in range(30)],
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "exceeds max_upload_bytes=1000000",
        ),
        "empty stream": ([], grpc.StatusCode.INVALID_ARGUMENT, "empty upload stream"),
    }


@pytest.mark.parametrize("case", sorted(_bad_matrix()))
def test_bad_upload_gets_precise_status_and_stores_nothing(
    grpc_server: RunningServer, case: str
) -> None:
    chunks, code, needle = _bad_matrix()[case]
    stub = uplink_pb2_grpc.UplinkStub(grpc_server.channel)
    with UplinkClient(grpc_server.address) as client:
        _register(client)
    with pytest.raises(grpc.RpcError) as info:
        stub.PushLatents(iter(chunks), timeout=30)
    assert info.value.code() == code
    assert needle in info.value.details()
    assert len(_stored(grpc_server)[0]) == 0
    with sqlite3.connect(grpc_server.db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM chunks").fetchone() == (0,)
    # and the server keeps serving: a good upload goes through afterwards
    x, y = _data(3)
    with UplinkClient(grpc_server.address) as client:
        assert client.push_latents("n0", x, y, num_classes=10).stored_samples == 3


def test_message_over_grpc_limit_is_resource_exhausted(grpc_server: RunningServer) -> None:
    stub = uplink_pb2_grpc.UplinkStub(grpc_server.channel)
    big = np.zeros((300_000, DIM), np.float32)  # 9.6 MB > 8 MiB message limit
    with pytest.raises(grpc.RpcError) as info:
        stub.PushLatents(
            iter([_chunk(to_wire(big), to_wire(np.zeros(300_000, np.uint8)))]), timeout=30
        )
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize(
    ("request_kwargs", "needle"),
    [
        ({"node_id": "n1", "latent_dim": 0, "num_classes": 10}, "latent_dim must be in 1..65536"),
        ({"node_id": "n1", "latent_dim": 4, "num_classes": 1}, "num_classes must be in 2..65536"),
        ({"node_id": "", "latent_dim": 4, "num_classes": 10}, "node_id must match"),
    ],
)
def test_bad_registration_is_invalid_argument(
    grpc_server: RunningServer, request_kwargs: dict[str, object], needle: str
) -> None:
    stub = uplink_pb2_grpc.UplinkStub(grpc_server.channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.RegisterNode(uplink_pb2.RegisterNodeRequest(**request_kwargs), timeout=5)  # type: ignore[arg-type]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in info.value.details()


def test_negative_profile_value_is_invalid_argument(grpc_server: RunningServer) -> None:
    stub = uplink_pb2_grpc.UplinkStub(grpc_server.channel)
    msg = registration_to_proto(NodeRegistration(node_id="n1", latent_dim=4, num_classes=10))
    msg.profile.tx_power_w = -1.0
    with pytest.raises(grpc.RpcError) as info:
        stub.RegisterNode(msg, timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "profile.tx_power_w must be finite and >= 0, got -1.0" in info.value.details()


def test_changing_latent_dim_with_stored_data_needs_reset(grpc_server: RunningServer) -> None:
    x, y = _data(10)
    with UplinkClient(grpc_server.address) as client:
        _register(client)
        client.push_latents("n0", x, y, num_classes=10)
        with pytest.raises(UplinkError, match=r"FAILED_PRECONDITION.*10 samples stored"):
            _register(client, dim=DIM * 2)
        client.wait_for_classifier("n0", timeout_s=120)
        stored = client.register(
            NodeRegistration(node_id="n0", latent_dim=DIM * 2, num_classes=10, reset=True)
        )
        assert stored == 0
        assert client.status().nodes[0].latent_dim == DIM * 2
        with pytest.raises(UplinkError, match=r"FAILED_PRECONDITION.*latent_dim"):
            client.classify("n0", np.zeros((2, DIM * 2), np.float32))


def test_classify_bad_input(grpc_server: RunningServer) -> None:
    with UplinkClient(grpc_server.address) as client:
        _register(client)
        with pytest.raises(UplinkError, match=r"INVALID_ARGUMENT.*latents.shape must be"):
            client.classify("n0", np.zeros((2, DIM + 3), np.float32))
        with pytest.raises(UplinkError, match="NOT_FOUND"):
            client.classify("nobody", np.zeros((2, DIM), np.float32))


def test_client_gives_up_after_retry_window() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    retry = RetryPolicy(window_s=1.0, initial_backoff_s=0.2)
    with (
        UplinkClient(f"127.0.0.1:{port}", retry=retry, rpc_timeout_s=0.5) as client,
        pytest.raises(ServerUnreachableError, match="unreachable for 1 s"),
    ):
        client.status()


def _slow(chunks: list[uplink_pb2.LatentChunk]) -> Iterator[uplink_pb2.LatentChunk]:
    yield from chunks
