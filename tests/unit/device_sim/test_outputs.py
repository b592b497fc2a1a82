"""Which model output the simulator scores, for outputs of every kind (scores, ids, maps)."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from common.errors import NoiseInjectionError
from device_sim import simulate
from device_sim.graph import prepare
from device_sim.runner import RunnerConfig, predicted_classes
from tests.conftest import assert_one_line_error, run_cli
from tests.unit.device_sim.conftest import rand

CLASSES = 4
FEATURES = 6


def _scores_nodes() -> list[onnx.NodeProto]:
    return [helper.make_node("Gemm", ["x", "w", "b"], ["scores"], name="dense")]


def _model(
    nodes: Sequence[onnx.NodeProto],
    outputs: Sequence[onnx.ValueInfoProto],
    *,
    ml: bool = False,
) -> onnx.ModelProto:
    inits = {"w": rand(FEATURES, CLASSES, seed=3), "b": rand(CLASSES, seed=4)}
    graph = helper.make_graph(
        list(nodes),
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEATURES])],
        list(outputs),
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    opsets = [helper.make_opsetid("", 13)]
    if ml:
        opsets.append(helper.make_opsetid("ai.onnx.ml", 1))
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


def _out(name: str, elem: int = TensorProto.FLOAT, shape: Sequence[int | str] | None = None):
    return helper.make_tensor_value_info(name, elem, shape)


def logits_model() -> onnx.ModelProto:
    return _model(_scores_nodes(), [_out("scores")])


def probabilities_model() -> onnx.ModelProto:
    nodes = [*_scores_nodes(), helper.make_node("Softmax", ["scores"], ["probs"], axis=1)]
    return _model(nodes, [_out("probs")])


def labels_model(keepdims: int = 0) -> onnx.ModelProto:
    nodes = [
        *_scores_nodes(),
        helper.make_node("ArgMax", ["scores"], ["label"], axis=1, keepdims=keepdims),
    ]
    return _model(nodes, [_out("label", TensorProto.INT64)])


def sklearn_like_model(zipmap: bool = True) -> onnx.ModelProto:
    """Like skl2onnx's classifiers: ``label`` int64 (N,), ``probabilities`` and a ZipMap."""
    nodes = [
        *_scores_nodes(),
        helper.make_node("Softmax", ["scores"], ["probabilities"], axis=1),
        helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0),
    ]
    outputs = [_out("label", TensorProto.INT64, ["N"]), _out("probabilities", shape=["N", 4])]
    if zipmap:
        nodes.append(
            helper.make_node(
                "ZipMap",
                ["probabilities"],
                ["output_probability"],
                domain="ai.onnx.ml",
                classlabels_int64s=list(range(CLASSES)),
            )
        )
        seq_map = helper.make_sequence_type_proto(
            helper.make_map_type_proto(
                TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])
            )
        )
        outputs.append(helper.make_value_info("output_probability", seq_map))
    # skl2onnx lists the label first, the ZipMap second; put the ZipMap first to check it is skipped
    return _model(nodes, outputs[::-1], ml=zipmap)


def two_scores_model() -> onnx.ModelProto:
    nodes = [*_scores_nodes(), helper.make_node("Softmax", ["scores"], ["probs"], axis=1)]
    return _model(nodes, [_out("scores"), _out("probs")])


def one_float_model(keepdims: int) -> onnx.ModelProto:
    nodes = [
        *_scores_nodes(),
        helper.make_node("ReduceMax", ["scores"], ["score"], axes=[1], keepdims=keepdims),
    ]
    return _model(nodes, [_out("score")])


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    x = rand(300, FEATURES, seed=5)
    w, b = rand(FEATURES, CLASSES, seed=3), rand(CLASSES, seed=4)
    y = np.argmax(x @ w + b, axis=1)
    flip = np.random.default_rng(6).random(300) < 0.2  # some wrong labels: accuracy < 1
    y[flip] = (y[flip] + 1) % CLASSES
    return x, y.astype(np.int64)


VARIANTS = {
    "logits": logits_model,
    "probabilities": probabilities_model,
    "labels (N,)": labels_model,
    "labels (N, 1)": lambda: labels_model(keepdims=1),
    "scikit-learn label + probabilities + ZipMap": sklearn_like_model,
    "label + probabilities": lambda: sklearn_like_model(zipmap=False),
}


def test_scores_probabilities_and_class_ids_give_the_same_accuracy(
    data: tuple[np.ndarray, np.ndarray],
) -> None:
    x, y = data
    config = RunnerConfig(batch_size=64, draws_per_session=2)
    reports = {
        name: simulate(make(), x, y, "awgn:snr_db=8", draws=3, seed=1, config=config)
        for name, make in VARIANTS.items()
    }
    reference = reports["logits"]
    assert 0.5 < reference.clean_accuracy < 0.95
    assert len(set(reference.per_draw)) > 1  # the noise changes the predictions
    for report in reports.values():
        assert report.clean_accuracy == reference.clean_accuracy
        assert report.per_draw == reference.per_draw


@pytest.mark.parametrize(
    ("make", "chosen"),
    [
        (sklearn_like_model, "label"),
        (lambda: sklearn_like_model(zipmap=False), "label"),
        (logits_model, "scores"),
        (labels_model, "label"),
    ],
)
def test_automatic_choice(make, chosen: str) -> None:
    assert prepare(make()).output_name == chosen


def test_two_score_outputs_are_refused_naming_them(data: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = data
    with pytest.raises(NoiseInjectionError) as info:
        simulate(two_scores_model(), x, y, "none", draws=1)
    message = str(info.value)
    assert "'scores' float32 (N, 4)" in message and "'probs' float32 (N, 4)" in message
    assert "--output NAME" in message and "\n" not in message
    # naming one settles it, and both give the same accuracy
    by_scores = simulate(two_scores_model(), x, y, "none", draws=1, output="scores")
    by_probs = simulate(two_scores_model(), x, y, "none", draws=1, output="probs")
    assert by_scores.clean_accuracy == by_probs.clean_accuracy


@pytest.mark.parametrize("keepdims", [0, 1])
def test_one_float_per_sample_is_refused(
    keepdims: int, data: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = data
    with pytest.raises(NoiseInjectionError, match=r"output 'score' is float32 \(N,(\)| 1\))"):
        simulate(one_float_model(keepdims), x, y, "none", draws=1)


def test_map_output_named_explicitly_is_refused(data: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = data
    with pytest.raises(NoiseInjectionError, match=r"'output_probability' is a seq\(map\(int64"):
        simulate(sklearn_like_model(), x, y, "none", draws=1, output="output_probability")


def test_unknown_output_lists_the_outputs(data: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = data
    with pytest.raises(NoiseInjectionError) as info:
        simulate(sklearn_like_model(), x, y, "none", draws=1, output="logits")
    message = str(info.value)
    assert "--output 'logits' is not a model output" in message
    assert "'label' int64 (N,)" in message and "'probabilities' float32 (N, 4)" in message


@pytest.mark.parametrize(
    ("values", "ok"),
    [
        (np.zeros((3, 4), np.float32), True),
        (np.zeros((3, 4, 1, 1), np.float32), True),
        (np.zeros(3, np.int64), True),
        (np.zeros((3, 1), np.int32), True),
        (np.zeros(3, np.float32), False),
        (np.zeros((3, 1), np.float32), False),
        (np.zeros((3, 4, 5, 5), np.float32), False),
        (np.zeros((3, 4), np.int64), False),
        (np.zeros(3, np.bool_), False),
    ],
)
def test_predicted_classes_shapes(values: np.ndarray, ok: bool) -> None:
    if ok:
        assert predicted_classes(values).shape == (3,)
    else:
        with pytest.raises(NoiseInjectionError, match="--output NAME"):
            predicted_classes(values)


def test_qdq_model_is_refused() -> None:
    weight = np.random.default_rng(0).integers(-100, 100, (FEATURES, CLASSES)).astype(np.int8)
    graph = helper.make_graph(
        [
            helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["w"]),
            helper.make_node("MatMul", ["x", "w"], ["y"]),
        ],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEATURES])],
        [_out("y")],
        [
            numpy_helper.from_array(weight, "wq"),
            numpy_helper.from_array(np.float32(0.01), "s"),
            numpy_helper.from_array(np.int8(0), "z"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(NoiseInjectionError, match=r"quantized graph \(DequantizeLinear x1\)"):
        prepare(model)


def test_cli_refuses_an_ambiguous_model_in_one_line(
    data: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    x, y = data
    model = tmp_path / "two.onnx"
    onnx.save(two_scores_model(), str(model))
    npz = tmp_path / "d.npz"
    np.savez(npz, x=x, y=y)
    proc: subprocess.CompletedProcess[str] = run_cli(
        "simulate", str(model), "--data", str(npz), "--log-level", "WARNING"
    )
    assert_one_line_error(proc, 3, "'scores' float32 (N, 4); 'probs' float32 (N, 4)")
    assert "--output NAME" in proc.stderr
    chosen = run_cli(
        "simulate", str(model), "--data", str(npz), "--output", "probs", "--log-level", "WARNING"
    )
    assert chosen.returncode == 0, chosen.stderr


def test_string_labels_are_skipped_for_the_probabilities() -> None:
    model = sklearn_like_model(zipmap=False)
    label = next(o for o in model.graph.output if o.name == "label")
    label.type.tensor_type.elem_type = TensorProto.STRING
    prepared = prepare(model)
    assert prepared.output_name == "probabilities"
    assert "'label' string (N,)" in "; ".join(o.describe() for o in prepared.outputs)
