"""Payload segments of the SQLite store: reads verify, deletions free space, old rows still read."""

from __future__ import annotations

import sqlite3
import zlib
from pathlib import Path

import numpy as np
import pytest
import xxhash

from common.delta import DeltaEntry, DeltaKind
from common.errors import StoreError
from common.records import NodeRegistration, UploadMode
from common.tensors import to_wire
from server.segments import SegmentDir, SegmentRef, payload_checksum, segment_dir_for
from server.store import SqliteStore

V1_DUMP = Path(__file__).parents[2] / "data" / "store_schema_v1.sql"
DIM = 4
ROWS = 10


def _data(seed: int, chunks: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(chunks * ROWS, DIM)).astype(np.float32)
    return x, rng.integers(0, 3, len(x)).astype(np.uint8)


def _upload(
    store: SqliteStore, upload_id: str, x: np.ndarray, y: np.ndarray, mode: UploadMode
) -> None:
    store.begin_upload(upload_id, "n0", mode)
    for seq, start in enumerate(range(0, len(x), ROWS)):
        rows = slice(start, start + ROWS)
        store.put_chunk(upload_id, seq, to_wire(x[rows]), to_wire(y[rows]), len(y[rows]))
    store.commit_upload(upload_id, (len(x) + ROWS - 1) // ROWS)


def _segments(db: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(segment_dir_for(db).iterdir())}


@pytest.fixture
def store(tmp_path: Path) -> SqliteStore:
    s = SqliteStore(tmp_path / "s.db")
    s.register_node(NodeRegistration(node_id="n0", latent_dim=DIM, num_classes=3))
    return s


def test_payload_goes_to_a_segment_and_only_metadata_to_the_database(
    store: SqliteStore, tmp_path: Path
) -> None:
    x, y = _data(0)
    _upload(store, "u1", x, y, UploadMode.APPEND)
    assert list(_segments(tmp_path / "s.db").values()) == [x.nbytes + y.nbytes]
    conn = sqlite3.connect(tmp_path / "s.db")
    blobs = conn.execute("SELECT SUM(LENGTH(latents) + LENGTH(labels)) FROM chunks").fetchone()
    conn.close()
    assert blobs == (0,)
    got_x, got_y = store.node_data("n0")
    np.testing.assert_array_equal(got_x, x)
    np.testing.assert_array_equal(got_y, y)
    store.close()


def test_a_corrupt_byte_is_a_store_error_naming_segment_and_offset(
    store: SqliteStore, tmp_path: Path
) -> None:
    x, y = _data(0)
    _upload(store, "u1", x, y, UploadMode.APPEND)
    (name,) = _segments(tmp_path / "s.db")
    path = segment_dir_for(tmp_path / "s.db") / name
    raw = bytearray(path.read_bytes())
    second = ROWS * (DIM * 4 + 1)  # the second chunk's record starts here
    raw[second + 5] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(
        StoreError, match=rf"checksum mismatch in segment .*{name}.* at offset {second}"
    ):
        store.node_data("n0")
    path.write_bytes(bytes(raw[:second]))  # truncated
    with pytest.raises(StoreError, match=rf"{name}.* at offset {second} .*truncated"):
        store.node_data("n0")
    store.close()


def test_replacing_removing_and_aborting_free_whole_segments(
    store: SqliteStore, tmp_path: Path
) -> None:
    db = tmp_path / "s.db"
    x1, y1 = _data(1)
    x2, y2 = _data(2, chunks=3)
    _upload(store, "u1", x1, y1, UploadMode.APPEND)
    _upload(store, "u2", x2, y2, UploadMode.APPEND)
    assert len(_segments(db)) == 2
    x3, y3 = _data(3, chunks=1)
    _upload(store, "u3", x3, y3, UploadMode.REPLACE)  # u1 and u2 superseded: their bytes go
    assert list(_segments(db).values()) == [x3.nbytes + y3.nbytes]
    np.testing.assert_array_equal(store.node_data("n0")[0], x3)
    store.begin_upload("u4", "n0", UploadMode.APPEND)
    store.put_chunk("u4", 0, to_wire(x1[:ROWS]), to_wire(y1[:ROWS]), ROWS)
    assert len(_segments(db)) == 2
    store.begin_upload("u4", "n0", UploadMode.APPEND)  # a retry: the first attempt's bytes go
    store.put_chunk("u4", 0, to_wire(x1[:ROWS]), to_wire(y1[:ROWS]), ROWS)
    assert len(_segments(db)) == 2
    store.abort_upload("u4")
    assert len(_segments(db)) == 1
    store.begin_delta("d1", "n0", base_version=1, samples=5, trainable="head")
    entry = DeltaEntry("head.weight", DeltaKind.DENSE, to_wire(np.ones((3, 2), np.float32)))
    store.put_delta_chunk("d1", 0, [entry])
    store.commit_delta("d1", 1)
    (delta,) = store.latest_deltas()
    assert delta.entries == (entry,)  # read back from its segment
    assert len(_segments(db)) == 2
    assert store.remove_node("n0") == (ROWS, 1)
    assert _segments(db) == {}  # the node's space is free
    store.close()


def test_a_removed_segment_directory_fails_the_health_check(
    store: SqliteStore, tmp_path: Path
) -> None:
    store.check()
    segment_dir_for(tmp_path / "s.db").rmdir()
    with pytest.raises(StoreError, match=r"segment directory .* is gone"):
        store.check()
    store.close()


def test_node_blocks_are_bounded_and_cover_the_data(store: SqliteStore) -> None:
    x, y = _data(4, chunks=5)
    _upload(store, "u1", x, y, UploadMode.APPEND)
    blocks = store.node_blocks("n0", max_rows=2 * ROWS)
    assert blocks.block_rows == (2 * ROWS, 2 * ROWS, ROWS) and blocks.samples == len(y)
    parts = [blocks.block(i) for i in range(len(blocks.block_rows))]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), x)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), y)
    _upload(store, "u2", x[:ROWS], y[:ROWS], UploadMode.REPLACE)  # u1's segment is deleted
    with pytest.raises(StoreError, match=r"cannot read segment"):
        blocks.block(0)  # an error, never stale or wrong data
    store.close()


def test_a_version_1_database_keeps_its_inline_rows_and_adds_segments(tmp_path: Path) -> None:
    db = tmp_path / "v1.db"
    conn = sqlite3.connect(db)
    conn.executescript(V1_DUMP.read_text())
    conn.close()
    store = SqliteStore(db)  # migrates 0 -> 3 without copying payload
    old_x = np.arange(24, dtype=np.float32).reshape(6, 4) / 10
    try:
        x, y = _data(5, chunks=1)
        store.register_node(NodeRegistration(node_id="n0", latent_dim=DIM, num_classes=3))
        store.begin_upload("new", "node-a", UploadMode.APPEND)
        store.put_chunk("new", 0, to_wire(x), to_wire(y.astype(np.int64)), len(y))
        ack = store.commit_upload("new", 1)
        assert ack.stored_samples == 6 + ROWS
        got_x, got_y = store.node_data("node-a")  # inline rows, then the segment's
        np.testing.assert_allclose(got_x, np.concatenate([old_x, x]))
        np.testing.assert_array_equal(got_y, np.concatenate([[0, 1, 2, 0, 1, 2], y]))
        blocks = store.node_blocks("node-a", max_rows=6)
        assert blocks.block_rows == (6, ROWS)
        np.testing.assert_allclose(blocks.block(0)[0], old_x)
        store.begin_upload("repl", "node-a", UploadMode.REPLACE)
        store.put_chunk("repl", 0, to_wire(x), to_wire(y.astype(np.int64)), len(y))
        store.commit_upload("repl", 1)
        np.testing.assert_array_equal(store.node_data("node-a")[0], x)
    finally:
        store.close()
    conn = sqlite3.connect(db)
    inline = conn.execute("SELECT COUNT(*) FROM chunks WHERE segment_id IS NULL").fetchone()
    conn.close()
    assert inline == (0,)  # the replaced inline rows left the database
    assert len(_segments(db)) == 1


def test_chunk_rows_wait_in_memory_for_the_commit_in_bounded_batches(
    store: SqliteStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("server.store.STAGED_ROWS_MAX", 2)
    x, y = _data(0, chunks=5)

    def rows() -> int:
        with sqlite3.connect(tmp_path / "s.db") as conn:
            return int(conn.execute("SELECT COUNT(*) FROM chunks").fetchone()[0])

    store.begin_upload("u1", "n0", UploadMode.APPEND)
    for seq in range(5):
        part = slice(seq * ROWS, (seq + 1) * ROWS)
        store.put_chunk("u1", seq, to_wire(x[part]), to_wire(y[part]), ROWS)
        assert rows() == (seq + 1) // 2 * 2  # full batches of 2 go to the database, unsynced
    assert store.node_data("n0")[0].shape == (0, DIM)  # nothing visible before the commit
    ack = store.commit_upload("u1", 5)
    assert (ack.samples, rows()) == (5 * ROWS, 5)
    np.testing.assert_array_equal(store.node_data("n0")[0], x)
    # an aborted upload leaves no row, in memory or in the database
    store.begin_upload("u2", "n0", UploadMode.APPEND)
    for seq in range(3):
        store.put_chunk("u2", seq, to_wire(x[:ROWS]), to_wire(y[:ROWS]), ROWS)
    store.abort_upload("u2")
    store.begin_upload("u2", "n0", UploadMode.APPEND)
    store.put_chunk("u2", 0, to_wire(x[:ROWS]), to_wire(y[:ROWS]), ROWS)
    assert store.commit_upload("u2", 1).samples == ROWS  # the earlier attempt's rows are gone
    assert rows() == 6
    store.close()


def test_checksums_are_xxh3_and_records_with_a_crc32_still_verify(tmp_path: Path) -> None:
    directory = SegmentDir(tmp_path / "segs")
    writer = directory.writer(7)
    parts = (b"abc" * 1000, memoryview(b"defg" * 333))
    ref = writer.append(parts)
    writer.sync()
    whole = b"".join(bytes(p) for p in parts)
    assert ref.checksum == payload_checksum((whole,))  # however the record was split
    assert 1 << 62 <= ref.checksum < 1 << 63  # fits a signed 64-bit column, never a CRC-32
    assert ref.checksum == (1 << 62) | (xxhash.xxh3_64_intdigest(whole) >> 2)
    assert directory.read(ref) == whole
    # a row written before (schema 3) carries zlib's CRC-32 of the same bytes: still verified
    legacy = SegmentRef(ref.segment_id, ref.offset_bytes, ref.length_bytes, zlib.crc32(whole))
    assert directory.read(legacy) == whole
    for bad in (legacy.checksum ^ 1, ref.checksum ^ 1):
        wrong = SegmentRef(ref.segment_id, ref.offset_bytes, ref.length_bytes, bad)
        with pytest.raises(StoreError, match="checksum mismatch"):
            directory.read(wrong)
    writer.close()
