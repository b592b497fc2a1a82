"""Infeasible instances: the error names the binding constraint and the devices involved."""

from __future__ import annotations

import numpy as np
import pytest

from common.errors import InfeasibleAllocationError
from server.allocation import AllocationProblem, solve
from tests.unit.server.allocation.alloc_cases import small_problem


def _with(problem: AllocationProblem, row: int, **values: float) -> AllocationProblem:
    cols = {name: np.array(problem.column(name)) for name in problem.columns}
    for name, value in values.items():
        cols[name][row] = value
    return AllocationProblem.from_columns(problem.ids, cols, problem.cell)


@pytest.mark.parametrize("k", [4, 20])
def test_budget_too_small_for_either_option_names_the_device(k: int) -> None:
    base = small_problem(np.random.default_rng(1), k)
    # Budget below fine-tuning energy and below the least possible upload energy.
    problem = _with(base, 2, energy_budget_j=1e-9, finetune_energy_j=1.0)
    with pytest.raises(InfeasibleAllocationError, match="energy budget") as info:
        solve(problem)
    assert repr(base.ids[2]) in str(info.value)
    assert "can never carry the bits" in str(info.value)


@pytest.mark.parametrize("k", [4, 20])
def test_coverage_out_of_reach_names_the_constraint(k: int) -> None:
    base = small_problem(np.random.default_rng(2), k)
    total = int(base.column("samples").sum())
    with pytest.raises(InfeasibleAllocationError, match=f"coverage: min_samples={total + 1}"):
        solve(base.with_cell(min_samples=total + 1))


@pytest.mark.parametrize("k", [4, 20])
def test_coverage_with_tiny_bandwidth_names_bandwidth_and_devices(k: int) -> None:
    base = small_problem(np.random.default_rng(3), k, coverage=0.9)
    cols = {name: np.array(base.column(name)) for name in base.columns}
    cols["energy_budget_j"] = np.maximum(cols["energy_budget_j"], 2 * cols["finetune_energy_j"])
    problem = AllocationProblem.from_columns(base.ids, cols, base.cell)
    with pytest.raises(InfeasibleAllocationError, match="coverage and bandwidth") as info:
        solve(problem.with_cell(bandwidth_hz=1.0))
    assert "bandwidth_hz=1" in str(info.value)
    assert "'dev" in str(info.value)


def test_forced_uploaders_that_do_not_fit_name_bandwidth_and_the_devices() -> None:
    base = small_problem(np.random.default_rng(4), 5, coverage=0.0)
    cols = {name: np.array(base.column(name)) for name in base.columns}
    cols["finetune_energy_j"][:] = cols["energy_budget_j"] * 2.0  # nobody may fine-tune
    problem = AllocationProblem.from_columns(
        base.ids,
        cols,
        base.cell.__class__(
            bandwidth_hz=1.0,
            noise_psd_w_per_hz=base.cell.noise_psd_w_per_hz,
            min_samples=0,
            weight_energy=1.0,
            weight_latency=1.0,
        ),
    )
    with pytest.raises(InfeasibleAllocationError, match="bandwidth: device") as info:
        solve(problem)
    for dev_id in base.ids:
        assert repr(dev_id) in str(info.value)


def test_a_feasible_boundary_instance_still_solves() -> None:
    # Coverage exactly equal to all samples: everyone must upload, which fits.
    base = small_problem(np.random.default_rng(5), 4, bandwidth_hz=5e7)
    cols = {name: np.array(base.column(name)) for name in base.columns}
    cols["energy_budget_j"] = cols["energy_budget_j"] + 10.0
    problem = AllocationProblem.from_columns(base.ids, cols, base.cell)
    total = int(base.column("samples").sum())
    plan = solve(problem.with_cell(min_samples=total))
    assert plan.upload.all()
