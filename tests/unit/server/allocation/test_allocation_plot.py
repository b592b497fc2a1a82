"""The Pareto sweep behind ``--plot`` and the figure itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from server.allocation import solve
from server.allocation.plot import pareto_front, plot_plan
from tests.unit.server.allocation.alloc_cases import small_problem


def test_pareto_front_trades_latency_for_energy_monotonically() -> None:
    problem = small_problem(np.random.default_rng(13), 6, bandwidth_hz=1e6)
    front = pareto_front(problem, 7, target_gap=1e-9)
    weights = [p.weight_latency for p in front]
    assert weights == sorted(weights)
    latency = np.array([p.round_latency_s for p in front])
    energy = np.array([p.total_energy_j for p in front])
    # Exact optima of weighted sums: a larger latency weight never lengthens the round and
    # never saves energy.
    assert np.all(np.diff(latency) <= 1e-9 * latency[:-1])
    assert np.all(np.diff(energy) >= -1e-9 * energy[:-1])
    assert latency[0] > latency[-1]


def test_plot_writes_png_with_subsampled_decisions(tmp_path: Path) -> None:
    problem = small_problem(np.random.default_rng(12), 8, bandwidth_hz=1e6)
    plan = solve(problem)
    out = tmp_path / "plan.png"
    front = plot_plan(problem, plan, out, rng=np.random.default_rng(0), points=3)
    assert len(front) == 3
    assert out.read_bytes()[:4] == b"\x89PNG"
