"""The store's schema version: new files are marked, older ones migrate, newer ones are refused."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from common.errors import StoreError
from server.auth import new_token
from server.store import SCHEMA_VERSION, SqliteStore

V1_DUMP = Path(__file__).parents[2] / "data" / "store_schema_v1.sql"


def _version(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


def test_a_new_database_carries_the_current_version(tmp_path: Path) -> None:
    SqliteStore(tmp_path / "new.db").close()
    assert _version(tmp_path / "new.db") == SCHEMA_VERSION >= 2


def test_a_database_of_the_first_schema_migrates_with_its_data(tmp_path: Path) -> None:
    db = tmp_path / "v1.db"
    conn = sqlite3.connect(db)
    conn.executescript(V1_DUMP.read_text())  # written by the first, unversioned store
    conn.close()
    assert _version(db) == 0
    store = SqliteStore(db)
    try:
        latents, labels = store.node_data("node-a")
        np.testing.assert_array_equal(labels, [0, 1, 2, 0, 1, 2])
        np.testing.assert_allclose(latents, np.arange(24, dtype=np.float32).reshape(6, 4) / 10)
        _, record = new_token("node-a")
        store.add_token(record)  # the table version 2 added is there
        assert store.find_token(record.token_id) == record
    finally:
        store.close()
    assert _version(db) == SCHEMA_VERSION
    SqliteStore(db).close()  # opening again is a no-op


def test_a_newer_schema_is_refused_untouched(tmp_path: Path) -> None:
    db = tmp_path / "future.db"
    SqliteStore(db).close()
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}, newer"):
        SqliteStore(db)
    assert _version(db) == SCHEMA_VERSION + 1


def test_a_file_that_is_not_sqlite_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match=r"not a (usable SQLite )?database"):
        SqliteStore(bad)


def test_sqlite_errors_anywhere_become_store_errors(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    store = SqliteStore(db)
    try:
        vandal = sqlite3.connect(db)
        vandal.execute("DROP TABLE nodes")
        vandal.commit()
        vandal.close()
        with pytest.raises(StoreError, match="database error in list_nodes: no such table"):
            store.list_nodes()  # a read outside any transaction
        with pytest.raises(StoreError, match="database error in remove_node"):
            store.remove_node("n0")  # an execute inside a write transaction
    finally:
        store.close()
