"""Two `latentedge server` processes on one PostgreSQL database and one payload directory
behave as one service: uploads through either are visible in both, a re-sent upload id is
deduplicated across them, one trainer at a time, one plan per scheduling round."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.records import NodeRegistration, UploadMode
from edge.uplink import UplinkClient
from tests.conftest import (
    ServerProcess,
    assert_one_line_error,
    run_cli,
    start_server_process,
)
from tests.support_grpc import energy_profile
from tests.support_postgres import PostgresServer, start_postgres

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

CONFIG = """
[server]
retrain_min_interval_s = 0.0

[cell]
bandwidth_hz = 2.0e6
noise_psd_w_per_hz = 4e-21
min_samples = 1000
weight_energy = 1.0
weight_latency = 0.5
"""


@pytest.fixture
def two_replicas(
    postgres_server: PostgresServer, tmp_path: Path
) -> Iterator[tuple[ServerProcess, ServerProcess, str]]:
    url = postgres_server.new_database()
    payloads = tmp_path / "payloads"
    payloads.mkdir()
    config = tmp_path / "server.toml"
    config.write_text(CONFIG)
    extra = ("--payload-dir", str(payloads), "--config", str(config))
    a = start_server_process(url, *extra)  # type: ignore[arg-type]
    try:
        b = start_server_process(url, *extra)  # type: ignore[arg-type]
    except BaseException:
        a.stop()
        raise
    yield a, b, url
    b.stop()
    a.stop()


def _data(seed: int, n: int = 120) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.normal(size=(n, 4)).astype(np.float32) + 3.0 * np.eye(4, dtype=np.float32)[y]
    return x, y.astype(np.int64)


def _wait(predicate: object, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def test_two_replicas_serve_as_one(
    two_replicas: tuple[ServerProcess, ServerProcess, str], postgres_server: PostgresServer
) -> None:
    a_proc, b_proc, url = two_replicas
    with UplinkClient(a_proc.address) as a, UplinkClient(b_proc.address) as b:
        _serve_as_one(a, b, url, postgres_server)


def _serve_as_one(
    a: UplinkClient, b: UplinkClient, url: str, postgres_server: PostgresServer
) -> None:
    dbname = url.rsplit("/", 1)[1]
    nodes = [f"n{i}" for i in range(4)]
    for i, node in enumerate(nodes):
        (a if i % 2 else b).register(
            NodeRegistration(node, 4, 3, samples=600, profile=energy_profile(10.0 ** -(9 + i / 2)))
        )
    # uploads through both replicas at once, two streams each
    errors: list[BaseException] = []

    def push(client: UplinkClient, node: str, seed: int) -> None:
        try:
            x, y = _data(seed)
            client.push_latents(node, x, y, num_classes=3, upload_id=f"{node}-up")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [
        threading.Thread(target=push, args=(a if i % 2 == 0 else b, node, i))
        for i, node in enumerate(nodes)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for client in (a, b):  # every upload is visible through either replica
        status = {n.node_id: n for n in client.status().nodes}
        assert [status[n].samples for n in nodes] == [120] * 4
    # the same upload id re-sent through the other replica is deduplicated, not stored twice
    x, y = _data(0)
    again = b.push_latents("n0", x, y, num_classes=3, upload_id="n0-up", mode=UploadMode.APPEND)
    assert again.deduplicated and again.stored_samples == 120
    assert {n.node_id: n.samples for n in a.status().nodes}["n0"] == 120

    # one classifier, trained once for the newest data, served by both replicas
    def same_classifier() -> bool:
        va, vb = a.status().classifier, b.status().classifier
        return va.version > 0 and va.version == vb.version and set(va.nodes) == set(nodes)

    _wait(same_classifier, "both replicas to serve a classifier of every node")
    x, y = _data(7)
    for client in (a, b):
        prediction = client.classify("n1", x)
        assert float(np.mean(prediction.labels == y)) > 0.8
    rows = postgres_server.psql("SELECT meta_json FROM classifiers", dbname).split("\n")
    trained_for = [json.loads(r)["data_version"] for r in rows if r.strip()]
    assert len(trained_for) == len(set(trained_for)), f"data trained twice: {trained_for}"

    # one plan per round, whichever replica each node asks
    answers = [(a if i % 2 else b).schedule(node) for i, node in enumerate(nodes)]
    assert {s.round for s in answers} == {1}
    again_answers = [(b if i % 2 else a).schedule(node) for i, node in enumerate(nodes)]
    assert again_answers == answers
    assert postgres_server.psql("SELECT COUNT(*) FROM plans", dbname).strip() == "1"
    uploaders = [node for node, s in zip(nodes, answers, strict=True) if s.upload]
    assert uploaders, answers
    for i, node in enumerate(uploaders):  # the round closes once its uploaders uploaded...
        x, y = _data(10 + i)
        (a if i % 2 else b).push_latents(node, x, y, num_classes=3, mode=UploadMode.APPEND)
    # ...through either replica; the next request, to either, opens round 2 for both
    assert b.schedule(nodes[0]).round == 2
    assert a.schedule(nodes[1]).round == 2
    assert postgres_server.psql("SELECT COUNT(*) FROM plans", dbname).strip() == "2"


def test_bad_database_settings_are_one_line_errors_that_hide_the_password(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    unreachable = "postgresql://someone:s3cret-pw@127.0.0.1:1/nowhere"
    proc = run_cli("server", "--listen", "127.0.0.1:0", "--db", unreachable, timeout=60)
    assert_one_line_error(proc, 3, "cannot connect to PostgreSQL someone@127.0.0.1:1/nowhere")
    assert "s3cret-pw" not in proc.stderr + proc.stdout
    proc = run_cli("server", "--listen", "127.0.0.1:0", "--db", "mysql://a@b/c", timeout=60)
    assert_one_line_error(proc, 3, "unsupported store URL scheme 'mysql'")
    proc = run_cli(
        "server", "--listen", "127.0.0.1:0", "--db", postgres_server.new_database(),
        "--payload-dir", str(tmp_path / "missing"), timeout=60,
    )  # fmt: skip
    assert_one_line_error(proc, 3, "payload directory")
    issued = run_cli("token", "issue", "node-1", "--db", postgres_server.new_database())
    assert issued.returncode == 0 and issued.stdout.strip(), issued.stderr


def test_health_follows_postgresql_down_and_back() -> None:
    server = start_postgres()  # its own: this test stops it
    try:
        replica = start_server_process(server.new_database())  # type: ignore[arg-type]
        try:
            with UplinkClient(replica.address) as client:
                client.register(NodeRegistration("n", 4, 3))
            assert _health(replica.address) == SERVING
            server.halt()
            _wait(lambda: _health(replica.address) == NOT_SERVING, "NOT_SERVING", 20)
            server.resume()
            _wait(lambda: _health(replica.address) == SERVING, "SERVING again", 30)
            with UplinkClient(replica.address) as client:  # the store reconnected
                x, y = _data(1, 30)
                ack = client.push_latents("n", x, y, num_classes=3)
                assert ack.stored_samples == 30
        finally:
            replica.stop()
    finally:
        server.stop()


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status)
