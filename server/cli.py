"""``latentedge server``: run the gRPC server until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from common.config import read_tables
from common.constants import DEFAULT_LISTEN, MAX_UPLOAD_BYTES
from common.errors import ConfigError
from common.tls import ServerTls, check_address, is_loopback
from server.limits import (
    DEFAULT_DEDUPE_DRAIN_TIMEOUT_S,
    DEFAULT_MAX_CONCURRENT_RPCS,
    DEFAULT_MAX_CONCURRENT_STREAMS,
    DEFAULT_MAX_NODE_BYTES,
    DEFAULT_MAX_NODES,
    DEFAULT_RETRAIN_MIN_INTERVAL_S,
    DEFAULT_STREAM_IDLE_TIMEOUT_S,
    StreamLimits,
)

if TYPE_CHECKING:
    from server.core import SplitLearningServer
    from server.metrics import ServerMetrics
    from server.store import Store
from server.allocation import Cell

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    """Settings of one server process (TOML table ``[server]``)."""

    listen: str = DEFAULT_LISTEN
    """HOST:PORT to bind; port 0 picks a free port (printed on start)."""
    db: str = "latentedge.db"
    """SQLite database file (created when missing), or ``postgresql://USER@HOST:PORT/DB`` for
    several replicas on one database (the password, if any, from ``PGPASSWORD`` or
    ``~/.pgpass``, or in the URL)."""
    payload_dir: str = ""
    """Directory for payload segment files: SQLite's default is ``<db>.segments`` beside the
    file; with PostgreSQL payloads stay in the database unless this names a directory every
    replica mounts at the same path."""
    classifier_mode: str = "per_node"
    """``per_node`` (one classifier per node) or ``shared`` (one, told the node identity)."""
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    """Largest upload payload (bytes) accepted; more is RESOURCE_EXHAUSTED."""
    max_node_bytes: int = DEFAULT_MAX_NODE_BYTES
    """Largest committed latent payload (bytes) of one node; an upload that would take a node
    past it is refused at commit (RESOURCE_EXHAUSTED), nothing of it stored."""
    max_nodes: int = DEFAULT_MAX_NODES
    """Most registered nodes; registering a new one beyond it is RESOURCE_EXHAUSTED (an
    existing node may always re-register)."""
    max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS
    """Upload streams (PushLatents, PushDelta) in flight at once; one more is refused at once
    with RESOURCE_EXHAUSTED."""
    max_concurrent_rpcs: int = DEFAULT_MAX_CONCURRENT_RPCS
    """RPCs of any kind in flight at once (also the worker threads); one more is refused at once
    with RESOURCE_EXHAUSTED. Must exceed ``max_concurrent_streams``."""
    stream_idle_timeout_s: float = DEFAULT_STREAM_IDLE_TIMEOUT_S
    """An upload whose client sends no chunk for this long is cut off (CANCELLED) and its
    staged chunks discarded."""
    dedupe_drain_timeout_s: float = DEFAULT_DEDUPE_DRAIN_TIMEOUT_S
    """A re-sent, already committed upload is read and discarded for at most this long (and at
    most its original bytes), then acknowledged."""
    retrain_min_interval_s: float = DEFAULT_RETRAIN_MIN_INTERVAL_S
    """Seconds from the end of one classifier training to the start of the next (debounce;
    the last upload always leads to a training)."""
    seed: int = 0
    """Seed of classifier training."""
    round_timeout_s: float = 600.0
    """A scheduling round closes after this many seconds even if a selected node never uploaded."""
    cell: Cell | None = None
    """The radio cell for round scheduling (TOML table ``[cell]``); None = scheduling off."""
    base_model: str = ""
    """Model file (``latentedge pretrain --out``) to serve as the base for fine-tuning nodes;
    empty = keep serving the newest version stored in the database (if any)."""
    aggregate_after: int = 0
    """Average the nodes' deltas into the next base version as soon as this many nodes sent
    one against the current base (0 = only on request: ``latentedge models --aggregate``)."""
    tls_cert: str = ""
    """PEM certificate chain of the server; with ``tls_key``, the port speaks TLS only."""
    tls_key: str = ""
    """PEM private key of ``tls_cert``."""
    tls_client_ca: str = ""
    """PEM CA that client certificates must chain to: mutual TLS (clients without one fail)."""
    insecure: bool = False
    """Allow plaintext on a non-loopback ``listen`` address (refused otherwise)."""
    metrics_listen: str = ""
    """HOST:PORT to serve Prometheus metrics on (``/metrics``, plain HTTP); empty = off;
    port 0 picks a free port (printed on start)."""
    require_tokens: bool = False
    """Require a credential on every RPC (except health) even without TLS. With TLS it is
    always required (tokens: ``latentedge token``; or client certificates under mTLS)."""

    def __post_init__(self) -> None:
        check_address(self.listen, "server.listen", listen=True)
        if self.classifier_mode not in ("per_node", "shared"):
            raise ConfigError(
                "server.classifier_mode must be 'per_node' or 'shared', "
                f"got {self.classifier_mode!r}"
            )
        if self.round_timeout_s <= 0:
            raise ConfigError(f"server.round_timeout_s must be > 0, got {self.round_timeout_s}")
        if self.max_upload_bytes <= 0:
            raise ConfigError(f"server.max_upload_bytes must be > 0, got {self.max_upload_bytes}")
        self._check_limits()
        if self.aggregate_after < 0:
            raise ConfigError(f"server.aggregate_after must be >= 0, got {self.aggregate_after}")
        if self.metrics_listen:
            check_address(self.metrics_listen, "server.metrics_listen", listen=True)

    def _check_limits(self) -> None:
        for key in ("max_node_bytes", "max_nodes", "max_concurrent_streams"):
            if getattr(self, key) < 1:
                raise ConfigError(f"server.{key} must be >= 1, got {getattr(self, key)}")
        if self.max_concurrent_rpcs <= self.max_concurrent_streams:
            raise ConfigError(
                f"server.max_concurrent_rpcs ({self.max_concurrent_rpcs}) must exceed "
                f"server.max_concurrent_streams ({self.max_concurrent_streams}), or stalled "
                "uploads can hold every worker thread"
            )
        for key in ("stream_idle_timeout_s", "dedupe_drain_timeout_s"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"server.{key} must be > 0, got {getattr(self, key)}")
        if not self.retrain_min_interval_s >= 0:
            raise ConfigError(
                f"server.retrain_min_interval_s must be >= 0, got {self.retrain_min_interval_s}"
            )


_LIMIT_FLAGS: tuple[tuple[str, type, str], ...] = (
    ("max_node_bytes", int, "largest committed latent payload of one node (bytes)"),
    ("max_nodes", int, "most registered nodes"),
    ("max_concurrent_streams", int, "upload streams in flight at once"),
    ("max_concurrent_rpcs", int, "RPCs in flight at once (> --max-concurrent-streams)"),
    ("stream_idle_timeout_s", float, "cut off an upload idle this long (s)"),
    ("dedupe_drain_timeout_s", float, "drain a re-sent committed upload at most this long (s)"),
    ("retrain_min_interval_s", float, "least time between classifier trainings (s)"),
)
"""Resource-limit keys of ``[server]`` with their flag type and help (``--max-nodes`` ...)."""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``server`` flags."""
    parser.add_argument("--config", type=Path, help="TOML file with a [server] table")
    parser.add_argument(
        "--listen", help=f"HOST:PORT to bind (default {DEFAULT_LISTEN}; port 0 = any)"
    )
    parser.add_argument(
        "--db",
        help="SQLite database path (default latentedge.db) or postgresql://USER@HOST:PORT/DB",
    )
    parser.add_argument(
        "--payload-dir",
        help="payload segment directory (SQLite: default <db>.segments; PostgreSQL: default "
        "payloads in the database; replicas must share it)",
    )
    parser.add_argument(
        "--classifier-mode", choices=["per_node", "shared"], help="classifier family"
    )
    parser.add_argument("--max-upload-bytes", type=int, help="largest accepted upload (bytes)")
    for key, kind, text in _LIMIT_FLAGS:
        default = getattr(ServerConfig, key)
        parser.add_argument(
            "--" + key.replace("_", "-"), dest=key, type=kind, help=f"{text} (default {default})"
        )
    parser.add_argument("--seed", type=int, help="classifier training seed")
    parser.add_argument(
        "--base-model", dest="base_model", help="model file to serve for fine-tuning nodes"
    )
    parser.add_argument("--tls-cert", dest="tls_cert", help="PEM certificate chain (TLS on)")
    parser.add_argument("--tls-key", dest="tls_key", help="PEM private key of --tls-cert")
    parser.add_argument(
        "--tls-client-ca", dest="tls_client_ca", help="PEM CA of client certificates (mTLS)"
    )
    parser.add_argument(
        "--insecure",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="allow plaintext on a non-loopback --listen address",
    )
    parser.add_argument(
        "--require-tokens",
        dest="require_tokens",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="require node/admin credentials without TLS too (always on with TLS)",
    )
    parser.add_argument(
        "--aggregate-after",
        dest="aggregate_after",
        type=int,
        help="aggregate the deltas once this many nodes sent one (0 = on request)",
    )
    parser.add_argument(
        "--metrics-listen",
        dest="metrics_listen",
        help="HOST:PORT to serve Prometheus /metrics on, plain HTTP (default off; port 0 = any)",
    )


def load_config(args: argparse.Namespace) -> ServerConfig:
    """Config file (if any) overlaid with the flags given."""
    tables = read_tables(args.config, {"server": ServerConfig, "cell": Cell}) if args.config else {}
    config: ServerConfig = tables.get("server", ServerConfig())
    if "cell" in tables:
        config = replace(config, cell=tables["cell"])
    overrides = {
        key: getattr(args, key)
        for key in (
            "listen",
            "db",
            "payload_dir",
            "classifier_mode",
            "max_upload_bytes",
            *(key for key, _kind, _text in _LIMIT_FLAGS),
            "seed",
            "base_model",
            "aggregate_after",
            "tls_cert",
            "tls_key",
            "tls_client_ca",
            "insecure",
            "metrics_listen",
            "require_tokens",
        )
        if getattr(args, key) is not None
    }
    return replace(config, **overrides)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM."""
    config = load_config(args)
    return run_server(config)


def check_exposure(config: ServerConfig) -> None:
    """Refuse plaintext on a non-loopback address unless ``insecure`` (after flags and file)."""
    plaintext = not (config.tls_cert or config.tls_key)
    if plaintext and not config.insecure and not is_loopback(config.listen):
        raise ConfigError(
            f"server.listen {config.listen!r} is not a loopback address and TLS is off: give "
            "--tls-cert and --tls-key (see README, 'Securing a deployment'), or --insecure "
            "to serve plaintext anyway"
        )


def _open_core(config: ServerConfig) -> tuple[Store, SplitLearningServer]:
    """The store and the domain core, with the base model loaded (not started yet)."""
    from common.models import ClassifierConfig
    from server.classifier import ClassifierMode
    from server.core import IngestLimits, SplitLearningServer
    from server.store import open_store

    store = open_store(config.db, payload_dir=config.payload_dir or None)
    core = SplitLearningServer(
        store,
        limits=IngestLimits(
            max_upload_bytes=config.max_upload_bytes,
            max_node_bytes=config.max_node_bytes,
            max_nodes=config.max_nodes,
            dedupe_drain_timeout_s=config.dedupe_drain_timeout_s,
        ),
        classifier_mode=ClassifierMode(config.classifier_mode),
        classifier_config=ClassifierConfig(),
        cell=config.cell,
        round_timeout_s=config.round_timeout_s,
        seed=config.seed,
        aggregate_after=config.aggregate_after,
        retrain_min_interval_s=config.retrain_min_interval_s,
    )
    if config.base_model:
        try:
            core.hub.load_base(config.base_model)
        except ConfigError:
            store.close()
            raise
    return store, core


def _start_metrics(config: ServerConfig, core: SplitLearningServer) -> ServerMetrics | None:
    """Serve the Prometheus metrics of ``core`` on ``config.metrics_listen`` (None when off)."""
    if not config.metrics_listen:
        return None
    from server.metrics import ServerMetrics

    metrics = ServerMetrics(core.status)
    try:
        metrics.serve(config.metrics_listen)
    except ConfigError:
        metrics.close()
        raise
    return metrics


def _stop_metrics(metrics: ServerMetrics | None) -> None:
    if metrics is not None:
        metrics.close()


def _banner(
    config: ServerConfig,
    port: int,
    core: SplitLearningServer,
    *,
    tls: ServerTls | None,
    credentials: bool,
    metrics: ServerMetrics | None,
) -> None:
    """The start-up lines on stdout (tests and scripts read the address from the first)."""
    host = config.listen.rsplit(":", 1)[0]
    served = core.hub.current_version()
    base = f", base model v{served}" if served else ""
    if tls is not None:
        base += ", mutual TLS" if tls.client_ca else ", TLS"
    if credentials:
        base += ", credentials required"
    from server.store import describe_store

    db = describe_store(config.db)
    sys.stdout.write(f"latentedge server listening on {host}:{port} (db {db}{base})\n")
    sys.stdout.write(f"metrics on {metrics.url}\n" if metrics is not None else "")
    sys.stdout.flush()


def run_server(config: ServerConfig, *, ready: threading.Event | None = None) -> int:
    """Open the store, start the gRPC server and block until a stop signal."""
    import torch

    from server.auth import Authenticator
    from server.grpc_app import create_server
    from server.health import StoreHealth
    from server.servicer import UplinkServicer

    check_exposure(config)
    tls = ServerTls.from_paths(config.tls_cert, config.tls_key, config.tls_client_ca)
    # The classifier MLPs are tiny: one intra-op thread is several times faster than two
    # when other processes (edge nodes on the same host) compete for the cores.
    torch.set_num_threads(1)
    store, core = _open_core(config)
    core.start()
    metrics: ServerMetrics | None = None
    try:
        metrics = _start_metrics(config, core)
        auth = Authenticator(store, required=tls is not None or config.require_tokens)
        streams = StreamLimits(config.max_concurrent_streams, config.stream_idle_timeout_s)
        servicer = UplinkServicer(core, auth=auth, stream_limits=streams)
        server, port, health = create_server(
            config.listen,
            servicer,
            max_concurrent_rpcs=config.max_concurrent_rpcs,
            tls=tls,
            metrics=metrics,
        )
    except ConfigError:
        _stop_metrics(metrics)
        core.stop()
        store.close()
        raise
    store_health = StoreHealth(store, health)
    store_health.start()
    _banner(config, port, core, tls=tls, credentials=auth.required, metrics=metrics)
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        logger.info("signal %d: shutting down", signum)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
    if ready is not None:
        ready.set()
    try:
        stop.wait()
    finally:
        store_health.stop()
        health.enter_graceful_shutdown()
        server.stop(grace=5.0).wait()
        _stop_metrics(metrics)
        core.stop()
        store.close()
    return 0
