"""The edge node's gRPC client: register, upload latents in chunks, classify, status, schedule.

Every call has a deadline. ``UNAVAILABLE`` and ``DEADLINE_EXCEEDED`` are retried with
exponential backoff for up to ``retry_window_s``; a retried upload re-sends the same
``upload_id``, which the server deduplicates, so a retry never loses or doubles samples.
Any other status is raised as :class:`~common.errors.UplinkError` with the server's message.
"""

from __future__ import annotations

import enum
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar

import grpc
import numpy as np

from common.constants import (
    CHUNK_BYTES,
    MAX_MESSAGE_BYTES,
    RETRY_INITIAL_BACKOFF_S,
    RETRY_MAX_BACKOFF_S,
    RETRY_WINDOW_S,
    RPC_TIMEOUT_S,
    UPLOAD_TIMEOUT_S,
)
from common.errors import ConfigError, ServerUnreachableError, UplinkError
from common.records import (
    LatentChunk,
    NodeRegistration,
    Prediction,
    Schedule,
    ServerStatus,
    UploadAck,
    UploadMode,
)
from common.serde import (
    latent_chunk_to_proto,
    prediction_from_proto,
    registration_to_proto,
    schedule_from_proto,
    status_from_proto,
    tensor_to_proto,
    upload_ack_from_proto,
)
from common.tensors import to_wire
from protos import uplink_pb2, uplink_pb2_grpc

logger = logging.getLogger(__name__)

T = TypeVar("T")

_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class ClientState(enum.Enum):
    """Life cycle of an :class:`UplinkClient`."""

    UNOPENED = 1
    OPENED = 2
    CLOSED = 3


@dataclass(frozen=True)
class RetryPolicy:
    """How long and how often to retry an unreachable server."""

    window_s: float = RETRY_WINDOW_S
    """Give up after this many seconds of failed attempts."""
    initial_backoff_s: float = RETRY_INITIAL_BACKOFF_S
    """First wait between attempts (s); doubles each time."""
    max_backoff_s: float = RETRY_MAX_BACKOFF_S
    """Longest wait between attempts (s)."""

    def __post_init__(self) -> None:
        if self.window_s < 0 or self.initial_backoff_s <= 0 or self.max_backoff_s <= 0:
            raise ConfigError(
                "retry window must be >= 0 s and backoffs > 0 s, got "
                f"window_s={self.window_s}, initial_backoff_s={self.initial_backoff_s}, "
                f"max_backoff_s={self.max_backoff_s}"
            )


def label_dtype_for(num_classes: int) -> np.dtype[np.integer]:
    """The smallest wire dtype that holds labels ``0..num_classes-1``."""
    if num_classes <= 256:
        return np.dtype(np.uint8)
    if num_classes <= 32768:
        return np.dtype(np.int16)
    return np.dtype(np.int32)


class UplinkClient:
    """A context-managed connection to one latentedge server."""

    def __init__(
        self,
        address: str,
        *,
        retry: RetryPolicy | None = None,
        rpc_timeout_s: float = RPC_TIMEOUT_S,
        upload_timeout_s: float = UPLOAD_TIMEOUT_S,
    ) -> None:
        if ":" not in address:
            raise ConfigError(f"server address must be HOST:PORT, got {address!r}")
        self._address = address
        self._retry = retry or RetryPolicy()
        self._rpc_timeout_s = rpc_timeout_s
        self._upload_timeout_s = upload_timeout_s
        self._state = ClientState.UNOPENED
        self._channel: grpc.Channel | None = None
        self._stub: uplink_pb2_grpc.UplinkStub | None = None

    def __enter__(self) -> UplinkClient:
        if self._state is not ClientState.UNOPENED:
            raise UplinkError(f"client is {self._state.name.lower()}; open a new one")
        self._channel = grpc.insecure_channel(
            self._address,
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        self._stub = uplink_pb2_grpc.UplinkStub(self._channel)
        self._state = ClientState.OPENED
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel (idempotent)."""
        if self._channel is not None:
            self._channel.close()
        self._channel = None
        self._stub = None
        self._state = ClientState.CLOSED

    @property
    def stub(self) -> uplink_pb2_grpc.UplinkStub:
        """The generated stub; the client must be open."""
        if self._stub is None:
            raise UplinkError("client is not open: use `with UplinkClient(...) as client:`")
        return self._stub

    # -- retry --------------------------------------------------------------------------------

    def _call(self, method: str, attempt: Callable[[], T]) -> T:
        deadline: float | None = None  # the window opens at the first retryable failure
        backoff = self._retry.initial_backoff_s
        tries = 0
        while True:
            tries += 1
            started = time.perf_counter()
            try:
                result = attempt()
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
                details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
                if code not in _RETRYABLE:
                    logger.info(
                        "[Uplink.%s] %s after %.3f s",
                        method,
                        code.name,
                        time.perf_counter() - started,
                    )
                    raise UplinkError(f"{method} failed: {code.name}: {details}") from exc
                if deadline is None:
                    deadline = time.monotonic() + self._retry.window_s
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ServerUnreachableError(
                        f"{method}: server {self._address} unreachable for "
                        f"{self._retry.window_s:g} s ({tries} attempts; last: {code.name}: "
                        f"{details})"
                    ) from exc
                wait = min(backoff, remaining)
                logger.warning(
                    "[Uplink.%s] %s (%s); retrying in %.1f s (%.0f s left)",
                    method,
                    code.name,
                    details,
                    wait,
                    remaining,
                )
                time.sleep(wait)
                backoff = min(backoff * 2, self._retry.max_backoff_s)
                continue
            logger.debug("[Uplink.%s] OK %.3f s", method, time.perf_counter() - started)
            return result

    # -- calls --------------------------------------------------------------------------------

    def register(self, reg: NodeRegistration) -> int:
        """Register the node; return the samples the server already stores for it."""
        request = registration_to_proto(reg)
        reply = self._call(
            "RegisterNode",
            lambda: self.stub.RegisterNode(request, timeout=self._rpc_timeout_s),
        )
        return int(reply.stored_samples)

    def push_latents(
        self,
        node_id: str,
        latents: np.ndarray,
        labels: np.ndarray,
        *,
        num_classes: int,
        encoding: str = "float32",
        chunk_bytes: int = CHUNK_BYTES,
        mode: UploadMode = UploadMode.REPLACE,
        upload_id: str | None = None,
    ) -> UploadAck:
        """Stream ``latents`` (n, d) + ``labels`` (n,) in chunks; return the durable ack.

        Args:
            node_id: The registered node.
            latents: Float array (n, latent_dim).
            labels: Integer array (n,).
            num_classes: Label range, used to pick the smallest label dtype.
            encoding: ``float32``, ``float16`` or ``int8`` (per-chunk scale) on the wire.
            chunk_bytes: Largest latents payload per chunk (bytes).
            mode: Replace the node's earlier latents, or append to them.
            upload_id: Id of this upload; a fresh one by default. Retries reuse it.
        """
        if latents.ndim != 2 or labels.shape != (latents.shape[0],):
            raise UplinkError(
                f"latents must be (n, d) and labels (n,), got {latents.shape} and {labels.shape}"
            )
        uid = upload_id or uuid.uuid4().hex
        label_dtype = label_dtype_for(num_classes)
        per_row = latents.shape[1] * np.dtype(np.float32).itemsize + label_dtype.itemsize
        rows = max(1, chunk_bytes // per_row)
        n = latents.shape[0]
        count = max(1, math.ceil(n / rows))

        local_errors: list[BaseException] = []

        def chunks() -> Iterator[uplink_pb2.LatentChunk]:
            try:
                yield from encoded()
            except BaseException as exc:  # gRPC would hide it behind "Exception iterating requests"
                local_errors.append(exc)
                raise

        def encoded() -> Iterator[uplink_pb2.LatentChunk]:
            for i in range(count):
                sl = slice(i * rows, min(n, (i + 1) * rows))
                yield latent_chunk_to_proto(
                    LatentChunk(
                        node_id=node_id,
                        upload_id=uid,
                        seq=i,
                        last=i == count - 1,
                        latents=to_wire(latents[sl], encoding),
                        labels=to_wire(labels[sl].astype(label_dtype)),
                        mode=mode,
                        total_samples=n,
                    )
                )

        started = time.perf_counter()
        try:
            reply = self._call(
                "PushLatents",
                lambda: self.stub.PushLatents(chunks(), timeout=self._upload_timeout_s),
            )
        except UplinkError:
            if local_errors:  # encoding failed here, not on the server
                raise local_errors[-1] from None
            raise
        ack = upload_ack_from_proto(reply)
        logger.info(
            "[Uplink.PushLatents] %s: %d samples in %d chunk(s), %d bytes%s, %.3f s",
            uid,
            ack.samples,
            count,
            ack.payload_bytes,
            " (deduplicated)" if ack.deduplicated else "",
            time.perf_counter() - started,
        )
        return ack

    def classify(
        self, node_id: str, latents: np.ndarray, *, encoding: str = "float32"
    ) -> Prediction:
        """Classify latents from this node's encoder through the server."""
        request = uplink_pb2.ClassifyRequest(
            node_id=node_id, latents=tensor_to_proto(to_wire(latents, encoding))
        )
        reply = self._call(
            "Classify", lambda: self.stub.Classify(request, timeout=self._rpc_timeout_s)
        )
        return prediction_from_proto(reply)

    def status(self) -> ServerStatus:
        """The server's nodes, classifier and last plan."""
        reply = self._call(
            "GetStatus",
            lambda: self.stub.GetStatus(uplink_pb2.GetStatusRequest(), timeout=self._rpc_timeout_s),
        )
        return status_from_proto(reply)

    def schedule(self, node_id: str) -> Schedule:
        """This round's upload decision and bandwidth for ``node_id``."""
        request = uplink_pb2.GetScheduleRequest(node_id=node_id)
        reply = self._call(
            "GetSchedule", lambda: self.stub.GetSchedule(request, timeout=self._rpc_timeout_s)
        )
        return schedule_from_proto(reply)

    def wait_for_classifier(self, node_id: str, *, timeout_s: float = 300.0) -> ServerStatus:
        """Poll status until a finished classifier covers ``node_id``."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.status()
            c = status.classifier
            if not c.training and node_id in c.nodes:
                return status
            if time.monotonic() > deadline:
                raise UplinkError(
                    f"no classifier covering node {node_id!r} after {timeout_s:.0f} s "
                    f"(classifier version {c.version}, nodes {list(c.nodes)})"
                )
            time.sleep(0.2)
