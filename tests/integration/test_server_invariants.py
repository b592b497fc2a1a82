"""Server invariants under concurrent retries, id reuse, re-registration and restarts."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from common.errors import CodecError, ConflictError, InvalidRequestError, UplinkError
from common.models import ClassifierConfig
from common.records import EnergyProfile, LatentChunk, NodeRegistration, UploadMode
from common.tensors import to_wire
from edge.uplink import UplinkClient
from server.classifier import ClassifierMode
from server.core import IngestLimits, SplitLearningServer
from server.store import SqliteStore
from tests.support_grpc import RunningServer

X = np.random.default_rng(0).random((10, 4)).astype(np.float32)
Y = (np.arange(10) % 3).astype(np.uint8)


def _core(db: Path) -> SplitLearningServer:
    return SplitLearningServer(
        SqliteStore(db),
        limits=IngestLimits(max_upload_bytes=1 << 30),
        classifier_mode=ClassifierMode.PER_NODE,
        classifier_config=ClassifierConfig(epochs=2),
    )


def _chunk(
    seq: int, last: bool, rows: slice, *, node: str = "n1", upload: str = "up1"
) -> LatentChunk:
    return LatentChunk(
        node, upload, seq, last, to_wire(X[rows]), to_wire(Y[rows]), UploadMode.REPLACE, 10
    )


def test_overlapping_retry_of_the_same_upload_is_stored_once(tmp_path: Path) -> None:
    core = _core(tmp_path / "db")
    core.register(NodeRegistration("n1", 4, 3))
    first_sent, retry_sent, release = threading.Event(), threading.Event(), threading.Event()
    times: dict[str, float] = {}

    def attempt_a() -> Iterator[LatentChunk]:
        times["a_start"] = time.monotonic()
        yield _chunk(0, False, slice(0, 5))
        first_sent.set()
        release.wait(10)
        times["a_last"] = time.monotonic()
        yield _chunk(1, True, slice(5, 10))

    def attempt_b() -> Iterator[LatentChunk]:
        times["b_start"] = time.monotonic()
        retry_sent.set()
        yield _chunk(0, False, slice(0, 5))
        yield _chunk(1, True, slice(5, 10))

    def run(key: str, chunks: Iterator[LatentChunk]) -> None:
        results[key] = core.ingest(chunks)
        times[f"{key}_end"] = time.monotonic()

    results: dict[str, object] = {}
    thread_a = threading.Thread(target=run, args=("a", attempt_a()))
    thread_a.start()
    assert first_sent.wait(10)
    # the client's retry arrives while the first attempt is still streaming: its first chunk is
    # read by the server before the first attempt's last chunk is even produced
    thread_b = threading.Thread(target=run, args=("b", attempt_b()))
    thread_b.start()
    assert retry_sent.wait(10), "the server read nothing of the retry while the first was open"
    time.sleep(0.2)  # the retry reaches the upload lock (or, without one, stores a copy)
    assert "b_end" not in times, "the retry finished while the first attempt was still open"
    release.set()
    thread_a.join(10)
    thread_b.join(10)
    assert not thread_a.is_alive() and not thread_b.is_alive()
    # the two streams overlapped: the retry started before the first attempt sent its last
    # chunk, and it was answered only after the first attempt was
    assert times["a_start"] < times["b_start"] < times["a_last"] < times["a_end"] <= times["b_end"]
    assert not results["a"].deduplicated and results["b"].deduplicated  # type: ignore[attr-defined]
    x, _ = core.store.node_data("n1")
    np.testing.assert_array_equal(x, X)


def test_upload_id_of_another_node_is_refused(tmp_path: Path) -> None:
    core = _core(tmp_path / "db")
    core.register(NodeRegistration("n1", 4, 3))
    core.register(NodeRegistration("n2", 4, 3))
    core.ingest(iter([_chunk(0, True, slice(0, 10))]))
    with pytest.raises(ConflictError, match="belongs to node 'n1'"):
        core.ingest(iter([_chunk(0, True, slice(0, 10), node="n2")]))
    assert len(core.store.node_data("n2")[0]) == 0


def test_latent_dim_change_during_upload_stores_nothing(tmp_path: Path) -> None:
    core = _core(tmp_path / "db")
    core.register(NodeRegistration("n1", 4, 3))

    def stream() -> Iterator[LatentChunk]:
        yield _chunk(0, False, slice(0, 5))
        core.register(NodeRegistration("n1", 8, 3))  # re-registered while streaming
        yield _chunk(1, True, slice(5, 10))

    with pytest.raises((ConflictError, InvalidRequestError)):
        core.ingest(stream())
    assert len(core.store.node_data("n1")[0]) == 0


def test_data_version_is_durable_and_counts_resets(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db")
    store.register_node(NodeRegistration("n1", 4, 3))
    v0 = store.data_version()
    store.begin_upload("u", "n1", UploadMode.REPLACE)
    store.put_chunk("u", 0, to_wire(X), to_wire(Y), 10)
    store.commit_upload("u", 1)
    store.register_node(NodeRegistration("n1", 4, 3, reset=True))
    assert store.data_version() == v0 + 2
    store.close()
    reopened = SqliteStore(tmp_path / "db")
    assert reopened.data_version() == v0 + 2
    reopened.close()


def test_profile_the_scheduler_cannot_use_is_refused_at_registration(tmp_path: Path) -> None:
    core = _core(tmp_path / "db")
    profile = EnergyProfile(
        cpu_hz=1e9,
        kappa=1e-28,
        tx_power_w=0.2,
        channel_gain=0.0,
        energy_budget_j=5.0,
        upload_bits=1e6,
        cycles_per_sample=1e6,
        finetune_energy_j=1.0,
        finetune_latency_s=4.0,
    )  # channel_gain = 0
    with pytest.raises(InvalidRequestError, match="channel_gain"):
        core.register(NodeRegistration("n1", 4, 3, samples=10, profile=profile))


def test_local_encoding_error_is_reported_as_such(grpc_server: RunningServer) -> None:
    x = X.copy()
    x[0, 0] = np.nan
    with UplinkClient(grpc_server.address) as client:
        client.register(NodeRegistration("n1", 4, 3))
        with pytest.raises(CodecError, match="non-finite"):
            client.push_latents("n1", x, Y, num_classes=3, encoding="int8")
        with pytest.raises(UplinkError, match=r"INVALID_ARGUMENT.*NaN"):
            client.push_latents("n1", x, Y, num_classes=3)
