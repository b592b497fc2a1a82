"""Durable storage of nodes, uploads, latents, classifiers and allocation plans.

:class:`Store` is the interface. :class:`SqlStore` holds everything both SQL backends share (the
SQL itself is written once, in the dialect SQLite and PostgreSQL both accept); each backend
brings its connections, transactions, schema and start-up sweep:

- :class:`SqliteStore`, the embedded default: SQLite in WAL mode (``synchronous=FULL``, so a
  commit that returned survives a crash of the process) for metadata, and append-only segment
  files beside it (:mod:`server.segments`) for the payload bytes of latent and delta chunks,
  so each payload byte is written once, not twice through the write-ahead log.
- :class:`server.store_postgres.PostgresStore` (``postgresql://`` URLs), for several server
  replicas on one database: payloads in the database, or in a segment directory every replica
  shares (``--payload-dir``).

Uploads are staged chunk by chunk (so ingest memory stays flat): the chunk's bytes are appended
to the upload's segment (or, without segments, written in an invisible row) and its metadata
row waits in memory until the commit. An upload becomes visible only when
:meth:`Store.commit_upload` marks it committed in one durable transaction, and only after the
segment file (and, when the segment is new, its directory) was fsync'd: an acknowledged
upload's bytes are on disk before its metadata is. Staged chunks and segments of an upload that
never committed are invisible and are swept at start-up (segment files no row names are
deleted) or when the same upload id starts again.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import json
import logging
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from typing_extensions import override

from common.delta import DeltaEntry, pack_entries, stats, unpack_entries
from common.errors import (
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    StoreError,
    TooLargeError,
)
from common.records import (
    DeltaAck,
    EnergyProfile,
    ModelVersion,
    NodeRegistration,
    NodeStatus,
    StoredDelta,
    TokenRecord,
    UploadAck,
    UploadMode,
)
from common.tensors import WireTensor, from_wire
from server.segments import SegmentDir, SegmentRef, SegmentWriter, segment_dir_for

logger = logging.getLogger(__name__)

_LATENT_KIND = "latents"
_DELTA_KIND = "deltas"
"""``segments.kind`` of latent and of delta payloads."""


@dataclass(frozen=True)
class LatentBlocks:
    """A node's committed latents, read one block at a time (memory bounded by a block).

    Blocks are groups of whole stored chunks of at most ``max_rows`` rows (a single chunk
    larger than that is a block of its own). The set of chunks is fixed when the object is
    made; reading a block after the node's data was replaced or removed raises StoreError.
    """

    node_id: str
    """The node."""
    latent_dim: int
    """Latent elements per row."""
    block_rows: tuple[int, ...]
    """Rows of each block, in stored order."""
    read_block: Callable[[int], tuple[np.ndarray, np.ndarray]]
    """Block index -> (latents float32 (rows, latent_dim), labels int64 (rows,))."""

    @property
    def samples(self) -> int:
        """Rows in all blocks."""
        return sum(self.block_rows)

    def block(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Latents float32 ``(rows, latent_dim)`` and labels int64 ``(rows,)`` of one block."""
        return self.read_block(index)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY,
    latent_dim INTEGER NOT NULL,
    num_classes INTEGER NOT NULL,
    declared_samples INTEGER NOT NULL,
    profile_json TEXT,
    registered_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS uploads (
    upload_id TEXT PRIMARY KEY,
    node_id TEXT NOT NULL,
    mode TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('open', 'committed', 'superseded')),
    samples INTEGER NOT NULL DEFAULT 0,
    payload_bytes INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    committed_at REAL
);
CREATE INDEX IF NOT EXISTS uploads_by_node ON uploads (node_id, state);
CREATE TABLE IF NOT EXISTS chunks (
    upload_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    samples INTEGER NOT NULL,
    latent_dtype TEXT NOT NULL,
    latent_scale REAL NOT NULL,
    latent_dim INTEGER NOT NULL,
    latents BLOB NOT NULL,
    label_dtype TEXT NOT NULL,
    labels BLOB NOT NULL,
    PRIMARY KEY (upload_id, seq)
);
CREATE TABLE IF NOT EXISTS classifiers (
    version INTEGER PRIMARY KEY AUTOINCREMENT,
    meta_json TEXT NOT NULL,
    blob BLOB NOT NULL,
    trained_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('data_version', 0);
CREATE TABLE IF NOT EXISTS models (
    version INTEGER PRIMARY KEY,
    hash TEXT NOT NULL,
    parent_version INTEGER NOT NULL,
    source TEXT NOT NULL,
    nodes_json TEXT NOT NULL,
    samples INTEGER NOT NULL,
    blob BLOB NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS deltas (
    upload_id TEXT PRIMARY KEY,
    node_id TEXT NOT NULL,
    base_version INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('open', 'committed')),
    samples INTEGER NOT NULL,
    trainable TEXT NOT NULL,
    tensors INTEGER NOT NULL DEFAULT 0,
    params INTEGER NOT NULL DEFAULT 0,
    payload_bytes INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    committed_at REAL
);
CREATE INDEX IF NOT EXISTS deltas_by_node ON deltas (node_id, state);
CREATE TABLE IF NOT EXISTS delta_chunks (
    upload_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    tensors INTEGER NOT NULL,
    params INTEGER NOT NULL,
    payload_bytes INTEGER NOT NULL,
    blob BLOB NOT NULL,
    PRIMARY KEY (upload_id, seq)
);
CREATE TABLE IF NOT EXISTS plans (
    round INTEGER PRIMARY KEY,
    plan_json TEXT NOT NULL,
    created_at REAL NOT NULL
);
"""
"""Schema version 1: the first schema (databases written before versioning carry 0)."""

_MIGRATIONS: dict[int, str] = {
    2: """
CREATE TABLE IF NOT EXISTS tokens (
    token_id TEXT PRIMARY KEY,
    subject TEXT NOT NULL,
    admin INTEGER NOT NULL,
    salt BLOB NOT NULL,
    digest BLOB NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL
);
CREATE INDEX IF NOT EXISTS tokens_by_subject ON tokens (subject);
""",
    # Payload bytes move out of the database into segment files (server/segments.py). Rows
    # written before keep their inline blobs (segment_id NULL) and are read as before; new
    # rows carry empty blobs and where their bytes are. Nothing is copied, so the migration
    # is instant on any size; inline rows leave when their node's data is replaced or removed.
    3: """
ALTER TABLE chunks ADD COLUMN segment_id INTEGER;
ALTER TABLE chunks ADD COLUMN seg_offset INTEGER;
ALTER TABLE chunks ADD COLUMN seg_length INTEGER;
ALTER TABLE chunks ADD COLUMN seg_crc INTEGER;
ALTER TABLE delta_chunks ADD COLUMN segment_id INTEGER;
ALTER TABLE delta_chunks ADD COLUMN seg_offset INTEGER;
ALTER TABLE delta_chunks ADD COLUMN seg_length INTEGER;
ALTER TABLE delta_chunks ADD COLUMN seg_crc INTEGER;
CREATE TABLE IF NOT EXISTS segments (
    segment_id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL CHECK (kind IN ('latents', 'deltas')),
    upload_id TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS segments_by_upload ON segments (kind, upload_id);
""",
    # Replicas: which store instance opened an upload (its start-up sweep may discard only
    # the open uploads of instances that are gone), and the uploaders a round still waits for
    # (the scheduler's state lives in the database, so every replica serves the same round).
    4: """
ALTER TABLE uploads ADD COLUMN owner INTEGER;
ALTER TABLE deltas ADD COLUMN owner INTEGER;
ALTER TABLE segments ADD COLUMN owner INTEGER;
CREATE TABLE IF NOT EXISTS round_waiting (
    round INTEGER NOT NULL,
    node_id TEXT NOT NULL,
    PRIMARY KEY (round, node_id)
);
CREATE INDEX IF NOT EXISTS round_waiting_by_node ON round_waiting (node_id);
""",
}
"""Version -> the statements that turn the previous version into it (applied in order)."""

SCHEMA_VERSION = max(_MIGRATIONS)
"""The store schema this code writes (SQLite ``PRAGMA user_version``)."""


class Store(abc.ABC):
    """What the server needs from durable storage."""

    @abc.abstractmethod
    def register_node(self, reg: NodeRegistration, *, max_nodes: int | None = None) -> int:
        """Create or update a node; return the samples stored for it.

        Raises:
            ConflictError: changing ``latent_dim``/``num_classes`` while latents are stored
                (unless ``reg.reset``).
            TooLargeError: ``reg`` is a new node and ``max_nodes`` nodes are registered.
        """

    @abc.abstractmethod
    def get_node(self, node_id: str) -> NodeRegistration:
        """Return a registered node. Raises NotFoundError if unknown."""

    @abc.abstractmethod
    def list_nodes(self, *, after: str = "", limit: int = 0) -> list[NodeStatus]:
        """Registered nodes with what is stored for each, by node id.

        Only ids sorting after ``after``; at most ``limit`` of them (0 = all).
        """

    @abc.abstractmethod
    def committed_ack(self, upload_id: str) -> tuple[str, UploadAck] | None:
        """(node id, acknowledgement) of an already committed upload (for dedupe), else None."""

    @abc.abstractmethod
    def begin_upload(self, upload_id: str, node_id: str, mode: UploadMode) -> None:
        """Open (or re-open, discarding staged chunks) an upload."""

    @abc.abstractmethod
    def put_chunk(
        self, upload_id: str, seq: int, latents: WireTensor, labels: WireTensor, samples: int
    ) -> None:
        """Stage one validated chunk (durable, invisible until commit)."""

    @abc.abstractmethod
    def commit_upload(
        self,
        upload_id: str,
        chunks: int,
        *,
        max_node_bytes: int | None = None,
        num_classes: int | None = None,
    ) -> UploadAck:
        """Atomically make an upload's ``chunks`` staged chunks visible; return its ack.

        Raises:
            TooLargeError: the node would then hold more than ``max_node_bytes`` payload bytes
                (nothing changes; the upload stays open for the caller to abort).
        """

    @abc.abstractmethod
    def node_payload_bytes(self, node_id: str) -> int:
        """Payload bytes (latents + labels) of a node's committed uploads."""

    @abc.abstractmethod
    def abort_upload(self, upload_id: str) -> None:
        """Discard an open upload and its staged chunks."""

    @abc.abstractmethod
    def node_data(self, node_id: str) -> tuple[np.ndarray, np.ndarray]:
        """A node's committed latents (float32, (n, latent_dim)) and labels (int64, (n,))."""

    def node_blocks(self, node_id: str, max_rows: int) -> LatentBlocks:
        """A node's committed latents as blocks of at most ``max_rows`` rows (when chunks allow).

        This default reads everything with :meth:`node_data` and slices it; a backend that can
        read a chunk at a time overrides it, so that training memory does not grow with stored
        data.
        """
        x, y = self.node_data(node_id)
        rows = max(1, max_rows)
        starts = list(range(0, len(y), rows))
        return LatentBlocks(
            node_id=node_id,
            latent_dim=int(x.shape[1]),
            block_rows=tuple(min(rows, len(y) - s) for s in starts),
            read_block=lambda i: (x[starts[i] : starts[i] + rows], y[starts[i] : starts[i] + rows]),
        )

    @abc.abstractmethod
    def data_version(self) -> int:
        """A durable counter that grows whenever committed latents change (across restarts too)."""

    @abc.abstractmethod
    def save_classifier(self, meta: dict[str, object], blob: bytes) -> int:
        """Store a trained classifier; return its version (1, 2, ...)."""

    @abc.abstractmethod
    def latest_classifier(self) -> tuple[int, dict[str, object], bytes, float] | None:
        """(version, meta, blob, trained_at) of the newest classifier, or None."""

    @abc.abstractmethod
    def classifier_version(self) -> int:
        """Version of the newest stored classifier (0: none); cheap, no blob is read."""

    @abc.abstractmethod
    def save_plan(self, round_index: int, plan_json: str, waiting: Sequence[str] = ()) -> bool:
        """Store round ``round_index``'s plan and the uploaders it ``waiting`` for.

        Returns False (storing nothing) when the round already has a plan: another replica
        made it first, and every replica serves that one.
        """

    @abc.abstractmethod
    def last_plan(self) -> tuple[int, str] | None:
        """(round, plan JSON) of the newest plan, or None."""

    @abc.abstractmethod
    def round_state(self) -> RoundState | None:
        """The newest round: when its plan was made and how many uploaders it still awaits.

        A committed upload or delta of a node, or its removal, stops the rounds awaiting it.
        """

    # -- several server processes on one store -----------------------------------------------

    @property
    def shared(self) -> bool:
        """Whether other server processes may use the same store at the same time."""
        return False

    def upload_guard(
        self, upload_id: str, wait_s: float
    ) -> contextlib.AbstractContextManager[None]:
        """Held while one stream of ``upload_id`` is received, across every process on the store.

        The server also serialises the streams of one upload id inside its process; a store
        that replicas share makes that hold across them.

        Raises:
            BusyError: another process holds ``upload_id`` for longer than ``wait_s``.
        """
        return contextlib.nullcontext()

    def training_lease(self) -> contextlib.AbstractContextManager[bool]:
        """Enter to learn whether this process may train the classifier now (held inside).

        One process trains at a time; the others serve the newest stored version.
        """
        return contextlib.nullcontext(True)

    # -- transfer learning: base model versions and fine-tuning deltas -----------------------

    @abc.abstractmethod
    def add_model(
        self,
        blob: bytes,
        hash_hex: str,
        *,
        parent: int,
        source: str,
        nodes: tuple[str, ...] = (),
        samples: int = 0,
    ) -> ModelVersion:
        """Store a new base model version (the next number); return its record."""

    @abc.abstractmethod
    def get_model(self, version: int | None = None) -> tuple[ModelVersion, bytes] | None:
        """A base version and its file bytes (None = the newest); None when there is none."""

    @abc.abstractmethod
    def list_models(self) -> list[ModelVersion]:
        """Every base version, oldest first."""

    @abc.abstractmethod
    def committed_delta_ack(self, upload_id: str) -> tuple[str, DeltaAck] | None:
        """(node id, acknowledgement) of an already committed delta upload, else None."""

    @abc.abstractmethod
    def begin_delta(
        self, upload_id: str, node_id: str, *, base_version: int, samples: int, trainable: str
    ) -> None:
        """Open (or re-open, discarding staged chunks) a delta upload."""

    @abc.abstractmethod
    def put_delta_chunk(self, upload_id: str, seq: int, entries: list[DeltaEntry]) -> None:
        """Stage one validated chunk of delta entries (invisible until commit)."""

    @abc.abstractmethod
    def commit_delta(self, upload_id: str, chunks: int) -> DeltaAck:
        """Atomically make a delta upload's ``chunks`` staged chunks visible; return its ack."""

    @abc.abstractmethod
    def abort_delta(self, upload_id: str) -> None:
        """Discard an open delta upload and its staged chunks."""

    @abc.abstractmethod
    def latest_deltas(
        self, base_version: int | None = None, node_id: str | None = None
    ) -> list[StoredDelta]:
        """Each node's newest committed delta.

        Only deltas against ``base_version`` and only ``node_id``'s, when given.
        """

    @abc.abstractmethod
    def remove_node(self, node_id: str) -> tuple[int, int]:
        """Delete a node and everything stored for it; (committed samples, deltas) deleted.

        Raises:
            NotFoundError: unknown node.
        """

    @abc.abstractmethod
    def check(self) -> None:
        """Raise StoreError when the storage cannot serve (file removed or replaced, unreadable)."""

    @abc.abstractmethod
    def add_token(self, token: TokenRecord) -> None:
        """Store a new credential."""

    @abc.abstractmethod
    def find_token(self, token_id: str) -> TokenRecord | None:
        """The credential ``token_id`` (revoked ones too), None when unknown."""

    @abc.abstractmethod
    def revoke_tokens(self, *, subject: str = "", token_id: str = "") -> int:
        """Revoke the live credentials of ``subject`` or the one ``token_id``; how many."""

    @abc.abstractmethod
    def list_tokens(self) -> list[TokenRecord]:
        """Every credential, oldest first."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections."""


@dataclass(frozen=True)
class RoundState:
    """The newest scheduling round, as stored."""

    round: int
    """Round number (1, 2, ...)."""
    created_at: float
    """Wall-clock time its plan was stored (s since the epoch)."""
    waiting: int
    """Uploaders of the plan that have not committed an upload or delta since."""


class SqlStore(Store):
    """The store logic both SQL backends share; a backend supplies the plumbing.

    Subclasses give :meth:`_conn` (this thread's connection; ``execute`` takes ``?``
    placeholders), :meth:`_write` (a serialised write transaction), :meth:`check` and
    :meth:`close`, then call :meth:`_sweep_open_uploads` once the schema is there. Payload
    bytes go to ``segments`` when given, else into the chunk rows themselves.
    """

    _db_errors: tuple[type[Exception], ...] = (sqlite3.Error,)
    """The driver's exception classes, raised as StoreError by every operation."""

    def __init__(self, segments: SegmentDir | None, *, owner: int = 0) -> None:
        self._segments = segments
        self._owner = owner
        """This store instance's id in the ``owner`` column of the uploads it opens."""
        # the segment each open upload appends to, by (kind, upload id)
        self._writers: dict[tuple[str, str], SegmentWriter] = {}
        self._writers_lock = threading.Lock()
        self._staged_rows: dict[str, dict[int, _StagedRow]] = {}
        """Chunk rows of open uploads, by upload id and seq, inserted at commit (or in batches
        of :data:`STAGED_ROWS_MAX`): a chunk costs no transaction while it streams."""
        self._staged_lock = threading.Lock()

    # -- plumbing -----------------------------------------------------------------------------

    @abc.abstractmethod
    def _conn(self) -> Any:
        """This thread's connection (``execute(sql, params)`` with ``?`` placeholders)."""

    @abc.abstractmethod
    def _write(self, *, durable: bool = True) -> contextlib.AbstractContextManager[Any]:
        """A write transaction (one writer at a time); ``durable=False`` may skip the fsync."""

    def _dead_owners(self) -> list[int] | None:
        """Owners whose open uploads the start-up sweep may discard (None: every one)."""
        return None

    def _sweep_open_uploads(self) -> int:
        """Discard unfinished uploads of dead owners; reclaim segments no row references.

        Run at start-up, before any upload is served: a segment of an upload that was open
        (payload written, maybe fsync'd, metadata never committed) loses its row here, and
        then every file of the segment directory that no row names is deleted.
        """
        dead = self._dead_owners()
        params: list[int] = dead or []
        if dead is None:
            owned = ""
        elif not dead:
            owned = " AND FALSE"
        else:
            owned = f" AND owner IN ({', '.join('?' * len(dead))})"
        with self._write() as c:
            for uploads, chunks in (_LATENTS, _DELTAS):
                c.execute(
                    f"DELETE FROM {chunks} WHERE upload_id IN "
                    f"(SELECT upload_id FROM {uploads} WHERE state = 'open'{owned})",
                    params,
                )
            swept = sum(
                int(c.execute(f"DELETE FROM {t} WHERE state = 'open'{owned}", params).rowcount)
                for t in ("uploads", "deltas")
            )
            c.execute(
                "DELETE FROM segments WHERE segment_id NOT IN (SELECT segment_id FROM chunks "
                "WHERE segment_id IS NOT NULL UNION SELECT segment_id FROM delta_chunks "
                f"WHERE segment_id IS NOT NULL){owned}",
                params,
            )
        if self._segments is not None:
            # the files are listed before the rows are read: a replica's new segment has its
            # row committed before its file exists, so no live file is taken for an orphan
            files, freed = self._segments.sweep(self._segment_ids)
            if files:
                logger.info(
                    "reclaimed %d orphaned segment file(s), %d bytes, left by an earlier run",
                    files,
                    freed,
                )
        return swept

    def _segment_ids(self) -> set[int]:
        return {int(r[0]) for r in self._conn().execute("SELECT segment_id FROM segments")}

    # -- segments -----------------------------------------------------------------------------

    def _new_segment(self, c: Any, kind: str, upload_id: str) -> list[int]:
        """Give ``upload_id`` a fresh segment (with segments); the ids of those it had before."""
        old = [
            int(r[0])
            for r in c.execute(
                "SELECT segment_id FROM segments WHERE kind = ? AND upload_id = ?",
                (kind, upload_id),
            )
        ]
        c.execute("DELETE FROM segments WHERE kind = ? AND upload_id = ?", (kind, upload_id))
        if self._segments is not None:
            c.execute(
                "INSERT INTO segments (kind, upload_id, created_at, owner) VALUES (?, ?, ?, ?)",
                (kind, upload_id, time.time(), self._owner),
            )
        return old

    def _writer(self, kind: str, upload_id: str) -> SegmentWriter:
        """The open upload's segment writer (opened on first use)."""
        assert self._segments is not None
        key = (kind, upload_id)
        with self._writers_lock:
            writer = self._writers.get(key)
            if writer is not None:
                return writer
            row = (
                self._conn()
                .execute(
                    "SELECT MAX(segment_id) FROM segments WHERE kind = ? AND upload_id = ?",
                    (kind, upload_id),
                )
                .fetchone()
            )
            if row is None or row[0] is None:
                raise ConflictError(f"upload_id {upload_id!r} is not open (no segment)")
            writer = self._segments.writer(int(row[0]))
            self._writers[key] = writer
            return writer

    def _sync_segment(self, kind: str, upload_id: str) -> None:
        """Fsync the upload's segment (file, and directory when new) before its commit."""
        with self._writers_lock:
            writer = self._writers.get((kind, upload_id))
        if writer is not None:
            writer.sync()

    def _release(self, kind: str, upload_id: str, removed: list[int]) -> None:
        """After a transaction: close the upload's writer, delete the segments it removed.

        The writer's own segment goes too when no row names it any more (the upload was
        aborted, or removed with its node while streaming).
        """
        with self._writers_lock:
            writer = self._writers.pop((kind, upload_id), None)
        if writer is not None:
            writer.close()
            row = (
                self._conn()
                .execute("SELECT 1 FROM segments WHERE segment_id = ?", (writer.segment_id,))
                .fetchone()
            )
            if row is None and writer.segment_id not in removed:
                removed = [*removed, writer.segment_id]
        self._free(removed)

    def _free(self, segment_ids: list[int]) -> None:
        if segment_ids and self._segments is not None:
            freed = self._segments.remove(segment_ids)
            logger.debug("deleted %d segment(s), %d bytes", len(segment_ids), freed)

    def _read_payload(self, ref: SegmentRef) -> bytes:
        if self._segments is None:
            raise StoreError(
                f"a stored chunk is in segment {ref.segment_id}, but this store was opened "
                "without a payload directory (give the --payload-dir it was written with)"
            )
        return self._segments.read(ref)

    def _stored_samples(self, c: Any, node_id: str) -> int:
        row = c.execute(
            "SELECT COALESCE(SUM(samples), 0) FROM uploads "
            "WHERE node_id = ? AND state = 'committed'",
            (node_id,),
        ).fetchone()
        return int(row[0])

    # -- nodes --------------------------------------------------------------------------------

    @override
    def register_node(self, reg: NodeRegistration, *, max_nodes: int | None = None) -> int:
        profile_json = json.dumps(asdict(reg.profile)) if reg.profile is not None else None
        dropped: list[int] = []
        with self._write() as c:
            row = c.execute(
                "SELECT latent_dim, num_classes FROM nodes WHERE node_id = ?", (reg.node_id,)
            ).fetchone()
            if row is None and max_nodes is not None:
                (count,) = c.execute("SELECT COUNT(*) FROM nodes").fetchone()
                if int(count) >= max_nodes:
                    raise TooLargeError(
                        f"node {reg.node_id!r} not registered: the server holds {count} nodes, "
                        f"its limit (server.max_nodes = {max_nodes})"
                    )
            if reg.reset:
                dropped = self._drop_node_latents(c, reg.node_id)
                _bump_data_version(c)
            stored = self._stored_samples(c, reg.node_id)
            if (
                row is not None
                and stored > 0
                and (row[0], row[1])
                != (
                    reg.latent_dim,
                    reg.num_classes,
                )
            ):
                raise ConflictError(
                    f"node {reg.node_id!r} has {stored} samples stored with latent_dim={row[0]}, "
                    f"num_classes={row[1]}; got latent_dim={reg.latent_dim}, "
                    f"num_classes={reg.num_classes} "
                    "(register with reset to drop the stored latents)"
                )
            c.execute(
                "INSERT INTO nodes (node_id, latent_dim, num_classes, declared_samples, "
                "profile_json, registered_at) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(node_id) DO UPDATE SET latent_dim = excluded.latent_dim, "
                "num_classes = excluded.num_classes, declared_samples = excluded.declared_samples, "
                "profile_json = excluded.profile_json, registered_at = excluded.registered_at",
                (
                    reg.node_id,
                    reg.latent_dim,
                    reg.num_classes,
                    reg.samples,
                    profile_json,
                    time.time(),
                ),
            )
        self._free(dropped)  # a reset's superseded segments
        return stored

    def _drop_node_latents(self, c: Any, node_id: str) -> list[int]:
        """Supersede a node's committed uploads; the segment ids to delete after the commit."""
        dropped = [
            int(r[0])
            for r in c.execute(
                "SELECT segment_id FROM segments WHERE kind = ? AND upload_id IN "
                "(SELECT upload_id FROM uploads WHERE node_id = ? AND state = 'committed')",
                (_LATENT_KIND, node_id),
            )
        ]
        c.execute(
            "DELETE FROM chunks WHERE upload_id IN "
            "(SELECT upload_id FROM uploads WHERE node_id = ? AND state = 'committed')",
            (node_id,),
        )
        c.execute(
            "UPDATE uploads SET state = 'superseded' WHERE node_id = ? AND state = 'committed'",
            (node_id,),
        )
        _delete_segment_rows(c, dropped)
        return dropped

    @override
    def get_node(self, node_id: str) -> NodeRegistration:
        row = (
            self._conn()
            .execute(
                "SELECT latent_dim, num_classes, declared_samples, profile_json FROM nodes "
                "WHERE node_id = ?",
                (node_id,),
            )
            .fetchone()
        )
        if row is None:
            raise NotFoundError(f"node_id {node_id!r} is not registered; register it first")
        profile = EnergyProfile(**json.loads(row[3])) if row[3] else None
        return NodeRegistration(
            node_id=node_id,
            latent_dim=int(row[0]),
            num_classes=int(row[1]),
            samples=int(row[2]),
            profile=profile,
        )

    @override
    def list_nodes(self, *, after: str = "", limit: int = 0) -> list[NodeStatus]:
        rows = (
            self._conn()
            .execute(
                "SELECT n.node_id, n.latent_dim, n.num_classes, n.profile_json IS NOT NULL, "
                "COALESCE(SUM(u.samples), 0), COUNT(u.upload_id), "
                "COALESCE(SUM(u.payload_bytes), 0), "
                "(SELECT COUNT(*) FROM deltas d WHERE d.node_id = n.node_id "
                "AND d.state = 'committed'), "
                "(SELECT d.payload_bytes || ' ' || d.base_version FROM deltas d "
                "WHERE d.node_id = n.node_id AND d.state = 'committed' "
                "ORDER BY d.committed_at DESC, d.upload_id DESC LIMIT 1) "
                "FROM nodes n LEFT JOIN uploads u "
                "ON u.node_id = n.node_id AND u.state = 'committed' "
                "WHERE n.node_id > ? GROUP BY n.node_id ORDER BY n.node_id"
                + (" LIMIT ?" if limit else ""),
                (after, limit) if limit else (after,),
            )
            .fetchall()
        )
        return [
            NodeStatus(
                node_id=r[0],
                latent_dim=int(r[1]),
                num_classes=int(r[2]),
                has_profile=bool(r[3]),
                samples=int(r[4]),
                uploads=int(r[5]),
                payload_bytes=int(r[6]),
                deltas=int(r[7]),
                delta_bytes=int(str(r[8]).split()[0]) if r[8] else 0,
                delta_base_version=int(str(r[8]).split()[1]) if r[8] else 0,
            )
            for r in rows
        ]

    # -- uploads ------------------------------------------------------------------------------

    @override
    def committed_ack(self, upload_id: str) -> tuple[str, UploadAck] | None:
        c = self._conn()
        row = c.execute(
            "SELECT node_id, samples, payload_bytes FROM uploads "
            "WHERE upload_id = ? AND state != 'open'",
            (upload_id,),
        ).fetchone()
        if row is None:
            return None
        return str(row[0]), UploadAck(
            upload_id=upload_id,
            samples=int(row[1]),
            payload_bytes=int(row[2]),
            deduplicated=True,
            stored_samples=self._stored_samples(c, row[0]),
        )

    @override
    def begin_upload(self, upload_id: str, node_id: str, mode: UploadMode) -> None:
        self._take_staged(upload_id)
        with self._write() as c:
            _reopen(c, _LATENTS, upload_id, node_id)
            old = self._new_segment(c, _LATENT_KIND, upload_id)
            c.execute(
                "INSERT INTO uploads (upload_id, node_id, mode, state, created_at, owner) "
                "VALUES (?, ?, ?, 'open', ?, ?) ON CONFLICT (upload_id) DO UPDATE SET "
                "node_id = excluded.node_id, mode = excluded.mode, state = 'open', samples = 0, "
                "payload_bytes = 0, created_at = excluded.created_at, committed_at = NULL, "
                "owner = excluded.owner",
                (upload_id, node_id, mode.value, time.time(), self._owner),
            )
        self._release(_LATENT_KIND, upload_id, old)

    @override
    def put_chunk(
        self, upload_id: str, seq: int, latents: WireTensor, labels: WireTensor, samples: int
    ) -> None:
        if self._segments is None:  # payloads in the database: an invisible row of the open upload
            with self._write(durable=False) as c:
                c.execute(
                    _INSERT_CHUNK_ROW,
                    (
                        upload_id,
                        seq,
                        samples,
                        latents.dtype,
                        latents.scale,
                        latents.shape[1],
                        latents.data,
                        labels.dtype,
                        labels.data,
                        None,
                        None,
                        None,
                        None,
                    ),
                )
            return
        # the bytes as they arrived, appended once; only where they are goes to the database,
        # in the commit transaction (a crash before it leaves an unreferenced segment, which
        # the start-up sweep deletes, exactly as it did with rows of an open upload)
        ref = self._writer(_LATENT_KIND, upload_id).append((latents.data, labels.data))
        row: _StagedRow = (
            upload_id,
            seq,
            samples,
            latents.dtype,
            latents.scale,
            latents.shape[1],
            b"",
            labels.dtype,
            b"",
            ref.segment_id,
            ref.offset_bytes,
            ref.length_bytes,
            ref.checksum,
        )
        with self._staged_lock:
            rows = self._staged_rows.setdefault(upload_id, {})
            rows[seq] = row
            batch = list(rows.values()) if len(rows) >= STAGED_ROWS_MAX else []
            if batch:
                rows.clear()
        if batch:  # memory stays bounded however many chunks an upload has
            with self._write(durable=False) as c:
                c.executemany(_INSERT_CHUNK_ROW, batch)

    def _take_staged(self, upload_id: str) -> list[_StagedRow]:
        """Forget the staged rows of ``upload_id``; return them."""
        with self._staged_lock:
            return list(self._staged_rows.pop(upload_id, {}).values())

    @override
    def commit_upload(
        self,
        upload_id: str,
        chunks: int,
        *,
        max_node_bytes: int | None = None,
        num_classes: int | None = None,
    ) -> UploadAck:
        # payload durable before the metadata that points at it commits
        self._sync_segment(_LATENT_KIND, upload_id)
        dropped: list[int] = []
        with self._write() as c:
            row = c.execute(
                "SELECT node_id, mode, state FROM uploads WHERE upload_id = ?", (upload_id,)
            ).fetchone()
            if row is None or row[2] != "open":
                raise ConflictError(f"upload_id {upload_id!r} is not open")
            node_id, mode = row[0], UploadMode(row[1])
            with self._staged_lock:
                staged = list(self._staged_rows.get(upload_id, {}).values())
            c.executemany(_INSERT_CHUNK_ROW, staged)
            have = c.execute(
                "SELECT COUNT(*), COALESCE(SUM(samples), 0), "
                "COALESCE(SUM(COALESCE(seg_length, LENGTH(latents) + LENGTH(labels))), 0) "
                "FROM chunks WHERE upload_id = ?",
                (upload_id,),
            ).fetchone()
            if int(have[0]) != chunks:
                raise InvalidRequestError(
                    f"upload {upload_id!r} has {have[0]} chunks staged, expected {chunks}"
                )
            (mismatched,) = c.execute(
                "SELECT COUNT(*) FROM chunks WHERE upload_id = ? AND latent_dim != "
                "(SELECT latent_dim FROM nodes WHERE node_id = ?)",
                (upload_id, node_id),
            ).fetchone()
            if mismatched:
                raise ConflictError(
                    f"node {node_id!r} changed its latent_dim while upload {upload_id!r} was "
                    "streaming; re-send the upload with latents of the registered size"
                )
            (registered,) = c.execute(
                "SELECT num_classes FROM nodes WHERE node_id = ?", (node_id,)
            ).fetchone()
            if num_classes is not None and int(registered) != num_classes:
                raise ConflictError(
                    f"node {node_id!r} changed num_classes from {num_classes} to {registered} "
                    f"while upload {upload_id!r} was streaming; re-send the upload"
                )
            kept = 0 if mode is UploadMode.REPLACE else self._payload_bytes(c, node_id)
            if max_node_bytes is not None and kept + int(have[2]) > max_node_bytes:
                raise TooLargeError(
                    f"upload {upload_id!r} would take node {node_id!r} to "
                    f"{kept + int(have[2])} bytes stored ({kept} kept + {have[2]}), over "
                    f"server.max_node_bytes = {max_node_bytes}; nothing of it was stored"
                )
            if mode is UploadMode.REPLACE:
                dropped = self._drop_node_latents(c, node_id)
            _bump_data_version(c)
            c.execute(
                "UPDATE uploads SET state = 'committed', samples = ?, payload_bytes = ?, "
                "committed_at = ? WHERE upload_id = ?",
                (int(have[1]), int(have[2]), time.time(), upload_id),
            )
            c.execute("DELETE FROM round_waiting WHERE node_id = ?", (node_id,))
            stored = self._stored_samples(c, node_id)
        self._take_staged(upload_id)
        self._release(_LATENT_KIND, upload_id, dropped)
        return UploadAck(
            upload_id=upload_id,
            samples=int(have[1]),
            payload_bytes=int(have[2]),
            deduplicated=False,
            stored_samples=stored,
        )

    @override
    def abort_upload(self, upload_id: str) -> None:
        self._take_staged(upload_id)
        with self._write() as c:
            removed = _discard_open(c, _LATENTS, _LATENT_KIND, upload_id)
        self._release(_LATENT_KIND, upload_id, removed)

    @override
    def node_payload_bytes(self, node_id: str) -> int:
        return self._payload_bytes(self._conn(), node_id)

    @staticmethod
    def _payload_bytes(c: Any, node_id: str) -> int:
        (total,) = c.execute(
            "SELECT COALESCE(SUM(payload_bytes), 0) FROM uploads "
            "WHERE node_id = ? AND state = 'committed'",
            (node_id,),
        ).fetchone()
        return int(total)

    def _chunk_rows(self, node_id: str) -> list[_ChunkRow]:
        """Metadata of a node's committed chunks, in upload then chunk order (no payload)."""
        rows = self._conn().execute(
            "SELECT ch.upload_id, ch.seq, ch.samples, ch.latent_dtype, ch.latent_scale, "
            "ch.latent_dim, "
            "ch.label_dtype, ch.segment_id, ch.seg_offset, ch.seg_length, ch.seg_crc "
            "FROM chunks ch JOIN uploads u ON u.upload_id = ch.upload_id "
            "WHERE u.node_id = ? AND u.state = 'committed' ORDER BY u.committed_at, ch.seq",
            (node_id,),
        )
        return [
            _ChunkRow(
                upload_id=str(r[0]),
                seq=int(r[1]),
                samples=int(r[2]),
                latent_dtype=str(r[3]),
                latent_scale=float(r[4]),
                latent_dim=int(r[5]),
                label_dtype=str(r[6]),
                ref=None
                if r[7] is None
                else SegmentRef(int(r[7]), int(r[8]), int(r[9]), int(r[10])),
            )
            for r in rows
        ]

    def _read_chunk(self, row: _ChunkRow) -> tuple[np.ndarray, np.ndarray]:
        """One chunk's latents (float32) and labels (int64), from its segment or inline."""
        if row.ref is None:  # bytes inline (no payload directory, or written before schema 3)
            found = (
                self._conn()
                .execute(
                    "SELECT latents, labels FROM chunks WHERE upload_id = ? AND seq = ?",
                    (row.upload_id, row.seq),
                )
                .fetchone()
            )
            if found is None:
                raise StoreError("stored chunk disappeared while reading (data replaced?)")
            lat, lab = bytes(found[0]), bytes(found[1])
        else:
            data = self._read_payload(row.ref)
            split = row.samples * row.latent_dim * np.dtype(row.latent_dtype).itemsize
            lat, lab = data[:split], data[split:]
        x = from_wire(
            WireTensor(lat, row.latent_dtype, (row.samples, row.latent_dim), row.latent_scale),
            "latents",
        )
        y = from_wire(WireTensor(lab, row.label_dtype, (row.samples,)), "labels")
        return x.astype(np.float32, copy=False), y.astype(np.int64, copy=False)

    @override
    def node_data(self, node_id: str) -> tuple[np.ndarray, np.ndarray]:
        node = self.get_node(node_id)
        parts = [self._read_chunk(row) for row in self._chunk_rows(node_id)]
        if not parts:
            return np.zeros((0, node.latent_dim), np.float32), np.zeros((0,), np.int64)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    @override
    def node_blocks(self, node_id: str, max_rows: int) -> LatentBlocks:
        node = self.get_node(node_id)
        groups: list[list[_ChunkRow]] = []
        rows_in_last = 0
        for row in self._chunk_rows(node_id):
            if not groups or rows_in_last + row.samples > max_rows:
                groups.append([])
                rows_in_last = 0
            groups[-1].append(row)
            rows_in_last += row.samples

        def read_block(index: int) -> tuple[np.ndarray, np.ndarray]:
            rows = groups[index]
            if len(rows) == 1:
                return self._read_chunk(rows[0])
            total = sum(r.samples for r in rows)
            x = np.empty((total, node.latent_dim), np.float32)
            y = np.empty((total,), np.int64)
            at = 0
            for row in rows:  # one chunk in memory besides the block
                x[at : at + row.samples], y[at : at + row.samples] = self._read_chunk(row)
                at += row.samples
            return x, y

        return LatentBlocks(
            node_id=node_id,
            latent_dim=node.latent_dim,
            block_rows=tuple(sum(r.samples for r in g) for g in groups),
            read_block=_store_errors(read_block, self._db_errors),
        )

    @override
    def data_version(self) -> int:
        row = self._conn().execute("SELECT value FROM meta WHERE key = 'data_version'").fetchone()
        return int(row[0])

    # -- classifiers and plans ----------------------------------------------------------------

    @override
    def save_classifier(self, meta: dict[str, object], blob: bytes) -> int:
        with self._write() as c:
            (version,) = c.execute(
                "INSERT INTO classifiers (meta_json, blob, trained_at) VALUES (?, ?, ?) "
                "RETURNING version",
                (json.dumps(meta), blob, time.time()),
            ).fetchone()
            version = int(version)
            # keep the newest few: older classifiers are never served again
            c.execute("DELETE FROM classifiers WHERE version <= ?", (version - 3,))
        return version

    @override
    def latest_classifier(self) -> tuple[int, dict[str, object], bytes, float] | None:
        row = (
            self._conn()
            .execute(
                "SELECT version, meta_json, blob, trained_at FROM classifiers "
                "ORDER BY version DESC LIMIT 1"
            )
            .fetchone()
        )
        if row is None:
            return None
        return int(row[0]), json.loads(row[1]), bytes(row[2]), float(row[3])

    @override
    def classifier_version(self) -> int:
        row = self._conn().execute("SELECT COALESCE(MAX(version), 0) FROM classifiers").fetchone()
        return int(row[0])

    @override
    def save_plan(self, round_index: int, plan_json: str, waiting: Sequence[str] = ()) -> bool:
        with self._write() as c:
            made = c.execute(
                "INSERT INTO plans (round, plan_json, created_at) VALUES (?, ?, ?) "
                "ON CONFLICT (round) DO NOTHING",
                (round_index, plan_json, time.time()),
            ).rowcount
            if not made:
                return False
            c.execute("DELETE FROM round_waiting WHERE round < ?", (round_index,))
            c.executemany(
                "INSERT INTO round_waiting (round, node_id) VALUES (?, ?) "
                "ON CONFLICT (round, node_id) DO NOTHING",
                [(round_index, node) for node in waiting],
            )
        return True

    @override
    def round_state(self) -> RoundState | None:
        row = (
            self._conn()
            .execute(
                "SELECT p.round, p.created_at, (SELECT COUNT(*) FROM round_waiting w "
                "WHERE w.round = p.round) FROM plans p ORDER BY p.round DESC LIMIT 1"
            )
            .fetchone()
        )
        return None if row is None else RoundState(int(row[0]), float(row[1]), int(row[2]))

    @override
    def last_plan(self) -> tuple[int, str] | None:
        row = (
            self._conn()
            .execute("SELECT round, plan_json FROM plans ORDER BY round DESC LIMIT 1")
            .fetchone()
        )
        return None if row is None else (int(row[0]), str(row[1]))

    # -- transfer learning --------------------------------------------------------------------

    @override
    def add_model(
        self,
        blob: bytes,
        hash_hex: str,
        *,
        parent: int,
        source: str,
        nodes: tuple[str, ...] = (),
        samples: int = 0,
    ) -> ModelVersion:
        created = time.time()
        with self._write() as c:
            (latest,) = c.execute("SELECT COALESCE(MAX(version), 0) FROM models").fetchone()
            version = int(latest) + 1
            c.execute(
                "INSERT INTO models (version, hash, parent_version, source, nodes_json, samples, "
                "blob, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    version,
                    hash_hex,
                    parent,
                    source,
                    json.dumps(list(nodes)),
                    samples,
                    blob,
                    created,
                ),
            )
        return ModelVersion(version, hash_hex, parent, tuple(nodes), samples, source, created)

    _MODEL_COLUMNS = "version, hash, parent_version, nodes_json, samples, source, created_at"

    @staticmethod
    def _model_row(row: tuple[object, ...]) -> ModelVersion:
        return ModelVersion(
            version=int(str(row[0])),
            hash=str(row[1]),
            parent_version=int(str(row[2])),
            nodes=tuple(json.loads(str(row[3]))),
            samples=int(str(row[4])),
            source=str(row[5]),
            created_at=float(str(row[6])),
        )

    @override
    def get_model(self, version: int | None = None) -> tuple[ModelVersion, bytes] | None:
        c = self._conn()
        if version is None:
            row = c.execute(
                f"SELECT {self._MODEL_COLUMNS}, blob FROM models ORDER BY version DESC LIMIT 1"
            ).fetchone()
        else:
            row = c.execute(
                f"SELECT {self._MODEL_COLUMNS}, blob FROM models WHERE version = ?", (version,)
            ).fetchone()
        return None if row is None else (self._model_row(row[:7]), bytes(row[7]))

    @override
    def list_models(self) -> list[ModelVersion]:
        rows = self._conn().execute(f"SELECT {self._MODEL_COLUMNS} FROM models ORDER BY version")
        return [self._model_row(r) for r in rows]

    @override
    def committed_delta_ack(self, upload_id: str) -> tuple[str, DeltaAck] | None:
        row = (
            self._conn()
            .execute(
                "SELECT node_id, tensors, params, payload_bytes, base_version FROM deltas "
                "WHERE upload_id = ? AND state = 'committed'",
                (upload_id,),
            )
            .fetchone()
        )
        if row is None:
            return None
        return str(row[0]), DeltaAck(
            upload_id=upload_id,
            tensors=int(row[1]),
            params=int(row[2]),
            payload_bytes=int(row[3]),
            deduplicated=True,
            base_version=int(row[4]),
        )

    @override
    def begin_delta(
        self, upload_id: str, node_id: str, *, base_version: int, samples: int, trainable: str
    ) -> None:
        with self._write() as c:
            _reopen(c, _DELTAS, upload_id, node_id)
            old = self._new_segment(c, _DELTA_KIND, upload_id)
            c.execute(
                "INSERT INTO deltas (upload_id, node_id, base_version, state, samples, "
                "trainable, created_at, owner) VALUES (?, ?, ?, 'open', ?, ?, ?, ?) "
                "ON CONFLICT (upload_id) DO UPDATE SET node_id = excluded.node_id, "
                "base_version = excluded.base_version, state = 'open', "
                "samples = excluded.samples, trainable = excluded.trainable, tensors = 0, "
                "params = 0, payload_bytes = 0, created_at = excluded.created_at, "
                "committed_at = NULL, owner = excluded.owner",
                (upload_id, node_id, base_version, samples, trainable, time.time(), self._owner),
            )
        self._release(_DELTA_KIND, upload_id, old)

    @override
    def put_delta_chunk(self, upload_id: str, seq: int, entries: list[DeltaEntry]) -> None:
        st = stats(entries)
        packed = pack_entries(entries)
        where: tuple[int | None, ...] = (None, None, None, None)
        if self._segments is None:  # payloads in the database
            inline = packed
        else:
            ref = self._writer(_DELTA_KIND, upload_id).append((packed,))
            inline = b""
            where = (ref.segment_id, ref.offset_bytes, ref.length_bytes, ref.checksum)
        with self._write(durable=False) as c:
            c.execute(
                "INSERT INTO delta_chunks (upload_id, seq, tensors, params, payload_bytes, "
                "blob, segment_id, seg_offset, seg_length, seg_crc) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (upload_id, seq) DO UPDATE SET "
                "tensors = excluded.tensors, params = excluded.params, "
                "payload_bytes = excluded.payload_bytes, blob = excluded.blob, "
                "segment_id = excluded.segment_id, seg_offset = excluded.seg_offset, "
                "seg_length = excluded.seg_length, seg_crc = excluded.seg_crc",
                (upload_id, seq, st.tensors, st.params, st.payload_bytes, inline, *where),
            )

    @override
    def commit_delta(self, upload_id: str, chunks: int) -> DeltaAck:
        self._sync_segment(_DELTA_KIND, upload_id)  # payload durable before the metadata
        with self._write() as c:
            row = c.execute(
                "SELECT state, base_version, node_id FROM deltas WHERE upload_id = ?", (upload_id,)
            ).fetchone()
            if row is None or row[0] != "open":
                raise ConflictError(f"delta upload_id {upload_id!r} is not open")
            have = c.execute(
                "SELECT COUNT(*), COALESCE(SUM(tensors), 0), COALESCE(SUM(params), 0), "
                "COALESCE(SUM(payload_bytes), 0) FROM delta_chunks WHERE upload_id = ?",
                (upload_id,),
            ).fetchone()
            if int(have[0]) != chunks:
                raise InvalidRequestError(
                    f"delta upload {upload_id!r} has {have[0]} chunks staged, expected {chunks}"
                )
            # commit times only grow, even if the clock steps back: "newest" stays newest
            (last,) = c.execute(
                "SELECT COALESCE(MAX(committed_at), 0) FROM deltas WHERE state = 'committed'"
            ).fetchone()
            c.execute(
                "UPDATE deltas SET state = 'committed', tensors = ?, params = ?, "
                "payload_bytes = ?, committed_at = ? WHERE upload_id = ?",
                (
                    int(have[1]),
                    int(have[2]),
                    int(have[3]),
                    max(time.time(), float(last) + 1e-6),
                    upload_id,
                ),
            )
            c.execute("DELETE FROM round_waiting WHERE node_id = ?", (row[2],))
        self._release(_DELTA_KIND, upload_id, [])
        return DeltaAck(
            upload_id=upload_id,
            tensors=int(have[1]),
            params=int(have[2]),
            payload_bytes=int(have[3]),
            deduplicated=False,
            base_version=int(row[1]),
        )

    @override
    def abort_delta(self, upload_id: str) -> None:
        with self._write() as c:
            removed = _discard_open(c, _DELTAS, _DELTA_KIND, upload_id)
        self._release(_DELTA_KIND, upload_id, removed)

    @override
    def latest_deltas(
        self, base_version: int | None = None, node_id: str | None = None
    ) -> list[StoredDelta]:
        c = self._conn()
        where, params = "", []
        if base_version is not None:
            where += " AND d2.base_version = ?"
            params.append(base_version)
        outer, outer_params = "", []
        if node_id is not None:
            outer = " AND d.node_id = ?"
            outer_params.append(node_id)
        rows = c.execute(
            "SELECT d.upload_id, d.node_id, d.base_version, d.samples FROM deltas d "
            "WHERE d.state = 'committed'" + outer + " AND d.upload_id = (SELECT d2.upload_id "
            "FROM deltas d2 WHERE d2.node_id = d.node_id AND d2.state = 'committed'"
            + where
            + " ORDER BY d2.committed_at DESC, d2.upload_id DESC LIMIT 1) ORDER BY d.node_id",
            (*outer_params, *params),
        ).fetchall()
        out = []
        for upload_id, node, version, samples in rows:
            entries: list[DeltaEntry] = []
            for inline, segment, offset, length, crc in c.execute(
                "SELECT blob, segment_id, seg_offset, seg_length, seg_crc FROM delta_chunks "
                "WHERE upload_id = ? ORDER BY seq",
                (upload_id,),
            ).fetchall():
                blob = (
                    bytes(inline)  # written before schema 3
                    if segment is None
                    else self._read_payload(
                        SegmentRef(int(segment), int(offset), int(length), int(crc))
                    )
                )
                entries.extend(unpack_entries(blob))
            out.append(StoredDelta(upload_id, node, int(version), int(samples), tuple(entries)))
        return out

    @override
    def remove_node(self, node_id: str) -> tuple[int, int]:
        with self._write() as c:
            if c.execute("SELECT 1 FROM nodes WHERE node_id = ?", (node_id,)).fetchone() is None:
                raise NotFoundError(f"node {node_id!r} is not registered")
            samples = self._stored_samples(c, node_id)
            (deltas,) = c.execute(
                "SELECT COUNT(*) FROM deltas WHERE node_id = ? AND state = 'committed'",
                (node_id,),
            ).fetchone()
            removed: list[int] = []
            for (uploads, chunks), kind in ((_LATENTS, _LATENT_KIND), (_DELTAS, _DELTA_KIND)):
                removed += [
                    int(r[0])
                    for r in c.execute(
                        f"SELECT segment_id FROM segments WHERE kind = ? AND upload_id IN "
                        f"(SELECT upload_id FROM {uploads} WHERE node_id = ?)",
                        (kind, node_id),
                    )
                ]
                c.execute(
                    f"DELETE FROM {chunks} WHERE upload_id IN "
                    f"(SELECT upload_id FROM {uploads} WHERE node_id = ?)",
                    (node_id,),
                )
                c.execute(f"DELETE FROM {uploads} WHERE node_id = ?", (node_id,))
            c.execute("DELETE FROM nodes WHERE node_id = ?", (node_id,))
            c.execute("DELETE FROM round_waiting WHERE node_id = ?", (node_id,))
            _delete_segment_rows(c, removed)
            _bump_data_version(c)
        # whole segments go: each holds one upload of this node (an upload still streaming
        # for it finds its segment gone and fails at commit, then its writer is released)
        self._free(removed)
        return samples, int(deltas)

    # -- credentials --------------------------------------------------------------------------

    @override
    def add_token(self, token: TokenRecord) -> None:
        with self._write() as c:
            c.execute(
                "INSERT INTO tokens (token_id, subject, admin, salt, digest, created_at, "
                "revoked_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    token.token_id,
                    token.subject,
                    int(token.admin),
                    token.salt,
                    token.digest,
                    token.created_at,
                    token.revoked_at,
                ),
            )

    @staticmethod
    def _token_row(row: tuple[object, ...]) -> TokenRecord:
        token_id, subject, admin, salt, digest, created, revoked = row
        return TokenRecord(
            token_id=str(token_id),
            subject=str(subject),
            admin=bool(admin),
            salt=bytes(salt),  # type: ignore[call-overload]
            digest=bytes(digest),  # type: ignore[call-overload]
            created_at=float(created),  # type: ignore[arg-type]
            revoked_at=None if revoked is None else float(revoked),  # type: ignore[arg-type]
        )

    _TOKEN_COLUMNS = "token_id, subject, admin, salt, digest, created_at, revoked_at"

    @override
    def find_token(self, token_id: str) -> TokenRecord | None:
        try:
            row = (
                self._conn()
                .execute(
                    f"SELECT {self._TOKEN_COLUMNS} FROM tokens WHERE token_id = ?", (token_id,)
                )
                .fetchone()
            )
        except self._db_errors as exc:
            raise StoreError(f"cannot read credentials: {exc}") from exc
        return None if row is None else self._token_row(row)

    @override
    def revoke_tokens(self, *, subject: str = "", token_id: str = "") -> int:
        if bool(subject) == bool(token_id):
            raise InvalidRequestError("revoke needs exactly one of a subject and a token id")
        column, value = ("subject", subject) if subject else ("token_id", token_id)
        with self._write() as c:
            return int(
                c.execute(
                    f"UPDATE tokens SET revoked_at = ? WHERE {column} = ? AND revoked_at IS NULL",
                    (time.time(), value),
                ).rowcount
            )

    @override
    def list_tokens(self) -> list[TokenRecord]:
        rows = (
            self._conn()
            .execute(f"SELECT {self._TOKEN_COLUMNS} FROM tokens ORDER BY created_at, token_id")
            .fetchall()
        )
        return [self._token_row(r) for r in rows]

    def _close_writers_and(self, connections: list[Any]) -> None:
        """Close every open segment writer, then ``connections`` (and forget them)."""
        with self._writers_lock:
            for writer in self._writers.values():
                writer.close()
            self._writers.clear()
        for conn in connections:
            conn.close()
        connections.clear()


class SqliteStore(SqlStore):
    """The embedded store: SQLite metadata (WAL mode) plus payload segment files beside it.

    One connection per thread; segments live in ``<file>.segments/`` (see
    :mod:`server.segments`) unless ``payload_dir`` names another directory.
    """

    def __init__(self, path: str | Path, *, payload_dir: str | Path | None = None) -> None:
        self._path = Path(path)
        if self._path.parent and not self._path.parent.exists():
            raise StoreError(f"database directory {str(self._path.parent)!r} does not exist")
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        # One writer at a time in this process: threads queue here instead of polling
        # SQLite's busy handler, which sleeps up to 100 ms and leaves the write lock idle.
        self._write_lock = threading.Lock()
        try:
            self._migrate()
            stat = self._path.stat()
            self._identity = (stat.st_dev, stat.st_ino)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{str(self._path)!r} is not a usable SQLite database: {exc}") from exc
        # the segment directory is created only once the database is known to be usable
        super().__init__(
            SegmentDir(Path(payload_dir) if payload_dir else segment_dir_for(self._path))
        )
        swept = self._sweep_open_uploads()
        if swept:
            logger.info("discarded %d unfinished upload(s) left by an earlier run", swept)

    @override
    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(
                    self._path, isolation_level=None, check_same_thread=False, timeout=60.0
                )
                # 64 KiB pages: a 4 MiB chunk is 64 WAL frames, not 1000 (3x faster ingest);
                # takes effect only when the file is created, before WAL mode
                conn.execute("PRAGMA page_size=65536")
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")  # an ack means the commit hit the disk
                conn.execute("PRAGMA busy_timeout=60000")
            except sqlite3.Error as exc:
                raise StoreError(f"cannot open database {str(self._path)!r}: {exc}") from exc
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _schema_version(self, c: sqlite3.Connection) -> int:
        found = int(c.execute("PRAGMA user_version").fetchone()[0])
        if found > SCHEMA_VERSION:
            raise StoreError(
                f"{str(self._path)!r} has store schema version {found}, newer than this "
                f"latentedge reads (up to {SCHEMA_VERSION}): upgrade latentedge, or give "
                "another --db"
            )
        return found

    def _migrate(self) -> None:
        """Create the schema, or bring an older database up to :data:`SCHEMA_VERSION`.

        Version 0 is a new file or one written before versioning (schema 1 without the
        mark): the version-1 statements are idempotent, then each migration applies in order,
        all in one transaction, so a failure leaves the database as it was.
        """
        if self._schema_version(self._conn()) == SCHEMA_VERSION:
            return
        with self._write() as c:
            found = self._schema_version(c)  # another process may have migrated meanwhile
            steps = [(1, _SCHEMA)] if found < 1 else []
            steps += [(v, _MIGRATIONS[v]) for v in sorted(_MIGRATIONS) if v > found]
            for version, script in steps:
                for statement in script.split(";"):
                    if statement.strip():
                        c.execute(statement)
                c.execute(f"PRAGMA user_version = {int(version)}")
            if found:
                logger.info(
                    "migrated %s from store schema %d to %d", self._path, found, SCHEMA_VERSION
                )

    @override
    def _write(self, *, durable: bool = True) -> _Transaction:
        """A write transaction; ``durable=False`` skips the fsync (only for staged chunks)."""
        return _Transaction(self._conn(), self._write_lock, durable=durable)

    @override
    def check(self) -> None:
        try:
            now = self._path.stat()
        except OSError as exc:
            raise StoreError(f"database {str(self._path)!r} is gone: {exc}") from exc
        if (now.st_dev, now.st_ino) != self._identity:
            raise StoreError(
                f"database {str(self._path)!r} was replaced by another file since it was opened"
            )
        try:
            self._conn().execute("SELECT value FROM meta WHERE key = 'data_version'").fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"database {str(self._path)!r} cannot be read: {exc}") from exc
        assert self._segments is not None
        self._segments.check()

    @override
    def close(self) -> None:
        with self._lock:
            self._close_writers_and(self._connections)
        self._local = threading.local()


def _store_errors(
    method: Callable[..., Any], errors: tuple[type[Exception], ...] | None = None
) -> Callable[..., Any]:
    """``method`` with every database driver error raised as a StoreError (INTERNAL, exit 3).

    The driver's error classes are ``errors``, or the ``_db_errors`` of the method's store.
    """

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        caught = errors if errors is not None else args[0]._db_errors
        try:
            return method(*args, **kwargs)
        except caught as exc:
            raise StoreError(f"database error in {method.__name__}: {exc}") from exc

    return wrapper


def raise_store_errors(cls: type[SqlStore]) -> None:
    """Wrap every operation of the interface in ``cls`` with :func:`_store_errors`."""
    for name in sorted({*Store.__abstractmethods__, "node_blocks"}):
        method = getattr(cls, name)
        if not getattr(method, "_store_errors", False):
            wrapped = _store_errors(method)
            wrapped._store_errors = True  # type: ignore[attr-defined]
            setattr(cls, name, wrapped)


# Every operation of the interface: no raw driver error escapes the error tree, wherever it
# happens (a read outside a transaction, an execute inside one, a disk that fills up).
raise_store_errors(SqliteStore)


@dataclass(frozen=True)
class _ChunkRow:
    """Metadata of one stored latent chunk."""

    upload_id: str
    seq: int
    samples: int
    latent_dtype: str
    latent_scale: float
    latent_dim: int
    label_dtype: str
    ref: SegmentRef | None
    """Where the bytes are; None for a chunk stored inline (no segments, or before schema 3)."""


_LATENTS = ("uploads", "chunks")
_DELTAS = ("deltas", "delta_chunks")
"""(uploads table, staged chunks table) of latents and of deltas."""


def _reopen(c: Any, tables: tuple[str, str], upload_id: str, node_id: str) -> None:
    """Check ``upload_id`` may (re)start for ``node_id`` and drop its staged chunks."""
    uploads, chunks = tables
    row = c.execute(
        f"SELECT state, node_id FROM {uploads} WHERE upload_id = ?", (upload_id,)
    ).fetchone()
    if row is not None and row[0] != "open":
        raise ConflictError(f"upload_id {upload_id!r} is already committed")
    if row is not None and row[1] != node_id:
        raise ConflictError(
            f"upload_id {upload_id!r} is in use by node {row[1]!r}; choose a new upload_id"
        )
    c.execute(f"DELETE FROM {chunks} WHERE upload_id = ?", (upload_id,))


def _discard_open(c: Any, tables: tuple[str, str], kind: str, upload_id: str) -> list[int]:
    """Delete an open upload, its staged chunks and its segment rows; the segment ids.

    Never a committed upload's chunks: a concurrent attempt may have committed it.
    """
    uploads, chunks = tables
    segments = [
        int(r[0])
        for r in c.execute(
            f"SELECT segment_id FROM segments WHERE kind = ? AND upload_id = ? AND EXISTS "
            f"(SELECT 1 FROM {uploads} WHERE upload_id = ? AND state = 'open')",
            (kind, upload_id, upload_id),
        )
    ]
    _delete_segment_rows(c, segments)
    c.execute(
        f"DELETE FROM {chunks} WHERE upload_id = ? AND EXISTS (SELECT 1 FROM {uploads} "
        "WHERE upload_id = ? AND state = 'open')",
        (upload_id, upload_id),
    )
    c.execute(f"DELETE FROM {uploads} WHERE upload_id = ? AND state = 'open'", (upload_id,))
    return segments


def _delete_segment_rows(c: Any, segment_ids: list[int]) -> None:
    c.executemany("DELETE FROM segments WHERE segment_id = ?", [(i,) for i in segment_ids])


def _bump_data_version(c: Any) -> None:
    c.execute("UPDATE meta SET value = value + 1 WHERE key = 'data_version'")


STAGED_ROWS_MAX = 1024
"""Staged chunk rows an open upload keeps in memory (~200 bytes each) before they are
inserted (uncommitted-upload rows, as invisible as in memory) in one transaction."""

_StagedRow = tuple[str, int, int, str, float, int, bytes, str, bytes, int, int, int, int]
"""upload_id, seq, samples, latent dtype, scale, latent_dim, latent bytes (empty: in the
segment), label dtype, label bytes, segment_id, offset, length, CRC-32: the values of
:data:`_INSERT_CHUNK_ROW`."""

_INSERT_CHUNK_ROW = (
    "INSERT INTO chunks (upload_id, seq, samples, latent_dtype, latent_scale, latent_dim, "
    "latents, label_dtype, labels, segment_id, seg_offset, seg_length, seg_crc) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (upload_id, seq) DO UPDATE SET "
    "samples = excluded.samples, latent_dtype = excluded.latent_dtype, "
    "latent_scale = excluded.latent_scale, latent_dim = excluded.latent_dim, "
    "latents = excluded.latents, label_dtype = excluded.label_dtype, labels = excluded.labels, "
    "segment_id = excluded.segment_id, seg_offset = excluded.seg_offset, "
    "seg_length = excluded.seg_length, seg_crc = excluded.seg_crc"
)


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (or ``ROLLBACK``) on one connection, under ``lock``."""

    def __init__(self, conn: sqlite3.Connection, lock: threading.Lock, *, durable: bool) -> None:
        self._conn = conn
        self._lock = lock
        self._durable = durable

    def __enter__(self) -> sqlite3.Connection:
        self._lock.acquire()
        try:
            self._conn.execute(f"PRAGMA synchronous={'FULL' if self._durable else 'NORMAL'}")
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            self._lock.release()
            raise StoreError(f"cannot start a write transaction: {exc}") from exc
        return self._conn

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if exc_type is None:
                try:
                    self._conn.execute("COMMIT")
                except sqlite3.Error as err:
                    self._conn.execute("ROLLBACK")
                    raise StoreError(f"commit failed: {err}") from err
            else:
                self._conn.execute("ROLLBACK")
        finally:
            self._lock.release()


def is_postgres_url(url: str | Path) -> bool:
    """Whether ``url`` names a PostgreSQL database (``postgresql://`` or ``postgres://``)."""
    return str(url).startswith(("postgresql://", "postgres://"))


def describe_store(url: str | Path) -> str:
    """``url`` fit for logs and messages: a PostgreSQL URL loses its password and options."""
    if not is_postgres_url(url):
        return str(url)
    parts = urllib.parse.urlsplit(str(url))
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ":?"
    user = f"{parts.username}@" if parts.username else ""
    return f"{parts.scheme}://{user}{parts.hostname or ''}{port}{parts.path}"


def open_store(url: str | Path, *, payload_dir: str | Path | None = None) -> Store:
    """Open the store named by ``url``.

    A SQLite file path (``sqlite:///PATH`` or a bare path; payloads in ``<PATH>.segments/``
    unless ``payload_dir``), or ``postgresql://USER@HOST:PORT/DB`` (payloads in the database
    unless ``payload_dir``, which every replica must share).
    """
    text = str(url)
    if is_postgres_url(text):
        from server.store_postgres import PostgresStore  # noqa: PLC0415 - psycopg when asked

        store: Store = PostgresStore(text, payload_dir=payload_dir)
        return store
    if text.startswith("sqlite:///"):
        text = text[len("sqlite:///") :]
    elif "://" in text:
        scheme = text.split("://", 1)[0]
        raise StoreError(
            f"unsupported store URL scheme {scheme!r} in --db; expected a SQLite path, "
            "sqlite:///PATH or postgresql://USER@HOST:PORT/DB"
        )
    return SqliteStore(text, payload_dir=payload_dir)
