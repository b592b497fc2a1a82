"""Input of the allocation model: devices, the cell, and the columnar problem the solver reads.

The equations are those of docs/allocation.md, section "The model". A device is one row of
the devices file; the solver works on columns (one ``float64`` array per field), so that a
problem with 100,000 devices is a handful of arrays, not 100,000 objects.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
from numpy.typing import NDArray

from common.errors import AllocationError

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class _Rule:
    """Admissible range of one numeric column."""

    minimum: float
    strict: bool
    expected: str


DEVICE_COLUMNS: dict[str, _Rule] = {
    "samples": _Rule(1.0, strict=False, expected="an integer >= 1"),
    "upload_bits": _Rule(0.0, strict=True, expected="a number > 0"),
    "cycles_per_sample": _Rule(0.0, strict=False, expected="a number >= 0"),
    "cpu_hz": _Rule(0.0, strict=True, expected="a number > 0"),
    "kappa": _Rule(0.0, strict=False, expected="a number >= 0"),
    "tx_power_w": _Rule(0.0, strict=True, expected="a number > 0"),
    "channel_gain": _Rule(0.0, strict=True, expected="a number > 0"),
    "energy_budget_j": _Rule(0.0, strict=True, expected="a number > 0"),
    "finetune_energy_j": _Rule(0.0, strict=False, expected="a number >= 0"),
    "finetune_latency_s": _Rule(0.0, strict=False, expected="a number >= 0"),
}
"""Numeric device columns in file order (after ``id``) with their admissible ranges."""

CSV_COLUMNS: tuple[str, ...] = ("id", *DEVICE_COLUMNS)
"""Header of a devices file, exactly as docs/allocation.md lists it."""


def _check_value(name: str, value: float, where: str) -> None:
    rule = DEVICE_COLUMNS[name]
    ok = math.isfinite(value) and (value > rule.minimum if rule.strict else value >= rule.minimum)
    if not ok:
        raise AllocationError(f"{where}{name} must be {rule.expected}, got {value!r}")


@dataclass(frozen=True)
class Device:
    """One device of the round, a row of the devices file."""

    id: str
    """Unique device (node) identifier."""
    samples: int
    """n_k: local samples the device contributes when it uploads (count)."""
    upload_bits: float
    """s_k: bits the device uploads if it uploads (compressed latents or delta), bits."""
    cycles_per_sample: float
    """c_k: CPU cycles per sample of the local encode, cycles."""
    cpu_hz: float
    """f_k: CPU clock of the local encode, Hz."""
    kappa: float
    """κ_k: effective switched capacitance, so encode energy is κ c n f², J·s²/cycle³."""
    tx_power_w: float
    """p_k: transmit power, W."""
    channel_gain: float
    """g_k: channel power gain to the base station (linear, dimensionless)."""
    energy_budget_j: float
    """E_k^max: energy the device may spend this round, J."""
    finetune_energy_j: float
    """E_k^ft: energy of local fine-tuning, the cost of NOT uploading, J."""
    finetune_latency_s: float
    """T_k^ft: time of local fine-tuning, the latency of NOT uploading, s."""

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise AllocationError(f"device id must be a non-empty string, got {self.id!r}")
        where = f"device {self.id!r}: "
        if isinstance(self.samples, bool) or not isinstance(self.samples, int):
            raise AllocationError(f"{where}samples must be an integer >= 1, got {self.samples!r}")
        for name in DEVICE_COLUMNS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise AllocationError(f"{where}{name} must be a number, got {value!r}")
            _check_value(name, float(value), where)


@dataclass(frozen=True)
class Cell:
    """The cell every device shares, and the weights of the objective."""

    bandwidth_hz: float
    """B: uplink bandwidth shared by the uploaders, Hz."""
    noise_psd_w_per_hz: float
    """N0: noise power spectral density, W/Hz."""
    min_samples: int
    """N_min: samples the server needs uploaded this round (coverage), count."""
    weight_energy: float
    """w_E: weight of the total device energy in the objective, 1/J (must be > 0)."""
    weight_latency: float
    """w_T: weight of the round latency in the objective, 1/s (>= 0)."""

    def __post_init__(self) -> None:
        checks: tuple[tuple[str, bool, str], ...] = (
            ("bandwidth_hz", True, "a number > 0"),
            ("noise_psd_w_per_hz", True, "a number > 0"),
            ("weight_energy", True, "a number > 0"),
            ("weight_latency", False, "a number >= 0"),
        )
        for name, strict, expected in checks:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise AllocationError(f"cell.{name} must be {expected}, got {value!r}")
            v = float(value)
            if not math.isfinite(v) or (v <= 0 if strict else v < 0):
                raise AllocationError(f"cell.{name} must be {expected}, got {value!r}")
        m = self.min_samples
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise AllocationError(f"cell.min_samples must be an integer >= 0, got {m!r}")


class AllocationProblem:
    """Devices (held as columns) and the cell: everything one solve needs.

    ``AllocationProblem(devices, cell)`` takes :class:`Device` rows; :meth:`from_columns` takes
    one array per column (the fast path for 100,000 devices). Both validate every value and name
    the offending device and column. Instances are immutable: the columns are read-only arrays.
    """

    __slots__ = ("_cell", "_columns", "_ids")

    def __init__(self, devices: Sequence[Device], cell: Cell) -> None:
        columns = {
            name: np.array([float(getattr(d, name)) for d in devices], dtype=np.float64)
            for name in DEVICE_COLUMNS
        }
        self._set(tuple(d.id for d in devices), columns, cell)

    @classmethod
    def from_devices(cls, devices: Sequence[Device], cell: Cell) -> AllocationProblem:
        """Same as ``AllocationProblem(devices, cell)``."""
        return cls(devices, cell)

    @classmethod
    def from_columns(
        cls, ids: Sequence[str], columns: Mapping[str, FloatArray], cell: Cell
    ) -> AllocationProblem:
        """Build the problem from one array per name in ``DEVICE_COLUMNS`` (validated here)."""
        problem = cls.__new__(cls)
        problem._set(tuple(ids), columns, cell)
        return problem

    def _set(self, ids: tuple[str, ...], columns: Mapping[str, FloatArray], cell: Cell) -> None:
        k = len(ids)
        if k == 0:
            raise AllocationError("the problem has no devices; expected at least one")
        if len(set(ids)) != k:
            dup = next(i for i, count in Counter(ids).items() if count > 1)
            raise AllocationError(f"device id {dup!r} appears more than once; ids must be unique")
        missing = [name for name in DEVICE_COLUMNS if name not in columns]
        if missing:
            raise AllocationError(f"missing device columns {missing}; expected {list(CSV_COLUMNS)}")
        unknown = sorted(set(columns) - set(DEVICE_COLUMNS))
        if unknown:
            raise AllocationError(f"unknown device columns {unknown}; expected {list(CSV_COLUMNS)}")
        frozen: dict[str, FloatArray] = {}
        for name, rule in DEVICE_COLUMNS.items():
            col = np.array(columns[name], dtype=np.float64)
            if col.shape != (k,):
                raise AllocationError(f"column {name} has shape {col.shape}; expected ({k},)")
            with np.errstate(invalid="ignore"):
                bad = ~np.isfinite(col) | (
                    col <= rule.minimum if rule.strict else col < rule.minimum
                )
            if name == "samples":
                bad |= col != np.round(col)
            if bad.any():
                row = int(np.argmax(bad))
                raise AllocationError(
                    f"device {ids[row]!r} (data row {row + 1}): {name} must be "
                    f"{rule.expected}, got {float(col[row])!r}"
                )
            col.setflags(write=False)
            frozen[name] = col
        self._ids = ids
        self._columns: Mapping[str, FloatArray] = MappingProxyType(frozen)
        self._cell = cell

    @property
    def ids(self) -> tuple[str, ...]:
        """Device identifiers, in input order (unique)."""
        return self._ids

    @property
    def columns(self) -> Mapping[str, FloatArray]:
        """One read-only float64 array of length K per name in ``DEVICE_COLUMNS``."""
        return self._columns

    @property
    def cell(self) -> Cell:
        """The shared cell and objective weights."""
        return self._cell

    @property
    def size(self) -> int:
        """Number of devices K."""
        return len(self._ids)

    def column(self, name: str) -> FloatArray:
        """Return the read-only array of one device column."""
        return self._columns[name]

    def devices(self) -> tuple[Device, ...]:
        """Return the devices as :class:`Device` rows (slow for large K; for tests and tools)."""
        out = []
        for i, dev_id in enumerate(self.ids):
            samples, *rest = (float(self.columns[name][i]) for name in DEVICE_COLUMNS)
            out.append(Device(dev_id, int(samples), *rest))
        return tuple(out)

    def with_cell(self, **changes: float | int) -> AllocationProblem:
        """Return the same devices with some cell fields replaced (e.g. a Pareto sweep)."""
        cell = dataclasses.replace(self.cell, **changes)  # type: ignore[arg-type]
        return AllocationProblem.from_columns(self.ids, self.columns, cell)
