"""Noise models against their formulas, and the spec language."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats

from common.errors import NoiseInjectionError
from device_sim.noise import (
    NOISE_KINDS,
    AdcConfig,
    AwgnNoise,
    DacConfig,
    GaussianNoise,
    MultiplicativeNoise,
    NoiseModel,
    PcmNoise,
    QuantNoise,
    StuckNoise,
    parse_noise_spec,
    parse_sweep,
)
from device_sim.report import summarize, t_quantile_975


def _weights(shape: tuple[int, ...] = (400, 500), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 0.3, shape).astype(np.float32)


class NoiseContract:
    """Properties every weight model must have (one subclass per model)."""

    __test__ = False

    def make(self) -> NoiseModel:
        raise NotImplementedError

    def test_keeps_shape_dtype_and_input(self) -> None:
        w = _weights((20, 30))
        before = w.copy()
        out = self.make().apply(w, np.random.default_rng(0), 0)
        assert out.shape == w.shape and out.dtype == w.dtype
        np.testing.assert_array_equal(w, before)

    def test_same_seed_same_draw(self) -> None:
        w = _weights((20, 30))
        a = self.make().apply(w, np.random.default_rng(5), 0)
        b = self.make().apply(w, np.random.default_rng(5), 0)
        np.testing.assert_array_equal(a, b)


class TestAwgn(NoiseContract):
    __test__ = True

    def make(self) -> NoiseModel:
        return AwgnNoise(snr_db=10.0)

    @pytest.mark.parametrize("snr_db", [0.0, 10.0, 20.0])
    def test_noise_std_follows_snr(self, snr_db: float) -> None:
        w = _weights()
        noise = AwgnNoise(snr_db).apply(w, np.random.default_rng(1)) - w
        expected = w.std() / math.sqrt(10 ** (snr_db / 10))
        assert noise.std() == pytest.approx(expected, rel=0.01)
        assert abs(noise.mean()) < 4 * expected / math.sqrt(w.size)


class TestGaussian(NoiseContract):
    __test__ = True

    def make(self) -> NoiseModel:
        return GaussianNoise(std=0.05)

    def test_per_tensor_sigma_is_std_times_max_abs(self) -> None:
        w = _weights()
        noise = GaussianNoise(0.05).apply(w, np.random.default_rng(2)) - w
        assert noise.std() == pytest.approx(0.05 * np.abs(w).max(), rel=0.01)

    def test_per_channel_sigma_uses_each_rows_max(self) -> None:
        scales = np.array([0.1, 1.0, 10.0], dtype=np.float32)
        w = _weights((3, 50000)) * scales[:, None]
        noise = GaussianNoise(0.02, per="channel").apply(w, np.random.default_rng(3), 0) - w
        for row in range(3):
            expected = 0.02 * np.abs(w[row]).max()
            assert noise[row].std() == pytest.approx(expected, rel=0.02)

    def test_zero_std_is_identity(self) -> None:
        w = _weights((10, 10))
        np.testing.assert_array_equal(GaussianNoise(0.0).apply(w, np.random.default_rng(0)), w)


class TestMultiplicative(NoiseContract):
    __test__ = True

    def make(self) -> NoiseModel:
        return MultiplicativeNoise(std=0.1)

    def test_relative_error_has_the_given_std(self) -> None:
        w = _weights() + 1.0  # away from zero
        ratio = MultiplicativeNoise(0.1).apply(w, np.random.default_rng(4)) / w - 1.0
        assert ratio.std() == pytest.approx(0.1, rel=0.01)
        assert abs(ratio.mean()) < 0.001


class TestQuant(NoiseContract):
    __test__ = True

    def make(self) -> NoiseModel:
        return QuantNoise(bits=4)

    @pytest.mark.parametrize("bits", [2, 4, 8])
    def test_matches_brute_force_nearest_level(self, bits: int) -> None:
        w = _weights((30, 40))
        levels = 2 ** (bits - 1) - 1
        grid = np.arange(-levels, levels + 1) * (np.abs(w).max() / levels)
        brute = grid[np.abs(w[..., None] - grid).argmin(axis=-1)]
        out = QuantNoise(bits).apply(w, np.random.default_rng(0))
        np.testing.assert_allclose(out, brute, rtol=0, atol=1e-6)
        assert len(np.unique(out)) <= 2 * levels + 1

    def test_per_channel_uses_each_columns_range(self) -> None:
        w = _weights((50, 2)) * np.array([1.0, 100.0], dtype=np.float32)
        out = QuantNoise(3, per="channel").apply(w, np.random.default_rng(0), channel_axis=1)
        for col in range(2):
            step = np.abs(w[:, col]).max() / 3
            assert np.abs(out[:, col] - w[:, col]).max() <= step / 2 + 1e-4 * step


class TestStuck(NoiseContract):
    __test__ = True

    def make(self) -> NoiseModel:
        return StuckNoise(p=0.1)

    def test_fraction_stuck_at_zero_is_p(self) -> None:
        w = _weights()
        out = StuckNoise(0.1).apply(w, np.random.default_rng(6))
        changed = (out != w).mean()
        sd = math.sqrt(0.1 * 0.9 / w.size)
        assert abs(changed - 0.1) < 5 * sd
        assert (out[out != w] == 0).all()

    def test_stuck_at_max_takes_plus_or_minus_max(self) -> None:
        w = _weights()
        out = StuckNoise(0.2, at="max").apply(w, np.random.default_rng(7))
        stuck = out[out != w]
        np.testing.assert_allclose(np.abs(stuck), np.abs(w).max())
        assert 0.45 < (stuck > 0).mean() < 0.55


class TestPcm(NoiseContract):
    __test__ = True

    def make(self) -> NoiseModel:
        return PcmNoise(t=3600.0)

    def test_t0_has_read_noise_but_no_drift(self) -> None:
        # aihwkit's programme-then-drift flow at t_inference = 0: t = t_0, so no drift
        # ((t/t_0)^-ν = 1) but 1/f read noise σ_read = Q·sqrt(ln((t_0 + t_read)/(2 t_read)))
        model = PcmNoise(t=0.0)
        g_prog, g_now = model._device(np.full(400_000, model.g_max), np.random.default_rng(8))
        ratio = g_now / g_prog
        sigma_read = model.read_sigma(g_prog)
        assert float(np.min(sigma_read)) > 0.03  # Q = 0.0088 at g_max, sqrt(ln(4e7)) ≈ 4.18
        assert ratio.mean() == pytest.approx(1.0, abs=4 * 0.04 / math.sqrt(4e5))
        assert ratio.std() == pytest.approx(math.sqrt(np.mean(sigma_read**2)), rel=0.01)

    @pytest.mark.parametrize("compensate", [True, False])
    def test_t0_is_continuous_with_t_one_second(self, compensate: bool) -> None:
        # same draws at t = 0 and t = 1 s: drift (21/20)^-ν and sqrt(ln) change by < 0.5 %
        w = _weights((64, 100))
        at0 = PcmNoise(t=0.0, compensate=compensate).apply(w, np.random.default_rng(11))
        at1 = PcmNoise(t=1.0, compensate=compensate).apply(w, np.random.default_rng(11))
        w_max = float(np.abs(w).max())
        assert float(np.abs(at1 - at0).max()) < 0.01 * w_max
        err0, err1 = np.std(at0 - w), np.std(at1 - w)
        assert err0 == pytest.approx(err1, rel=0.02)

    def test_compensation_factor_is_stable_for_zero_sum_rows(self) -> None:
        # edge-detector-like filters: every row sums to 0, so an all-ones readout reads noise;
        # the identity readout (Σ|w|) gives a factor that barely moves between draws
        rng = np.random.default_rng(12)
        w = rng.normal(0.0, 0.3, (32, 9))
        w = (w - w.mean(axis=1, keepdims=True)).astype(np.float32)
        factors = []
        for seed in range(40):
            raw = PcmNoise(t=86400.0, compensate=False).apply(w, np.random.default_rng(seed))
            fixed = PcmNoise(t=86400.0).apply(w, np.random.default_rng(seed))
            nonzero = np.abs(raw) > 1e-3
            factors.append(float(np.median(fixed[nonzero] / raw[nonzero])))
        spread = np.std(factors) / np.mean(factors)
        assert spread < 0.03, factors
        # and it undoes the median drift of a day: Σ|w| shrinks by about (86420/20)^-ν
        assert 1.3 < np.mean(factors) < 1.8

    def test_drift_without_compensation_scales_by_median_power_law(self) -> None:
        t = 1e6
        w = np.ones(200_000)
        out = PcmNoise(t=t, compensate=False).apply(w, np.random.default_rng(9))
        # g_rel = 1: μ_ν = max(0.0244, 0.049) = 0.049, σ_ν = 0.008; read and programming noise are
        # symmetric and small, so the median follows the median exponent
        assert np.median(out) == pytest.approx(((t + 20.0) / 20.0) ** -0.049, rel=0.01)

    def test_drift_compensation_restores_mean_output_scale(self) -> None:
        w = _weights((64, 256))
        ones = np.ones(256)
        clean_scale = np.abs(w @ ones).mean()
        raw = PcmNoise(t=1e6, compensate=False).apply(w, np.random.default_rng(10), 0)
        fixed = PcmNoise(t=1e6, compensate=True).apply(w, np.random.default_rng(10), 0)
        assert np.abs(raw @ ones).mean() / clean_scale < 0.7
        assert np.abs(fixed @ ones).mean() / clean_scale == pytest.approx(1.0, abs=0.05)


# --- PCM against aihwkit's recorded statistics ------------------------------------------------
# tests/data/aihwkit_pcm_weights.json holds aihwkit 1.2.0's PCMLikeNoiseModel(g_max=25) with
# GlobalDriftCompensation on a probe tensor (bench/device_sim_aihwkit_weights.py --fixture): per
# target level |w|/w_max, mean, std and quantiles of (state − target)/w_max for the programmed,
# drifted and compensated weights at t = 0, 1 h, 1 day, 1 year and of the change (drifted −
# programmed of one draw: drift and read noise alone), each with its per-draw std, and the
# compensation factor. device_sim draws the same probe here (fixed seed, so deterministic) and must
# land within Z combined standard errors: SE = sd_per_draw · sqrt(1/n_aihwkit + 1/n_device_sim),
# aihwkit's per-draw std standing in for both sides (the null hypothesis: equal distributions).

AIHWKIT_FIXTURE = Path(__file__).resolve().parents[2] / "data" / "aihwkit_pcm_weights.json"
Z = 5.0
"""Standard errors allowed: P(|N(0,1)| > 5) = 6e-7 per check, 5e-4 over all 823 checks."""
PROBE_DRAWS = 4
# Known modelling difference (docs/benchmarks.md, "Weight-level agreement"): aihwkit's
# drift_weights re-converts the PROGRAMMED weights to a fresh differential pair
# (noise/base.py apply_drift_noise -> convert_to_conductances), so the net weight drifts and is
# read on one device; device_sim keeps both programmed devices, the zero-target one (conductance
# max(0, σ0·ξ), σ0 = 0.26348 µS = aihwkit's c0) drifting with its own exponent and read noise.
# That device bounds the difference: mean conductance σ0/sqrt(2π), second moment σ0²/2.
_G_MAX = 25.0
_ZERO_DEVICE_MEAN = 0.26348 / math.sqrt(2.0 * math.pi) / _G_MAX  # 0.0042 w_max
_ZERO_DEVICE_RMS = 0.26348 / math.sqrt(2.0) / _G_MAX  # 0.0075 w_max
_FACTOR_ALLOWANCE = 0.01
"""Relative compensation-factor difference allowed: the zero-target devices shift Σ|w| of the
probe (mean |w| 0.24 w_max) by up to 0.0042 / 0.24 = 1.8 % before drift scaling; measured 0.06 %
(t = 0) to 0.56 % (1 year)."""


@functools.cache
def _aihwkit_fixture() -> dict[str, Any]:
    return dict(json.loads(AIHWKIT_FIXTURE.read_text()))


def _probe(fixture: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The fixture's probe tensor (rows + 1, levels) and row signs, as the bench builds it."""
    rows, levels = fixture["probe"]["rows"], np.asarray(fixture["probe"]["levels"])
    sign = np.where(np.arange(rows + 1) % 2 == 0, 1.0, -1.0)[:, None]
    weights = sign * levels[None, :]
    weights[rows] = 0.0
    weights[rows, -1] = 1.0  # the single weight at w_max
    sign[rows] = 1.0
    return weights, sign


def _statistics(errors: np.ndarray, quantiles: list[float]) -> np.ndarray:
    """(mean, std, quantiles) per column, the order of the fixture's ``statistics_order``."""
    return np.concatenate(
        [errors.mean(0)[None], errors.std(0)[None], np.quantile(errors, quantiles, axis=0)]
    )


class _FasterDrift(PcmNoise):
    """A deliberately wrong PCM model (drift exponent 5 % too large), to show the test can fail."""

    def drift_moments(self, g_target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mu, sigma = super().drift_moments(g_target)
        return mu * 1.05, sigma


_MODELS: dict[str, Callable[[float], PcmNoise]] = {
    "pcm": lambda t: PcmNoise(t=t),
    "wrong c1": lambda t: PcmNoise(t=t, prog_coeff=(0.26348, 1.9650 * 0.95, -1.1731)),
    "wrong nu": lambda t: _FasterDrift(t=t),
}


def _pair(model: PcmNoise, weights: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """(programmed, at time t) weights of one device_sim draw of both devices (w_max = 1)."""
    plus = model._device(np.clip(weights * model.g_max, 0.0, model.g_max), rng)
    minus = model._device(np.clip(-weights * model.g_max, 0.0, model.g_max), rng)
    return (plus[0] - minus[0]) / model.g_max, (plus[1] - minus[1]) / model.g_max


@functools.cache
def _device_sim_probe(
    kind: str = "pcm", only: str | None = None
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """device_sim's statistics on the probe (PROBE_DRAWS draws) and mean compensation factors.

    drifted/compensated through the public ``apply_scaled``; programmed and change (drifted −
    programmed of the same devices) from ``_device``, the step ``apply`` runs per device.
    ``only``: one time (fixture key) to compute, for the deliberately wrong models.
    """
    fixture = _aihwkit_fixture()
    make = _MODELS[kind]
    weights, sign = _probe(fixture)
    rows = fixture["probe"]["rows"]
    times = [
        t for k, t in ((f"{t:g}", t) for t in fixture["times_s"].values()) if only in (None, k)
    ]
    errors: dict[str, list[np.ndarray]] = {"programmed": []}
    factors: dict[str, list[float]] = {f"{t:g}": [] for t in times}
    for draw in range(PROBE_DRAWS):
        rng = np.random.default_rng([2026, draw])
        programmed, _ = _pair(make(0.0), weights, rng)
        errors["programmed"].append((sign * (programmed - weights))[:rows])
        for t in times:
            now, factor = make(t).apply_scaled(weights, rng)
            before, after = _pair(make(t), weights, rng)
            for state, value in (
                ("drifted", now - weights),
                ("compensated", now * factor - weights),
                ("change", after - before),
            ):
                errors.setdefault(f"{state}@{t:g}", []).append((sign * value)[:rows])
            factors[f"{t:g}"].append(factor)
    quantiles = [int(name[1:]) / 100 for name in fixture["statistics_order"][2:]]
    stats = {k: _statistics(np.concatenate(v), quantiles) for k, v in errors.items()}
    return stats, {k: float(np.mean(v)) for k, v in factors.items()}


def _allowance(label: str, stat: str, expected: np.ndarray, factor: float) -> np.ndarray:
    """What the zero-target device's different treatment may move a statistic (w_max units)."""
    if label == "programmed":
        return np.zeros_like(expected)  # both programme the same pair: no allowance
    sd = _aihwkit_fixture()["statistics"][label]["value"][1]
    spread = np.sqrt(np.square(sd) + _ZERO_DEVICE_RMS**2) - np.asarray(sd)
    if stat == "std":
        extra = spread
    elif stat == "mean":
        extra = np.full_like(expected, _ZERO_DEVICE_MEAN)
    else:
        z = abs(float(stats.norm.ppf(int(stat[1:]) / 100)))
        extra = _ZERO_DEVICE_MEAN + z * spread
    if label.startswith("compensated"):
        level = np.asarray(_aihwkit_fixture()["probe"]["levels"])
        return np.asarray(factor * extra + level * factor * _FACTOR_ALLOWANCE)
    return np.asarray(extra)


def _mismatches(
    labels: list[str], with_allowance: bool, kind: str = "pcm", only: str | None = None
) -> list[str]:
    """Every statistic of ``labels`` where device_sim leaves the allowed band around aihwkit's."""
    fixture = _aihwkit_fixture()
    ours, _ = _device_sim_probe(kind, only)
    levels = fixture["probe"]["levels"]
    out = []
    for label in labels:
        ref = fixture["statistics"][label]
        expected, sd = np.asarray(ref["value"]), np.asarray(ref["per_draw_sd"])
        se = sd * math.sqrt(1.0 / ref["draws"] + 1.0 / PROBE_DRAWS)
        t = label.partition("@")[2]
        factor = fixture["compensation_factor"][t]["value"] if t else 1.0
        for i, stat in enumerate(fixture["statistics_order"]):
            allowed = Z * se[i] + 1e-9
            if with_allowance:
                allowed = allowed + _allowance(label, stat, expected[i], factor)
            diff = ours[label][i] - expected[i]
            for j in np.flatnonzero(np.abs(diff) > allowed):
                out.append(
                    f"{label} {stat} level {levels[j]}: device_sim {ours[label][i][j]:.5f}, "
                    f"aihwkit {expected[i][j]:.5f} (allowed ±{allowed[j]:.5f})"
                )
    return out


class TestPcmAgainstAihwkit:
    """device_sim's PCM draws against aihwkit's recorded statistics (no aihwkit needed)."""

    def test_fixture_is_aihwkit_1_2(self) -> None:
        fixture = _aihwkit_fixture()
        assert fixture["versions"]["aihwkit"] == "1.2.0"
        assert "device_sim_aihwkit_weights" in fixture["command"]
        assert fixture["statistics"]["programmed"]["draws"] >= 50

    def test_programming_noise_matches_aihwkit(self) -> None:
        # same pair mapping and programming draw in both: no allowance
        assert not _mismatches(["programmed"], with_allowance=False)

    def test_drift_and_read_noise_match_aihwkit(self) -> None:
        labels = [k for k in _aihwkit_fixture()["statistics"] if k != "programmed"]
        assert not _mismatches(labels, with_allowance=True)

    def test_compensation_factor_matches_aihwkit(self) -> None:
        _, ours = _device_sim_probe("pcm", None)
        for t, ref in _aihwkit_fixture()["compensation_factor"].items():
            se = ref["per_draw_sd"] * math.sqrt(1.0 / ref["draws"] + 1.0 / PROBE_DRAWS)
            allowed = Z * se + _FACTOR_ALLOWANCE * ref["value"]
            assert ours[t] == pytest.approx(ref["value"], abs=allowed), t

    @pytest.mark.xfail(
        strict=True,
        reason="aihwkit re-splits the programmed weight before drift (one device drifts and is "
        "read); device_sim drifts and reads both devices: small weights' spread differs by 4-23 %",
    )
    def test_drift_matches_aihwkit_without_allowance(self) -> None:
        labels = [k for k in _aihwkit_fixture()["statistics"] if k != "programmed"]
        assert not _mismatches(labels, with_allowance=False)

    def test_a_wrong_programming_coefficient_fails(self) -> None:
        assert _mismatches(["programmed"], with_allowance=False, kind="wrong c1", only="0")

    def test_a_wrong_drift_exponent_fails(self) -> None:
        year = f"{31536000.0:g}"
        labels = [f"{state}@{year}" for state in ("drifted", "compensated", "change")]
        assert _mismatches(labels, with_allowance=True, kind="wrong nu", only=year)


def test_spec_composition_and_defaults() -> None:
    spec = parse_noise_spec("pcm:t=3600+quant:bits=6,per=channel+dac:bits=7+adc:bits=9,noise=0.06")
    assert spec.weight_models == (PcmNoise(t=3600.0), QuantNoise(bits=6, per="channel"))
    assert spec.dac == DacConfig(bits=7)
    assert spec.adc == AdcConfig(bits=9, noise=0.06, bound=12.0)
    assert parse_noise_spec("pcm:t=0,compensate=false").weight_models == (
        PcmNoise(t=0.0, compensate=False),
    )
    assert parse_noise_spec("none").is_clean
    # a "+" inside a number's exponent is part of the number, not a model separator
    assert parse_noise_spec("pcm:t=3.1536e+07+quant:bits=8").weight_models == (
        PcmNoise(t=31536000.0),
        QuantNoise(bits=8),
    )
    assert not parse_noise_spec("quant:bits=4").is_random


def test_composed_models_apply_in_order() -> None:
    w = _weights((10, 10))
    spec = parse_noise_spec("multiplicative:std=0.1+quant:bits=3")
    rng = np.random.default_rng(0)
    expected = QuantNoise(3).apply(MultiplicativeNoise(0.1).apply(w, np.random.default_rng(0)), rng)
    np.testing.assert_array_equal(spec.perturb(w, np.random.default_rng(0), 0), expected)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("foo:x=1", "unknown noise kind 'foo'; valid kinds: " + ", ".join(NOISE_KINDS)),
        ("awgn:snr=3", "unknown parameter 'snr' for noise kind 'awgn'; valid parameters: snr_db"),
        ("awgn", "needs parameter 'snr_db'"),
        ("awgn:snr_db=abc", "awgn.snr_db must be a number, got 'abc'"),
        ("gaussian:std=-1", "gaussian.std must be in"),
        ("gaussian:std=0.1,per=row", "gaussian.per must be one of tensor, channel"),
        ("quant:bits=1", "quant.bits must be in [2, 32]"),
        ("awgn:snr_db=1,2", "use --sweep"),
        ("stuck:p=2", "stuck.p must be in [0, 1]"),
        ("", "noise spec is empty"),
        ("dac:bits=8+dac:bits=6", "dac given twice"),
    ],
)
def test_bad_specs_raise_one_line_errors(text: str, message: str) -> None:
    with pytest.raises(NoiseInjectionError) as info:
        parse_noise_spec(text)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_sweep_levels() -> None:
    parameter, levels = parse_sweep("awgn:snr_db=0,5,10+adc:bits=8")
    assert parameter == "awgn.snr_db"
    assert [level.value for level in levels] == [0.0, 5.0, 10.0]
    assert levels[1].spec.weight_models == (AwgnNoise(5.0),)
    assert levels[1].spec.adc == AdcConfig(bits=8)
    assert levels[1].spec.text == "awgn:snr_db=5+adc:bits=8"


@pytest.mark.parametrize("text", ["awgn:snr_db=3", "awgn:snr_db=1,2+adc:bits=4,6"])
def test_sweep_needs_exactly_one_list(text: str) -> None:
    with pytest.raises(NoiseInjectionError, match="exactly one parameter"):
        parse_sweep(text)


def test_t_quantile_matches_scipy() -> None:
    for dof in [1, 2, 5, 10, 29, 30, 31, 50, 100, 1000]:
        assert t_quantile_975(dof) == pytest.approx(stats.t.ppf(0.975, dof), rel=2e-3)


def test_summarize_ci_contains_mean_and_is_zero_width_for_constant() -> None:
    mean, std, (lo, hi) = summarize([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6) and std == pytest.approx(0.1)
    assert (hi - lo) / 2 == pytest.approx(stats.t.ppf(0.975, 2) * 0.1 / math.sqrt(3), rel=1e-3)
    assert summarize([0.9, 0.9]) == (0.9, 0.0, (0.9, 0.9))
