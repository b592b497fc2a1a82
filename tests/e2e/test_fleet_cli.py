"""``latentedge fleet`` with the local backend, as a user runs it: a real server process, the
CLI in a subprocess, its spawned worker processes, real gRPC."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from common.tls import ClientTls
from tests.conftest import ROOT, assert_one_line_error, run_cli
from tests.support_fleet import check_fleet_report, start_fleet_server
from tests.support_tls import make_pki

pytestmark = pytest.mark.e2e


def test_fleet_local_runs_scheduled_rounds_over_tls_with_an_admin_token(tmp_path: Path) -> None:
    devices = tmp_path / "devices.csv"
    gen = run_cli("allocate", "generate", "--devices", "4", "--seed", "1", "--out", str(devices))
    assert gen.returncode == 0, gen.stderr
    pki = make_pki(tmp_path / "pki")
    admin = run_cli("token", "issue", "--admin", "fleet", "--db", str(tmp_path / "server.db"))
    assert admin.returncode == 0, admin.stderr
    token_file = tmp_path / "admin.token"
    token_file.write_text(admin.stdout)
    tls = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    server = start_fleet_server(tmp_path, *tls)
    try:
        fleet = ["fleet", "--server", server.address, "--tls-ca", str(pki.ca), "--data", "digits"]
        # a server with TLS wants a credential on every RPC: without one no node registers
        denied = run_cli(*fleet, "--nodes", "2", "--retry-window-s", "1", timeout=120)
        assert_one_line_error(denied, 4, "no node of the fleet registered")
        assert "UNAUTHENTICATED" in denied.stderr
        out = tmp_path / "fleet.json"
        proc = run_cli(
            *fleet,
            "--token-file", str(token_file),
            "--nodes", "4",
            "--rounds", "2",
            "--devices", str(devices),
            "--workers", "2",
            "--model-cache", str(tmp_path / "cache"),
            "--out", str(out),
            timeout=240,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.loads(out.read_text())
        assert report["backend"] == "local" and report["workers"] == 2
        check_fleet_report(
            report,
            server.address,
            nodes=4,
            rounds=2,
            tls=ClientTls(ca=pki.ca.read_bytes()),
            token=admin.stdout.strip(),
        )
        assert admin.stdout.strip() not in out.read_text() + proc.stdout + proc.stderr
        # progress on stderr, one line per round; the summary on stdout
        assert proc.stderr.count("round 1/2 (server round") == 1
        assert proc.stdout.startswith("fleet of 4 nodes on 2 local worker(s)")
    finally:
        server.stop()


def test_fleet_refuses_too_few_device_rows(tmp_path: Path) -> None:
    devices = tmp_path / "devices.csv"
    assert (
        run_cli(
            "allocate", "generate", "--devices", "2", "--seed", "0", "--out", str(devices)
        ).returncode
        == 0
    )
    proc = run_cli("fleet", "--nodes", "3", "--devices", str(devices), "--server", "127.0.0.1:1")
    assert_one_line_error(proc, 3, "--nodes 3 needs at least that many")


def _without_ray(tmp_path: Path) -> dict[str, str]:
    """An environment in which ``import ray`` fails, as where the extra is not installed."""
    shim = tmp_path / "no_ray" / "ray"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    path = os.pathsep.join([str(shim.parent), str(ROOT)])
    return {**os.environ, "PYTHONPATH": path}


def test_backend_ray_without_ray_names_the_extra(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = _without_ray(tmp_path)
    for args in (
        ["fleet", "--nodes", "2", "--server", "127.0.0.1:1", "--backend", "ray"],
        ["simulate", "m.onnx", "--data", str(tmp_path / "d.npz"), "--backend", "ray"],
    ):
        if args[0] == "simulate":
            import numpy as np

            np.savez(tmp_path / "d.npz", x=np.zeros((2, 1), np.float32), y=np.zeros(2, np.int64))
        proc = subprocess.run(
            [sys.executable, "-m", "latentedge", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            check=False,
        )
        assert_one_line_error(proc, 3, "pip install latentedge[ray]")
