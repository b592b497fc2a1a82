"""Health follows the store: a removed or replaced database file turns it NOT_SERVING."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from server.health import StoreHealth
from server.store import SqliteStore
from tests.conftest import start_server_process

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _status(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status)


def test_removing_the_database_turns_health_not_serving(tmp_path: Path) -> None:
    db = tmp_path / "server.db"
    server = start_server_process(db)
    try:
        assert _status(server.address) == SERVING
        for path in tmp_path.glob("server.db*"):
            if path.is_file():  # the database and its WAL files; not the segment directory
                path.unlink()
        deadline = time.monotonic() + 10
        while _status(server.address) != NOT_SERVING and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _status(server.address) == NOT_SERVING
        assert _status(server.address, "latentedge.v1.Uplink") == NOT_SERVING
    finally:
        server.stop()


def test_store_health_flips_and_recovers(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    store = SqliteStore(db)
    servicer = health.HealthServicer()
    monitor = StoreHealth(store, servicer, interval_s=60)
    try:
        assert monitor.check_once()
        moved = tmp_path / "moved.db"
        db.rename(moved)
        assert not monitor.check_once()
        reply = servicer.Check(health_pb2.HealthCheckRequest(service=""), None)
        assert reply.status == NOT_SERVING
        moved.rename(db)  # the same file back in place
        assert monitor.check_once()
        assert servicer.Check(health_pb2.HealthCheckRequest(service=""), None).status == SERVING
        db.rename(moved)
        SqliteStore(db).close()  # another file under the old name is not our database
        assert not monitor.check_once()
    finally:
        store.close()
