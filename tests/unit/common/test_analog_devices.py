"""Resistive-device response functions and the device-spec language (common.analog_devices)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.analog_devices import (
    DEVICE_KINDS,
    AnalogArray,
    DeviceConfig,
    UpdateMode,
    _random_bytes,
    parse_device_spec,
    response,
    symmetry_point,
)
from common.errors import ConfigError

GRID = torch.linspace(-0.9, 0.9, 13, dtype=torch.float64)


def _array(spec: str, w: torch.Tensor = GRID, seed: int = 0) -> AnalogArray:
    return AnalogArray(parse_device_spec(spec), w.clone(), np.random.default_rng(seed))


# the formulas, written out independently of common.analog_devices.response
def _expected_steps(kind: str, w: torch.Tensor, cfg: DeviceConfig) -> tuple[torch.Tensor, ...]:
    lo, hi = cfg.w_min, cfg.w_max
    if kind == "softbounds":
        up, down = 1 - w / hi, 1 + w / abs(lo)
    elif kind == "linearstep":
        up, down = 1 - cfg.slope * w / hi, 1 + cfg.slope * w / abs(lo)
    elif kind == "expstep":
        z = (2 * w - hi - lo) / (hi - lo)
        up = (1 - cfg.a * torch.exp(cfg.gamma * z)).clamp(min=0)
        down = (1 - cfg.a * torch.exp(-cfg.gamma * z)).clamp(min=0)
    else:
        up = (2 * (hi - w) / (hi - lo)) ** cfg.gamma
        down = (2 * (w - lo) / (hi - lo)) ** cfg.gamma
    return cfg.dw_min * up * (1 + cfg.asym), cfg.dw_min * down * (1 - cfg.asym)


def test_every_kind_alone_is_a_valid_spec_with_documented_defaults() -> None:
    assert set(DEVICE_KINDS) == {"softbounds", "linearstep", "expstep", "powstep"}
    soft = parse_device_spec("softbounds")
    assert soft.dw_min == pytest.approx(2 / 1200)  # 1200 states over [-1, 1]
    assert (soft.w_min, soft.w_max, soft.mode, soft.bl) == (-1.0, 1.0, UpdateMode.PULSED, 31)
    lin = parse_device_spec("linearstep")
    assert (lin.slope, lin.asym) == (0.5, 0.05)
    assert parse_device_spec("expstep").gamma == 3.0
    assert parse_device_spec("powstep").gamma == 2.0
    spec = parse_device_spec("softbounds:dw_min=0.01,w_max=0.5,c2c=0.1,mode=expected")
    assert spec.w_min == -0.5 and spec.states == pytest.approx(100)
    assert spec.mode is UpdateMode.EXPECTED and spec.c2c == 0.1


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("memristor", "unknown device kind 'memristor'"),
        ("softbounds:slope=1", "unknown key 'slope'"),
        ("softbounds:states=many", "softbounds.states must be a number"),
        ("softbounds:states=1", "softbounds.states must be >= 2"),
        ("linearstep:asym=1.5", "linearstep.asym must be in (-1, 1)"),
        ("softbounds:states=100,dw_min=0.1", "not both"),
        ("softbounds:mode=analog", "softbounds.mode must be pulsed or expected"),
        ("softbounds:bl=0", "softbounds.bl must be in [1, 1000]"),
        ("softbounds:c2c", "expected key=value"),
        ("softbounds:c2c=0.1,c2c=0.2", "given twice"),
        ("powstep:w_min=0.5", "powstep.w_min must be < 0"),
    ],
)
def test_bad_specs_raise_one_line_config_errors_naming_the_key(spec: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_device_spec(spec)
    assert needle in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("kind", ["softbounds", "linearstep", "expstep", "powstep"])
@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_one_pulse_moves_the_weight_by_the_response_formula(kind: str, direction: float) -> None:
    arr = _array(kind)
    cfg = arr.config
    start = arr.w.clone()
    arr.update(torch.full_like(start, direction * cfg.dw_min))  # exactly one pulse each
    up, down = _expected_steps(kind, start, cfg)
    expected = start + (up if direction > 0 else -down)
    torch.testing.assert_close(arr.w, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("kind", ["softbounds", "linearstep", "expstep", "powstep"])
def test_expected_mode_applies_delta_times_the_response(kind: str) -> None:
    arr = _array(f"{kind}:mode=expected")
    start = arr.w.clone()
    delta = torch.where(torch.arange(len(start)) % 2 == 0, 0.01, -0.004).to(start)
    arr.update(delta)
    up, down = _expected_steps(kind, start, arr.config)
    q = torch.where(delta > 0, up, down) / arr.config.dw_min
    torch.testing.assert_close(arr.w, start + delta * q, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "spec",
    ["softbounds", "linearstep:asym=0.2", "softbounds:bound_d2d=0.2,step_d2d=0.3", "expstep"],
)
def test_n_pulses_at_once_equal_n_single_pulses(spec: str) -> None:
    """The closed form (affine kinds) and the pulse loop agree with pulse-by-pulse updates."""
    batch, single = _array(spec, seed=3), _array(spec, seed=3)
    dw = batch.config.dw_min
    start = batch.w.clone()  # within each device's bounds
    batch.update(torch.full_like(GRID, 7 * dw))
    for _ in range(7):
        single.update(torch.full_like(GRID, dw))
    torch.testing.assert_close(batch.w, single.w, rtol=0, atol=1e-9)
    assert bool((batch.w >= start).all()) and int((batch.w > start).sum()) >= len(GRID) - 1


@pytest.mark.parametrize(
    "spec",
    [
        "expstep:asym=0.1",
        "powstep:asym=-0.2",
        "expstep:bound_d2d=0.2,step_d2d=0.3,bl=9",
        "powstep:gamma=1.5,bound_d2d=0.1",
    ],
)
def test_pulse_loop_matches_pulses_fired_one_at_a_time(spec: str) -> None:
    """The folded, compacting pulse loop = each pulse from ``response`` on each device.

    Mixed counts (0 to bl, both signs) on 6000 devices, so the loop masks and compacts.
    """
    gen = torch.Generator().manual_seed(4)
    start = torch.rand(6000, generator=gen) * 1.6 - 0.8
    arr = AnalogArray(parse_device_spec(spec), start, np.random.default_rng(1))
    cfg = arr.config
    counts = (torch.rand(6000, generator=gen) ** 3 * (cfg.bl + 1)).floor() - 0.0
    signed = counts * torch.where(torch.rand(6000, generator=gen) < 0.5, -1.0, 1.0)
    w, lo, hi = arr.w.clone(), arr.lo.expand_as(arr.w), arr.hi.expand_as(arr.w)
    d_up = (arr.dw * (1 + cfg.asym)).expand_as(w)
    d_down = (arr.dw * (1 - cfg.asym)).expand_as(w)
    for k in range(cfg.bl):
        up, down = response(cfg, w, lo, hi)
        step = torch.where(signed > 0, up * d_up, -down * d_down)
        w = torch.where(signed.abs() > k, (w + step).clamp(lo, hi), w)
    arr._pulses_loop(signed.clone())
    torch.testing.assert_close(arr.w, w, rtol=0, atol=1e-5)
    assert int((arr.w != start).sum()) > 2000


@pytest.mark.parametrize("count", [0, 1, 6, 8, 1280, 1281, 200704])
def test_random_bytes_are_generator_bytes(count: int) -> None:
    """The fast path gives ``Generator.bytes``'s bytes and leaves the generator as it does."""
    fast, slow = np.random.default_rng(9), np.random.default_rng(9)
    for k in range(3):
        if k == 1:  # a float32 normal leaves half a word buffered: the slow path
            fast.standard_normal(3, dtype=np.float32)
            slow.standard_normal(3, dtype=np.float32)
        assert _random_bytes(fast, count).numpy().tobytes() == slow.bytes(count)
    assert fast.standard_normal(4, dtype=np.float32).tolist() == (
        slow.standard_normal(4, dtype=np.float32).tolist()
    )
    assert fast.integers(2**62) == slow.integers(2**62)


def test_device_to_device_variation_gives_each_device_its_own_step_and_bounds() -> None:
    arr = _array("softbounds:bound_d2d=0.2,step_d2d=0.3", torch.zeros(500, dtype=torch.float64))
    assert 0.15 < float(arr.hi.std()) < 0.25 and 0.15 < float(arr.lo.std()) < 0.25
    assert 0.2 < float(arr.dw.std() / arr.dw.mean()) < 0.4
    arr.update(torch.full_like(arr.w, arr.config.dw_min))
    torch.testing.assert_close(arr.w, arr.dw * (1 - 0 / arr.hi), rtol=0, atol=1e-12)


def test_symmetry_points() -> None:
    assert float(symmetry_point(parse_device_spec("softbounds"))) == pytest.approx(0, abs=1e-12)
    # linear step: (1+a)(1 − s·w) = (1−a)(1 + s·w)  ⇒  w = a/s = 0.05/0.5
    assert float(symmetry_point(parse_device_spec("linearstep"))) == pytest.approx(0.1)
    for spec in ("expstep:asym=0.1", "powstep:asym=-0.1"):
        cfg = parse_device_spec(spec)
        point = symmetry_point(cfg)
        up, down = _expected_steps(cfg.kind, point, cfg)
        assert float(up) == pytest.approx(float(down), rel=1e-9)
        assert abs(float(point)) > 0.01  # asymmetry moves it off zero


@pytest.mark.parametrize("spec", ["linearstep:states=100", "expstep:asym=0.1,states=100"])
def test_alternating_pulses_drift_to_the_symmetry_point(spec: str) -> None:
    arr = _array(spec, torch.full((4,), -0.6, dtype=torch.float64))
    dw = arr.config.dw_min
    for _ in range(800):
        arr.update(torch.full_like(arr.w, dw))
        arr.update(torch.full_like(arr.w, -dw))
    assert float(arr.symmetry_point()[0]) > 0.05  # far from the start
    torch.testing.assert_close(arr.w, arr.symmetry_point(), rtol=0, atol=2 * dw)


def test_pulsed_updates_are_whole_pulses_of_dw_min_and_unbiased_on_average() -> None:
    spec = "linearstep:slope=0,asym=0,states=400"  # constant step: quantisation is visible
    arr = _array(spec, torch.zeros(20000, dtype=torch.float64), seed=1)
    dw = arr.config.dw_min
    deltas = torch.linspace(-3.3, 3.3, 20000, dtype=torch.float64) * dw
    arr.update(deltas)
    pulses = arr.w / dw
    torch.testing.assert_close(pulses, pulses.round(), rtol=0, atol=1e-9)
    assert bool(((pulses - deltas / dw).abs() < 1).all())  # floor or ceil of Δ/dw_min
    assert float((arr.w - deltas).mean()) == pytest.approx(0, abs=0.01 * dw)  # stochastic rounding
    small = _array(spec, torch.zeros(20000, dtype=torch.float64), seed=2)
    small.update(torch.full((20000,), 0.3 * dw, dtype=torch.float64))
    assert float(small.w.mean()) == pytest.approx(0.3 * dw, rel=0.05)


def test_bit_length_caps_the_pulses_of_one_update() -> None:
    arr = _array("linearstep:slope=0,asym=0,bl=31", torch.zeros(4, dtype=torch.float64))
    arr.update(torch.full((4,), 100 * arr.config.dw_min, dtype=torch.float64))
    torch.testing.assert_close(arr.w, torch.full((4,), 31 * arr.config.dw_min).double())


def test_weights_stay_within_the_bounds() -> None:
    for spec in ("softbounds", "powstep", "linearstep:slope=0", "expstep:mode=expected"):
        arr = _array(spec, torch.full((8,), 0.99, dtype=torch.float64))
        for _ in range(50):
            arr.update(torch.full((8,), 0.5, dtype=torch.float64))
        assert float(arr.w.max()) <= 1.0 + 1e-12, spec


def test_cycle_to_cycle_noise_spreads_identical_updates() -> None:
    quiet = _array("softbounds", torch.zeros(2000, dtype=torch.float64))
    noisy = _array("softbounds:c2c=0.3", torch.zeros(2000, dtype=torch.float64))
    for arr in (quiet, noisy):
        arr.update(torch.full((2000,), 4 * arr.config.dw_min, dtype=torch.float64))
    assert float(quiet.w.std()) < 1e-12
    spread = float(noisy.w.std()) / float(quiet.w.mean())
    assert spread == pytest.approx(0.3 / math.sqrt(4), rel=0.15)  # 4 pulses of 30 %
