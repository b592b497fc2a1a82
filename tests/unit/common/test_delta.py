"""Delta codec: exact where lossless, bounded where lossy, every malformed entry refused.

Oracles are independent of common.delta: plain numpy arithmetic, np.argsort for top-k, exact
rational arithmetic (fractions.Fraction) for ceil(F * n), and bit-by-bit bitmap decoding.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

import numpy as np
import pytest

from common.delta import (
    DeltaEncoding,
    DeltaEntry,
    DeltaKind,
    apply_delta,
    check_delta,
    decode_entry,
    dense_delta,
    encode_delta,
    pack_entries,
    sparse_entry,
    stats,
    unpack_entries,
)
from common.errors import CodecError, ConfigError
from common.tensors import WireTensor, to_wire

SHAPES: dict[str, tuple[int, ...]] = {
    "a.weight": (16, 8),
    "a.bias": (16,),
    "conv.weight": (4, 3, 3, 3),
    "head.weight": (10, 16),
}


def _pair(
    seed: int = 0, scale: float = 1e-2
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(base, fine-tuned) tensors with distinct-magnitude differences."""
    rng = np.random.default_rng(seed)
    base = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    new = {k: v + (scale * rng.normal(size=v.shape)).astype(np.float32) for k, v in base.items()}
    return base, new


def _bitmap_positions(bitmap: bytes, numel: int) -> np.ndarray:
    """Positions of set bits, decoded bit by bit, most significant bit first (no np.unpackbits)."""
    out = [p for p in range(numel) if bitmap[p // 8] >> (7 - p % 8) & 1]
    return np.asarray(out, dtype=np.int64)


def _names_tensor(exc: pytest.ExceptionInfo[CodecError], name: str) -> None:
    assert repr(name) in str(exc.value), str(exc.value)


# -- lossless --------------------------------------------------------------------------------


def test_fp32_dense_round_trip_is_exact() -> None:
    base, new = _pair()
    entries = encode_delta(base, new, DeltaEncoding.parse("fp32"))
    assert [e.name for e in entries] == sorted(SHAPES)
    for e in entries:
        assert e.kind is DeltaKind.DENSE and e.values.dtype == "float32"
        assert e.positions is None and e.right is None
        expected = new[e.name] - base[e.name]  # float32 - float32, as numpy does it
        got = decode_entry(e, SHAPES[e.name])
        assert got.dtype == np.float32 and got.tobytes() == expected.tobytes()
    applied = apply_delta(base, entries)
    for k in SHAPES:
        np.testing.assert_array_equal(applied[k], base[k] + (new[k] - base[k]))
    # apply_delta leaves its input alone
    assert all(not np.shares_memory(applied[k], base[k]) for k in SHAPES)


def test_apply_delta_copies_tensors_without_an_entry() -> None:
    base, new = _pair()
    only_head = {"head.weight": new["head.weight"]}
    applied = apply_delta(base, encode_delta(base, only_head, DeltaEncoding("float32")))
    for k in SHAPES:
        if k != "head.weight":
            assert applied[k].tobytes() == base[k].tobytes()
    assert (
        applied["head.weight"].tobytes()
        == (base["head.weight"] + (new["head.weight"] - base["head.weight"])).tobytes()
    )


@pytest.mark.parametrize("values", ["float32", "float16", "int8"])
def test_pack_unpack_round_trip_is_exact_for_every_kind(values: str) -> None:
    base, new = _pair()
    rng = np.random.default_rng(1)
    left = rng.normal(size=(4, 2)).astype(np.float32)
    right = rng.normal(size=(2, 27)).astype(np.float32)
    dense = {k: v for k, v in new.items() if k != "conv.weight"}
    entries = encode_delta(
        base, dense, DeltaEncoding(values, 0.3), low_rank={"conv.weight": (left, right)}
    )
    kinds = {e.kind for e in entries}
    assert DeltaKind.LOW_RANK in kinds
    assert kinds & {DeltaKind.SPARSE_INDEX, DeltaKind.SPARSE_BITMAP}
    # a hand-made bitmap entry and an index entry too, so both sparse forms are covered
    mask = np.zeros(16, bool)
    mask[[0, 5, 15]] = True
    entries.append(sparse_entry("x", np.arange(16, dtype=np.float32), mask, values))
    few = np.zeros(200, bool)
    few[[3, 150, 199]] = True
    entries.append(sparse_entry("y", np.arange(200, dtype=np.float32), few, values))
    assert [e.kind for e in entries[-2:]] == [DeltaKind.SPARSE_BITMAP, DeltaKind.SPARSE_INDEX]
    blob = pack_entries(entries)
    assert blob[:8] == b"LEDELTA1"
    back = unpack_entries(blob)
    assert back == entries  # names, kinds, bytes, dtypes, shapes and scales all equal
    assert pack_entries(back) == blob


@pytest.mark.parametrize(
    "blob",
    [b"", b"LEDELTA1", b"NOTDELTA" + bytes(8), b"LEDELTA1" + (5).to_bytes(8, "little") + b"{bad"],
)
def test_unpack_refuses_what_pack_did_not_write(blob: bytes) -> None:
    with pytest.raises(CodecError, match="stored delta"):
        unpack_entries(blob)


# -- lossy: error bounds ---------------------------------------------------------------------


def test_fp16_values_are_within_half_an_ulp() -> None:
    rng = np.random.default_rng(2)
    # magnitudes over the whole float16 range: subnormal (< 2**-14), normal, near 65504
    mags = 10.0 ** rng.uniform(-9, math.log10(65000), size=4000)
    d = (mags * rng.choice([-1.0, 1.0], size=mags.size)).astype(np.float32).reshape(40, 100)
    base = {"w": np.zeros((40, 100), np.float32)}
    (entry,) = encode_delta(base, {"w": d}, DeltaEncoding.parse("fp16"))
    assert entry.values.dtype == "float16" and entry.values.nbytes == 2 * d.size
    got = decode_entry(entry, (40, 100))
    err = np.abs(got.astype(np.float64) - d.astype(np.float64))
    normal = np.abs(d) >= 2.0**-14
    assert normal.sum() > 1000 and (~normal).sum() > 100
    # round to nearest: relative error <= 2^-11 for normal numbers ...
    assert np.all(err[normal] <= 2.0**-11 * np.abs(d[normal]))
    # ... and <= half the subnormal spacing (2^-24 / 2) below the normal range
    assert np.all(err[~normal] <= 2.0**-25)


def test_int8_values_are_within_half_a_step_of_the_per_tensor_scale() -> None:
    base, new = _pair(seed=3, scale=0.5)
    new["a.bias"] = base["a.bias"].copy()  # an all-zero delta
    entries = encode_delta(base, new, DeltaEncoding.parse("int8"))
    assert len(entries) == len(SHAPES)
    for e in entries:
        d = (new[e.name] - base[e.name]).astype(np.float64)
        peak = float(np.max(np.abs(d)))
        assert e.values.dtype == "int8" and e.values.nbytes == d.size
        got = decode_entry(e, SHAPES[e.name]).astype(np.float64)
        if peak == 0:
            assert np.all(got == 0)
            continue
        scale = peak / 127
        assert e.values.scale == pytest.approx(scale, rel=1e-6)
        stored = np.frombuffer(e.values.data, np.int8).astype(np.float64)
        assert np.max(np.abs(stored)) == 127  # the peak uses the full range
        slack = 1e-6 * peak  # float32 arithmetic in the quantiser
        assert np.max(np.abs(got - d)) <= scale / 2 + slack
        # independent dequantisation from the raw bytes
        np.testing.assert_allclose(got.ravel(), stored * e.values.scale, rtol=1e-6, atol=0)


# -- top-k -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "sizes"),
    [
        ("topk:0.01", {"a": (40, 25), "b": (300,), "c": (7, 3, 3)}),
        ("topk:0.1+fp32", {"a": (17,), "b": (13,)}),
        ("topk:0.07+fp32", {"a": (40,), "b": (6, 10)}),  # 0.07 * 100 = 7 exactly
        ("topk:0.5+int8", {"a": (9, 9)}),
        ("topk:0.001+fp32", {"a": (5,), "b": (3,)}),  # ceil of a tiny fraction: at least 1
        ("topk:1+fp32", {"a": (4, 4), "b": (2,)}),  # everything: dense
    ],
)
def test_topk_keeps_exactly_ceil_f_n_largest_entries_globally(
    spec: str, sizes: dict[str, tuple[int, ...]]
) -> None:
    encoding = DeltaEncoding.parse(spec)
    rng = np.random.default_rng(4)
    base = {k: rng.normal(size=s).astype(np.float32) for k, s in sizes.items()}
    new = {k: v + rng.normal(size=v.shape).astype(np.float32) for k, v in base.items()}
    deltas = {k: new[k] - base[k] for k in sizes}
    names = sorted(sizes)
    flat = np.concatenate([deltas[k].ravel() for k in names])
    n = flat.size
    fraction = Fraction(spec.split(":")[1].split("+", maxsplit=1)[0])
    k = max(1, math.ceil(fraction * n))  # exact rational arithmetic, no float rounding
    expected_kept = set(np.argsort(-np.abs(flat), kind="stable")[:k].tolist())
    assert len(set(np.abs(flat).tolist())) == n  # distinct magnitudes: the top k are unique

    entries = encode_delta(base, new, encoding)
    assert stats(entries).params == k
    got = np.concatenate(
        [
            decode_entry(e, sizes[e.name]).ravel()
            if (e := next((x for x in entries if x.name == name), None)) is not None
            else np.zeros(math.prod(sizes[name]), np.float32)
            for name in names
        ]
    )
    kept = set(np.flatnonzero(got).tolist())
    assert kept == expected_kept
    if encoding.values == "float32":  # kept values travel exactly
        idx = np.asarray(sorted(kept))
        np.testing.assert_array_equal(got[idx], flat[idx])


def test_topk_threshold_is_global_not_per_tensor() -> None:
    base = {"big": np.zeros(50, np.float32), "small": np.zeros(50, np.float32)}
    new = {
        "big": np.linspace(1.0, 2.0, 50, dtype=np.float32),
        "small": np.linspace(1e-3, 2e-3, 50, dtype=np.float32),
    }
    entries = encode_delta(base, new, DeltaEncoding.parse("topk:0.2+fp32"))
    # the 20 largest of the 100 entries are all in "big": "small" is left out entirely
    assert [e.name for e in entries] == ["big"]
    (big,) = entries
    np.testing.assert_array_equal(np.flatnonzero(decode_entry(big, (50,))), np.arange(30, 50))


def test_topk_does_not_exceed_the_fraction_for_the_issue_target() -> None:
    # the issue's target: at most 1 % of the parameters; ceil(0.01 * n) must not round up past it
    for n in (100, 700, 1290, 10_000, 50_890):
        base = {"w": np.zeros(n, np.float32)}
        new = {"w": np.arange(1, n + 1, dtype=np.float32)}
        entries = encode_delta(base, new, DeltaEncoding.parse("topk:0.01+fp32"))
        assert stats(entries).params == math.ceil(Fraction(1, 100) * n)


# -- sparse position formats -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("numel", "index_dtype"), [(65_536, "uint16"), (65_537, "uint32"), (70_000, "uint32")]
)
def test_index_dtype_switches_above_65536_entries(numel: int, index_dtype: str) -> None:
    flat = np.zeros(numel, np.float32)
    last = numel - 1  # the largest position must be representable
    positions = np.array([0, 1, 12_345, last], dtype=np.int64)
    flat[positions] = [1.0, -2.0, 3.0, -4.0]
    entry = sparse_entry("w", flat, flat != 0, "float32")
    assert entry.kind is DeltaKind.SPARSE_INDEX
    assert entry.positions is not None and entry.positions.dtype == index_dtype
    assert entry.index_bytes == 4 * np.dtype(index_dtype).itemsize
    stored = np.frombuffer(entry.positions.data, np.dtype(index_dtype).newbyteorder("<"))
    np.testing.assert_array_equal(stored, positions)
    np.testing.assert_array_equal(decode_entry(entry, (numel,)), flat)
    # the same through encode_delta's top-k
    (via_topk,) = encode_delta(
        {"w": np.zeros(numel, np.float32)},
        {"w": flat},
        DeltaEncoding(values="float32", topk=4 / numel),
    )
    assert via_topk.positions is not None and via_topk.positions.dtype == index_dtype


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 15, 16, 17, 31, 33, 64, 100])
def test_bitmap_is_chosen_exactly_when_smaller_and_positions_are_exact(numel: int) -> None:
    rng = np.random.default_rng(numel)
    flat = rng.normal(size=numel).astype(np.float32)
    for k in range(numel + 1):
        mask = np.zeros(numel, bool)
        mask[rng.choice(numel, size=k, replace=False)] = True
        entry = sparse_entry("t", flat, mask, "float32")
        bitmap_bytes = -(-numel // 8)
        index_bytes = 2 * k  # uint16 below 65,537 entries
        if bitmap_bytes < index_bytes:
            assert entry.kind is DeltaKind.SPARSE_BITMAP, (numel, k)
            assert entry.positions is not None and entry.positions.dtype == "uint8"
            assert entry.positions.shape == (bitmap_bytes,)
            np.testing.assert_array_equal(
                _bitmap_positions(entry.positions.data, numel), np.flatnonzero(mask)
            )
            pad = numel % 8
            if pad:  # padding bits after the last entry are zero
                assert entry.positions.data[-1] & ((1 << (8 - pad)) - 1) == 0
        else:
            assert entry.kind is DeltaKind.SPARSE_INDEX, (numel, k)
            assert entry.positions is not None
            stored = np.frombuffer(entry.positions.data, "<u2")
            np.testing.assert_array_equal(stored, np.flatnonzero(mask))
        assert entry.index_bytes == min(bitmap_bytes, index_bytes)
        decoded = decode_entry(entry, (numel,))
        np.testing.assert_array_equal(decoded, np.where(mask, flat, 0).astype(np.float32))


@pytest.mark.parametrize("k", [2187, 2188])
def test_bitmap_choice_against_uint32_indices(k: int) -> None:
    numel = 70_000  # bitmap 8,750 bytes; uint32 indices 4 k bytes: the bitmap wins from k = 2188
    mask = np.zeros(numel, bool)
    mask[np.linspace(0, numel - 1, k).astype(np.int64)] = True
    assert mask.sum() == k
    entry = sparse_entry("t", np.ones(numel, np.float32), mask, "int8")
    want = DeltaKind.SPARSE_BITMAP if 4 * k > 8750 else DeltaKind.SPARSE_INDEX
    assert entry.kind is want
    np.testing.assert_array_equal(
        np.flatnonzero(decode_entry(entry, (numel,))), np.flatnonzero(mask)
    )


# -- sizes -----------------------------------------------------------------------------------


def test_stats_count_values_positions_and_int8_scales() -> None:
    n = 1000
    flat = np.linspace(-1, 1, n, dtype=np.float32)
    few = np.zeros(n, bool)
    few[::100] = True  # 10 of 1000: index form
    many = np.zeros(n, bool)
    many[::4] = True  # 250 of 1000: bitmap form
    rng = np.random.default_rng(5)
    left = rng.normal(size=(6, 2)).astype(np.float32)
    right = rng.normal(size=(2, 12)).astype(np.float32)
    dense_int8 = DeltaEntry("d8", DeltaKind.DENSE, to_wire(flat, "int8"))
    dense_fp16 = DeltaEntry("d16", DeltaKind.DENSE, to_wire(flat, "float16"))
    idx_fp16 = sparse_entry("i16", flat, few, "float16")
    bmp_int8 = sparse_entry("b8", flat, many, "int8")
    (lr_int8,) = encode_delta(
        {"w": np.zeros((6, 3, 4), np.float32)}, {}, DeltaEncoding("int8"), {"w": (left, right)}
    )
    assert (idx_fp16.kind, bmp_int8.kind) == (DeltaKind.SPARSE_INDEX, DeltaKind.SPARSE_BITMAP)
    expected = {
        dense_int8: (n, n + 4, 0),
        dense_fp16: (n, 2 * n, 0),
        idx_fp16: (10, 2 * 10 + 2 * 10, 2 * 10),
        bmp_int8: (250, 250 + 125 + 4, 125),
        lr_int8: (12 + 24, 12 + 24 + 4 + 4, 0),
    }
    for entry, (params, nbytes, index) in expected.items():
        assert (entry.params, entry.nbytes, entry.index_bytes) == (params, nbytes, index), (
            entry.name
        )
    total = stats(list(expected))
    assert total.tensors == 5
    assert total.params == sum(v[0] for v in expected.values())
    assert total.payload_bytes == sum(v[1] for v in expected.values())
    assert total.index_bytes == 20 + 125


# -- low rank --------------------------------------------------------------------------------


@pytest.mark.parametrize("values", ["float32", "float16", "int8"])
def test_low_rank_decode_equals_left_times_right_reshaped(values: str) -> None:
    rng = np.random.default_rng(6)
    shape = (6, 3, 2, 2)
    left = rng.normal(size=(6, 3)).astype(np.float32)
    right = rng.normal(size=(3, 12)).astype(np.float32)
    base = {"conv.weight": rng.normal(size=shape).astype(np.float32)}
    (entry,) = encode_delta(base, {}, DeltaEncoding(values), {"conv.weight": (left, right)})
    assert entry.kind is DeltaKind.LOW_RANK and entry.params == 18 + 36
    assert entry.right is not None

    # oracle: the factors as they travel (dequantised independently), multiplied in float64
    def factor(t: WireTensor) -> np.ndarray:
        raw = np.frombuffer(t.data, np.dtype(t.dtype).newbyteorder("<")).astype(np.float64)
        return (raw * t.scale if t.dtype == "int8" else raw).reshape(t.shape)

    want = (factor(entry.values) @ factor(entry.right)).reshape(shape)
    got = decode_entry(entry, shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    if values == "float32":
        np.testing.assert_allclose(got, (left.astype(np.float64) @ right).reshape(shape), rtol=1e-5)
    np.testing.assert_allclose(
        apply_delta(base, [entry])["conv.weight"], base["conv.weight"] + got, rtol=0, atol=0
    )
    assert set(dense_delta(base, [entry])) == {"conv.weight"}


# -- malformed entries -----------------------------------------------------------------------


def _f32(a: object) -> WireTensor:
    return to_wire(np.asarray(a, dtype=np.float32))


def _raw(data: bytes, dtype: str, shape: tuple[int, ...], scale: float = 0.0) -> WireTensor:
    return WireTensor(data=data, dtype=dtype, shape=shape, scale=scale)


BITMAP_10 = np.packbits(np.array([1, 0, 0, 1, 0, 0, 0, 0, 0, 1], np.uint8))  # 3 set of 10


MALFORMED: list[tuple[str, DeltaEntry, tuple[int, ...], str]] = [
    (
        "wrong dense shape",
        DeltaEntry("t.w", DeltaKind.DENSE, _f32(np.zeros((3, 4)))),
        (4, 3),
        r"values.shape must be \[4, 3\].*got \[3, 4\]",
    ),
    (
        "values of an integer dtype",
        DeltaEntry("t.w", DeltaKind.DENSE, to_wire(np.zeros((4, 3), np.int32))),
        (4, 3),
        r"values.dtype must be one of",
    ),
    (
        "values bytes do not fit their shape",
        DeltaEntry("t.w", DeltaKind.DENSE, _raw(bytes(8), "float32", (4, 3))),
        (4, 3),
        r"values.data has 8 bytes, expected 48",
    ),
    (
        "NaN in dense values",
        DeltaEntry("t.w", DeltaKind.DENSE, _f32([[0, 1, np.nan], [0, 0, 0], [0] * 3, [0] * 3])),
        (4, 3),
        r"1 NaN/Inf value",
    ),
    (
        "Inf in dense values",
        DeltaEntry("t.w", DeltaKind.DENSE, _f32([[np.inf, -np.inf, 0]] + [[0] * 3] * 3)),
        (4, 3),
        r"2 NaN/Inf value",
    ),
    (
        "float16 Inf",
        DeltaEntry("t.w", DeltaKind.DENSE, to_wire(np.full((4, 3), np.inf, np.float16))),
        (4, 3),
        r"NaN/Inf",
    ),
    (
        "int8 with an infinite scale",
        DeltaEntry("t.w", DeltaKind.DENSE, _raw(bytes(12), "int8", (4, 3), math.inf)),
        (4, 3),
        r"scale must be finite",
    ),
    (
        "int8 whose scale overflows float32",
        DeltaEntry("t.w", DeltaKind.DENSE, _raw(b"\x7f" * 12, "int8", (4, 3), 1e38)),
        (4, 3),
        r"t\.w.*scale must be finite, > 0 and at most",
    ),
    (
        "NaN in sparse values",
        DeltaEntry(
            "t.w", DeltaKind.SPARSE_INDEX, _f32([1, np.nan]), to_wire(np.array([0, 5], np.uint16))
        ),
        (4, 3),
        r"NaN/Inf",
    ),
    (
        "positions not ascending",
        DeltaEntry(
            "t.w", DeltaKind.SPARSE_INDEX, _f32([1, 2, 3]), to_wire(np.array([0, 7, 5], np.uint16))
        ),
        (4, 3),
        r"positions must be strictly ascending and in 0..11",
    ),
    (
        "repeated position",
        DeltaEntry(
            "t.w", DeltaKind.SPARSE_INDEX, _f32([1, 2, 3]), to_wire(np.array([0, 5, 5], np.uint16))
        ),
        (4, 3),
        r"strictly ascending",
    ),
    (
        "position out of range",
        DeltaEntry(
            "t.w", DeltaKind.SPARSE_INDEX, _f32([1, 2]), to_wire(np.array([3, 12], np.uint32))
        ),
        (4, 3),
        r"in 0..11",
    ),
    (
        "positions of a signed dtype",
        DeltaEntry(
            "t.w", DeltaKind.SPARSE_INDEX, _f32([1, 2]), to_wire(np.array([0, 1], np.int32))
        ),
        (4, 3),
        r"positions.dtype must be one of \['uint16', 'uint32'\], got 'int32'",
    ),
    (
        "positions of a float dtype",
        DeltaEntry("t.w", DeltaKind.SPARSE_INDEX, _f32([1, 2]), _f32([0, 1])),
        (4, 3),
        r"positions.dtype must be one of",
    ),
    (
        "fewer positions than values",
        DeltaEntry("t.w", DeltaKind.SPARSE_INDEX, _f32([1, 2]), to_wire(np.array([4], np.uint16))),
        (4, 3),
        r"positions.shape must be \(2,\)",
    ),
    (
        "sparse entry without positions",
        DeltaEntry("t.w", DeltaKind.SPARSE_INDEX, _f32([1, 2])),
        (4, 3),
        r"needs positions",
    ),
    (
        "2-D sparse values",
        DeltaEntry(
            "t.w", DeltaKind.SPARSE_INDEX, _f32([[1, 2]]), to_wire(np.array([0, 1], np.uint16))
        ),
        (4, 3),
        r"sparse values must be 1-D",
    ),
    (
        "bitmap with padding bits set",
        DeltaEntry(
            "t.w",
            DeltaKind.SPARSE_BITMAP,
            _f32([1, 2, 3, 4]),
            to_wire(BITMAP_10 | np.array([0, 0b0001_0000], np.uint8)),
        ),
        (2, 5),
        r"padding bits beyond 10 entries must be 0",
    ),
    (
        "bitmap popcount differs from the values",
        DeltaEntry("t.w", DeltaKind.SPARSE_BITMAP, _f32([1, 2]), to_wire(BITMAP_10)),
        (2, 5),
        r"bitmap has 3 set bits but 2 values were sent",
    ),
    (
        "bitmap of the wrong length",
        DeltaEntry(
            "t.w", DeltaKind.SPARSE_BITMAP, _f32([1, 2, 3]), to_wire(np.r_[BITMAP_10, np.uint8(0)])
        ),
        (2, 5),
        r"a bitmap must be uint8 of shape \(2,\)",
    ),
    (
        "bitmap of the wrong dtype",
        DeltaEntry(
            "t.w", DeltaKind.SPARSE_BITMAP, _f32([1, 2, 3]), to_wire(BITMAP_10.astype(np.uint16))
        ),
        (2, 5),
        r"a bitmap must be uint8",
    ),
    (
        "low-rank rank mismatch",
        DeltaEntry("t.w", DeltaKind.LOW_RANK, _f32(np.ones((4, 2))), right=_f32(np.ones((3, 3)))),
        (4, 3),
        r"rank must match in both factors .* got 2 and 3",
    ),
    (
        "low-rank rank above min(rows, cols)",
        DeltaEntry("t.w", DeltaKind.LOW_RANK, _f32(np.ones((4, 4))), right=_f32(np.ones((4, 3)))),
        (4, 3),
        r"be in 1..3, got 4 and 4",
    ),
    (
        "low-rank factor of the wrong rows",
        DeltaEntry("t.w", DeltaKind.LOW_RANK, _f32(np.ones((5, 1))), right=_f32(np.ones((1, 3)))),
        (4, 3),
        r"factors must be \(4, r\) and \(r, 3\)",
    ),
    (
        "low-rank factor of the wrong cols",
        DeltaEntry("t.w", DeltaKind.LOW_RANK, _f32(np.ones((4, 1))), right=_f32(np.ones((1, 12)))),
        (4, 3, 2),
        r"factors must be \(4, r\) and \(r, 6\)",
    ),
    (
        "low-rank on a 1-D tensor",
        DeltaEntry("t.w", DeltaKind.LOW_RANK, _f32(np.ones((4, 1))), right=_f32(np.ones((1, 1)))),
        (4,),
        r"cannot take a low-rank delta",
    ),
    (
        "low-rank without a right factor",
        DeltaEntry("t.w", DeltaKind.LOW_RANK, _f32(np.ones((4, 1)))),
        (4, 3),
        r"needs a float right factor",
    ),
    (
        "low-rank Inf in a factor",
        DeltaEntry(
            "t.w", DeltaKind.LOW_RANK, _f32(np.ones((4, 1))), right=_f32([[1.0, np.inf, 0.0]])
        ),
        (4, 3),
        r"NaN/Inf",
    ),
    (
        "low-rank product overflows float32",
        DeltaEntry(
            "t.w",
            DeltaKind.LOW_RANK,
            _f32(np.full((4, 2), 3e38)),
            right=_f32(np.full((2, 3), 3e38)),
        ),
        (4, 3),
        r"NaN/Inf",
    ),
]


@pytest.mark.parametrize(
    ("entry", "shape", "message"),
    [m[1:] for m in MALFORMED],
    ids=[m[0] for m in MALFORMED],
)
def test_malformed_entry_is_refused_naming_the_tensor(
    entry: DeltaEntry, shape: tuple[int, ...], message: str
) -> None:
    # (overflow warnings are beside the point here: the refusal is)
    with np.errstate(over="ignore"):
        with pytest.raises(CodecError, match=message) as exc:
            decode_entry(entry, shape)
        _names_tensor(exc, "t.w")
        # check_delta and apply_delta refuse it the same way
        with pytest.raises(CodecError, match=message):
            check_delta([entry], {"t.w": shape})
        with pytest.raises(CodecError, match=message):
            apply_delta({"t.w": np.zeros(shape, np.float32)}, [entry])


def test_check_delta_refuses_unknown_and_duplicate_names() -> None:
    shapes = {"a.weight": (2, 2), "b.weight": (3,), "c": (1,), "d": (1,), "e": (1,)}
    good = DeltaEntry("a.weight", DeltaKind.DENSE, _f32(np.ones((2, 2))))
    check_delta([good], shapes)  # fine on its own
    unknown = DeltaEntry("z.weight", DeltaKind.DENSE, _f32(np.ones((2, 2))))
    with pytest.raises(CodecError, match=r"unknown tensor name 'z.weight'.*has 5 tensors") as exc:
        check_delta([good, unknown], shapes)
    assert "a.weight, b.weight, c, d, ..." in str(exc.value)
    with pytest.raises(CodecError, match=r"tensor 'a.weight' appears twice in the delta"):
        check_delta([good, good], shapes)
    with pytest.raises(CodecError, match=r"unknown tensor name 'z.weight'"):
        apply_delta({"a.weight": np.zeros((2, 2), np.float32)}, [unknown])


@pytest.mark.parametrize("spec", ["fp32", "fp16", "int8", "topk:0.5+fp32", "topk:0.5+int8"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_encode_refuses_a_non_finite_fine_tuned_tensor(spec: str, bad: float) -> None:
    # a diverged fine-tuning run: refused whatever the encoding (top-k must not drop the NaN)
    base = {"w": np.zeros((2, 3), np.float32)}
    new = {"w": np.array([[1, bad, 2], [3, 4, 5]], np.float32)}
    with pytest.raises(CodecError, match=r"delta of tensor 'w' has non-finite values"):
        encode_delta(base, new, DeltaEncoding.parse(spec))


@pytest.mark.parametrize("spec", ["fp16", "topk:0.5", "topk:0.5+fp16"])
def test_encode_refuses_float16_overflow_with_a_precise_error(spec: str) -> None:
    base = {"w": np.zeros((2, 3), np.float32)}
    big = {"w": np.full((2, 3), 70_000.0, np.float32)}
    # a CodecError naming the tensor, not a numpy RuntimeWarning from the cast
    with pytest.raises(CodecError, match=r"delta of tensor 'w' exceeds the float16 range"):
        encode_delta(base, big, DeltaEncoding.parse(spec))


@pytest.mark.parametrize("spec", ["fp32", "int8"])
def test_fp32_and_int8_carry_what_float16_cannot(spec: str) -> None:
    base = {"w": np.zeros((2, 3), np.float32)}
    big = {"w": np.full((2, 3), 70_000.0, np.float32)}
    (entry,) = encode_delta(base, big, DeltaEncoding.parse(spec))
    np.testing.assert_allclose(decode_entry(entry, (2, 3)), big["w"], rtol=1e-6)


def test_encode_refuses_mismatches() -> None:
    base = {"w": np.zeros((2, 3), np.float32), "v": np.zeros((4,), np.float32)}
    with pytest.raises(CodecError, match=r"tensor 'x' is not in the base model"):
        encode_delta(base, {"x": np.zeros(1, np.float32)}, DeltaEncoding())
    with pytest.raises(CodecError, match=r"tensor 'v': shape \(5,\) differs from the base \(4,\)"):
        encode_delta(base, {"v": np.zeros(5, np.float32)}, DeltaEncoding())
    lr = {"w": (np.ones((2, 1), np.float32), np.ones((1, 3), np.float32))}
    with pytest.raises(CodecError, match=r"tensor 'w' has both a dense and a low-rank delta"):
        encode_delta(base, {"w": np.ones((2, 3), np.float32)}, DeltaEncoding(), lr)
    bad_rank = {"w": (np.ones((2, 1), np.float32), np.ones((2, 3), np.float32))}
    with pytest.raises(CodecError, match=r"low-rank delta of 'w': rank must match"):
        encode_delta(base, {}, DeltaEncoding(), bad_rank)
    inf_factor = {"w": (np.full((2, 1), np.inf, np.float32), np.ones((1, 3), np.float32))}
    with pytest.raises(CodecError, match=r"'w'"):
        encode_delta(base, {}, DeltaEncoding(), inf_factor)


# -- DeltaEncoding.parse ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "values", "topk", "canonical"),
    [
        ("fp32", "float32", 1.0, "fp32"),
        ("fp16", "float16", 1.0, "fp16"),
        ("int8", "int8", 1.0, "int8"),
        (" INT8 ", "int8", 1.0, "int8"),
        ("topk:0.01", "float16", 0.01, "topk:0.01+fp16"),
        ("topk:0.01+int8", "int8", 0.01, "topk:0.01+int8"),
        ("TopK:0.25+FP32", "float32", 0.25, "topk:0.25+fp32"),
        ("topk:1e-3+fp16", "float16", 0.001, "topk:0.001+fp16"),
        ("topk:1", "float16", 1.0, "fp16"),
    ],
)
def test_delta_encoding_parse_accepts(text: str, values: str, topk: float, canonical: str) -> None:
    enc = DeltaEncoding.parse(text)
    assert (enc.values, enc.topk) == (values, topk)
    assert str(enc) == canonical
    assert DeltaEncoding.parse(str(enc)) == enc


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("topk:2", r"delta encoding 'topk:2': FRACTION must be in (0, 1], got 2.0"),
        ("topk:0", r"delta encoding 'topk:0': FRACTION must be in (0, 1], got 0.0"),
        ("topk:-0.5", r"FRACTION must be in (0, 1], got -0.5"),
        ("topk:nan", r"FRACTION must be in (0, 1], got nan"),
        ("topk:inf+int8", r"FRACTION must be in (0, 1], got inf"),
        ("topk:abc", r"delta encoding 'topk:abc': FRACTION must be a number in (0, 1], got 'abc'"),
        ("topk:", r"FRACTION must be a number in (0, 1], got ''"),
        (
            "topk:0.1+int4",
            r"delta encoding 'topk:0.1+int4': value part must be one of "
            r"['fp32', 'fp16', 'int8'], got 'int4'",
        ),
        (
            "bf16",
            r"delta encoding must be fp32, fp16, int8 or topk:FRACTION[+fp32|+fp16|+int8], "
            r"got 'bf16'",
        ),
        ("", r"got ''"),
        ("top:0.1", r"got 'top:0.1'"),
    ],
)
def test_delta_encoding_parse_refuses(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        DeltaEncoding.parse(text)


def test_delta_encoding_fields_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"delta values must be one of .* got 'float64'"):
        DeltaEncoding(values="float64")
    with pytest.raises(ConfigError, match=r"top-k fraction must be in \(0, 1\], got 0"):
        DeltaEncoding(topk=0)
