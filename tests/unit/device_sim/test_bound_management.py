"""``adc:bm=iterative`` (aihwkit's iterative bound management) against a numpy oracle."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from onnx import helper

from common.errors import NoiseInjectionError
from device_sim import RunnerConfig, Simulator, parse_noise_spec
from device_sim.graph import add_io_quantization
from device_sim.noise import AdcConfig
from device_sim.runner import (
    ADC_NOISE_BANK,
    adc_noise_bank,
    adc_noise_offset,
    adc_noise_window,
)
from tests.unit.device_sim.conftest import make_model

# an ADC of 8 bits over ±0.5: 254 steps, codes in [-127, 127]
ADC_BITS, BOUND = 8, 0.5
STEP = 2 * BOUND / (2**ADC_BITS - 2)
LIMIT = round(BOUND / STEP)
# aihwkit: passes k = 0 … K, K the first k with 2^k > min(1000, 0.25 / (2 · inp_res))
PASSES = {None: 5, 8: 6}  # no DAC: aihwkit's default 7-bit DAC (15.75); 8 bits: 31.75

Noise = Callable[[int, tuple[int, ...]], np.ndarray] | None


def _gemm() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W (32, 3) whose column 0 sums the inputs, a bias, and rows saturating at chosen passes."""
    rng = np.random.default_rng(7)
    w = rng.uniform(-0.02, 0.02, (32, 3))
    w[:, 0] = 1.0
    w[:, 1] = np.where(np.arange(32) % 2 == 0, 0.1, -0.1)
    # x_5 = 1 (s = 1), x_6 = a, the rest ±1e-3 (zero after an 8-bit DAC): column 0 reads 1 + a in
    # units of s · max|W|, against the bound 0.5 · 2^k at pass k (and 32 for a row of ones)
    rows = []
    for a in (-0.75, -0.3, 0.5):  # accepted at pass 0, 1, 2
        for sign in (1.0, -1.0):
            row = rng.uniform(-1e-3, 1e-3, 32)
            row[5], row[6] = 1.0, a
            rows.append(sign * row)
    rows += [np.ones(32), -np.ones(32)]  # saturated at every pass: clipped
    rows += list(rng.uniform(-1, 1, (6, 32)))  # mixed
    x = np.asarray(rows, np.float32)
    return w.astype(np.float32), rng.normal(0, 1, 3).astype(np.float32), x


def _margin(codes: np.ndarray, magnitude: np.ndarray) -> float:
    """Least distance of an ADC input that matters (|code| ≤ LIMIT + 1) to a rounding boundary,
    relative to 1 + the sum of the absolute products (what bounds the float32 error)."""
    near = np.abs(codes) <= LIMIT + 1
    distance = np.abs(np.abs(codes % 1) - 0.5) / (1 + magnitude)
    return float(np.min(distance[near], initial=np.inf))


def _oracle(
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray,
    *,
    dac_bits: int | None,
    passes: int,
    vector_axes: tuple[int, ...],
    product: Callable[[np.ndarray, np.ndarray], np.ndarray],
    noise: Noise = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Per vector: the first pass whose rounded codes stay within ±LIMIT, else the last clipped.

    ``x`` is scaled per sample (rows; everything for Conv). Returns the output, the pass each
    output vector took (``passes`` when it saturated at every pass, clipped) and
    :func:`_margin` over all passes. The DAC is computed in float32 in the graph's order
    (x · (L/(s·2^k)), rounded, times (s·2^k)/L): the largest input of a vector sits exactly on a
    rounding tie at k = 1 (L/2), so any other float order could round it the other way.
    """
    x32 = x.astype(np.float32)
    s32 = np.maximum(np.abs(x32).reshape(x.shape[0], -1).max(axis=1), np.float32(1e-20))
    s32 = s32.reshape((-1,) + (1,) * (x.ndim - 1))
    w64 = w.astype(np.float64)
    w_max = float(np.abs(w).max())
    margin = np.inf
    out: np.ndarray | None = None
    chosen: np.ndarray | None = None
    for k in range(passes):
        sk32 = s32 * np.float32(2.0**k)
        if dac_bits is None:
            xk = x32.astype(np.float64)
        else:
            levels = np.float32(2 ** (dac_bits - 1) - 1)
            xk = (np.round(x32 * (levels / sk32)) * (sk32 / levels)).astype(np.float64)
        raw = product(xk, w64)
        sk = sk32.astype(np.float64).reshape(raw.shape[:1] + (1,) * (raw.ndim - 1))
        unit = sk * w_max * STEP
        codes_raw = raw / unit + (0 if noise is None else noise(k, raw.shape))
        margin = min(margin, _margin(codes_raw, product(np.abs(xk), np.abs(w64)) / unit))
        codes = np.round(codes_raw)
        saturated = np.abs(codes).max(axis=vector_axes, keepdims=True) > LIMIT
        value = np.clip(codes, -LIMIT, LIMIT) * unit
        if out is None or chosen is None:
            out = np.zeros_like(value)
            chosen = np.full(saturated.shape, -1)
        take = (chosen < 0) & (~saturated | (k == passes - 1))
        out = np.where(take, value, out)
        chosen = np.where(take, np.where(saturated, passes, k), chosen)
    assert out is not None and chosen is not None
    return out + b.reshape((1, -1) + (1,) * (out.ndim - 2)), chosen, margin


def _run(sim: Simulator, x: np.ndarray, spec: str, seed: int = 0, draw: int = 0) -> np.ndarray:
    return dict(sim.predictions(x, parse_noise_spec(spec), [draw], seed))[draw]


def _gemm_sim(w: np.ndarray, b: np.ndarray, batch_size: int = 64) -> Simulator:
    model = make_model(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"])], {"w": w, "b": b}, ["N", 32]
    )
    return Simulator(model, config=RunnerConfig(batch_size=batch_size, draws_per_session=1))


@pytest.mark.parametrize("dac_bits", [None, 8])
def test_gemm_matches_per_vector_oracle(dac_bits: int | None) -> None:
    w, b, x = _gemm()
    dac = "" if dac_bits is None else f"dac:bits={dac_bits}+"
    out = _run(_gemm_sim(w, b), x, f"{dac}adc:bits={ADC_BITS},bound={BOUND},bm=iterative")
    expected, chosen, margin = _oracle(
        x, w, b, dac_bits=dac_bits, passes=PASSES[dac_bits], vector_axes=(1,), product=np.matmul
    )
    assert margin > 3e-6  # no value within float32 reach of a rounding boundary
    passes = PASSES[dac_bits]
    # rows accepted at pass 0, re-run once or twice, and saturated at every pass (clipped)
    assert {0, 1, 2, passes} <= set(chosen.ravel().tolist())
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    clip = _run(_gemm_sim(w, b), x, f"{dac}adc:bits={ADC_BITS},bound={BOUND}")
    same = np.all(out == clip, axis=1)
    np.testing.assert_array_equal(same, chosen.ravel() == 0)


def _conv(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Valid 3×3 convolution by im2col: (N, C, H, W) × (O, C, 3, 3) -> (N, O, H−2, W−2)."""
    n, _, h, wd = x.shape
    patches = np.stack(
        [x[:, :, i : i + 3, j : j + 3].reshape(n, -1) for i in range(h - 2) for j in range(wd - 2)],
        axis=-1,
    )  # (N, C·9, positions)
    y = np.asarray(np.einsum("ok,nkp->nop", w.reshape(w.shape[0], -1), patches))
    return y.reshape(n, w.shape[0], h - 2, wd - 2)


def test_conv_selects_per_output_position() -> None:
    rng = np.random.default_rng(3)
    w = rng.uniform(0.2, 1.0, (3, 2, 3, 3)).astype(np.float32)
    w[1] *= -0.3
    b = rng.normal(0, 1, 3).astype(np.float32)
    # a bright corner (saturating), a dim stripe, and small values elsewhere
    x = rng.uniform(-0.05, 0.1, (4, 2, 6, 6))
    x[:, :, :3, :3] += rng.uniform(0.2, 1.0, (4, 1, 1, 1))
    x[:, :, 4:, :] += 0.04
    x = x.astype(np.float32)
    model = make_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"])], {"w": w, "b": b}, ["N", 2, 6, 6]
    )
    sim = Simulator(model, config=RunnerConfig(draws_per_session=1))
    for dac_bits in (None, 8):
        dac = "" if dac_bits is None else f"dac:bits={dac_bits}+"
        out = _run(sim, x, f"{dac}adc:bits={ADC_BITS},bound={BOUND},bm=iterative")
        expected, chosen, margin = _oracle(
            x, w, b, dac_bits=dac_bits, passes=PASSES[dac_bits], vector_axes=(1,), product=_conv
        )
        assert margin > 3e-6
        assert len(set(chosen.ravel().tolist())) >= 3  # positions of one sample differ
        assert any(len(set(c.ravel().tolist())) > 1 for c in chosen)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def _runner_noise(seed: int, draw: int, layer: int, std: float) -> Noise:
    """The runner's ADC noise of pass k (documented streams), in ADC steps."""
    bank = adc_noise_bank(seed, std / STEP, np.dtype(np.float32))

    def noise(k: int, shape: tuple[int, ...]) -> np.ndarray:
        offset = adc_noise_offset(seed, draw, (layer, k) if k else (layer,), ADC_NOISE_BANK)
        size = int(np.prod(shape[1:]))
        # sample i reads bank[offset + i·size …], modulo the bank
        index = (offset + np.arange(shape[0] * size)) % len(bank)
        np.testing.assert_array_equal(
            adc_noise_window(bank, offset, 0, shape[0], shape[1:]).ravel(), bank[index]
        )
        return bank[index].reshape(shape).astype(np.float64)

    return noise


def test_noisy_passes_use_their_streams_and_do_not_depend_on_the_batch_size() -> None:
    w, b, x = _gemm()
    spec = f"adc:bits={ADC_BITS},bound={BOUND},noise=0.06,bm=iterative"
    one = _run(_gemm_sim(w, b, batch_size=1), x, spec, seed=5, draw=3)
    seven = _run(_gemm_sim(w, b, batch_size=7), x, spec, seed=5, draw=3)
    np.testing.assert_allclose(one, seven, rtol=1e-6, atol=1e-6)
    expected, chosen, margin = _oracle(
        x,
        w,
        b,
        dac_bits=None,
        passes=PASSES[None],
        vector_axes=(1,),
        product=np.matmul,
        noise=_runner_noise(5, 3, 0, 0.06),
    )
    assert margin > 3e-6
    assert {0, 1, PASSES[None]} <= set(chosen.ravel().tolist())
    np.testing.assert_allclose(seven, expected, rtol=1e-5, atol=1e-5)
    # pass 0 is bm=clip's computation with the same noise: they differ exactly where it saturated
    clip = _run(_gemm_sim(w, b, batch_size=7), x, spec.replace("iterative", "clip"), 5, 3)
    differs = np.any(seven != clip, axis=1)
    np.testing.assert_array_equal(differs, chosen.ravel() != 0)


def test_passes_share_the_weight_initializer_and_clip_is_the_default() -> None:
    w, b, _ = _gemm()
    sim = _gemm_sim(w, b)
    spec = parse_noise_spec("dac:bits=8+adc:bits=8,noise=0.06,bm=iterative")
    io = add_io_quantization(sim.prepared, spec.dac, spec.adc)
    model, noise = io.model, io.noise_inputs
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    assert len(gemms) == PASSES[8]
    assert {n.input[1] for n in gemms} == {sim.prepared.analog[0].graph_name}
    assert [n.stream for n in noise] == [(0,)] + [(0, k) for k in range(1, PASSES[8])]
    default = parse_noise_spec("dac:bits=8+adc:bits=8,noise=0.06")
    clip = parse_noise_spec("dac:bits=8+adc:bits=8,noise=0.06,bm=clip")
    assert default.adc == clip.adc == AdcConfig(bits=8, noise=0.06)
    a = add_io_quantization(sim.prepared, default.dac, default.adc).model
    c = add_io_quantization(sim.prepared, clip.dac, clip.adc).model
    assert a.SerializeToString() == c.SerializeToString()


@pytest.mark.parametrize(
    ("dac_bits", "passes"), [(None, 5), (7, 5), (8, 6), (4, 2), (2, 1), (12, 10), (14, 11)]
)
def test_pass_count_follows_aihwkit_limits(dac_bits: int | None, passes: int) -> None:
    assert AdcConfig(bits=8, bm="iterative").bm_passes(dac_bits) == passes
    assert AdcConfig(bits=8).bm_passes(dac_bits) == 1


def test_bm_parse_errors_name_the_key_and_choices() -> None:
    assert parse_noise_spec("adc:bits=8,bm=iterative").adc == AdcConfig(bits=8, bm="iterative")
    with pytest.raises(NoiseInjectionError) as info:
        parse_noise_spec("adc:bits=8,bm=iter")
    message = str(info.value)
    assert "adc.bm must be one of clip, iterative; got 'iter'" in message
    assert "\n" not in message
    with pytest.raises(NoiseInjectionError, match=r"adc\.bm has 2 values"):
        parse_noise_spec("adc:bits=8,bm=clip,iterative")
