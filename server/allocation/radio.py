"""Shannon-rate algebra of the allocation model, vectorised over devices.

With ``a = p g / N0`` (Hz) and the normalised inverse bandwidth ``y = a / b``, the rate is
``r(b) = b log2(1 + a/b) = a φ(y) / ln 2`` with ``φ(y) = ln(1 + y) / y``, so the upload time of
``s`` bits is ``t = t_min / φ(y)`` where ``t_min = s ln 2 / a`` is the time at infinite bandwidth.
Everything the solver needs reduces to two universal monotone functions of ``y``:

* ``φ`` (decreasing from 1 to 0) turns an upload-time cap into a minimum bandwidth;
* ``ψ(y) = -y² φ'(y) / φ(y)²`` (increasing from 0 to ∞) is the marginal upload time saved per
  hertz, scaled: ``-dt/db = t_min ψ(y) / a``.

Their inverses are computed by safeguarded Newton iterations to machine precision, all devices
at once.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]

LN2 = float(np.log(2.0))
"""Natural log of 2: converts nats to bits."""

_SERIES_BELOW = 1e-2
"""Below this ``y`` the difference ``ln(1+y) - y/(1+y)`` is taken from its Taylor series."""

_MAX_NEWTON = 80
"""Iteration cap of the Newton loops (they converge in well under 10 on any float64 input)."""

_RTOL = 1e-7
"""Relative step after which a Newton loop stops: convergence is quadratic, so the iterate
that follows a step of size e is within about e² (1e-14) of the root."""


def phi(y: FloatArray) -> FloatArray:
    """Return ``φ(y) = ln(1 + y) / y`` for ``y > 0`` (normalised rate, dimensionless)."""
    return np.log1p(y) / y


def curvature_term(y: FloatArray) -> FloatArray:
    """Return ``D(y) = ln(1 + y) - y / (1 + y) > 0``, accurate also for tiny ``y``.

    ``D(y) / ln 2`` is the derivative of the rate with respect to bandwidth, ``r'(b)``.
    """
    out = np.log1p(y) - y / (1.0 + y)
    small = y < _SERIES_BELOW
    if small.any():
        ys = y[small]
        # Σ_{n≥2} (-1)^n (n-1)/n y^n, Horner form through n = 10 (next term < 1e-17 relative)
        acc = np.full_like(ys, 0.9)
        for n in range(9, 1, -1):
            acc = acc * ys + (-1.0) ** n * (n - 1) / n
        out[small] = acc * ys * ys
    return out


def psi(y: FloatArray) -> FloatArray:
    """Return ``ψ(y) = y² D(y) / ln²(1 + y)``, increasing from 0 (``y → 0``) to ∞."""
    log1p = np.log1p(y)
    out: FloatArray = y * y * curvature_term(y) / (log1p * log1p)
    return out


def phi_inverse(c: FloatArray) -> FloatArray:
    """Solve ``φ(y) = c`` for ``y`` given ``0 < c < 1`` (elementwise).

    Newton on the convex decreasing ``φ(y) - c`` started left of the root climbs monotonically
    to it. The start is a lower bound: ``y₁ = 2/c - 2`` (from ``ln(1+y) ≥ 2y/(2+y)``), improved
    by one step of the increasing map ``y ↦ ln(1+y)/c`` that fixes the root.
    """
    y_low = np.maximum(2.0 / c - 2.0, 1e-300)
    y = np.maximum(y_low, np.log1p(y_low) / c)
    for _ in range(_MAX_NEWTON):
        f = phi(y) - c
        slope = -curvature_term(y) / (y * y)
        step = f / slope
        y_new = y - step
        y = y_new
        if np.all(np.abs(step) <= _RTOL * y):
            break
    return y


def _log_psi_and_slope(z: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Return ``ln ψ(e^z)`` and its derivative in ``z`` (which lies in ``(1, 2]``)."""
    y = np.exp(z)
    log1p = np.log1p(y)
    one_plus = 1.0 + y
    d = log1p - y / one_plus
    small = y < _SERIES_BELOW
    if small.any():
        d[small] = curvature_term(y[small])
    value = 2.0 * z + np.log(d / (log1p * log1p))
    slope = 2.0 + y * y / (one_plus * one_plus * d) - 2.0 * y / (one_plus * log1p)
    return value, slope


def psi_inverse(
    v: FloatArray, start: tuple[FloatArray, FloatArray, FloatArray] | None = None
) -> tuple[FloatArray, FloatArray]:
    """Solve ``ψ(y) = v`` for ``y`` given ``v > 0`` (elementwise).

    Newton in ``z = ln y``: ``ln ψ`` has slope between 1 and 2 in ``z``, so each step at least
    halves the error and the loop turns quadratic after one or two steps. The default start
    ``y₀ = sqrt(2v) · (1 + ln(1 + v)/4)`` follows ``ψ ≈ y²/2`` (small y) and ``ψ ≈ y²/ln y``.

    Args:
        v: Targets, positive.
        start: Optional ``(v_prev, y_prev, slope_prev)`` of a previous solve with nearby targets;
            the start is extrapolated along the slope, ``ln y = ln y_prev + ln(v/v_prev)/slope``.

    Returns:
        ``y`` and ``d ln ψ / d ln y`` at ``y`` (for derivatives through the inverse).
    """
    log_v = np.log(v)
    if start is None:
        z = 0.5 * (np.log(2.0) + log_v) + np.log1p(0.25 * np.log1p(v))
    else:
        v_prev, y_prev, slope_prev = start
        z = np.log(y_prev) + (log_v - np.log(v_prev)) / slope_prev
    slope = np.full_like(z, 2.0)
    for _ in range(_MAX_NEWTON):
        value, slope = _log_psi_and_slope(z)
        step = (value - log_v) / slope
        z = z - step
        if np.all(np.abs(step) <= _RTOL):
            break
    return np.exp(z), slope
