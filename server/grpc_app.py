"""The one gRPC server factory."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent import futures
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from common.constants import MAX_MESSAGE_BYTES
from common.errors import CodecError, ConfigError
from common.records import LatentChunk
from common.serde import latent_chunk_from_bytes
from common.tls import ServerTls
from protos import uplink_pb2_grpc
from server.limits import DEFAULT_MAX_CONCURRENT_RPCS
from server.servicer import UplinkServicer

if TYPE_CHECKING:
    from server.metrics import ServerMetrics

logger = logging.getLogger(__name__)

SERVICE_NAME = "latentedge.v1.Uplink"
HEALTH_SERVICES = ("", SERVICE_NAME)
"""The names the health service answers for: the server as a whole and the Uplink service."""

SERVER_OPTIONS: list[tuple[str, int]] = [
    # one upload chunk (<= CHUNK_BYTES) plus protobuf framing must fit in a message
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # replies (predictions, status) are bounded the same way
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # SO_REUSEPORT off: a second server on a busy port must fail, not share it
    ("grpc.so_reuseport", 0),
    # no BDP probing: on loopback it grows each stream's flow-control window to tens of
    # MB, so a slow consumer (durable ingest) buffers that much per upload in RSS
    ("grpc.http2.bdp_probe", 0),
]
"""gRPC channel arguments of the server (bench/ingest.py gives its raw baseline the same)."""


def create_server(
    address: str,
    servicer: UplinkServicer,
    *,
    max_workers: int | None = None,
    max_concurrent_rpcs: int = DEFAULT_MAX_CONCURRENT_RPCS,
    tls: ServerTls | None = None,
    metrics: ServerMetrics | None = None,
    interceptors: Sequence[grpc.ServerInterceptor[Any, Any]] = (),
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Build and start a gRPC server for ``servicer`` on ``address`` (port 0 picks a free port).

    With ``tls`` the port speaks TLS only (and requires client certificates when
    ``tls.client_ca`` is set); without, plaintext. With ``metrics`` every RPC is counted and
    timed there (its interceptor runs first, then ``interceptors``).

    At most ``max_concurrent_rpcs`` RPCs (health checks included) are in flight: gRPC refuses
    one more at once with RESOURCE_EXHAUSTED ("Concurrent RPC limit exceeded!"), without
    queueing it. The pool has ``max_workers`` threads (default: one per admitted RPC, so none
    waits for a thread); it must exceed the servicer's ``max_concurrent_streams`` so that
    stalled uploads never hold every thread and unary RPCs and health keep being served.

    Returns:
        The started server, the bound port, and its health servicer (SERVING).

    Raises:
        ConfigError: when the address cannot be bound, or the limits leave no thread for
            unary RPCs.
    """
    workers = max_concurrent_rpcs if max_workers is None else max_workers
    streams = servicer.stream_limits.max_concurrent_streams
    if min(workers, max_concurrent_rpcs) <= streams:
        raise ConfigError(
            f"server.max_concurrent_rpcs ({max_concurrent_rpcs}) and the worker threads "
            f"({workers}) must exceed server.max_concurrent_streams ({streams}), or stalled "
            "uploads can hold every thread"
        )
    chain: list[grpc.ServerInterceptor[Any, Any]] = []
    if metrics is not None:
        chain.append(metrics.interceptor())
    chain.extend(interceptors)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
        options=SERVER_OPTIONS,
        maximum_concurrent_rpcs=max_concurrent_rpcs,
        interceptors=chain or None,
    )
    _add_uplink(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        if tls is None:
            port = server.add_insecure_port(address)
        else:
            credentials = grpc.ssl_server_credentials(
                [(tls.key, tls.cert)],
                root_certificates=tls.client_ca,
                require_client_auth=tls.client_ca is not None,
            )
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise ConfigError(f"cannot listen on {address!r}: {exc}") from exc
    if port == 0:
        raise ConfigError(f"cannot listen on {address!r} (address in use or invalid)")
    server.start()
    for name in HEALTH_SERVICES:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    logger.info("listening on %s (port %d)", address, port)
    return server, port, health_servicer


class _HandlerTable:
    """Stands in for the server while the generated code registers the Uplink service."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        """The generated code registers a generic handler too; the table is kept instead."""

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self.service, self.handlers = service, dict(handlers)


def _latent_chunk(data: bytes) -> LatentChunk | CodecError:
    """PushLatents' request deserialiser: a chunk whose tensors are views of ``data``.

    A malformed message comes back as its error, for the servicer to answer INVALID_ARGUMENT
    naming it (a deserialiser that raises makes gRPC answer INTERNAL).
    """
    try:
        return latent_chunk_from_bytes(data)
    except CodecError as exc:
        return exc


def _add_uplink(servicer: UplinkServicer, server: grpc.Server) -> None:
    """The generated Uplink service, with PushLatents parsed without copying its payload."""
    table = _HandlerTable()
    uplink_pb2_grpc.add_UplinkServicer_to_server(servicer, table)  # type: ignore[arg-type]
    push = table.handlers["PushLatents"]
    table.handlers["PushLatents"] = grpc.stream_unary_rpc_method_handler(
        servicer.PushLatents,
        request_deserializer=_latent_chunk,
        response_serializer=push.response_serializer,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(table.service, table.handlers),)
    )
    server.add_registered_method_handlers(table.service, table.handlers)  # type: ignore[attr-defined]
