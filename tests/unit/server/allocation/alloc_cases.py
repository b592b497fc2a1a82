"""Shared by the allocation tests: small random instances and an independent cvxpy oracle.

The oracle enumerates every upload set and solves each set's bandwidth subproblem with cvxpy
(Clarabel, exponential cones), written from docs/allocation.md's equations in MHz and Mbit
units; it shares no code with the solver.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass

import cvxpy as cp
import numpy as np

from server.allocation import AllocationProblem, Cell
from server.allocation.generate import generate

MHZ = 1e6


def small_problem(
    rng: np.random.Generator,
    k: int,
    *,
    bandwidth_hz: float = 2e6,
    coverage: float = 0.4,
    weight_latency: float = 1.0,
) -> AllocationProblem:
    """A generated cell made tight: scarce bandwidth and cheaper fine-tuning, so that both
    options and the bandwidth constraint matter."""
    base = generate(k, rng, "upload-cheap")
    cols = {name: np.array(base.column(name)) for name in base.columns}
    cols["finetune_energy_j"] = cols["finetune_energy_j"] * rng.uniform(0.002, 0.05, k)
    cols["finetune_latency_s"] = cols["finetune_latency_s"] * rng.uniform(0.01, 0.2, k)
    cols["energy_budget_j"] = np.maximum(cols["finetune_energy_j"], 0.05) * rng.uniform(0.9, 4.0, k)
    cell = Cell(
        bandwidth_hz=bandwidth_hz,
        noise_psd_w_per_hz=base.cell.noise_psd_w_per_hz,
        min_samples=int(coverage * cols["samples"].sum()),
        weight_energy=1.0,
        weight_latency=weight_latency,
    )
    return AllocationProblem.from_columns(base.ids, cols, cell)


@dataclass(frozen=True)
class OracleResult:
    objective: float
    uploads: tuple[bool, ...]


def upload_set_program(
    problem: AllocationProblem, up: np.ndarray
) -> tuple[cp.Problem | None, float]:
    """The bandwidth subproblem of upload set ``up`` as a cvxpy program, plus its constant.

    Returns ``(None, inf)`` when a non-uploader cannot afford fine-tuning or an uploader cannot
    afford encoding (E^c + p t <= E^max needs E^c < E^max as t > 0), and ``(None, value)`` when
    nobody uploads (nothing to optimise). Units: MHz, Mbit, s, J.
    """
    col = problem.column
    cell = problem.cell
    n, s_bits = col("samples"), col("upload_bits")
    f, p, g = col("cpu_hz"), col("tx_power_w"), col("channel_gain")
    enc_s = col("cycles_per_sample") * n / f
    enc_j = col("kappa") * col("cycles_per_sample") * n * f**2
    e_max, e_ft, t_ft = col("energy_budget_j"), col("finetune_energy_j"), col("finetune_latency_s")
    skip = ~up
    if np.any(e_ft[skip] > e_max[skip]) or np.any(enc_j[up] >= e_max[up]):
        return None, math.inf
    const = cell.weight_energy * float(e_ft[skip].sum() + enc_j[up].sum())
    floor = float(t_ft[skip].max()) if skip.any() else 0.0
    idx = np.flatnonzero(up)
    if idx.size == 0:
        return None, const + cell.weight_latency * floor
    a_mhz = p[idx] * g[idx] / cell.noise_psd_w_per_hz / MHZ
    s_mbit = s_bits[idx] / MHZ
    b = cp.Variable(idx.size, nonneg=True)
    t = cp.Variable(idx.size, nonneg=True)
    big_t = cp.Variable()
    rate = -cp.rel_entr(b, b + a_mhz) / math.log(2.0)  # b log2(1 + a/b), Mbit/s
    cons = [
        rate >= cp.multiply(s_mbit, cp.inv_pos(t)),
        t + enc_s[idx] <= big_t,
        big_t >= floor,
        t <= (e_max[idx] - enc_j[idx]) / p[idx],  # energy budget: E^c + p t <= E^max
        cp.sum(b) <= cell.bandwidth_hz / MHZ,
    ]
    obj = cell.weight_energy * cp.sum(cp.multiply(p[idx], t)) + cell.weight_latency * big_t
    return cp.Problem(cp.Minimize(obj), cons), const


def _solve_set(problem: AllocationProblem, up: np.ndarray) -> float:
    """Optimal objective with upload set ``up`` fixed (inf if infeasible)."""
    prob, const = upload_set_program(problem, up)
    if prob is None:
        return const
    with warnings.catch_warnings():
        # Clarabel flags "inaccurate" near its 1e-11 tolerances; 1e-9 is still far below the
        # 1e-6 the tests check, so an inaccurate-but-converged answer is used.
        warnings.simplefilter("ignore", UserWarning)
        prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11)
    if prob.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE):
        return math.inf
    return const + float(prob.value)


def brute_force(problem: AllocationProblem) -> OracleResult:
    """Enumerate every upload set reaching coverage; solve each with cvxpy."""
    n = problem.column("samples")
    best = OracleResult(math.inf, ())
    for bits in itertools.product((False, True), repeat=problem.size):
        up = np.array(bits)
        if n[up].sum() < problem.cell.min_samples:
            continue
        value = _solve_set(problem, up)
        if value < best.objective:
            best = OracleResult(value, bits)
    return best


def feasible_upload_set(problem: AllocationProblem) -> tuple[bool, ...] | None:
    """The first upload set (enumeration order) that the oracle finds feasible, or None.

    Stops at the first set with a finite optimum, so proving feasibility is cheap; proving
    infeasibility enumerates every set that reaches coverage.
    """
    n = problem.column("samples")
    for bits in itertools.product((False, True), repeat=problem.size):
        up = np.array(bits)
        if n[up].sum() < problem.cell.min_samples:
            continue
        try:
            value = _solve_set(problem, up)
        except cp.SolverError:  # Clarabel's numerical failure: decide feasibility with SCS
            prob, _ = upload_set_program(problem, up)
            assert prob is not None
            prob.solve(solver=cp.SCS)
            value = math.inf if prob.status in cp.settings.INF_OR_UNB else 0.0
        if math.isfinite(value):
            return bits
    return None
