from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tests.support_postgres import PostgresServer

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
MNIST_TINY = SHARED_DATA / "mnist" / "mnist_tiny.npz"


def latentedge_cmd(*args: str) -> list[str]:
    """The console script, run with this interpreter (works without the venv on PATH)."""
    return [sys.executable, "-m", "latentedge", *args]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``latentedge ARGS`` in a subprocess from the checkout; capture its output."""
    return subprocess.run(
        latentedge_cmd(*args),
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int, needle: str) -> None:
    """The CLI exited with ``code`` and one ``latentedge ...: error`` line naming ``needle``."""
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("latentedge ")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr[-3000:]


@dataclass
class ServerProcess:
    proc: subprocess.Popen[str]
    address: str
    db: Path

    def stop(self) -> None:
        stop_process(self.proc)


def stop_process(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL after 20 s; waits for the exit."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_server_process(db: Path, *extra: str, listen: str = "127.0.0.1:0") -> ServerProcess:
    """Start `latentedge server` as an OS process and wait for its 'listening on' line."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        latentedge_cmd("server", "--listen", listen, "--db", str(db), *extra),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    line = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "listening on" in line:
            break
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
    match = re.search(r"listening on (\S+)", line)
    assert match, f"no 'listening on' line, got {line!r}"
    return ServerProcess(proc=proc, address=match.group(1), db=db)


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[ServerProcess]:
    server = start_server_process(tmp_path / "server.db")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server on loopback for the whole session (apt-installed when missing)."""
    from tests.support_postgres import running_postgres

    with running_postgres() as server:
        yield server


@pytest.fixture(scope="session")
def prometheus_binary() -> Path:
    """The Prometheus server binary; apt-installed when missing and root (fails, never skips)."""
    from tests.support_prometheus import find_or_install_prometheus

    return find_or_install_prometheus()
