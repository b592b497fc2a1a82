"""Finding analog tensors, folding, batch un-fixing and DAC/ADC rewriting on hand-built graphs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper
from onnx.reference import ReferenceEvaluator

from common.errors import NoiseInjectionError
from device_sim import Simulator, parse_noise_spec
from device_sim.graph import prepare
from device_sim.runner import RunnerConfig
from tests.unit.device_sim.conftest import make_model, rand


def _ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


def _reference(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return np.asarray(ReferenceEvaluator(model).run(None, {"x": x})[0])


def test_weight_behind_reshape_and_transpose_chain_is_found_and_folded() -> None:
    w = rand(4, 3, 2)  # reshaped to (4, 6), transposed to (6, 4): y = x @ W'
    model = make_model(
        [
            helper.make_node("Reshape", ["w", "shape"], ["w2"]),
            helper.make_node("Transpose", ["w2"], ["wt"], perm=[1, 0]),
            helper.make_node("Identity", ["wt"], ["wi"]),
            helper.make_node("MatMul", ["x", "wi"], ["y"]),
        ],
        {"w": w, "shape": np.array([4, 6], np.int64)},
        ["N", 6],
    )
    prepared = prepare(model)
    (tensor,) = prepared.analog
    assert (tensor.name, tensor.op_type, tensor.channel_axis) == ("w", "MatMul", 1)
    np.testing.assert_array_equal(prepared.weights[tensor.graph_name], w.reshape(4, 6).T)
    x = rand(5, 6, seed=1)
    np.testing.assert_array_equal(Simulator(model).clean_outputs(x), _ort(model, x))


@pytest.mark.parametrize(("trans_a", "trans_b", "axis"), [(0, 0, 1), (0, 1, 0)], ids=["B", "B^T"])
def test_gemm_channel_axis_follows_transb(trans_a: int, trans_b: int, axis: int) -> None:
    w = rand(3, 5) if trans_b else rand(5, 3)
    model = make_model(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transA=trans_a, transB=trans_b)],
        {"w": w, "b": rand(3, seed=2)},
        ["N", 5],
    )
    (tensor,) = prepare(model).analog
    assert tensor.channel_axis == axis and tensor.weight_input == 1


def test_matmul_with_constant_left_operand() -> None:
    model = make_model([helper.make_node("MatMul", ["w", "x"], ["y"])], {"w": rand(3, 5)}, [5, "N"])
    (tensor,) = prepare(model).analog
    assert (tensor.weight_input, tensor.channel_axis) == (0, 0)


def test_matmul_of_two_constants_is_not_analog() -> None:
    model = make_model(
        [
            helper.make_node("MatMul", ["a", "b"], ["ab"]),
            helper.make_node("MatMul", ["x", "ab"], ["y"]),
        ],
        {"a": rand(4, 4), "b": rand(4, 4, seed=1)},
        ["N", 4],
    )
    with pytest.raises(NoiseInjectionError, match="no analog layers"):
        prepare(model)


def test_weight_from_constant_node_and_depthwise_conv() -> None:
    w = rand(4, 1, 3, 3)
    model = make_model(
        [
            helper.make_node("Constant", [], ["w"], value=onnx.numpy_helper.from_array(w, "w")),
            helper.make_node("Conv", ["x", "w"], ["y"], group=4, pads=[1, 1, 1, 1]),
        ],
        {},
        [1, 4, 6, 6],
    )
    sim = Simulator(model)
    (tensor,) = sim.prepared.analog
    assert (tensor.name, tensor.channel_axis) == ("w", 0)
    x = rand(3, 4, 6, 6, seed=3)
    np.testing.assert_allclose(sim.clean_outputs(x), _reference(model, x), rtol=1e-5, atol=1e-5)


def _conv_bn_model() -> onnx.ModelProto:
    return make_model(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node(
                "BatchNormalization", ["c", "g", "beta", "mu", "var"], ["bn"], epsilon=1e-3
            ),
            helper.make_node("Relu", ["bn"], ["r"]),
            helper.make_node("Mul", ["r", "scale"], ["y"]),
        ],
        {
            "w": rand(6, 3, 3, 3),
            "b": rand(6, seed=1),
            "g": np.abs(rand(6, seed=2)) + 0.5,
            "beta": rand(6, seed=3),
            "mu": rand(6, seed=4),
            "var": np.abs(rand(6, seed=5)) + 0.1,
            "scale": np.float32(2.0) * np.ones((1, 6, 1, 1), np.float32),
        },
        ["N", 3, 5, 5],
    )


def test_batchnorm_after_conv_is_folded_into_the_weights() -> None:
    model = _conv_bn_model()
    sim = Simulator(model)
    (tensor,) = sim.prepared.analog
    assert tensor.folded and tensor.folded[0].startswith("BatchNormalization")
    assert sim.prepared.folded_layers[0].endswith("-> Conv 'Conv_0'")
    assert [n.op_type for n in sim.prepared.model.graph.node] == ["Conv", "Relu", "Mul"]
    x = rand(4, 3, 5, 5, seed=6)
    # numpy oracle of the unfolded graph (onnx.reference's BatchNormalization disagrees with both)
    w, b, g, beta, mu, var, scale = (
        onnx.numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer
    )
    conv = np.zeros((4, 6, 5, 5))
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    for i in range(5):
        for j in range(5):
            conv[:, :, i, j] = np.einsum("nchw,ochw->no", padded[:, :, i : i + 3, j : j + 3], w)
    conv += b[None, :, None, None]
    bn = (conv - mu[None, :, None, None]) / np.sqrt(var[None, :, None, None] + 1e-3)
    expected = np.maximum(bn * g[None, :, None, None] + beta[None, :, None, None], 0) * scale
    np.testing.assert_allclose(sim.clean_outputs(x), expected, rtol=1e-4, atol=1e-4)
    unfolded = Simulator(model, fold_affine=False)
    assert not unfolded.prepared.folded_layers
    np.testing.assert_array_equal(unfolded.clean_outputs(x), _ort(model, x))


def test_per_channel_mul_after_gemm_is_folded() -> None:
    scale = np.array([[1.0, -2.0, 0.5]], np.float32)
    w = rand(4, 3)
    model = make_model(
        [
            helper.make_node("Gemm", ["x", "w", "b"], ["g"]),
            helper.make_node("Mul", ["g", "s"], ["y"]),
        ],
        {"w": w, "b": rand(3, seed=1), "s": scale},
        ["N", 4],
    )
    prepared = prepare(model)
    (tensor,) = prepared.analog
    assert tensor.folded == ("Mul 'Mul_1'",)
    np.testing.assert_allclose(prepared.weights[tensor.graph_name], w * scale, rtol=1e-6)
    x = rand(7, 4, seed=2)
    np.testing.assert_allclose(Simulator(model).clean_outputs(x), _reference(model, x), rtol=1e-5)


def test_include_and_exclude_select_initializers_by_name() -> None:
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "encoder/w"], ["h"]),
            helper.make_node("MatMul", ["h", "classifier/w"], ["y"]),
        ],
        {"encoder/w": rand(4, 4), "classifier/w": rand(4, 2, seed=1)},
        ["N", 4],
    )
    assert [t.name for t in prepare(model, analog_include="^encoder/").analog] == ["encoder/w"]
    assert [t.name for t in prepare(model, analog_exclude="^encoder/").analog] == ["classifier/w"]
    with pytest.raises(NoiseInjectionError, match="matches --analog-include 'decoder'"):
        prepare(model, analog_include="decoder")
    with pytest.raises(NoiseInjectionError, match="not a valid regex"):
        prepare(model, analog_include="(")


def test_batch_fixed_to_one_with_reshape_is_unfixed() -> None:
    model = make_model(
        [
            helper.make_node("Reshape", ["x", "shape"], ["flat"]),
            helper.make_node("MatMul", ["flat", "w"], ["y"]),
        ],
        {"shape": np.array([1, 12], np.int64), "w": rand(12, 3)},
        [1, 3, 4],
    )
    sim = Simulator(model, config=RunnerConfig(batch_size=4))
    assert sim.prepared.batch_was_fixed
    x = rand(10, 3, 4, seed=1)
    expected = np.concatenate([_ort(model, x[i : i + 1]) for i in range(10)])
    np.testing.assert_allclose(sim.clean_outputs(x), expected, rtol=1e-6)


def test_output_selection_and_unknown_output() -> None:
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Relu", ["y"], ["z"])],
        {"w": rand(3, 3)},
        ["N", 3],
        extra_outputs=["z"],
    )
    assert prepare(model, output="z").output_name == "z"
    with pytest.raises(NoiseInjectionError, match=r"outputs: 'y' float32 \(N, 3\); 'z' float32"):
        prepare(model, output="logits")
    with pytest.raises(NoiseInjectionError, match="cannot tell which of the 2 model output"):
        prepare(model)  # two (N, 3) float outputs: ambiguous, no longer "the first"


def test_model_with_two_data_inputs_is_refused() -> None:
    model = make_model([helper.make_node("MatMul", ["x", "x2"], ["y"])], {}, ["N", 3])
    model.graph.input.append(helper.make_tensor_value_info("x2", onnx.TensorProto.FLOAT, [3, 3]))
    with pytest.raises(NoiseInjectionError, match="exactly one data input, found 2"):
        prepare(model)


def test_io_rewrite_refuses_weight_on_the_left() -> None:
    model = make_model([helper.make_node("MatMul", ["w", "x"], ["y"])], {"w": rand(3, 5)}, [5, "N"])
    sim = Simulator(model)
    with pytest.raises(NoiseInjectionError, match="weight on the left"):
        list(sim.predictions(rand(5, 2), parse_noise_spec("adc:bits=8"), [0], seed=0))
