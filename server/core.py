"""The server's domain logic, free of gRPC: registration, durable ingest, classification.

:class:`SplitLearningServer` validates requests (raising the ``RequestError`` family, which the
servicer maps to status codes), writes through a :class:`~server.store.Store`, and retrains
the latent classifier in a background thread whenever committed latents change.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Protocol, TypeVar

import numpy as np

from common.constants import MAX_MESSAGE_BYTES
from common.delta import stats
from common.errors import (
    AllocationError,
    BusyError,
    CodecError,
    ConfigError,
    ConflictError,
    InvalidRequestError,
    LatentEdgeError,
    StoreError,
    TooLargeError,
)
from common.models import ClassifierConfig
from common.records import (
    ClassifierStatus,
    DeltaAck,
    DeltaChunk,
    LatentChunk,
    ModelVersion,
    NodeRegistration,
    Prediction,
    Schedule,
    ServerStatus,
    UploadAck,
    UploadMode,
)
from common.tensors import WireTensor, from_wire, wire_view
from server.allocation import Cell
from server.classifier import (
    ClassifierMode,
    LatentClassifier,
    block_rows_for,
    train_classifier,
)
from server.limits import (
    DEFAULT_DEDUPE_DRAIN_TIMEOUT_S,
    DEFAULT_MAX_NODE_BYTES,
    DEFAULT_MAX_NODES,
)
from server.scheduler import RoundScheduler, device_for
from server.store import LatentBlocks, Store
from server.transfer import ModelHub, ServedModel

logger = logging.getLogger(__name__)

NODE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
UPLOAD_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
MAX_LATENT_DIM = 65536
MAX_CLASSES = 65536
MAX_STATUS_PAGE = 1000
"""Most nodes in one GetStatus reply (a registration flood cannot outgrow the message limit)."""
CLASSIFY_REPLY_BYTES = MAX_MESSAGE_BYTES - 64 * 1024
"""A Classify reply's payload bound: the message limit less room for framing."""
MAX_DELTA_SAMPLES = 2**53
"""Largest training-sample count a delta may declare (exact as a float64 weight)."""
MAX_NODE_SAMPLES = 2**53
"""Largest sample count a node may declare (exact in the scheduler's float64 columns)."""
MAX_PROFILE_VALUE = 1e30
"""Largest energy-profile number: products of a few stay finite in the scheduler."""
SHARED_POLL_S = 1.0
"""On a store several replicas share: how often the trainer looks for data they stored and
classifiers they trained (the newest classifier is served at most this much later)."""

UPLOAD_LOCK_WAIT_S = 30.0
"""How long a stream waits for another stream of the same upload_id before UNAVAILABLE."""
_LATENT_DTYPES = ("float32", "float16", "int8")
_LABEL_DTYPES = ("uint8", "int16", "int32", "int64")


@dataclass(frozen=True)
class IngestLimits:
    """Size limits of uploads, of what one node may store and of the node count."""

    max_upload_bytes: int
    """Largest payload (latents + labels, bytes) of one upload."""
    max_node_bytes: int = DEFAULT_MAX_NODE_BYTES
    """Largest committed latent payload (bytes) of one node; an upload that would take the node
    past it is refused (RESOURCE_EXHAUSTED) and nothing of it is stored."""
    max_nodes: int = DEFAULT_MAX_NODES
    """Most registered nodes; registering one more is refused (RESOURCE_EXHAUSTED)."""
    dedupe_drain_timeout_s: float = DEFAULT_DEDUPE_DRAIN_TIMEOUT_S
    """A re-sent, already committed upload is read and discarded for at most this long (and at
    most its original payload bytes), then acknowledged without reading the rest."""

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_node_bytes", "max_nodes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"server.{name} must be >= 1, got {getattr(self, name)}")
        if not self.dedupe_drain_timeout_s > 0:
            raise ConfigError(
                f"server.dedupe_drain_timeout_s must be > 0, got {self.dedupe_drain_timeout_s}"
            )


class _StreamChunk(Protocol):
    """What every streamed chunk (latents or delta) carries."""

    @property
    def node_id(self) -> str: ...
    @property
    def upload_id(self) -> str: ...
    @property
    def seq(self) -> int: ...


_C = TypeVar("_C", bound=_StreamChunk)


class _Acked(Protocol):
    """An acknowledgement of a committed upload (latents or delta)."""

    @property
    def payload_bytes(self) -> int: ...


_P = TypeVar("_P", bound=_Acked)


def _latent_bytes(chunk: LatentChunk) -> int:
    return len(chunk.latents.data) + len(chunk.labels.data)


def _delta_bytes(chunk: DeltaChunk) -> int:
    return stats(chunk.tensors).payload_bytes


@contextlib.contextmanager
def _aborting(abort: Callable[[str], None], upload_id: str) -> Iterator[None]:
    """Discard the open upload when anything (also a dropped stream) interrupts the body."""
    try:
        yield
    except BaseException:
        abort(upload_id)
        raise


class _LastChunk(_StreamChunk, Protocol):
    @property
    def last(self) -> bool: ...


_L = TypeVar("_L", bound=_LastChunk)


def _in_order(first: _L, chunks: Iterator[_L], what: str) -> Iterator[_L]:
    """``first`` and the chunks after it up to the one marked ``last``, checked for order.

    Raises:
        InvalidRequestError: ids changed mid-stream, ``seq`` out of order, the stream ended
            without a chunk marked ``last``, or a chunk followed it.
    """
    chunk: _L | None = first
    seq = 0
    while chunk is not None:
        if chunk.node_id != first.node_id or chunk.upload_id != first.upload_id:
            raise InvalidRequestError(
                f"chunk {seq}: node_id/upload_id changed mid-stream "
                f"({chunk.node_id!r}/{chunk.upload_id!r}, expected "
                f"{first.node_id!r}/{first.upload_id!r})"
            )
        if chunk.seq != seq:
            raise InvalidRequestError(f"seq must be {seq} (chunks in order), got {chunk.seq}")
        yield chunk
        if chunk.last:
            extra = next(chunks, None)
            if extra is not None:
                raise InvalidRequestError(f"chunk after the one marked last (seq {extra.seq})")
            return
        seq += 1
        chunk = next(chunks, None)
    raise InvalidRequestError(
        f"{what} {first.upload_id!r} ended after {seq} chunk(s) without a chunk marked last "
        "(truncated stream); nothing was stored"
    )


def _check_id(value: str, field: str, pattern: re.Pattern[str]) -> None:
    if not pattern.fullmatch(value):  # whole string: "$" alone lets a trailing newline through
        raise InvalidRequestError(
            f"{field} must match {pattern.pattern} (letters, digits, '_', '.', '-'), got {value!r}"
        )


def validate_registration(reg: NodeRegistration) -> None:
    """Check every field of a registration; raise InvalidRequestError naming the bad one."""
    _check_id(reg.node_id, "node_id", NODE_ID_PATTERN)
    if not 1 <= reg.latent_dim <= MAX_LATENT_DIM:
        raise InvalidRequestError(
            f"latent_dim must be in 1..{MAX_LATENT_DIM}, got {reg.latent_dim}"
        )
    if not 2 <= reg.num_classes <= MAX_CLASSES:
        raise InvalidRequestError(f"num_classes must be in 2..{MAX_CLASSES}, got {reg.num_classes}")
    if not 0 <= reg.samples <= MAX_NODE_SAMPLES:
        raise InvalidRequestError(f"samples must be in 0..{MAX_NODE_SAMPLES}, got {reg.samples}")
    if reg.profile is not None:
        for name, value in vars(reg.profile).items():
            if not math.isfinite(value) or value < 0:
                raise InvalidRequestError(f"profile.{name} must be finite and >= 0, got {value}")
            if value > MAX_PROFILE_VALUE:
                raise InvalidRequestError(
                    f"profile.{name} must be <= {MAX_PROFILE_VALUE:g}, got {value}"
                )
        try:  # the scheduler's own rules (e.g. channel_gain > 0), checked before storing it
            device_for(reg)
        except AllocationError as exc:
            raise InvalidRequestError(f"profile: {exc}") from exc


def check_latents(latents: np.ndarray, latent_dim: int, field: str) -> None:
    """Check decoded latents: 2-D, ``latent_dim`` columns, finite."""
    if latents.ndim != 2 or latents.shape[1] != latent_dim:
        raise InvalidRequestError(
            f"{field}.shape must be (n, {latent_dim}) for this node, got {list(latents.shape)}"
        )
    if not np.all(np.isfinite(latents)):
        bad = int(np.count_nonzero(~np.isfinite(latents)))
        raise InvalidRequestError(f"{field} contains {bad} NaN/Inf value(s); all must be finite")


class SplitLearningServer:
    """Registration, durable ingest, classification and status over one store."""

    def __init__(
        self,
        store: Store,
        *,
        limits: IngestLimits,
        classifier_mode: ClassifierMode,
        classifier_config: ClassifierConfig,
        cell: Cell | None = None,
        round_timeout_s: float = 600.0,
        seed: int = 0,
        aggregate_after: int = 0,
        retrain_min_interval_s: float = 0.0,
    ) -> None:
        self._store = store
        self._limits = limits
        self._hub = ModelHub(store)
        self._aggregate_after = aggregate_after
        self._trainer = _ClassifierTrainer(
            store, classifier_mode, classifier_config, seed, min_interval_s=retrain_min_interval_s
        )
        self._scheduler = RoundScheduler(store, cell, round_timeout_s=round_timeout_s)
        self._upload_locks: dict[str, tuple[threading.Lock, int]] = {}
        self._upload_locks_guard = threading.Lock()

    @property
    def store(self) -> Store:
        """The durable store."""
        return self._store

    @property
    def hub(self) -> ModelHub:
        """Base model versions and fine-tuning deltas."""
        return self._hub

    def start(self) -> None:
        """Load the newest stored classifier and start the background trainer."""
        self._trainer.start()

    def stop(self) -> None:
        """Stop the background trainer (waits for a running training to finish)."""
        self._trainer.stop()

    # -- requests -----------------------------------------------------------------------------

    def register(self, reg: NodeRegistration) -> int:
        """Register a node; return the samples already stored for it."""
        validate_registration(reg)
        stored = self._store.register_node(reg, max_nodes=self._limits.max_nodes)
        if reg.reset:
            self._trainer.notify()
        return stored

    def ingest(self, chunks: Iterator[LatentChunk]) -> UploadAck:
        """Validate and durably store one streamed upload; return its acknowledgement.

        Nothing is visible (and nothing partial survives) unless the whole stream is valid
        and ends with a chunk marked ``last``. A re-sent, already committed upload id is
        drained and acknowledged with ``deduplicated=True``.
        """
        first, node = self._open_stream(chunks, "upload")
        # One stream per upload_id at a time: a client retry that overlaps its own earlier
        # attempt waits for it, then finds it committed (dedupe) or aborted (stores it).
        with self._upload_lock(first.upload_id):
            done = self._replayed(
                first, node, chunks, self._store.committed_ack(first.upload_id), _latent_bytes
            )
            if done is not None:
                return done
            self._store.begin_upload(first.upload_id, node.node_id, first.mode)
            with _aborting(self._store.abort_upload, first.upload_id):
                ack = self._stage_and_commit(first, chunks, node)
        self._trainer.notify()
        return ack

    def _open_stream(self, chunks: Iterator[_C], what: str) -> tuple[_C, NodeRegistration]:
        """The first chunk of a stream (ids checked, seq 0) and its registered node."""
        first = next(chunks, None)
        if first is None:
            raise InvalidRequestError(f"empty {what} stream: expected chunks starting at seq 0")
        _check_id(first.node_id, "node_id", NODE_ID_PATTERN)
        _check_id(first.upload_id, "upload_id", UPLOAD_ID_PATTERN)
        if first.seq != 0:
            raise InvalidRequestError(f"seq of the first chunk must be 0, got {first.seq}")
        return first, self._store.get_node(first.node_id)

    def _replayed(
        self,
        first: _C,
        node: NodeRegistration,
        chunks: Iterator[_C],
        done: tuple[str, _P] | None,
        size: Callable[[_C], int],
    ) -> _P | None:
        """The original ack when ``first.upload_id`` is committed (the re-sent stream drained).

        The drain is bounded: it stops after the original upload's payload bytes or
        ``dedupe_drain_timeout_s`` seconds, and the ack goes out without reading the rest.
        """
        if done is None:
            return None
        owner, ack = done
        if owner != node.node_id:
            raise ConflictError(
                f"upload_id {first.upload_id!r} belongs to node {owner!r}; choose a new upload_id"
            )
        # drain the re-sent stream (nothing is stored twice), but not forever
        limit_s = self._limits.dedupe_drain_timeout_s
        deadline = time.monotonic() + limit_s
        drained = size(first)
        for chunk in chunks:
            drained += size(chunk)
            if drained > ack.payload_bytes or time.monotonic() > deadline:
                logger.info(
                    "upload %s of %s already committed: stopped draining the re-sent stream "
                    "after %d bytes (original %d bytes, server.dedupe_drain_timeout_s = %g)",
                    first.upload_id,
                    owner,
                    drained,
                    ack.payload_bytes,
                    limit_s,
                )
                break
        logger.info("upload %s of %s already committed: deduplicated", first.upload_id, owner)
        return ack

    @contextlib.contextmanager
    def _upload_lock(self, upload_id: str) -> Iterator[None]:
        with self._upload_locks_guard:
            lock, users = self._upload_locks.get(upload_id, (threading.Lock(), 0))
            self._upload_locks[upload_id] = (lock, users + 1)
        try:
            started = time.monotonic()
            if not lock.acquire(timeout=UPLOAD_LOCK_WAIT_S):
                raise BusyError(
                    f"upload_id {upload_id!r} is still being received on another stream; "
                    "retry shortly"
                )
            try:
                # and across the server replicas sharing the store
                left_s = max(0.0, UPLOAD_LOCK_WAIT_S - (time.monotonic() - started))
                with self._store.upload_guard(upload_id, left_s):
                    yield
            finally:
                lock.release()
        finally:
            with self._upload_locks_guard:
                lock, users = self._upload_locks[upload_id]
                if users == 1:
                    del self._upload_locks[upload_id]
                else:
                    self._upload_locks[upload_id] = (lock, users - 1)

    def schedule(self, node_id: str) -> Schedule:
        """This round's upload decision and bandwidth for ``node_id``."""
        _check_id(node_id, "node_id", NODE_ID_PATTERN)
        return self._scheduler.schedule(node_id)

    def _stage_and_commit(
        self, first: LatentChunk, chunks: Iterator[LatentChunk], node: NodeRegistration
    ) -> UploadAck:
        samples = payload = count = 0
        # what the node keeps besides this upload (checked again, exactly, at commit)
        kept = (
            self._store.node_payload_bytes(node.node_id) if first.mode is UploadMode.APPEND else 0
        )
        for seq, chunk in enumerate(_in_order(first, chunks, "upload")):
            n = self._validate_chunk(chunk, node, seq)
            payload += chunk.latents.nbytes + chunk.labels.nbytes
            self._check_size(first.upload_id, payload, seq)
            if kept + payload > self._limits.max_node_bytes:
                raise TooLargeError(
                    f"upload {first.upload_id!r} would take node {node.node_id!r} to "
                    f"{kept + payload} bytes stored ({kept} kept + {payload} so far, at chunk "
                    f"{seq}), over server.max_node_bytes = {self._limits.max_node_bytes}; "
                    "nothing of it was stored"
                )
            self._store.put_chunk(first.upload_id, seq, chunk.latents, chunk.labels, n)
            samples += n
            count = seq + 1
        if first.total_samples and samples != first.total_samples:
            raise InvalidRequestError(
                f"total_samples declared {first.total_samples}, stream carried {samples}"
            )
        if samples == 0:  # would replace the node's data with nothing
            raise InvalidRequestError(
                f"upload {first.upload_id!r} carried no samples; nothing was stored and the "
                "node's data is unchanged"
            )
        return self._store.commit_upload(
            first.upload_id,
            count,
            max_node_bytes=self._limits.max_node_bytes,
            num_classes=node.num_classes,
        )

    def _check_size(self, upload_id: str, payload: int, seq: int) -> None:
        if payload > self._limits.max_upload_bytes:
            raise TooLargeError(
                f"upload {upload_id!r} exceeds max_upload_bytes={self._limits.max_upload_bytes} "
                f"at chunk {seq} ({payload} bytes so far; config key server.max_upload_bytes)"
            )

    def _validate_chunk(self, chunk: LatentChunk, node: NodeRegistration, seq: int) -> int:
        if chunk.latents.dtype not in _LATENT_DTYPES:
            raise InvalidRequestError(
                f"chunk {seq}: latents.dtype must be one of {list(_LATENT_DTYPES)}, "
                f"got {chunk.latents.dtype!r}"
            )
        if chunk.labels.dtype not in _LABEL_DTYPES:
            raise InvalidRequestError(
                f"chunk {seq}: labels.dtype must be one of {list(_LABEL_DTYPES)}, "
                f"got {chunk.labels.dtype!r}"
            )
        try:
            # read-only views of the received bytes: every value is checked, none copied
            # (scaled int8 stays int8 here; its scale was checked, so scaled values are finite)
            latents = wire_view(chunk.latents, "latents")
            labels = wire_view(chunk.labels, "labels")
        except CodecError as exc:
            raise InvalidRequestError(f"chunk {seq}: {exc}") from exc
        check_latents(latents, node.latent_dim, f"chunk {seq}: latents")
        if labels.ndim != 1 or labels.shape[0] != latents.shape[0]:
            raise InvalidRequestError(
                f"chunk {seq}: labels.shape must be ({latents.shape[0]},) to match latents, "
                f"got {list(labels.shape)}"
            )
        if labels.size and (labels.min() < 0 or labels.max() >= node.num_classes):
            raise InvalidRequestError(
                f"chunk {seq}: labels must be in [0, {node.num_classes}) for node "
                f"{node.node_id!r}, got values in [{labels.min()}, {labels.max()}]"
            )
        return int(latents.shape[0])

    def classify(self, node_id: str, latents_wire: WireTensor) -> Prediction:
        """Classify latents from ``node_id``'s encoder with the current classifier."""
        _check_id(node_id, "node_id", NODE_ID_PATTERN)
        node = self._store.get_node(node_id)
        if latents_wire.dtype not in _LATENT_DTYPES:
            raise InvalidRequestError(
                f"latents.dtype must be one of {list(_LATENT_DTYPES)}, got {latents_wire.dtype!r}"
            )
        try:
            latents = from_wire(latents_wire, "latents")
        except CodecError as exc:
            raise InvalidRequestError(str(exc)) from exc
        check_latents(latents, node.latent_dim, "latents")
        rows = latents.shape[0]
        per_row = 4 * node.num_classes + 8  # float32 probabilities + an int64 label
        fit = CLASSIFY_REPLY_BYTES // per_row  # ≥ 2 classes: at most ~520k rows
        if rows > fit:
            raise TooLargeError(
                f"latents has {rows} rows; the reply ({node.num_classes} class probabilities a "
                f"row) must fit {CLASSIFY_REPLY_BYTES} bytes: send at most {fit} rows per call"
            )
        version, classifier = self._trainer.current()
        if classifier is None or node_id not in classifier.node_ids:
            raise ConflictError(
                f"no trained classifier covers node {node_id!r} yet; upload its latents and "
                "wait until status shows it in classifier.nodes"
            )
        if classifier.latent_dim_of(node_id) != node.latent_dim:
            raise ConflictError(
                f"the classifier for node {node_id!r} was trained on latent_dim="
                f"{classifier.latent_dim_of(node_id)}, the node now registers {node.latent_dim}; "
                "upload latents of the new size first"
            )
        labels, probs = classifier.predict(node_id, latents.astype(np.float32, copy=False))
        return Prediction(labels=labels, probabilities=probs, classifier_version=version)

    def status(self, *, page_size: int = 0, page_token: str = "") -> ServerStatus:
        """Nodes (one page, by id), classifier, the last plan and the base model versions.

        Raises:
            InvalidRequestError: ``page_size`` over :data:`MAX_STATUS_PAGE` or a malformed token.
        """
        if not 0 <= page_size <= MAX_STATUS_PAGE:
            raise InvalidRequestError(
                f"page_size must be in 0..{MAX_STATUS_PAGE} (0 = the most), got {page_size}"
            )
        if page_token:
            _check_id(page_token, "page_token", NODE_ID_PATTERN)
        size = page_size or MAX_STATUS_PAGE
        nodes = self._store.list_nodes(after=page_token, limit=size + 1)  # one more: a next page?
        page = nodes[:size]
        plan = self._store.last_plan()
        return ServerStatus(
            nodes=tuple(page),
            classifier=self._trainer.status(),
            last_plan_json=plan[1] if plan else "",
            models=tuple(self._hub.versions()),
            next_page_token=page[-1].node_id if len(nodes) > size else "",
        )

    def remove_node(self, node_id: str) -> tuple[int, int]:
        """Delete ``node_id`` and its data; the classifier retrains without it.

        Returns:
            The committed samples and deltas deleted.

        Raises:
            NotFoundError: unknown node.
        """
        _check_id(node_id, "node_id", NODE_ID_PATTERN)
        removed = self._store.remove_node(node_id)
        self._trainer.notify()
        logger.info("removed node %s (%d samples, %d deltas)", node_id, *removed)
        return removed

    # -- transfer learning --------------------------------------------------------------------

    def model(self, node_id: str, *, version: int = 0, fine_tuned_for: str = "") -> ServedModel:
        """The model a node asks for: a base version (0 = current) or a node's fine-tuned one."""
        if node_id:
            _check_id(node_id, "node_id", NODE_ID_PATTERN)
        if fine_tuned_for:
            _check_id(fine_tuned_for, "fine_tuned_for", NODE_ID_PATTERN)
            if version:
                raise InvalidRequestError("give either version or fine_tuned_for, not both")
            return self._hub.fine_tuned(fine_tuned_for)
        return self._hub.base(version)

    def aggregate(self, min_nodes: int = 0) -> ModelVersion:
        """Average the pending deltas into the next base version.

        Raises:
            ConflictError: fewer than ``min_nodes`` (at least 1) nodes sent a delta against the
                current base.
        """
        made = self._hub.aggregate(max(1, min_nodes))
        if made is None:
            pending = len(self._hub.pending())
            raise ConflictError(
                f"{pending} node(s) sent a delta against base version "
                f"{self._hub.current_version()}; need at least {max(1, min_nodes)} to aggregate"
            )
        return made

    def ingest_delta(self, chunks: Iterator[DeltaChunk]) -> DeltaAck:
        """Validate and durably store one streamed fine-tuning delta; return its ack.

        The same rules as latents: nothing is visible unless the whole stream is valid and ends
        with a chunk marked ``last``; a re-sent committed upload id is drained and acknowledged
        with ``deduplicated=True``. The delta must name an existing base version with its hash;
        every tensor must name a base tensor, fit its shape and be finite.
        """
        first, node = self._open_stream(chunks, "delta")
        with self._upload_lock(first.upload_id):
            done = self._replayed(
                first, node, chunks, self._store.committed_delta_ack(first.upload_id), _delta_bytes
            )
            if done is not None:
                return replace(done, current_version=self._hub.current_version())
            if not 1 <= first.samples <= MAX_DELTA_SAMPLES:
                raise InvalidRequestError(
                    f"samples must be in 1..{MAX_DELTA_SAMPLES} (the training samples behind "
                    f"the delta), got {first.samples}"
                )
            if not first.trainable.isprintable():
                raise InvalidRequestError(
                    f"trainable must be printable text (the fine-tuned subset, e.g. 'head'), "
                    f"got {first.trainable[:64]!r}"
                )
            base = self._hub.check_base(first.base_version, first.base_hash)
            self._store.begin_delta(
                first.upload_id,
                node.node_id,
                base_version=base.version,
                samples=first.samples,
                trainable=first.trainable[:64],
            )
            with _aborting(self._store.abort_delta, first.upload_id):
                ack = self._stage_delta(first, chunks, base)
        current = self._hub.current_version()
        if ack.base_version != current:
            logger.warning(
                "delta %s of %s is on base v%d but v%d is current: it serves the node's own "
                "model and is not part of the next aggregation",
                ack.upload_id,
                node.node_id,
                ack.base_version,
                current,
            )
        if self._aggregate_after and len(self._hub.pending()) >= self._aggregate_after:
            made = self._hub.aggregate(self._aggregate_after)
            current = made.version if made is not None else self._hub.current_version()
        return replace(ack, current_version=current)

    def _stage_delta(
        self, first: DeltaChunk, chunks: Iterator[DeltaChunk], base: ServedModel
    ) -> DeltaAck:
        payload = count = 0
        names: set[str] = set()
        for seq, chunk in enumerate(_in_order(first, chunks, "delta")):
            if not chunk.tensors and not chunk.last:
                raise InvalidRequestError(f"chunk {seq} carries no tensors (only the last may)")
            for entry in chunk.tensors:
                if entry.name in names:
                    raise InvalidRequestError(
                        f"chunk {seq}: tensor {entry.name!r} appears twice in the delta"
                    )
                names.add(entry.name)
            self._hub.check_entries(base, chunk.tensors, seq)
            payload += stats(chunk.tensors).payload_bytes
            self._check_size(first.upload_id, payload, seq)
            self._store.put_delta_chunk(first.upload_id, seq, list(chunk.tensors))
            count = seq + 1
        if not names:
            raise InvalidRequestError("the delta carries no tensors")
        if first.total_tensors and len(names) != first.total_tensors:
            raise InvalidRequestError(
                f"total_tensors declared {first.total_tensors}, stream carried {len(names)}"
            )
        return self._store.commit_delta(first.upload_id, count)


class _ClassifierTrainer:
    """Retrains the classifier in a daemon thread whenever committed latents change.

    Debounced: a training starts at least ``min_interval_s`` after the previous one ended, so
    a stream of small uploads cannot keep a core busy; changes that arrive meanwhile are all
    covered by the next training (the last upload always leads to one).
    """

    def __init__(
        self,
        store: Store,
        mode: ClassifierMode,
        config: ClassifierConfig,
        seed: int,
        *,
        min_interval_s: float = 0.0,
    ) -> None:
        if min_interval_s < 0:
            raise ConfigError(f"server.retrain_min_interval_s must be >= 0, got {min_interval_s}")
        self._store = store
        self._mode = mode
        self._config = config
        self._seed = seed
        self._min_interval_s = min_interval_s
        self._not_before = 0.0
        """Monotonic time before which no training starts (the debounce)."""
        self._halt = threading.Event()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._pending = False
        self._version = 0
        self._classifier: LatentClassifier | None = None
        self._meta: dict[str, object] = {}
        self._trained_at = 0.0
        self._trained_data_version = -1
        self._thread = threading.Thread(target=self._loop, name="classifier-trainer", daemon=True)

    def start(self) -> None:
        self._adopt_newer()
        if self._store.data_version() != self._trained_data_version:
            self.notify()
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._halt.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=60)

    def notify(self) -> None:
        with self._lock:
            self._pending = True
        self._wake.set()

    def current(self) -> tuple[int, LatentClassifier | None]:
        with self._lock:
            return self._version, self._classifier

    def status(self) -> ClassifierStatus:
        with self._lock:
            meta = self._meta
            nodes = meta.get("nodes", [])
            return ClassifierStatus(
                version=self._version,
                mode=str(meta.get("mode", "")),
                nodes=tuple(str(n) for n in nodes) if isinstance(nodes, list) else (),
                samples=int(str(meta.get("samples", 0))),
                train_accuracy=float(str(meta.get("train_accuracy", 0.0))),
                trained_at=self._trained_at,
                training=self._pending,
            )

    def _adopt_newer(self) -> None:
        """Serve the newest stored classifier when it is newer than ours (another replica's)."""
        if self._store.classifier_version() <= self._version:
            return
        latest = self._store.latest_classifier()
        if latest is None or latest[0] <= self._version:
            return
        version, meta, blob, trained_at = latest
        classifier = LatentClassifier.from_bytes(blob)
        with self._lock:
            self._classifier = classifier
            self._version, self._meta, self._trained_at = version, meta, trained_at
            self._trained_data_version = int(str(meta.get("data_version", -1)))
        logger.info("loaded classifier version %d (%s)", version, meta.get("mode"))

    def _caught_up(self) -> bool:
        """Whether the classifier served covers the stored data (adopting a newer one first)."""
        self._adopt_newer()
        done = self._store.data_version() == self._trained_data_version
        if done:
            with self._lock:
                self._pending = False
        return done

    def _loop(self) -> None:
        # On a store that replicas share, uploads through the others change the data too:
        # look every SHARED_POLL_S for their changes and for classifiers they trained.
        poll_s = SHARED_POLL_S if self._store.shared else None
        while not self._stopping:
            woke = self._wake.wait(poll_s)
            if self._stopping:
                return
            if not woke:
                try:
                    if self._caught_up():
                        continue
                except LatentEdgeError:
                    logger.warning(
                        "could not read the shared store; will look again", exc_info=True
                    )
                    continue
            delay = self._not_before - time.monotonic()
            if delay > 0 and self._halt.wait(delay):  # debounce; notifications accumulate
                return
            self._wake.clear()
            if self._stopping:
                return
            try:
                self._train_once()
            except LatentEdgeError:
                logger.exception("classifier training failed; will retry on the next upload")
                with self._lock:
                    self._pending = False
            except Exception:
                logger.exception("unexpected error while training the classifier")
                with self._lock:
                    self._pending = False

    def _train_once(self) -> None:
        with self._store.training_lease() as mine:
            if not mine:  # another replica is training: its result is adopted when stored
                with self._lock:
                    self._pending = True
                return
            if self._store.shared and self._caught_up():  # another replica trained this data
                return
            self._train_locked()

    def _train_locked(self) -> None:
        data_version = self._store.data_version()
        if data_version == self._trained_data_version:  # a late wake-up: nothing new
            with self._lock:
                self._pending = False
            return
        # each node's latents are read from the store a block at a time while training, so
        # the trainer's memory does not grow with the data stored
        data: dict[str, LatentBlocks] = {}
        num_classes: dict[str, int] = {}
        for node in self._store.list_nodes():
            if node.samples > 0:
                data[node.node_id] = self._store.node_blocks(
                    node.node_id, block_rows_for(node.latent_dim)
                )
                num_classes[node.node_id] = node.num_classes
        if not data:
            with self._lock:
                self._pending = self._store.data_version() != data_version
            return
        started = time.perf_counter()
        try:
            classifier = train_classifier(
                data, num_classes, self._mode, self._config, seed=self._seed
            )
        except StoreError:
            if self._store.data_version() == data_version:
                raise
            # a node's data was replaced or removed while its blocks were being read: the
            # change that did it also asked for a retraining, which reads the new data
            logger.info("stored latents changed while training; training again on the new data")
            self._wake.set()
            return
        finally:
            self._not_before = time.monotonic() + self._min_interval_s
        summary = classifier.summary()
        meta: dict[str, object] = {
            "mode": self._mode.value,
            "nodes": sorted(classifier.node_ids),  # a node whose data failed is left out
            "samples": int(sum(data[n].samples for n in classifier.node_ids)),
            "train_accuracy": float(summary.get("train_accuracy", 0.0)),
            "data_version": data_version,
        }
        version = self._store.save_classifier(meta, classifier.to_bytes())
        with self._lock:
            self._classifier = classifier
            self._version = version
            self._meta = meta
            self._trained_at = time.time()
            self._trained_data_version = data_version
            # more data arrived while training: go again
            self._pending = self._store.data_version() != data_version
            if self._pending:
                self._wake.set()
        logger.info(
            "trained classifier v%d (%s) on %d samples from %d node(s) in %.2f s",
            version,
            self._mode.value,
            meta["samples"],
            len(data),
            time.perf_counter() - started,
        )
