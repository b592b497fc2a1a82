from __future__ import annotations

import numpy as np
import pytest

from common.datasets import load_dataset
from common.errors import CodecError, DataError
from common.models import ClassifierConfig
from server.classifier import (
    DEFAULT_MODE,
    ClassifierMode,
    LatentClassifier,
    train_baseline,
    train_classifier,
)

FAST = ClassifierConfig(hidden_units=(32,), epochs=15)
CLASSES = 4


def _blobs(
    rng: np.random.Generator, dim: int, n: int, scale: float, offset: float
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters, one per class, in a node-specific scaled and shifted space."""
    centres = np.random.default_rng(dim).normal(size=(CLASSES, dim)) * 3
    y = rng.integers(0, CLASSES, size=n)
    x = (centres[y] + rng.normal(size=(n, dim))) * scale + offset
    return x.astype(np.float32), y.astype(np.int64)


@pytest.fixture(scope="module")
def nodes() -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Two nodes with different latent sizes and wildly different feature scales."""
    rng = np.random.default_rng(0)
    out: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {"train": {}, "test": {}}
    for node, dim, scale, offset in (("a", 6, 100.0, -50.0), ("b", 3, 0.01, 7.0)):
        out["train"][node] = _blobs(rng, dim, 300, scale, offset)
        out["test"][node] = _blobs(rng, dim, 200, scale, offset)
    return out


@pytest.fixture(scope="module", params=list(ClassifierMode))
def trained(
    request: pytest.FixtureRequest, nodes: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]
) -> LatentClassifier:
    mode: ClassifierMode = request.param
    return train_classifier(nodes["train"], CLASSES, mode, FAST, seed=0)


def test_classifies_each_nodes_latents(
    trained: LatentClassifier, nodes: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]
) -> None:
    for node, (x, y) in nodes["test"].items():
        labels, probs = trained.predict(node, x)
        assert labels.dtype == np.int64 and probs.dtype == np.float32
        assert probs.shape == (len(x), CLASSES)
        assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
        assert np.array_equal(labels, probs.argmax(axis=1))
        assert np.mean(labels == y) > 0.9
    assert trained.latent_dim_of("a") == 6 and trained.latent_dim_of("b") == 3
    assert trained.node_ids == ("a", "b")


def test_summary(trained: LatentClassifier) -> None:
    summary = trained.summary()
    assert summary["mode"] == trained.mode.value
    assert [n["node_id"] for n in summary["nodes"]] == ["a", "b"]
    assert [n["samples"] for n in summary["nodes"]] == [300, 300]
    assert summary["train_samples"] == 600
    assert 0.9 < summary["train_accuracy"] <= 1.0


def test_bytes_round_trip_gives_identical_predictions(
    trained: LatentClassifier, nodes: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]
) -> None:
    data = trained.to_bytes()
    assert data[:2] == b"PK"  # a zip (npz) archive, read back with allow_pickle=False
    restored = LatentClassifier.from_bytes(data)
    assert restored.mode is trained.mode and restored.summary() == trained.summary()
    for node, (x, _) in nodes["test"].items():
        labels, probs = trained.predict(node, x)
        labels2, probs2 = restored.predict(node, x)
        assert np.array_equal(labels, labels2) and np.array_equal(probs, probs2)


def test_predict_errors(trained: LatentClassifier) -> None:
    with pytest.raises(DataError, match=r"unknown node 'zz'; the classifier knows \['a', 'b'\]"):
        trained.predict("zz", np.zeros((1, 6), np.float32))
    with pytest.raises(DataError, match=r"node 'a' must have latent_dim 6, got shape \(2, 3\)"):
        trained.predict("a", np.zeros((2, 3), np.float32))
    with pytest.raises(DataError, match=r"NaN or Inf"):
        trained.predict("b", np.full((1, 3), np.nan, np.float32))
    with pytest.raises(DataError, match=r"floating \(N, latent_dim\) array, got int64"):
        trained.predict("b", np.zeros((1, 3), np.int64))
    with pytest.raises(DataError, match=r"unknown node"):
        trained.latent_dim_of("zz")
    assert trained.predict("a", np.zeros((0, 6), np.float16))[0].shape == (0,)


def test_training_is_deterministic(
    nodes: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]],
) -> None:
    quick = ClassifierConfig(hidden_units=(8,), epochs=2)
    a = train_classifier(nodes["train"], CLASSES, ClassifierMode.SHARED, quick, seed=5)
    b = train_classifier(nodes["train"], CLASSES, ClassifierMode.SHARED, quick, seed=5)
    c = train_classifier(nodes["train"], CLASSES, ClassifierMode.SHARED, quick, seed=6)
    x = nodes["test"]["a"][0]
    assert np.array_equal(a.predict("a", x)[1], b.predict("a", x)[1])
    assert not np.array_equal(a.predict("a", x)[1], c.predict("a", x)[1])


def test_training_input_errors() -> None:
    x = np.zeros((4, 2), np.float32)
    with pytest.raises(DataError, match=r"no nodes"):
        train_classifier({}, 3)
    with pytest.raises(DataError, match=r"labels of node 'n' must be in 0..2, got 0..3"):
        train_classifier({"n": (x, np.array([0, 1, 2, 3]))}, 3)
    with pytest.raises(DataError, match=r"labels of node 'n': 3 labels for 4 latents"):
        train_classifier({"n": (x, np.array([0, 1, 2]))}, 3)
    with pytest.raises(DataError, match=r"node 'n' has no training samples"):
        train_classifier({"n": (x[:0], np.zeros(0, np.int64))}, 3)


def test_from_bytes_rejects_garbage() -> None:
    with pytest.raises(CodecError, match=r"not a latentedge classifier archive"):
        LatentClassifier.from_bytes(b"not an archive")


def test_default_mode_is_a_mode() -> None:
    assert isinstance(DEFAULT_MODE, ClassifierMode)


def test_raw_pixel_baseline_on_digits() -> None:
    ds = load_dataset("digits")
    accuracy = train_baseline(ds.x_train, ds.y_train, ds.x_test, ds.y_test, config=FAST)
    assert accuracy > 0.9
    with pytest.raises(
        DataError, match=r"baseline x_test must have features 64, got shape \(450, 32\)"
    ):
        train_baseline(ds.x_train, ds.y_train, ds.x_test[:, :, :4], ds.y_test)


def test_one_nodes_classes_or_bad_data_never_change_another_nodes_replies(
    nodes: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]],
) -> None:
    x_a, y_a = nodes["train"]["a"]
    alone = train_classifier({"a": (x_a, y_a)}, CLASSES, ClassifierMode.PER_NODE, FAST, seed=0)
    rng = np.random.default_rng(1)
    big = (rng.normal(size=(50, 3)).astype(np.float32), rng.integers(0, 500, 50))
    with_big = train_classifier(
        {"b": big, "a": (x_a, y_a)}, {"a": CLASSES, "b": 500}, ClassifierMode.PER_NODE, FAST
    )
    x_test = nodes["test"]["a"][0]
    labels, probs = alone.predict("a", x_test)
    labels2, probs2 = with_big.predict("a", x_test)
    assert probs2.shape == (len(x_test), CLASSES)  # not 500 columns
    np.testing.assert_array_equal(labels, labels2)
    np.testing.assert_array_equal(probs, probs2)
    assert with_big.predict("b", big[0])[1].shape == (50, 500)
    # a node whose labels are out of its range is left out, the others still train
    bad = (x_a[:10], np.full(10, 99))
    survived = train_classifier({"bad": bad, "a": (x_a, y_a)}, CLASSES, config=FAST)
    assert survived.node_ids == ("a",)
    np.testing.assert_array_equal(survived.predict("a", x_test)[1], probs)
    # the per-node class counts survive serialization
    again = LatentClassifier.from_bytes(with_big.to_bytes())
    np.testing.assert_array_equal(again.predict("a", x_test)[1], probs2)
    assert again.predict("b", big[0])[1].shape == (50, 500)


def test_shared_mode_replies_have_the_nodes_own_width(
    nodes: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]],
) -> None:
    x_b, y_b = nodes["train"]["b"]
    data = {"a": nodes["train"]["a"], "b": (x_b, y_b)}
    model = train_classifier(data, {"a": CLASSES, "b": 7}, ClassifierMode.SHARED, FAST)
    assert model.predict("a", nodes["test"]["a"][0])[1].shape[1] == CLASSES
    assert model.predict("b", nodes["test"]["b"][0])[1].shape[1] == 7


class _CountingSource:
    """A LatentSource over arrays cut into blocks; records which blocks are read."""

    def __init__(self, x: np.ndarray, y: np.ndarray, rows: int) -> None:
        self._x, self._y, self._rows = x, y, rows
        self.latent_dim = x.shape[1]
        self.block_rows = tuple(min(rows, len(y) - s) for s in range(0, len(y), rows))
        self.reads: list[int] = []

    def block(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        self.reads.append(index)
        rows = slice(index * self._rows, (index + 1) * self._rows)
        return self._x[rows].copy(), self._y[rows].copy()


@pytest.mark.parametrize("mode", list(ClassifierMode))
def test_training_from_block_sources(
    mode: ClassifierMode, nodes: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]
) -> None:
    """One block trains exactly like arrays; several blocks keep the accuracy, read lazily."""
    quick = ClassifierConfig(hidden_units=(16,), epochs=6)
    arrays = train_classifier(nodes["train"], CLASSES, mode, quick, seed=0)
    whole = {n: _CountingSource(x, y, rows=len(y)) for n, (x, y) in nodes["train"].items()}
    same = train_classifier(whole, CLASSES, mode, quick, seed=0)
    assert same.to_bytes() == arrays.to_bytes()
    blocks = {n: _CountingSource(x, y, rows=64) for n, (x, y) in nodes["train"].items()}
    streamed = train_classifier(blocks, CLASSES, mode, quick, seed=0)
    for node, (x, y) in nodes["test"].items():
        accuracy = np.mean(streamed.predict(node, x)[0] == y)
        assert accuracy >= np.mean(arrays.predict(node, x)[0] == y) - 0.05  # as good
        info = streamed.summary()["nodes"][0 if node == "a" else 1]
        assert info["samples"] == len(nodes["train"][node][1])
        src = blocks[node]
        # 2 statistics passes + 1 read per block per epoch + the accuracy pass
        assert len(src.reads) == len(src.block_rows) * (quick.epochs + 3)
