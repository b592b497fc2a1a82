"""gRPC servicer: validate, call domain code, map domain errors to status codes, log one line."""

from __future__ import annotations

import functools
import inspect
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import Any, NoReturn, Protocol, TypeVar, cast

import grpc

from common.constants import CHUNK_BYTES
from common.errors import (
    AllocationError,
    AuthenticationError,
    BusyError,
    CodecError,
    ConflictError,
    InvalidRequestError,
    LatentEdgeError,
    NotFoundError,
    PermissionDeniedError,
    StoreError,
    StreamAbortedError,
    TooLargeError,
)
from common.records import DeltaChunk, LatentChunk, ServerStatus
from common.serde import (
    delta_ack_to_proto,
    delta_chunk_from_proto,
    model_version_to_proto,
    prediction_to_proto,
    registration_from_proto,
    schedule_to_proto,
    status_to_proto,
    tensor_from_proto,
    upload_ack_to_proto,
)
from protos import uplink_pb2, uplink_pb2_grpc
from server.auth import OPEN, Authenticator, Principal
from server.core import SplitLearningServer
from server.limits import StreamGate, StreamLimits
from server.transfer import ServedModel

logger = logging.getLogger(__name__)

_STATUS_OF: tuple[tuple[type[LatentEdgeError], grpc.StatusCode], ...] = (
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (CodecError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (ConflictError, grpc.StatusCode.FAILED_PRECONDITION),
    (TooLargeError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (BusyError, grpc.StatusCode.UNAVAILABLE),
    (AuthenticationError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (StreamAbortedError, grpc.StatusCode.CANCELLED),
    (AllocationError, grpc.StatusCode.FAILED_PRECONDITION),
    (StoreError, grpc.StatusCode.INTERNAL),
)


def status_code_for(exc: LatentEdgeError) -> grpc.StatusCode:
    """The gRPC status code a domain error maps to (INTERNAL when unmapped)."""
    for cls, code in _STATUS_OF:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def _abort(context: grpc.ServicerContext, method: str, exc: LatentEdgeError) -> NoReturn:
    code = status_code_for(exc)
    logger.warning("[Uplink.%s] %s: %s", method, code.name, exc)
    context.abort(code, str(exc))
    raise AssertionError("context.abort returned")  # pragma: no cover


def _chunks_from(request_iterator: Iterator[LatentChunk | CodecError]) -> Iterator[LatentChunk]:
    """The stream's chunks, as ``server.grpc_app`` parses them (without copies) or their errors."""
    try:
        for index, msg in enumerate(request_iterator):
            if isinstance(msg, CodecError):
                raise InvalidRequestError(f"message {index} of the stream: {msg}") from msg
            yield msg
    except grpc.RpcError as exc:  # the client cancelled or the connection dropped
        raise StreamAbortedError("the client ended the stream before its last chunk") from exc


def _delta_chunks_from(
    request_iterator: Iterator[uplink_pb2.DeltaChunk],
) -> Iterator[DeltaChunk]:
    try:
        for msg in request_iterator:
            try:
                yield delta_chunk_from_proto(msg)
            except CodecError as exc:
                raise InvalidRequestError(f"chunk {msg.seq}: {exc}") from exc
    except grpc.RpcError as exc:  # the client cancelled or the connection dropped
        raise StreamAbortedError("the client ended the stream before its last chunk") from exc


class _FromNode(Protocol):
    @property
    def node_id(self) -> str: ...


_C = TypeVar("_C", bound=_FromNode)


def _acting_for(chunks: Iterator[_C], caller: Principal, what: str) -> Iterator[_C]:
    """``chunks``, each checked to come from a node ``caller`` may act for (before use)."""
    for chunk in chunks:
        caller.require_node(chunk.node_id, what)
        yield chunk


def _visible_to(caller: Principal, status: ServerStatus) -> ServerStatus:
    """All of ``status`` for admins and open servers; a node's own part for a node."""
    if caller.unrestricted:
        return status
    me = caller.subject
    return replace(
        status,
        nodes=tuple(n for n in status.nodes if n.node_id == me),
        classifier=replace(
            status.classifier, nodes=tuple(n for n in status.classifier.nodes if n == me)
        ),
        last_plan_json="",  # the plan describes every node
    )


def manifest_of(served: ServedModel) -> uplink_pb2.ModelManifest:
    """The manifest that opens a GetModel stream."""
    return uplink_pb2.ModelManifest(
        version=served.version,
        hash=served.hash,
        size_bytes=len(served.data),
        spec_json=served.model.spec.to_json(),
        tensors=[
            uplink_pb2.TensorInfo(name=name, shape=list(shape), dtype="float32")
            for name, shape in sorted(served.model.shapes().items())
        ],
        delta_upload_id=served.delta_upload_id,
    )


class UplinkServicer(uplink_pb2_grpc.UplinkServicer):
    """The ``latentedge.v1.Uplink`` service over a :class:`SplitLearningServer`."""

    def __init__(
        self,
        core: SplitLearningServer,
        *,
        model_chunk_bytes: int = CHUNK_BYTES,
        auth: Authenticator | None = None,
        stream_limits: StreamLimits | None = None,
    ) -> None:
        self._core = core
        self._model_chunk_bytes = model_chunk_bytes
        self._auth = auth
        self._streams = StreamGate(stream_limits or StreamLimits())

    @property
    def stream_limits(self) -> StreamLimits:
        """Concurrent upload streams and their idle timeout."""
        return self._streams.limits

    def _caller(self, context: grpc.ServicerContext, method: str) -> Principal:
        """Who calls (UNAUTHENTICATED abort when credentials are required and bad)."""
        if self._auth is None:
            return OPEN
        try:
            found: bytes | Iterable[bytes] = context.auth_context().get("x509_common_name", [])
            names = [found] if isinstance(found, bytes) else list(found)
            return self._auth.principal(context.invocation_metadata() or (), names)
        except LatentEdgeError as exc:
            _abort(context, method, exc)

    def RegisterNode(  # noqa: N802 (generated method name)
        self, request: uplink_pb2.RegisterNodeRequest, context: grpc.ServicerContext
    ) -> uplink_pb2.RegisterNodeReply:
        """Register or re-register a node."""
        started = time.perf_counter()
        caller = self._caller(context, "RegisterNode")
        try:
            caller.require_node(request.node_id, "RegisterNode")
            stored = self._core.register(registration_from_proto(request))
        except LatentEdgeError as exc:
            _abort(context, "RegisterNode", exc)
        logger.info(
            "[Uplink.RegisterNode] %s latent_dim=%d OK %.3f s",
            request.node_id,
            request.latent_dim,
            time.perf_counter() - started,
        )
        return uplink_pb2.RegisterNodeReply(node_id=request.node_id, stored_samples=stored)

    def PushLatents(  # noqa: N802 (generated method name)
        self,
        # not the generated message: server.grpc_app registers its own deserialiser for it
        request_iterator: Iterator[LatentChunk | CodecError],  # type: ignore[override]
        context: grpc.ServicerContext,
    ) -> uplink_pb2.PushLatentsReply:
        """Durably store one streamed upload, then acknowledge it."""
        started = time.perf_counter()
        caller = self._caller(context, "PushLatents")
        try:
            with self._streams.admit(context, "PushLatents") as stream:
                ack = self._core.ingest(
                    _acting_for(_chunks_from(stream.watch(request_iterator)), caller, "PushLatents")
                )
        except LatentEdgeError as exc:
            _abort(context, "PushLatents", exc)
        logger.info(
            "[Uplink.PushLatents] %s %d samples %d bytes%s OK %.3f s",
            ack.upload_id,
            ack.samples,
            ack.payload_bytes,
            " (deduplicated)" if ack.deduplicated else "",
            time.perf_counter() - started,
        )
        return upload_ack_to_proto(ack)

    def Classify(  # noqa: N802 (generated method name)
        self, request: uplink_pb2.ClassifyRequest, context: grpc.ServicerContext
    ) -> uplink_pb2.ClassifyReply:
        """Classify latents from the calling node's encoder."""
        started = time.perf_counter()
        caller = self._caller(context, "Classify")
        try:
            caller.require_node(request.node_id, "Classify")
            pred = self._core.classify(request.node_id, tensor_from_proto(request.latents))
        except LatentEdgeError as exc:
            _abort(context, "Classify", exc)
        logger.info(
            "[Uplink.Classify] %s %d rows %d bytes OK %.3f s",
            request.node_id,
            len(pred.labels),
            len(request.latents.data),
            time.perf_counter() - started,
        )
        return prediction_to_proto(pred)

    def GetSchedule(  # noqa: N802 (generated method name)
        self, request: uplink_pb2.GetScheduleRequest, context: grpc.ServicerContext
    ) -> uplink_pb2.GetScheduleReply:
        """This round's upload decision and bandwidth share for one node."""
        started = time.perf_counter()
        caller = self._caller(context, "GetSchedule")
        try:
            caller.require_node(request.node_id, "GetSchedule")
            schedule = self._core.schedule(request.node_id)
        except LatentEdgeError as exc:
            _abort(context, "GetSchedule", exc)
        logger.info(
            "[Uplink.GetSchedule] %s round %d upload=%s bandwidth %.4g Hz OK %.3f s",
            request.node_id,
            schedule.round,
            schedule.upload,
            schedule.bandwidth_hz,
            time.perf_counter() - started,
        )
        return schedule_to_proto(schedule)

    def GetStatus(  # noqa: N802 (generated method name)
        self, request: uplink_pb2.GetStatusRequest, context: grpc.ServicerContext
    ) -> uplink_pb2.GetStatusReply:
        """Report nodes, stored samples, classifier and last plan (a node sees only itself)."""
        caller = self._caller(context, "GetStatus")
        try:
            status = self._core.status(page_size=request.page_size, page_token=request.page_token)
            return status_to_proto(_visible_to(caller, status))
        except LatentEdgeError as exc:
            _abort(context, "GetStatus", exc)

    def GetModel(  # noqa: N802 (generated method name)
        self, request: uplink_pb2.GetModelRequest, context: grpc.ServicerContext
    ) -> Iterator[uplink_pb2.ModelChunk]:
        """Stream a model file: manifest, then byte chunks from ``offset``."""
        started = time.perf_counter()
        caller = self._caller(context, "GetModel")
        try:
            if request.node_id:
                caller.require_node(request.node_id, "GetModel")
            if request.fine_tuned_for:
                caller.require_node(request.fine_tuned_for, "GetModel (fine_tuned_for)")
            served = self._core.model(
                request.node_id, version=request.version, fine_tuned_for=request.fine_tuned_for
            )
            if request.offset or request.expected_hash:
                if request.expected_hash != served.hash:
                    raise ConflictError(
                        f"the model changed since the download began: it is now sha256 "
                        f"{served.hash}, the client holds part of {request.expected_hash or '?'}; "
                        "start again from offset 0"
                    )
                if request.offset > len(served.data):
                    raise InvalidRequestError(
                        f"offset {request.offset} is past the end of the model "
                        f"({len(served.data)} bytes)"
                    )
        except LatentEdgeError as exc:
            _abort(context, "GetModel", exc)
        yield uplink_pb2.ModelChunk(manifest=manifest_of(served), offset=request.offset)
        offset = int(request.offset)
        while offset < len(served.data):
            if not context.is_active():
                logger.info("[Uplink.GetModel] client left at byte %d", offset)
                return
            end = min(offset + self._model_chunk_bytes, len(served.data))
            yield uplink_pb2.ModelChunk(offset=offset, data=served.data[offset:end])
            offset = end
        logger.info(
            "[Uplink.GetModel] %s version %d%s %d bytes from %d OK %.3f s",
            request.node_id or "-",
            served.version,
            f" fine-tuned for {request.fine_tuned_for}" if request.fine_tuned_for else "",
            len(served.data),
            request.offset,
            time.perf_counter() - started,
        )

    def PushDelta(  # noqa: N802 (generated method name)
        self,
        request_iterator: Iterator[uplink_pb2.DeltaChunk],
        context: grpc.ServicerContext,
    ) -> uplink_pb2.PushDeltaReply:
        """Durably store one streamed fine-tuning delta, then acknowledge it."""
        started = time.perf_counter()
        caller = self._caller(context, "PushDelta")
        try:
            with self._streams.admit(context, "PushDelta") as stream:
                ack = self._core.ingest_delta(
                    _acting_for(
                        _delta_chunks_from(stream.watch(request_iterator)), caller, "PushDelta"
                    )
                )
        except LatentEdgeError as exc:
            _abort(context, "PushDelta", exc)
        logger.info(
            "[Uplink.PushDelta] %s %d tensors %d params %d bytes on base v%d%s OK %.3f s",
            ack.upload_id,
            ack.tensors,
            ack.params,
            ack.payload_bytes,
            ack.base_version,
            " (deduplicated)" if ack.deduplicated else "",
            time.perf_counter() - started,
        )
        return delta_ack_to_proto(ack)

    def Aggregate(  # noqa: N802 (generated method name)
        self, request: uplink_pb2.AggregateRequest, context: grpc.ServicerContext
    ) -> uplink_pb2.AggregateReply:
        """Average the pending deltas into the next base version (admin)."""
        caller = self._caller(context, "Aggregate")
        try:
            caller.require_admin("Aggregate")
            made = self._core.aggregate(request.min_nodes)
        except LatentEdgeError as exc:
            _abort(context, "Aggregate", exc)
        logger.info("[Uplink.Aggregate] version %d from %s OK", made.version, list(made.nodes))
        return uplink_pb2.AggregateReply(model=model_version_to_proto(made))

    def RemoveNode(  # noqa: N802 (generated method name)
        self, request: uplink_pb2.RemoveNodeRequest, context: grpc.ServicerContext
    ) -> uplink_pb2.RemoveNodeReply:
        """Delete a node and its data (the node itself or an admin)."""
        caller = self._caller(context, "RemoveNode")
        try:
            caller.require_node(request.node_id, "RemoveNode")
            samples, deltas = self._core.remove_node(request.node_id)
        except LatentEdgeError as exc:
            _abort(context, "RemoveNode", exc)
        logger.info(
            "[Uplink.RemoveNode] %s %d samples %d deltas OK", request.node_id, samples, deltas
        )
        return uplink_pb2.RemoveNodeReply(
            node_id=request.node_id, removed_samples=samples, removed_deltas=deltas
        )


class _HasCode(Protocol):
    """``grpc.ServicerContext.code()`` (in grpcio since 1.38; missing from grpc-stubs)."""

    def code(self) -> grpc.StatusCode | None: ...


def code_set(context: grpc.ServicerContext) -> grpc.StatusCode | None:
    """The status code the handler set (``abort``, ``set_code``); None when it set none."""
    return cast(_HasCode, context).code()


def _internal(context: grpc.ServicerContext, method: str, exc: BaseException) -> NoReturn:
    """A bug, not the client's doing: INTERNAL with an incident id, the traceback in the log."""
    incident = uuid.uuid4().hex[:12]
    logger.error("[Uplink.%s] internal error %s", method, incident, exc_info=exc)
    context.abort(
        grpc.StatusCode.INTERNAL,
        f"internal error in {method} (incident {incident}; the server log has the details)",
    )
    raise AssertionError("context.abort returned")  # pragma: no cover


def _guarded(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` whose unexpected exceptions answer INTERNAL, never UNKNOWN with their text."""
    name = method.__name__
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from method(self, request, context)
            except Exception as exc:
                if code_set(context) is not None:  # an abort with its own status
                    raise
                _internal(context, name, exc)

        return stream

    @functools.wraps(method)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:
            if code_set(context) is not None:
                raise
            _internal(context, name, exc)

    return unary


for _rpc in [n for n in vars(uplink_pb2_grpc.UplinkServicer) if not n.startswith("_")]:
    setattr(UplinkServicer, _rpc, _guarded(getattr(UplinkServicer, _rpc)))
