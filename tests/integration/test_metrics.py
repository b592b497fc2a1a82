"""Prometheus metrics: the interceptor's counts and codes, /metrics over HTTP, a real Prometheus."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.records import NodeRegistration
from edge.uplink import UplinkClient
from protos import uplink_pb2, uplink_pb2_grpc
from server.metrics import ServerMetrics
from tests.conftest import ServerProcess, start_server_process
from tests.support_prometheus import http_get, start_prometheus

DIM = 8

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _scrape(url: str) -> Samples:
    """Every sample of ``/metrics`` by (name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(http_get(url))
        for s in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def _metrics_url(server: ServerProcess) -> str:
    """The URL from the 'metrics on ...' line printed after 'listening on'."""
    assert server.proc.stdout is not None
    line = server.proc.stdout.readline()
    match = re.fullmatch(r"metrics on (http://127\.0\.0\.1:(\d+)/metrics)\n", line)
    assert match and int(match.group(2)) > 0, f"no 'metrics on' line, got {line!r}"
    return match.group(1)


def _register(client: UplinkClient, node_id: str) -> None:
    client.register(NodeRegistration(node_id=node_id, latent_dim=DIM, num_classes=10, samples=10))


# -- a real server process, scraped over HTTP -------------------------------------------------


def test_scrape_counts_rpcs_codes_bytes_and_gauges(tmp_path: Path) -> None:
    server = start_server_process(tmp_path / "server.db", "--metrics-listen", "127.0.0.1:0")
    try:
        url = _metrics_url(server)
        before = _scrape(url)
        assert _value(before, "latentedge_nodes") == 0
        assert _value(before, "latentedge_upload_bytes_total", kind="latents") == 0

        rng = np.random.default_rng(0)
        x, y = rng.normal(size=(200, DIM)).astype(np.float32), rng.integers(0, 10, 200)
        with UplinkClient(server.address) as client:
            _register(client, "n0")
            ack = client.push_latents("n0", x, y, num_classes=10, upload_id="u-1")
            again = client.push_latents("n0", x, y, num_classes=10, upload_id="u-1")
        assert not ack.deduplicated and again.deduplicated
        with grpc.insecure_channel(server.address) as channel:
            stub = uplink_pb2_grpc.UplinkStub(channel)
            with pytest.raises(grpc.RpcError) as bad:
                stub.RegisterNode(
                    uplink_pb2.RegisterNodeRequest(node_id="bad id!", latent_dim=DIM),
                    timeout=10,
                )
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        after = _scrape(url)
        rpcs = {
            (dict(labels)["method"], dict(labels)["code"]): value
            for (name, labels), value in after.items()
            if name == "latentedge_rpcs_total"
        }
        assert rpcs == {
            ("RegisterNode", "OK"): 1,
            ("RegisterNode", "INVALID_ARGUMENT"): 1,
            ("PushLatents", "OK"): 2,
        }
        assert _value(after, "latentedge_rpc_duration_seconds_count", method="RegisterNode") == 2
        assert _value(after, "latentedge_rpc_duration_seconds_count", method="PushLatents") == 2
        # the deduplicated re-send stored nothing new
        assert _value(after, "latentedge_upload_bytes_total", kind="latents") == ack.payload_bytes
        assert _value(after, "latentedge_upload_bytes_total", kind="delta") == 0
        assert _value(after, "latentedge_nodes") == 1
        assert _value(after, "latentedge_stored_samples") == 200
        assert _value(after, "latentedge_classifier_version") is not None
        assert _value(after, "latentedge_base_model_version") == 0
    finally:
        server.stop()


# -- the interceptor in-process: abort, unexpected exceptions, response streams ---------------


class _FakeUplink(uplink_pb2_grpc.UplinkServicer):
    """Methods that end in the ways the interceptor must tell apart."""

    def GetStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        raise RuntimeError("boom")  # unexpected: grpc sends UNKNOWN

    def Classify(self, request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "no token")

    def GetSchedule(self, request: Any, context: grpc.ServicerContext) -> Any:
        context.set_code(grpc.StatusCode.NOT_FOUND)
        context.set_details("nothing scheduled")
        return uplink_pb2.GetScheduleReply()

    def GetModel(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        chunks = 1000 if request.node_id == "slow" else 3
        for i in range(chunks):
            time.sleep(0.1)
            yield uplink_pb2.ModelChunk(offset=i)


@pytest.fixture
def fake_server() -> Iterator[tuple[ServerMetrics, uplink_pb2_grpc.UplinkStub]]:
    """The fake service behind the metrics interceptor (create_server itself is exercised by
    the server processes above)."""
    metrics = ServerMetrics()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4), interceptors=[metrics.interceptor()]
    )
    uplink_pb2_grpc.add_UplinkServicer_to_server(_FakeUplink(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield metrics, uplink_pb2_grpc.UplinkStub(channel)
    channel.close()
    server.stop(grace=None).wait()
    metrics.close()


def _count(metrics: ServerMetrics, method: str, code: str) -> float | None:
    return metrics.registry.get_sample_value(
        "latentedge_rpcs_total", {"method": method, "code": code}
    )


def test_interceptor_sees_abort_unexpected_errors_set_code_and_streams(
    fake_server: tuple[ServerMetrics, uplink_pb2_grpc.UplinkStub],
) -> None:
    metrics, stub = fake_server
    with pytest.raises(grpc.RpcError) as exc:
        stub.GetStatus(uplink_pb2.GetStatusRequest(), timeout=10)
    assert exc.value.code() == grpc.StatusCode.UNKNOWN
    with pytest.raises(grpc.RpcError) as exc:
        stub.Classify(uplink_pb2.ClassifyRequest(), timeout=10)
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as exc:
        stub.GetSchedule(uplink_pb2.GetScheduleRequest(), timeout=10)
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    assert len(list(stub.GetModel(uplink_pb2.GetModelRequest(), timeout=10))) == 3

    assert _count(metrics, "GetStatus", "UNKNOWN") == 1
    assert _count(metrics, "Classify", "UNAUTHENTICATED") == 1
    assert _count(metrics, "GetSchedule", "NOT_FOUND") == 1
    assert _count(metrics, "GetModel", "OK") == 1
    duration = metrics.registry.get_sample_value(
        "latentedge_rpc_duration_seconds_sum", {"method": "GetModel"}
    )
    assert duration is not None and duration >= 0.3  # the whole stream, not the first message

    # a client that leaves mid-stream: CANCELLED once grpc stops iterating
    call = stub.GetModel(uplink_pb2.GetModelRequest(node_id="slow"), timeout=10)
    next(call)
    call.cancel()
    deadline = time.monotonic() + 10
    while _count(metrics, "GetModel", "CANCELLED") != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _count(metrics, "GetModel", "CANCELLED") == 1
    assert _count(metrics, "GetModel", "OK") == 1


# -- a real Prometheus scraping a real server -------------------------------------------------


def test_prometheus_scrapes_the_server(tmp_path: Path, prometheus_binary: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text('[server]\nmetrics_listen = "127.0.0.1:0"\n')
    server = start_server_process(tmp_path / "server.db", "--config", str(config))
    prometheus = None
    try:
        url = _metrics_url(server)
        with UplinkClient(server.address) as client:
            for node in ("a", "b", "c"):
                _register(client, node)
        target = url.removeprefix("http://").removesuffix("/metrics")
        prometheus = start_prometheus(prometheus_binary, tmp_path / "prometheus", target)
        assert prometheus.wait_for_value("latentedge_nodes", 3) == 3
        assert (
            prometheus.wait_for_value(
                'sum(latentedge_rpcs_total{job="latentedge",method="RegisterNode",code="OK"})', 3
            )
            == 3
        )
    finally:
        if prometheus is not None:
            prometheus.stop()
        server.stop()
