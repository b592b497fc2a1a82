"""An empty upload never replaces data; a registration changed mid-upload is refused at commit."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from common.errors import UplinkError
from common.records import NodeRegistration
from common.serde import tensor_to_proto
from common.tensors import to_wire
from edge.uplink import UplinkClient
from protos import uplink_pb2, uplink_pb2_grpc
from tests.support_grpc import running_server


def _chunk(rows: int, upload_id: str, seq: int, last: bool) -> uplink_pb2.LatentChunk:
    x = np.ones((rows, 4), dtype=np.float32)
    y = (np.arange(rows) % 2).astype(np.uint8)
    return uplink_pb2.LatentChunk(
        node_id="n0",
        upload_id=upload_id,
        seq=seq,
        last=last,
        latents=tensor_to_proto(to_wire(x)),
        labels=tensor_to_proto(to_wire(y)),
    )


def _paused(staged: threading.Event, go_on: threading.Event) -> Iterator[uplink_pb2.LatentChunk]:
    """Two chunks with a pause between them (``staged`` set in it, waits for ``go_on``)."""
    yield _chunk(6, "u1", 0, False)
    staged.set()
    go_on.wait(10)
    yield _chunk(6, "u1", 1, True)


def test_an_empty_upload_is_refused_and_keeps_the_data(tmp_path: Path) -> None:
    for server in running_server(tmp_path):
        with UplinkClient(server.address) as client:
            client.register(NodeRegistration("n0", 4, 2))
            x = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
            client.push_latents("n0", x, np.arange(10) % 2, num_classes=2)
        stub = uplink_pb2_grpc.UplinkStub(server.channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.PushLatents(iter([_chunk(0, "empty", 0, True)]), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "no samples" in (info.value.details() or "")
        (node,) = server.core.status().nodes
        assert node.samples == 10


def test_num_classes_changed_while_streaming_is_refused_at_commit(tmp_path: Path) -> None:
    for server in running_server(tmp_path):
        stub = uplink_pb2_grpc.UplinkStub(server.channel)
        stub.RegisterNode(uplink_pb2.RegisterNodeRequest(node_id="n0", latent_dim=4, num_classes=2))
        staged = threading.Event()
        go_on = threading.Event()

        call = stub.PushLatents.future(_paused(staged, go_on), timeout=30)
        assert staged.wait(10)
        stub.RegisterNode(uplink_pb2.RegisterNodeRequest(node_id="n0", latent_dim=4, num_classes=5))
        go_on.set()
        with pytest.raises(grpc.RpcError) as info:
            call.result(timeout=30)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "changed num_classes" in (info.value.details() or "")
        (node,) = server.core.status().nodes
        assert (node.samples, node.num_classes) == (0, 5)


def test_a_classify_reply_that_would_not_fit_is_refused_up_front(tmp_path: Path) -> None:
    for server in running_server(tmp_path):
        with UplinkClient(server.address) as client:
            client.register(NodeRegistration("n0", 4, 60000))
        stub = uplink_pb2_grpc.UplinkStub(server.channel)
        latents = np.zeros((200, 4), dtype=np.float32)  # 200 rows × 60000 classes × 4 bytes
        with pytest.raises(grpc.RpcError) as info:
            stub.Classify(
                uplink_pb2.ClassifyRequest(node_id="n0", latents=tensor_to_proto(to_wire(latents))),
                timeout=10,
            )
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "send at most 34 rows per call" in (info.value.details() or "")


def test_status_pages_and_remove_node(tmp_path: Path) -> None:
    for server in running_server(tmp_path):
        for i in range(1005):  # more than one page of MAX_STATUS_PAGE = 1000
            server.core.register(NodeRegistration(f"n{i:04d}", 4, 2))
        first = server.core.status()
        assert len(first.nodes) == 1000 and first.next_page_token == "n0999"
        with UplinkClient(server.address) as client:
            everyone = client.status()
            assert [n.node_id for n in everyone.nodes] == [f"n{i:04d}" for i in range(1005)]
            x = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
            client.push_latents("n0003", x, np.arange(8) % 2, num_classes=2)
            assert client.remove_node("n0003") == (8, 0)
            with pytest.raises(UplinkError, match="NOT_FOUND"):
                client.remove_node("n0003")
            with pytest.raises(UplinkError, match="NOT_FOUND"):
                client.classify("n0003", x)
            assert "n0003" not in {n.node_id for n in client.status().nodes}
        stub = uplink_pb2_grpc.UplinkStub(server.channel)
        for bad in (
            uplink_pb2.GetStatusRequest(page_size=1001),
            uplink_pb2.GetStatusRequest(page_token="x\n"),
        ):
            with pytest.raises(grpc.RpcError) as info:
                stub.GetStatus(bad, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_bug_answers_internal_with_an_incident_not_unknown_with_its_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret internal detail")

    for server in running_server(tmp_path):
        stub = uplink_pb2_grpc.UplinkStub(server.channel)
        monkeypatch.setattr(server.core, "status", broken)
        monkeypatch.setattr(server.core, "model", broken)
        for name in ("GetStatus", "GetModel"):
            with pytest.raises(grpc.RpcError) as info:
                if name == "GetStatus":
                    stub.GetStatus(uplink_pb2.GetStatusRequest(), timeout=10)
                else:
                    list(stub.GetModel(uplink_pb2.GetModelRequest(), timeout=10))
            assert info.value.code() == grpc.StatusCode.INTERNAL, name
            details = info.value.details() or ""
            assert f"internal error in {name} (incident" in details
            assert "secret" not in details
        # the server keeps serving
        stub.RegisterNode(uplink_pb2.RegisterNodeRequest(node_id="n1", latent_dim=4, num_classes=2))


def test_a_malformed_message_mid_stream_is_invalid_argument_and_stores_nothing(
    tmp_path: Path,
) -> None:
    for server in running_server(tmp_path):
        with UplinkClient(server.address) as client:
            client.register(NodeRegistration(node_id="n0", latent_dim=4, num_classes=2))
        push = server.channel.stream_unary("/latentedge.v1.Uplink/PushLatents")  # raw bytes
        good = _chunk(6, "u1", 0, False).SerializeToString()
        truncated = _chunk(6, "u1", 1, True).SerializeToString()[:-3]
        with pytest.raises(grpc.RpcError) as caught:
            push(iter([good, truncated]), timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "message 1 of the stream: malformed message" in str(caught.value.details())
        with UplinkClient(server.address) as client:
            assert client.status().nodes[0].samples == 0
