from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator

from common.datasets import load_dataset, shard
from common.errors import ModelExportError
from common.export import (
    EXPORT_TOLERANCE,
    Exporter,
    compose_pipeline,
    export_classifier,
    export_encoder,
)
from common.models import AutoencoderConfig, ClassifierConfig, ConvAutoencoder
from edge.trainer import TrainConfig, encode, train_autoencoder
from server.classifier import ClassifierMode, LatentClassifier, train_classifier

MNIST_TINY = str(
    Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist" / "mnist_tiny.npz"
)


@pytest.fixture(scope="module")
def digits_node() -> tuple[ConvAutoencoder, np.ndarray, np.ndarray]:
    part = shard(load_dataset("digits"), 0, 2, skew=0.3)
    model = train_autoencoder(part.x_train, AutoencoderConfig(1, 8, 8, 16), TrainConfig(epochs=5))
    return model, part.x_test, part.y_test


@pytest.fixture(scope="module")
def classifier(digits_node: tuple[ConvAutoencoder, np.ndarray, np.ndarray]) -> LatentClassifier:
    model, x, y = digits_node
    z = encode(model, x)
    other = np.random.default_rng(0).normal(size=(40, 5)).astype(np.float32)
    data = {"n0": (z, y), "n1": (other, np.arange(40) % 10)}
    config = ClassifierConfig(hidden_units=(32,), epochs=10)
    return train_classifier(data, 10, ClassifierMode.SHARED, config, seed=0)


def _run(path: Path, name: str, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {name: x})
    return np.asarray(out)


def test_encoder_export_matches_torch_on_real_digits(
    tmp_path: Path, digits_node: tuple[ConvAutoencoder, np.ndarray, np.ndarray]
) -> None:
    model, x, _ = digits_node
    path = tmp_path / "enc.onnx"
    diff = export_encoder(model, path, x)
    assert diff <= EXPORT_TOLERANCE
    graph = onnx.load(str(path)).graph
    assert {n.op_type for n in graph.node} <= {"Conv", "Relu", "Flatten", "Gemm"}
    expected = encode(model, x)
    for batch in (1, 7, len(x)):  # dynamic batch axis
        assert np.max(np.abs(_run(path, "image", x[:batch]) - expected[:batch])) <= 1e-5
    outputs = ReferenceEvaluator(str(path)).run(None, {"image": x[:16]})
    assert isinstance(outputs, list)
    reference = outputs[0]
    assert np.max(np.abs(reference - expected[:16])) <= 1e-5


def test_mnist_encoder_export_with_both_exporters(tmp_path: Path) -> None:
    x = load_dataset(MNIST_TINY).x_test[:64]
    model = ConvAutoencoder(AutoencoderConfig(1, 28, 28, 49)).eval()
    expected = encode(model, x)
    for exporter in (Exporter.TORCHSCRIPT, Exporter.DYNAMO):
        path = tmp_path / f"{exporter.value}.onnx"
        export_encoder(model, path, x, exporter=exporter)
        assert np.max(np.abs(_run(path, "image", x) - expected)) <= 1e-5
        ops = {n.op_type for n in onnx.load(str(path)).graph.node}
        assert "Conv" in ops and "Gemm" in ops


def test_classifier_export_and_composed_pipeline(
    tmp_path: Path,
    digits_node: tuple[ConvAutoencoder, np.ndarray, np.ndarray],
    classifier: LatentClassifier,
) -> None:
    model, x, _ = digits_node
    z = encode(model, x)
    export_encoder(model, tmp_path / "enc.onnx", x)
    export_classifier(classifier.node_network("n0"), tmp_path / "cls.onnx", z)
    labels, probs = classifier.predict("n0", z)
    logits = _run(tmp_path / "cls.onnx", "latent", z)
    assert np.array_equal(logits.argmax(axis=1), labels)

    out = compose_pipeline(tmp_path / "enc.onnx", tmp_path / "cls.onnx", tmp_path / "pipe.onnx")
    merged = onnx.load(str(out))
    onnx.checker.check_model(merged, full_check=True)
    assert [i.name for i in merged.graph.input] == ["image"]
    assert [o.name for o in merged.graph.output] == ["logits"]
    names = [i.name for i in merged.graph.initializer] + [n.name for n in merged.graph.node]
    assert all(n.startswith(("encoder/", "classifier/")) for n in names)
    assert any(n.startswith("classifier/") for n in names)
    pipe_logits = _run(out, "image", x)
    pipe_probs = np.exp(pipe_logits - pipe_logits.max(axis=1, keepdims=True))
    pipe_probs /= pipe_probs.sum(axis=1, keepdims=True)
    assert np.max(np.abs(pipe_probs - probs)) < 1e-5


def test_compose_rejects_mismatched_latent_size(
    tmp_path: Path,
    digits_node: tuple[ConvAutoencoder, np.ndarray, np.ndarray],
    classifier: LatentClassifier,
) -> None:
    model, x, _ = digits_node
    export_encoder(model, tmp_path / "enc.onnx", x[:4])
    sample = np.zeros((3, 5), np.float32)
    export_classifier(classifier.node_network("n1"), tmp_path / "cls.onnx", sample)
    with pytest.raises(ModelExportError, match=r"latents of size 16 but classifier .* size 5"):
        compose_pipeline(tmp_path / "enc.onnx", tmp_path / "cls.onnx", tmp_path / "p.onnx")
    with pytest.raises(ModelExportError, match=r"cannot read ONNX file .*missing.onnx"):
        compose_pipeline(tmp_path / "missing.onnx", tmp_path / "cls.onnx", tmp_path / "p.onnx")
    with pytest.raises(ModelExportError, match=r"expected input \['image'\]"):
        compose_pipeline(tmp_path / "cls.onnx", tmp_path / "cls.onnx", tmp_path / "p.onnx")


def test_export_preconditions(tmp_path: Path) -> None:
    model = ConvAutoencoder(AutoencoderConfig(1, 8, 8, 4))
    sample = np.zeros((2, 1, 8, 8), np.float32)
    with pytest.raises(ModelExportError, match=r"eval mode"):
        export_encoder(model, tmp_path / "e.onnx", sample)
    with pytest.raises(ModelExportError, match=r"non-empty float32 sample, got float64"):
        export_encoder(model.eval(), tmp_path / "e.onnx", sample.astype(np.float64))


def test_an_exporter_failure_is_a_model_export_error(tmp_path: Path) -> None:
    model = ConvAutoencoder(AutoencoderConfig(1, 8, 8, 4)).eval()
    sample = np.zeros((2, 1, 8, 8), np.float32)
    target = tmp_path / "missing-dir-is-a-file"
    target.write_text("not a directory")
    with pytest.raises(ModelExportError, match="cannot create the folder"):
        export_encoder(model, target / "sub" / "e.onnx", sample, exporter=Exporter.TORCHSCRIPT)
    unwritable = tmp_path / "a-folder.onnx"
    unwritable.mkdir()  # the exporter cannot write a file where a folder is
    with pytest.raises(ModelExportError, match="ONNX export to"):
        export_encoder(model, unwritable, sample, exporter=Exporter.TORCHSCRIPT)
