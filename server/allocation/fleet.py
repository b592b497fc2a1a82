"""Per-device quantities derived once from a problem, and the building blocks of the solver.

Notation (docs/allocation.md): device k uploads ``s`` bits at rate ``r(b)``; ``a = p g / N0`` (Hz),
``t_min = s ln2 / a`` is its upload time at infinite bandwidth; the upload time at bandwidth
``b`` is ``t = t_min / φ(a/b)``. Encoding takes ``T^c = c n / f`` seconds and
``E^c = κ c n f²`` joules. Every array is float64 and may be 1-D (K devices) or 2-D
(S upload sets × K devices) by broadcasting.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from server.allocation.problem import AllocationProblem
from server.allocation.radio import LN2, FloatArray, phi, phi_inverse, psi, psi_inverse

BoolArray = NDArray[np.bool_]


@dataclass(frozen=True, eq=False)
class Fleet:
    """Derived per-device arrays of one problem (all length K) and the cell constants."""

    samples: FloatArray
    """n_k, samples."""
    power_w: FloatArray
    """p_k, W."""
    a_hz: FloatArray
    """a_k = p_k g_k / N0, Hz: the bandwidth at which the SNR is 1."""
    t_min_s: FloatArray
    """s_k ln2 / a_k, s: upload time at infinite bandwidth."""
    encode_s: FloatArray
    """T_k^c = c_k n_k / f_k, s."""
    encode_j: FloatArray
    """E_k^c = κ_k c_k n_k f_k², J."""
    finetune_j: FloatArray
    """E_k^ft, J."""
    finetune_s: FloatArray
    """T_k^ft, s."""
    budget_upload_s: FloatArray
    """(E_k^max - E_k^c) / p_k, s: the longest upload the energy budget pays for."""
    can_skip: BoolArray
    """Local fine-tuning fits the energy budget."""
    can_upload: BoolArray
    """Some finite bandwidth lets the upload fit the energy budget."""
    bandwidth_hz: float
    """B, Hz."""
    min_samples: float
    """N_min, samples."""
    weight_energy: float
    """w_E, 1/J."""
    weight_latency: float
    """w_T, 1/s."""

    @classmethod
    def from_problem(cls, problem: AllocationProblem) -> Fleet:
        """Derive the arrays of ``problem``."""
        col = problem.column
        cell = problem.cell
        n = col("samples")
        p = col("tx_power_w")
        a = p * col("channel_gain") / cell.noise_psd_w_per_hz
        cycles = col("cycles_per_sample") * n
        f = col("cpu_hz")
        encode_j = col("kappa") * cycles * f * f
        t_min = col("upload_bits") * LN2 / a
        budget_upload_s = (col("energy_budget_j") - encode_j) / p
        return cls(
            samples=n,
            power_w=p,
            a_hz=a,
            t_min_s=t_min,
            encode_s=cycles / f,
            encode_j=encode_j,
            finetune_j=col("finetune_energy_j"),
            finetune_s=col("finetune_latency_s"),
            budget_upload_s=budget_upload_s,
            can_skip=col("finetune_energy_j") <= col("energy_budget_j"),
            can_upload=budget_upload_s > t_min,
            bandwidth_hz=float(cell.bandwidth_hz),
            min_samples=float(cell.min_samples),
            weight_energy=float(cell.weight_energy),
            weight_latency=float(cell.weight_latency),
        )

    @property
    def size(self) -> int:
        """Number of devices K."""
        return int(self.samples.shape[0])

    def upload_cap_s(self, round_s: FloatArray | float) -> FloatArray:
        """Longest upload time allowed by the round latency ``round_s`` and the budget, s."""
        return np.minimum(np.asarray(round_s) - self.encode_s, self.budget_upload_s)

    def upload_time_s(self, y: FloatArray) -> FloatArray:
        """Upload time at normalised inverse bandwidth ``y = a/b``, s."""
        return self.t_min_s / phi(y)


def cap_inverse_bandwidth(fleet: Fleet, cap_s: FloatArray, ok: BoolArray) -> FloatArray:
    """Return ``y_cap = a / L``, the inverse of the least bandwidth meeting upload cap ``cap_s``.

    Entries where ``ok`` is false (the cap cannot be met at any bandwidth) get ``y = 1``
    and must be masked by the caller. An infinite cap gives ``y = ∞`` (no bandwidth needed).
    """
    ratio = np.where(ok, fleet.t_min_s / np.where(ok, cap_s, 1.0), 0.5)
    finite = ratio > 0.0
    safe = np.where(finite, ratio, 0.5)
    return np.where(finite, phi_inverse(safe), np.inf)


def preferred_inverse_bandwidth(
    fleet: Fleet,
    lam: FloatArray,
    omega: FloatArray,
    start: tuple[FloatArray, FloatArray, FloatArray] | None = None,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Return ``ŷ = a / b̂``: the bandwidth where the marginal cost equals the price ``lam``.

    ``b̂`` minimises ``omega · t(b) + lam · b`` without caps; ``omega`` is the price of one
    second of upload (w_E p, plus a latency price when one is given), ``lam`` the price of
    one hertz. Stationarity is ``omega · t_min · ψ(a/b) / a = lam``.

    Returns:
        ``(v, ŷ, slope)``: the ψ targets, ``ŷ`` and ``d ln ψ/d ln y`` there; pass the triple as
        ``start`` of the next call with a nearby price to save Newton steps.
    """
    v = lam * fleet.a_hz / (omega * fleet.t_min_s)
    y, slope = psi_inverse(v, start)
    return v, y, slope


def marginal_time_price(fleet: Fleet, y: FloatArray) -> FloatArray:
    """Return ``a / (t_min ψ(y))``: hertz needed per second of upload time saved, at ``y``."""
    return fleet.a_hz / (fleet.t_min_s * psi(y))
