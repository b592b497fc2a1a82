"""Monte-Carlo runner: closed-form statistics, reproducibility, DAC/ADC oracle, data errors."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper
from scipy import stats

from common.errors import NoiseInjectionError
from device_sim import RunnerConfig, Simulator, parse_noise_spec, simulate, simulate_per_layer
from device_sim.graph import adc_weight_gain, add_io_quantization
from device_sim.noise import AdcConfig, DacConfig, NoiseSpec
from tests.unit.device_sim.conftest import make_model, rand

W = rand(16, 5)
B = rand(5, seed=1)


def _linear() -> Simulator:
    model = make_model(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"])], {"w": W, "b": B}, ["N", 16]
    )
    return Simulator(model, config=RunnerConfig(draws_per_session=50, batch_size=64))


def _draws(sim: Simulator, x: np.ndarray, spec: str, draws: int, seed: int = 0) -> np.ndarray:
    outputs = dict(sim.predictions(x, parse_noise_spec(spec), range(draws), seed))
    return np.stack([outputs[d] for d in range(draws)])


def test_awgn_output_variance_matches_closed_form() -> None:
    # y_j = Σ_i x_i W_ij + b_j with W_ij + σ ξ_ij: Var(y_j) = σ² ‖x‖², σ = std(W)/sqrt(10^(snr/10))
    sim = _linear()
    x = rand(3, 16, seed=2)
    draws = 400
    out = _draws(sim, x, "awgn:snr_db=6", draws)
    sigma = W.std() / math.sqrt(10**0.6)
    expected = sigma**2 * (x.astype(np.float64) ** 2).sum(axis=1)
    var = out.var(axis=0, ddof=1)  # (3, 5)
    # the sample variance of 400 Gaussian draws has relative sd sqrt(2/399) ≈ 7%
    ratio = var / expected[:, None]
    assert np.all(np.abs(ratio - 1) < 0.3)
    assert abs(ratio.mean() - 1) < 0.06
    mean = out.mean(axis=0)
    clean = x @ W + B
    assert np.all(np.abs(mean - clean) < 4 * np.sqrt(expected[:, None] / draws))


def test_clean_spec_gives_clean_outputs_and_zero_spread() -> None:
    sim = _linear()
    x = rand(10, 16, seed=3)
    np.testing.assert_allclose(sim.clean_outputs(x), x @ W + B, rtol=1e-5, atol=1e-5)
    out = _draws(sim, x, "gaussian:std=0", 3)
    np.testing.assert_array_equal(out[0], sim.clean_outputs(x))
    np.testing.assert_array_equal(out[1], out[2])


def test_draw_is_independent_of_batch_size_threads_and_grouping() -> None:
    model = make_model(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"])], {"w": W, "b": B}, ["N", 16]
    )
    x = rand(23, 16, seed=4)
    spec = parse_noise_spec("pcm:t=100+adc:bits=10,noise=0.05")
    results = []
    for batch, threads, group in [(64, 1, 1), (5, 2, 3), (7, 0, 8)]:
        sim = Simulator(
            model, config=RunnerConfig(batch_size=batch, threads=threads, draws_per_session=group)
        )
        outputs = dict(sim.predictions(x, spec, [0, 1, 2, 7], seed=11))
        results.append(outputs)
    for other in results[1:]:
        for draw in (0, 1, 2, 7):
            np.testing.assert_allclose(other[draw], results[0][draw], rtol=1e-6, atol=1e-6)
    assert not np.allclose(results[0][0], results[0][1])


def test_weights_depend_only_on_seed_draw_and_tensor() -> None:
    sim = _linear()
    spec = parse_noise_spec("awgn:snr_db=10")
    a = sim.draw_weights(spec, 3, 5)["w"]
    np.testing.assert_array_equal(a, sim.draw_weights(spec, 3, 5)["w"])
    assert not np.array_equal(a, sim.draw_weights(spec, 3, 6)["w"])
    assert not np.array_equal(a, sim.draw_weights(spec, 4, 5)["w"])


def _io_oracle(x: np.ndarray, dac_bits: int, adc_bits: int, bound: float) -> np.ndarray:
    x = x.astype(np.float64)
    s = np.abs(x).max(axis=1, keepdims=True)
    levels = 2 ** (dac_bits - 1) - 1
    xq = np.round(x / s * levels) / levels * s
    w_max = np.abs(W).max()
    yn = np.clip((xq @ W) / (s * w_max), -bound, bound)
    step = 2 * bound / (2**adc_bits - 2)
    return np.round(yn / step) * step * s * w_max + B


@pytest.mark.parametrize(("dac", "adc", "bound"), [(4, 6, 12.0), (7, 9, 1.0)])
def test_dac_adc_match_numpy_oracle(dac: int, adc: int, bound: float) -> None:
    sim = _linear()
    x = rand(200, 16, seed=5)
    out = _draws(sim, x, f"dac:bits={dac}+adc:bits={adc},bound={bound:g}", 1)[0]
    expected = _io_oracle(x, dac, adc, bound)
    step = 2 * bound / (2**adc - 2) * np.abs(x).max(axis=1, keepdims=True) * np.abs(W).max()
    close = np.abs(out - expected) <= 1e-4 * (1 + np.abs(expected))
    # float32 rounding may move a value that sits on a rounding boundary by one ADC step
    assert close.mean() > 0.99
    assert np.all(np.abs(out - expected) <= step * 1.001 + 1e-4)


def test_dac_adc_after_a_relu_match_numpy_oracle() -> None:
    # after a Relu the input range is max x (one reduction); the oracle takes max|x| of relu(x)
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Gemm", ["r", "w", "b"], ["y"]),
        ],
        {"w": W, "b": B},
        ["N", 16],
    )
    sim = Simulator(model)
    x = rand(200, 16, seed=7)
    x[0] = -np.abs(x[0])  # a sample that is all zero after the Relu
    out = _draws(sim, x, "dac:bits=6+adc:bits=8,bound=4", 1)[0]
    relu = np.maximum(x[1:], 0)
    expected = _io_oracle(relu, 6, 8, 4.0)
    step = 8 / 254 * np.abs(relu).max(axis=1, keepdims=True) * np.abs(W).max()
    assert np.mean(np.abs(out[1:] - expected) <= 1e-4 * (1 + np.abs(expected))) > 0.99
    assert np.all(np.abs(out[1:] - expected) <= step * 1.001 + 1e-4)
    np.testing.assert_allclose(out[0], B, rtol=1e-6, atol=1e-6)


def test_dac_adc_weights_are_stored_with_the_adc_gain() -> None:
    sim = _linear()
    spec = parse_noise_spec("dac:bits=6+adc:bits=8,bound=4")
    io = add_io_quantization(sim.prepared, spec.dac, spec.adc)
    gain = 254 / (2 * 4 * np.abs(W).max()) / 31
    assert io.weight_gain == {"w": pytest.approx(gain)}
    stored = next(t for t in io.model.graph.initializer if t.name == "w")
    np.testing.assert_allclose(onnx.numpy_helper.to_array(stored), W * gain, rtol=1e-6)
    for text in ("dac:bits=6+adc:bits=8,bound=4,bm=iterative", "adc:bits=8", "dac:bits=6"):
        other = parse_noise_spec(text)
        assert add_io_quantization(sim.prepared, other.dac, other.adc).weight_gain == {}


def _gemm_plus_if_reading(name: str) -> onnx.ModelProto:
    """y = Gemm(x, w, b) + ΣW', W' read by an If branch through outer scope (``name``)."""

    def branch(tag: str) -> onnx.GraphProto:
        out = helper.make_tensor_value_info(f"{tag}_w", onnx.TensorProto.FLOAT, None)
        return helper.make_graph(
            [helper.make_node("Identity", [name], [f"{tag}_w"])], tag, [], [out]
        )

    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["g"]),
        helper.make_node(
            "If", ["cond"], ["picked"], then_branch=branch("then"), else_branch=branch("other")
        ),
        helper.make_node("ReduceSum", ["picked"], ["total"], keepdims=0),
        helper.make_node("Add", ["g", "total"], ["y"]),
    ]
    inits = {"w": W, "b": B, "w_copy": W.copy(), "cond": np.array(True)}
    return make_model(nodes, inits, ["N", 16])


def test_a_weight_also_read_in_a_subgraph_keeps_its_value_there() -> None:
    # the analog layer gets its own copy of the weight (noise and the ADC gain go there), so the
    # If branch reading the same initializer sees the clean weight, as with a separate copy
    x = rand(50, 16, seed=8)
    spec = "dac:bits=8+adc:bits=8,bound=4"
    shared = _draws(Simulator(_gemm_plus_if_reading("w")), x, spec, 1)[0]
    separate = _draws(Simulator(_gemm_plus_if_reading("w_copy")), x, spec, 1)[0]
    np.testing.assert_allclose(shared, separate, rtol=1e-6, atol=1e-5)
    assert Simulator(_gemm_plus_if_reading("w")).prepared.analog[0].graph_name != "w"


def test_float16_layers_keep_the_unscaled_path() -> None:
    w16 = W.astype(np.float16)
    assert adc_weight_gain(w16, DacConfig(bits=2), AdcConfig(bits=16, bound=0.5)) == 1.0
    assert adc_weight_gain(W, None, AdcConfig(bits=8)) == 1.0  # nothing to save without a DAC
    assert adc_weight_gain(W, DacConfig(bits=8), AdcConfig(bits=8)) != 1.0


def test_adc_output_noise_has_the_given_std_in_normalised_units() -> None:
    sim = _linear()
    x = rand(400, 16, seed=6)
    quiet = _draws(sim, x, "adc:bits=24,bound=1000", 1)[0]
    noisy = _draws(sim, x, "adc:bits=24,bound=1000,noise=0.1", 1)[0]
    unit = np.abs(x).max(axis=1, keepdims=True) * np.abs(W).max()
    normalised = (noisy - quiet) / unit
    assert normalised.std() == pytest.approx(0.1, rel=0.05)


def test_data_shape_mismatch_names_both_shapes() -> None:
    sim = _linear()
    with pytest.raises(NoiseInjectionError) as info:
        sim.check_data(np.zeros((4, 15), np.float32))
    assert "(4, 15)" in str(info.value) and "(N, 16)" in str(info.value)
    with pytest.raises(NoiseInjectionError, match=r"labels y have shape \(3,\), expected \(4,\)"):
        sim.check_data(np.zeros((4, 16), np.float32), np.zeros(3, np.int64))
    with pytest.raises(NoiseInjectionError, match="labels y must be integers"):
        sim.check_data(np.zeros((4, 16), np.float32), np.zeros(4, np.float32))


def _save_linear(tmp_path: Path) -> Path:
    model = make_model(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"])], {"w": W, "b": B}, ["N", 16]
    )
    path = tmp_path / "linear.onnx"
    onnx.save(model, str(path))
    return path


def test_simulate_report_fields(tmp_path: Path) -> None:
    path = _save_linear(tmp_path)
    x = rand(300, 16, seed=7)
    y = (x @ W + B).argmax(axis=1)
    report = simulate(path, x, y, "gaussian:std=0.3", 6, 1)
    assert report.clean_accuracy == 1.0
    assert len(report.per_draw) == 6 and report.draws == 6
    assert report.normalized_accuracy == pytest.approx(report.accuracy_mean)
    assert report.analog_tensors == ("w",)
    doc = report.to_json_dict()
    for key in (
        "model", "noise", "draws", "seed", "clean_accuracy", "accuracy_mean", "accuracy_std",
        "accuracy_ci95", "normalized_accuracy", "per_draw", "analog_tensors", "seconds",
    ):  # fmt: skip
        assert key in doc
    assert doc["accuracy_ci95"] == list(report.accuracy_ci95)
    again = simulate(path, x, y, "gaussian:std=0.3", 6, 1)
    assert again.per_draw == report.per_draw


def test_mean_and_ci_match_an_independent_numpy_monte_carlo(tmp_path: Path) -> None:
    # The report's mean and 95% interval against values computed here without the simulator:
    # the t-interval from the draws by scipy, and the expected accuracy under W + N(0, σ²),
    # σ = std(W) / sqrt(10^(snr/10)), from 4000 numpy draws.
    path = _save_linear(tmp_path)
    x = rand(300, 16, seed=7)
    y = (x @ W + B).argmax(axis=1)
    snr_db, draws = 3.0, 40
    report = simulate(path, x, y, f"awgn:snr_db={snr_db:g}", draws, 1)
    acc = np.asarray(report.per_draw)
    assert report.accuracy_mean == pytest.approx(acc.mean(), abs=1e-12)
    assert report.accuracy_std == pytest.approx(acc.std(ddof=1), rel=1e-9)
    sem = acc.std(ddof=1) / math.sqrt(draws)
    lo, hi = report.accuracy_ci95
    half = stats.t.ppf(0.975, draws - 1) * sem
    assert lo == pytest.approx(acc.mean() - half, abs=1e-3 * half)
    assert hi == pytest.approx(acc.mean() + half, abs=1e-3 * half)

    rng = np.random.default_rng(2024)
    sigma = float(np.std(W)) / math.sqrt(10 ** (snr_db / 10))
    noisy = W.astype(np.float64) + sigma * rng.standard_normal((4000, *W.shape))
    ref_acc = (np.einsum("nd,kdc->knc", x.astype(np.float64), noisy) + B).argmax(axis=2) == y
    ref = ref_acc.mean(axis=1)
    assert 0.5 < ref.mean() < 0.95  # the noise matters: a wrong σ moves the mean
    # the reference lies in the draws' 99.9% t-interval (widened by the reference's own error)
    tolerance = stats.t.ppf(0.9995, draws - 1) * sem + 3 * ref.std(ddof=1) / math.sqrt(ref.size)
    assert abs(report.accuracy_mean - ref.mean()) <= tolerance, (report.accuracy_mean, ref.mean())


def test_clean_run_skips_the_noise_code_and_zero_noise_through_it_agrees(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _save_linear(tmp_path)
    x = rand(300, 16, seed=7)
    y = (x @ W + B).argmax(axis=1)
    y[::4] = (y[::4] + 1) % 5  # a quarter of the labels wrong: clean accuracy 0.75, not 1
    expected = float(np.mean((x.astype(np.float64) @ W + B).argmax(axis=1) == y))
    assert expected == pytest.approx(0.75, abs=0.01)
    calls: list[str] = []
    predictions = Simulator.predictions

    def spy(
        self: Simulator, x: np.ndarray, spec: NoiseSpec, *args: Any, **kw: Any
    ) -> Iterator[tuple[int, np.ndarray]]:
        calls.append(spec.text)
        return predictions(self, x, spec, *args, **kw)

    monkeypatch.setattr(Simulator, "predictions", spy)
    clean = simulate(path, x, y, NoiseSpec(text="none"), 3, 1)
    assert calls == []  # "none" never runs a noisy graph ...
    assert clean.clean_accuracy == expected
    assert clean.per_draw == (expected,) * 3 and clean.accuracy_std == 0.0
    # ... and zero noise through the noisy graphs (weights redrawn and written, replicated
    # sessions) gives the clean accuracy in every draw
    zero = simulate(path, x, y, "gaussian:std=0", 3, 1)
    assert calls == ["gaussian:std=0"]
    assert zero.per_draw == (expected,) * 3
    noisy = simulate(path, x, y, "awgn:snr_db=0", 3, 1)
    assert calls[-1] == "awgn:snr_db=0"
    assert all(a != expected for a in noisy.per_draw) and noisy.accuracy_std > 0


def test_quantisation_only_is_deterministic_and_matches_numpy(tmp_path: Path) -> None:
    model = make_model(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"])], {"w": W, "b": B}, ["N", 16]
    )
    path = tmp_path / "linear.onnx"
    onnx.save(model, str(path))
    x = rand(500, 16, seed=8)
    y = (x @ W + B).argmax(axis=1)
    step = np.abs(W).max() / 1  # 2 bits: levels −1, 0, +1 times max|W|
    wq = np.round(W / step) * step
    expected = float(np.mean((x @ wq + B).argmax(axis=1) == y))
    report = simulate(path, x, y, "quant:bits=2", 4, 0)
    assert report.per_draw == (expected,) * 4


def test_per_layer_noise_touches_only_one_tensor(tmp_path: Path) -> None:
    w2 = rand(5, 5, seed=9)
    model = make_model(
        [
            helper.make_node("Gemm", ["x", "w", "b"], ["h"]),
            helper.make_node("MatMul", ["h", "w2"], ["y"]),
        ],
        {"w": W, "b": B, "w2": w2},
        ["N", 16],
    )
    sim = Simulator(model)
    spec = parse_noise_spec("awgn:snr_db=0")
    only_second = sim.draw_weights(spec, 0, 0, tensors=[1])
    np.testing.assert_array_equal(only_second["w"], W)
    both = sim.draw_weights(spec, 0, 0)
    np.testing.assert_array_equal(only_second["w2"], both["w2"])  # same stream per tensor
    assert not np.array_equal(only_second["w2"], w2)
    path = tmp_path / "two.onnx"
    onnx.save(model, str(path))
    x = rand(200, 16, seed=10)
    y = ((x @ W + B) @ w2).argmax(axis=1)
    report = simulate_per_layer(path, x, y, "awgn:snr_db=0", 3, 0)
    assert [layer.name for layer in report.layers] == ["w", "w2"]
    assert all(0 < layer.accuracy_drop <= 1 for layer in report.layers)
    assert report.layers[0].report.analog_tensors == ("w",)


@pytest.mark.parametrize("opset", [13, 18])
def test_dac_adc_on_conv_scale_per_sample(opset: int) -> None:
    w = rand(4, 3, 1, 1, seed=11)
    model = make_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"])],
        {"w": w, "b": B[:4]},
        ["N", 3, 2, 2],
        opset=opset,
    )
    sim = Simulator(model)
    x = rand(50, 3, 2, 2, seed=12)
    out = _draws(sim, x, "dac:bits=5+adc:bits=7,bound=2", 1)[0]
    s = np.abs(x.astype(np.float64)).max(axis=(1, 2, 3), keepdims=True)
    xq = np.round(x / s * 15) / 15 * s
    y = np.einsum("nchw,oc->nohw", xq, w[:, :, 0, 0])
    unit = s * np.abs(w).max() * (4 / 126)
    expected = np.round(np.clip(y / unit, -63, 63)) * unit + B[:4].reshape(1, 4, 1, 1)
    close = np.abs(out - expected) <= 1e-4 * (1 + np.abs(expected))
    assert close.mean() > 0.99
    assert np.all(np.abs(out - expected) <= unit * 1.001 + 1e-4)


def test_drift_compensation_scales_the_output_after_the_adc() -> None:
    # aihwkit multiplies the ADC output by the compensation factor (post_forward): the ADC sees the
    # drifted, uncompensated outputs and its grid is scaled by the factor afterwards
    sim = _linear()
    x = rand(200, 16, seed=6)
    spec = parse_noise_spec("pcm:t=1e7+adc:bits=5,bound=12")
    out = _draws(sim, x, spec.text, 1)[0]
    drifted, factor = sim.draw_scaled_weights(spec, 0, 0)["w"]
    assert factor > 1.5  # a year and more of drift: a large correction
    np.testing.assert_allclose(sim.draw_weights(spec, 0, 0)["w"], drifted * factor, rtol=1e-5)
    xd = x.astype(np.float64)
    s = np.abs(xd).max(axis=1, keepdims=True)
    w_max = np.abs(W).max()
    step = 2 * 12.0 / (2**5 - 2)
    yn = np.clip((xd @ drifted.astype(np.float64)) / (s * w_max), -12.0, 12.0)
    expected = np.round(yn / step) * step * s * w_max * factor + B
    close = np.abs(out - expected) <= 1e-4 * (1 + np.abs(expected))
    assert close.mean() > 0.99
    assert np.all(np.abs(out - expected) <= step * s * w_max * factor * 1.001 + 1e-4)
    # compensating the weights before the ADC (the former order) gives other outputs
    before = np.clip((xd @ (drifted.astype(np.float64) * factor)) / (s * w_max), -12.0, 12.0)
    former = np.round(before / step) * step * s * w_max + B
    assert np.mean(np.abs(out - former) > 1e-3 * (1 + np.abs(former))) > 0.3
