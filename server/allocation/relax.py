"""Lagrangian relaxation of the whole problem with the round latency capped at ``T̄``.

Pricing bandwidth at ``λ ≥ 0``, coverage at ``ν ≥ 0`` and (optionally) each device's latency at
``μ_k ≥ 0`` with ``Σ μ_k ≤ w_T``, and keeping ``τ_k ≤ T̄``, the budgets and ``T ≥ T̲`` as hard
constraints, the problem restricted to ``T ∈ [T̲, T̄]`` separates by device:

    D(λ, ν, μ) = (w_T − Σμ) T̲ − λ B + ν N_min + Σ_k min(A_k, C_k(λ) − ν n_k)

with ``A_k = w_E E^ft_k + μ_k T^ft_k`` (local fine-tuning, when it fits the budget and ``T̄``) and
``C_k(λ) = min_{b ≥ L_k(T̄)} w_E (E^c_k + p_k t_k(b)) + μ_k (T^c_k + t_k(b)) + λ b`` (upload).
By weak duality ``D`` is a lower bound on ``w_T T + Σ_k w_E e_k`` over every feasible plan with
``T̲ ≤ T ≤ T̄``; docs/allocation.md has the derivation. For given ``λ`` the best ``ν`` is a
weighted quantile of the per-sample upload premiums ``(C_k − A_k)/n_k``, and ``D`` is concave in
``λ`` with supergradient ``Σ_{uploaders} b_k − B``, which :meth:`Relaxation.maximise` brackets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from server.allocation.fleet import (
    BoolArray,
    Fleet,
    cap_inverse_bandwidth,
    marginal_time_price,
)
from server.allocation.radio import FloatArray, psi, psi_inverse

_MAX_PRICE_STEPS = 60
"""Iteration cap of the bracketing search over ln λ."""

_PRICE_XTOL = 1e-5
"""Width of the ln λ bracket at which the dual counts as maximised."""

_MAX_STEP = 4.0
"""Largest move in ln λ per step (a dual that keeps growing means T̄ is infeasible)."""

_EXCESS_RTOL = 1e-7
"""Slope ``dD/d ln λ``, relative to ``|D|``, at which the dual counts as maximised."""

_MAX_RUNAWAY = 3
"""Big steps up in ln λ taken while the caps alone exceed B before stopping."""


@dataclass(frozen=True, eq=False)
class DualPoint:
    """The relaxation evaluated at one price pair."""

    value: float
    """D(λ, ν, μ): a lower bound on the objective over ``T ∈ [T̲, T̄]`` (``inf``: none feasible)."""
    price: float
    """λ, objective units per Hz."""
    coverage_price: float
    """ν, objective units per sample."""
    uploads: BoolArray
    """(K,) devices that upload in the relaxed solution (reaching N_min when possible)."""
    excess_hz: float
    """Σ_{uploaders} b_k − B: a supergradient of D in λ."""
    excess_slope: float
    """d excess / d ln λ with the upload set held fixed (≤ 0), Hz."""
    inverse_bandwidth: FloatArray
    """(K,) y = a/b each device would upload at (∞ where it cannot)."""
    free: BoolArray
    """(K,) devices not held at their cap at this price."""


class Relaxation:
    """The relaxation at one latency cap ``T̄`` and latency prices ``μ``."""

    def __init__(
        self,
        fleet: Fleet,
        cap_s: float,
        floor_s: float,
        latency_price: FloatArray | None = None,
    ) -> None:
        """Precompute what does not depend on the prices.

        Args:
            fleet: Device arrays.
            cap_s: T̄, s (``inf`` for no cap).
            floor_s: T̲, s: a lower end of the latencies considered.
            latency_price: μ (K,), objective units per second, ``Σ μ ≤ w_T``; zeros if None.
        """
        self._fleet = fleet
        mu = np.zeros(fleet.size) if latency_price is None else latency_price
        self._mu = mu
        w_e = fleet.weight_energy
        self._constant = (fleet.weight_latency - float(mu.sum())) * floor_s
        up_cap = fleet.upload_cap_s(cap_s)
        self._up_ok = fleet.can_upload & (up_cap > fleet.t_min_s)
        self._y_cap = cap_inverse_bandwidth(fleet, up_cap, self._up_ok)
        self._by_latency = fleet.encode_s + fleet.budget_upload_s > cap_s
        skip_ok = fleet.can_skip & (fleet.finetune_s <= cap_s)
        self._skip_cost = np.where(skip_ok, w_e * fleet.finetune_j + mu * fleet.finetune_s, np.inf)
        self._omega = w_e * fleet.power_w + mu
        self._up_fixed = w_e * fleet.encode_j + mu * fleet.encode_s
        self._infeasible = bool(np.any(~skip_ok & ~self._up_ok))
        # ψ-targets per unit price, and ψ at the caps: a device is held at its cap exactly when
        # its target reaches ψ(y_cap), so only the others need the Newton inverse of ψ.
        self._target_per_price = fleet.a_hz / (self._omega * fleet.t_min_s)
        finite = self._up_ok & np.isfinite(self._y_cap)
        self._psi_cap = np.where(finite, psi(np.where(finite, self._y_cap, 1.0)), np.inf)
        self._y_held = np.where(self._up_ok, self._y_cap, np.inf)
        self._warm: tuple[FloatArray, FloatArray, FloatArray] | None = None

    def _inverse_bandwidth(self, price: float) -> tuple[FloatArray, FloatArray, BoolArray]:
        """Return y = a/b of every device at bandwidth price ``price`` (∞ where it cannot upload).

        Returns:
            ``y``, ``d ln ψ / d ln y`` (meaningful where free) and the free (uncapped) mask.
        """
        v = price * self._target_per_price
        free = self._up_ok & (v < self._psi_cap)
        idx = np.flatnonzero(free)
        start = None
        if self._warm is not None:
            v0, y0, s0 = self._warm
            start = (v0[idx], y0[idx], s0[idx])
        y_free, slope_free = psi_inverse(v[idx], start)
        y = self._y_held.copy()
        y[idx] = y_free
        slope = np.full(v.shape, 2.0)
        slope[idx] = slope_free
        self._warm = (v, np.where(np.isfinite(y), y, 1.0), slope)
        return y, slope, free

    def latency_prices(self, point: DualPoint) -> tuple[FloatArray, float]:
        """Multipliers of the latency caps ``τ_k ≤ T̄`` at ``point``, scaled to ``Σ ≤ w_T``.

        Returns the multipliers and their sum before scaling.

        An uploader held at its latency cap would pay ``λ a/(t_min ψ(y_cap)) − ω_k`` per second
        the cap tightens; their sum is ``−dD/dT̄``. Used as ``μ`` for neighbouring intervals.
        """
        fleet = self._fleet
        free = self._inverse_bandwidth(point.price)[2]
        held = point.uploads & self._by_latency & ~free & self._up_ok
        y = np.where(held, self._y_cap, 1.0)
        mu = np.where(held, point.price * marginal_time_price(fleet, y) - self._omega, 0.0)
        mu = self._mu + np.maximum(mu, 0.0)
        total = float(mu.sum())
        if total > fleet.weight_latency:
            mu = mu * (fleet.weight_latency / total)
        return mu, total

    def release_price(self, uploads: BoolArray) -> float:
        """Largest λ at which some uploader in ``uploads`` is not held at its cap."""
        fleet = self._fleet
        y = np.where(uploads & np.isfinite(self._y_cap), self._y_cap, np.nan)
        if np.all(np.isnan(y)):
            return float(np.exp(-700.0))
        y_safe = np.where(np.isnan(y), 1.0, y)
        lam = self._omega * fleet.t_min_s * psi(y_safe) / fleet.a_hz
        return float(np.nanmax(np.where(np.isnan(y), np.nan, lam)))

    def evaluate(self, price: float) -> DualPoint:
        """Evaluate D at ``λ = price`` with the best ``ν`` for it."""
        fleet = self._fleet
        if self._infeasible:
            none = np.zeros(fleet.size, dtype=bool)
            return DualPoint(np.inf, price, 0.0, none, 0.0, 0.0, np.full(fleet.size, np.inf), none)
        y, psi_slope, free_all = self._inverse_bandwidth(price)
        y_safe = np.where(self._up_ok, y, 1.0)
        t = fleet.upload_time_s(y_safe)
        b = np.where(self._up_ok, fleet.a_hz / y_safe, 0.0)
        up_cost = np.where(self._up_ok, self._up_fixed + self._omega * t + price * b, np.inf)
        skip = self._skip_cost
        n = fleet.samples
        forced = ~np.isfinite(skip)
        with np.errstate(invalid="ignore"):
            premium = np.where(forced | ~self._up_ok, np.inf, (up_cost - skip) / n)
        premium = np.where(forced, -np.inf, premium)
        need = fleet.min_samples
        base = premium <= 0.0
        covered = float(n[base].sum())
        nu = 0.0
        uploads = base
        excess = float(b[base].sum()) - fleet.bandwidth_hz
        if covered < need:
            cand = np.flatnonzero((premium > 0.0) & np.isfinite(premium))
            order = cand[np.argsort(premium[cand], kind="stable")]
            cum = covered + np.cumsum(n[order])
            j = int(np.searchsorted(cum, need))
            if j >= order.size:
                return DualPoint(np.inf, price, np.inf, uploads, 0.0, 0.0, y, free_all)
            marginal = order[j]
            nu = float(premium[marginal])
            uploads = base.copy()
            uploads[order[: j + 1]] = True
            # The marginal device covers the rest fractionally: D's slope in λ counts that share.
            share = (need - (float(cum[j - 1]) if j > 0 else covered)) / float(n[marginal])
            excess += float(b[order[:j]].sum()) + share * float(b[marginal])
        per_device = np.minimum(skip, up_cost - nu * n)
        value = self._constant - price * fleet.bandwidth_hz + nu * need + float(per_device.sum())
        free = uploads & free_all
        slope = -float((b[free] / psi_slope[free]).sum())
        return DualPoint(value, price, nu, uploads, excess, slope, y, free_all)

    def maximise(self, start_price: float) -> DualPoint:
        """Maximise D over ``λ`` from ``start_price``; return the best point evaluated.

        Safeguarded Newton on the supergradient in ``ln λ`` (its derivative holds the upload
        set fixed), inside a bracket that only shrinks; D is concave, so the bracket closes on
        the maximiser. Any evaluated point is a valid bound; the best one is returned.
        """
        x = float(np.log(start_price))
        point = self.evaluate(start_price)
        best = point
        lo, hi = -np.inf, np.inf
        runaway = 0
        for _ in range(_MAX_PRICE_STEPS):
            # dD/d ln λ = λ · excess: stop where it is negligible against D itself.
            if not np.isfinite(point.value) or (
                abs(point.price * point.excess_hz) <= _EXCESS_RTOL * abs(point.value)
            ):
                break
            if point.excess_hz > 0:
                lo = x
            else:
                hi = x
            if hi - lo <= _PRICE_XTOL:
                break
            newton = x - point.excess_hz / point.excess_slope if point.excess_slope < 0 else np.nan
            if lo < newton < hi:
                x = float(np.clip(newton, x - _MAX_STEP, x + _MAX_STEP))
            elif np.isfinite(lo) and np.isfinite(hi):
                x = 0.5 * (lo + hi)
            elif point.excess_hz < 0:
                # Every uploader sits at its cap: jump to the price where the first one frees.
                x = min(x - _MAX_STEP, float(np.log(self.release_price(point.uploads))))
            else:
                # Caps alone exceed B: D grows linearly in λ; big steps, then stop (D is huge).
                runaway += 1
                if runaway > _MAX_RUNAWAY:
                    break
                x = x + 4.0 * _MAX_STEP
            point = self.evaluate(float(np.exp(x)))
            if point.value > best.value:
                best = point
        return best
