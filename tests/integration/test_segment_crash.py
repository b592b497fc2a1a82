"""SIGKILL a real process storing uploads, at the two moments that matter, then reopen.

The child (``tests/support_store_crash.py``) commits upload ``first`` and stages ``second``.
(a) Killed inside ``commit_upload`` of ``second`` after its payload was fsync'd and before the
metadata committed (the test holds the database's write lock, so the commit waits there).
(b) Killed right after ``second`` was acknowledged. Either way, on reopening: everything
acknowledged is there once, nothing unacknowledged is visible, and segment files hold exactly
the committed payload bytes (orphans reclaimed).
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from common.errors import ConflictError
from common.records import UploadMode
from server.segments import segment_dir_for
from server.store import SqliteStore
from tests.conftest import ROOT
from tests.support_store_crash import CHUNKS, DIM, ROWS, payload, stage

UPLOAD_BYTES = CHUNKS * ROWS * (DIM * 4 + 1)
"""Payload bytes of one upload (float32 latents + uint8 labels)."""


def _start(db: Path, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.support_store_crash", str(db), mode],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _expect(proc: subprocess.Popen[str], line: str) -> None:
    assert proc.stdout is not None
    got = proc.stdout.readline().strip()
    assert got == line, f"child said {got!r}, expected {line!r} (exit {proc.poll()})"


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()


def _segment_sizes(db: Path) -> list[int]:
    return sorted(p.stat().st_size for p in segment_dir_for(db).iterdir())


def _expected(*uploads: str) -> tuple[np.ndarray, np.ndarray]:
    parts = [payload(u) for u in uploads]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _assert_holds(store: SqliteStore, *uploads: str) -> None:
    x, y = store.node_data("n0")
    want_x, want_y = _expected(*uploads)
    np.testing.assert_array_equal(x, want_x)  # each acknowledged upload once, in order
    np.testing.assert_array_equal(y, want_y)


def test_kill_after_payload_fsync_before_metadata_commit(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    proc = _start(db, "commit")
    try:
        _expect(proc, "ACK first")
        _expect(proc, "STAGED")
        assert _segment_sizes(db) == [UPLOAD_BYTES, UPLOAD_BYTES]  # second's bytes written
        blocker = sqlite3.connect(db, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # the child's commit transaction must wait
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        _expect(proc, "COMMITTING")
        time.sleep(0.5)  # the segment fsync is done; the child waits for the write lock
        assert proc.poll() is None
        _kill(proc)
        blocker.execute("ROLLBACK")
        blocker.close()
    finally:
        if proc.poll() is None:
            _kill(proc)
    store = SqliteStore(db)  # start-up sweep
    try:
        _assert_holds(store, "first")  # second never committed: invisible
        assert store.committed_ack("second") is None
        assert _segment_sizes(db) == [UPLOAD_BYTES]  # its orphaned segment was reclaimed
        stage(store, "second", UploadMode.APPEND)  # the client re-sends it: stored once
        ack = store.commit_upload("second", CHUNKS)
        assert (ack.samples, ack.payload_bytes) == (CHUNKS * ROWS, UPLOAD_BYTES)
        _assert_holds(store, "first", "second")
        assert _segment_sizes(db) == [UPLOAD_BYTES, UPLOAD_BYTES]
    finally:
        store.close()


def test_kill_right_after_the_acknowledgement(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    proc = _start(db, "acked")
    try:
        _expect(proc, "ACK first")
        _expect(proc, "STAGED")
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        _expect(proc, "COMMITTING")
        _expect(proc, "ACK second")
        _kill(proc)
    finally:
        if proc.poll() is None:
            _kill(proc)
    store = SqliteStore(db)
    try:
        _assert_holds(store, "first", "second")  # both acknowledged: both there, once
        done = store.committed_ack("second")
        assert done is not None and done[1].payload_bytes == UPLOAD_BYTES  # a re-send dedupes
        with pytest.raises(ConflictError, match="already committed"):
            store.begin_upload("second", "n0", UploadMode.APPEND)
        assert _segment_sizes(db) == [UPLOAD_BYTES, UPLOAD_BYTES]  # nothing reclaimed wrongly
    finally:
        store.close()


def test_kill_while_staging_leaves_nothing(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    proc = _start(db, "staged")
    try:
        _expect(proc, "ACK first")
        _expect(proc, "STAGED")
        _kill(proc)  # payload written but never fsync'd nor committed
    finally:
        if proc.poll() is None:
            _kill(proc)
    (segments := segment_dir_for(db)).joinpath("000000000999.seg").write_bytes(b"stray")
    store = SqliteStore(db)
    try:
        _assert_holds(store, "first")
        assert _segment_sizes(db) == [UPLOAD_BYTES]  # second's segment and the stray file gone
        assert len(list(segments.iterdir())) == 1
    finally:
        store.close()
