"""The Shannon-rate algebra against direct evaluation and scipy's root finder."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import brentq

from server.allocation.radio import curvature_term, phi, phi_inverse, psi, psi_inverse


def test_phi_inverse_matches_brentq_across_twenty_decades() -> None:
    c = np.exp(np.linspace(math.log(1e-12), math.log(0.999999), 60))
    y = phi_inverse(c)
    for ci, yi in zip(c, y, strict=True):
        ref = brentq(lambda v, ci=ci: math.log1p(v) / v - ci, 1e-12, 1e16, xtol=1e-14, rtol=1e-14)
        assert yi == pytest.approx(ref, rel=1e-9)


def test_psi_inverse_matches_brentq_and_reports_its_log_slope() -> None:
    v = np.exp(np.linspace(-40.0, 60.0, 50))
    y, slope = psi_inverse(v)
    np.testing.assert_allclose(psi(y), v, rtol=1e-11)
    for vi, yi in zip(v[::7], y[::7], strict=True):
        ref = brentq(lambda z, vi=vi: math.log(psi(np.array([math.exp(z)]))[0] / vi), -60, 80)
        assert math.log(yi) == pytest.approx(ref, abs=1e-9)
    h = 1e-6
    numeric = (np.log(psi(y * math.exp(h))) - np.log(psi(y * math.exp(-h)))) / (2 * h)
    np.testing.assert_allclose(slope, numeric, rtol=1e-6)


def test_curvature_term_is_continuous_at_the_series_switch_and_matches_the_rate_slope() -> None:
    y = np.array([0.0099999, 0.01, 0.0100001, 0.5, 30.0])
    d = curvature_term(y)
    direct = np.log1p(y) - y / (1 + y)
    np.testing.assert_allclose(d, direct, rtol=1e-9)
    # D(y)/ln2 is dr/db for a = 1 (b = 1/y): compare with a finite difference of the rate.
    b = 1.0 / y
    rate = b * np.log2(1 + 1 / b)
    step = 1e-6 * b
    slope = ((b + step) * np.log2(1 + 1 / (b + step)) - rate) / step
    np.testing.assert_allclose(d / math.log(2), slope, rtol=1e-4)


def test_upload_time_identity() -> None:
    # t = s / r(b) = t_min / φ(a/b) with t_min = s ln2 / a
    a, s = 3e7, 2e5
    b = np.array([1e3, 1e5, 1e7, 1e9])
    t = (s * math.log(2) / a) / phi(a / b)
    np.testing.assert_allclose(t, s / (b * np.log2(1 + a / b)), rtol=1e-12)
