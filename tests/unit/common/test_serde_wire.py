"""The hand-written LatentChunk serialiser gives protobuf's own bytes, and the server reads them."""

from __future__ import annotations

import numpy as np
import pytest

from common.records import LatentChunk, UploadMode
from common.serde import latent_chunk_from_proto, latent_chunk_to_bytes, latent_chunk_to_proto
from common.tensors import from_wire, to_wire, wire_array
from protos import uplink_pb2


def _both(
    latents: np.ndarray,
    labels: np.ndarray,
    *,
    encoding: str | None = "float32",
    node_id: str = "node-1",
    upload_id: str = "u" * 32,
    seq: int = 0,
    last: bool = False,
    mode: UploadMode = UploadMode.REPLACE,
    total_samples: int = 0,
) -> tuple[bytes, bytes]:
    old = latent_chunk_to_proto(
        LatentChunk(
            node_id=node_id,
            upload_id=upload_id,
            seq=seq,
            last=last,
            latents=to_wire(latents, encoding),
            labels=to_wire(labels),
            mode=mode,
            total_samples=total_samples,
        )
    ).SerializeToString()
    new = latent_chunk_to_bytes(
        node_id=node_id,
        upload_id=upload_id,
        seq=seq,
        last=last,
        latents=wire_array(latents, encoding),
        labels=wire_array(labels),
        mode=mode,
        total_samples=total_samples,
    )
    return old, new


@pytest.mark.parametrize("encoding", ["float32", "float16", "int8", None])
@pytest.mark.parametrize("rows", [0, 1, 7, 3000])
def test_same_bytes_as_protobuf(encoding: str | None, rows: int) -> None:
    rng = np.random.default_rng(rows)
    latents = rng.standard_normal((rows, 24)).astype(np.float32)
    labels = rng.integers(0, 10, rows).astype(np.uint8)
    for seq, last, mode, total in [
        (0, False, UploadMode.REPLACE, rows),
        (5, True, UploadMode.APPEND, 0),
        (2**32 - 1, True, UploadMode.REPLACE, 2**63),
    ]:
        old, new = _both(
            latents, labels, encoding=encoding, seq=seq, last=last, mode=mode, total_samples=total
        )
        assert new == old


def test_same_bytes_edge_cases() -> None:
    latents = np.arange(12, dtype=np.float64).reshape(4, 3)  # float64 travels as float32
    for labels in (
        np.array([1, 0, 300, 2], dtype=np.int16),
        np.array([1, 0, 7, 2], dtype=">i4"),  # big-endian input: little-endian on the wire
        np.array([1, 0, 7, 2], dtype=np.int64),
    ):
        assert (
            _both(latents, labels, node_id="", upload_id="")[0]
            == _both(latents, labels, node_id="", upload_id="")[1]
        )
        old, new = _both(latents, labels, node_id="nœud-é", encoding=None)
        assert new == old
    zeros = np.zeros((2, 3), dtype=np.float32)  # int8 of all zeros: scale 1.0
    old, new = _both(zeros, np.zeros(2, dtype=np.uint8), encoding="int8")
    assert new == old
    strided = np.asfortranarray(np.arange(20, dtype=np.float32).reshape(5, 4))[:, ::2]
    old, new = _both(strided, np.zeros(5, dtype=np.uint8))
    assert new == old


def test_server_reads_it_back() -> None:
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((100, 8)).astype(np.float32)
    labels = rng.integers(0, 3, 100).astype(np.uint8)
    _, new = _both(latents, labels, seq=3, last=True, total_samples=100)
    chunk = latent_chunk_from_proto(uplink_pb2.LatentChunk.FromString(new))
    assert (chunk.seq, chunk.last, chunk.total_samples) == (3, True, 100)
    np.testing.assert_array_equal(from_wire(chunk.latents), latents)
    np.testing.assert_array_equal(from_wire(chunk.labels), labels)


def test_wire_array_shares_memory_when_already_in_wire_layout() -> None:
    latents = np.ones((10, 4), dtype=np.float32)
    wire = wire_array(latents[2:5], "float32")
    assert np.shares_memory(wire.array, latents)
    assert bytes(wire.buffer()) == to_wire(latents[2:5]).data
