"""TLS and mutual TLS on a real gRPC server, with certificates made by openssl."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from common.errors import ConfigError, ServerUnreachableError, UplinkError
from common.records import NodeRegistration
from common.tls import ClientTls, ServerTls, is_loopback
from edge.uplink import RetryPolicy, UplinkClient
from tests.conftest import ROOT, latentedge_cmd, run_cli, start_server_process
from tests.support_grpc import running_server
from tests.support_tls import Pki, make_pki

QUICK = RetryPolicy(window_s=1.0, initial_backoff_s=0.2)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _register(address: str, tls: ClientTls | None) -> int:
    with UplinkClient(address, retry=QUICK, tls=tls) as client:
        return client.register(NodeRegistration("n0", 4, 10))


def test_tls_round_trip_and_plaintext_is_refused(tmp_path: Path, pki: Pki) -> None:
    tls = ServerTls.from_paths(str(pki.server_cert), str(pki.server_key))
    for server in running_server(tmp_path, tls=tls):
        assert _register(server.address, ClientTls.from_paths(str(pki.ca))) == 0
        with pytest.raises(ServerUnreachableError):  # plaintext to a TLS port
            _register(server.address, None)
        with pytest.raises(ServerUnreachableError):  # a CA that did not sign the server
            _register(server.address, ClientTls.from_paths(str(pki.other_ca)))


def test_mutual_tls_needs_a_client_certificate(tmp_path: Path, pki: Pki) -> None:
    tls = ServerTls.from_paths(str(pki.server_cert), str(pki.server_key), str(pki.ca))
    assert tls is not None and tls.client_ca is not None
    for server in running_server(tmp_path, tls=tls):
        with_cert = ClientTls.from_paths(str(pki.ca), str(pki.client_cert), str(pki.client_key))
        assert _register(server.address, with_cert) == 0
        with pytest.raises((ServerUnreachableError, UplinkError)):
            _register(server.address, ClientTls.from_paths(str(pki.ca)))


def test_tls_settings_are_checked(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(ConfigError, match="both --tls-cert and --tls-key"):
        ServerTls.from_paths(str(pki.server_cert), "")
    with pytest.raises(ConfigError, match="--tls-client-ca needs"):
        ServerTls.from_paths("", "", str(pki.ca))
    not_pem = tmp_path / "x.pem"
    not_pem.write_text("hello")
    with pytest.raises(ConfigError, match="not a PEM file"):
        ClientTls.from_paths(str(not_pem))
    with pytest.raises(ConfigError, match="cannot be read"):
        ClientTls.from_paths(str(tmp_path / "missing.pem"))
    assert is_loopback("127.0.0.1:1") and is_loopback("[::1]:5") and is_loopback("localhost:9")
    assert not is_loopback("0.0.0.0:50051") and not is_loopback("10.1.2.3:1")


def test_server_cli_refuses_plaintext_off_loopback_and_serves_tls(tmp_path: Path, pki: Pki) -> None:
    proc = run_cli("server", "--listen", "0.0.0.0:0", "--db", str(tmp_path / "a.db"))
    assert proc.returncode == 3
    assert "not a loopback address" in proc.stderr and "--insecure" in proc.stderr
    admin = run_cli("token", "issue", "--admin", "--db", str(tmp_path / "b.db"))
    assert admin.returncode == 0, admin.stderr
    server = start_server_process(
        tmp_path / "b.db",
        "--tls-cert",
        str(pki.server_cert),
        "--tls-key",
        str(pki.server_key),
        listen="0.0.0.0:0",
    )
    try:
        port = server.address.rsplit(":", 1)[1]
        status = subprocess.run(
            latentedge_cmd("status", "--server", f"localhost:{port}", "--tls-ca", str(pki.ca)),
            env={**os.environ, "LATENTEDGE_TOKEN": admin.stdout.strip()},  # TLS: tokens needed
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert status.returncode == 0, status.stderr[-2000:]
        assert '"nodes": []' in status.stdout
        plain = run_cli("status", "--server", f"127.0.0.1:{port}", "--retry-window-s", "1")
        assert plain.returncode == 4
    finally:
        server.stop()
    insecure = start_server_process(tmp_path / "c.db", "--insecure", listen="0.0.0.0:0")
    insecure.stop()
