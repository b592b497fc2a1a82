"""device_sim on real graphs: the shared-data models and the onnx package's backend test models."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from common.errors import NoiseInjectionError
from device_sim import Simulator, parse_noise_spec
from device_sim.graph import add_io_quantization
from device_sim.kernels import DOMAIN
from device_sim.runner import RunnerConfig

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
MNIST12 = DATA / "onnx_mnist12" / "mnist-12.onnx"
RESNET8 = DATA / "onnx_resnet8_cifar10" / "resnet8_cifar10.onnx"
SHUFFLENET_INT8 = DATA / "onnx_shufflenet_v2_12_int8" / "shufflenet-v2-12-int8.onnx"
BACKEND = Path(onnx.__file__).parent / "backend" / "test" / "data"

pytestmark = pytest.mark.skipif(not MNIST12.is_file(), reason="shared data not mounted")


def _pb(path: Path) -> np.ndarray:
    tensor = onnx.TensorProto()
    tensor.ParseFromString(path.read_bytes())
    return numpy_helper.to_array(tensor)


def _plain(model: Path | bytes, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 4  # operator tests onnxruntime cannot run are skipped quietly
    session = ort.InferenceSession(
        model if isinstance(model, bytes) else str(model),
        options,
        providers=["CPUExecutionProvider"],
    )
    name = session.get_inputs()[0].name
    return np.asarray(session.run(None, {name: x})[0])


@pytest.mark.parametrize(
    ("model", "sets"),
    [(MNIST12, 2), (RESNET8, 3)],
    ids=["mnist-12", "resnet8"],
)
def test_reference_sets_clean_equals_plain_onnxruntime(model: Path, sets: int) -> None:
    sim = Simulator(model)
    assert sim.prepared.batch_was_fixed
    for k in range(sets):
        folder = model.parent / f"test_data_set_{k}"
        x = _pb(folder / "input_0.pb")
        expected = _pb(folder / "output_0.pb")
        ours = sim.clean_outputs(x)
        np.testing.assert_array_equal(ours, _plain(model, x))
        np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model", [MNIST12, RESNET8], ids=["mnist-12", "resnet8"])
def test_batch_fixed_to_one_runs_batched_and_matches_per_sample(model: Path) -> None:
    sim = Simulator(model, config=RunnerConfig(batch_size=16))
    shape = tuple(int(d) for d in sim.prepared.input_shape[1:])
    x = np.random.default_rng(0).uniform(0, 255, (37, *shape)).astype(np.float32)
    ours = sim.clean_outputs(x)
    assert ours.shape[0] == 37
    plain = np.concatenate([_plain(model, x[i : i + 1]) for i in range(37)])
    np.testing.assert_allclose(ours, plain, rtol=1e-5, atol=1e-6)
    assert (ours.argmax(1) == plain.argmax(1)).all()


@pytest.mark.parametrize(
    ("model", "count"), [(MNIST12, 3), (RESNET8, 10)], ids=["mnist-12", "resnet8"]
)
def test_noise_on_each_analog_tensor_changes_the_output(model: Path, count: int) -> None:
    sim = Simulator(model, config=RunnerConfig(draws_per_session=2))
    assert len(sim.prepared.analog) == count
    shape = tuple(int(d) for d in sim.prepared.input_shape[1:])
    x = np.random.default_rng(1).uniform(0, 1, (4, *shape)).astype(np.float32)
    clean = sim.clean_outputs(x)
    spec = parse_noise_spec("gaussian:std=0.2")
    for i, tensor in enumerate(sim.prepared.analog):
        outputs = dict(sim.predictions(x, spec, [0, 1], seed=3, tensors=[i]))
        assert not np.allclose(outputs[0], clean), tensor.name
        assert not np.allclose(outputs[0], outputs[1]), tensor.name


def test_quantized_int8_model_is_refused_with_what_is_simulated() -> None:
    with pytest.raises(NoiseInjectionError, match=r"QLinearConv.*float Conv/Gemm/MatMul"):
        Simulator(SHUFFLENET_INT8)


def _backend_models() -> list[Path]:
    found = []
    for suite in ("pytorch-converted", "pytorch-operator", "simple"):
        found += sorted((BACKEND / suite).glob("*/model.onnx"))
    return found


def test_backend_models_clean_output_equals_plain_onnxruntime() -> None:
    compared, folded = [], []
    for path in _backend_models():
        graph = onnx.load(str(path)).graph
        constants = {t.name for t in graph.initializer}
        if len([i for i in graph.input if i.name not in constants]) != 1:
            continue
        x = _pb(path.parent / "test_data_set_0" / "input_0.pb")
        try:
            plain = _plain(path, x)
        except Exception:  # onnxruntime cannot load or run this operator test
            continue
        try:
            sim = Simulator(
                path,
                output=graph.output[0].name,  # operator tests, not classifiers: no auto choice
                fold_affine=False,
                config=RunnerConfig(batch_size=1024),
            )
        except NoiseInjectionError as exc:
            assert "no analog layers" in str(exc) or "quantized" in str(exc), path
            continue
        assert sim.prepared.output_name == graph.output[0].name
        np.testing.assert_array_equal(sim.clean_outputs(x), plain, err_msg=str(path))
        compared.append(path.parent.name)
        with_fold = Simulator(path, output=graph.output[0].name)
        if with_fold.prepared.folded_layers:
            np.testing.assert_allclose(with_fold.clean_outputs(x), plain, rtol=1e-4, atol=1e-5)
            folded.append(path.parent.name)
    # 28 of the backend models have analog layers and load in onnxruntime 1.32 (opset-6 Gemm
    # models such as test_Linear do not)
    assert len(compared) >= 25, compared
    assert {"test_Conv2d_depthwise", "test_Conv2d_groups", "test_Linear_no_bias"} <= set(compared)
    if os.environ.get("DEVICE_SIM_VERBOSE"):
        print(len(compared), compared, folded)


@pytest.mark.parametrize(
    "spec",
    [
        "pcm:t=3600+dac:bits=8+adc:bits=8,noise=0.06",
        "dac:bits=5+adc:bits=6,bound=2",
        "adc:bits=7,bound=3,noise=0.1",
        "dac:bits=4",
    ],
)
@pytest.mark.parametrize("model", [MNIST12, RESNET8], ids=["mnist-12", "resnet8"])
def test_fused_kernels_equal_the_plain_nodes_on_real_models(model: Path, spec: str) -> None:
    # ResNet8's projection shortcuts add two analog layers' outputs before a Relu: each layer keeps
    # its own ADC node (a fused Relu must not swallow the other branch)
    parsed = parse_noise_spec(spec)
    sim = Simulator(model)
    io = add_io_quantization(sim.prepared, parsed.dac, parsed.adc, fused=True)
    ops = [n.op_type for n in io.model.graph.node if n.domain == DOMAIN]
    layers = len(sim.prepared.analog)
    assert ops.count("AdcOutput") == (layers if parsed.adc else 0)
    assert ops.count("DacCodes") == (layers if parsed.dac else 0)
    shape = (6, 3, 32, 32) if model == RESNET8 else (6, 1, 28, 28)
    x = np.random.default_rng(3).uniform(0, 255 if model == RESNET8 else 1, shape)
    x = x.astype(np.float32)
    runs = []
    for fused in (True, False):
        runner = Simulator(model, config=RunnerConfig(fused_io=fused))
        runs.append(np.stack([o for _, o in runner.predictions(x, parsed, range(2), 5)]))
    assert np.array_equal(runs[0], runs[1])
