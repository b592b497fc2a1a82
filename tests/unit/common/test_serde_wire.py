"""The hand-written LatentChunk serialiser gives protobuf's own bytes, and the server reads them."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import CodecError
from common.records import LatentChunk, UploadMode
from common.serde import (
    latent_chunk_from_bytes,
    latent_chunk_from_proto,
    latent_chunk_to_bytes,
    latent_chunk_to_proto,
)
from common.tensors import from_wire, to_wire, wire_array
from protos import tensor_pb2, uplink_pb2


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


# --------------------------------------------------------------------------- zero-copy parser


def _oracle(data: bytes) -> LatentChunk:
    return latent_chunk_from_proto(uplink_pb2.LatentChunk.FromString(data))


def _same(data: bytes) -> LatentChunk:
    """Parse ``data`` both ways; they must agree field for field (tensors byte for byte)."""
    ours, theirs = latent_chunk_from_bytes(data), _oracle(data)
    assert _plain(ours) == _plain(theirs)
    return ours


def _plain(chunk: LatentChunk) -> LatentChunk:
    """``chunk`` with its tensors' buffers as bytes (a view and a copy compare equal)."""
    return replace(
        chunk,
        latents=replace(chunk.latents, data=bytes(chunk.latents.data)),
        labels=replace(chunk.labels, data=bytes(chunk.labels.data)),
    )


_tensor = st.builds(
    tensor_pb2.Tensor,
    data=st.binary(max_size=64),
    dtype=st.text(max_size=8),
    shape=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4),
    scale=st.floats(width=32, allow_nan=False),
)


@settings(max_examples=300, deadline=None)
@given(
    node_id=st.text(max_size=20),
    upload_id=st.text(max_size=40),
    seq=st.integers(0, 2**32 - 1),
    last=st.booleans(),
    latents=_tensor,
    labels=_tensor,
    mode=st.sampled_from([0, 1, 2]),
    total_samples=st.integers(0, 2**64 - 1),
    extra=st.binary(max_size=16),
)
def test_the_zero_copy_parser_agrees_with_protobuf(
    node_id: str,
    upload_id: str,
    seq: int,
    last: bool,
    latents: tensor_pb2.Tensor,
    labels: tensor_pb2.Tensor,
    mode: int,
    total_samples: int,
    extra: bytes,
) -> None:
    msg = uplink_pb2.LatentChunk(
        node_id=node_id,
        upload_id=upload_id,
        seq=seq,
        last=last,
        latents=latents,
        labels=labels,
        mode=mode,  # type: ignore[arg-type]
        total_samples=total_samples,
    )
    data = msg.SerializeToString()
    _same(data)
    # an unknown field (number 15) of any content, before and after, is skipped by both
    unknown = bytes([15 << 3 | 2, len(extra)]) + extra
    _same(unknown + data + unknown)
    # arbitrary bytes: both parse them the same way, or both refuse them
    for junk in (data[: len(data) // 2], extra, data + extra):
        try:
            expected = _oracle(junk)
        except (DecodeError, CodecError):
            with pytest.raises(CodecError):
                latent_chunk_from_bytes(junk)
        else:
            assert _same(junk) is not None and expected is not None


def test_a_field_key_wider_than_32_bits_is_refused_as_protobuf_refuses_it() -> None:
    # found by the property test above: a 5-byte key varint with bit 32 set (field 2^29 + 11,
    # wire type 1) and 8 bytes for it; protobuf reads keys as 32 bits and refuses it
    junk = b"\xd9\x80\x80\x80\x10" + bytes(8)
    with pytest.raises(DecodeError):
        _oracle(junk)
    with pytest.raises(CodecError, match="wider than 32 bits"):
        latent_chunk_from_bytes(junk)
    # the widest key protobuf takes, field 2^29 - 1, is skipped by both
    widest = b"\xf8\xff\xff\xff\x0f\x00"  # varint key (2^29 - 1) << 3 | 0, value 0
    _same(widest)


def test_the_parser_merges_repeated_tensors_and_reads_unpacked_shapes_as_protobuf() -> None:
    first = uplink_pb2.LatentChunk(
        latents=tensor_pb2.Tensor(data=b"\x01\x02", dtype="uint8", shape=[2])
    ).SerializeToString()
    second = uplink_pb2.LatentChunk(
        latents=tensor_pb2.Tensor(dtype="int16", shape=[1], scale=0.5)
    ).SerializeToString()
    merged = _same(first + second + first)
    assert merged.latents.shape == (2, 1, 2) and merged.latents.dtype == "uint8"
    # shape as one varint field per element (unpacked), as old encoders write it
    unpacked = bytes([5 << 3 | 2, 6, 3 << 3 | 0, 4, 3 << 3 | 0, 0x7F, 3 << 3 | 0, 1])
    assert _same(unpacked).latents.shape == (4, 127, 1)


def test_the_parser_shares_the_payload_and_refuses_bad_text() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    data = latent_chunk_to_bytes(
        node_id="n",
        upload_id="u",
        seq=1,
        last=True,
        latents=wire_array(x),
        labels=wire_array(np.array([0, 1, 2], np.uint8)),
        mode=UploadMode.APPEND,
        total_samples=3,
    )
    chunk = latent_chunk_from_bytes(data)
    assert isinstance(chunk.latents.data, memoryview) and chunk.latents.data.obj is data
    np.testing.assert_array_equal(from_wire(chunk.latents), x)
    bad_utf8 = bytes([1 << 3 | 2, 2, 0xC3, 0x28])
    with pytest.raises(CodecError, match="node_id is not valid UTF-8"):
        latent_chunk_from_bytes(bad_utf8)
    with pytest.raises(CodecError, match="wire type 3"):
        latent_chunk_from_bytes(bytes([9 << 3 | 3]))
    with pytest.raises(CodecError, match="varint longer than 10 bytes"):
        latent_chunk_from_bytes(bytes([3 << 3]) + b"\xff" * 11)
    with pytest.raises(CodecError, match="mode must be one of"):
        latent_chunk_from_bytes(bytes([7 << 3, 9]))
