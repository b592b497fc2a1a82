"""A real PostgreSQL server for tests: find (or apt-install) it, run it on loopback.

As root (CI), the server runs as the ``postgres`` user the Debian package creates (PostgreSQL
refuses to run as root); its data directory is a fresh temporary directory, removed on stop.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support_apt import apt_install
from tests.support_prometheus import free_port

SUPERUSER = "latentedge"
"""The cluster's superuser (``initdb -U``); tests connect as it, trusted on loopback."""


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)
    if found:
        return Path(found[0]).parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).resolve().parent if on_path else None


def find_or_install_postgres() -> Path:
    """The directory of PostgreSQL's server programs (``initdb``, ``pg_ctl``)."""
    found = _bin_dir()
    if found is None:
        apt_install("postgresql", "the PostgreSQL server (`pg_ctl`, `initdb`) is not installed")
        found = _bin_dir()
    if found is None:
        pytest.fail("`apt-get install postgresql` succeeded but no pg_ctl was found")
    return found


@dataclass
class PostgresServer:
    """A running PostgreSQL cluster on 127.0.0.1."""

    bin_dir: Path
    data_dir: Path
    port: int
    run_as: str | None
    """OS user the server runs as (None: this process's user)."""
    _names: Iterator[int]
    options: str = ""
    """The server's ``pg_ctl -o`` options."""

    def url(self, dbname: str = "postgres") -> str:
        """The ``postgresql://`` URL of database ``dbname``."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run ``sql`` through psql; its output."""
        proc = subprocess.run(
            [
                str(self.bin_dir / "psql"),
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
                self.url(dbname),
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return proc.stdout

    def new_database(self) -> str:
        """Create a fresh, empty database; its URL."""
        name = f"t{next(self._names)}"
        self.psql(f"CREATE DATABASE {name}")
        return self.url(name)

    def halt(self) -> None:
        """Stop the server (immediate mode, as a crash), keeping its data for :meth:`resume`."""
        _run(self, "pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "stop")

    def resume(self) -> None:
        """Start the (new or halted) server on its port and data; fail with its log if it won't."""
        proc = _run(
            self,
            "pg_ctl",
            "-D",
            str(self.data_dir),
            "-o",
            self.options,
            "-l",
            str(self.data_dir / "server.log"),
            "-w",
            "-t",
            "60",
            "start",
            check=False,
        )
        if proc.returncode != 0:
            log = self.data_dir / "server.log"
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise AssertionError(f"PostgreSQL did not start:\n{proc.stdout}{proc.stderr}\n{tail}")

    def stop(self) -> None:
        _run(self, "pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "stop", check=False)
        shutil.rmtree(self.data_dir, ignore_errors=True)


def _run(
    server: PostgresServer, program: str, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    cmd = [str(server.bin_dir / program), *args]
    if server.run_as is not None:
        cmd = ["runuser", "-u", server.run_as, "--", *cmd]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{program} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}"
        )
    return proc


def start_postgres(*, durable: bool = False) -> PostgresServer:
    """initdb a fresh cluster in a temporary directory and start it on a free loopback port.

    Tests run it with ``fsync=off`` (PostgreSQL's own durability is not what they test);
    ``durable=True`` keeps PostgreSQL's defaults, for benchmarks.
    """
    bin_dir = find_or_install_postgres()
    run_as = None
    data_dir = Path(tempfile.mkdtemp(prefix="latentedge-pg-"))
    if os.geteuid() == 0:
        run_as = "postgres"
        try:
            user = pwd.getpwnam(run_as)
        except KeyError:
            pytest.fail("running as root, and there is no `postgres` user to run PostgreSQL as")
        os.chown(data_dir, user.pw_uid, user.pw_gid)
    server = PostgresServer(bin_dir, data_dir, free_port(), run_as, itertools.count())
    _run(
        server,
        "initdb",
        "-D",
        str(data_dir),
        "-U",
        SUPERUSER,
        "-A",
        "trust",
        "-E",
        "UTF8",
        "--no-instructions",
    )
    options = (
        f"-c listen_addresses=127.0.0.1 -c port={server.port} -c unix_socket_directories='' "
        "-c max_connections=200"
    )
    if not durable:
        options += " -c fsync=off -c full_page_writes=off"
    server.options = options
    try:
        server.resume()
    except AssertionError:
        server.stop()
        raise
    deadline = time.monotonic() + 30
    while True:
        try:
            server.psql("SELECT 1")
        except subprocess.CalledProcessError:
            if time.monotonic() > deadline:
                server.stop()
                raise
            time.sleep(0.2)
        else:
            return server


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the duration of the block."""
    server = start_postgres()
    try:
        yield server
    finally:
        server.stop()
