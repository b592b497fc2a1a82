"""Append-only payload segment files beside the store's database.

Payload bytes (latents + labels of a chunk, a delta chunk's packed entries) are appended to
segment files in a directory beside the SQLite file (``server.db`` -> ``server.db.segments/``);
the database holds only where each record is: (segment id, offset, length, checksum). The bytes
are written once, with ``os.writev`` of the buffers that arrived, instead of twice through
SQLite's write-ahead log.

Layout: one segment per upload attempt, named ``{segment_id:012d}.seg``, holding that upload's
records back to back (no framing: the metadata row says where a record starts and ends).
Segment ids come from the database (``AUTOINCREMENT``), so a name is never reused. A segment
is written only by its upload and is immutable once the upload commits.

Durability order (what makes an acknowledgement mean durable):

1. the records are appended (page cache);
2. :meth:`SegmentWriter.sync` fsyncs the file and, the first time, the directory (the new
   name); this happens before the commit transaction that makes the metadata visible;
3. the metadata transaction commits with ``synchronous=FULL``.

A crash before 3 leaves a segment no committed row references: the start-up sweep deletes
it (see :meth:`SegmentDir.sweep`). Space is freed a whole segment at a time, when the store
deletes the last rows of its upload (node removed, data replaced, upload aborted).
"""

from __future__ import annotations

import logging
import os
import threading
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import xxhash

from common.errors import StoreError

logger = logging.getLogger(__name__)

SEGMENT_SUFFIX = ".seg"
"""File name suffix of a segment."""


@dataclass(frozen=True)
class SegmentRef:
    """Where one record lives."""

    segment_id: int
    """The segment file (``{segment_id:012d}.seg``)."""
    offset_bytes: int
    """First byte of the record in the file."""
    length_bytes: int
    """Bytes of the record."""
    checksum: int
    """:func:`payload_checksum` of the record's bytes (or, below 2^32, its CRC-32)."""


WRITE_BACK_BYTES = 8 << 20
"""Appended bytes after which a writer starts their write-back (see SegmentWriter.append)."""

_FADVISE = getattr(os, "posix_fadvise", None)
"""``os.posix_fadvise`` where the platform has it (not on macOS)."""

_XXH3_MARK = 1 << 62
"""Set in every XXH3 checksum, so none is below 2^32 (where CRC-32 values live)."""


def payload_checksum(parts: Sequence[bytes | memoryview]) -> int:
    """The checksum stored for a record made of ``parts``: XXH3-64's top 62 bits, marked.

    ``2^62 | xxh3_64 >> 2``, always in [2^62, 2^63): it fits a signed 64-bit SQL integer and
    cannot be mistaken for a CRC-32 (< 2^32), which records written before carry and which
    :meth:`SegmentDir.read` still checks. XXH3 runs at ~20 GB/s here, against 1.7 GB/s for
    ``zlib.crc32``, whose cost was a quarter of a chunk's ingest time (docs/benchmarks.md).
    """
    digest = xxhash.xxh3_64()
    for part in parts:
        digest.update(part)
    return _XXH3_MARK | (digest.intdigest() >> 2)


def checksum_of(data: bytes | memoryview, stored: int) -> int:
    """``data``'s checksum in the algorithm of ``stored`` (CRC-32 below 2^32, else XXH3)."""
    return zlib.crc32(data) if stored < 1 << 32 else payload_checksum((data,))


def segment_dir_for(db_path: Path) -> Path:
    """The segment directory of a database file: ``<db>.segments`` beside it."""
    return db_path.with_name(db_path.name + ".segments")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SegmentWriter:
    """Appends records to one segment; one upload (one thread at a time) writes it."""

    def __init__(self, directory: SegmentDir, segment_id: int) -> None:
        self.segment_id = segment_id
        self._dir = directory
        self._path = directory.path_of(segment_id)
        self._lock = threading.Lock()
        try:
            self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._size_bytes = os.fstat(self._fd).st_size
        except OSError as exc:
            raise StoreError(f"cannot open segment {str(self._path)!r}: {exc}") from exc
        self._dir_synced = False
        self._dirty = False
        self._written_back = self._size_bytes
        """End of the bytes whose write-back to disk was started (see :meth:`append`)."""

    @property
    def size_bytes(self) -> int:
        """Bytes in the file (the next record's offset)."""
        return self._size_bytes

    def append(self, parts: Sequence[bytes | memoryview]) -> SegmentRef:
        """Append one record made of ``parts`` (not yet durable: see :meth:`sync`)."""
        checksum = payload_checksum(parts)
        length = sum(len(part) for part in parts)
        with self._lock:
            offset = self._size_bytes
            try:
                _write_all(self._fd, parts, length)
            except OSError as exc:
                # a short or failed write leaves garbage past the end we know: cut it off
                self._truncate_quietly(offset)
                raise StoreError(
                    f"cannot append {length} bytes to segment {str(self._path)!r}: {exc}"
                ) from exc
            self._size_bytes = offset + length
            self._dirty = True
            if self._size_bytes - self._written_back >= WRITE_BACK_BYTES:
                self._start_write_back()
        return SegmentRef(self.segment_id, offset, length, checksum)

    def _start_write_back(self) -> None:
        """Start writing the appended bytes to disk now, without waiting for it.

        An upload's bytes then reach the disk while the rest still streams in, so the fsync
        before its commit waits for the last few MiB, not for the whole upload (8 uploads of
        51 MB: 50-70 ms instead of 170-220 ms here). ``POSIX_FADV_DONTNEED`` starts the
        write-back of dirty pages and drops pages already clean (the payload is read again
        only by the classifier trainer). Nothing here is needed for durability: :meth:`sync`
        still fsyncs.
        """
        if _FADVISE is not None:
            try:
                _FADVISE(
                    self._fd,
                    self._written_back,
                    self._size_bytes - self._written_back,
                    os.POSIX_FADV_DONTNEED,
                )
            except OSError as exc:  # advice only: a failure costs speed, never data
                logger.debug("posix_fadvise on %s failed: %s", self._path, exc)
        self._written_back = self._size_bytes

    def sync(self) -> None:
        """Make every appended record durable: fsync the file, and its name the first time."""
        with self._lock:
            try:
                if self._dirty:
                    os.fsync(self._fd)
                    self._dirty = False
                if not self._dir_synced:
                    _fsync_dir(self._dir.path)
                    self._dir_synced = True
            except OSError as exc:
                raise StoreError(f"cannot fsync segment {str(self._path)!r}: {exc}") from exc

    def close(self) -> None:
        """Release the file descriptor (idempotent)."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def _truncate_quietly(self, size_bytes: int) -> None:
        try:
            os.ftruncate(self._fd, size_bytes)
        except OSError:
            logger.warning("could not truncate segment %s after a failed write", self._path)


def _write_all(fd: int, parts: Sequence[bytes | memoryview], length: int) -> None:
    """``os.writev`` until all of ``parts`` (``length`` bytes) is written."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    written = 0
    while views:
        n = os.writev(fd, views)
        if n <= 0:
            raise OSError(f"writev wrote {n} bytes")
        written += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
    if written != length:
        raise OSError(f"wrote {written} bytes, expected {length}")


class SegmentDir:
    """The directory of segments beside a database."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            if not path.is_dir():
                path.mkdir()
                _fsync_dir(path)
                _fsync_dir(path.parent)  # the directory's own name
        except OSError as exc:
            raise StoreError(f"cannot create segment directory {str(path)!r}: {exc}") from exc

    def path_of(self, segment_id: int) -> Path:
        """The file of segment ``segment_id``."""
        return self.path / f"{segment_id:012d}{SEGMENT_SUFFIX}"

    def writer(self, segment_id: int) -> SegmentWriter:
        """A writer appending to segment ``segment_id`` (created when missing)."""
        return SegmentWriter(self, segment_id)

    def read(self, ref: SegmentRef) -> bytes:
        """The record at ``ref``, its checksum verified.

        Raises:
            StoreError: naming the segment and offset when the file is missing, short, or the
                bytes do not match the checksum (never wrong data).
        """
        path = self.path_of(ref.segment_id)
        where = f"segment {str(path)!r} at offset {ref.offset_bytes} ({ref.length_bytes} bytes)"
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise StoreError(f"cannot read {where}: {exc}") from exc
        try:
            data = os.pread(fd, ref.length_bytes, ref.offset_bytes)
        except OSError as exc:
            raise StoreError(f"cannot read {where}: {exc}") from exc
        finally:
            os.close(fd)
        if len(data) != ref.length_bytes:
            raise StoreError(f"{where} is truncated: only {len(data)} bytes there")
        found = checksum_of(data, ref.checksum)
        if found != ref.checksum:
            raise StoreError(
                f"checksum mismatch in {where}: stored {ref.checksum:#x}, read {found:#x}; "
                "the payload is corrupt"
            )
        return data

    def remove(self, segment_ids: Iterable[int]) -> int:
        """Delete segments whose metadata is gone (missing files are fine); bytes freed."""
        freed = 0
        for segment_id in segment_ids:
            path = self.path_of(segment_id)
            try:
                size = path.stat().st_size
                path.unlink()
                freed += size
            except FileNotFoundError:
                continue
            except OSError as exc:
                # left for the next start-up sweep, which deletes files no row names
                logger.warning("could not delete segment %s: %s", path, exc)
        return freed

    def sweep(self, known: Callable[[], set[int]]) -> tuple[int, int]:
        """Delete every file of the directory that is not a segment ``known()`` returns.

        Run at start-up: a segment whose metadata never committed (crash between the payload
        write and the commit, or before a deletion's unlink) is not known. ``known`` is called
        after the directory is listed, so a segment another process creates meanwhile (its row
        is committed before its file exists) is either not listed or known.
        Returns (files deleted, bytes freed).
        """
        files = freed = 0
        try:
            entries = list(os.scandir(self.path))
        except OSError as exc:
            raise StoreError(f"cannot list segment directory {str(self.path)!r}: {exc}") from exc
        ids = known()
        for entry in entries:
            stem, suffix = os.path.splitext(entry.name)
            if suffix == SEGMENT_SUFFIX and stem.isdigit() and int(stem) in ids:
                continue
            if not entry.is_file(follow_symlinks=False):
                continue
            try:
                size = entry.stat(follow_symlinks=False).st_size
                os.unlink(entry.path)
            except OSError as exc:
                logger.warning("could not delete orphaned segment %s: %s", entry.path, exc)
                continue
            files += 1
            freed += size
        if files:
            try:
                _fsync_dir(self.path)
            except OSError as exc:
                logger.warning("could not fsync %s after the sweep: %s", self.path, exc)
        return files, freed

    def check(self) -> None:
        """Raise StoreError when the directory is gone."""
        if not self.path.is_dir():
            raise StoreError(f"segment directory {str(self.path)!r} is gone")
