"""Figure of a plan: the energy–latency Pareto front and the per-device decisions.

matplotlib is imported here only, lazily, when ``--plot`` is given.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from server.allocation.problem import AllocationProblem
from server.allocation.result import AllocationPlan
from server.allocation.solver import solve

logger = logging.getLogger(__name__)

SWEEP_DECADES = (-2.0, 2.0)
"""The front sweeps w_T over this range of decades around the problem's own w_T."""

MAX_SCATTER = 5000
"""At most this many devices are drawn in the decision panel (a seeded subsample beyond)."""


@dataclass(frozen=True)
class ParetoPoint:
    """One solve of the weight sweep."""

    weight_latency: float
    """w_T used, 1/s."""
    round_latency_s: float
    """T of the plan, s."""
    total_energy_j: float
    """Σ e_k of the plan, J."""


def pareto_front(problem: AllocationProblem, points: int, target_gap: float) -> list[ParetoPoint]:
    """Solve the problem for ``points`` latency weights, log-spaced around its own ``w_T``.

    A zero ``w_T`` is swept from ``w_E·ΣE^ft/T^ft_max`` instead (the latency weight at which a
    second of round costs as much as the mean fine-tuning energy), so the front is not empty.
    """
    base = problem.cell.weight_latency
    if base == 0.0:
        ft_s = float(problem.column("finetune_latency_s").max()) or 1.0
        base = problem.cell.weight_energy * float(problem.column("finetune_energy_j").sum()) / ft_s
    front = []
    for i, w in enumerate(base * np.logspace(*SWEEP_DECADES, points)):
        plan = solve(problem.with_cell(weight_latency=float(w)), target_gap=target_gap)
        front.append(ParetoPoint(float(w), plan.round_latency_s, plan.total_energy_j))
        logger.info(
            "pareto %d/%d: w_T=%.4g T=%.4gs E=%.6gJ",
            i + 1,
            points,
            w,
            plan.round_latency_s,
            plan.total_energy_j,
        )
    return front


def plot_plan(
    problem: AllocationProblem,
    plan: AllocationPlan,
    path: Path,
    *,
    rng: np.random.Generator,
    points: int = 9,
    target_gap: float = 1e-3,
) -> list[ParetoPoint]:
    """Draw the Pareto front (with ``plan`` marked) and the decisions; save a PNG at ``path``.

    Args:
        problem: The problem ``plan`` solves.
        plan: The chosen plan.
        path: Output image.
        points: Solves in the weight sweep.
        target_gap: Gap of the sweep's solves.
        rng: Subsampling of the decision panel when K > ``MAX_SCATTER``.

    Returns:
        The swept front.
    """
    import matplotlib  # noqa: PLC0415  (lazy: only --plot pays for matplotlib)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415  (lazy, after selecting the backend)

    front = pareto_front(problem, points, target_gap)
    fig, (ax_front, ax_dev) = plt.subplots(1, 2, figsize=(11, 4.5))
    lat = [p.round_latency_s for p in front]
    en = [p.total_energy_j for p in front]
    ax_front.plot(lat, en, "o-", color="tab:blue", label="optimal plans (sweeping w_T)")
    ax_front.plot(
        [plan.round_latency_s], [plan.total_energy_j], "*", ms=16, color="tab:red", label="chosen"
    )
    ax_front.set_xlabel("round latency T (s)")
    ax_front.set_ylabel("total device energy (J)")
    ax_front.set_title("energy–latency Pareto front")
    ax_front.grid(True, alpha=0.3)
    ax_front.legend()

    k = problem.size
    idx = np.arange(k)
    if k > MAX_SCATTER:
        idx = np.sort(rng.choice(k, MAX_SCATTER, replace=False))
    gain = problem.column("channel_gain")[idx]
    up = plan.upload[idx]
    bw = plan.bandwidth_hz[idx]
    ax_dev.scatter(gain[up], bw[up], s=8, color="tab:green", label="upload")
    if (~up).any():
        floor = float(bw[up].min()) / 3.0 if up.any() else 1.0
        ax_dev.scatter(
            gain[~up],
            np.full(int((~up).sum()), floor),
            s=8,
            marker="x",
            color="tab:gray",
            label="fine-tune locally (b = 0, drawn at the bottom)",
        )
    ax_dev.set_xscale("log")
    ax_dev.set_yscale("log")
    ax_dev.set_xlabel("channel gain g")
    ax_dev.set_ylabel("bandwidth b (Hz)")
    shown = f" ({idx.size} of {k} shown)" if idx.size < k else ""
    ax_dev.set_title(f"per-device decisions{shown}")
    ax_dev.grid(True, alpha=0.3)
    ax_dev.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return front
