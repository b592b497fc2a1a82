"""gRPC servicer: validate, call domain code, map domain errors to status codes, log one line."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import NoReturn

import grpc

from common.errors import (
    AllocationError,
    BusyError,
    CodecError,
    ConflictError,
    InvalidRequestError,
    LatentEdgeError,
    NotFoundError,
    StoreError,
    StreamAbortedError,
    TooLargeError,
)
from common.records import LatentChunk
from common.serde import (
    latent_chunk_from_proto,
    prediction_to_proto,
    registration_from_proto,
    schedule_to_proto,
    status_to_proto,
    tensor_from_proto,
    upload_ack_to_proto,
)
from protos import uplink_pb2, uplink_pb2_grpc
from server.core import SplitLearningServer

logger = logging.getLogger(__name__)

_STATUS_OF: tuple[tuple[type[LatentEdgeError], grpc.StatusCode], ...] = (
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (CodecError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (ConflictError, grpc.StatusCode.FAILED_PRECONDITION),
    (TooLargeError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (BusyError, grpc.StatusCode.UNAVAILABLE),
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


def _chunks_from(request_iterator: Iterator[uplink_pb2.LatentChunk]) -> Iterator[LatentChunk]:
    try:
        for msg in request_iterator:
            yield latent_chunk_from_proto(msg)
    except grpc.RpcError as exc:  # the client cancelled or the connection dropped
        raise StreamAbortedError("the client ended the stream before its last chunk") from exc


class UplinkServicer(uplink_pb2_grpc.UplinkServicer):
    """The ``latentedge.v1.Uplink`` service over a :class:`SplitLearningServer`."""

    def __init__(self, core: SplitLearningServer) -> None:
        self._core = core

    def RegisterNode(  # noqa: N802 (generated method name)
        self, request: uplink_pb2.RegisterNodeRequest, context: grpc.ServicerContext
    ) -> uplink_pb2.RegisterNodeReply:
        """Register or re-register a node."""
        started = time.perf_counter()
        try:
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
        request_iterator: Iterator[uplink_pb2.LatentChunk],
        context: grpc.ServicerContext,
    ) -> uplink_pb2.PushLatentsReply:
        """Durably store one streamed upload, then acknowledge it."""
        started = time.perf_counter()
        try:
            ack = self._core.ingest(_chunks_from(request_iterator))
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
        try:
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
        try:
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
        """Report nodes, stored samples, classifier and last plan."""
        try:
            return status_to_proto(self._core.status())
        except LatentEdgeError as exc:
            _abort(context, "GetStatus", exc)
