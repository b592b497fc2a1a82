"""A real Prometheus server for tests: find (or apt-install) the binary, run it on loopback."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import stop_process

APT_TIMEOUT_S = 900


def _run_apt(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(
        ["apt-get", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=APT_TIMEOUT_S,
        env=env,
    )


def find_or_install_prometheus() -> Path:
    """The ``prometheus`` binary: on PATH, or apt-installed (Debian, as root); else fail.

    Never skips: a test that needs Prometheus fails with the reason when it cannot have it.
    """
    found = shutil.which("prometheus") or shutil.which("prometheus", path="/usr/bin:/usr/sbin")
    if found:
        return Path(found)
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.fail(
            "the Prometheus server binary `prometheus` is not on PATH and this user is not root, "
            "so it cannot be apt-installed: install it (Debian: `apt-get install prometheus`) "
            "or put it on PATH"
        )
    if shutil.which("apt-get") is None:
        pytest.fail("`prometheus` is not on PATH and there is no apt-get to install it with")
    for args in (
        ("update",),
        ("install", "-y", "--no-install-recommends", "prometheus"),
    ):
        try:
            proc = _run_apt(*args)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`apt-get {' '.join(args)}` did not finish in {APT_TIMEOUT_S} s")
        if proc.returncode != 0:
            pytest.fail(
                f"`prometheus` is not on PATH and `apt-get {' '.join(args)}` failed "
                f"(exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}"
            )
    found = shutil.which("prometheus") or shutil.which("prometheus", path="/usr/bin:/usr/sbin")
    if not found:
        pytest.fail("`apt-get install prometheus` succeeded but no `prometheus` binary is on PATH")
    return Path(found)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 5.0) -> str:
    """GET ``url`` (no proxy) and return the body as text."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as reply:
        body: bytes = reply.read()
    return body.decode()


@dataclass
class PrometheusServer:
    """A running Prometheus that scrapes one target every second."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def query(self, promql: str) -> list[dict[str, object]]:
        """The ``result`` of an instant query (``/api/v1/query``)."""
        body = json.loads(
            http_get(f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}")
        )
        assert body["status"] == "success", body
        result: list[dict[str, object]] = body["data"]["result"]
        return result

    def wait_for_value(self, promql: str, expected: float, timeout: float = 20.0) -> float:
        """Poll ``promql`` until its single value equals ``expected``; return it."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited {self.proc.returncode}:\n{self.tail()}")
            result = self.query(promql)
            if result:
                value = result[0]["value"]
                assert isinstance(value, list)
                last = float(value[1])
                if last == expected:
                    return last
            time.sleep(0.25)
        targets = http_get(f"{self.url}/api/v1/targets")
        raise AssertionError(
            f"{promql} is {last}, expected {expected}, after {timeout} s\n"
            f"targets: {targets[-2000:]}\nlog:\n{self.tail()}"
        )

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def stop(self) -> None:
        stop_process(self.proc)


def start_prometheus(
    binary: Path, workdir: Path, target: str, *, job: str = "latentedge"
) -> PrometheusServer:
    """Run ``binary`` on 127.0.0.1 scraping ``http://TARGET/metrics`` every second.

    Config, TSDB and log live in ``workdir``; returns once Prometheus reports ready.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "scrape_configs:\n"
        f"  - job_name: {job}\n"
        "    metrics_path: /metrics\n"
        "    static_configs:\n"
        f"      - targets: ['{target}']\n"
    )
    port = free_port()
    log = workdir / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                str(binary),
                f"--config.file={config}",
                f"--web.listen-address=127.0.0.1:{port}",
                f"--storage.tsdb.path={workdir / 'data'}",
            ],
            cwd=workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = PrometheusServer(proc=proc, url=f"http://127.0.0.1:{port}", log=log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"prometheus exited {proc.returncode}:\n{server.tail()}")
        try:
            http_get(f"{server.url}/-/ready", timeout=1.0)
        except OSError:
            time.sleep(0.2)
        else:
            return server
    server.stop()
    raise AssertionError(f"prometheus not ready after 30 s:\n{server.tail()}")
