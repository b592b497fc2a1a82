"""Install a Debian package for a test that needs a real service (as root, on CI); else fail."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

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


def apt_install(package: str, missing: str) -> None:
    """``apt-get update`` then ``apt-get install -y PACKAGE``; fail the test with the reason.

    ``missing`` says what was not found (the start of the failure message). Never skips: a
    test that needs the service fails when it cannot have it.
    """
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.fail(
            f"{missing} and this user is not root, so it cannot be apt-installed: install it "
            f"(Debian: `apt-get install {package}`) or put it on PATH"
        )
    if shutil.which("apt-get") is None:
        pytest.fail(f"{missing} and there is no apt-get to install {package} with")
    for args in (("update",), ("install", "-y", "--no-install-recommends", package)):
        try:
            proc = _run_apt(*args)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`apt-get {' '.join(args)}` did not finish in {APT_TIMEOUT_S} s")
        if proc.returncode != 0:
            pytest.fail(
                f"{missing} and `apt-get {' '.join(args)}` failed "
                f"(exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}"
            )
