"""The bandwidth-allocation subproblem: fixed upload set(s), exact, batched over sets.

For an upload set U and a round latency T the subproblem

    minimise  w_E Σ_{k∈U} p_k t_k(b_k)   s.t.  Σ b_k ≤ B,  b_k ≥ L_k(T)

is convex (``t_k`` is convex and decreasing in ``b_k``); ``L_k(T)`` is the least bandwidth that
lets device k finish by ``T`` within its energy budget. Its KKT conditions give
``b_k = max(L_k, b̂_k(λ))`` with one price ``λ`` per set, found by safeguarded Newton on
``ln Σ b_k(λ) = ln B``. The latency multipliers ``μ_k = λ a_k / (t_min ψ(a_k/L_k)) − w_E p_k`` of
the devices held at their cap give the derivative of the optimal value in ``T``:
``d/dT [w_T T + V_U(T)] = w_T − Σ μ_k``, increasing in ``T`` because the problem is jointly
convex in ``(b, T)``; :func:`optimise_round` finds its zero by Illinois regula falsi.

Arrays are ``(S, K)``: S upload sets (rows, boolean masks) over the same K devices.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from server.allocation.fleet import (
    BoolArray,
    Fleet,
    cap_inverse_bandwidth,
    marginal_time_price,
    preferred_inverse_bandwidth,
)
from server.allocation.radio import FloatArray

logger = logging.getLogger(__name__)

_MAX_PRICE_STEPS = 100
"""Iteration cap of the Newton search for the bandwidth price (typically 4 to 8)."""

_MAX_ROUND_STEPS = 200
"""Iteration cap of the regula-falsi search for the round latency (typically 10 to 30)."""

_HINT_STEP = 1e-3
"""Relative step from a latency hint to its second probe."""

_ROUND_RTOL = 1e-9
"""Relative width at which the round-latency bracket counts as converged."""


@dataclass(frozen=True, eq=False)
class Split:
    """Optimal bandwidth split of S upload sets at given round latencies."""

    feasible: BoolArray
    """(S,) the caps fit into the bandwidth."""
    price: FloatArray
    """(S,) λ, objective units per Hz."""
    inverse_bandwidth: FloatArray
    """(S, K) y = a/b of uploaders; ∞ for devices that do not upload."""
    upload_s: FloatArray
    """(S, K) upload time of uploaders, s; 0 for the others."""
    latency_price: FloatArray
    """(S, K) μ_k ≥ 0, objective units per second of round latency."""
    slope: FloatArray
    """(S,) d/dT of w_T T + V_U(T); −∞ where infeasible."""

    def select(self, rows: BoolArray) -> Split:
        """Return the split of the sets where ``rows`` is true."""
        return Split(
            feasible=self.feasible[rows],
            price=self.price[rows],
            inverse_bandwidth=self.inverse_bandwidth[rows],
            upload_s=self.upload_s[rows],
            latency_price=self.latency_price[rows],
            slope=self.slope[rows],
        )


def split_bandwidth(
    fleet: Fleet,
    masks: BoolArray,
    round_s: FloatArray,
    price_guess: float | FloatArray | None = None,
) -> Split:
    """Solve the bandwidth subproblem of each upload set at its round latency.

    Args:
        fleet: Device arrays.
        masks: (S, K) upload sets.
        round_s: (S,) round latency of each set, s (``inf`` leaves only the energy caps).
        price_guess: A bandwidth price λ close to the answer (e.g. from a relaxation or a
            nearby latency), one for all sets or one per set, to start the Newton search from.

    Returns:
        The split; rows whose caps exceed the bandwidth are marked infeasible.
    """
    s_rows, k = masks.shape
    cap_s = fleet.upload_cap_s(round_s[:, None])
    reachable = cap_s > fleet.t_min_s
    ok_rows = ~np.any(masks & ~reachable, axis=1)
    y_cap = np.full((s_rows, k), np.inf)
    y_cap[ok_rows] = np.where(
        masks[ok_rows],
        cap_inverse_bandwidth(fleet, cap_s[ok_rows], reachable[ok_rows] & masks[ok_rows]),
        np.inf,
    )
    floor_hz = np.where(masks, fleet.a_hz / y_cap, 0.0).sum(axis=1)
    feasible = ok_rows & (floor_hz < fleet.bandwidth_hz)
    price = np.full(s_rows, np.nan)
    y_all = np.full((s_rows, k), np.inf)
    mu = np.zeros((s_rows, k))
    slope = np.full(s_rows, -np.inf)
    price[feasible] = 0.0
    slope[feasible] = fleet.weight_latency
    rows = np.flatnonzero(feasible & masks.any(axis=1))
    if rows.size:
        m = masks[rows]
        guess = None
        if price_guess is not None:
            guess = np.broadcast_to(np.asarray(price_guess, dtype=np.float64), (s_rows,))[rows]
            guess = np.where(np.isfinite(guess) & (guess > 0), guess, np.nan)
        lam, y = _solve_price(fleet, m, y_cap[rows], guess)
        price[rows] = lam
        y_all[rows] = y
        held = m & (y >= y_cap[rows]) & np.isfinite(y_cap[rows])
        by_latency = held & (round_s[rows, None] - fleet.encode_s < fleet.budget_upload_s)
        y_safe = np.where(by_latency, y, 1.0)
        mu_rows = np.where(
            by_latency,
            lam[:, None] * marginal_time_price(fleet, y_safe) - fleet.weight_energy * fleet.power_w,
            0.0,
        )
        mu[rows] = np.maximum(mu_rows, 0.0)
        slope[rows] = fleet.weight_latency - mu[rows].sum(axis=1)
    upload_s = np.where(np.isfinite(y_all), fleet.upload_time_s(np.where(masks, y_all, 1.0)), 0.0)
    return Split(
        feasible=feasible,
        price=price,
        inverse_bandwidth=y_all,
        upload_s=np.where(masks & feasible[:, None], upload_s, 0.0),
        latency_price=mu,
        slope=slope,
    )


def _solve_price(
    fleet: Fleet, masks: BoolArray, y_cap: FloatArray, price_guess: FloatArray | None
) -> tuple[FloatArray, FloatArray]:
    """Find λ per row with Σ_k max(L_k, b̂_k(λ)) = B; return λ and the y = a/b of uploaders."""
    bandwidth = fleet.bandwidth_hz
    omega = fleet.weight_energy * fleet.power_w
    # From ψ(y) ≈ y²/2 (low SNR): Σ b̂ ≈ Σ sqrt(a ω t_min / 2λ) = B, unless a guess is given.
    root = np.where(masks, np.sqrt(fleet.a_hz * omega * fleet.t_min_s / 2.0), 0.0)
    x = 2.0 * np.log(root.sum(axis=1) / bandwidth)
    if price_guess is not None:
        x = np.where(np.isnan(price_guess), x, np.log(price_guess))
    lo = np.full_like(x, -np.inf)
    hi = np.full_like(x, np.inf)
    warm: tuple[FloatArray, FloatArray, FloatArray] | None = None
    y = y_cap
    for _ in range(_MAX_PRICE_STEPS):
        warm = preferred_inverse_bandwidth(fleet, np.exp(x)[:, None], omega, warm)
        _, y_hat, psi_slope = warm
        y = np.where(masks, np.minimum(y_cap, y_hat), np.inf)
        total = np.where(masks, fleet.a_hz / y, 0.0).sum(axis=1)
        g = np.log(total / bandwidth)
        if np.all(np.abs(g) <= 1e-14):
            break
        free = masks & (y_hat < y_cap)
        dg = -np.where(free, fleet.a_hz / (y_hat * psi_slope), 0.0).sum(axis=1) / total
        lo = np.where(g > 0, x, lo)
        hi = np.where(g < 0, x, hi)
        with np.errstate(divide="ignore", invalid="ignore"):
            newton = x - g / dg
        inside = np.isfinite(newton) & (newton > lo) & (newton < hi)
        bracketed = np.isfinite(lo) & np.isfinite(hi)
        fallback = np.where(bracketed, 0.5 * (lo + hi), np.where(g > 0, x + 4.0, x - 4.0))
        x = np.where(g == 0, x, np.where(inside, newton, fallback))
        if np.all(bracketed & (hi - lo <= 1e-14 * np.maximum(1.0, np.abs(x)))):
            break
    # Strict feasibility: shrink the free bandwidths if rounding left Σ b a hair above B.
    b = np.where(masks, fleet.a_hz / y, 0.0)
    held = masks & (y >= y_cap)
    held_hz = np.where(held, b, 0.0).sum(axis=1)
    free_hz = b.sum(axis=1) - held_hz
    with np.errstate(divide="ignore", invalid="ignore"):
        shrink = np.where(free_hz > 0, (bandwidth - held_hz) / free_hz, 1.0)
    shrink = np.minimum(shrink, 1.0)
    y = np.where(held | ~masks, y, y / shrink[:, None])
    return np.exp(x), y


@dataclass(frozen=True, eq=False)
class RoundPlan:
    """Optimal round latency and split of S upload sets."""

    round_s: FloatArray
    """(S,) optimal round latency T*, s (``inf`` where infeasible)."""
    proven_floor_s: FloatArray
    """(S,) a latency every feasible plan of the set exceeds (max T^ft of non-uploaders, the
    uploaders' reach, and every probe found infeasible), s."""
    split: Split
    """The bandwidth split at ``round_s``."""
    price: FloatArray
    """(S,) λ of the optimality conditions at ``round_s`` (the split's, or at a kink a blend)."""
    latency_price: FloatArray
    """(S, K) μ of the optimality conditions; ``Σ μ = w_T`` unless ``T*`` sits on a constraint
    that is kept hard in the bound (max T^ft, or the bandwidth limit)."""

    def select(self, rows: BoolArray) -> RoundPlan:
        """Return the plans of the sets where ``rows`` is true."""
        return RoundPlan(
            round_s=self.round_s[rows],
            proven_floor_s=self.proven_floor_s[rows],
            split=self.split.select(rows),
            price=self.price[rows],
            latency_price=self.latency_price[rows],
        )


@dataclass(eq=False)
class _Bracket:
    """Per-set state of the regula-falsi search on the slope of ``w_T T + V_U(T)``."""

    lo: FloatArray
    hi: FloatArray
    f_lo: FloatArray  # damped by Illinois
    f_hi: FloatArray  # damped by Illinois
    slope_lo: FloatArray  # true slopes at the ends
    slope_hi: FloatArray
    proven: FloatArray  # largest latency shown infeasible (or a hard floor)
    active: BoolArray
    last_side: NDArray[np.int8]
    price: FloatArray  # λ of the latest feasible probe: the next probe's Newton start
    rtol: float  # relative bracket width at which a set is done

    def step(self, fleet: Fleet, masks: BoolArray, at: FloatArray | None = None) -> None:
        """Probe one latency per active set (regula falsi, or ``at`` inside) and shrink."""
        rows = np.flatnonzero(self.active)
        a, b, fa, fb = self.lo[rows], self.hi[rows], self.f_lo[rows], self.f_hi[rows]
        with np.errstate(invalid="ignore"):
            secant = b - fb * (b - a) / (fb - fa)
        use_secant = np.isfinite(fa) & np.isfinite(secant) & (secant > a) & (secant < b)
        x = np.where(use_secant, secant, 0.5 * (a + b))
        if at is not None:
            x = np.where((at[rows] > a) & (at[rows] < b), at[rows], x)
        probe = split_bandwidth(fleet, masks[rows], x, self.price[rows])
        self.price[rows] = np.where(probe.feasible, probe.price, self.price[rows])
        fx = np.where(probe.feasible, probe.slope, -np.inf)
        self.proven[rows] = np.where(
            probe.feasible, self.proven[rows], np.maximum(self.proven[rows], x)
        )
        right = fx >= 0
        self.hi[rows] = np.where(right, x, b)
        self.slope_hi[rows] = np.where(right, fx, self.slope_hi[rows])
        self.lo[rows] = np.where(right, a, x)
        self.slope_lo[rows] = np.where(right, self.slope_lo[rows], fx)
        # Illinois: halve the kept end's value when the same end moved twice in a row.
        last = self.last_side[rows]
        self.f_hi[rows] = np.where(right, fx, np.where(last == -1, 0.5 * fb, fb))
        self.f_lo[rows] = np.where(right, np.where(last == 1, 0.5 * fa, fa), fx)
        self.last_side[rows] = np.where(right, 1, -1).astype(np.int8)
        width_ok = self.hi[rows] - self.lo[rows] <= self.rtol * self.hi[rows]
        flat = self.slope_hi[rows] <= 1e-12 * fleet.weight_latency
        self.active[rows] = ~(width_ok | flat)


def optimise_round(
    fleet: Fleet,
    masks: BoolArray,
    hint_s: FloatArray | None = None,
    rtol: float = _ROUND_RTOL,
) -> RoundPlan:
    """Minimise ``w_T T + V_U(T)`` over ``T`` for each upload set (exactly; convex in T).

    Non-uploaders pin ``T ≥ max T^ft``; uploaders need ``T > T^c + t_min``. The upper end of the
    bracket is the latency the split reaches without latency caps, where the slope is ``w_T``.

    Args:
        fleet: Device arrays.
        masks: (S, K) upload sets.
        hint_s: (S,) optional latencies near the optimum, probed first.
        rtol: Relative width of the final latency bracket (the objective's error is about
            ``w_T T · rtol`` at a kink, far less at a smooth minimum).
    """
    s_rows = masks.shape[0]
    floor_s = np.where(masks, 0.0, fleet.finetune_s).max(axis=1, initial=0.0)
    inf_split = split_bandwidth(fleet, masks, np.full(s_rows, np.inf))
    if fleet.weight_latency == 0.0:
        return RoundPlan(
            round_s=np.full(s_rows, np.inf),
            proven_floor_s=floor_s,
            split=inf_split,
            price=inf_split.price,
            latency_price=inf_split.latency_price,
        )
    reach_s = np.where(masks, fleet.encode_s + fleet.t_min_s, 0.0).max(axis=1, initial=0.0)
    free_s = np.where(masks, fleet.encode_s + inf_split.upload_s, 0.0).max(axis=1, initial=0.0)
    lo = np.maximum(floor_s, reach_s)
    # Just above the uncapped latency, so that rounding cannot make its caps exceed B.
    hi = np.maximum(floor_s, free_s * (1.0 + _ROUND_RTOL))
    f_lo = np.full(s_rows, -np.inf)
    active = inf_split.feasible & (hi > lo)
    # At lo = max T^ft (above the uploaders' reach) the slope may already be >= 0: a kink.
    at_floor = active & (floor_s > reach_s)
    if at_floor.any():
        rows = np.flatnonzero(at_floor)
        probe = split_bandwidth(fleet, masks[rows], lo[rows])
        f_lo[rows] = probe.slope
        done = probe.feasible & (probe.slope >= 0)
        hi[rows[done]] = lo[rows[done]]
        active[rows[done]] = False
    f_hi = np.full(s_rows, fleet.weight_latency)
    br = _Bracket(
        lo,
        hi,
        f_lo,
        f_hi,
        f_lo.copy(),
        f_hi.copy(),
        lo.copy(),
        active,
        np.zeros(s_rows, dtype=np.int8),
        inf_split.price.copy(),
        rtol,
    )
    steps = 0
    while br.active.any() and steps < _MAX_ROUND_STEPS:
        steps += 1
        at = None
        if hint_s is not None and steps == 1:
            at = hint_s
        elif hint_s is not None and steps == 2:
            # Bracket the optimum tightly: step a little past the hint, towards the optimum.
            left_of_optimum = br.lo == hint_s
            at = hint_s * np.where(left_of_optimum, 1.0 + _HINT_STEP, 1.0 - _HINT_STEP)
        br.step(fleet, masks, at)
    logger.debug("round latency search: %d steps for %d sets", steps, s_rows)
    round_s = np.where(inf_split.feasible, br.hi, np.inf)
    final = split_bandwidth(fleet, masks, round_s, br.price)
    price, mu = _kink_prices(fleet, masks, br, final)
    return RoundPlan(
        round_s=round_s, proven_floor_s=br.proven, split=final, price=price, latency_price=mu
    )


def _kink_prices(
    fleet: Fleet, masks: BoolArray, br: _Bracket, final: Split
) -> tuple[FloatArray, FloatArray]:
    """Multipliers at ``T*``; at a kink, blended from both sides so that ``Σ μ = w_T``.

    The slope jumps from < 0 to > 0 where, e.g., an energy cap turns into a latency cap;
    optimality then asks for the convex combination of the two sides' multipliers.
    """
    price = final.price.copy()
    mu = final.latency_price.copy()
    kink = np.flatnonzero(
        np.isfinite(br.slope_lo) & (br.slope_lo < 0) & (br.slope_hi > 1e-12 * fleet.weight_latency)
    )
    if kink.size:
        left = split_bandwidth(fleet, masks[kink], br.lo[kink])
        theta = br.slope_hi[kink] / (br.slope_hi[kink] - br.slope_lo[kink])
        price[kink] = theta * left.price + (1.0 - theta) * final.price[kink]
        mu[kink] = theta[:, None] * left.latency_price + (1.0 - theta[:, None]) * mu[kink]
    return price, mu
