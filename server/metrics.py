"""Prometheus metrics of one server: RPC counts and latencies, upload bytes, core gauges.

:class:`ServerMetrics` owns a private :class:`~prometheus_client.CollectorRegistry` (several
servers in one process do not clash). Its gRPC interceptor counts every RPC by method and final
status code and times it (a response stream until its last message); it reads the payload
bytes of committed uploads from their replies. The gauges (nodes, stored samples, classifier
and base-model versions) are computed when ``/metrics`` is scraped, from the core's status, on
one worker thread (so scrapes reuse one SQLite connection); nothing queries the database per RPC.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from common.errors import ConfigError, LatentEdgeError
from common.records import ServerStatus
from common.tls import host_of
from protos import uplink_pb2
from server.servicer import code_set

logger = logging.getLogger(__name__)

DURATION_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
"""Histogram buckets (seconds) of ``latentedge_rpc_duration_seconds``: 1 ms to 5 min uploads."""

SCRAPE_TIMEOUT_S = 10.0
"""How long a scrape waits for the core's status before leaving the gauges out."""

_UPLOAD_KINDS = {
    "/latentedge.v1.Uplink/PushLatents": "latents",
    "/latentedge.v1.Uplink/PushDelta": "delta",
}
"""RPCs whose reply carries the payload bytes of a committed upload, and their ``kind`` label."""

if TYPE_CHECKING:  # generic only in grpc-stubs
    Handler = grpc.RpcMethodHandler[Any, Any]
    _Interceptor = grpc.ServerInterceptor[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
    _Interceptor = grpc.ServerInterceptor


def code_after_return(context: grpc.ServicerContext) -> grpc.StatusCode:
    """The final code of an RPC whose handler returned (or whose response stream ended)."""
    code = code_set(context)
    if code is not None:
        return code
    return grpc.StatusCode.OK if context.is_active() else grpc.StatusCode.CANCELLED


def code_after_raise(context: grpc.ServicerContext) -> grpc.StatusCode:
    """The final code of an RPC whose handler raised, as grpc sends it.

    ``context.abort(code, ...)`` sets its code and then raises: that code (so too a code set
    with ``set_code`` before any exception). Otherwise UNKNOWN, or CANCELLED when the client
    had already gone.
    """
    code = code_set(context)
    if code is not None:
        return code
    return grpc.StatusCode.UNKNOWN if context.is_active() else grpc.StatusCode.CANCELLED


class _MethodMetrics:
    """The metric children of one RPC method (resolved once, not per call)."""

    def __init__(self, metrics: ServerMetrics, full_method: str) -> None:
        self.name = full_method.rsplit("/", 1)[-1]
        self._metrics = metrics
        self._duration = metrics.rpc_duration.labels(method=self.name)
        self._counts: dict[grpc.StatusCode, Callable[[], None]] = {}
        kind = _UPLOAD_KINDS.get(full_method)
        self.upload_bytes = metrics.upload_bytes.labels(kind=kind) if kind else None

    def done(self, code: grpc.StatusCode, started: float) -> None:
        self._duration.observe(time.perf_counter() - started)
        count = self._counts.get(code)
        if count is None:
            count = self._metrics.rpcs.labels(method=self.name, code=code.name).inc
            self._counts[code] = count
        count()

    def on_reply(self, reply: object) -> None:
        """Add a committed (not deduplicated) upload's payload bytes."""
        if self.upload_bytes is None:
            return
        if isinstance(reply, uplink_pb2.PushLatentsReply | uplink_pb2.PushDeltaReply) and (
            not reply.deduplicated
        ):
            self.upload_bytes.inc(reply.payload_bytes)


def _unary_reply(
    behavior: Callable[[Any, grpc.ServicerContext], Any], m: _MethodMetrics
) -> Callable[[Any, grpc.ServicerContext], Any]:
    """Wrap a handler with one reply (request unary or streamed)."""

    def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
        started = time.perf_counter()
        try:
            reply = behavior(request, context)
        except BaseException:
            m.done(code_after_raise(context), started)
            raise
        m.done(code_after_return(context), started)
        m.on_reply(reply)
        return reply

    return wrapped


def _stream_reply(
    behavior: Callable[[Any, grpc.ServicerContext], Iterator[Any]], m: _MethodMetrics
) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
    """Wrap a handler with a response stream: timed and counted when the stream ends."""

    def stream(replies: Iterator[Any], context: grpc.ServicerContext, started: float) -> Any:
        try:
            yield from replies
        except GeneratorExit:  # grpc stopped iterating: the client went away
            m.done(grpc.StatusCode.CANCELLED, started)
            raise
        except BaseException:
            m.done(code_after_raise(context), started)
            raise
        m.done(code_after_return(context), started)

    def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        started = time.perf_counter()
        try:
            replies = behavior(request, context)
        except BaseException:
            m.done(code_after_raise(context), started)
            raise
        return cast(Iterator[Any], stream(replies, context, started))

    return wrapped


class MetricsInterceptor(_Interceptor):
    """Counts and times every RPC of the server it is installed in."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}
        self._lock = threading.Lock()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Handler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        """The method's handler, wrapped (once per method; unknown methods pass through)."""
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, _MethodMetrics(self._metrics, method))
        with self._lock:
            self._wrapped[method] = (handler, wrapped)
        return wrapped

    @staticmethod
    def _wrap(handler: Handler, m: _MethodMetrics) -> Handler:
        de, ser = handler.request_deserializer, handler.response_serializer
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _unary_reply(handler.unary_unary, m), de, ser
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _unary_reply(handler.stream_unary, m), de, ser
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _stream_reply(handler.unary_stream, m), de, ser
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                _stream_reply(handler.stream_stream, m), de, ser
            )
        return handler  # pragma: no cover (grpc sets exactly one of the four)


class _CoreCollector:
    """Gauges computed at scrape time from :meth:`SplitLearningServer.status`."""

    def __init__(self, status: Callable[[], ServerStatus]) -> None:
        self._status = status
        # SqliteStore keeps one connection per thread, and the HTTP server starts a thread
        # per scrape: run every status query on this one thread.
        self._pool = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def describe(self) -> Iterable[Metric]:
        return self._families(None)

    def collect(self) -> Iterable[Metric]:
        try:
            status = self._pool.submit(self._status).result(timeout=SCRAPE_TIMEOUT_S)
        except (LatentEdgeError, TimeoutError, RuntimeError) as exc:
            logger.warning("metrics: server status unavailable, gauges left out: %s", exc)
            return []
        return self._families(status)

    @staticmethod
    def _families(status: ServerStatus | None) -> list[Metric]:
        gauges = {
            "latentedge_nodes": "Registered edge nodes.",
            "latentedge_stored_samples": "Latent samples stored (committed uploads, all nodes).",
            "latentedge_classifier_version": (
                "Version of the classifier Classify uses: the newest trained (0 = none yet)."
            ),
            "latentedge_classifier_training": "1 while a classifier retraining is pending.",
            "latentedge_base_model_version": "Newest base model version served (0 = none).",
        }
        families = {name: GaugeMetricFamily(name, doc) for name, doc in gauges.items()}
        if status is not None:
            values = {
                "latentedge_nodes": len(status.nodes),
                "latentedge_stored_samples": sum(n.samples for n in status.nodes),
                "latentedge_classifier_version": status.classifier.version,
                "latentedge_classifier_training": int(status.classifier.training),
                "latentedge_base_model_version": max((m.version for m in status.models), default=0),
            }
            for name, value in values.items():
                families[name].add_metric([], value)
        return list(families.values())


@dataclass
class MetricsEndpoint:
    """A running ``/metrics`` HTTP server."""

    host: str
    port: int
    httpd: WSGIServer
    thread: threading.Thread

    @property
    def url(self) -> str:
        """``http://HOST:PORT/metrics`` (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


class ServerMetrics:
    """The metrics of one server, in their own registry.

    Args:
        status: the core's status (``SplitLearningServer.status``) for the scrape-time gauges;
            None = no gauges (RPC metrics only).
    """

    def __init__(self, status: Callable[[], ServerStatus] | None = None) -> None:
        self.registry = CollectorRegistry()
        self.rpcs = Counter(
            "latentedge_rpcs",
            "RPCs finished, by method and gRPC status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.rpc_duration = Histogram(
            "latentedge_rpc_duration_seconds",
            "RPC duration (a response stream: until its last message).",
            ["method"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.upload_bytes = Counter(
            "latentedge_upload_bytes",
            "Payload bytes of committed uploads (not deduplicated re-sends), by kind.",
            ["kind"],
            registry=self.registry,
        )
        for kind in _UPLOAD_KINDS.values():
            self.upload_bytes.labels(kind=kind)
        self._core: _CoreCollector | None = None
        if status is not None:
            self._core = _CoreCollector(status)
            self.registry.register(self._core)
        self._endpoint: MetricsEndpoint | None = None

    @property
    def url(self) -> str:
        """``http://HOST:PORT/metrics`` while serving, else empty."""
        return self._endpoint.url if self._endpoint is not None else ""

    def interceptor(self) -> MetricsInterceptor:
        """A gRPC server interceptor feeding these metrics (``create_server(interceptors=)``)."""
        return MetricsInterceptor(self)

    def serve(self, address: str) -> MetricsEndpoint:
        """Serve ``/metrics`` (plain HTTP) on ``HOST:PORT``; port 0 picks a free port.

        Raises:
            ConfigError: the address is malformed or cannot be bound.
        """
        host = host_of(address)
        try:
            port = int(address.rsplit(":", 1)[1])
            httpd, thread = start_http_server(port, addr=host, registry=self.registry)
        except (IndexError, ValueError, OverflowError, OSError) as exc:
            raise ConfigError(f"cannot serve metrics on {address!r}: {exc}") from exc
        self._endpoint = MetricsEndpoint(host, int(httpd.server_port), httpd, thread)
        logger.info("metrics on %s", self._endpoint.url)
        return self._endpoint

    def close(self) -> None:
        """Stop the HTTP server (if serving) and the scrape worker."""
        if self._endpoint is not None:
            self._endpoint.stop()
            self._endpoint = None
        if self._core is not None:
            self._core.close()
