"""Input validation, file formats and the plan JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from common.errors import AllocationError, ConfigError
from server.allocation import AllocationProblem, Cell, Device, DeviceDecision, solve
from server.allocation.io import (
    cell_from_mapping,
    read_devices_csv,
    read_scenario,
    write_devices_csv,
    write_plan_json,
    write_scenario,
)
from server.allocation.problem import CSV_COLUMNS
from tests.unit.server.allocation.alloc_cases import small_problem

GOOD = dict(
    id="a",
    samples=10,
    upload_bits=1e4,
    cycles_per_sample=1e6,
    cpu_hz=1e9,
    kappa=1e-28,
    tx_power_w=0.2,
    channel_gain=1e-10,
    energy_budget_j=5.0,
    finetune_energy_j=1.0,
    finetune_latency_s=2.0,
)
CELL = Cell(
    bandwidth_hz=1e6, noise_psd_w_per_hz=4e-21, min_samples=5, weight_energy=1.0, weight_latency=1.0
)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tx_power_w", -0.1),
        ("channel_gain", 0.0),
        ("cpu_hz", math.nan),
        ("kappa", -1.0),
        ("energy_budget_j", math.inf),
        ("samples", 0),
        ("samples", 2.5),
    ],
)
def test_device_rejects_bad_values_naming_the_field(field: str, value: float) -> None:
    with pytest.raises(AllocationError, match=f"device 'a': {field} must be"):
        Device(**{**GOOD, field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("bandwidth_hz", 0.0),
        ("noise_psd_w_per_hz", -1.0),
        ("weight_energy", 0.0),
        ("weight_latency", -1.0),
        ("min_samples", -1),
        ("weight_latency", math.nan),
    ],
)
def test_cell_rejects_bad_values_naming_the_field(field: str, value: float) -> None:
    kwargs = {k: getattr(CELL, k) for k in CELL.__dataclass_fields__}
    with pytest.raises(AllocationError, match=f"cell.{field} must be"):
        Cell(**{**kwargs, field: value})


def test_problem_rejects_duplicate_ids_and_names_bad_rows() -> None:
    dev = Device(**GOOD)  # type: ignore[arg-type]
    with pytest.raises(AllocationError, match="device id 'a' appears more than once"):
        AllocationProblem.from_devices([dev, dev], CELL)
    cols = {name: np.full(3, float(GOOD[name])) for name in CSV_COLUMNS[1:]}
    cols["tx_power_w"][1] = -2.0
    with pytest.raises(AllocationError, match=r"device 'y' \(data row 2\): tx_power_w must be"):
        AllocationProblem.from_columns(["x", "y", "z"], cols, CELL)


def test_problem_from_device_rows_equals_columns_and_is_read_only() -> None:
    devices = [Device(**{**GOOD, "id": name, "samples": 10 + i}) for i, name in enumerate("xyz")]  # type: ignore[arg-type]
    problem = AllocationProblem(devices, CELL)
    assert problem.devices() == tuple(devices)
    assert problem.size == 3
    np.testing.assert_array_equal(problem.column("samples"), [10, 11, 12])
    with pytest.raises(ValueError, match="read-only"):
        problem.column("tx_power_w")[0] = 1.0
    with pytest.raises(TypeError):
        problem.columns["kappa"] = np.zeros(3)  # type: ignore[index]
    with pytest.raises(AllocationError, match=r"target_gap must be in \[0, 1\), got -1"):
        solve(problem, target_gap=-1)


def test_devices_round_trip_through_csv(tmp_path: Path) -> None:
    problem = small_problem(np.random.default_rng(0), 6)
    path = tmp_path / "devices.csv"
    write_devices_csv(problem, path)
    back = read_devices_csv(path, problem.cell)
    assert back.ids == problem.ids
    for name in problem.columns:
        np.testing.assert_array_equal(back.column(name), problem.column(name))
    assert back.devices()[3] == problem.devices()[3]


def _write(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n")
    return path


def _row(**over: str) -> list[str]:
    return [over.get(c, str(GOOD[c])) for c in CSV_COLUMNS]


@pytest.mark.parametrize(
    ("header", "rows", "message"),
    [
        (
            [c for c in CSV_COLUMNS if c != "kappa"],
            [_row()[:5] + _row()[6:]],
            r"missing column\(s\) \['kappa'\]",
        ),
        ([*CSV_COLUMNS, "colour"], [[*_row(), "red"]], r"unknown column\(s\) \['colour'\]"),
        (
            list(CSV_COLUMNS),
            [_row(), _row(id="b", tx_power_w="-0.5")],
            r"device 'b' \(data row 2\): tx_power_w must be a number > 0, got -0.5",
        ),
        (
            list(CSV_COLUMNS),
            [_row(), _row(id="b", channel_gain="nan")],
            r"device 'b' \(data row 2\): channel_gain must be a number > 0, got nan",
        ),
        (
            list(CSV_COLUMNS),
            [_row(), _row(id="b", cpu_hz="fast")],
            r"line 3, column 5 \(cpu_hz\): expected a number, got 'fast'",
        ),
        (list(CSV_COLUMNS), [_row(), _row()[:-1]], "line 3: expected 11 fields, got 10"),
    ],
)
def test_malformed_csv_names_row_and_column(
    tmp_path: Path, header: list[str], rows: list[list[str]], message: str
) -> None:
    path = _write(tmp_path / "d.csv", header, rows)
    with pytest.raises(AllocationError, match=message):
        read_devices_csv(path, CELL)


def test_scenario_round_trip_and_unknown_keys(tmp_path: Path) -> None:
    devices = tmp_path / "data" / "devices.csv"
    scenario = tmp_path / "scenario.toml"
    write_scenario(scenario, devices, CELL)
    path, table = read_scenario(scenario)
    assert path.resolve() == devices.resolve()
    assert Cell(**table) == CELL
    scenario.write_text(scenario.read_text().replace("[cell]", "[cell]\ncolour = 1"))
    with pytest.raises(AllocationError, match=r"unknown key\(s\) \['colour'\]"):
        cell_from_mapping(read_scenario(scenario)[1], "scenario.toml: [cell]")
    scenario.write_text('devices = "d.csv"\nextra = 2\n')
    with pytest.raises(AllocationError, match=r"unknown key\(s\) \['extra'\]"):
        read_scenario(scenario)
    scenario.write_text("devices = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_scenario(scenario)


def test_plan_json_has_every_device_once_with_the_documented_keys(tmp_path: Path) -> None:
    problem = small_problem(np.random.default_rng(3), 7)
    plan = solve(problem)
    path = tmp_path / "plan.json"
    write_plan_json(plan, path)
    data = json.loads(path.read_text())
    assert set(data) == {
        "objective",
        "lower_bound",
        "gap",
        "round_latency_s",
        "total_energy_j",
        "solve_time_s",
        "devices",
    }
    assert [d["id"] for d in data["devices"]] == list(problem.ids)
    for d in data["devices"]:
        assert set(d) == {"id", "upload", "bandwidth_hz", "energy_j", "latency_s"}
        assert d["upload"] or d["bandwidth_hz"] == 0.0
    assert data["objective"] == plan.objective
    assert plan.decision(problem.ids[2]) == plan.decisions()[2]
    assert isinstance(plan.decisions()[0], DeviceDecision)
