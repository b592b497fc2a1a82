"""The solver against full enumeration with an independent convex solver (cvxpy/Clarabel)."""

from __future__ import annotations

import numpy as np
import pytest

from server.allocation import solve
from server.allocation.problem import AllocationProblem
from tests.unit.server.allocation.alloc_cases import brute_force, small_problem


def _check_against_oracle(problem: AllocationProblem) -> None:
    oracle = brute_force(problem)
    plan = solve(problem)
    assert plan.method == "enumeration"
    assert plan.objective == pytest.approx(oracle.objective, rel=1e-6)
    assert plan.lower_bound <= oracle.objective * (1 + 1e-9)
    assert plan.gap <= 1e-6


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_small_instances_match_enumeration_with_cvxpy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    _check_against_oracle(small_problem(rng, 5 + seed % 3))


def test_twelve_devices_match_enumeration_with_cvxpy() -> None:
    # High coverage leaves 79 of the 4096 upload sets admissible, so the oracle stays quick;
    # the solver still enumerates all 4096.
    problem = small_problem(np.random.default_rng(12), 12, coverage=0.85, bandwidth_hz=6e6)
    _check_against_oracle(problem)


def test_latency_weight_zero_matches_oracle() -> None:
    _check_against_oracle(small_problem(np.random.default_rng(5), 5, weight_latency=0.0))


def test_lagrangian_path_on_small_instance_is_certified_against_enumeration() -> None:
    problem = small_problem(np.random.default_rng(7), 10, bandwidth_hz=4e6)
    exact = solve(problem)
    approx = solve(problem, exact_up_to=0, target_gap=1e-9)
    assert approx.method == "lagrangian"
    assert approx.lower_bound <= exact.objective * (1 + 1e-9)
    assert approx.objective >= exact.objective * (1 - 1e-9)
    assert approx.gap == pytest.approx((approx.objective - approx.lower_bound) / approx.objective)
