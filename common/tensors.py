"""ndarray <-> raw little-endian bytes, with the dtype and shape checks the wire needs.

The only encodings are those listed in :data:`WIRE_DTYPES`; ``int8`` carries a scale
(symmetric per-tensor quantisation: ``real = scale * stored``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from common.errors import CodecError

WIRE_DTYPES: tuple[str, ...] = (
    "float32",
    "float16",
    "int8",
    "uint8",
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
)
"""dtype names accepted on the wire."""

MAX_DIMS = 32
"""Most dimensions a wire tensor may have (numpy's own limit is 64)."""

_MAX_SCALE = float(np.finfo(np.float32).max) / 127.0

FLOAT_ENCODINGS: tuple[str, ...] = ("float32", "float16", "int8")
"""Encodings a float tensor (latents, delta values) may travel in."""


@dataclass(frozen=True)
class WireTensor:
    """A tensor as it travels: raw bytes + dtype name + shape (+ scale for int8)."""

    data: bytes | memoryview
    """C-order little-endian bytes; ``len(data) == prod(shape) * itemsize``. A read-only view
    of the received message on the server's ingest path (nothing copied)."""
    dtype: str
    """One of :data:`WIRE_DTYPES`."""
    shape: tuple[int, ...]
    """Dimensions, outermost first."""
    scale: float = 0.0
    """Dequantisation scale for ``int8`` (0 = unscaled)."""

    @property
    def nbytes(self) -> int:
        """Payload size in bytes."""
        return len(self.data)


@dataclass(frozen=True)
class WireArray:
    """A tensor ready for the wire without copying its bytes: what :func:`to_wire` would send.

    ``array`` is C-contiguous and little-endian; its bytes are exactly ``to_wire(...).data``.
    It may share memory with the caller's array: do not modify that array until it was sent.
    """

    array: np.ndarray
    """C-contiguous little-endian array of dtype :attr:`dtype`."""
    dtype: str
    """One of :data:`WIRE_DTYPES`."""
    shape: tuple[int, ...]
    """Dimensions, outermost first."""
    scale: float = 0.0
    """Dequantisation scale for ``int8`` (0 = unscaled)."""

    @property
    def nbytes(self) -> int:
        """Payload size in bytes."""
        return int(self.array.nbytes)

    def buffer(self) -> memoryview:
        """The payload bytes as a flat byte view of :attr:`array` (no copy)."""
        return self.array.reshape(-1).view(np.uint8).data


def wire_array(array: np.ndarray, encoding: str | None = None) -> WireArray:
    """Like :func:`to_wire`, but without copying data that is already in the wire's layout.

    Args:
        array: Any array whose dtype is in :data:`WIRE_DTYPES` (or float64/bool-free ints).
        encoding: For float arrays, one of :data:`FLOAT_ENCODINGS`; None keeps the dtype.

    Raises:
        CodecError: on an unsupported dtype or encoding, or non-finite values for int8.
    """
    arr = np.asarray(array)
    scale = 0.0
    if encoding is not None:
        if encoding not in FLOAT_ENCODINGS:
            raise CodecError(f"encoding must be one of {list(FLOAT_ENCODINGS)}, got {encoding!r}")
        if not np.issubdtype(arr.dtype, np.floating):
            raise CodecError(f"encoding {encoding!r} applies to float arrays, got {arr.dtype}")
        if encoding == "int8":
            if not np.all(np.isfinite(arr)):
                raise CodecError("cannot quantise non-finite values to int8")
            peak = float(np.max(np.abs(arr))) if arr.size else 0.0
            scale = peak / 127.0 if peak > 0 else 1.0
            arr = np.clip(np.rint(arr / scale), -127, 127).astype(np.int8)
        else:
            arr = arr.astype(encoding, copy=False)
    elif arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    name = arr.dtype.name
    if name not in WIRE_DTYPES:
        raise CodecError(f"dtype {name!r} cannot travel; expected one of {list(WIRE_DTYPES)}")
    little = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False))
    return WireArray(array=little, dtype=name, shape=tuple(int(d) for d in arr.shape), scale=scale)


def to_wire(array: np.ndarray, encoding: str | None = None) -> WireTensor:
    """Encode ``array`` for the wire, optionally converting float data to ``encoding``.

    Args:
        array: Any array whose dtype is in :data:`WIRE_DTYPES` (or float64/bool-free ints).
        encoding: For float arrays, one of :data:`FLOAT_ENCODINGS`; None keeps the dtype.

    Raises:
        CodecError: on an unsupported dtype or encoding, or non-finite values for int8.
    """
    wire = wire_array(array, encoding)
    return WireTensor(
        data=wire.array.tobytes(), dtype=wire.dtype, shape=wire.shape, scale=wire.scale
    )


def wire_view(tensor: WireTensor, field: str = "tensor") -> np.ndarray:
    """A read-only array over a :class:`WireTensor`'s bytes, checked like :func:`from_wire`.

    No payload byte is copied: the array shares ``tensor.data``'s memory and has the wire's
    dtype (little-endian). Scaled ``int8`` comes back unscaled (int8); its scale is checked
    (finite, > 0, at most the float32-safe bound), so ``view * scale`` is finite float32.

    Raises:
        CodecError: naming ``field`` when dtype, shape, byte length or scale is inconsistent.
    """
    if tensor.dtype not in WIRE_DTYPES:
        raise CodecError(f"{field}.dtype must be one of {list(WIRE_DTYPES)}, got {tensor.dtype!r}")
    if any(d < 0 for d in tensor.shape) or len(tensor.shape) > MAX_DIMS:
        raise CodecError(
            f"{field}.shape must have at most {MAX_DIMS} non-negative dimensions, "
            f"got {list(tensor.shape)}"
        )
    dtype = np.dtype(tensor.dtype).newbyteorder("<")
    expected = math.prod(tensor.shape) * dtype.itemsize
    if len(tensor.data) != expected:
        raise CodecError(
            f"{field}.data has {len(tensor.data)} bytes, expected {expected} for "
            f"{tensor.dtype} {list(tensor.shape)}"
        )
    if (
        tensor.dtype == "int8"
        and tensor.scale != 0.0
        and (not math.isfinite(tensor.scale) or tensor.scale < 0 or tensor.scale > _MAX_SCALE)
    ):
        raise CodecError(
            f"{field}.scale must be finite, > 0 and at most {_MAX_SCALE:.4g} (so that "
            f"127 * scale stays a float32), got {tensor.scale}"
        )
    try:
        view = np.frombuffer(tensor.data, dtype=dtype).reshape(tensor.shape)
    except ValueError as exc:
        raise CodecError(f"{field}.shape {list(tensor.shape)} is not usable: {exc}") from exc
    view.flags.writeable = False
    return view


def from_wire(tensor: WireTensor, field: str = "tensor") -> np.ndarray:
    """Decode a :class:`WireTensor` into a new writable array; scaled int8 comes back as float32.

    Args:
        tensor: What arrived.
        field: Name used in error messages (e.g. ``"latents"``).

    Raises:
        CodecError: naming ``field`` when dtype, shape or byte length is inconsistent.
    """
    view = wire_view(tensor, field)
    # a writable array that owns its memory (frombuffer views are read-only)
    arr = view.astype(view.dtype.newbyteorder("="))
    if tensor.dtype == "int8" and tensor.scale != 0.0:
        return arr.astype(np.float32) * np.float32(tensor.scale)
    return arr


def describe(array: np.ndarray) -> str:
    """One-line summary for logs, e.g. ``float32:(64, 128) in [-0.91, 1.07]``."""
    if array.size == 0 or not np.issubdtype(array.dtype, np.number):
        return f"{array.dtype}:{tuple(array.shape)}"
    return (
        f"{array.dtype}:{tuple(array.shape)} in "
        f"[{float(np.min(array)):.3g}, {float(np.max(array)):.3g}]"
    )
