"""Credentials bound to identity, on a real TLS server: the whole matrix of who may call what."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.records import NodeRegistration
from common.serde import tensor_to_proto
from common.tensors import to_wire
from common.tls import ClientTls, ServerTls
from edge.uplink import RetryPolicy, UplinkClient
from protos import uplink_pb2, uplink_pb2_grpc
from server.auth import issue_token
from server.store import SqliteStore
from tests.conftest import assert_one_line_error, run_cli, start_server_process
from tests.support_grpc import RunningServer, running_server
from tests.support_tls import Pki, make_pki

QUICK = RetryPolicy(window_s=1.0, initial_backoff_s=0.2)
Code = grpc.StatusCode
Call = Callable[[uplink_pb2_grpc.UplinkStub, list[tuple[str, str]]], object]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_server(tmp_path: Path, pki: Pki) -> Iterator[RunningServer]:
    tls = ServerTls.from_paths(str(pki.server_cert), str(pki.server_key))
    yield from running_server(tmp_path, tls=tls, auth=True)


def _issue(db: Path, subject: str, *, admin: bool = False) -> str:
    store = SqliteStore(db)
    try:
        text, _ = issue_token(store, subject, admin=admin)
    finally:
        store.close()
    return text


def _stub(address: str, pki: Pki, *, cert: bool = False) -> uplink_pb2_grpc.UplinkStub:
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=pki.client_key.read_bytes() if cert else None,
        certificate_chain=pki.client_cert.read_bytes() if cert else None,
    )
    return uplink_pb2_grpc.UplinkStub(grpc.secure_channel(address, creds))


def _chunk(node_id: str, upload_id: str = "u1") -> uplink_pb2.LatentChunk:
    x = np.ones((2, 4), dtype=np.float32)
    y = np.array([0, 1], dtype=np.uint8)
    return uplink_pb2.LatentChunk(
        node_id=node_id,
        upload_id=upload_id,
        seq=0,
        last=True,
        latents=tensor_to_proto(to_wire(x)),
        labels=tensor_to_proto(to_wire(y)),
    )


def _calls(
    node: str,
) -> dict[str, Callable[[uplink_pb2_grpc.UplinkStub, list[tuple[str, str]]], object]]:
    """Every RPC, acting for ``node``."""
    return {
        "RegisterNode": lambda s, md: s.RegisterNode(
            uplink_pb2.RegisterNodeRequest(node_id=node, latent_dim=4, num_classes=2), metadata=md
        ),
        "PushLatents": lambda s, md: s.PushLatents(iter([_chunk(node)]), metadata=md),
        "Classify": lambda s, md: s.Classify(
            uplink_pb2.ClassifyRequest(
                node_id=node, latents=tensor_to_proto(to_wire(np.ones((1, 4), np.float32)))
            ),
            metadata=md,
        ),
        "GetSchedule": lambda s, md: s.GetSchedule(
            uplink_pb2.GetScheduleRequest(node_id=node), metadata=md
        ),
        "GetModel": lambda s, md: list(
            s.GetModel(uplink_pb2.GetModelRequest(fine_tuned_for=node), metadata=md)
        ),
        "RemoveNode": lambda s, md: s.RemoveNode(
            uplink_pb2.RemoveNodeRequest(node_id=node), metadata=md
        ),
        "PushDelta": lambda s, md: s.PushDelta(
            iter([uplink_pb2.DeltaChunk(node_id=node, upload_id="d1", seq=0, last=True)]),
            metadata=md,
        ),
    }


def STATUS(s: uplink_pb2_grpc.UplinkStub, md: list[tuple[str, str]]) -> object:
    return s.GetStatus(uplink_pb2.GetStatusRequest(), metadata=md)


ADMIN_CALLS: dict[str, Call] = {
    "Aggregate": lambda s, md: s.Aggregate(uplink_pb2.AggregateRequest(min_nodes=1), metadata=md),
}


def _code(call: Call, stub: uplink_pb2_grpc.UplinkStub, md: list[tuple[str, str]]) -> Code:
    try:
        call(stub, md)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return Code.OK


def _bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def test_missing_and_bad_credentials_are_unauthenticated(
    tls_server: RunningServer, pki: Pki
) -> None:
    good = _issue(tls_server.db, "node-a")
    token_id = good.split(".")[1]
    wrong_secret = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
    bad: dict[str, list[tuple[str, str]]] = {
        "none": [],
        "malformed": [("authorization", "Bearer hello")],
        "not bearer": [("authorization", good)],
        "unknown id": _bearer(good.replace(token_id, "0" * 16)),
        "wrong secret": _bearer(wrong_secret),
    }
    stub = _stub(tls_server.address, pki)
    every = {**_calls("node-a"), **ADMIN_CALLS, "GetStatus": STATUS}
    for what, md in bad.items():
        for name, call in every.items():
            assert _code(call, stub, md) == Code.UNAUTHENTICATED, (what, name)
    # health answers without a credential
    health = health_pb2_grpc.HealthStub(
        grpc.secure_channel(tls_server.address, grpc.ssl_channel_credentials(pki.ca.read_bytes()))
    )
    reply = health.Check(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    # nothing was stored by any of the refused calls
    assert tls_server.core.status().nodes == ()


def test_a_node_token_acts_only_for_its_own_node(tls_server: RunningServer, pki: Pki) -> None:
    token_a = _issue(tls_server.db, "node-a")
    stub = _stub(tls_server.address, pki)
    md = _bearer(token_a)
    for name, call in {**_calls("node-b"), **ADMIN_CALLS}.items():
        assert _code(call, stub, md) == Code.PERMISSION_DENIED, name
    # a stream whose later chunk switches node is cut at that chunk, nothing stored
    mixed = iter([_chunk("node-a", "m1"), _chunk("node-b", "m1")])
    assert _code(lambda s, m: s.PushLatents(mixed, metadata=m), stub, md) != Code.OK
    # acting for itself works: register + upload through the real client
    with UplinkClient(
        tls_server.address, retry=QUICK, tls=ClientTls.from_paths(str(pki.ca)), token=token_a
    ) as client:
        assert client.register(NodeRegistration("node-a", 4, 2)) == 0
        x = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
        ack = client.push_latents("node-a", x, np.array([0, 1] * 4), num_classes=2)
        assert ack.samples == 8
    token_b = _issue(tls_server.db, "node-b")
    with UplinkClient(
        tls_server.address, retry=QUICK, tls=ClientTls.from_paths(str(pki.ca)), token=token_b
    ) as client:
        assert client.register(NodeRegistration("node-b", 4, 2)) == 0
        # a node's status shows only itself
        assert [n.node_id for n in client.status().nodes] == ["node-b"]
    admin = _issue(tls_server.db, "ops", admin=True)
    with UplinkClient(
        tls_server.address, retry=QUICK, tls=ClientTls.from_paths(str(pki.ca)), token=admin
    ) as client:
        status = client.status()
    assert [(n.node_id, n.samples) for n in status.nodes] == [("node-a", 8), ("node-b", 0)]


def test_revoked_token_is_refused_on_the_next_call(tls_server: RunningServer, pki: Pki) -> None:
    token = _issue(tls_server.db, "node-a")
    stub = _stub(tls_server.address, pki)
    register = _calls("node-a")["RegisterNode"]
    assert _code(register, stub, _bearer(token)) == Code.OK
    proc = run_cli("token", "revoke", "node-a", "--db", str(tls_server.db))
    assert proc.returncode == 0, proc.stderr
    assert _code(register, stub, _bearer(token)) == Code.UNAUTHENTICATED
    # a newly issued token for the same node works again
    fresh = run_cli("token", "issue", "node-a", "--db", str(tls_server.db))
    assert fresh.returncode == 0, fresh.stderr
    assert _code(register, stub, _bearer(fresh.stdout.strip())) == Code.OK


def test_mutual_tls_certificate_is_the_identity(tmp_path: Path, pki: Pki) -> None:
    tls = ServerTls.from_paths(str(pki.server_cert), str(pki.server_key), str(pki.ca))
    for server in running_server(tmp_path, tls=tls, auth=True):
        stub = _stub(server.address, pki, cert=True)  # CN=node-1
        calls_1, calls_2 = _calls("node-1"), _calls("node-2")
        assert _code(calls_1["RegisterNode"], stub, []) == Code.OK
        assert _code(calls_2["RegisterNode"], stub, []) == Code.PERMISSION_DENIED
        assert _code(ADMIN_CALLS["Aggregate"], stub, []) == Code.PERMISSION_DENIED
        # a token, when sent, wins over the certificate
        admin = _issue(server.db, "ops", admin=True)
        assert _code(calls_2["RegisterNode"], stub, _bearer(admin)) == Code.OK


def test_plaintext_loopback_with_require_tokens(tmp_path: Path) -> None:
    for server in running_server(tmp_path, auth=True):
        stub = uplink_pb2_grpc.UplinkStub(server.channel)
        register = _calls("node-a")["RegisterNode"]
        assert _code(register, stub, []) == Code.UNAUTHENTICATED
        token = _issue(server.db, "node-a")
        assert _code(register, stub, _bearer(token)) == Code.OK


def test_token_cli_and_clients_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "server.db"
    admin = run_cli("token", "issue", "--admin", "--db", str(db))
    node = run_cli("token", "issue", "edge-1", "--db", str(db))
    assert admin.returncode == 0 and node.returncode == 0, admin.stderr + node.stderr
    listing = run_cli("token", "list", "--db", str(db))
    assert listing.returncode == 0
    assert "edge-1" in listing.stdout and "admin" in listing.stdout
    assert node.stdout.strip().split(".")[2] not in listing.stdout + db.read_bytes().decode(
        "latin-1"
    )  # the secret is stored nowhere
    server = start_server_process(db, "--require-tokens")
    try:
        denied = run_cli("status", "--server", server.address, "--retry-window-s", "1")
        assert_one_line_error(denied, 4, "UNAUTHENTICATED")
        as_node = run_cli(
            "models", "--server", server.address, "--aggregate", "--token", node.stdout.strip()
        )
        assert_one_line_error(as_node, 4, "PERMISSION_DENIED")
        token_file = tmp_path / "admin.token"
        token_file.write_text(admin.stdout)
        ok = run_cli("status", "--server", server.address, "--token-file", str(token_file))
        assert ok.returncode == 0, ok.stderr
        assert '"nodes": []' in ok.stdout
    finally:
        server.stop()
    assert_one_line_error(run_cli("token", "revoke", "nobody", "--db", str(db)), 3, "no live token")
    assert_one_line_error(run_cli("token", "issue", "bad id", "--db", str(db)), 3, "node id")
    assert_one_line_error(
        run_cli("token", "list", "--db", str(tmp_path / "none.db")), 3, "does not exist"
    )
    assert_one_line_error(
        run_cli("status", "--server", "127.0.0.1:1", "--token", "a b"), 3, "one word"
    )
