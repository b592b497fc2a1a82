"""Transfer learning over a real gRPC server and a real SQLite file: models down, deltas up."""

from __future__ import annotations

import hashlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from common.delta import DeltaEncoding, DeltaEntry, DeltaKind, encode_delta, stats
from common.errors import ConfigError, UplinkError
from common.modelfile import ModelFile, parse_model_bytes, read_model_file, write_model_file
from common.models import ClassifierConfig
from common.records import DeltaAck, DeltaChunk, NodeRegistration
from common.serde import delta_chunk_to_proto
from common.tensors import to_wire
from common.zoo import ModelSpec
from edge.uplink import DownloadedModel, RetryPolicy, UplinkClient
from protos import uplink_pb2, uplink_pb2_grpc
from server.classifier import ClassifierMode
from server.core import IngestLimits, SplitLearningServer
from server.grpc_app import create_server
from server.servicer import UplinkServicer
from server.store import SqliteStore
from server.transfer import ModelHub
from tests.support_transfer import (
    SPEC,
    assert_tensors_close,
    delta_rows,
    hand_delta,
    staged_delta_chunks,
    write_base,
)

EXACT = {"head.weight", "last_block.0.weight", "features.1.bias"}  # all but the low-rank one


@dataclass
class Hub:
    address: str
    db: Path
    core: SplitLearningServer
    channel: grpc.Channel
    base: ModelFile
    base_hash: str
    base_bytes: bytes
    cache: Path

    def client(self) -> UplinkClient:
        return UplinkClient(self.address, retry=RetryPolicy(window_s=5))


def _serve(
    tmp_path: Path, *, aggregate_after: int = 0, max_upload_bytes: int = 1_000_000
) -> Iterator[Hub]:
    db = tmp_path / "server.db"
    base_path = tmp_path / "base.safetensors"
    base, digest = write_base(base_path)
    store = SqliteStore(db)
    core = SplitLearningServer(
        store,
        limits=IngestLimits(max_upload_bytes=max_upload_bytes),
        classifier_mode=ClassifierMode.PER_NODE,
        classifier_config=ClassifierConfig(epochs=5),
        aggregate_after=aggregate_after,
    )
    version = core.hub.load_base(base_path)
    assert (version.version, version.hash) == (1, digest)
    core.start()
    server, port, _health = create_server("127.0.0.1:0", UplinkServicer(core))
    address = f"127.0.0.1:{port}"
    channel = grpc.insecure_channel(address)
    try:
        yield Hub(
            address,
            db,
            core,
            channel,
            base,
            digest,
            base_path.read_bytes(),
            tmp_path / "cache",
        )
    finally:
        channel.close()
        server.stop(grace=None).wait()
        core.stop()
        store.close()


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    yield from _serve(tmp_path)


def _register(client: UplinkClient, *nodes: str) -> None:
    for node in nodes:
        client.register(NodeRegistration(node_id=node, latent_dim=8, num_classes=10, samples=20))


def _push(
    hub: Hub,
    client: UplinkClient,
    node: str,
    entries: list[DeltaEntry],
    *,
    samples: int = 20,
    upload_id: str | None = None,
    base_version: int = 1,
    base_hash: str | None = None,
    chunk_bytes: int = 4 * 1024 * 1024,
    trainable: str = "test",
) -> tuple[DeltaAck, int]:
    return client.push_delta(
        node,
        entries,
        base_version=base_version,
        base_hash=hub.base_hash if base_hash is None else base_hash,
        samples=samples,
        trainable=trainable,
        upload_id=upload_id,
        chunk_bytes=chunk_bytes,
    )


def _stub(hub: Hub) -> uplink_pb2_grpc.UplinkStub:
    return uplink_pb2_grpc.UplinkStub(hub.channel)


def _plus(base: dict[str, np.ndarray], dense: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: (v + dense[k]).astype(np.float32) if k in dense else v for k, v in base.items()}


# -- GetModel --------------------------------------------------------------------------------


def test_download_is_verified_by_hash_and_cached(hub: Hub) -> None:
    with hub.client() as client:
        first = client.download_model(hub.cache, node_id="n0")
        assert (first.version, first.hash, first.size_bytes) == (
            1,
            hub.base_hash,
            len(hub.base_bytes),
        )
        assert not first.cached and first.resumed_from == 0
        assert first.path == hub.cache / f"{hub.base_hash}.safetensors"
        assert first.path.read_bytes() == hub.base_bytes
        assert hashlib.sha256(first.path.read_bytes()).hexdigest() == hub.base_hash
        assert not list(hub.cache.glob("*.part"))  # the partial file is gone once complete
        second = client.download_model(hub.cache, node_id="n0")
    assert second.cached and second.path == first.path and second.hash == hub.base_hash
    model, digest = read_model_file(second.path)
    assert digest == hub.base_hash and model.spec == SPEC


def test_concurrent_downloads_into_one_cache_fetch_once(hub: Hub) -> None:
    # nodes on one host share ~/.cache/latentedge/models: one downloads, the others wait for it
    results: list[DownloadedModel] = []
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            with hub.client() as client:
                results.append(client.download_model(hub.cache, node_id="n0"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(results) == 6
    assert sum(not r.cached for r in results) == 1
    assert {r.path for r in results} == {hub.cache / f"{hub.base_hash}.safetensors"}
    assert results[0].path.read_bytes() == hub.base_bytes
    assert not list(hub.cache.glob("*.part"))


def test_a_corrupted_cache_file_is_downloaded_again(hub: Hub) -> None:
    with hub.client() as client:
        got = client.download_model(hub.cache)
        got.path.write_bytes(b"x" + hub.base_bytes[1:])
        again = client.download_model(hub.cache)
    assert not again.cached and again.path.read_bytes() == hub.base_bytes


def test_manifest_describes_the_model(hub: Hub) -> None:
    stream = _stub(hub).GetModel(uplink_pb2.GetModelRequest(node_id="n0"), timeout=10)
    messages = list(stream)
    manifest = messages[0].manifest
    assert messages[0].HasField("manifest")
    assert (manifest.version, manifest.hash, manifest.size_bytes) == (
        1,
        hub.base_hash,
        len(hub.base_bytes),
    )
    assert ModelSpec.from_json(manifest.spec_json) == SPEC
    assert {t.name: tuple(t.shape) for t in manifest.tensors} == hub.base.shapes()
    assert {t.dtype for t in manifest.tensors} == {"float32"}
    assert b"".join(m.data for m in messages[1:]) == hub.base_bytes


@pytest.mark.parametrize("offset", [1, 100_000, "all"])
def test_get_model_streams_from_the_offset(hub: Hub, offset: int | str) -> None:
    start = len(hub.base_bytes) if offset == "all" else int(offset)
    request = uplink_pb2.GetModelRequest(offset=start, expected_hash=hub.base_hash)
    messages = list(_stub(hub).GetModel(request, timeout=10))
    assert messages[0].manifest.hash == hub.base_hash
    data = messages[1:]
    if data:
        assert data[0].offset == start
    assert b"".join(m.data for m in data) == hub.base_bytes[start:]


def test_download_resumes_from_a_partial_file(hub: Hub) -> None:
    hub.cache.mkdir()
    held = 100_000
    (hub.cache / f"{hub.base_hash}.part").write_bytes(hub.base_bytes[:held])
    with hub.client() as client:
        got = client.download_model(hub.cache)
    assert got.resumed_from == held and not got.cached
    assert got.hash == hub.base_hash
    assert got.path.read_bytes() == hub.base_bytes
    assert not (hub.cache / f"{hub.base_hash}.part").exists()


def test_a_resumed_download_with_wrong_held_bytes_is_refused_then_restarts(hub: Hub) -> None:
    hub.cache.mkdir()
    part = hub.cache / f"{hub.base_hash}.part"
    part.write_bytes(bytes(50_000))  # not the file's first bytes
    with hub.client() as client:
        with pytest.raises(UplinkError, match=r"do not match the manifest"):
            client.download_model(hub.cache)
        assert not part.exists()  # dropped, so the next attempt starts from 0
        got = client.download_model(hub.cache)
    assert got.resumed_from == 0 and got.path.read_bytes() == hub.base_bytes


def test_resume_with_a_stale_hash_is_failed_precondition(hub: Hub) -> None:
    stale = "0" * 64
    for request in (
        uplink_pb2.GetModelRequest(offset=10, expected_hash=stale),
        uplink_pb2.GetModelRequest(offset=10),  # an offset needs the hash it belongs to
    ):
        with pytest.raises(grpc.RpcError) as info:
            list(_stub(hub).GetModel(request, timeout=10))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "start again from offset 0" in str(info.value.details())
    too_far = uplink_pb2.GetModelRequest(
        offset=len(hub.base_bytes) + 1, expected_hash=hub.base_hash
    )
    with pytest.raises(grpc.RpcError) as info:
        list(_stub(hub).GetModel(too_far, timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "past the end of the model" in str(info.value.details())


@pytest.mark.parametrize(
    ("request_fields", "code", "needle"),
    [
        ({"version": 7}, "NOT_FOUND", "base version 7 does not exist (current is 1)"),
        ({"fine_tuned_for": "nobody"}, "NOT_FOUND", "has no committed fine-tuning delta"),
        ({"fine_tuned_for": "bad id!"}, "INVALID_ARGUMENT", "fine_tuned_for must match"),
        ({"version": 1, "fine_tuned_for": "n0"}, "INVALID_ARGUMENT", "not both"),
    ],
)
def test_get_model_refusals(
    hub: Hub, request_fields: dict[str, object], code: str, needle: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(_stub(hub).GetModel(uplink_pb2.GetModelRequest(**request_fields), timeout=10))
    assert info.value.code().name == code
    assert needle in str(info.value.details())


def test_get_model_without_a_base_is_not_found_naming_the_flag(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    core = SplitLearningServer(
        store,
        limits=IngestLimits(max_upload_bytes=1000),
        classifier_mode=ClassifierMode.PER_NODE,
        classifier_config=ClassifierConfig(epochs=1),
    )
    server, port, _ = create_server("127.0.0.1:0", UplinkServicer(core))
    try:
        with UplinkClient(f"127.0.0.1:{port}") as client:
            with pytest.raises(UplinkError, match=r"NOT_FOUND.*--base-model") as info:
                client.download_model(tmp_path / "cache")
            assert info.value.code == "NOT_FOUND"
            assert client.status().models == ()
    finally:
        server.stop(grace=None).wait()
        store.close()


# -- fine-tuned models -----------------------------------------------------------------------


def test_fine_tuned_model_equals_base_plus_delta(hub: Hub) -> None:
    entries, dense = hand_delta(hub.base.tensors)
    with hub.client() as client:
        _register(client, "n0")
        ack, wire_bytes = _push(hub, client, "n0", entries, upload_id="d-1", chunk_bytes=1)
        assert ack.tensors == 4 and not ack.deduplicated
        assert (ack.base_version, ack.current_version) == (1, 1)
        assert ack.params == stats(entries).params
        assert ack.payload_bytes == stats(entries).payload_bytes
        assert wire_bytes > ack.payload_bytes
        got = client.download_model(hub.cache, node_id="n0", fine_tuned_for="n0")
        status = client.status()
    assert got.delta_upload_id == "d-1" and got.version == 1
    assert got.hash == hashlib.sha256(got.path.read_bytes()).hexdigest() != hub.base_hash
    tuned, _ = read_model_file(got.path)
    assert tuned.spec == SPEC
    assert tuned.meta["base_hash"] == hub.base_hash and tuned.meta["delta_upload_id"] == "d-1"
    assert_tensors_close(tuned.tensors, _plus(hub.base.tensors, dense), exact=EXACT)
    (node,) = status.nodes
    assert (node.deltas, node.delta_bytes, node.delta_base_version) == (1, ack.payload_bytes, 1)


def test_fine_tuned_model_is_the_newest_delta(hub: Hub) -> None:
    first, _ = hand_delta(hub.base.tensors, seed=1)
    second, dense = hand_delta(hub.base.tensors, seed=2)
    with hub.client() as client:
        _register(client, "n0")
        _push(hub, client, "n0", first)
        _push(hub, client, "n0", second, upload_id="newest")
        got = client.download_model(hub.cache, fine_tuned_for="n0")
        assert client.status().nodes[0].deltas == 2
    assert got.delta_upload_id == "newest"
    tuned, _ = read_model_file(got.path)
    assert_tensors_close(tuned.tensors, _plus(hub.base.tensors, dense), exact=EXACT)


def test_fine_tuned_model_keeps_its_hash_across_a_server_restart(hub: Hub) -> None:
    # a node resumes or re-uses a cached fine-tuned model by hash: the server must rebuild the
    # same bytes after a restart (a new hub over the same store)
    entries, _ = hand_delta(hub.base.tensors)
    with hub.client() as client:
        _register(client, "n0")
        _push(hub, client, "n0", entries)
    first = hub.core.hub.fine_tuned("n0")
    fresh = ModelHub(hub.core.store).fine_tuned("n0")
    assert fresh.hash == first.hash
    assert fresh.data == first.data


def test_fine_tuned_model_built_from_a_real_encoding(hub: Hub) -> None:
    # the edge's own path: encode (new - base) with top-k + int8, push, download
    rng = np.random.default_rng(5)
    new = {
        k: v + rng.normal(size=v.shape).astype(np.float32) * 0.01
        for k, v in hub.base.tensors.items()
    }
    entries = encode_delta(hub.base.tensors, new, DeltaEncoding.parse("topk:0.01+int8"))
    with hub.client() as client:
        _register(client, "n0")
        ack, _ = _push(hub, client, "n0", entries)
        got = client.download_model(hub.cache, fine_tuned_for="n0")
    n = sum(v.size for v in hub.base.tensors.values())
    assert ack.params == -(-n // 100)  # ceil(1 % of the parameters)
    tuned, _ = read_model_file(got.path)
    changed = sum(int(np.sum(tuned.tensors[k] != hub.base.tensors[k])) for k in hub.base.tensors)
    assert changed == ack.params
    for k, v in tuned.tensors.items():  # int8 error bound per tensor: scale / 2
        kept = v != hub.base.tensors[k]
        if kept.any():
            d = (new[k] - hub.base.tensors[k])[kept]
            scale = float(np.max(np.abs(d))) / 127
            err = np.abs((v - hub.base.tensors[k])[kept] - d)
            assert float(np.max(err)) <= scale / 2 + 1e-6


# -- dedupe and refusals ---------------------------------------------------------------------


def test_resent_upload_id_is_deduplicated(hub: Hub) -> None:
    entries, dense = hand_delta(hub.base.tensors)
    with hub.client() as client:
        _register(client, "n0")
        first, _ = _push(hub, client, "n0", entries, upload_id="u-1", chunk_bytes=1)
        before = client.download_model(hub.cache, fine_tuned_for="n0")
        again, _ = _push(hub, client, "n0", entries, upload_id="u-1", chunk_bytes=1)
        after = client.download_model(hub.cache, fine_tuned_for="n0")
        status = client.status()
    assert not first.deduplicated and again.deduplicated
    assert (again.tensors, again.params, again.payload_bytes) == (
        first.tensors,
        first.params,
        first.payload_bytes,
    )
    assert delta_rows(hub.db) == [("u-1", "n0", "committed")]
    assert staged_delta_chunks(hub.db) == 4  # one chunk per tensor, stored once
    assert status.nodes[0].deltas == 1
    assert after.hash == before.hash
    tuned, _ = read_model_file(after.path)
    assert_tensors_close(tuned.tensors, _plus(hub.base.tensors, dense), exact=EXACT)


def test_concurrent_streams_of_one_upload_id_are_applied_once(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    entries, _ = hand_delta(hub.base.tensors)
    with hub.client() as client:
        _register(client, "n0")
    acks = []
    errors: list[BaseException] = []
    streams = 4
    # server side: each stream, once its first chunk has arrived, waits until all four are
    # open, so that they overlap for certain; its open and answer times are recorded
    all_open = threading.Barrier(streams, timeout=10)
    spans: list[tuple[float, float]] = []
    alone: list[float] = []
    ingest = hub.core.ingest_delta

    def recorded(chunks: Iterator[DeltaChunk]) -> DeltaAck:
        first = next(chunks)
        opened = time.monotonic()
        try:
            all_open.wait()
        except threading.BrokenBarrierError:
            alone.append(opened)
            raise
        try:
            return ingest(itertools.chain([first], chunks))
        finally:
            spans.append((opened, time.monotonic()))

    monkeypatch.setattr(hub.core, "ingest_delta", recorded)

    def push() -> None:
        try:
            with hub.client() as c:
                acks.append(_push(hub, c, "n0", entries, upload_id="same", chunk_bytes=1)[0])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=push) for _ in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not alone, "the streams were never all open on the server at the same time"
    assert not errors
    # the four streams were open on the server at the same time
    assert len(spans) == streams
    assert max(opened for opened, _ in spans) < min(answered for _, answered in spans)
    assert sorted(a.deduplicated for a in acks) == [False, True, True, True]
    assert delta_rows(hub.db) == [("same", "n0", "committed")]


def _entry(name: str, array: np.ndarray) -> DeltaEntry:
    return DeltaEntry(name, DeltaKind.DENSE, to_wire(np.asarray(array, dtype=np.float32)))


def _with_bad(hub: Hub, bad: DeltaEntry) -> list[DeltaEntry]:
    good = _entry("head.bias", np.full(10, 0.5))
    return [good, bad]


BAD_ENTRIES = {
    "unknown tensor name": (
        lambda b: _entry("head.gamma", np.zeros(10)),
        "unknown tensor name 'head.gamma'",
    ),
    "wrong shape": (
        lambda b: _entry("head.weight", np.zeros((128, 10))),
        "delta of tensor 'head.weight': values.shape must be [10, 128]",
    ),
    "NaN": (
        lambda b: _entry("head.weight", np.where(np.eye(10, 128) > 0, np.nan, 0)),
        "delta of tensor 'head.weight' has 10 NaN/Inf value(s)",
    ),
    "Inf": (
        lambda b: _entry("head.weight", np.where(np.eye(10, 128) > 0, -np.inf, 0)),
        "NaN/Inf",
    ),
    "positions out of range": (
        lambda b: DeltaEntry(
            "head.bias",
            DeltaKind.SPARSE_INDEX,
            to_wire(np.ones(2, np.float32)),
            positions=to_wire(np.array([3, 10], np.uint16)),
        ),
        "positions must be strictly ascending and in 0..9",
    ),
}


@pytest.mark.parametrize("case", list(BAD_ENTRIES))
def test_bad_delta_is_invalid_argument_and_the_server_keeps_serving(hub: Hub, case: str) -> None:
    make, needle = BAD_ENTRIES[case]
    bad = make(hub.base.tensors)
    entries = [bad] if bad.name == "head.bias" else _with_bad(hub, bad)
    good, dense = hand_delta(hub.base.tensors)
    with hub.client() as client:
        _register(client, "n0")
        with pytest.raises(UplinkError) as info:
            _push(hub, client, "n0", entries, upload_id="bad-1", chunk_bytes=1)
        assert info.value.code == "INVALID_ARGUMENT"
        assert needle in str(info.value)
        assert delta_rows(hub.db) == [] and staged_delta_chunks(hub.db) == 0
        # the server keeps serving: the same upload id, now with a good delta, is applied
        ack, _ = _push(hub, client, "n0", good, upload_id="bad-1")
        assert not ack.deduplicated
        tuned, _ = read_model_file(client.download_model(hub.cache, fine_tuned_for="n0").path)
    assert delta_rows(hub.db) == [("bad-1", "n0", "committed")]
    assert_tensors_close(tuned.tensors, _plus(hub.base.tensors, dense), exact=EXACT)


@pytest.mark.parametrize(
    ("fields", "code", "needle"),
    [
        ({"base_version": 2}, "FAILED_PRECONDITION", "base version mismatch"),
        ({"base_version": 99}, "FAILED_PRECONDITION", "base version 99 does not exist"),
        ({"base_hash": "f" * 64}, "FAILED_PRECONDITION", "the delta names " + "f" * 64),
        ({"base_hash": ""}, "FAILED_PRECONDITION", "the delta names (empty)"),
        ({"base_version": 0}, "INVALID_ARGUMENT", "base_version must be >= 1"),
        ({"samples": 0}, "INVALID_ARGUMENT", "samples must be in 1.."),
        ({"node": "ghost"}, "NOT_FOUND", "ghost"),
        ({"trainable": "head\x00; drop"}, "INVALID_ARGUMENT", "trainable must be printable"),
    ],
)
def test_delta_refused_on_base_node_and_samples(
    hub: Hub, fields: dict[str, object], code: str, needle: str
) -> None:
    entries = [_entry("head.bias", np.ones(10))]
    with hub.client() as client:
        _register(client, "n0")
        with pytest.raises(UplinkError) as info:
            _push(
                hub,
                client,
                str(fields.get("node", "n0")),
                entries,
                base_version=int(str(fields.get("base_version", 1))),
                base_hash=None if "base_hash" not in fields else str(fields["base_hash"]),
                samples=int(str(fields.get("samples", 20))),
                trainable=str(fields.get("trainable", "test")),
            )
        assert info.value.code == code
        assert needle in str(info.value)
        assert delta_rows(hub.db) == []
        ack, _ = _push(hub, client, "n0", entries)  # still serving
    assert not ack.deduplicated and len(delta_rows(hub.db)) == 1


def _raw_chunks(
    hub: Hub, entries: list[DeltaEntry], *, upload_id: str, last: bool
) -> list[uplink_pb2.DeltaChunk]:
    return [
        delta_chunk_to_proto(
            DeltaChunk(
                node_id="n0",
                upload_id=upload_id,
                seq=i,
                last=last and i == len(entries) - 1,
                tensors=(entry,),
                base_version=1,
                base_hash=hub.base_hash,
                samples=20,
                total_tensors=len(entries),
            )
        )
        for i, entry in enumerate(entries)
    ]


def test_truncated_stream_stores_nothing(hub: Hub) -> None:
    entries, _ = hand_delta(hub.base.tensors)
    with hub.client() as client:
        _register(client, "n0")
    chunks = _raw_chunks(hub, entries, upload_id="t-1", last=False)
    with pytest.raises(grpc.RpcError) as info:
        _stub(hub).PushDelta(iter(chunks), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "without a chunk marked last" in str(info.value.details())
    assert delta_rows(hub.db) == [] and staged_delta_chunks(hub.db) == 0
    with hub.client() as client:
        with pytest.raises(UplinkError, match="NOT_FOUND"):
            client.download_model(hub.cache, fine_tuned_for="n0")
        assert client.status().nodes[0].deltas == 0
        # the same upload id, complete this time, is applied
        ack, _ = _push(hub, client, "n0", entries, upload_id="t-1")
    assert not ack.deduplicated and delta_rows(hub.db) == [("t-1", "n0", "committed")]


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda cs: cs[:1] + cs[2:], "seq must be 1"),
        (lambda cs: [*cs, cs[-1]], "chunk after the one marked last"),
        (lambda cs: [*cs[:2], cs[0], *cs[3:]], "seq must be 2"),
    ],
    ids=["gap", "after-last", "repeat"],
)
def test_malformed_streams_store_nothing(
    hub: Hub,
    mutate: Callable[[list[uplink_pb2.DeltaChunk]], list[uplink_pb2.DeltaChunk]],
    needle: str,
) -> None:
    entries, _ = hand_delta(hub.base.tensors)
    with hub.client() as client:
        _register(client, "n0")
    chunks = mutate(_raw_chunks(hub, entries, upload_id="m-1", last=True))
    with pytest.raises(grpc.RpcError) as info:
        _stub(hub).PushDelta(iter(chunks), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in str(info.value.details())
    assert delta_rows(hub.db) == [] and staged_delta_chunks(hub.db) == 0


def test_duplicate_tensor_across_chunks_is_refused(hub: Hub) -> None:
    entries = [_entry("head.bias", np.ones(10)), _entry("head.bias", np.ones(10))]
    with hub.client() as client:
        _register(client, "n0")
        with pytest.raises(UplinkError, match=r"INVALID_ARGUMENT.*'head.bias' appears twice"):
            _push(hub, client, "n0", entries, chunk_bytes=1)
    assert delta_rows(hub.db) == []


def test_delta_over_the_size_limit_is_resource_exhausted(tmp_path: Path) -> None:
    for hub in _serve(tmp_path, max_upload_bytes=150_000):
        dense = {k: v + 1 for k, v in hub.base.tensors.items()}
        with hub.client() as client:
            _register(client, "n0")
            fp32 = encode_delta(hub.base.tensors, dense, DeltaEncoding.parse("fp32"))
            assert stats(fp32).payload_bytes > 150_000
            with pytest.raises(UplinkError) as info:
                _push(hub, client, "n0", fp32, chunk_bytes=1)
            assert info.value.code == "RESOURCE_EXHAUSTED"
            assert delta_rows(hub.db) == [] and staged_delta_chunks(hub.db) == 0
            fp16 = encode_delta(hub.base.tensors, dense, DeltaEncoding.parse("fp16"))
            assert stats(fp16).payload_bytes < 150_000
            ack, _ = _push(hub, client, "n0", fp16)
        assert ack.payload_bytes == stats(fp16).payload_bytes


# -- aggregation -----------------------------------------------------------------------------


def _two_node_oracle(
    hub: Hub, d0: dict[str, np.ndarray], d1: dict[str, np.ndarray], n0: int, n1: int
) -> dict[str, np.ndarray]:
    out = {}
    for k, v in hub.base.tensors.items():
        acc = v.astype(np.float64)
        for d, n in ((d0, n0), (d1, n1)):
            if k in d:  # a tensor a node left out counts as an unchanged (zero) delta
                acc = acc + (n / (n0 + n1)) * d[k].astype(np.float64)
        out[k] = acc.astype(np.float32)
    return out


def test_aggregate_is_the_sample_weighted_average(hub: Hub) -> None:
    e0, d0 = hand_delta(hub.base.tensors, seed=10)
    e1 = [_entry("head.weight", np.full((10, 128), 0.25)), _entry("head.bias", np.ones(10))]
    d1 = {"head.weight": np.full((10, 128), 0.25, np.float32), "head.bias": np.ones(10, np.float32)}
    with hub.client() as client:
        _register(client, "n0", "n1")
        stale, _ = hand_delta(hub.base.tensors, seed=11)
        _push(hub, client, "n0", stale)  # superseded by n0's newer delta below
        _push(hub, client, "n0", e0, samples=30)
        _push(hub, client, "n1", e1, samples=10)
        made = client.aggregate()
        status = client.status()
        got = client.download_model(hub.cache)  # the current base is now version 2
    assert (made.version, made.parent_version, made.source) == (2, 1, "aggregate")
    assert made.nodes == ("n0", "n1") and made.samples == 40
    assert [m.version for m in status.models] == [1, 2]
    v1, v2 = status.models
    assert v1.hash == hub.base_hash and v1.parent_version == 0 and v1.source.startswith("file:")
    assert v2.hash == made.hash == got.hash and v2.nodes == ("n0", "n1") and v2.samples == 40
    assert got.version == 2 and not got.cached
    model, _ = read_model_file(got.path)
    assert model.meta["parent_version"] == "1"
    want = _two_node_oracle(hub, d0, d1, 30, 10)
    assert_tensors_close(model.tensors, want)
    # untouched tensors stay bit for bit
    np.testing.assert_array_equal(
        model.tensors["last_block.0.bias"], hub.base.tensors["last_block.0.bias"]
    )


def test_aggregate_refusals_and_version_bumps(hub: Hub) -> None:
    entries = [_entry("head.bias", np.ones(10))]
    with hub.client() as client:
        _register(client, "n0", "n1")
        with pytest.raises(UplinkError) as info:
            client.aggregate()
        assert info.value.code == "FAILED_PRECONDITION"
        assert "0 node(s) sent a delta against base version 1; need at least 1" in str(info.value)
        _push(hub, client, "n0", entries)
        with pytest.raises(UplinkError, match=r"1 node\(s\) .* need at least 2"):
            client.aggregate(min_nodes=2)
        assert client.aggregate().version == 2
        # the n0 delta was against version 1: nothing is pending against version 2
        with pytest.raises(UplinkError, match="FAILED_PRECONDITION"):
            client.aggregate()
        # a delta against v2 aggregates into v3; one still against v1 is accepted but not averaged
        v2 = client.download_model(hub.cache)
        client.push_delta(
            "n1", entries, base_version=2, base_hash=v2.hash, samples=5, upload_id="on-v2"
        )
        ack, _ = _push(hub, client, "n0", [_entry("head.bias", np.full(10, 100.0))])
        assert ack.base_version == 1 and ack.current_version == 2
        v3 = client.aggregate()
        status = client.status()
    assert (v3.version, v3.parent_version, v3.nodes, v3.samples) == (3, 2, ("n1",), 5)
    assert [m.version for m in status.models] == [1, 2, 3]
    base3 = parse_model_bytes(hub.core.hub.base(3).data)
    np.testing.assert_allclose(
        base3.tensors["head.bias"], hub.base.tensors["head.bias"] + 2, rtol=1e-6
    )


def test_aggregate_after_two_nodes_happens_by_itself(tmp_path: Path) -> None:
    for hub in _serve(tmp_path, aggregate_after=2):
        e0, d0 = hand_delta(hub.base.tensors, seed=20)
        e1, d1 = hand_delta(hub.base.tensors, seed=21)
        with hub.client() as client:
            _register(client, "n0", "n1")
            a0, _ = _push(hub, client, "n0", e0, samples=5)
            assert a0.current_version == 1 and [m.version for m in client.status().models] == [1]
            again, _ = _push(hub, client, "n0", e0, samples=5, upload_id=a0.upload_id)
            assert again.deduplicated and again.current_version == 1  # one node, still
            a1, _ = _push(hub, client, "n1", e1, samples=15)
            status = client.status()
            got = client.download_model(hub.cache)
        assert a1.current_version == 2 and not a1.deduplicated
        assert [m.version for m in status.models] == [1, 2]
        assert status.models[1].nodes == ("n0", "n1") and status.models[1].samples == 20
        model, _ = read_model_file(got.path)
        assert got.version == 2
        assert_tensors_close(model.tensors, _two_node_oracle(hub, d0, d1, 5, 15))


# -- base versions on the hub ----------------------------------------------------------------


def test_load_base_reuses_the_same_file_and_versions_a_new_one(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    try:
        hub = ModelHub(store)
        _, h1 = write_base(tmp_path / "a.safetensors", seed=0)
        assert hub.load_base(tmp_path / "a.safetensors").version == 1
        assert hub.load_base(tmp_path / "a.safetensors").version == 1  # the same file again
        _, h2 = write_base(tmp_path / "b.safetensors", seed=1)
        v2 = hub.load_base(tmp_path / "b.safetensors")
        assert (v2.version, v2.hash, v2.parent_version) == (2, h2, 1)
        assert v2.source == f"file:{tmp_path / 'b.safetensors'}"
        assert [v.hash for v in hub.versions()] == [h1, h2]
        assert hub.base().hash == h2 and hub.base(1).hash == h1
        assert hub.base(1).data == (tmp_path / "a.safetensors").read_bytes()
    finally:
        store.close()


def test_load_base_refuses_a_file_whose_tensors_do_not_fit_its_spec(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    try:
        model, _ = write_base(tmp_path / "a.safetensors")
        broken = ModelFile(ModelSpec("mlp", 1, 8, 8, 7), model.tensors)  # head has 10 outputs
        write_model_file(broken, tmp_path / "broken.safetensors")
        with pytest.raises(ConfigError, match=r"head.weight"):
            ModelHub(store).load_base(tmp_path / "broken.safetensors")
        assert store.list_models() == []  # nothing a node could not build is ever served
    finally:
        store.close()


def test_load_base_refuses_a_file_that_is_not_a_model(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    try:
        (tmp_path / "x.bin").write_bytes(b"hello")
        with pytest.raises(ConfigError, match=r"x.bin.* is not a safetensors model file"):
            ModelHub(store).load_base(tmp_path / "x.bin")
        assert store.list_models() == []
    finally:
        store.close()


class _DroppingServicer(UplinkServicer):
    """Sends ``drops`` GetModel streams only part of the way, then fails them UNAVAILABLE."""

    def __init__(self, core: SplitLearningServer, drops: int) -> None:
        super().__init__(core, model_chunk_bytes=16 * 1024)
        self.drops = drops
        self.offsets: list[int] = []

    def GetModel(
        self, request: uplink_pb2.GetModelRequest, context: grpc.ServicerContext
    ) -> Iterator[uplink_pb2.ModelChunk]:
        self.offsets.append(int(request.offset))
        for sent, msg in enumerate(super().GetModel(request, context), start=1):
            yield msg
            if self.drops and sent == 3:  # manifest + 2 chunks, then the connection "drops"
                self.drops -= 1
                context.abort(grpc.StatusCode.UNAVAILABLE, "connection dropped (test)")


def test_download_resumes_after_dropped_connections(hub: Hub) -> None:
    servicer = _DroppingServicer(hub.core, drops=2)
    server, port, _ = create_server("127.0.0.1:0", servicer)
    try:
        with UplinkClient(
            f"127.0.0.1:{port}", retry=RetryPolicy(window_s=10, initial_backoff_s=0.05)
        ) as client:
            got = client.download_model(hub.cache, node_id="n0")
    finally:
        server.stop(grace=None).wait()
    chunk = 16 * 1024
    assert len(hub.base_bytes) > 5 * chunk
    # each attempt went on from the last byte received: 0, then 2 chunks, then 4 chunks
    assert servicer.offsets == [0, 2 * chunk, 4 * chunk]
    assert got.resumed_from == 4 * chunk and not got.cached
    assert got.path.read_bytes() == hub.base_bytes
    assert hashlib.sha256(got.path.read_bytes()).hexdigest() == hub.base_hash
    assert not list(hub.cache.glob("*.part"))


# -- review fixes: hostile numbers and hostile servers ---------------------------------------


def test_versions_past_the_stores_range_are_not_found(hub: Hub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(_stub(hub).GetModel(uplink_pb2.GetModelRequest(version=2**63), timeout=10))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with hub.client() as client:
        _register(client, "n0")
        with pytest.raises(UplinkError, match=r"FAILED_PRECONDITION.*does not exist"):
            _push(hub, client, "n0", hand_delta(hub.base.tensors)[0], base_version=2**63)
        assert client.status().nodes[0].deltas == 0  # and the server keeps serving


def test_an_empty_chunk_before_the_last_is_refused(hub: Hub) -> None:
    with hub.client() as client:
        _register(client, "n0")
    entries = hand_delta(hub.base.tensors)[0]
    chunks = [
        delta_chunk_to_proto(
            DeltaChunk("n0", "u-empty", seq, seq == 1, tuple(group), 1, hub.base_hash, 20)
        )
        for seq, group in enumerate(([], entries))
    ]
    with pytest.raises(grpc.RpcError) as info:
        _stub(hub).PushDelta(iter(chunks), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "chunk 0 carries no tensors" in str(info.value.details())


class _LyingServicer(UplinkServicer):
    """A hostile server: announces a 100-byte model, then keeps sending data."""

    def __init__(self, core: SplitLearningServer, *, manifest_first: bool) -> None:
        super().__init__(core)
        self.manifest_first = manifest_first

    def GetModel(
        self, request: uplink_pb2.GetModelRequest, context: grpc.ServicerContext
    ) -> Iterator[uplink_pb2.ModelChunk]:
        if self.manifest_first:
            yield uplink_pb2.ModelChunk(
                manifest=uplink_pb2.ModelManifest(version=1, hash="a" * 64, size_bytes=100)
            )
        for i in range(50):
            yield uplink_pb2.ModelChunk(offset=i * 65536, data=b"x" * 65536)


@pytest.mark.parametrize("manifest_first", [True, False])
def test_a_lying_server_cannot_fill_the_clients_memory_or_disk(
    hub: Hub, tmp_path: Path, manifest_first: bool
) -> None:
    server, port, _ = create_server(
        "127.0.0.1:0", _LyingServicer(hub.core, manifest_first=manifest_first)
    )
    cache = tmp_path / "lying-cache"
    try:
        with (
            UplinkClient(f"127.0.0.1:{port}", retry=RetryPolicy(window_s=1)) as client,
            pytest.raises(UplinkError, match="protocol error"),
        ):
            client.download_model(cache)
    finally:
        server.stop(grace=None).wait()
    assert sum(f.stat().st_size for f in cache.glob("*")) <= 100
