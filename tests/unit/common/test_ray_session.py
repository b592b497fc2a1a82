"""Joining Ray: an address nothing listens on is a one-line ConfigError at once, not a hang."""

from __future__ import annotations

import socket

import pytest

from common.errors import ConfigError
from common.ray_session import start_ray


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_ray_address_is_refused_with_the_address() -> None:
    # the message is ours (the TCP check), not Ray's: ray.init itself retries for minutes
    port = _closed_port()
    with pytest.raises(ConfigError, match=rf"--ray-address '127.0.0.1:{port}': no Ray head"):
        start_ray(f"127.0.0.1:{port}")
