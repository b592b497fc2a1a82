"""A real Prometheus server for tests: find (or apt-install) the binary, run it on loopback."""

from __future__ import annotations

import json
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
from tests.support_apt import apt_install


def find_or_install_prometheus() -> Path:
    """The ``prometheus`` binary: on PATH, or apt-installed (Debian, as root); else fail.

    Never skips: a test that needs Prometheus fails with the reason when it cannot have it.
    """
    path = "/usr/bin:/usr/sbin"
    found = shutil.which("prometheus") or shutil.which("prometheus", path=path)
    if found:
        return Path(found)
    apt_install("prometheus", "the Prometheus server binary `prometheus` is not on PATH")
    found = shutil.which("prometheus") or shutil.which("prometheus", path=path)
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
