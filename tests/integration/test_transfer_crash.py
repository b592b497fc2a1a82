"""SIGKILL the server during and right after a delta upload, restart it: applied exactly once."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from common.delta import DeltaEntry
from common.modelfile import ModelFile, read_model_file
from common.records import DeltaChunk, NodeRegistration
from common.serde import delta_chunk_to_proto
from edge.uplink import RetryPolicy, UplinkClient
from protos import uplink_pb2, uplink_pb2_grpc
from tests.conftest import ServerProcess, start_server_process
from tests.support_transfer import (
    assert_tensors_close,
    delta_rows,
    hand_delta,
    staged_delta_chunks,
    write_base,
)

EXACT = {"head.weight", "last_block.0.weight", "features.1.bias"}


def _kill(server: ServerProcess) -> None:
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(timeout=10)


def _client(server: ServerProcess) -> UplinkClient:
    return UplinkClient(server.address, retry=RetryPolicy(window_s=5))


def _chunks(
    entries: list[DeltaEntry], base_hash: str, upload_id: str
) -> list[uplink_pb2.DeltaChunk]:
    """One tensor per chunk, the last one marked last (what push_delta sends, by hand)."""
    return [
        delta_chunk_to_proto(
            DeltaChunk(
                node_id="n0",
                upload_id=upload_id,
                seq=i,
                last=i == len(entries) - 1,
                tensors=(entry,),
                base_version=1,
                base_hash=base_hash,
                samples=20,
                trainable="test",
                total_tensors=len(entries),
            )
        )
        for i, entry in enumerate(entries)
    ]


def _expected(base: ModelFile, dense: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        k: (v + dense[k]).astype(np.float32) if k in dense else v for k, v in base.tensors.items()
    }


def _check_applied_once(
    server: ServerProcess, base: ModelFile, dense: dict[str, np.ndarray], cache: Path
) -> None:
    with _client(server) as client:
        tuned = client.download_model(cache, fine_tuned_for="n0")
        model, _ = read_model_file(tuned.path)
        assert_tensors_close(model.tensors, _expected(base, dense), exact=EXACT)
        assert client.status().nodes[0].deltas == 1
        # averaging the one delta (weight 1) gives base + delta, not base + 2 * delta
        made = client.aggregate()
        assert made.version == 2 and made.nodes == ("n0",)
        v2, _ = read_model_file(client.download_model(cache).path)
    assert_tensors_close(v2.tensors, _expected(base, dense))


def test_sigkill_mid_delta_upload_then_resend_applies_it_once(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    base_path = tmp_path / "base.safetensors"
    base, digest = write_base(base_path)
    entries, dense = hand_delta(base.tensors)
    chunks = _chunks(entries, digest, "delta-1")
    assert len(chunks) == 4
    server = start_server_process(db, "--base-model", str(base_path))
    try:
        with _client(server) as client:
            client.register(NodeRegistration(node_id="n0", latent_dim=8, num_classes=10))
        release = threading.Event()

        def two_then_wait() -> Iterator[uplink_pb2.DeltaChunk]:
            yield from chunks[:2]
            release.wait(30)
            yield from chunks[2:]

        channel = grpc.insecure_channel(server.address)
        future = uplink_pb2_grpc.UplinkStub(channel).PushDelta.future(two_then_wait(), timeout=60)
        deadline = time.monotonic() + 30
        while staged_delta_chunks(db) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert staged_delta_chunks(db) == 2  # half the delta is staged ...
        assert delta_rows(db) == [("delta-1", "n0", "open")]
        _kill(server)
        release.set()
        with pytest.raises(grpc.RpcError) as info:
            future.result()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        channel.close()
    finally:
        server.stop()

    server = start_server_process(db, "--base-model", str(base_path))  # same db, same base
    try:
        with _client(server) as client:
            status = client.status()
            assert [m.version for m in status.models] == [1]  # the same file: no new version
            assert status.nodes[0].deltas == 0  # ... none of it is visible
            assert delta_rows(db) == [] and staged_delta_chunks(db) == 0  # leftovers swept
            ack, _ = client.push_delta(
                "n0",
                entries,
                base_version=1,
                base_hash=digest,
                samples=20,
                upload_id="delta-1",
                chunk_bytes=1,
            )
            assert not ack.deduplicated and ack.tensors == 4
            again, _ = client.push_delta(
                "n0", entries, base_version=1, base_hash=digest, samples=20, upload_id="delta-1"
            )
            assert again.deduplicated
        assert delta_rows(db) == [("delta-1", "n0", "committed")]
        assert staged_delta_chunks(db) == 4
        _check_applied_once(server, base, dense, tmp_path / "cache")
    finally:
        server.stop()


def test_acknowledged_delta_survives_sigkill_and_a_resend_is_deduplicated(
    tmp_path: Path,
) -> None:
    db = tmp_path / "s.db"
    base_path = tmp_path / "base.safetensors"
    base, digest = write_base(base_path)
    entries, dense = hand_delta(base.tensors, seed=3)
    server = start_server_process(db, "--base-model", str(base_path))
    try:
        with _client(server) as client:
            client.register(NodeRegistration(node_id="n0", latent_dim=8, num_classes=10))
            first, _ = client.push_delta(
                "n0",
                entries,
                base_version=1,
                base_hash=digest,
                samples=20,
                upload_id="delta-2",
                chunk_bytes=1,
            )
        _kill(server)  # immediately after the acknowledgement
    finally:
        server.stop()
    assert not first.deduplicated
    server = start_server_process(db, "--base-model", str(base_path))
    try:
        with _client(server) as client:
            again, _ = client.push_delta(
                "n0",
                entries,
                base_version=1,
                base_hash=digest,
                samples=20,
                upload_id="delta-2",
                chunk_bytes=1,
            )
        assert again.deduplicated
        assert (again.tensors, again.params, again.payload_bytes) == (
            first.tensors,
            first.params,
            first.payload_bytes,
        )
        assert delta_rows(db) == [("delta-2", "n0", "committed")]
        _check_applied_once(server, base, dense, tmp_path / "cache")
    finally:
        server.stop()
