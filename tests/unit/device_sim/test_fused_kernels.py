"""The fused DAC/ADC kernels (device_sim/kernels.py): built here, equal to the onnxruntime nodes.

Every comparison is exact: the kernels do the same float32 operations in the same order as the
node chains they replace, so a fused run and an unfused run give the same bits.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from common.errors import NoiseInjectionError
from device_sim import RunnerConfig, Simulator, parse_noise_spec
from device_sim.graph import add_io_quantization
from device_sim.kernels import DOMAIN, io_kernels_library
from tests.unit.device_sim.conftest import make_model, rand

SPECS = [
    "pcm:t=3600+dac:bits=8+adc:bits=8,noise=0.06",  # codes in, bias and noise in the ADC node
    "dac:bits=5+adc:bits=6,bound=2",  # no output noise
    "adc:bits=7,bound=3,noise=0.1",  # no DAC: the ADC node normalises by 1/(s·max|W|) itself
    "dac:bits=4",  # DAC only: the DAC node returns x quantised, not codes
]


@pytest.fixture
def library() -> Path:
    path = io_kernels_library()
    assert path is not None, "the kernels must build on a machine with a C compiler"
    return path


def _predictions(
    model: onnx.ModelProto,
    x: np.ndarray,
    spec: str,
    *,
    fused: bool,
    exclude: str | None = None,
    **kw,
):
    sim = Simulator(model, analog_exclude=exclude, config=RunnerConfig(fused_io=fused, **kw))
    return np.stack([out for _, out in sim.predictions(x, parse_noise_spec(spec), range(3), 7)])


def _fused_ops(model: onnx.ModelProto, spec: str) -> list[str]:
    parsed = parse_noise_spec(spec)
    io = add_io_quantization(Simulator(model).prepared, parsed.dac, parsed.adc, fused=True)
    return [n.op_type for n in io.model.graph.node if n.domain == DOMAIN]


def _conv_block() -> onnx.ModelProto:
    """Conv → Relu → Conv (+ the block input) → Relu → Gemm: biases, a Relu to fuse, a residual."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "x"], ["s"]),
        helper.make_node("Relu", ["s"], ["r2"]),
        helper.make_node("Flatten", ["r2"], ["f"]),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], transB=1, beta=0.5),
    ]
    inits = {
        "w1": rand(4, 4, 3, 3, seed=1),
        "b1": rand(4, seed=2),
        "w2": rand(4, 4, 3, 3, seed=3),
        "b2": rand(4, seed=4),
        "w3": rand(5, 64, seed=5),
        "b3": rand(1, 5, seed=6),
    }
    return make_model(nodes, inits, ["N", 4, 4, 4])


def _matmul_3d() -> onnx.ModelProto:
    """A 3-D MatMul (rows of the last axis) and a Gemm whose scalar bias the node cannot take."""
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m"]),
        helper.make_node("Flatten", ["m"], ["f"]),
        helper.make_node("Gemm", ["f", "w2", "b2"], ["y"]),
    ]
    inits = {"w1": rand(6, 3, seed=7), "w2": rand(12, 4, seed=8), "b2": rand(1, seed=9)}
    return make_model(nodes, inits, ["N", 4, 6])


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize(
    ("build", "shape"), [(_conv_block, (40, 4, 4, 4)), (_matmul_3d, (40, 4, 6))], ids=["conv", "3d"]
)
def test_fused_draws_equal_the_onnxruntime_nodes(library, spec, build, shape) -> None:
    model = build()
    assert _fused_ops(model, spec), "the fused path must be taken"
    x = rand(*shape, seed=10) * 3
    fused = _predictions(model, x, spec, fused=True)
    plain = _predictions(model, x, spec, fused=False)
    assert np.array_equal(fused, plain)
    assert not np.array_equal(fused[0], fused[1]) or ("pcm" not in spec and "noise" not in spec)


def test_relus_and_the_residual_add_are_done_by_the_adc_nodes(library) -> None:
    parsed = parse_noise_spec("dac:bits=8+adc:bits=8")
    io = add_io_quantization(Simulator(_conv_block()).prepared, parsed.dac, parsed.adc, fused=True)
    nodes = list(io.model.graph.node)
    assert not [n for n in nodes if n.op_type in ("Relu", "Add")]
    adc = {n.output[0]: n for n in nodes if n.op_type == "AdcOutput"}
    assert set(adc) == {"r1", "r2", "y"}
    assert [a.i for a in adc["r1"].attribute if a.name == "relu"] == [1]
    assert adc["r2"].input[7] == "x"  # the block input, added after the bias, before the Relu
    # the node stands where the Add stood: after everything its inputs need
    order = [n.output[0] for n in nodes]
    assert order.index("r2") > order.index(adc["r2"].input[0])


def test_a_broadcasting_add_is_left_to_onnxruntime(library) -> None:
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c", "shift"], ["y"]),  # (4, 1, 1): broadcasts
    ]
    model = make_model(
        nodes,
        {"w": rand(4, 4, 3, 3, seed=1), "b": rand(4, seed=2), "shift": rand(4, 1, 1)},
        ["N", 4, 4, 4],
    )
    parsed = parse_noise_spec("dac:bits=8+adc:bits=8")
    io = add_io_quantization(Simulator(model).prepared, parsed.dac, parsed.adc, fused=True)
    assert [n.op_type for n in io.model.graph.node if n.op_type == "Add"] == ["Add"]
    x = rand(10, 4, 4, 4, seed=3)
    spec = "dac:bits=8+adc:bits=8,noise=0.05"
    assert np.array_equal(
        _predictions(model, x, spec, fused=True), _predictions(model, x, spec, fused=False)
    )


def test_two_analog_branches_into_one_relu_keep_both(library) -> None:
    # a projection shortcut: Add(conv3x3(x), conv1x1(x)) -> Relu; the first layer's node takes the
    # Add and the Relu, the second keeps its own node (it must not take that node for its Relu)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "w2", "b2"], ["b"]),
        helper.make_node("Add", ["a", "b"], ["s"]),
        helper.make_node("Relu", ["s"], ["y"]),
    ]
    inits = {
        "w1": rand(3, 3, 3, 3, seed=1),
        "b1": rand(3, seed=2),
        "w2": rand(3, 3, 1, 1, seed=3),
        "b2": rand(3, seed=4),
    }
    model = make_model(nodes, inits, ["N", 3, 6, 6])
    assert _fused_ops(model, SPECS[0]).count("AdcOutput") == 2
    x = rand(4, 3, 6, 6, seed=5)
    for spec in SPECS:
        assert np.array_equal(
            _predictions(model, x, spec, fused=True), _predictions(model, x, spec, fused=False)
        ), spec


def test_signed_zeros_and_digital_layers_after_the_kernels_match(library) -> None:
    # no bias: -0.0 stays -0.0 (1/y tells); a MatMul + Add after the DAC and a residual Add after
    # a Conv are optimised by onnxruntime alike in both graphs (the kernels' outputs have shapes)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m"]),
        helper.make_node("Reciprocal", ["m"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["m2"]),
        helper.make_node("Add", ["m2", "b2"], ["y"]),
    ]
    inits = {"w1": rand(300, 8, seed=6), "w2": rand(8, 300, seed=7), "b2": rand(300, seed=8)}
    model = make_model(nodes, inits, ["N", 300], opset=13)
    x = rand(8, 300, seed=9)
    x[0] = 0.0  # an all-zero sample: every product is ±0
    for spec in ("adc:bits=4", "dac:bits=4", "dac:bits=8+adc:bits=4,noise=0.06"):
        fused = _predictions(model, x, spec, fused=True, exclude="w2")
        plain = _predictions(model, x, spec, fused=False, exclude="w2")
        assert np.array_equal(fused, plain, equal_nan=True), spec
        assert np.array_equal(np.signbit(fused), np.signbit(plain)), spec


def test_a_batched_matmul_weight_keeps_the_plain_nodes(library) -> None:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    model = make_model(nodes, {"w": rand(2, 6, 3, seed=10)}, ["N", 6])
    assert _fused_ops(model, "dac:bits=5+adc:bits=6,bound=2") == []


def test_draws_do_not_depend_on_threads_or_batch(library) -> None:
    model, spec = _conv_block(), SPECS[0]
    x = rand(40, 4, 4, 4, seed=11)
    base = _predictions(model, x, spec, fused=True)
    for kw in ({"threads": 1}, {"batch_size": 7}, {"draws_per_session": 1}):
        assert np.array_equal(_predictions(model, x, spec, fused=True, **kw), base), kw


def _run_ops(library, nodes, feeds: dict[str, np.ndarray], outputs: list[str]) -> list:
    def info(name: str, value: np.ndarray) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(
            name, helper.np_dtype_to_tensor_dtype(value.dtype), None
        )

    graph = helper.make_graph(
        nodes,
        "ops",
        [info(k, v) for k, v in feeds.items()],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)]
    )
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library))
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(outputs, feeds)


def test_adc_node_reads_the_bank_across_its_end_per_row_layout(library) -> None:
    y = rand(5, 3, 6, seed=12) * 4
    bank = rand(11, seed=13)
    feeds = {
        "y": y,
        "s": np.abs(rand(5, 3, 1, seed=17)),  # one range per row of the last axis
        "w_max_step": np.array(0.5, np.float32),
        "scale": np.array(1.5, np.float32),
        "bias": rand(6, seed=14),
        "bank": bank,
        "start": np.array([9], np.int64),
        "residual": rand(5, 3, 6, seed=18),
    }
    node = helper.make_node(
        "AdcOutput", list(feeds), ["out"], domain=DOMAIN, limit=3.0, layout=1, relu=1, gained=0
    )
    (out,) = _run_ops(library, [node], feeds, ["out"])
    noise = bank[(9 + np.arange(y.size)) % 11].reshape(y.shape)
    unit = feeds["s"] * np.float32(0.5)
    v = np.clip(y * (np.float32(1) / unit) + noise, -3, 3)
    want = np.maximum(np.rint(v) * (unit * np.float32(1.5)) + feeds["bias"] + feeds["residual"], 0)
    assert np.array_equal(out, want.astype(np.float32))


def test_dac_node_range_is_per_sample_and_nan_spreads_over_its_vector(library) -> None:
    x = rand(3, 2, 5, seed=15) * 5
    x[1, 0, 2] = np.nan
    node = helper.make_node(
        "DacCodes", ["x"], ["q", "s"], domain=DOMAIN, levels=15.0, tiny=1e-20, layout=0, codes=0
    )
    q, s = _run_ops(library, [node], {"x": x}, ["q", "s"])
    want_s = np.abs(x).reshape(3, -1).max(axis=1).reshape(3, 1, 1)
    assert s.shape == (3, 1, 1) and np.isnan(s[1]).all()
    ok = [0, 2]
    np.testing.assert_array_equal(s[ok], want_s[ok])
    want_q = np.rint(x[ok] * (np.float32(15) / want_s[ok])) * (want_s[ok] / np.float32(15))
    assert np.array_equal(q[ok], want_q.astype(np.float32))
    assert np.isnan(q[1]).all()


@pytest.fixture
def no_compiler(monkeypatch, tmp_path) -> Iterator[None]:
    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv("LATENTEDGE_CACHE_DIR", str(tmp_path))
    io_kernels_library.cache_clear()
    yield
    io_kernels_library.cache_clear()


def test_without_a_compiler_the_plain_nodes_give_the_same_draws(no_compiler, caplog) -> None:
    model, spec = _conv_block(), SPECS[0]
    x = rand(20, 4, 4, 4, seed=16)
    with caplog.at_level(logging.WARNING, logger="device_sim.kernels"):
        assert io_kernels_library() is None
    assert "false" in caplog.text and "plain onnxruntime nodes" in caplog.text
    fallback = _predictions(model, x, spec, fused=True)
    io_kernels_library.cache_clear()
    plain = _predictions(model, x, spec, fused=False)
    assert np.array_equal(fallback, plain)


def test_computed_biases_are_added_after_the_adc(library) -> None:
    # a Gemm whose C and a Conv whose B are computed by the graph (not initializers)
    nodes = [
        helper.make_node("Relu", ["bc"], ["b_conv"]),
        helper.make_node("Conv", ["x", "w1", "b_conv"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c"], ["f"]),
        helper.make_node("ReduceMax", ["f"], ["bias_rows"], axes=[1], keepdims=1),
        helper.make_node("Gemm", ["f", "w2", "bias_rows"], ["y"], beta=0.5),
    ]
    inits = {"bc": rand(3, seed=1), "w1": rand(3, 3, 3, 3, seed=2), "w2": rand(48, 5, seed=3)}
    model = make_model(nodes, inits, ["N", 3, 4, 4])
    x = rand(6, 3, 4, 4, seed=4)
    fine = "adc:bits=24,bound=64"  # no clipping (|y| / (s·max|W|) < 48) and a step of ~8e-6
    clean = Simulator(model).clean_outputs(x)
    np.testing.assert_allclose(
        _predictions(model, x, fine, fused=True)[0], clean, rtol=1e-4, atol=1e-3
    )
    for spec in SPECS:
        assert np.array_equal(
            _predictions(model, x, spec, fused=True), _predictions(model, x, spec, fused=False)
        ), spec


def test_float16_data_feeding_float32_layers_gets_float32_noise(library) -> None:
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
            helper.make_node("Gemm", ["xf", "w", "b"], ["y"], transB=1),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            onnx.numpy_helper.from_array(rand(7, 10, seed=5), "w"),
            onnx.numpy_helper.from_array(rand(7, seed=6), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    x = rand(5, 10, seed=7).astype(np.float16)
    for fused in (True, False):
        out = _predictions(model, x, "dac:bits=8+adc:bits=8,noise=0.06", fused=fused)
        assert out.dtype == np.float32 and np.isfinite(out).all()


def test_output_noise_on_a_sequence_first_layer_is_refused_naming_it() -> None:
    # (T, N, K) @ W: the samples are on axis 1, so noise drawn per sample would broadcast wrongly
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2]),
        helper.make_node("MatMul", ["t", "w"], ["mm"]),
        helper.make_node("Transpose", ["mm"], ["y"], perm=[1, 0, 2]),
    ]
    model = make_model(nodes, {"w": rand(6, 5)}, ["N", 3, 6])
    x = rand(4, 3, 6, seed=2)
    for fused in (True, False):
        with pytest.raises(NoiseInjectionError, match=r"'mm' has shape \(3, 1, 5\) for 1 sample"):
            _predictions(model, x, "adc:bits=7,bound=3,noise=0.1", fused=fused)
    # without output noise the layer simulates (the DAC/ADC ranges are per row)
    assert np.array_equal(
        _predictions(model, x, "dac:bits=6+adc:bits=7", fused=True),
        _predictions(model, x, "dac:bits=6+adc:bits=7", fused=False),
    )
