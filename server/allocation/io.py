"""Read and write allocation inputs and outputs: devices CSV, scenario TOML, plan JSON.

Every malformed input raises :class:`~common.errors.AllocationError` (or ``ConfigError`` for
TOML syntax) naming the file, the line or data row, and the column or key.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from common.config import read_toml
from common.errors import AllocationError
from server.allocation.problem import CSV_COLUMNS, DEVICE_COLUMNS, AllocationProblem, Cell
from server.allocation.result import AllocationPlan

CELL_KEYS: tuple[str, ...] = (
    "bandwidth_hz",
    "noise_psd_w_per_hz",
    "min_samples",
    "weight_energy",
    "weight_latency",
)
"""Keys of the ``[cell]`` table, which are also the fields of :class:`Cell`."""

SCENARIO_KEYS: tuple[str, ...] = ("devices", "cell")
"""Top-level keys of a scenario file."""


def _parse_column(path: Path, name: str, cells: list[str], col: int) -> np.ndarray:
    try:
        return np.array(cells, dtype=np.float64)
    except ValueError:
        for row, text in enumerate(cells):
            try:
                float(text)
            except ValueError:
                raise AllocationError(
                    f"{path}: line {row + 2}, column {col + 1} ({name}): expected a number, "
                    f"got {text!r}"
                ) from None
        raise  # pragma: no cover  (np.array and float agree on what parses)


def read_devices_csv(path: Path, cell: Cell) -> AllocationProblem:
    """Read a devices file (header ``CSV_COLUMNS``) into a problem with ``cell``.

    Raises:
        AllocationError: unreadable file, missing/unknown/duplicate column, a row with the wrong
            number of fields, a non-number, or a value out of range (naming line and column).
    """
    try:
        with path.open(newline="") as fh:
            rows = list(csv.reader(fh))
    except FileNotFoundError as exc:
        raise AllocationError(f"devices file {str(path)!r} does not exist") from exc
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise AllocationError(f"devices file {str(path)!r} cannot be read: {exc}") from exc
    if not rows:
        raise AllocationError(f"{path}: empty file; expected the header {','.join(CSV_COLUMNS)}")
    header = [h.strip() for h in rows[0]]
    missing = [c for c in CSV_COLUMNS if c not in header]
    if missing:
        raise AllocationError(
            f"{path}: missing column(s) {missing}; expected the header {','.join(CSV_COLUMNS)}"
        )
    unknown = [h for h in header if h not in CSV_COLUMNS]
    if unknown:
        raise AllocationError(f"{path}: unknown column(s) {unknown}; expected {list(CSV_COLUMNS)}")
    if len(set(header)) != len(header):
        raise AllocationError(f"{path}: duplicate column names in header {header}")
    body = [r for r in rows[1:] if r]
    if not body:
        raise AllocationError(f"{path}: no device rows after the header")
    width = len(header)
    for i, r in enumerate(body):
        if len(r) != width:
            raise AllocationError(f"{path}: line {i + 2}: expected {width} fields, got {len(r)}")
    where = {name: header.index(name) for name in CSV_COLUMNS}
    ids = [r[where["id"]].strip() for r in body]
    for i, dev_id in enumerate(ids):
        if not dev_id:
            raise AllocationError(f"{path}: line {i + 2}, column id: empty device id")
    columns = {
        name: _parse_column(path, name, [r[where[name]] for r in body], where[name])
        for name in DEVICE_COLUMNS
    }
    try:
        return AllocationProblem.from_columns(ids, columns, cell)
    except AllocationError as exc:
        raise AllocationError(f"{path}: {exc} (data rows count from 1 after the header)") from exc


def write_devices_csv(problem: AllocationProblem, path: Path) -> None:
    """Write the devices of ``problem`` as a devices file (lossless float repr)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = [problem.column(name).tolist() for name in DEVICE_COLUMNS]
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for i, dev_id in enumerate(problem.ids):
            values = [repr(c[i]) for c in cols]
            values[0] = str(int(cols[0][i]))
            writer.writerow([dev_id, *values])


def cell_from_mapping(table: dict[str, Any], where: str) -> Cell:
    """Build a :class:`Cell` from a mapping, naming missing and unknown keys.

    Args:
        table: The ``[cell]`` table (or flag values).
        where: Prefix for messages, e.g. ``"scenario.toml: [cell]"``.
    """
    unknown = sorted(set(table) - set(CELL_KEYS))
    if unknown:
        raise AllocationError(f"{where}: unknown key(s) {unknown}; known keys: {list(CELL_KEYS)}")
    missing = [k for k in CELL_KEYS if k not in table]
    if missing:
        raise AllocationError(f"{where}: missing key(s) {missing}")
    try:
        return Cell(**table)
    except AllocationError as exc:
        raise AllocationError(f"{where}: {exc}") from exc


def read_scenario(path: Path) -> tuple[Path, dict[str, Any]]:
    """Read a scenario TOML; return the devices path (resolved) and the raw ``[cell]`` table.

    The table is returned raw so that command-line flags can override single keys before the
    :class:`Cell` is built with :func:`cell_from_mapping`.
    """
    data = read_toml(path)
    unknown = sorted(set(data) - set(SCENARIO_KEYS))
    if unknown:
        raise AllocationError(
            f"{path}: unknown key(s) {unknown}; known keys: {list(SCENARIO_KEYS)}"
        )
    devices = data.get("devices")
    if not isinstance(devices, str) or not devices:
        raise AllocationError(
            f"{path}: key 'devices' must be a path to the devices CSV (relative to the "
            f"scenario file), got {devices!r}"
        )
    cell = data.get("cell", {})
    if not isinstance(cell, dict):
        raise AllocationError(f"{path}: 'cell' must be a table, got {type(cell).__name__}")
    return path.parent / devices, dict(cell)


def _toml_value(value: float | int) -> str:
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        raise AllocationError(f"cannot write non-finite value {value!r} to TOML")
    return repr(float(value))


def write_scenario(path: Path, devices_csv: Path, cell: Cell) -> None:
    """Write a scenario TOML pointing at ``devices_csv`` (stored relative to ``path``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        rel = devices_csv.resolve().relative_to(path.parent.resolve())
        target = rel.as_posix()
    except ValueError:
        target = devices_csv.resolve().as_posix()
    lines = [f"devices = {json.dumps(target)}", "", "[cell]"]
    lines += [f"{key} = {_toml_value(getattr(cell, key))}" for key in CELL_KEYS]
    path.write_text("\n".join(lines) + "\n")


def write_plan_json(plan: AllocationPlan, path: Path) -> None:
    """Write the plan JSON of docs/allocation.md to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        json.dump(plan.to_json_dict(), fh, indent=1)
        fh.write("\n")
