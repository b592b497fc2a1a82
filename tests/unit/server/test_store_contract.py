"""The store's contract, run against every backend: SQLite, PostgreSQL with payloads in the
database, and PostgreSQL with payloads in a segment directory (a real server, started here).

Each test opens its store through ``open_store`` on a fresh database; ``reopen`` opens another
instance on the same database (a restart, or a second replica).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from common.delta import DeltaEntry, DeltaKind
from common.errors import (
    BusyError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    StoreError,
    TooLargeError,
)
from common.records import NodeRegistration, UploadMode
from common.tensors import to_wire
from server.auth import new_token
from server.store import Store, open_store
from tests.support_postgres import PostgresServer

BACKENDS = ("sqlite", "postgres", "postgres+segments")
SHARED_BACKENDS = ("postgres", "postgres+segments")
"""Backends several server processes may share (one SQLite file serves one process)."""
only_shared = pytest.mark.parametrize("backend", SHARED_BACKENDS, indirect=True)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def reopen(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[[], Store]]:
    """Opens a store instance on this test's database (the same one each call)."""
    if backend == "sqlite":
        url, payload_dir = str(tmp_path / "store.db"), None
    else:
        server: PostgresServer = request.getfixturevalue("postgres_server")
        url = server.new_database()
        payload_dir = None
        if backend == "postgres+segments":
            payload_dir = tmp_path / "payloads"
            payload_dir.mkdir()
    opened: list[Store] = []

    def make() -> Store:
        store = open_store(url, payload_dir=payload_dir)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def store(reopen: Callable[[], Store]) -> Store:
    return reopen()


def _reg(node: str, dim: int = 4, classes: int = 3, **kw: object) -> NodeRegistration:
    return NodeRegistration(node_id=node, latent_dim=dim, num_classes=classes, **kw)  # type: ignore[arg-type]


def _upload(
    store: Store,
    upload_id: str,
    node: str,
    rows: list[np.ndarray],
    *,
    mode: UploadMode = UploadMode.APPEND,
    commit: bool = True,
    **commit_kw: object,
) -> object:
    store.begin_upload(upload_id, node, mode)
    for seq, x in enumerate(rows):
        y = (np.arange(len(x)) % 3).astype(np.int64)
        store.put_chunk(upload_id, seq, to_wire(x.astype(np.float32)), to_wire(y), len(x))
    return store.commit_upload(upload_id, len(rows), **commit_kw) if commit else None  # type: ignore[arg-type]


def _latents(n: int, start: float = 0.0, dim: int = 4) -> np.ndarray:
    return (np.arange(n * dim, dtype=np.float32).reshape(n, dim) + start) / 7


def _delta(value: float) -> list[DeltaEntry]:
    return [DeltaEntry("fc.weight", DeltaKind.DENSE, to_wire(np.full((2, 3), value, np.float32)))]


# --------------------------------------------------------------------------- nodes


def test_nodes_register_list_and_refuse_a_shape_change_while_data_is_stored(store: Store) -> None:
    assert store.register_node(_reg("b")) == 0
    store.register_node(_reg("a", dim=2))
    assert [n.node_id for n in store.list_nodes()] == ["a", "b"]
    assert [n.node_id for n in store.list_nodes(after="a")] == ["b"]
    assert [n.node_id for n in store.list_nodes(limit=1)] == ["a"]
    assert store.get_node("a").latent_dim == 2
    with pytest.raises(NotFoundError, match="'zz' is not registered"):
        store.get_node("zz")
    _upload(store, "u1", "b", [_latents(5)])
    with pytest.raises(ConflictError, match="5 samples stored with latent_dim=4"):
        store.register_node(_reg("b", dim=8))
    assert store.register_node(_reg("b", dim=8, reset=True)) == 0
    assert store.get_node("b").latent_dim == 8
    with pytest.raises(TooLargeError, match="max_nodes = 2"):
        store.register_node(_reg("c"), max_nodes=2)
    store.register_node(_reg("a", dim=2), max_nodes=2)  # a known node may always re-register


# --------------------------------------------------------------------------- uploads


def test_a_committed_upload_reads_back_exactly_and_is_acknowledged_once(store: Store) -> None:
    store.register_node(_reg("n"))
    before = store.data_version()
    parts = [_latents(3), _latents(5, 100.0), _latents(1, 7.0)]
    ack = _upload(store, "up-1", "n", parts)
    assert ack.samples == 9 and ack.stored_samples == 9 and not ack.deduplicated  # type: ignore[attr-defined]
    assert store.data_version() > before
    x, y = store.node_data("n")
    np.testing.assert_array_equal(x, np.concatenate(parts))
    np.testing.assert_array_equal(y, np.concatenate([np.arange(len(p)) % 3 for p in parts]))
    again = store.committed_ack("up-1")
    assert again is not None and again[0] == "n" and again[1].deduplicated
    assert again[1].payload_bytes == ack.payload_bytes == store.node_payload_bytes("n")  # type: ignore[attr-defined]
    status = store.list_nodes()[0]
    assert (status.samples, status.uploads, status.payload_bytes) == (9, 1, ack.payload_bytes)  # type: ignore[attr-defined]
    with pytest.raises(ConflictError, match="already committed"):
        store.begin_upload("up-1", "n", UploadMode.APPEND)


def test_open_and_aborted_uploads_stay_invisible(store: Store) -> None:
    store.register_node(_reg("n"))
    _upload(store, "open", "n", [_latents(4)], commit=False)
    assert store.node_data("n")[0].shape == (0, 4)
    assert store.committed_ack("open") is None
    assert store.list_nodes()[0].samples == 0
    store.abort_upload("open")
    with pytest.raises(ConflictError, match="not open"):
        store.commit_upload("open", 1)
    # the same id may start again, from nothing
    _upload(store, "open", "n", [_latents(2)])
    assert store.node_data("n")[0].shape == (2, 4)


def test_a_commit_with_missing_chunks_or_over_the_node_budget_stores_nothing(
    store: Store,
) -> None:
    store.register_node(_reg("n"))
    _upload(store, "short", "n", [_latents(2), _latents(2)], commit=False)
    with pytest.raises(InvalidRequestError, match="has 2 chunks staged, expected 3"):
        store.commit_upload("short", 3)
    store.abort_upload("short")
    first = _upload(store, "a", "n", [_latents(4)])
    with pytest.raises(TooLargeError, match="max_node_bytes"):
        _upload(store, "b", "n", [_latents(4)], max_node_bytes=first.payload_bytes + 10)  # type: ignore[attr-defined]
    store.abort_upload("b")
    assert store.node_data("n")[0].shape == (4, 4)


def test_replace_supersedes_and_append_adds(store: Store) -> None:
    store.register_node(_reg("n"))
    _upload(store, "a", "n", [_latents(4)])
    _upload(store, "b", "n", [_latents(2, 50.0)])
    assert store.node_data("n")[0].shape == (6, 4)
    _upload(store, "c", "n", [_latents(3, 9.0)], mode=UploadMode.REPLACE)
    np.testing.assert_array_equal(store.node_data("n")[0], _latents(3, 9.0))
    old = store.committed_ack("a")  # a superseded upload still deduplicates
    assert old is not None and old[1].deduplicated and old[1].stored_samples == 3


def test_blocks_hold_whole_chunks_and_cover_the_data(store: Store) -> None:
    store.register_node(_reg("n"))
    parts = [_latents(n, float(n)) for n in (3, 4, 2, 6)]
    _upload(store, "a", "n", parts)
    blocks = store.node_blocks("n", max_rows=7)
    assert blocks.block_rows == (7, 2, 6) and blocks.samples == 15
    got = np.concatenate([blocks.block(i)[0] for i in range(len(blocks.block_rows))])
    np.testing.assert_array_equal(got, np.concatenate(parts))


def test_removing_a_node_deletes_everything_it_stored(store: Store) -> None:
    store.register_node(_reg("n"))
    store.register_node(_reg("m"))
    _upload(store, "a", "n", [_latents(4)])
    _upload(store, "b", "m", [_latents(2)])
    store.begin_delta("d", "n", base_version=1, samples=4, trainable="head")
    store.put_delta_chunk("d", 0, _delta(0.5))
    store.commit_delta("d", 1)
    assert store.remove_node("n") == (4, 1)
    with pytest.raises(NotFoundError):
        store.remove_node("n")
    assert [s.node_id for s in store.list_nodes()] == ["m"]
    assert store.latest_deltas() == []
    assert store.node_data("m")[0].shape == (2, 4)


# --------------------------------------------------------------------------- deltas, models


def test_the_newest_delta_of_each_node_is_served(store: Store) -> None:
    store.register_node(_reg("n"))
    for i, value in enumerate((0.25, 0.75)):
        store.begin_delta(f"d{i}", "n", base_version=1, samples=10 + i, trainable="head")
        store.put_delta_chunk(f"d{i}", 0, _delta(value))
        ack = store.commit_delta(f"d{i}", 1)
        assert ack.params == 6 and not ack.deduplicated
    (latest,) = store.latest_deltas(base_version=1)
    assert latest.upload_id == "d1" and latest.samples == 11
    np.testing.assert_array_equal(
        np.frombuffer(latest.entries[0].values.data, np.float32), np.full(6, 0.75, np.float32)
    )
    assert store.latest_deltas(base_version=2) == []
    again = store.committed_delta_ack("d0")
    assert again is not None and again[1].deduplicated
    status = store.list_nodes()[0]
    assert status.deltas == 2 and status.delta_base_version == 1 and status.delta_bytes > 0


def test_models_and_classifiers_are_versioned(store: Store) -> None:
    assert store.get_model() is None and store.classifier_version() == 0
    one = store.add_model(b"base", "h1", parent=0, source="upload")
    two = store.add_model(b"tuned", "h2", parent=1, source="aggregate", nodes=("n",), samples=5)
    assert (one.version, two.version) == (1, 2)
    got = store.get_model()
    assert got is not None and got[0].version == 2 and got[1] == b"tuned"
    assert [m.nodes for m in store.list_models()] == [(), ("n",)]
    versions = [store.save_classifier({"mode": "per_node", "i": i}, bytes([i])) for i in range(5)]
    assert versions == sorted(versions) and len(set(versions)) == 5
    latest = store.latest_classifier()
    assert latest is not None and latest[0] == versions[-1] == store.classifier_version()
    assert latest[1]["i"] == 4 and latest[2] == b"\x04"


def test_tokens_are_stored_found_and_revoked(store: Store) -> None:
    _, node_token = new_token("n")
    _, admin = new_token("ops", admin=True)
    store.add_token(node_token)
    store.add_token(admin)
    assert store.find_token(node_token.token_id) == node_token
    assert store.find_token("nope") is None
    assert store.revoke_tokens(subject="n") == 1
    assert store.revoke_tokens(subject="n") == 0
    revoked = store.find_token(node_token.token_id)
    assert revoked is not None and revoked.revoked_at is not None
    assert {t.token_id for t in store.list_tokens()} == {node_token.token_id, admin.token_id}


# --------------------------------------------------------------------------- scheduling rounds


def test_a_round_is_planned_once_and_waits_for_its_uploaders(store: Store) -> None:
    for node in ("a", "b", "c"):
        store.register_node(_reg(node))
    assert store.round_state() is None
    assert store.save_plan(1, '{"round": 1}', ["a", "b"])
    assert not store.save_plan(1, '{"round": 1, "other": true}', ["c"])  # planned already
    assert store.last_plan() == (1, '{"round": 1}')
    state = store.round_state()
    assert state is not None and (state.round, state.waiting) == (1, 2)
    assert abs(state.created_at - time.time()) < 60
    _upload(store, "a1", "a", [_latents(2)])
    assert store.round_state().waiting == 1  # type: ignore[union-attr]
    _upload(store, "c1", "c", [_latents(2)])  # not awaited: no change
    assert store.round_state().waiting == 1  # type: ignore[union-attr]
    store.begin_delta("bd", "b", base_version=1, samples=3, trainable="head")
    store.put_delta_chunk("bd", 0, _delta(1.0))
    store.commit_delta("bd", 1)  # a delta counts as the round's upload too
    assert store.round_state().waiting == 0  # type: ignore[union-attr]
    assert store.save_plan(2, '{"round": 2}', ["c"])
    store.remove_node("c")  # a removed node is no longer awaited
    assert store.round_state().waiting == 0  # type: ignore[union-attr]


# --------------------------------------------------------------------------- restarts


def test_a_restart_discards_unfinished_uploads_and_keeps_committed_ones(
    reopen: Callable[[], Store],
) -> None:
    first = reopen()
    first.register_node(_reg("n"))
    _upload(first, "done", "n", [_latents(3)])
    _upload(first, "half", "n", [_latents(2)], commit=False)
    first.begin_delta("dh", "n", base_version=1, samples=1, trainable="head")
    first.put_delta_chunk("dh", 0, _delta(2.0))
    first.close()  # a crash leaves the same: open uploads, written payloads
    second = reopen()
    np.testing.assert_array_equal(second.node_data("n")[0], _latents(3))
    with pytest.raises(ConflictError, match="not open"):
        second.commit_upload("half", 1)
    with pytest.raises(ConflictError, match="not open"):
        second.commit_delta("dh", 1)
    _upload(second, "half", "n", [_latents(1)])  # the id is free again
    assert second.node_data("n")[0].shape == (4, 4)


def test_driver_errors_become_store_errors(store: Store, backend: str, tmp_path: Path) -> None:
    # vandalise the schema from outside the store, then use it
    conn = store._conn()  # type: ignore[attr-defined]
    conn.execute("DROP TABLE nodes")
    with pytest.raises(StoreError, match="database error in list_nodes"):
        store.list_nodes()
    with pytest.raises(StoreError, match="database error in register_node"):
        store.register_node(_reg("n"))


# --------------------------------------------------------------------------- replicas


@pytest.fixture
def replicas(reopen: Callable[[], Store]) -> tuple[Store, Store]:
    return reopen(), reopen()


@only_shared
def test_replicas_see_each_others_uploads_and_dedupe_across(replicas: tuple[Store, Store]) -> None:
    a, b = replicas
    a.register_node(_reg("n"))
    _upload(b, "u", "n", [_latents(4)])
    np.testing.assert_array_equal(a.node_data("n")[0], _latents(4))
    dup = a.committed_ack("u")
    assert dup is not None and dup[1].deduplicated and dup[1].stored_samples == 4
    assert a.data_version() == b.data_version()


@only_shared
def test_a_replica_starting_keeps_the_open_uploads_of_live_replicas(
    replicas: tuple[Store, Store], reopen: Callable[[], Store]
) -> None:
    a, _b = replicas
    a.register_node(_reg("n"))
    _upload(a, "streaming", "n", [_latents(2), _latents(3)], commit=False)
    late = reopen()  # its start-up sweep must not take a live replica's upload
    assert late.node_data("n")[0].shape == (0, 4)
    a.commit_upload("streaming", 2)
    assert late.node_data("n")[0].shape == (5, 4)


@only_shared
def test_one_stream_per_upload_id_and_one_trainer_across_replicas(
    replicas: tuple[Store, Store],
) -> None:
    a, b = replicas
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with a.upload_guard("u-1", 1.0):
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(10)
    started = time.monotonic()
    with pytest.raises(BusyError, match="another server replica"), b.upload_guard("u-1", 0.3):
        pass
    assert time.monotonic() - started >= 0.25
    with b.upload_guard("u-2", 0.3):  # other ids are free
        pass
    release.set()
    holder.join()
    with b.upload_guard("u-1", 0.3):  # free once the first stream ends
        pass
    with a.training_lease() as mine:
        assert mine
        with b.training_lease() as theirs:
            assert not theirs
    with b.training_lease() as theirs:
        assert theirs


@only_shared
def test_concurrent_commits_through_two_replicas_lose_nothing(
    replicas: tuple[Store, Store],
) -> None:
    a, b = replicas
    for node in ("n0", "n1", "n2", "n3"):
        a.register_node(_reg(node))
    errors: list[BaseException] = []

    def push(store: Store, node: str) -> None:
        try:
            for i in range(5):
                _upload(store, f"{node}-{i}", node, [_latents(2, float(i))])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [
        threading.Thread(target=push, args=(store, node))
        for store, node in ((a, "n0"), (b, "n1"), (a, "n2"), (b, "n3"))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for node in ("n0", "n1", "n2", "n3"):
        assert a.node_data(node)[0].shape == (10, 4) == b.node_data(node)[0].shape
    assert sum(s.uploads for s in b.list_nodes()) == 20
