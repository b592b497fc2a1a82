"""Solve the joint upload/bandwidth/latency problem: a feasible plan and a certified bound.

* K ≤ ``EXACT_MAX_DEVICES``: every admissible upload set is solved exactly (batched, see
  :mod:`server.allocation.split`); the best is optimal, and the minimum over sets of each set's
  Lagrangian dual value is the lower bound.
* Larger K: branch-and-bound over the round latency ``T``. Each evaluated cap ``T̄`` gives a
  Lagrangian bound ``D(T̄)`` (:mod:`server.allocation.relax`) and a plan (the relaxed upload set
  with its relaxed bandwidths); ``w_T T_i + D(T_{i+1})`` bounds every plan with
  ``T ∈ [T_i, T_{i+1}]``, and pricing the latency constraints with the multipliers of an end
  point tightens that bound. The interval with the lowest bound is priced, then split, until the
  gap closes; the best upload set is finally re-optimised over ``T`` exactly.

docs/allocation.md derives the bounds.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import numpy as np

from common.errors import AllocationError, InfeasibleAllocationError
from server.allocation.fleet import (
    BoolArray,
    Fleet,
    cap_inverse_bandwidth,
    preferred_inverse_bandwidth,
)
from server.allocation.problem import AllocationProblem
from server.allocation.radio import FloatArray, psi
from server.allocation.relax import DualPoint, Relaxation
from server.allocation.result import AllocationPlan
from server.allocation.split import RoundPlan, optimise_round, split_bandwidth

logger = logging.getLogger(__name__)

EXACT_MAX_DEVICES = 12
"""Up to this many devices every upload set is enumerated and the plan is exactly optimal."""

TARGET_GAP = 8e-4
"""Relative gap at which the latency branch-and-bound stops."""

MAX_LATENCY_POINTS = 60
"""Most round-latency caps the branch-and-bound evaluates."""

_GRID = 5
"""Initial latency caps: the incumbent's latency and halvings of its distance to the floor."""

_MIN_WIDTH = 1e-6
"""Relative width below which a latency interval is not split further."""

_POLISH_RTOL = 1e-7
"""Latency bracket of the final polish for K > 12, relative (objective error below 1e-7)."""

_FLIP_MAX_DEVICES = 200
"""Largest fleet on which the 1-flip local search runs when the gap is still open."""

_FLIP_MAX_ROUNDS = 10
"""Most improving flips of the local search."""

_ENUMERABLE = 16
"""Most devices whose 2^K upload sets are ever enumerated."""

_NAMED = 8
"""Device ids quoted in an infeasibility message before '... and N more'."""


class _NoPlanFoundError(AllocationError):
    """The heuristic found no feasible plan, and none of the checks proves there is none."""


@dataclass(frozen=True, eq=False)
class _Choice:
    """An upload set with its exact split: the solver's working plan."""

    uploads: BoolArray
    upload_s: FloatArray
    inverse_bandwidth: FloatArray
    objective: float


def solve(
    problem: AllocationProblem,
    *,
    target_gap: float = TARGET_GAP,
    exact_up_to: int = EXACT_MAX_DEVICES,
) -> AllocationPlan:
    """Find a feasible plan and a lower bound on the optimum.

    Args:
        problem: Devices and cell.
        target_gap: Relative gap at which the search over the round latency stops (K > 12).
        exact_up_to: Enumerate upload sets up to this many devices (at most 16: 2^K sets).

    Returns:
        The plan; exact (gap at float precision) when K ≤ ``EXACT_MAX_DEVICES``.

    Raises:
        InfeasibleAllocationError: no plan meets the budgets, coverage and bandwidth; the
            message names the binding constraint and the devices involved.
    """
    if not 0.0 <= target_gap < 1.0:
        raise AllocationError(f"target_gap must be in [0, 1), got {target_gap!r}")
    start = time.perf_counter()
    # np.where evaluates both branches; masked-out lanes may divide by zero or overflow.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        fleet = Fleet.from_problem(problem)
        _check_feasible(problem, fleet)
        method = "enumeration" if fleet.size <= min(exact_up_to, _ENUMERABLE) else "lagrangian"
        if method == "lagrangian":
            try:
                choice, bound = _branch_and_bound(problem, fleet, target_gap)
            except _NoPlanFoundError:
                if fleet.size > _ENUMERABLE:
                    raise
                logger.info("no plan from the relaxation; enumerating %d devices", fleet.size)
                method = "enumeration"
        if method == "enumeration":
            choice, bound = _enumerate(problem, fleet)
        plan = _plan(problem, fleet=fleet, choice=choice, bound=bound, method=method, start=start)
    logger.info(
        "allocation: K=%d objective=%.6g bound=%.6g gap=%.2e uploaders=%d T=%.4gs in %.3fs (%s)",
        fleet.size,
        plan.objective,
        plan.lower_bound,
        plan.gap,
        plan.uploaders,
        plan.round_latency_s,
        plan.solve_time_s,
        method,
    )
    return plan


def _names(problem: AllocationProblem, idx: np.ndarray) -> str:
    ids = [problem.ids[i] for i in idx[:_NAMED]]
    more = f" and {idx.size - _NAMED} more" if idx.size > _NAMED else ""
    return ", ".join(repr(i) for i in ids) + more


def _check_feasible(problem: AllocationProblem, fleet: Fleet) -> None:
    """Raise on the infeasibilities that can be proven per device or by a knapsack bound."""
    stuck = np.flatnonzero(~fleet.can_skip & ~fleet.can_upload)
    if stuck.size:
        raise InfeasibleAllocationError(
            f"energy budget: device(s) {_names(problem, stuck)} can neither fine-tune locally "
            "(finetune_energy_j > energy_budget_j) nor upload within energy_budget_j (encoding "
            "plus the least upload energy upload_bits·N0·ln2/channel_gain exceeds it: the rate "
            "can never carry the bits on that budget)"
        )
    up = fleet.can_upload
    reachable = float(fleet.samples[up].sum())
    if reachable < fleet.min_samples:
        no_up = np.flatnonzero(~up)
        who = (
            f"; device(s) {_names(problem, no_up)} cannot upload within budget"
            if no_up.size
            else ""
        )
        raise InfeasibleAllocationError(
            f"coverage: min_samples={problem.cell.min_samples} but all devices able to upload "
            f"hold only {int(reachable)} samples{who}"
        )
    need = _budget_bandwidth_hz(fleet)
    forced = np.flatnonzero(~fleet.can_skip)
    forced_hz = float(need[forced].sum())
    if forced.size and forced_hz >= fleet.bandwidth_hz:
        raise InfeasibleAllocationError(
            f"bandwidth: device(s) {_names(problem, forced)} must upload (fine-tuning exceeds "
            f"their energy budgets) and need at least {forced_hz:.6g} Hz to do so within "
            f"budget, but bandwidth_hz={fleet.bandwidth_hz:.6g}"
        )
    cover, least_hz = _greedy_cover(fleet, need, need / fleet.samples)
    if least_hz >= fleet.bandwidth_hz:
        raise InfeasibleAllocationError(
            f"coverage and bandwidth: reaching min_samples={problem.cell.min_samples} needs "
            f"at least {least_hz:.6g} Hz (uploads within the energy budgets of the cheapest "
            f"devices {_names(problem, np.flatnonzero(cover))}), but "
            f"bandwidth_hz={fleet.bandwidth_hz:.6g}"
        )


def _budget_bandwidth_hz(fleet: Fleet) -> FloatArray:
    """``L_k^E``: least bandwidth keeping device k's upload within its budget (∞: cannot)."""
    y_e = cap_inverse_bandwidth(fleet, fleet.budget_upload_s, fleet.can_upload)
    need: FloatArray = np.where(fleet.can_upload, fleet.a_hz / y_e, np.inf)
    return need


def _greedy_cover(fleet: Fleet, need_hz: FloatArray, key: FloatArray) -> tuple[BoolArray, float]:
    """Forced uploaders, then optional ones in ``key`` order until N_min; and its LP bandwidth.

    With ``key = L^E/n`` the bandwidth, the last device counted fractionally, is the optimum of
    the knapsack LP: no covering plan needs less (every uploader gets at least ``L^E``).
    """
    uploads = ~fleet.can_skip
    least_hz = float(need_hz[uploads].sum())
    missing = fleet.min_samples - float(fleet.samples[uploads].sum())
    if missing > 0:
        optional = np.flatnonzero(fleet.can_skip & fleet.can_upload)
        order = optional[np.argsort(key[optional], kind="stable")]
        cum = np.cumsum(fleet.samples[order])
        j = min(int(np.searchsorted(cum, missing)), order.size - 1)
        before = float(cum[j - 1]) if j > 0 else 0.0
        frac = (missing - before) / float(fleet.samples[order[j]])
        least_hz += float(need_hz[order[:j]].sum()) + frac * float(need_hz[order[j]])
        uploads = uploads.copy()
        uploads[order[: j + 1]] = True
    return uploads, least_hz


def _greedy_covers(fleet: Fleet) -> list[BoolArray]:
    """Greedy covering sets by three orders: L^E/n, L^E, and most samples first."""
    need = _budget_bandwidth_hz(fleet)
    keys = (need / fleet.samples, need, -fleet.samples)
    return [_greedy_cover(fleet, need, key)[0] for key in keys]


def _objectives(fleet: Fleet, masks: BoolArray, upload_s: FloatArray) -> FloatArray:
    energy = np.where(masks, fleet.encode_j + fleet.power_w * upload_s, fleet.finetune_j)
    latency = np.where(masks, fleet.encode_s + upload_s, fleet.finetune_s)
    out: FloatArray = fleet.weight_energy * energy.sum(axis=-1) + fleet.weight_latency * (
        latency.max(axis=-1)
    )
    return out


def _choose(
    fleet: Fleet, masks: BoolArray, hint_s: FloatArray | None = None, rtol: float = 1e-9
) -> tuple[_Choice | None, FloatArray, RoundPlan]:
    """Optimise the round latency of each set; return the best set, all values and rounds."""
    rounds = optimise_round(fleet, masks, hint_s, rtol)
    split = rounds.split
    values = np.where(split.feasible, _objectives(fleet, masks, split.upload_s), np.inf)
    best = int(np.argmin(values))
    if not np.isfinite(values[best]):
        return None, values, rounds
    choice = _Choice(
        uploads=masks[best],
        upload_s=split.upload_s[best],
        inverse_bandwidth=split.inverse_bandwidth[best],
        objective=float(values[best]),
    )
    return choice, values, rounds


def _consistent_prices(
    fleet: Fleet, price: FloatArray, mu: FloatArray, y: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """Lower λ where the latency prices of a split exceed ``w_T`` (T* at the bandwidth limit).

    When every uploader sits at its cap, λ is not pinned by the split; the dual wants the λ at
    which the held devices' prices ``μ_k = λ a/(t_min ψ(y_k)) − w_E p_k`` sum to ``w_T``.
    Bisection per set (the sum is increasing and piecewise linear in λ).
    """
    w_t = fleet.weight_latency
    held = mu > 0
    c = np.where(held, fleet.a_hz / (fleet.t_min_s * psi(np.where(held, y, 1.0))), 0.0)
    omega = fleet.weight_energy * fleet.power_w

    def total(lam: FloatArray) -> FloatArray:
        per_device = np.where(held, np.maximum(lam[:, None] * c - omega, 0.0), 0.0)
        out: FloatArray = per_device.sum(axis=1)
        return out

    over = mu.sum(axis=1) > w_t * (1.0 + 1e-12)
    lo, hi = np.zeros_like(price), price.copy()
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        high = total(mid) > w_t
        hi = np.where(high, mid, hi)
        lo = np.where(high, lo, mid)
    lam = np.where(over, lo, price)
    mu_new = np.where(held, np.maximum(lam[:, None] * c - omega, 0.0), 0.0)
    return lam, np.where(over[:, None], mu_new, mu)


def _set_bounds(fleet: Fleet, masks: BoolArray, rounds: RoundPlan) -> FloatArray:
    """Lagrangian lower bound of each fixed upload set at the prices of its optimum.

    With Σ b ≤ B priced at λ and each uploader's τ_k ≤ T at μ_k (Σ μ ≤ w_T), keeping the budgets
    and ``T ≥ floor_s`` (S,) (a latency every feasible plan of the set exceeds) as hard
    constraints, the Lagrangian separates per device (docs/allocation.md).
    """
    w_e, w_t = fleet.weight_energy, fleet.weight_latency
    split = rounds.split
    floor_s = rounds.proven_floor_s
    price = np.where(np.isfinite(rounds.price) & (rounds.price > 0), rounds.price, 0.0)
    lam, mu = _consistent_prices(fleet, price, rounds.latency_price, split.inverse_bandwidth)
    total = mu.sum(axis=1)
    scale = np.where(total > w_t, w_t / np.where(total > 0, total, 1.0), 1.0)
    mu = mu * scale[:, None]
    omega = w_e * fleet.power_w + mu
    y_e = cap_inverse_bandwidth(fleet, fleet.budget_upload_s, fleet.can_upload)
    positive = lam > 0
    y_hat = np.full(masks.shape, np.inf)
    if positive.any():
        y_hat[positive] = preferred_inverse_bandwidth(fleet, lam[positive, None], omega[positive])[
            1
        ]
    y = np.where(masks, np.minimum(y_e, y_hat), 1.0)
    t = fleet.upload_time_s(y)
    up_cost = w_e * (fleet.encode_j + fleet.power_w * t) + mu * (fleet.encode_s + t)
    up_cost = up_cost + lam[:, None] * np.where(np.isfinite(y), fleet.a_hz / y, 0.0)
    per_device = np.where(masks, up_cost, w_e * fleet.finetune_j)
    bound: FloatArray = (
        per_device.sum(axis=1) - lam * fleet.bandwidth_hz + (w_t - mu.sum(axis=1)) * floor_s
    )
    return bound


def _enumerate(problem: AllocationProblem, fleet: Fleet) -> tuple[_Choice, float]:
    k = fleet.size
    codes = np.arange(2**k)[:, None]
    masks = ((codes >> np.arange(k)) & 1).astype(bool)
    admissible = (
        np.all(masks | fleet.can_skip, axis=1)
        & np.all(~masks | fleet.can_upload, axis=1)
        & (masks.astype(np.float64) @ fleet.samples >= fleet.min_samples)
    )
    masks = masks[admissible]
    logger.debug("enumerating %d admissible upload sets of %d devices", masks.shape[0], k)
    choice, values, rounds = _choose(fleet, masks)
    if choice is None:
        raise InfeasibleAllocationError(
            f"coverage and bandwidth: no upload set reaching min_samples="
            f"{problem.cell.min_samples} fits into bandwidth_hz={fleet.bandwidth_hz:.6g} within "
            f"the energy budgets (devices {_names(problem, np.arange(k))})"
        )
    feasible = np.isfinite(values)
    bounds = _set_bounds(fleet, masks[feasible], rounds.select(feasible))
    return choice, min(float(bounds.min()), choice.objective)


def _initial_price(fleet: Fleet) -> float:
    omega = fleet.weight_energy * fleet.power_w
    root = np.sqrt(fleet.a_hz * omega * fleet.t_min_s / 2.0)
    return float((root[fleet.can_upload].sum() / fleet.bandwidth_hz) ** 2)


@dataclass
class _Interval:
    """Round latencies ``[left_s, right_s]`` with the best lower bound proven on them."""

    left_s: float
    right_s: float
    bound: float
    refined: bool = False
    """The latency-priced bound was tried; the next step splits the interval."""


class _LatencySearch:
    """Branch-and-bound over the round latency (see the module docstring)."""

    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet
        reach = np.where(fleet.can_upload, fleet.encode_s + fleet.t_min_s, np.inf)
        local = np.where(fleet.can_skip, fleet.finetune_s, np.inf)
        self.floor_s = float(np.minimum(reach, local).max())
        self.incumbent: _Choice | None = None
        self._points: dict[float, tuple[Relaxation, DualPoint]] = {}
        self.intervals: list[_Interval] = []
        self.evaluations = 0

    def consider(self, uploads: BoolArray, cap_s: float) -> None:
        """Split the bandwidth for ``uploads`` at latency ``cap_s``; keep it if it is the best."""
        fleet = self._fleet
        if uploads.astype(np.float64) @ fleet.samples < fleet.min_samples:
            return
        sp = split_bandwidth(fleet, uploads[None], np.array([cap_s]))
        if not sp.feasible[0]:
            return
        value = float(_objectives(fleet, uploads[None], sp.upload_s)[0])
        if self.incumbent is None or value < self.incumbent.objective:
            self.incumbent = _Choice(uploads, sp.upload_s[0], sp.inverse_bandwidth[0], value)

    def consider_relaxed(self, point: DualPoint) -> None:
        """Turn a relaxed solution into a plan without a new split.

        At the dual optimum the relaxed bandwidths of its upload set already satisfy the
        split's optimality conditions; only the marginal coverage device may push Σ b over B,
        which a uniform shrink of the free devices' bandwidth undoes. Budgets are re-checked.
        """
        fleet = self._fleet
        up = point.uploads
        if not up.any() or fleet.samples[up].sum() < fleet.min_samples:
            return
        b = np.where(up, fleet.a_hz / np.where(up, point.inverse_bandwidth, 1.0), 0.0)
        free = up & point.free
        held_hz = float(b[up & ~point.free].sum())
        free_hz = float(b[free].sum())
        if held_hz + free_hz > fleet.bandwidth_hz:
            if held_hz >= fleet.bandwidth_hz or free_hz == 0.0:
                return
            b = np.where(free, b * ((fleet.bandwidth_hz - held_hz) / free_hz), b)
        y = np.where(up, fleet.a_hz / np.where(up, b, 1.0), np.inf)
        t = np.where(up, fleet.upload_time_s(np.where(up, y, 1.0)), 0.0)
        if np.any(up & (t > fleet.budget_upload_s * (1.0 + 1e-12))):
            return
        value = float(_objectives(fleet, up[None], t[None])[0])
        if self.incumbent is None or value < self.incumbent.objective:
            self.incumbent = _Choice(up, t, y, value)

    def relax(self, cap_s: float, start_price: float) -> DualPoint:
        """Maximise the plain relaxation at ``cap_s``, remember it and try its upload set."""
        relaxation = Relaxation(self._fleet, cap_s, 0.0)
        dual = relaxation.maximise(start_price)
        self.evaluations += 1
        logger.debug(
            "relaxation at T=%.6gs: D=%.9g, λ=%.4g /Hz, ν=%.4g /sample, %d upload",
            cap_s,
            dual.value,
            dual.price,
            dual.coverage_price,
            int(dual.uploads.sum()),
        )
        self._points[cap_s] = (relaxation, dual)
        if np.isfinite(dual.value):
            self.consider_relaxed(dual)
        return dual

    def _price_near(self, cap_s: float) -> float:
        near = min(self._points, key=lambda c: abs(c - cap_s))
        return self._points[near][1].price

    def plain_bound(self, left_s: float, right_s: float) -> float:
        """``w_T · left + D(right)``: a bound on every plan with latency in the interval."""
        if right_s not in self._points:
            self.relax(right_s, self._price_near(right_s))
        return self._fleet.weight_latency * left_s + self._points[right_s][1].value

    def priced_bound(self, interval: _Interval) -> float:
        """Bound with the latency prices of an end point: ``(w_T − Σμ) left + D^μ(right)``.

        Of the two ends, the one whose prices sum closest to ``w_T`` (the value they have at
        the optimum) lends its prices.
        """
        candidates = []
        for end in (interval.left_s, interval.right_s):
            if end in self._points and np.isfinite(self._points[end][1].value):
                relaxation, point = self._points[end]
                mu, total = relaxation.latency_prices(point)
                candidates.append((abs(total - self._fleet.weight_latency), mu))
        if not candidates:
            return -np.inf
        mu = min(candidates, key=lambda c: c[0])[1]
        priced = Relaxation(self._fleet, interval.right_s, interval.left_s, mu)
        self.evaluations += 1
        return priced.maximise(self._price_near(interval.right_s)).value

    def _cut(self, interval: _Interval) -> float:
        """Split point: the middle, or past the right end of the unbounded last interval."""
        if np.isfinite(interval.right_s):
            return 0.5 * (interval.left_s + interval.right_s)
        return 2.0 * interval.left_s - self.floor_s

    def run(self, free: DualPoint, target_gap: float) -> float:
        """Refine until the gap closes or the budget of points is spent; return the bound."""
        fleet = self._fleet
        assert self.incumbent is not None
        top = float(np.max(_latencies(fleet, self.incumbent)))
        self._points[np.inf] = (Relaxation(fleet, np.inf, 0.0), free)
        caps = [self.floor_s + (top - self.floor_s) * 2.0**-j for j in range(_GRID - 1, -1, -1)]
        edges = [self.floor_s, *caps, np.inf]
        for cap in caps:
            self.relax(cap, self._price_near(cap))
        self.intervals = [
            _Interval(lo, hi, self.plain_bound(lo, hi)) for lo, hi in itertools.pairwise(edges)
        ]
        while self.evaluations < MAX_LATENCY_POINTS:
            worst = min(self.intervals, key=lambda iv: iv.bound)
            best = self.incumbent.objective
            logger.debug(
                "latency [%.6g, %.6g] bound %.9g (refined %s), best %.9g",
                worst.left_s,
                worst.right_s,
                worst.bound,
                worst.refined,
                best,
            )
            if best - worst.bound <= target_gap * best:
                break
            if not worst.refined:
                worst.refined = True
                worst.bound = max(worst.bound, self.priced_bound(worst))
                continue
            if worst.right_s - worst.left_s <= _MIN_WIDTH * worst.right_s:
                break
            self.intervals.remove(worst)
            edges = [worst.left_s, self._cut(worst), worst.right_s]
            for lo, hi in itertools.pairwise(edges):
                self.intervals.append(_Interval(lo, hi, self.plain_bound(lo, hi)))
        logger.debug(
            "latency search: %d relaxations, %d intervals", self.evaluations, len(self.intervals)
        )
        return min(iv.bound for iv in self.intervals)


def _branch_and_bound(
    problem: AllocationProblem, fleet: Fleet, target_gap: float
) -> tuple[_Choice, float]:
    search = _LatencySearch(fleet)
    free = Relaxation(fleet, np.inf, 0.0).maximise(_initial_price(fleet))
    if not np.isfinite(free.value):
        raise InfeasibleAllocationError(
            f"coverage and bandwidth: min_samples={problem.cell.min_samples} cannot be reached "
            f"within bandwidth_hz={fleet.bandwidth_hz:.6g} and the energy budgets"
        )
    search.consider_relaxed(free)
    if search.incumbent is None:
        # The relaxed set overshoots B (integrality); greedy covers are the fallback.
        for cover in _greedy_covers(fleet):
            search.consider(cover, np.inf)
    if search.incumbent is None:
        raise _NoPlanFoundError(
            f"no upload set found that reaches min_samples={problem.cell.min_samples} within "
            f"bandwidth_hz={fleet.bandwidth_hz:.6g}; the knapsack bound does not rule one out, "
            "so the instance is not proven infeasible"
        )
    bound = free.value if fleet.weight_latency == 0.0 else search.run(free, target_gap)
    best = _polish(fleet, search.incumbent)
    if best.objective - bound > target_gap * best.objective:
        best = _flip_descent(fleet, best)
    return best, min(bound, best.objective)


def _latencies(fleet: Fleet, choice: _Choice) -> FloatArray:
    return np.where(choice.uploads, fleet.encode_s + choice.upload_s, fleet.finetune_s)


def _flip_descent(fleet: Fleet, choice: _Choice) -> _Choice:
    """1-flip local search for small fleets: add or drop one uploader while that helps.

    All K neighbours are solved exactly in one batch (K × K arrays), so this runs only up to
    ``_FLIP_MAX_DEVICES`` devices, where few devices share the bandwidth and rounding the
    relaxation costs most.
    """
    k = fleet.size
    if k > _FLIP_MAX_DEVICES:
        return choice
    for _ in range(_FLIP_MAX_ROUNDS):
        masks = np.repeat(choice.uploads[None], k, axis=0)
        masks[np.arange(k), np.arange(k)] ^= True
        admissible = (
            np.all(masks | fleet.can_skip, axis=1)
            & np.all(~masks | fleet.can_upload, axis=1)
            & (masks.astype(np.float64) @ fleet.samples >= fleet.min_samples)
        )
        if not admissible.any():
            break
        better, _, _ = _choose(fleet, masks[admissible])
        if better is None or better.objective >= choice.objective * (1.0 - 1e-12):
            break
        logger.debug("flip descent: %.9g -> %.9g", choice.objective, better.objective)
        choice = better
    return choice


def _polish(fleet: Fleet, choice: _Choice) -> _Choice:
    """Re-optimise the round latency of the chosen upload set (exact for that set)."""
    hint = np.array([float(np.max(_latencies(fleet, choice)))])
    best, _, _ = _choose(fleet, choice.uploads[None], hint, _POLISH_RTOL)
    if best is None or best.objective >= choice.objective:
        return choice
    return best


def _plan(
    problem: AllocationProblem,
    *,
    fleet: Fleet,
    choice: _Choice,
    bound: float,
    method: str,
    start: float,
) -> AllocationPlan:
    up = choice.uploads
    t = np.where(up, choice.upload_s, 0.0)
    energy = np.where(up, fleet.encode_j + fleet.power_w * t, fleet.finetune_j)
    latency = np.where(up, fleet.encode_s + t, fleet.finetune_s)
    bandwidth = np.where(up, fleet.a_hz / choice.inverse_bandwidth, 0.0)
    total_j = float(energy.sum())
    round_s = float(latency.max())
    objective = fleet.weight_energy * total_j + fleet.weight_latency * round_s
    bound = min(bound, objective)  # the plan itself bounds the optimum from above
    gap = (objective - bound) / objective if objective > 0 else 0.0
    for arr in (up, bandwidth, energy, latency):
        arr.setflags(write=False)
    return AllocationPlan(
        objective=objective,
        lower_bound=bound,
        gap=gap,
        round_latency_s=round_s,
        total_energy_j=total_j,
        solve_time_s=time.perf_counter() - start,
        ids=problem.ids,
        upload=up,
        bandwidth_hz=bandwidth,
        energy_j=energy,
        latency_s=latency,
        method=method,
    )
