"""The edge node's gRPC client: register, upload latents in chunks, classify, status, schedule.

Every call has a deadline. ``UNAVAILABLE`` and ``DEADLINE_EXCEEDED`` are retried with
exponential backoff for up to ``retry_window_s``; a retried upload re-sends the same
``upload_id``, which the server deduplicates, so a retry never loses or doubles samples.
Any other status is raised as :class:`~common.errors.UplinkError` with the server's message.
"""

from __future__ import annotations

import argparse
import enum
import fcntl
import hashlib
import logging
import math
import re
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar

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
from common.delta import DeltaEntry
from common.errors import ConfigError, ServerUnreachableError, UplinkError
from common.records import (
    DeltaAck,
    DeltaChunk,
    ModelVersion,
    NodeRegistration,
    NodeStatus,
    Prediction,
    Schedule,
    ServerStatus,
    UploadAck,
    UploadMode,
)
from common.serde import (
    delta_ack_from_proto,
    delta_chunk_to_proto,
    latent_chunk_to_bytes,
    model_version_from_proto,
    prediction_from_proto,
    registration_to_proto,
    schedule_from_proto,
    status_from_proto,
    tensor_to_proto,
    upload_ack_from_proto,
)
from common.tensors import to_wire, wire_array
from common.tls import (
    ClientTls,
    check_address,
    client_tls_from_args,
    client_token_from_args,
)
from protos import uplink_pb2, uplink_pb2_grpc

logger = logging.getLogger(__name__)

T = TypeVar("T")

_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
_UPLINK_SERVICE = uplink_pb2.DESCRIPTOR.services_by_name["Uplink"].full_name
_PUSH_LATENTS = f"/{_UPLINK_SERVICE}/PushLatents"
"""gRPC path of PushLatents (``/latentedge.v1.Uplink/PushLatents``), called with chunks that
:func:`~common.serde.latent_chunk_to_bytes` serialised."""
_GRPC_RPC_CAP = "Concurrent RPC limit exceeded"
"""Detail of gRPC's own RESOURCE_EXHAUSTED at the server's in-flight cap: transient, retried."""


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


@dataclass(frozen=True)
class DownloadedModel:
    """A model file fetched with :meth:`UplinkClient.download_model`, verified by its hash."""

    path: Path
    """The cached file, ``<cache_dir>/<sha256>.safetensors``."""
    hash: str
    """SHA-256 hex of the file (checked after the download)."""
    version: int
    """Base version (for a fine-tuned model: the base its delta was computed against)."""
    size_bytes: int
    cached: bool
    """True when the file was in the cache already (nothing downloaded)."""
    resumed_from: int
    """Bytes already held when the download last resumed (from a ``.part`` file of an earlier
    process or after a dropped connection); 0 = one uninterrupted transfer."""
    delta_upload_id: str = ""
    """For a node's fine-tuned model: the delta it contains."""


class _Download:
    """State of one model download across attempts: hash, version, bytes so far."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self.hash = ""
        self.version = 0
        self.size = 0
        self.delta_upload_id = ""
        self.data = bytearray()
        self.resumed_from = 0
        self.cached = False
        self._lock: IO[bytes] | None = None

    def release(self) -> None:
        """Let other processes sharing the cache at this model (idempotent)."""
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    @property
    def final_path(self) -> Path:
        return self.cache_dir / f"{self.hash}.safetensors"

    @property
    def part_path(self) -> Path:
        return self.cache_dir / f"{self.hash}.part"

    def on_manifest(self, manifest: uplink_pb2.ModelManifest) -> bool:
        """Take the manifest; return True when the stream must restart (to resume or skip)."""
        if self.hash and manifest.hash != self.hash:
            raise UplinkError(f"GetModel: the model changed mid-download (now {manifest.hash})")
        if self.hash:
            return False
        if not _SHA256_HEX.fullmatch(manifest.hash):
            raise UplinkError(
                f"GetModel: the manifest's hash is not SHA-256 hex: {manifest.hash!r}"
            )
        if not 0 < manifest.size_bytes <= MAX_MODEL_BYTES:
            raise UplinkError(
                f"GetModel: the manifest's size {manifest.size_bytes} is not in "
                f"1..{MAX_MODEL_BYTES} bytes"
            )
        self.hash, self.version, self.size = manifest.hash, manifest.version, manifest.size_bytes
        self.delta_upload_id = manifest.delta_upload_id
        # one process at a time downloads a given model into a cache (nodes on one host share
        # ~/.cache/latentedge/models); the others wait here, then find the finished file
        self._lock = (self.cache_dir / f"{self.hash}.lock").open("ab")
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        if _verified(self.final_path, self.hash):
            self.cached = True
            return True
        if self.part_path.exists():
            held = self.part_path.read_bytes()[: self.size]
            with self.part_path.open("r+b") as fh:  # drop anything past what is kept
                fh.truncate(len(held))
            if held:
                self.data = bytearray(held)
                self.resumed_from = len(held)
                return True
        return False

    def on_data(self, offset: int, data: bytes) -> None:
        if not self.hash:
            raise UplinkError("GetModel: data arrived before the manifest (protocol error)")
        if offset + len(data) > self.size:
            raise UplinkError(
                f"GetModel: the server sent bytes past the manifest's size {self.size} "
                "(protocol error)"
            )
        if offset != len(self.data):
            raise UplinkError(
                f"GetModel: chunk at byte {offset}, expected {len(self.data)} (protocol error)"
            )
        self.data += data
        with self.part_path.open("ab") as fh:
            fh.write(data)

    def finish(self) -> Path:
        if hashlib.sha256(self.data).hexdigest() != self.hash or len(self.data) != self.size:
            self.part_path.unlink(missing_ok=True)
            raise UplinkError(
                f"GetModel: downloaded {len(self.data)} bytes do not match the manifest "
                f"(sha256 {self.hash[:12]}..., {self.size} bytes); the partial file was dropped"
            )
        tmp = self.cache_dir / f"{self.hash}.tmp"
        tmp.write_bytes(bytes(self.data))
        tmp.replace(self.final_path)
        self.part_path.unlink(missing_ok=True)
        return self.final_path


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")

MAX_MODEL_BYTES = 4 * 1024**3
"""Largest model file a client accepts to download (a manifest claiming more is refused)."""


def _verified(path: Path, digest: str) -> bool:
    return path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == digest


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamStreamClientInterceptor,  # type: ignore[type-arg]
):
    """Adds ``authorization: Bearer <token>`` to the metadata of every call."""

    def __init__(self, token: str) -> None:
        self._entry = ("authorization", f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        metadata = [*(details.metadata or ()), self._entry]
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        """Unary call with the token."""
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        """Response-streaming call with the token."""
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        """Request-streaming call with the token."""
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        """Bidirectional call with the token."""
        return continuation(self._details(details), requests)


class UplinkClient:
    """A context-managed connection to one latentedge server."""

    def __init__(
        self,
        address: str,
        *,
        retry: RetryPolicy | None = None,
        rpc_timeout_s: float = RPC_TIMEOUT_S,
        upload_timeout_s: float = UPLOAD_TIMEOUT_S,
        tls: ClientTls | None = None,
        token: str = "",
    ) -> None:
        self._address = check_address(address, "the server address (--server)")
        self._retry = retry or RetryPolicy()
        self._rpc_timeout_s = rpc_timeout_s
        self._upload_timeout_s = upload_timeout_s
        self._tls = tls
        self._token = token
        self._state = ClientState.UNOPENED
        self._channel: grpc.Channel | None = None
        self._stub: uplink_pb2_grpc.UplinkStub | None = None
        self._push_latents: Any = None

    def __enter__(self) -> UplinkClient:
        if self._state is not ClientState.UNOPENED:
            raise UplinkError(f"client is {self._state.name.lower()}; open a new one")
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        if self._tls is None:
            self._channel = grpc.insecure_channel(self._address, options=options)
        else:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=self._tls.ca,
                private_key=self._tls.key,
                certificate_chain=self._tls.cert,
            )
            self._channel = grpc.secure_channel(self._address, credentials, options=options)
        channel = self._channel
        if self._token:
            channel = grpc.intercept_channel(channel, _BearerToken(self._token))
        self._stub = uplink_pb2_grpc.UplinkStub(channel)
        # the stub's PushLatents, but fed chunks already serialised by latent_chunk_to_bytes
        # (the same bytes protobuf would send, without copying each payload four times)
        self._push_latents = channel.stream_unary(
            _PUSH_LATENTS,
            request_serializer=None,
            response_deserializer=uplink_pb2.PushLatentsReply.FromString,
        )
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
        self._push_latents = None
        self._state = ClientState.CLOSED

    @property
    def stub(self) -> uplink_pb2_grpc.UplinkStub:
        """The generated stub; the client must be open."""
        if self._stub is None:
            raise UplinkError("client is not open: use `with UplinkClient(...) as client:`")
        return self._stub

    def _push_latents_call(self) -> Any:
        if self._push_latents is None:
            raise UplinkError("client is not open: use `with UplinkClient(...) as client:`")
        return self._push_latents

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
                capped = code == grpc.StatusCode.RESOURCE_EXHAUSTED and _GRPC_RPC_CAP in details
                if code not in _RETRYABLE and not capped:
                    logger.info(
                        "[Uplink.%s] %s after %.3f s",
                        method,
                        code.name,
                        time.perf_counter() - started,
                    )
                    raise UplinkError(
                        f"{method} failed: {code.name}: {details}", code.name
                    ) from exc
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

        def chunks() -> Iterator[bytes]:
            try:
                yield from encoded()
            except BaseException as exc:  # gRPC would hide it behind "Exception iterating requests"
                local_errors.append(exc)
                raise

        def encoded() -> Iterator[bytes]:
            for i in range(count):
                sl = slice(i * rows, min(n, (i + 1) * rows))
                yield latent_chunk_to_bytes(
                    node_id=node_id,
                    upload_id=uid,
                    seq=i,
                    last=i == count - 1,
                    latents=wire_array(latents[sl], encoding),
                    labels=wire_array(labels[sl].astype(label_dtype, copy=False)),
                    mode=mode,
                    total_samples=n,
                )

        started = time.perf_counter()
        try:
            reply = self._call(
                "PushLatents",
                lambda: self._push_latents_call()(chunks(), timeout=self._upload_timeout_s),
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
        """The server's nodes (every page), classifier and last plan."""
        nodes: list[NodeStatus] = []
        token = ""
        while True:
            page = status_from_proto(self._status_page(token))
            nodes.extend(page.nodes)
            if not page.next_page_token or page.next_page_token <= token:
                return replace(page, nodes=tuple(nodes), next_page_token="")
            token = page.next_page_token

    def _status_page(self, token: str) -> uplink_pb2.GetStatusReply:
        request = uplink_pb2.GetStatusRequest(page_token=token)
        return self._call(
            "GetStatus", lambda: self.stub.GetStatus(request, timeout=self._rpc_timeout_s)
        )

    def remove_node(self, node_id: str) -> tuple[int, int]:
        """Delete ``node_id`` and its data on the server; (samples, deltas) deleted."""
        request = uplink_pb2.RemoveNodeRequest(node_id=node_id)
        reply = self._call(
            "RemoveNode", lambda: self.stub.RemoveNode(request, timeout=self._rpc_timeout_s)
        )
        return int(reply.removed_samples), int(reply.removed_deltas)

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

    # -- transfer learning --------------------------------------------------------------------

    def download_model(
        self,
        cache_dir: str | Path,
        *,
        node_id: str = "",
        version: int = 0,
        fine_tuned_for: str = "",
    ) -> DownloadedModel:
        """Fetch a model file into ``cache_dir`` (named by its SHA-256), resuming where it broke.

        A file already in the cache with the right hash is not downloaded again. A dropped
        connection is retried (like every call) from the last byte received, also across
        processes: the partial file ``<sha256>.part`` stays in ``cache_dir``. The finished file
        is checked against the manifest's hash before it is used.

        Args:
            cache_dir: Folder of cached models (created when missing).
            node_id: The asking node (for the server's logs).
            version: A base version; 0 = the current one.
            fine_tuned_for: Fetch this node's fine-tuned model instead of a base.
        """
        cache = Path(cache_dir)
        cache.mkdir(parents=True, exist_ok=True)
        state = _Download(cache)
        started = time.perf_counter()

        def attempt() -> bool:
            if state.data:  # a retry after a dropped connection: go on from the last byte
                state.resumed_from = len(state.data)
            request = uplink_pb2.GetModelRequest(
                node_id=node_id,
                version=state.version if state.hash and not fine_tuned_for else version,
                fine_tuned_for=fine_tuned_for,
                offset=len(state.data),
                expected_hash=state.hash if state.data else "",
            )
            stream = self.stub.GetModel(request, timeout=self._upload_timeout_s)
            try:
                for msg in stream:
                    if msg.HasField("manifest") and state.on_manifest(msg.manifest):
                        return not state.cached  # restart to resume, or done (cached)
                    if msg.data:
                        state.on_data(int(msg.offset), bytes(msg.data))
            finally:
                stream.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves it untyped
            return False

        try:
            try:
                while self._call("GetModel", attempt):
                    pass
            except UplinkError as exc:
                if exc.code != "FAILED_PRECONDITION" or not state.data:
                    raise
                # the model changed since the partial file was written: start over, once
                logger.warning("[Uplink.GetModel] %s; downloading from the start", exc)
                state.part_path.unlink(missing_ok=True)
                state.release()
                state = _Download(cache)
                while self._call("GetModel", attempt):
                    pass
            path = state.final_path if state.cached else state.finish()
        finally:
            state.release()
        logger.info(
            "[Uplink.GetModel] %s: version %d, %d bytes%s, sha256 %s..., %.3f s",
            fine_tuned_for or "base",
            state.version,
            state.size,
            " (cached)"
            if state.cached
            else (f" (resumed at {state.resumed_from})" if state.resumed_from else ""),
            state.hash[:12],
            time.perf_counter() - started,
        )
        return DownloadedModel(
            path=path,
            hash=state.hash,
            version=state.version,
            size_bytes=state.size,
            cached=state.cached,
            resumed_from=state.resumed_from,
            delta_upload_id=state.delta_upload_id,
        )

    def push_delta(
        self,
        node_id: str,
        entries: Sequence[DeltaEntry],
        *,
        base_version: int,
        base_hash: str,
        samples: int,
        trainable: str = "",
        chunk_bytes: int = CHUNK_BYTES,
        upload_id: str | None = None,
    ) -> tuple[DeltaAck, int]:
        """Stream a fine-tuning delta in chunks; return the durable ack and the bytes on the wire.

        Args:
            node_id: The registered node.
            entries: The encoded delta (:func:`common.delta.encode_delta`).
            base_version: The base version it was computed against.
            base_hash: That version's SHA-256 (the server refuses a mismatch).
            samples: Training samples behind it (its weight when deltas are averaged).
            trainable: What was fine-tuned (recorded with the delta).
            chunk_bytes: Largest payload per chunk; a larger tensor travels alone.
            upload_id: Id of this upload; a fresh one by default. Retries reuse it.

        Returns:
            ``(ack, wire_bytes)``: wire bytes are the serialised chunk messages.
        """
        if not entries:
            raise UplinkError("a delta needs at least one tensor")
        uid = upload_id or uuid.uuid4().hex
        groups: list[list[DeltaEntry]] = [[]]
        size = 0
        for entry in entries:
            if entry.nbytes > MAX_MESSAGE_BYTES - 64 * 1024:
                raise UplinkError(
                    f"delta of tensor {entry.name!r} is {entry.nbytes} bytes, more than one "
                    f"message carries ({MAX_MESSAGE_BYTES} bytes); use a sparser encoding"
                )
            if groups[-1] and size + entry.nbytes > chunk_bytes:
                groups.append([])
                size = 0
            groups[-1].append(entry)
            size += entry.nbytes
        messages = [
            delta_chunk_to_proto(
                DeltaChunk(
                    node_id=node_id,
                    upload_id=uid,
                    seq=i,
                    last=i == len(groups) - 1,
                    tensors=tuple(group),
                    base_version=base_version,
                    base_hash=base_hash,
                    samples=samples,
                    trainable=trainable,
                    total_tensors=len(entries),
                )
            )
            for i, group in enumerate(groups)
        ]
        wire_bytes = sum(m.ByteSize() for m in messages)
        started = time.perf_counter()
        reply = self._call(
            "PushDelta",
            lambda: self.stub.PushDelta(iter(messages), timeout=self._upload_timeout_s),
        )
        ack = delta_ack_from_proto(reply)
        logger.info(
            "[Uplink.PushDelta] %s: %d tensors, %d params, %d payload bytes (%d on the wire) "
            "in %d chunk(s) on base v%d%s, %.3f s",
            uid,
            ack.tensors,
            ack.params,
            ack.payload_bytes,
            wire_bytes,
            len(messages),
            ack.base_version,
            " (deduplicated)" if ack.deduplicated else "",
            time.perf_counter() - started,
        )
        return ack, wire_bytes

    def aggregate(self, min_nodes: int = 0) -> ModelVersion:
        """Ask the server to average the pending deltas into the next base version."""
        request = uplink_pb2.AggregateRequest(min_nodes=min_nodes)
        reply = self._call(
            "Aggregate", lambda: self.stub.Aggregate(request, timeout=self._rpc_timeout_s)
        )
        return model_version_from_proto(reply.model)


def client_from_args(args: argparse.Namespace) -> UplinkClient:
    """The client of a command's ``--server``, TLS and token flags and ``--retry-window-s``."""
    return UplinkClient(
        args.server,
        retry=RetryPolicy(window_s=args.retry_window_s),
        tls=client_tls_from_args(args),
        token=client_token_from_args(args),
    )
