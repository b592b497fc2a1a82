"""Classifiers the server trains on the latents that edge nodes upload.

Each node trains its own autoencoder, so latent spaces differ between nodes. Two modes:

- :attr:`ClassifierMode.PER_NODE`: one MLP per node, trained on that node's latents only;
- :attr:`ClassifierMode.SHARED`: one MLP for all nodes; its input is the node's standardized
  latent (zero-padded to the widest latent) concatenated with a one-hot of the node identity.

Features are standardized per node (mean and std of that node's training latents). For
prediction and ONNX export, the standardization (and, in shared mode, the node one-hot) is
folded into the first linear layer, so :meth:`LatentClassifier.node_network` is a plain MLP on
raw latents. Serialization (:meth:`LatentClassifier.to_bytes`) is an ``.npz`` archive of
weights plus a JSON header; it never uses pickle.

Training data is either arrays in memory or a :class:`LatentSource` per node, read one block
at a time (the server passes the store's :class:`~server.store.LatentBlocks`), so the trainer's
memory is bounded by a few blocks, not by the data stored. A node whose data is one block
trains exactly as from arrays; with several blocks, each epoch visits the blocks in a random
order and shuffles the rows within each (shared mode: within groups of
:data:`SHARED_MIX_BLOCKS` blocks of different nodes), and feature statistics come from two
streaming passes in float64.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import json
import logging
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from common.errors import CodecError, DataError
from common.models import ClassifierConfig, MLPClassifier
from common.types import AnyArray, FloatArray, LabelArray

logger = logging.getLogger(__name__)

FORMAT_NAME = "latentedge.latent_classifier"
"""``format`` field of the serialized header."""

FORMAT_VERSION = 1
"""Version of the serialized layout; :meth:`LatentClassifier.from_bytes` rejects others."""

MIN_STD = 1e-6
"""Features whose training std is below this are only centred, not scaled."""

TRAIN_BLOCK_BYTES = 16 * 2**20
"""Latent bytes (float32) per block the server's trainer reads from the store at a time."""

SHARED_MIX_BLOCKS = 4
"""Shared mode, several blocks: blocks whose rows are shuffled together (bounds memory)."""

_PREDICT_ROWS = 8192
"""Rows per forward pass when measuring training accuracy (bounds the activations)."""


class LatentSource(Protocol):
    """One node's training latents and labels, readable a block at a time."""

    @property
    def latent_dim(self) -> int:
        """Latent elements per row."""
        ...

    @property
    def block_rows(self) -> tuple[int, ...]:
        """Rows of each block."""
        ...

    def block(self, index: int) -> tuple[AnyArray, AnyArray]:
        """Latents ``(rows, latent_dim)`` and labels ``(rows,)`` of block ``index``."""
        ...


def block_rows_for(latent_dim: int, block_bytes: int = TRAIN_BLOCK_BYTES) -> int:
    """Rows of float32 latents of ``latent_dim`` that fit in ``block_bytes`` (at least 1)."""
    return max(1, block_bytes // (4 * max(1, latent_dim)))


@dataclass(frozen=True)
class _Blocks:
    """A node's checked data as blocks; ``read(i)`` gives float32 latents and int64 labels."""

    latent_dim: int
    block_rows: tuple[int, ...]
    read: Callable[[int], tuple[FloatArray, LabelArray]]

    @property
    def samples(self) -> int:
        return sum(self.block_rows)


class ClassifierMode(enum.Enum):
    """How the server classifies latents from independent encoders."""

    PER_NODE = "per_node"
    """One classifier per node."""
    SHARED = "shared"
    """One classifier for all nodes, told the node identity (one-hot input)."""


DEFAULT_MODE = ClassifierMode.PER_NODE
"""Mode with the better end-to-end accuracy in ``experiments/split_digits.py`` (digits, 3
non-IID nodes, latent 16, seeds 0-2: per-node 0.958 median vs shared 0.947; latent 8: 0.933 vs
0.927)."""


@dataclass(frozen=True)
class NodeInfo:
    """What the classifier knows about one node."""

    node_id: str
    """The node's identity."""
    latent_dim: int
    """Latent elements per sample the node's encoder produces."""
    samples: int
    """Training samples of this node."""
    train_accuracy: float
    """Accuracy on this node's training latents after training."""
    mean: FloatArray
    """Per-feature mean of the node's training latents, float32 ``(latent_dim,)``."""
    std: FloatArray
    """Per-feature std of the node's training latents (1 where below MIN_STD), float32."""
    num_classes: int = 0
    """The node's own class count (its replies have this many probabilities); 0 = the
    classifier's."""

    def describe(self) -> dict[str, Any]:
        """The JSON-able fields (no arrays), for summaries and the serialized header."""
        return {
            "node_id": self.node_id,
            "latent_dim": self.latent_dim,
            "samples": self.samples,
            "train_accuracy": self.train_accuracy,
            "num_classes": self.num_classes,
        }


class LatentClassifier:
    """A trained per-node or shared classifier over nodes' latents."""

    def __init__(
        self,
        mode: ClassifierMode,
        num_classes: int,
        config: ClassifierConfig,
        nodes: list[NodeInfo],
        networks: list[MLPClassifier],
    ) -> None:
        expected = len(nodes) if mode is ClassifierMode.PER_NODE else 1
        if len(networks) != expected:
            raise DataError(
                f"{mode.value} classifier needs {expected} networks, got {len(networks)}"
            )
        self.mode = mode
        self.num_classes = num_classes
        self.config = config
        self._nodes = {info.node_id: k for k, info in enumerate(nodes)}
        self._infos = nodes
        self._networks = networks
        for net in networks:
            net.eval()
        self._folded: dict[str, nn.Sequential] = {}

    @property
    def node_ids(self) -> tuple[str, ...]:
        """Nodes this classifier can serve, in training order."""
        return tuple(info.node_id for info in self._infos)

    def latent_dim_of(self, node_id: str) -> int:
        """Latent size the classifier expects from ``node_id``.

        Raises:
            DataError: unknown node.
        """
        return self._info(node_id).latent_dim

    def predict(self, node_id: str, latents: AnyArray) -> tuple[LabelArray, FloatArray]:
        """Classify latents from one node.

        Args:
            node_id: Which node's encoder produced the latents.
            latents: Floating array ``(N, latent_dim)``.

        Returns:
            ``(labels, probabilities)``: int64 ``(N,)`` and float32 ``(N, C)``, ``C`` the node's
            own class count (another node's classes never change the reply's shape).

        Raises:
            DataError: unknown node, wrong shape or dtype, or NaN/Inf values.
        """
        info = self._info(node_id)
        x = _check_latents(latents, f"latents of node {node_id!r}", info.latent_dim)
        with torch.no_grad():
            logits = self.node_network(node_id)(torch.from_numpy(x))
            logits = logits[:, : info.num_classes or self.num_classes]
            probs = torch.softmax(logits, dim=1).numpy().astype(np.float32)
        return probs.argmax(axis=1).astype(np.int64), probs

    def node_network(self, node_id: str) -> nn.Sequential:
        """Plain MLP (Linear/ReLU, eval mode) mapping ``node_id``'s raw latents to logits.

        The node's standardization and (shared mode) its one-hot are folded into the first
        layer, so the network exports to ONNX as Gemm/Relu only.

        Raises:
            DataError: unknown node.
        """
        if node_id not in self._folded:
            self._folded[node_id] = self._fold(node_id)
        return self._folded[node_id]

    def summary(self) -> dict[str, Any]:
        """JSON-ready description: mode, classes, nodes with samples and train accuracy."""
        total = sum(info.samples for info in self._infos)
        correct = sum(info.train_accuracy * info.samples for info in self._infos)
        return {
            "mode": self.mode.value,
            "num_classes": self.num_classes,
            "hidden_units": list(self.config.hidden_units),
            "train_samples": total,
            "train_accuracy": correct / total if total else 0.0,
            "nodes": [info.describe() for info in self._infos],
        }

    def to_bytes(self) -> bytes:
        """Serialize to ``.npz`` bytes (weights + JSON header), without pickle."""
        header = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "mode": self.mode.value,
            "num_classes": self.num_classes,
            "config": dataclasses.asdict(self.config),
            "nodes": [info.describe() for info in self._infos],
            "in_features": [net.in_features for net in self._networks],
            "out_features": [net.num_classes for net in self._networks],
        }
        arrays: dict[str, AnyArray] = {
            "header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
        }
        for k, info in enumerate(self._infos):
            arrays[f"node{k}.mean"] = info.mean
            arrays[f"node{k}.std"] = info.std
        for j, net in enumerate(self._networks):
            for key, value in net.state_dict().items():
                arrays[f"net{j}.{key}"] = value.numpy()
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)  # type: ignore[arg-type]  # numpy's stub wants one dtype
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> LatentClassifier:
        """Rebuild a classifier written by :meth:`to_bytes`.

        Raises:
            CodecError: the bytes are not such an archive, or the header or weights disagree.
        """
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                arrays = {key: archive[key] for key in archive.files}
            header = json.loads(arrays.pop("header").tobytes().decode())
        except (OSError, ValueError, KeyError, UnicodeDecodeError) as exc:
            raise CodecError(
                f"classifier bytes are not a latentedge classifier archive: {exc}"
            ) from exc
        if header.get("format") != FORMAT_NAME or header.get("version") != FORMAT_VERSION:
            raise CodecError(
                f"classifier header must have format {FORMAT_NAME!r} version {FORMAT_VERSION}, "
                f"got {header.get('format')!r} version {header.get('version')!r}"
            )
        try:
            mode = ClassifierMode(header["mode"])
            raw_config = header["config"]
            config = ClassifierConfig(
                **{**raw_config, "hidden_units": tuple(raw_config["hidden_units"])}
            )
            num_classes = int(header["num_classes"])
            nodes = [
                NodeInfo(
                    node_id=str(entry["node_id"]),
                    latent_dim=int(entry["latent_dim"]),
                    samples=int(entry["samples"]),
                    train_accuracy=float(entry["train_accuracy"]),
                    mean=arrays[f"node{k}.mean"],
                    std=arrays[f"node{k}.std"],
                    num_classes=int(entry.get("num_classes", num_classes)),
                )
                for k, entry in enumerate(header["nodes"])
            ]
            networks = []
            widths = header.get("out_features", [num_classes] * len(header["in_features"]))
            for j, (in_features, width) in enumerate(
                zip(header["in_features"], widths, strict=True)
            ):
                net = MLPClassifier(in_features, int(width), config.hidden_units, config.dropout)
                prefix = f"net{j}."
                state = {
                    key[len(prefix) :]: torch.from_numpy(value)
                    for key, value in arrays.items()
                    if key.startswith(prefix)
                }
                net.load_state_dict(state)
                networks.append(net)
            return cls(mode, num_classes, config, nodes, networks)
        except (KeyError, TypeError, ValueError, RuntimeError, DataError) as exc:
            raise CodecError(f"classifier archive is inconsistent: {exc}") from exc

    def _info(self, node_id: str) -> NodeInfo:
        k = self._nodes.get(node_id)
        if k is None:
            raise DataError(f"unknown node {node_id!r}; the classifier knows {list(self._nodes)}")
        return self._infos[k]

    def _fold(self, node_id: str) -> nn.Sequential:
        k = self._nodes[node_id]
        info = self._infos[k]
        net = self._networks[k if self.mode is ClassifierMode.PER_NODE else 0]
        linears = [m for m in net.layers if isinstance(m, nn.Linear)]
        first = linears[0]
        with torch.no_grad():
            weight = first.weight[:, : info.latent_dim].double()
            bias = first.bias.double().clone()
            if self.mode is ClassifierMode.SHARED:
                bias += first.weight[:, _padded_dim(self._infos) + k].double()
            scale = torch.from_numpy(1.0 / info.std.astype(np.float64))
            shift = torch.from_numpy(info.mean.astype(np.float64))
            folded = nn.Linear(info.latent_dim, first.out_features)
            folded.weight.copy_((weight * scale).float())
            folded.bias.copy_((bias - (weight * scale) @ shift).float())
        layers: list[nn.Module] = [folded]
        for layer in list(net.layers)[1:]:
            if isinstance(layer, nn.Linear | nn.ReLU):
                layers.append(layer)
        return nn.Sequential(*layers).eval()


def train_classifier(
    data: Mapping[str, tuple[AnyArray, AnyArray] | LatentSource],
    num_classes: int | Mapping[str, int],
    mode: ClassifierMode = DEFAULT_MODE,
    config: ClassifierConfig | None = None,
    *,
    seed: int = 0,
) -> LatentClassifier:
    """Train a classifier on the latents and labels of several nodes.

    One node's data never stops or changes another's classifier: in per-node mode each node's
    network has its own class count and a seed of its own id; a node whose data fail the checks
    is left out (logged) while any node remains.

    Args:
        data: ``node_id -> (latents (N, latent_dim) float, labels (N,) int)``, or a
            :class:`LatentSource` read a block at a time.
        num_classes: Number of classes (labels in ``0..num_classes-1``), one for all nodes or
            per node id.
        mode: Per-node classifiers or one shared classifier.
        config: Network size and schedule (defaults to ``ClassifierConfig()``).
        seed: Seed of initialisation, dropout and shuffling.

    Raises:
        DataError: no nodes, a node without samples, mismatched lengths, non-finite latents or
            labels out of range.
    """
    config = config or ClassifierConfig()
    if not data:
        raise DataError("cannot train a classifier: no nodes have uploaded latents")
    classes = (
        dict.fromkeys(data, num_classes) if isinstance(num_classes, int) else dict(num_classes)
    )
    if any(classes.get(n, 0) < 1 for n in data):
        raise DataError(f"num_classes must be >= 1 for every node, got {classes}")
    node_ids: list[str] = []
    sources: list[_Blocks] = []
    stats: list[tuple[FloatArray, FloatArray]] = []
    failures: list[DataError] = []
    for node_id in data:
        try:
            source = _node_blocks(node_id, data[node_id], classes[node_id])
            mean, std = _moments(source)
        except DataError as exc:
            failures.append(exc)
            logger.warning("classifier: leaving out node %r: %s", node_id, exc)
            continue
        node_ids.append(node_id)
        sources.append(source)
        stats.append((mean, std))
    if not node_ids:
        raise failures[0]
    width = max(classes[n] for n in node_ids)
    started = time.perf_counter()
    networks: list[MLPClassifier] = []
    if mode is ClassifierMode.PER_NODE:
        for k, node_id in enumerate(node_ids):
            own = seed + zlib.crc32(node_id.encode())  # independent of the other nodes
            blocks = [
                _standardized(sources[k], i, *stats[k]) for i in range(len(sources[k].block_rows))
            ]
            networks.append(
                _fit_blocks(blocks, sources[k].latent_dim, classes[node_id], config, own)
            )
            logger.info("trained classifier for node %r on %d latents", node_id, sources[k].samples)
    else:
        networks.append(_fit_shared(sources, stats, width, config, seed))
        logger.info("trained shared classifier for %d nodes", len(node_ids))
    provisional = [
        NodeInfo(node_id, src.latent_dim, src.samples, 0.0, mean, std, classes[node_id])
        for node_id, src, (mean, std) in zip(node_ids, sources, stats, strict=True)
    ]
    model = LatentClassifier(mode, width, config, provisional, networks)
    nodes = []
    for node_id, src, info in zip(node_ids, sources, provisional, strict=True):
        correct = 0
        for i in range(len(src.block_rows)):
            x, y = src.read(i)
            for start in range(0, len(y), _PREDICT_ROWS):  # bounded activations
                rows = slice(start, start + _PREDICT_ROWS)
                predicted, _ = model.predict(node_id, x[rows])
                correct += int(np.count_nonzero(predicted == y[rows]))
        nodes.append(dataclasses.replace(info, train_accuracy=correct / src.samples))
    model = LatentClassifier(mode, width, config, nodes, networks)
    logger.info(
        "%s classifier: %d nodes, train accuracy %.4f, %.1f s",
        mode.value,
        len(nodes),
        model.summary()["train_accuracy"],
        time.perf_counter() - started,
    )
    return model


def train_baseline(
    x_train: AnyArray,
    y_train: AnyArray,
    x_test: AnyArray,
    y_test: AnyArray,
    *,
    num_classes: int | None = None,
    config: ClassifierConfig | None = None,
    seed: int = 0,
) -> float:
    """Test accuracy of the same MLP family trained centrally on raw (flattened) pixels.

    Args:
        x_train: Training images ``(N, ...)``, flattened per sample.
        y_train: Training labels ``(N,)``.
        x_test: Test images, same per-sample shape.
        y_test: Test labels.
        num_classes: Defaults to ``1 + max label``.
        config: Network size and schedule (defaults to ``ClassifierConfig()``).
        seed: Seed of initialisation, dropout and shuffling.

    Raises:
        DataError: empty or mismatched inputs.
    """
    config = config or ClassifierConfig()
    x_tr = _check_latents(
        np.reshape(x_train, (len(x_train), -1)), "baseline x_train", None, "features"
    )
    features = x_tr.shape[1]
    x_te = _check_latents(
        np.reshape(x_test, (len(x_test), -1)), "baseline x_test", features, "features"
    )
    if len(x_tr) == 0 or len(x_te) == 0:
        raise DataError(
            f"baseline needs training and test samples, got {len(x_tr)} and {len(x_te)}"
        )
    y_all = np.concatenate([np.asarray(y_train).ravel(), np.asarray(y_test).ravel()])
    classes = num_classes if num_classes is not None else int(y_all.max()) + 1
    y_tr = _check_labels(y_train, "baseline y_train", len(x_tr), classes)
    y_te = _check_labels(y_test, "baseline y_test", len(x_te), classes)
    mean = x_tr.mean(axis=0)
    std = x_tr.std(axis=0)
    std = np.where(std < MIN_STD, 1.0, std).astype(np.float32)
    started = time.perf_counter()
    net = _fit((x_tr - mean) / std, y_tr, classes, config, seed)
    with torch.no_grad():
        logits = net(torch.from_numpy((x_te - mean) / std))
    accuracy = float(np.mean(logits.argmax(dim=1).numpy() == y_te))
    logger.info(
        "raw-pixel baseline: %d features, %d train / %d test, accuracy %.4f, %.1f s",
        features,
        len(x_tr),
        len(x_te),
        accuracy,
        time.perf_counter() - started,
    )
    return accuracy


def _fit(
    x: FloatArray, y: LabelArray, num_classes: int, config: ClassifierConfig, seed: int
) -> MLPClassifier:
    """Train an MLP with AdamW and cross-entropy; deterministic for ``seed``."""
    return _fit_blocks([lambda: (x, y)], x.shape[1], num_classes, config, seed)


_BlockReader = Callable[[], tuple[FloatArray, LabelArray]]
"""Reads one block: standardized float32 features and int64 labels."""


def _fit_shared(
    sources: list[_Blocks],
    stats: list[tuple[FloatArray, FloatArray]],
    width: int,
    config: ClassifierConfig,
    seed: int,
) -> MLPClassifier:
    """The shared network: standardized latents, zero-padded, plus the node one-hot."""
    padded = max(src.latent_dim for src in sources)
    shared = [
        _shared_block(sources[k], i, stats[k], (k, padded, len(sources)))
        for k in range(len(sources))
        for i in range(len(sources[k].block_rows))
    ]
    if all(len(src.block_rows) == 1 for src in sources):  # all in memory: one block
        parts = [read() for read in shared]
        features = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        del parts
        return _fit(features, labels, width, config, seed)
    return _fit_blocks(shared, padded + len(sources), width, config, seed, mix=SHARED_MIX_BLOCKS)


def _fit_blocks(
    blocks: Sequence[_BlockReader],
    in_features: int,
    num_classes: int,
    config: ClassifierConfig,
    seed: int,
    *,
    mix: int = 1,
) -> MLPClassifier:
    """Train an MLP with AdamW and cross-entropy on blocks read anew each epoch.

    One block is read once and trained on exactly like an array (a fresh permutation of all
    rows per epoch). Several: each epoch takes the blocks in a random order, ``mix`` at a
    time, and shuffles the rows of those together; at most ``mix`` blocks are in memory.
    Deterministic for ``seed``.
    """
    rng = np.random.default_rng(seed)
    cached = _as_tensors(blocks[0]()) if len(blocks) == 1 else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = MLPClassifier(in_features, num_classes, config.hidden_units, config.dropout)
        optimiser = torch.optim.AdamW(
            net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
        )
        loss_fn = nn.CrossEntropyLoss()
        net.train()
        for epoch in range(1, config.epochs + 1):
            total = 0.0
            rows = 0
            order = [0] if cached is not None else [int(i) for i in rng.permutation(len(blocks))]
            for first in range(0, len(order), mix):
                if cached is not None:
                    data, targets = cached
                else:
                    parts = [blocks[i]() for i in order[first : first + mix]]
                    data, targets = _as_tensors(
                        (
                            np.concatenate([p[0] for p in parts]),
                            np.concatenate([p[1] for p in parts]),
                        )
                        if len(parts) > 1
                        else parts[0]
                    )
                    del parts
                shuffled = torch.from_numpy(rng.permutation(len(data)))
                for start in range(0, len(data), config.batch_size):
                    idx = shuffled[start : start + config.batch_size]
                    optimiser.zero_grad()
                    loss = loss_fn(net(data[idx]), targets[idx])
                    loss.backward()
                    optimiser.step()
                    total += float(loss.detach()) * len(idx)
                rows += len(data)
            logger.debug(
                "classifier epoch %d/%d: loss %.4f", epoch, config.epochs, total / max(1, rows)
            )
    net.eval()
    return net


def _as_tensors(block: tuple[FloatArray, LabelArray]) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = block
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(y)


def _node_blocks(
    node_id: str, given: tuple[AnyArray, AnyArray] | LatentSource, num_classes: int
) -> _Blocks:
    """A node's data as checked blocks (arrays: checked now, one block; a source: per read)."""
    if isinstance(given, tuple):
        x, y = _node_data(node_id, given[0], given[1], num_classes)
        return _Blocks(x.shape[1], (len(x),), lambda _: (x, y))
    source = given
    dim = int(source.latent_dim)
    rows = tuple(int(r) for r in source.block_rows)
    if sum(rows) == 0:
        raise DataError(f"node {node_id!r} has no training samples")

    def read(index: int) -> tuple[FloatArray, LabelArray]:
        latents, labels = source.block(index)
        where = f"of node {node_id!r} (block {index})"
        x = _check_latents(latents, f"latents {where}", dim)
        return x, _check_labels(labels, f"labels {where}", len(x), num_classes)

    return _Blocks(dim, rows, read)


def _moments(source: _Blocks) -> tuple[FloatArray, FloatArray]:
    """Per-feature mean and std (1 where below MIN_STD) of a node's latents, float32.

    One block: numpy's own mean and std (as for arrays). Several: two streaming passes in
    float64 (the mean, then the squared deviations from it).
    """
    if len(source.block_rows) == 1:
        x, _ = source.read(0)
        mean64 = x.mean(axis=0, dtype=np.float64)
        std64 = x.std(axis=0, dtype=np.float64)
    else:
        total = np.zeros(source.latent_dim, np.float64)
        for i in range(len(source.block_rows)):
            total += source.read(i)[0].sum(axis=0, dtype=np.float64)
        mean64 = total / source.samples
        squares = np.zeros(source.latent_dim, np.float64)
        mean32 = mean64.astype(np.float32)
        for i in range(len(source.block_rows)):
            deviation = source.read(i)[0] - mean32  # float32: one block-sized temporary
            squares += np.square(deviation, out=deviation).sum(axis=0, dtype=np.float64)
        std64 = np.sqrt(squares / source.samples)
    return mean64.astype(np.float32), np.where(std64 < MIN_STD, 1.0, std64).astype(np.float32)


def _standardized(source: _Blocks, index: int, mean: FloatArray, std: FloatArray) -> _BlockReader:
    def read() -> tuple[FloatArray, LabelArray]:
        x, y = source.read(index)
        z = x - mean  # a new array (x may be the caller's); then scaled in place
        z /= std
        return z, y

    return read


def _shared_block(
    source: _Blocks,
    index: int,
    stats: tuple[FloatArray, FloatArray],
    layout: tuple[int, int, int],
) -> _BlockReader:
    """Block ``index`` as shared features; ``layout`` = (node index, padded width, nodes)."""

    def read() -> tuple[FloatArray, LabelArray]:
        x, y = _standardized(source, index, *stats)()
        return _shared_features(x, *layout), y

    return read


def _node_data(
    node_id: str, latents: AnyArray, labels: AnyArray, num_classes: int
) -> tuple[FloatArray, LabelArray]:
    """One node's checked training data (DataError naming the node and the problem)."""
    x = _check_latents(latents, f"latents of node {node_id!r}", None)
    y = _check_labels(labels, f"labels of node {node_id!r}", len(x), num_classes)
    if len(x) == 0:
        raise DataError(f"node {node_id!r} has no training samples")
    return x, y


def _shared_features(x: FloatArray, node: int, padded: int, num_nodes: int) -> FloatArray:
    """Standardized latents zero-padded to ``padded`` columns, then the node one-hot."""
    out = np.zeros((len(x), padded + num_nodes), dtype=np.float32)
    out[:, : x.shape[1]] = x
    out[:, padded + node] = 1.0
    return out


def _padded_dim(nodes: list[NodeInfo]) -> int:
    return max(info.latent_dim for info in nodes)


def _check_latents(
    latents: AnyArray, where: str, dim: int | None, dim_name: str = "latent_dim"
) -> FloatArray:
    x = np.asarray(latents)
    if x.dtype.kind != "f" or x.ndim != 2:
        raise DataError(
            f"{where} must be a floating (N, {dim_name}) array, got {x.dtype} {x.shape}"
        )
    if dim is not None and x.shape[1] != dim:
        raise DataError(f"{where} must have {dim_name} {dim}, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise DataError(f"{where} contain NaN or Inf")
    return np.ascontiguousarray(x, dtype=np.float32)


def _check_labels(labels: AnyArray, where: str, n: int, num_classes: int) -> LabelArray:
    y = np.asarray(labels)
    if y.dtype.kind not in "ui" or y.ndim != 1:
        raise DataError(f"{where} must be an integer (N,) array, got {y.dtype} {y.shape}")
    if len(y) != n:
        raise DataError(f"{where}: {len(y)} labels for {n} latents")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"{where} must be in 0..{num_classes - 1}, got {y.min()}..{y.max()}")
    return y.astype(np.int64)
