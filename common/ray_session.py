"""Joining or starting Ray for the optional ``--backend ray`` (``fleet`` and ``simulate``).

Ray is an optional extra (``pip install latentedge[ray]``), imported only when chosen. Torch-free
and importing only :mod:`common.errors`, so ``device_sim`` may use it too.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from common.errors import ConfigError

RAY_MISSING = "--backend ray needs Ray, which is not installed: pip install latentedge[ray]"


def import_ray() -> Any:
    """The ``ray`` module, or ConfigError naming the extra to install."""
    try:
        import ray  # noqa: PLC0415  # an optional extra, imported only when chosen
    except ImportError as exc:
        raise ConfigError(RAY_MISSING) from exc
    return ray


def start_ray(address: str = "") -> tuple[Any, bool]:
    """``(ray, started)``: join the cluster at ``address`` or start a local one (empty).

    ``started`` is False when Ray was already initialised in this process (nothing to shut
    down later). A local instance gets one CPU per core, no dashboard, and leaves logging alone.

    Raises:
        ConfigError: Ray is not installed, or the cluster at ``address`` cannot be joined (one
            line naming the address).
    """
    ray = import_ray()
    if ray.is_initialized():
        return ray, False
    _check_reachable(address)
    try:
        ray.init(
            address=address or "local",  # "local": a new instance, never a stale one
            num_cpus=None if address else max(1, os.cpu_count() or 1),
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"--ray-address {address!r}: cannot join the Ray cluster: {first}"
        ) from exc
    return ray, True


CONNECT_TIMEOUT_S = 5.0
"""How long the head's GCS port may take to accept a TCP connection before we give up."""


def _check_reachable(address: str) -> None:
    """Refuse a ``HOST:PORT`` nothing listens on at once (``ray.init`` would retry for minutes).

    Other forms (``auto``, ``ray://…``, empty) are left to Ray.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not host or "://" in address or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise ConfigError(
            f"--ray-address {address!r}: no Ray head answers there ({exc.strerror or exc}); "
            "start one with `ray start --head` or give its HOST:PORT"
        ) from exc
