"""Fine-tuning deltas: encode ``new - base`` compactly, check what arrives, apply it.

A delta is a list of :class:`DeltaEntry`, one per changed tensor of the base model, in one
of four forms (``kind``):

* ``dense``: ``values`` has the tensor's shape.
* ``sparse_index``: ``values`` ``(k,)`` and ``positions`` ``(k,)``: flat row-major positions in
  the tensor, strictly ascending, ``uint16`` when the tensor has at most 65,536 entries, else
  ``uint32`` (2 or 4 index bytes per value sent).
* ``sparse_bitmap``: ``values`` ``(k,)`` and ``positions`` a ``uint8`` bitmap of
  ``ceil(numel / 8)`` bytes, ``numpy.packbits`` order (most significant bit first), padding
  bits zero; the values follow the set bits in row-major order. The encoder picks whichever of
  the two sparse forms has fewer index bytes (the bitmap wins above 1/16 or 1/32 density).
* ``low_rank``: ``values`` ``(rows, r)`` and ``right`` ``(r, cols)`` with ``rows`` the
  tensor's first dimension and ``cols`` the product of the others; the delta is
  ``(values @ right).reshape(shape)`` (an adapter's ``B @ A``).

Values travel as ``float32``, ``float16`` or ``int8`` (one symmetric scale per tensor:
``value = scale * stored``). An encoding spec string names the choice:
``fp32 | fp16 | int8 | topk:FRACTION[+fp32|+fp16|+int8]``. ``topk`` keeps the
``ceil(FRACTION * n)`` entries of largest magnitude among all ``n`` entries of the dense
deltas together (one global threshold, not one per tensor); its value part defaults to fp16.

Every size this module reports counts what travels: value bytes, index or bitmap bytes, and
4 bytes per int8 scale.
"""

from __future__ import annotations

import enum
import json
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from common.errors import CodecError, ConfigError
from common.tensors import WireTensor, from_wire, to_wire

VALUE_ENCODINGS: dict[str, str] = {"fp32": "float32", "fp16": "float16", "int8": "int8"}
"""Spec name -> wire dtype of delta values."""

_VALUE_DTYPES = ("float32", "float16", "int8")
_INDEX_DTYPES = ("uint16", "uint32")
_UINT16_LIMIT = 65536


class DeltaKind(enum.Enum):
    """How one tensor's delta is represented (see the module docstring)."""

    DENSE = "dense"
    SPARSE_INDEX = "sparse_index"
    SPARSE_BITMAP = "sparse_bitmap"
    LOW_RANK = "low_rank"


@dataclass(frozen=True)
class DeltaEntry:
    """One tensor's delta as it travels."""

    name: str
    """The base model tensor it changes."""
    kind: DeltaKind
    values: WireTensor
    """Dense values, sparse values ``(k,)`` or the left factor ``(rows, r)``."""
    positions: WireTensor | None = None
    """Sparse kinds: flat positions or the bitmap."""
    right: WireTensor | None = None
    """LOW_RANK: the right factor ``(r, cols)``."""

    @property
    def params(self) -> int:
        """Numbers sent (values and factor entries; positions are not parameters)."""
        n = math.prod(self.values.shape)
        if self.right is not None:
            n += math.prod(self.right.shape)
        return n

    @property
    def index_bytes(self) -> int:
        """Bytes spent on positions (index list or bitmap)."""
        return self.positions.nbytes if self.positions is not None else 0

    @property
    def nbytes(self) -> int:
        """Bytes that travel: values, positions, right factor and int8 scales."""
        total = self.values.nbytes + self.index_bytes
        total += 4 if self.values.dtype == "int8" else 0
        if self.right is not None:
            total += self.right.nbytes + (4 if self.right.dtype == "int8" else 0)
        return total


@dataclass(frozen=True)
class DeltaEncoding:
    """How a delta is compressed: value dtype and top-k fraction (1.0 = dense)."""

    values: str = "float16"
    """Wire dtype of the values: float32, float16 or int8."""
    topk: float = 1.0
    """Fraction in (0, 1] of the dense delta entries kept (largest magnitude first)."""

    def __post_init__(self) -> None:
        if self.values not in _VALUE_DTYPES:
            raise ConfigError(
                f"delta values must be one of {list(_VALUE_DTYPES)}, got {self.values!r}"
            )
        if not 0.0 < self.topk <= 1.0:
            raise ConfigError(f"top-k fraction must be in (0, 1], got {self.topk}")

    @classmethod
    def parse(cls, text: str) -> DeltaEncoding:
        """``fp32 | fp16 | int8 | topk:FRACTION[+fp32|+fp16|+int8]``."""
        spec = text.strip().lower()
        if spec in VALUE_ENCODINGS:
            return cls(values=VALUE_ENCODINGS[spec])
        if spec.startswith("topk:"):
            fraction_text, _, value_text = spec[len("topk:") :].partition("+")
            value_text = value_text or "fp16"
            if value_text not in VALUE_ENCODINGS:
                raise ConfigError(
                    f"delta encoding {text!r}: value part must be one of "
                    f"{list(VALUE_ENCODINGS)}, got {value_text!r}"
                )
            try:
                fraction = float(fraction_text)
            except ValueError:
                raise ConfigError(
                    f"delta encoding {text!r}: FRACTION must be a number in (0, 1], "
                    f"got {fraction_text!r}"
                ) from None
            if not 0.0 < fraction <= 1.0:
                raise ConfigError(
                    f"delta encoding {text!r}: FRACTION must be in (0, 1], got {fraction}"
                )
            return cls(values=VALUE_ENCODINGS[value_text], topk=fraction)
        raise ConfigError(
            f"delta encoding must be fp32, fp16, int8 or topk:FRACTION[+fp32|+fp16|+int8], "
            f"got {text!r}"
        )

    def __str__(self) -> str:
        name = {v: k for k, v in VALUE_ENCODINGS.items()}[self.values]
        return name if self.topk >= 1.0 else f"topk:{self.topk:g}+{name}"


@dataclass(frozen=True)
class DeltaStats:
    """What a delta costs on the wire."""

    tensors: int
    """Entries (changed tensors)."""
    params: int
    """Numbers sent (values + low-rank factor entries)."""
    payload_bytes: int
    """Bytes of values, positions and scales."""
    index_bytes: int
    """The part of ``payload_bytes`` spent on positions."""


def stats(entries: Iterable[DeltaEntry]) -> DeltaStats:
    """Totals over ``entries``."""
    items = list(entries)
    return DeltaStats(
        tensors=len(items),
        params=sum(e.params for e in items),
        payload_bytes=sum(e.nbytes for e in items),
        index_bytes=sum(e.index_bytes for e in items),
    )


# -- encoding --------------------------------------------------------------------------------


def encode_delta(
    base: Mapping[str, np.ndarray],
    dense: Mapping[str, np.ndarray],
    encoding: DeltaEncoding,
    low_rank: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
    *,
    k: int | None = None,
) -> list[DeltaEntry]:
    """Encode the fine-tuned tensors as deltas against ``base``.

    Args:
        base: Name -> base tensor.
        dense: Name -> fine-tuned tensor (same shape as in ``base``); the delta is the difference.
        encoding: Value dtype and top-k fraction (top-k applies to the dense deltas only).
        low_rank: Name -> ``(left (rows, r), right (r, cols))`` adapter factors, sent as they are.
        k: Top-k only: how many entries to keep (default ``ceil(topk * n)`` over the ``n``
            entries of ``dense``); sparse fine-tuning passes the size of its mask.

    Returns:
        Entries in name order (tensors with nothing selected by top-k are left out).

    Raises:
        CodecError: unknown name, shape mismatch, non-finite values or a float16 overflow.
    """
    deltas: dict[str, np.ndarray] = {}
    for name in sorted(dense):
        if name not in base:
            raise CodecError(f"tensor {name!r} is not in the base model")
        new = np.asarray(dense[name], dtype=np.float32)
        ref = np.asarray(base[name], dtype=np.float32)
        if new.shape != ref.shape:
            raise CodecError(
                f"tensor {name!r}: shape {new.shape} differs from the base {ref.shape}"
            )
        if not np.all(np.isfinite(new)):
            raise CodecError(f"delta of tensor {name!r} has non-finite values")
        deltas[name] = new - ref
    entries: dict[str, DeltaEntry] = {}
    if encoding.topk >= 1.0:
        for name, d in deltas.items():
            entries[name] = DeltaEntry(name, DeltaKind.DENSE, _values(d, encoding.values, name))
    else:
        entries.update(_topk(deltas, encoding, k))
    for name, (left, right) in sorted((low_rank or {}).items()):
        if name not in base:
            raise CodecError(f"tensor {name!r} is not in the base model")
        if name in entries:
            raise CodecError(f"tensor {name!r} has both a dense and a low-rank delta")
        shape = np.asarray(base[name]).shape
        _check_low_rank_shapes(name, shape, tuple(left.shape), tuple(right.shape))
        entries[name] = DeltaEntry(
            name,
            DeltaKind.LOW_RANK,
            _values(np.asarray(left, np.float32), encoding.values, name),
            right=_values(np.asarray(right, np.float32), encoding.values, name),
        )
    return [entries[k] for k in sorted(entries)]


def _values(array: np.ndarray, dtype: str, name: str) -> WireTensor:
    if not np.all(np.isfinite(array)):
        raise CodecError(f"delta of tensor {name!r} has non-finite values")
    with np.errstate(over="ignore"):  # an overflow is reported below, precisely
        wire = to_wire(array, dtype)
    if dtype == "float16" and not np.all(np.isfinite(from_wire(wire))):
        raise CodecError(
            f"delta of tensor {name!r} exceeds the float16 range (|value| > 65504); "
            "use fp32 or int8"
        )
    return wire


def _topk(
    deltas: Mapping[str, np.ndarray], encoding: DeltaEncoding, k: int | None
) -> dict[str, DeltaEntry]:
    if not deltas:
        return {}
    names = list(deltas)
    flat = np.concatenate([deltas[n].ravel() for n in names])
    k = min(flat.size, max(1, k)) if k is not None else topk_count(encoding.topk, flat.size)
    chosen = np.zeros(flat.size, dtype=bool)
    chosen[np.argpartition(-np.abs(flat), k - 1)[:k]] = True
    chosen &= flat != 0  # an unchanged entry is never worth sending
    out: dict[str, DeltaEntry] = {}
    start = 0
    for name in names:
        d = deltas[name].ravel()
        mask = chosen[start : start + d.size]
        start += d.size
        if mask.any():
            out[name] = sparse_entry(name, d, mask, encoding.values)
    return out


def topk_count(fraction: float, n: int) -> int:
    """Entries top-k keeps of ``n``: ``ceil(fraction * n)``, at least 1, at most ``n``.

    The product is rounded to 9 decimals first, so ``0.07 * 100`` keeps 7, not 8.
    """
    return min(n, max(1, math.ceil(round(fraction * n, 9))))


def sparse_entry(name: str, flat: np.ndarray, mask: np.ndarray, dtype: str) -> DeltaEntry:
    """A sparse entry carrying ``flat[mask]``, with whichever position format is smaller."""
    positions = np.flatnonzero(mask)
    index_dtype = np.uint16 if flat.size <= _UINT16_LIMIT else np.uint32
    index_bytes = positions.size * np.dtype(index_dtype).itemsize
    values = _values(flat[positions], dtype, name)
    if math.ceil(flat.size / 8) < index_bytes:
        bitmap = np.packbits(mask.astype(np.uint8))
        return DeltaEntry(name, DeltaKind.SPARSE_BITMAP, values, positions=to_wire(bitmap))
    return DeltaEntry(
        name, DeltaKind.SPARSE_INDEX, values, positions=to_wire(positions.astype(index_dtype))
    )


def _check_low_rank_shapes(
    name: str, shape: tuple[int, ...], left: tuple[int, ...], right: tuple[int, ...]
) -> None:
    if len(shape) < 2:
        raise CodecError(f"tensor {name!r} of shape {list(shape)} cannot take a low-rank delta")
    rows, cols = shape[0], math.prod(shape[1:])
    if len(left) != 2 or len(right) != 2 or left[0] != rows or right[1] != cols:
        raise CodecError(
            f"low-rank delta of {name!r}: factors must be ({rows}, r) and (r, {cols}) for a "
            f"tensor of shape {list(shape)}, got {list(left)} and {list(right)}"
        )
    if left[1] != right[0] or not 1 <= left[1] <= min(rows, cols):
        raise CodecError(
            f"low-rank delta of {name!r}: rank must match in both factors and be in "
            f"1..{min(rows, cols)}, got {left[1]} and {right[0]}"
        )


# -- decoding and checks ---------------------------------------------------------------------


def decode_entry(entry: DeltaEntry, shape: Sequence[int]) -> np.ndarray:
    """The dense float32 delta an entry carries for a tensor of ``shape``.

    Raises:
        CodecError: naming the tensor and the field when the entry does not fit ``shape``
            (wrong shape, positions out of range or not ascending, bad bitmap, non-finite).
    """
    shape = tuple(int(d) for d in shape)
    where = f"delta of tensor {entry.name!r}"
    if entry.values.dtype not in _VALUE_DTYPES:
        raise CodecError(
            f"{where}: values.dtype must be one of {list(_VALUE_DTYPES)}, "
            f"got {entry.values.dtype!r}"
        )
    values = from_wire(entry.values, f"{where}: values").astype(np.float32, copy=False)
    numel = math.prod(shape)
    if entry.kind is DeltaKind.DENSE:
        if values.shape != shape:
            raise CodecError(
                f"{where}: values.shape must be {list(shape)} (the base tensor), "
                f"got {list(values.shape)}"
            )
        out = values
    elif entry.kind in (DeltaKind.SPARSE_INDEX, DeltaKind.SPARSE_BITMAP):
        if values.ndim != 1:
            raise CodecError(f"{where}: sparse values must be 1-D, got {list(values.shape)}")
        positions = _positions(entry, numel, values.shape[0], where)
        out = np.zeros(numel, dtype=np.float32)
        out[positions] = values
        out = out.reshape(shape)
    elif entry.kind is DeltaKind.LOW_RANK:
        if entry.right is None or entry.right.dtype not in _VALUE_DTYPES:
            raise CodecError(f"{where}: a low_rank delta needs a float right factor")
        right = from_wire(entry.right, f"{where}: right").astype(np.float32, copy=False)
        _check_low_rank_shapes(entry.name, shape, values.shape, right.shape)
        with np.errstate(over="ignore", invalid="ignore"):
            out = (values @ right).reshape(shape)
    else:  # pragma: no cover - exhaustive enum
        raise CodecError(f"{where}: unknown kind {entry.kind!r}")
    if not np.all(np.isfinite(out)):
        bad = int(np.count_nonzero(~np.isfinite(out)))
        raise CodecError(f"{where} has {bad} NaN/Inf value(s); all must be finite")
    return out


def _positions(entry: DeltaEntry, numel: int, k: int, where: str) -> np.ndarray:
    if entry.positions is None:
        raise CodecError(f"{where}: a {entry.kind.value} delta needs positions")
    if entry.kind is DeltaKind.SPARSE_INDEX:
        if entry.positions.dtype not in _INDEX_DTYPES:
            raise CodecError(
                f"{where}: positions.dtype must be one of {list(_INDEX_DTYPES)}, "
                f"got {entry.positions.dtype!r}"
            )
        idx = from_wire(entry.positions, f"{where}: positions").astype(np.int64)
        if idx.shape != (k,):
            raise CodecError(
                f"{where}: positions.shape must be ({k},) like the values, got {list(idx.shape)}"
            )
        if k and (idx[0] < 0 or idx[-1] >= numel or np.any(np.diff(idx) <= 0)):
            raise CodecError(f"{where}: positions must be strictly ascending and in 0..{numel - 1}")
        return idx
    if entry.positions.dtype != "uint8" or entry.positions.shape != (math.ceil(numel / 8),):
        raise CodecError(
            f"{where}: a bitmap must be uint8 of shape ({math.ceil(numel / 8)},), got "
            f"{entry.positions.dtype} {list(entry.positions.shape)}"
        )
    bits = np.unpackbits(from_wire(entry.positions, f"{where}: positions"))
    if bits[numel:].any():
        raise CodecError(f"{where}: bitmap padding bits beyond {numel} entries must be 0")
    idx = np.flatnonzero(bits[:numel])
    if idx.size != k:
        raise CodecError(f"{where}: bitmap has {idx.size} set bits but {k} values were sent")
    return idx


def check_delta(entries: Sequence[DeltaEntry], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Check a whole delta against the base's tensor shapes (names, duplicates, every entry).

    Raises:
        CodecError: naming the first bad entry.
    """
    seen: set[str] = set()
    for entry in entries:
        if entry.name not in shapes:
            known = sorted(shapes)
            raise CodecError(
                f"unknown tensor name {entry.name!r}: the base model has {len(known)} tensors "
                f"({', '.join(known[:4])}{', ...' if len(known) > 4 else ''})"
            )
        if entry.name in seen:
            raise CodecError(f"tensor {entry.name!r} appears twice in the delta")
        seen.add(entry.name)
        decode_entry(entry, shapes[entry.name])


def apply_delta(
    tensors: Mapping[str, np.ndarray], entries: Iterable[DeltaEntry]
) -> dict[str, np.ndarray]:
    """``tensors + delta`` as new float32 arrays (tensors without an entry are copied)."""
    out = {k: np.array(v, dtype=np.float32, copy=True) for k, v in tensors.items()}
    for entry in entries:
        if entry.name not in out:
            raise CodecError(f"unknown tensor name {entry.name!r}")
        out[entry.name] += decode_entry(entry, out[entry.name].shape)
    return out


def dense_delta(
    tensors: Mapping[str, np.ndarray], entries: Iterable[DeltaEntry]
) -> dict[str, np.ndarray]:
    """Name -> dense float32 delta for every entry (for averaging deltas)."""
    return {e.name: decode_entry(e, np.asarray(tensors[e.name]).shape) for e in entries}


# -- storage ---------------------------------------------------------------------------------

_MAGIC = b"LEDELTA1"


def pack_entries(entries: Sequence[DeltaEntry]) -> bytes:
    """Serialise entries for storage: magic, header length, JSON header, then the raw bytes."""
    header: list[dict[str, object]] = []
    blobs: list[bytes | memoryview] = []
    offset = 0
    for e in entries:
        item: dict[str, object] = {"name": e.name, "kind": e.kind.value}
        for key in ("values", "positions", "right"):
            t: WireTensor | None = getattr(e, key)
            if t is None:
                continue
            item[key] = {
                "dtype": t.dtype,
                "shape": list(t.shape),
                "scale": t.scale,
                "offset": offset,
                "nbytes": t.nbytes,
            }
            blobs.append(t.data)
            offset += t.nbytes
        header.append(item)
    head = json.dumps(header, separators=(",", ":")).encode()
    return _MAGIC + struct.pack("<Q", len(head)) + head + b"".join(blobs)


def unpack_entries(data: bytes) -> list[DeltaEntry]:
    """Inverse of :func:`pack_entries`; CodecError on anything else."""
    if data[:8] != _MAGIC or len(data) < 16:
        raise CodecError("stored delta does not start with the LEDELTA1 header")
    (n,) = struct.unpack("<Q", data[8:16])
    try:
        header = json.loads(data[16 : 16 + n])
    except ValueError as exc:
        raise CodecError(f"stored delta header is not JSON: {exc}") from exc
    body = data[16 + n :]
    entries = []
    for item in header:
        parts: dict[str, WireTensor | None] = {}
        for key in ("values", "positions", "right"):
            t = item.get(key)
            parts[key] = (
                None
                if t is None
                else WireTensor(
                    data=body[t["offset"] : t["offset"] + t["nbytes"]],
                    dtype=t["dtype"],
                    shape=tuple(t["shape"]),
                    scale=float(t["scale"]),
                )
            )
        values = parts["values"]
        assert values is not None
        entries.append(
            DeltaEntry(
                name=item["name"],
                kind=DeltaKind(item["kind"]),
                values=values,
                positions=parts["positions"],
                right=parts["right"],
            )
        )
    return entries
