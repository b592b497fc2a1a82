"""CIFAR-10 transfer-learning study (issue 7): base model down, compressed fine-tuning deltas up.

Source task (the server's data): classes 0-7, train images 0000-0999 of each class. Target task
(the nodes): all 10 classes, train images 1000-1999 of each class, split over 3 non-IID nodes
(``shard(..., skew=0.5)``, one shard seed per run, the same for all nodes). Each node is tested on
its own non-IID shard of the CIFAR-10 test split (same ``shard`` call); accuracies are pooled over
the three nodes (the shards partition the test split, so every test image counts once).

Per seed: a resnet20 is pre-trained on the source (``base``); the baseline is the same network
with all parameters trained from scratch, centrally, on all nodes' raw target images. For each
point of :data:`GRID` (a trainable subset and a delta encoding) each node runs
``edge.transfer.fine_tune_delta``, exactly what an edge node runs (behind a top-k encoding that
is sparse fine-tuning: a dense run picks the k entries that moved most, a second run from the
base trains only those); the encoded delta is applied to the base the way the server does it
and the applied model is evaluated, beside the node's own model as trained. Beside it, the
latent path: each node trains a ConvAutoencoder at compression ratio 32 (latent 96) on its own
images and uploads latents; the server trains the per-node latent MLP classifier.

    # GPU (device machine), 3 seeds; results + plot (--budget-s: no job starts that would end
    # after that many seconds, the grid's lower tiers first). docs/transfer_study.md's run
    # (436 s; tiers 1-2 of GRID):
    PYTHONPATH=. python3 experiments/transfer_cifar.py --data-dir .cache/cifar --device cuda \\
        --out runs/transfer_cifar --gpu-workers 12 --cpu-workers 3 --budget-s 450
    # hyper-parameter sweep on validation splits (seed 0), what chose the defaults below:
    PYTHONPATH=. python3 experiments/transfer_cifar.py --data-dir .cache/cifar --device cuda \\
        --tune --out runs/transfer_cifar_tune
    # CPU smoke test at tiny scale (every grid point; about 4.5 min on 2 cores):
    .venv/bin/python experiments/transfer_cifar.py --quick --data-dir .cache/cifar --device cpu \\
        --out /tmp/tc --gpu-workers 2 --cpu-workers 1
    # re-plot / re-tabulate from a results file:
    .venv/bin/python experiments/transfer_cifar.py --plot docs/transfer_cifar.json \\
        --plot-out docs/img/transfer_cifar.png

The data folder holds ``cifar10_train_first2000perclass_jpg.zip`` and ``cifar10_test_jpg.zip``
(see ``../shared/data/cifar10_jpeg/PROVENANCE.md``); they are extracted to a temporary folder
and read with :func:`common.datasets.load_dataset`.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import itertools
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

logger = logging.getLogger("transfer_cifar")

TRAIN_ZIP = "cifar10_train_first2000perclass_jpg.zip"
TEST_ZIP = "cifar10_test_jpg.zip"
SOURCE_CLASSES = tuple(range(8))
NUM_CLASSES = 10
SOURCE_IMAGES = (0, 1000)
"""Per-class train file numbers [lo, hi) of the source task."""
TARGET_IMAGES = (1000, 2000)
"""Per-class train file numbers [lo, hi) of the target task."""
NODES = 3
SKEW = 0.5
COMPRESSION_RATIO = 32
LATENT_DIM = 3 * 32 * 32 // COMPRESSION_RATIO  # 96

TRAINABLES = ("head", "bn", "adapters:1", "adapters:4", "last-block", "all")
GRID: tuple[tuple[int, str, str], ...] = (
    # (tier, trainable, encoding). ``topk@T+V``: top-k sized so that T of the model's parameters
    # are trained and sent (resolved per subset to ``topk:F+V``, F x the subset's trainable
    # parameter entries = T x the model's parameters). Lower tiers run first; with --budget-s
    # the higher ones are what a short run leaves out. Within a tier the slowest go first.
    # Tier 1: the points the study needs (~0.1 %, ~1 %, ~10 %, 100 %, the head).
    (1, "all", "topk@0.1+int8"),
    (1, "all", "topk@0.01+int8"),
    (1, "all", "int8"),
    (1, "head", "topk@0.001+int8"),
    (1, "head", "int8"),
    # Tier 2: cheap encodings of the head, the BN subset.
    (2, "bn", "int8"),
    (2, "head", "fp32"),
    (2, "head", "fp16"),
    # Tier 3 (and the central fine-tune): adapters, last-block at 1 %.
    (3, "adapters:4", "int8"),
    (3, "last-block", "topk@0.01+int8"),
    (4, "last-block", "int8"),
    (4, "all", "topk@0.001+int8"),
    (4, "bn", "topk@0.001+int8"),
    (4, "adapters:1", "int8"),
    (5, "bn", "topk@0.01+int8"),
    (5, "last-block", "topk@0.1+int8"),
    *((6, t, "fp32") for t in ("all", "adapters:4", "adapters:1", "bn", "last-block")),
    *((7, t, "fp16") for t in ("all", "adapters:4", "adapters:1", "bn", "last-block")),
    (8, "all", "topk@0.01+fp16"),
    (8, "all", "topk@0.001+fp16"),
    (8, "all", "topk@0.1+fp16"),
    (8, "last-block", "topk@0.01+fp16"),
    (8, "last-block", "topk@0.1+fp16"),
    (8, "bn", "topk@0.01+fp16"),
    (8, "bn", "topk@0.001+fp16"),
    (8, "head", "topk@0.001+fp16"),
)
CENTRAL_TIER = 3
"""Tier of the central fine-tune of the base (a reference, not a node's point)."""
EST_SECONDS: dict[str, float] = {
    # one dense fine-tuning run on the device with ~12 jobs sharing the GPU (top-k: two runs,
    # the masked one a little slower: SPARSE_EST_FACTOR)
    "head": 10.0,
    "bn": 35.0,
    "adapters:1": 55.0,
    "adapters:4": 55.0,
    "last-block": 30.0,
    "all": 55.0,
    "pretrain": 95.0,
    "baseline": 120.0,
    "central": 130.0,
    "ae": 45.0,
    "classifier": 20.0,
}
SPARSE_EST_FACTOR = 2.3
"""Estimated cost of a top-k point (dense run + masked re-training) over one dense run."""
LIB_FILES = (
    "common/zoo.py",
    "common/finetune.py",
    "common/delta.py",
    "common/modelfile.py",
    "common/datasets.py",
    "common/models.py",
    "edge/transfer.py",
    "edge/trainer.py",
    "server/classifier.py",
)

# Defaults chosen by --tune on seed 0 (validation splits held out of the training data; the
# test split was never looked at): see docs/transfer_study.md (the sweep fine-tuned with
# augmentation, as the nodes do now). Fine-tuning goes through edge.transfer.FinetuneConfig:
# weight decay 0; augment=hflip=True for every subset but the head (FinetuneConfig's
# augmentation; the head keeps it off, which lets it train on cached frozen features). ft_lr
# is the dense run's rate. The masked re-training behind a top-k point runs at the library's
# sparse default (edge.transfer.SPARSE_LEARNING_RATE, 3e-2): the script passes
# learning_rate=0 (the library's defaults) when ft_lr equals the library's dense default, as it
# does for head, last-block and all, and ft_lr otherwise (bn: 3e-2, so both runs at 3e-2).
DEFAULTS: dict[str, Any] = {
    "pretrain_epochs": 40,
    "pretrain_batch": 128,
    "pretrain_lr": 1e-2,
    "pretrain_wd": 5e-2,
    "ft_epochs": 30,
    "ft_batch": 64,
    "ft_lr": {
        "head": 3e-2,
        "bn": 3e-2,
        "adapters:1": 3e-2,
        "adapters:4": 1e-2,
        "last-block": 3e-3,
        "all": 3e-3,
    },
}

# ----------------------------------------------------------------------------------------------
# data


def prepare_data(data_dir: Path, cache: Path, quick: bool) -> dict[str, Any]:
    """Extract the zips to a temp dir, read them with load_dataset, save uint8 arrays to cache."""
    from common.datasets import load_dataset  # noqa: PLC0415

    started = time.perf_counter()
    src_n = 20 if quick else None
    test_n = 30 if quick else None
    info: dict[str, Any] = {"zips": {}}
    with tempfile.TemporaryDirectory(prefix="cifar_") as tmp:
        for name in (TRAIN_ZIP, TEST_ZIP):
            path = data_dir / name
            info["zips"][name] = hashlib.sha256(path.read_bytes()).hexdigest()
            with zipfile.ZipFile(path) as zf:
                members = []
                for m in zf.namelist():
                    if not m.lower().endswith(".jpg"):
                        continue
                    k = int(Path(m).stem)
                    if src_n is not None and m.startswith("train/"):
                        lo_ok = SOURCE_IMAGES[0] <= k < SOURCE_IMAGES[0] + src_n
                        hi_ok = TARGET_IMAGES[0] <= k < TARGET_IMAGES[0] + src_n
                        if not (lo_ok or hi_ok):
                            continue
                    if test_n is not None and m.startswith("test/") and k >= test_n:
                        continue
                    members.append(m)
                zf.extractall(tmp, members)
        ds = load_dataset(tmp)
        # the number of each train file, in the order load_dataset read them (sorted per class)
        classes = sorted(p.name for p in (Path(tmp) / "train").iterdir())
        numbers = np.concatenate(
            [
                np.array(
                    [int(p.stem) for p in sorted((Path(tmp) / "train" / c).iterdir())],
                    dtype=np.int64,
                )
                for c in classes
            ]
        )
    assert classes == [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ], classes
    arrays = {}
    for split in ("train", "test"):
        x = getattr(ds, f"x_{split}")
        raw = np.rint(x * 255.0).astype(np.uint8)
        assert np.array_equal(raw.astype(np.float32) / np.float32(255.0), x)
        arrays[f"x_{split}"] = raw
        arrays[f"y_{split}"] = getattr(ds, f"y_{split}")
    arrays["train_numbers"] = numbers
    assert len(numbers) == len(ds.y_train)
    np.savez(cache, **arrays)
    info.update(
        train_images=len(ds.y_train),
        test_images=len(ds.y_test),
        seconds=time.perf_counter() - started,
    )
    logger.info(
        "decoded %d train + %d test images in %.1f s",
        len(ds.y_train),
        len(ds.y_test),
        info["seconds"],
    )
    return info


_DATA: dict[str, dict[str, Any]] = {}


def data(cache: str) -> dict[str, Any]:
    """Source and target datasets (float32 in [0, 1]), loaded once per process."""
    if cache in _DATA:
        return _DATA[cache]
    from common.datasets import Dataset  # noqa: PLC0415

    z = np.load(cache)
    x_train = z["x_train"].astype(np.float32) / np.float32(255.0)
    x_test = z["x_test"].astype(np.float32) / np.float32(255.0)
    y_train, y_test, numbers = z["y_train"], z["y_test"], z["train_numbers"]
    src = (
        np.isin(y_train, SOURCE_CLASSES)
        & (numbers >= SOURCE_IMAGES[0])
        & (numbers < SOURCE_IMAGES[1])
    )
    tgt = (numbers >= TARGET_IMAGES[0]) & (numbers < TARGET_IMAGES[1])
    src_test = np.isin(y_test, SOURCE_CLASSES)
    source = Dataset(
        "cifar10-source",
        x_train[src],
        y_train[src],
        x_test[src_test],
        y_test[src_test],
        NUM_CLASSES,
    )
    target = Dataset("cifar10-target", x_train[tgt], y_train[tgt], x_test, y_test, NUM_CLASSES)
    loaded: dict[str, Any] = {"source": source, "target": target}
    _DATA[cache] = loaded
    return loaded


def node_shard(cache: str, seed: int, node: int) -> Any:
    """Node ``node``'s train and test shard of the target task (shard seed = run seed)."""
    from common.datasets import shard  # noqa: PLC0415

    return shard(data(cache)["target"], node, NODES, skew=SKEW, seed=seed)


def holdout(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, validation) index split."""
    rng = np.random.default_rng([seed, 99])
    val = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        members = members[rng.permutation(len(members))]
        val.append(members[: max(1, round(len(members) * fraction))])
    v = np.sort(np.concatenate(val))
    return np.setdiff1d(np.arange(len(y)), v), v


# ----------------------------------------------------------------------------------------------
# jobs (run in worker processes)


def _init_worker(threads: int) -> None:
    import torch  # noqa: PLC0415

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")


def _spec() -> Any:
    from common.zoo import ModelSpec  # noqa: PLC0415

    return ModelSpec("resnet20", 3, 32, 32, NUM_CLASSES)


def _correct(model: Any, x: np.ndarray, y: np.ndarray) -> int:
    from common.finetune import predict  # noqa: PLC0415

    return int(np.sum(predict(model, x, batch_size=1000) == y)) if len(y) else 0


def _settings(cfg: dict[str, Any], kind: str, seed: int, lr: float | None = None) -> Any:
    """Central runs (pre-training, baseline, central fine-tune): augmented, as a server would."""
    from common.finetune import TrainSettings  # noqa: PLC0415

    if kind == "pretrain":
        return TrainSettings(
            epochs=cfg["pretrain_epochs"],
            batch_size=cfg["pretrain_batch"],
            learning_rate=lr or cfg["pretrain_lr"],
            weight_decay=cfg["pretrain_wd"],
            seed=seed,
            augment=True,
            device=cfg["device"],
        )
    return TrainSettings(
        epochs=cfg["ft_epochs"],
        batch_size=cfg["ft_batch"],
        learning_rate=lr or cfg["ft_lr"][kind],
        seed=seed,
        augment=True,
        device=cfg["device"],
    )


def job_pretrain(
    cfg: dict[str, Any], seed: int, lr: float | None = None, validate: bool = False
) -> dict[str, Any]:
    """Pre-train the base on the source task; save it (or, validate: score a held-out 10 %)."""
    from common.finetune import Trainable, train_network  # noqa: PLC0415
    from common.modelfile import from_torch, write_model_file  # noqa: PLC0415
    from common.zoo import build_model  # noqa: PLC0415

    d = data(cfg["cache"])
    src, tgt = d["source"], d["target"]
    spec = _spec()
    model = build_model(spec, seed=seed)
    x, y = src.x_train, src.y_train
    out: dict[str, Any] = {"seed": seed, "lr": lr or cfg["pretrain_lr"]}
    if validate:
        tr, va = holdout(y, 0.1, seed)
        x, y, xv, yv = x[tr], y[tr], x[va], y[va]
    res = train_network(model, x, y, Trainable("all"), _settings(cfg, "pretrain", seed, lr))
    out.update(
        seconds=res.seconds,
        steps=res.steps,
        final_loss=res.final_loss,
        ms_per_step=1000 * res.seconds / max(res.steps, 1),
    )
    if validate:
        out["val_accuracy"] = _correct(model, xv, yv) / len(yv)
        path = Path(cfg["work"]) / f"base_val_seed{seed}_lr{lr:g}.safetensors"
    else:
        out["source_test_accuracy"] = _correct(model, src.x_test, src.y_test) / len(src.y_test)
        out["base_accuracy"] = _correct(model, tgt.x_test, tgt.y_test) / len(tgt.y_test)
        out["base_train_target_accuracy"] = _correct(model, tgt.x_train, tgt.y_train) / len(
            tgt.y_train
        )
        path = Path(cfg["work"]) / f"base_seed{seed}.safetensors"
    out["hash"] = write_model_file(from_torch(spec, model.cpu()), path)
    out["path"] = str(path)
    return out


def job_baseline(cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    """The same network, all parameters, from scratch, centrally on all nodes' target images."""
    from common.finetune import Trainable, train_network  # noqa: PLC0415
    from common.zoo import build_model  # noqa: PLC0415

    tgt = data(cfg["cache"])["target"]
    model = build_model(_spec(), seed=1000 + seed)
    res = train_network(
        model, tgt.x_train, tgt.y_train, Trainable("all"), _settings(cfg, "pretrain", seed)
    )
    return {
        "seed": seed,
        "accuracy": _correct(model, tgt.x_test, tgt.y_test) / len(tgt.y_test),
        "seconds": res.seconds,
        "steps": res.steps,
    }


def job_central_finetune(cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    """All parameters of the base fine-tuned centrally on all nodes' target images."""
    from common.finetune import Trainable, train_network  # noqa: PLC0415
    from common.modelfile import read_model_file  # noqa: PLC0415

    tgt = data(cfg["cache"])["target"]
    base, _ = read_model_file(Path(cfg["work"]) / f"base_seed{seed}.safetensors")
    model = base.to_torch()
    res = train_network(
        model, tgt.x_train, tgt.y_train, Trainable("all"), _settings(cfg, "all", seed)
    )
    return {
        "seed": seed,
        "accuracy": _correct(model, tgt.x_test, tgt.y_test) / len(tgt.y_test),
        "seconds": res.seconds,
    }


def resolve_encoding(point: str, trainable_entries: int, params: int) -> str | None:
    """``topk@T+V`` -> ``topk:F+V`` with F x the subset's trainable parameter entries = T x
    model parameters (what ``fine_tune_delta``'s k counts; None when that is the whole subset
    or more); other encodings as they are."""
    if not point.startswith("topk@"):
        return point
    target, values = point[len("topk@") :].split("+")
    frac = float(target) * params / trainable_entries
    return f"topk:{frac:.4g}+{values}" if frac < 1.0 else None


def job_finetune(
    cfg: dict[str, Any],
    seed: int,
    node: int,
    trainable: str,
    point: str = "fp32",
    lr: float | None = None,
    validate: bool = False,
    base_path: str | None = None,
) -> dict[str, Any] | None:
    """One node, one grid point: ``edge.transfer.fine_tune_delta`` (what an edge node runs),
    the delta applied to the base as the server does it, both models evaluated."""
    from common.delta import DeltaEncoding, apply_delta, stats, topk_count  # noqa: PLC0415
    from common.finetune import Trainable, fine_tuned_update, prepare  # noqa: PLC0415
    from common.modelfile import ModelFile, read_model_file  # noqa: PLC0415
    from common.zoo import parameter_count  # noqa: PLC0415
    from edge.transfer import (  # noqa: PLC0415
        HEAD_LEARNING_RATE,
        LEARNING_RATE,
        FinetuneConfig,
        fine_tune_delta,
    )

    part = node_shard(cfg["cache"], seed, node)
    base, base_hash = read_model_file(
        base_path or Path(cfg["work"]) / f"base_seed{seed}.safetensors"
    )
    params = parameter_count(base.to_torch())
    t = Trainable.parse(trainable)
    # the subset's trainable parameter entries (what top-k's k counts) and the size of its
    # dense delta (parameters + the statistics that go with them)
    probe = base.to_torch()
    trainable_entries = sum(p.numel() for p in prepare(probe, t))
    dense_entries = sum(v.size for v in fine_tuned_update(probe, t)[0].values())
    spec = resolve_encoding(point, trainable_entries, params)
    if spec is None:
        return None
    encoding = DeltaEncoding.parse(spec)
    x, y, xt, yt = part.x_train, part.y_train, part.x_test, part.y_test
    if validate:
        tr, va = holdout(y, 0.2, seed)
        x, y, xt, yt = x[tr], y[tr], x[va], y[va]
    lr = lr or cfg["ft_lr"][trainable]
    sparse = encoding.topk < 1.0
    library_lr = HEAD_LEARNING_RATE if t.kind == "head" else LEARNING_RATE
    # a top-k point: the dense run at lr, the masked re-training at the library's sparse default
    # (learning_rate=0 = the library's defaults, used where they give lr for the dense run)
    passed_lr = 0.0 if sparse and math.isclose(lr, library_lr) else lr
    augment = t.kind != "head"  # the head trains on cached frozen features, unaugmented
    config = FinetuneConfig(
        trainable=t,
        encoding=encoding,
        epochs=cfg["ft_epochs"],
        learning_rate=passed_lr,
        batch_size=cfg["ft_batch"],
        seed=100 * seed + node,
        device=cfg["device"],
        augment=augment,
        hflip=augment,
    )
    started = time.perf_counter()
    tuned = fine_tune_delta(base, x, y, config)
    seconds = time.perf_counter() - started
    network = tuned.network.to(cfg["device"])
    res = tuned.result
    out: dict[str, Any] = {
        "seed": seed,
        "node": node,
        "trainable": trainable,
        "point": point,
        "encoding": spec,
        "sparse": sparse,
        "lr": config.settings().learning_rate,
        "sparse_lr": config.settings(sparse=True).learning_rate if sparse else None,
        "augment": augment,
        "train_samples": len(y),
        "test_samples": len(yt),
        "seconds": seconds,
        "last_run_seconds": res.seconds,
        "last_run_steps": res.steps,
        "ms_per_step": 1000 * res.seconds / max(res.steps, 1),
        "local_correct": _correct(network, xt, yt),
        "base_correct": _correct(base.to_torch().to(cfg["device"]), xt, yt),
    }
    if validate:
        out["val_accuracy"] = out["local_correct"] / len(yt)
        return out
    # what training changed: parameter entries that differ from the base (statistics apart)
    dense, low_rank = fine_tuned_update(tuned.network, t)
    trained = sum(
        int(np.count_nonzero(v != base.tensors[n]))
        for n, v in dense.items()
        if not n.endswith(("running_mean", "running_var"))
    ) + sum(a.size + b.size for a, b in low_rank.values())
    st = stats(tuned.entries)
    applied = ModelFile(base.spec, apply_delta(base.tensors, tuned.entries)).to_torch()
    out.update(
        dense_entries=dense_entries,
        trainable_entries=trainable_entries,
        topk_k=topk_count(encoding.topk, trainable_entries) if sparse else None,
        trained_entries=trained,
        params=st.params,
        payload_bytes=st.payload_bytes,
        index_bytes=st.index_bytes,
        tensors=st.tensors,
        params_fraction=st.params / params,
        trained_fraction=trained / params,
        correct=_correct(applied.to(cfg["device"]), xt, yt),
        model_params=params,
        base_hash=base_hash,
    )
    return out


def job_autoencoder(cfg: dict[str, Any], seed: int, node: int) -> dict[str, Any]:
    """Latent path, node side: train the AE (CPU, edge.trainer), encode train and test shards."""
    from common.models import AutoencoderConfig, compression_ratio  # noqa: PLC0415
    from edge.trainer import TrainConfig, encode, train_autoencoder  # noqa: PLC0415

    part = node_shard(cfg["cache"], seed, node)
    ae_cfg = AutoencoderConfig(3, 32, 32, LATENT_DIM)
    tc = TrainConfig(
        seed=100 * seed + node,
        num_threads=cfg["ae_threads"],
        **({"max_steps": cfg["ae_max_steps"]} if cfg["ae_max_steps"] else {}),
    )
    losses: list[float] = []
    started = time.perf_counter()
    ae = train_autoencoder(
        part.x_train, ae_cfg, tc, on_epoch=lambda _epoch, loss: losses.append(loss)
    )
    seconds = time.perf_counter() - started
    return {
        "seed": seed,
        "node": node,
        "compression_ratio": compression_ratio(ae_cfg),
        "train_config": {
            k: getattr(tc, k) for k in ("epochs", "batch_size", "max_steps", "learning_rate")
        },
        "epochs_run": len(losses),
        "final_mse": losses[-1],
        "seconds": seconds,
        "z_train": encode(ae, part.x_train),
        "y_train": part.y_train,
        "z_test": encode(ae, part.x_test),
        "y_test": part.y_test,
    }


def job_latent_classifier(
    cfg: dict[str, Any], seed: int, nodes: list[dict[str, Any]]
) -> dict[str, Any]:
    """Latent path, server side: per-node latent MLP classifiers; accuracy on the test shards."""
    from server.classifier import ClassifierMode, train_classifier  # noqa: PLC0415

    train = {f"node-{n['node']}": (n["z_train"], n["y_train"]) for n in nodes}
    started = time.perf_counter()
    clf = train_classifier(train, NUM_CLASSES, ClassifierMode.PER_NODE, seed=seed)
    seconds = time.perf_counter() - started
    per_node = []
    for n in nodes:
        pred, _ = clf.predict(f"node-{n['node']}", n["z_test"])
        # what the uplink sends by default: float32 latents + uint8 labels, per training sample
        upload = n["z_train"].shape[0] * (n["z_train"].shape[1] * 4 + 1)
        per_node.append(
            {
                "node": n["node"],
                "train_samples": len(n["y_train"]),
                "test_samples": len(n["y_test"]),
                "correct": int(np.sum(pred == n["y_test"])),
                "upload_bytes": int(upload),
                "latent_numbers": int(n["z_train"].size),
                "test_latent_bytes": int(n["z_test"].size * 4),
                "ae_seconds": n["seconds"],
                "ae_final_mse": n["final_mse"],
                "ae_epochs_run": n["epochs_run"],
            }
        )
    return {
        "seed": seed,
        "classifier_seconds": seconds,
        "nodes": per_node,
        "ae_train_config": nodes[0]["train_config"],
        "compression_ratio": nodes[0]["compression_ratio"],
    }


# ----------------------------------------------------------------------------------------------
# scheduling


class Runner:
    """Two process pools (GPU jobs, CPU jobs) fed from priority queues; follow-up jobs are
    submitted on completion. With a deadline, a job whose estimate would end after it is not
    started (a group, once started, is completed: the nodes of one grid point)."""

    def __init__(
        self,
        gpu_workers: int,
        cpu_workers: int,
        gpu_threads: int,
        ae_threads: int,
        deadline: float = math.inf,
    ):
        ctx = mp.get_context("spawn")
        self.pools = {
            "gpu": ProcessPoolExecutor(
                gpu_workers, mp_context=ctx, initializer=_init_worker, initargs=(gpu_threads,)
            ),
            "cpu": ProcessPoolExecutor(
                cpu_workers, mp_context=ctx, initializer=_init_worker, initargs=(ae_threads,)
            ),
        }
        self.slots = {"gpu": gpu_workers, "cpu": cpu_workers}
        self.running = {"gpu": 0, "cpu": 0}
        self.queued: dict[str, list[tuple[Any, ...]]] = {"gpu": [], "cpu": []}
        self.deadline = deadline
        self.admitted: set[Any] = set()
        self.order = itertools.count()
        self.pending: dict[Future[Any], tuple[str, str, Callable[[Any], None]]] = {}
        self.failures: list[str] = []
        self.skipped: list[str] = []

    def submit(
        self,
        pool: str,
        name: str,
        fn: Callable[..., Any],
        *args: Any,
        then: Callable[[Any], None] = lambda r: None,
        priority: tuple[Any, ...] = (),
        est: float = 0.0,
        group: Any = None,
        **kwargs: Any,
    ) -> None:
        job = (priority, next(self.order), name, fn, args, kwargs, then, est, group)
        heapq.heappush(self.queued[pool], job)

    def _launch(self) -> None:
        now = time.perf_counter()
        for pool, heap in self.queued.items():
            while heap and self.running[pool] < self.slots[pool]:
                _, _, name, fn, args, kwargs, then, est, group = heapq.heappop(heap)
                if group is None or group not in self.admitted:
                    if now + est > self.deadline:
                        self.skipped.append(name)
                        continue
                    self.admitted.add(group)
                fut = self.pools[pool].submit(fn, *args, **kwargs)
                self.pending[fut] = (pool, name, then)
                self.running[pool] += 1

    def run(self) -> None:
        self._launch()
        while self.pending:
            done, _ = wait(list(self.pending), return_when=FIRST_COMPLETED)
            for fut in done:
                pool, name, then = self.pending.pop(fut)
                self.running[pool] -= 1
                try:
                    result = fut.result()
                except Exception as exc:
                    logger.exception("job %s failed", name)
                    self.failures.append(f"{name}: {type(exc).__name__}: {exc}")
                    continue
                logger.info("done %s", name)
                then(result)
            self._launch()
        for executor in self.pools.values():
            executor.shutdown()
        if self.skipped:
            logger.warning("not started (time budget): %s", ", ".join(self.skipped))


# ----------------------------------------------------------------------------------------------
# study and tuning


def _estimate(trainable: str, point: str) -> float:
    return EST_SECONDS[trainable] * (SPARSE_EST_FACTOR if point.startswith("topk") else 1)


def run_study(
    cfg: dict[str, Any], seeds: list[int], runner: Runner, out: Path, max_tier: int
) -> dict[str, Any]:
    per_seed: dict[int, dict[str, Any]] = {
        s: {"seed": s, "finetune": [], "ae_nodes": []} for s in seeds
    }

    def save(seed: int) -> None:
        (out / f"seed{seed}.json").write_text(json.dumps(_jsonable(per_seed[seed]), indent=1))

    def setter(seed: int, key: str) -> Callable[[Any], None]:
        def then(result: Any) -> None:
            per_seed[seed][key] = result
            save(seed)

        return then

    def appender(seed: int) -> Callable[[Any], None]:
        def then(result: Any) -> None:
            if result is not None:
                per_seed[seed]["finetune"].append(result)
                save(seed)

        return then

    for s in seeds:

        def after_pretrain(r: dict[str, Any], s: int = s) -> None:
            per_seed[s]["pretrain"] = r
            save(s)
            if max_tier >= CENTRAL_TIER:
                runner.submit(
                    "gpu",
                    f"central_ft s{s}",
                    job_central_finetune,
                    cfg,
                    s,
                    then=setter(s, "central_finetune"),
                    priority=(CENTRAL_TIER, -1, s),
                    est=EST_SECONDS["central"],
                )
            for i, (tier, t, point) in enumerate(GRID):
                if tier > max_tier:
                    continue
                for n in range(NODES):
                    runner.submit(
                        "gpu",
                        f"ft s{s} n{n} {t} {point}",
                        job_finetune,
                        cfg,
                        s,
                        n,
                        t,
                        point,
                        then=appender(s),
                        priority=(tier, i, s, n),
                        est=_estimate(t, point),
                        group=(s, t, point),
                    )

        runner.submit(
            "gpu",
            f"pretrain s{s}",
            job_pretrain,
            cfg,
            s,
            then=after_pretrain,
            priority=(0, 0, s),
            est=EST_SECONDS["pretrain"],
        )

    for s in seeds:
        runner.submit(
            "gpu",
            f"baseline s{s}",
            job_baseline,
            cfg,
            s,
            then=setter(s, "baseline"),
            priority=(0, 1, s),
            est=EST_SECONDS["baseline"],
        )
        for n in range(NODES):

            def after_ae(r: dict[str, Any], s: int = s) -> None:
                per_seed[s]["ae_nodes"].append(r)
                if len(per_seed[s]["ae_nodes"]) == NODES:
                    nodes = sorted(per_seed[s].pop("ae_nodes"), key=lambda r: r["node"])
                    runner.submit(
                        "cpu",
                        f"latent clf s{s}",
                        job_latent_classifier,
                        cfg,
                        s,
                        nodes,
                        then=setter(s, "latent"),
                        priority=(0, s),
                        est=EST_SECONDS["classifier"],
                    )

            runner.submit(
                "cpu",
                f"ae s{s} n{n}",
                job_autoencoder,
                cfg,
                s,
                n,
                then=after_ae,
                priority=(1, s, n),
                est=EST_SECONDS["ae"],
                group=("ae", s),
            )
    runner.run()
    for s in seeds:
        per_seed[s].pop("ae_nodes", None)
    return {
        "per_seed": [per_seed[s] for s in seeds],
        "failures": runner.failures,
        "not_started": runner.skipped,
    }


def run_tune(
    cfg: dict[str, Any], runner: Runner, out: Path, pretrain_lrs: list[float], ft_lrs: list[float]
) -> dict[str, Any]:
    seed = 0
    result: dict[str, Any] = {"pretrain": [], "finetune": [], "ae": None}
    state: dict[str, int] = {"left": len(pretrain_lrs)}

    def save() -> None:
        (out / "tune.json").write_text(json.dumps(_jsonable(result), indent=1))

    def add_finetune(r: dict[str, Any]) -> None:
        result["finetune"].append(r)
        save()

    def after_pretrain(r: dict[str, Any]) -> None:
        result["pretrain"].append(r)
        save()
        state["left"] -= 1
        if state["left"]:
            return
        best = max(result["pretrain"], key=lambda p: p["val_accuracy"])
        result["chosen_pretrain_lr"] = best["lr"]
        for t in ("all", "last-block", "adapters:4", "adapters:1", "bn", "head"):
            for lr in ft_lrs:
                runner.submit(
                    "gpu",
                    f"tune ft {t} lr{lr:g}",
                    job_finetune,
                    cfg,
                    seed,
                    0,
                    t,
                    "fp32",
                    lr,
                    validate=True,
                    base_path=best["path"],
                    then=add_finetune,
                )

    for lr in pretrain_lrs:
        runner.submit(
            "gpu",
            f"tune pretrain lr{lr:g}",
            job_pretrain,
            cfg,
            seed,
            lr,
            validate=True,
            then=after_pretrain,
        )
    runner.submit(
        "cpu",
        "tune ae timing",
        job_autoencoder,
        cfg,
        seed,
        0,
        then=lambda r: result.__setitem__(
            "ae", {k: v for k, v in r.items() if not k.startswith(("z_", "y_"))}
        ),
    )
    runner.run()
    result["failures"] = runner.failures
    best_ft = {}
    for t in TRAINABLES:
        rows = [r for r in result["finetune"] if r["trainable"] == t]
        if rows:
            best_ft[t] = max(rows, key=lambda r: r["val_accuracy"])["lr"]
    result["chosen_ft_lr"] = best_ft
    save()
    return result


# ----------------------------------------------------------------------------------------------
# aggregation, tables, plot


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items() if not str(k).startswith(("z_",))}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    return obj


def spread(values: list[float]) -> dict[str, Any]:
    a = np.asarray(values, dtype=np.float64)
    if not len(a):
        nan = float("nan")
        return {"mean": nan, "std": nan, "min": nan, "max": nan, "n": 0, "values": []}
    return {
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
        "min": float(a.min()),
        "max": float(a.max()),
        "n": len(a),
        "values": [float(v) for v in a],
    }


def aggregate(raw: dict[str, Any]) -> dict[str, Any]:
    seeds = raw["per_seed"]
    params = None
    baseline = {s["seed"]: s["baseline"]["accuracy"] for s in seeds if "baseline" in s}
    summary: dict[str, Any] = {
        "base_accuracy": spread([s["pretrain"]["base_accuracy"] for s in seeds if "pretrain" in s]),
        "source_test_accuracy": spread(
            [s["pretrain"]["source_test_accuracy"] for s in seeds if "pretrain" in s]
        ),
        "baseline_accuracy": spread(list(baseline.values())),
        "central_finetune_accuracy": spread(
            [s["central_finetune"]["accuracy"] for s in seeds if "central_finetune" in s]
        ),
    }
    points: dict[tuple[str, str], dict[str, Any]] = {}
    for s in seeds:
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in s["finetune"]:
            groups.setdefault((r["trainable"], r["point"]), []).append(r)
            params = r["model_params"]
        for key, rows in groups.items():
            if len(rows) != NODES:
                continue  # a point counts once all nodes of the seed have it
            n_test = sum(r["test_samples"] for r in rows)
            acc = sum(r["correct"] for r in rows) / n_test
            local = sum(r["local_correct"] for r in rows) / n_test
            p = points.setdefault(
                key,
                {
                    "encoding": rows[0]["encoding"],
                    "sparse": rows[0]["sparse"],
                    "lr": rows[0]["lr"],
                    "sparse_lr": rows[0].get("sparse_lr"),
                    "augment": rows[0].get("augment"),
                    "topk_k": rows[0]["topk_k"],
                    "lists": {
                        k: []
                        for k in (
                            "accuracy",
                            "local_accuracy",
                            "params_fraction",
                            "trained_fraction",
                            "sent_over_trained",
                            "bytes_per_node",
                            "index_bytes_per_node",
                            "ratio_to_baseline",
                            "local_ratio_to_baseline",
                            "seconds_per_node",
                        )
                    },
                },
            )
            v = p["lists"]
            v["accuracy"].append(acc)
            v["local_accuracy"].append(local)
            v["params_fraction"].append(float(np.mean([r["params_fraction"] for r in rows])))
            v["trained_fraction"].append(float(np.mean([r["trained_fraction"] for r in rows])))
            v["sent_over_trained"].append(
                float(np.mean([r["params"] / max(r["trained_entries"], 1) for r in rows]))
            )
            v["bytes_per_node"].append(float(np.mean([r["payload_bytes"] for r in rows])))
            v["index_bytes_per_node"].append(float(np.mean([r["index_bytes"] for r in rows])))
            v["seconds_per_node"].append(float(np.mean([r["seconds"] for r in rows])))
            if s["seed"] in baseline:
                v["ratio_to_baseline"].append(acc / baseline[s["seed"]])
                v["local_ratio_to_baseline"].append(local / baseline[s["seed"]])
    rows_out: list[dict[str, Any]] = []
    for (t, point), p in points.items():
        rows_out.append(
            {
                "trainable": t,
                "point": point,
                "encoding": p["encoding"],
                "encoding_family": _enc_label(p["encoding"]),
                "sparse": p["sparse"],
                "lr": p["lr"],
                "sparse_lr": p["sparse_lr"],
                "augment": p["augment"],
                "topk_k": p["topk_k"],
                "target_fraction": float(point[5:].split("+")[0])
                if point.startswith("topk@")
                else None,
                **{k: spread(vals) for k, vals in p["lists"].items() if vals},
            }
        )
    rows_out.sort(
        key=lambda r: (
            r["target_fraction"] or r["params_fraction"]["mean"],
            r["bytes_per_node"]["mean"],
        )
    )
    summary["finetune"] = rows_out
    summary["model_params"] = params
    lat = [s["latent"] for s in seeds if "latent" in s]
    if lat:
        accs, fracs, byts = [], [], []
        for L in lat:
            n_test = sum(n["test_samples"] for n in L["nodes"])
            accs.append(sum(n["correct"] for n in L["nodes"]) / n_test)
            byts.append(float(np.mean([n["upload_bytes"] for n in L["nodes"]])))
            fracs.append(float(np.mean([n["latent_numbers"] for n in L["nodes"]])) / (params or 1))
        ratio = [
            a / baseline[L["seed"]] for a, L in zip(accs, lat, strict=True) if L["seed"] in baseline
        ]
        summary["latent"] = {
            "accuracy": spread(accs),
            "bytes_per_node": spread(byts),
            "numbers_fraction": spread(fracs),
            "ratio_to_baseline": spread(ratio),
            "compression_ratio": lat[0]["compression_ratio"],
            "ae_train_config": lat[0]["ae_train_config"],
            "ae_final_mse": spread([n["ae_final_mse"] for L in lat for n in L["nodes"]]),
        }
    return summary


def _enc_label(spec: str) -> str:
    """``topk:0.0123+int8`` -> ``topk+int8`` (the fraction is the x value)."""
    if spec.startswith("topk:"):
        return "topk+" + spec.split("+", 1)[1]
    return spec


def fmt(s: dict[str, Any], pct: bool = False, digits: int = 3) -> str:
    if pct:
        return f"{100 * s['mean']:.{digits - 2}f} ± {100 * s['std']:.{digits - 2}f}"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def table(summary: dict[str, Any]) -> str:
    lines = [
        "| trainable | encoding | seeds | trained / model | sent / model | bytes per node "
        "| of which index | accuracy, delta as sent (pooled) | min–max | / baseline "
        "| node's model as trained | / baseline |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["finetune"]:
        acc, loc = r["accuracy"], r["local_accuracy"]
        ratio, lratio = r.get("ratio_to_baseline"), r.get("local_ratio_to_baseline")
        enc = r["encoding"] + (f" (k = {r['topk_k']})" if r["topk_k"] else "")
        lines.append(
            f"| {r['trainable']} | {enc} | {acc['n']} "
            f"| {100 * r['trained_fraction']['mean']:.3g} % "
            f"| {100 * r['params_fraction']['mean']:.3g} % "
            f"| {r['bytes_per_node']['mean']:,.0f} | {r['index_bytes_per_node']['mean']:,.0f} "
            f"| {fmt(acc)} | {acc['min']:.3f}–{acc['max']:.3f} "
            f"| {fmt(ratio) if ratio else '-'} | {fmt(loc)} | {fmt(lratio) if lratio else '-'} |"
        )
    if "latent" in summary:
        L = summary["latent"]
        lines.append(
            f"| latent path (AE, ratio {L['compression_ratio']:g}) | float32 latents "
            f"| {L['accuracy']['n']} | - "
            f"| {100 * L['numbers_fraction']['mean']:.3g} % (numbers) "
            f"| {L['bytes_per_node']['mean']:,.0f} | 0 | {fmt(L['accuracy'])} "
            f"| {L['accuracy']['min']:.3f}–{L['accuracy']['max']:.3f} "
            f"| {fmt(L['ratio_to_baseline'])} | - | - |"
        )
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> None:
    """Two panels: accuracy vs parameters sent (%) and vs bytes sent per node, log x."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    base = summary["base_accuracy"]["mean"]
    bl = summary["baseline_accuracy"]["mean"]
    cft = summary.get("central_finetune_accuracy", {}).get("mean")
    fig, axes = plt.subplots(1, 2, figsize=(14, 7.6), sharey=True)
    series: dict[str, list[dict[str, Any]]] = {}
    seeds = summary["baseline_accuracy"]["n"]
    for r in summary["finetune"]:
        if r["encoding_family"] == "topk+fp16":
            continue  # in the table; on the plot it would sit on top of topk+int8
        if r["sparse"]:
            key = f"{r['encoding_family']} of the {r['trainable']} delta (sparse fine-tuning)"
        else:
            key = f"{r['encoding']}, dense delta of each subset"
        series.setdefault(key, []).append(r)
    styles = {
        "fp32": ("C0", "o", "none", 10),
        "fp16": ("C1", "s", "none", 7),
        "int8": ("C2", "^", "-", 6),
        "head": ("C3", "v", "-.", 6),
        "bn": ("C4", "D", "-.", 6),
        "last-block": ("C5", "P", "-.", 7),
        "all": ("C6", "X", "-.", 7),
    }
    for key, rows in series.items():
        first = key.split(",")[0]
        sub = key.split(" of the ")[-1].split(" delta")[0]
        color, marker, ls, ms = styles[first] if first in styles else styles[sub]
        sparse = first not in styles
        for ax, xkey in zip(axes, ("params_fraction", "bytes_per_node"), strict=True):
            rr = sorted(rows, key=lambda r: r[xkey]["mean"])
            scale = 100 if xkey == "params_fraction" else 1
            x = [r[xkey]["mean"] * scale for r in rr]
            y = [r["accuracy"]["mean"] for r in rr]
            e = [r["accuracy"]["std"] for r in rr]
            ax.errorbar(
                x,
                y,
                yerr=e,
                color=color,
                marker=marker,
                ls=ls,
                capsize=3,
                ms=ms,
                mfc="none" if first in ("fp32", "fp16") else color,
                label=key + (", delta as sent" if sparse else ""),
                alpha=0.9,
            )
            if sparse and xkey == "params_fraction":
                # the node's own model: the k sparse-trained entries, before encoding
                xt = [r["trained_fraction"]["mean"] * 100 for r in rr]
                yt = [r["local_accuracy"]["mean"] for r in rr]
                ax.plot(
                    xt,
                    yt,
                    color=color,
                    marker=marker,
                    ls="none",
                    ms=ms + 3,
                    mfc="none",
                    label=f"{key.split(' (')[0]}: node's model as trained (k entries)",
                )
            for r, xi, yi in zip(rr, x, y, strict=True):
                n = r["accuracy"]["n"]
                if first == "int8" and xkey == "params_fraction":
                    ax.annotate(
                        r["trainable"] + (f" ({n} of {seeds} seeds)" if n < seeds else ""),
                        (xi, yi),
                        textcoords="offset points",
                        xytext=(-8, 9),
                        fontsize=8,
                    )
                elif n < seeds and xkey == "params_fraction":
                    ax.annotate(
                        f"{r['encoding_family']}: {n} of {seeds} seeds",
                        (xi, yi),
                        textcoords="offset points",
                        xytext=(-8, -14),
                        fontsize=7,
                        color=color,
                    )
    for ax in axes:
        ax.axhline(
            bl, color="k", lw=1.3, label=f"baseline: scratch, central, all nodes' images ({bl:.3f})"
        )
        ax.axhline(0.95 * bl, color="k", lw=0.8, ls=":", label="0.95 × baseline")
        ax.axhline(base, color="gray", lw=1.3, ls="--", label=f"base, no fine-tuning ({base:.3f})")
        if cft is not None and not math.isnan(cft):
            ax.axhline(
                cft,
                color="brown",
                lw=1,
                ls="--",
                label=f"base fine-tuned centrally, all parameters ({cft:.3f})",
            )
        ax.set_xscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].plot(
        [1.0],
        [0.85 * bl],
        marker="*",
        ms=17,
        color="gold",
        mec="k",
        ls="none",
        label="Yang et al. 2021 claim: 85 % of baseline at ~1 % (ImageNet), "
        "drawn at 0.85 × our baseline",
    )
    if "latent" in summary:
        L = summary["latent"]
        for ax, x in zip(
            axes,
            (100 * L["numbers_fraction"]["mean"], L["bytes_per_node"]["mean"]),
            strict=True,
        ):
            ax.errorbar(
                [x],
                [L["accuracy"]["mean"]],
                yerr=[L["accuracy"]["std"]],
                marker="*",
                ms=15,
                color="m",
                ls="none",
                capsize=3,
                label=f"latent path: AE ratio {L['compression_ratio']:g}, float32 latents + "
                "labels (left: numbers / parameters)",
            )
    axes[0].set_xlabel("numbers sent (or trained, hollow) / model parameters (%), log scale")
    axes[1].set_xlabel("bytes sent per node (values, index bytes, int8 scales), log scale")
    axes[0].set_ylabel("test accuracy, pooled over the 3 nodes' test shards")
    sec = axes[1].secondary_yaxis("right", functions=(lambda a: a / bl, lambda r: r * bl))
    sec.set_ylabel("accuracy / baseline accuracy")
    handles: dict[str, Any] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    fig.legend(
        list(handles.values()), list(handles), loc="lower center", ncol=2, fontsize=8, frameon=False
    )
    n = summary["baseline_accuracy"]["n"]
    fig.suptitle(
        "CIFAR-10 (JPEG q75), resnet20 pre-trained on classes 0-7, fine-tuned by 3 "
        "non-IID nodes on all 10 classes\n(edge.transfer.fine_tune_delta; top-k = sparse "
        f"fine-tuning); mean ± std over {n} seeds",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.24, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def lib_hashes() -> dict[str, str]:
    return {f: hashlib.sha256((ROOT / f).read_bytes()).hexdigest()[:16] for f in LIB_FILES}


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared/data/cifar10_jpeg")
    p.add_argument("--out", type=Path, default=Path("runs/transfer_cifar"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--quick", action="store_true", help="tiny CPU smoke test")
    p.add_argument("--tune", action="store_true")
    p.add_argument("--tune-pretrain-lrs", default="3e-3,1e-2,3e-2,5e-2")
    p.add_argument("--tune-ft-lrs", default="3e-4,1e-3,3e-3,1e-2,3e-2")
    p.add_argument("--gpu-workers", type=int, default=6)
    p.add_argument("--cpu-workers", type=int, default=5)
    p.add_argument("--gpu-threads", type=int, default=1)
    p.add_argument("--ae-threads", type=int, default=1)
    p.add_argument("--ae-max-steps", type=int, default=0, help="0: edge.trainer's default")
    p.add_argument("--pretrain-epochs", type=int, default=DEFAULTS["pretrain_epochs"])
    p.add_argument("--pretrain-lr", type=float, default=DEFAULTS["pretrain_lr"])
    p.add_argument("--ft-epochs", type=int, default=DEFAULTS["ft_epochs"])
    p.add_argument("--ft-lr", default="", help="TRAINABLE=LR,... overrides")
    p.add_argument("--max-tier", type=int, default=99, help="grid tiers to run (see GRID)")
    p.add_argument(
        "--budget-s",
        type=float,
        default=0.0,
        help="seconds from the start after which no job is started that would end later "
        "(by EST_SECONDS; 0 = no limit)",
    )
    p.add_argument(
        "--plot",
        type=Path,
        help="results JSON: re-aggregate its raw part, re-plot, print the table",
    )
    p.add_argument("--from-seeds", type=Path, help="out folder of an interrupted run: assemble")
    p.add_argument("--plot-out", type=Path, default=Path("docs/img/transfer_cifar.png"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    if args.from_seeds:
        meta = json.loads((args.from_seeds / "run.json").read_text())
        per_seed = [
            json.loads((args.from_seeds / f"seed{s}.json").read_text())
            for s in meta["seeds"]
            if (args.from_seeds / f"seed{s}.json").exists()
        ]
        doc = assemble(
            {"per_seed": per_seed, "failures": ["assembled from seed files"]}, meta, float("nan")
        )
        (args.from_seeds / "transfer_cifar.json").write_text(json.dumps(doc, indent=1))
        sys.stdout.write(table(doc["summary"]) + "\n")
        return 0
    if args.plot:
        doc = json.loads(args.plot.read_text())
        doc["summary"] = aggregate(doc["raw"])  # re-derived, so table and plot match the raw data
        args.plot.write_text(json.dumps(doc, indent=1))
        plot(doc["summary"], args.plot_out)
        sys.stdout.write(table(doc["summary"]) + "\n")
        return 0

    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="transfer_cifar_"))
    cache = work / "cifar.npz"
    data_info = prepare_data(args.data_dir, cache, args.quick)
    ft_lr = dict(DEFAULTS["ft_lr"])
    for item in filter(None, args.ft_lr.split(",")):
        k, v = item.split("=")
        ft_lr[k] = float(v)
    cfg: dict[str, Any] = {
        **DEFAULTS,
        "pretrain_epochs": args.pretrain_epochs,
        "pretrain_lr": args.pretrain_lr,
        "ft_epochs": args.ft_epochs,
        "ft_lr": ft_lr,
        "device": args.device,
        "cache": str(cache),
        "work": str(work),
        "ae_threads": args.ae_threads,
        "ae_max_steps": args.ae_max_steps,
    }
    if args.quick:
        cfg.update(pretrain_epochs=1, ft_epochs=1, ae_max_steps=args.ae_max_steps or 5)
    import torch  # noqa: PLC0415

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpus": os.cpu_count(),
        "lib_sha256_16": lib_hashes(),
        "argv": sys.argv,
    }
    logger.info("env %s", env)
    deadline = started + args.budget_s if args.budget_s > 0 else math.inf
    runner = Runner(args.gpu_workers, args.cpu_workers, args.gpu_threads, args.ae_threads, deadline)
    if args.tune:
        res = run_tune(
            cfg,
            runner,
            args.out,
            [float(v) for v in args.tune_pretrain_lrs.split(",")],
            [float(v) for v in args.tune_ft_lrs.split(",")],
        )
        res.update(
            env=env, config=_jsonable(cfg), data=data_info, seconds=time.perf_counter() - started
        )
        (args.out / "tune.json").write_text(json.dumps(_jsonable(res), indent=1))
        for r in sorted(res["pretrain"], key=lambda r: r["lr"]):
            sys.stdout.write(
                f"pretrain lr {r['lr']:g}: val {r['val_accuracy']:.4f} "
                f"({r['seconds']:.0f} s, {r['ms_per_step']:.1f} ms/step)\n"
            )
        for r in sorted(res["finetune"], key=lambda r: (r["trainable"], r["lr"])):
            sys.stdout.write(
                f"ft {r['trainable']:10s} lr {r['lr']:g}: val {r['val_accuracy']:.4f}"
                f" base {r['base_correct'] / r['test_samples']:.4f} "
                f"({r['seconds']:.0f} s, {r['ms_per_step']:.1f} ms/step)\n"
            )
        sys.stdout.write(
            f"chosen: pretrain {res.get('chosen_pretrain_lr')} ft "
            f"{res['chosen_ft_lr']}\nae {res['ae']}\nfailures {res['failures']}\n"
            f"total {res['seconds']:.0f} s\n"
        )
        return 0 if not res["failures"] else 1
    seeds = [int(s) for s in args.seeds.split(",")]
    meta = {
        "config": _jsonable(cfg),
        "grid": [list(g) for g in GRID],
        "max_tier": args.max_tier,
        "budget_s": args.budget_s,
        "fine_tuning": "edge.transfer.fine_tune_delta(base, x, y, FinetuneConfig(trainable, "
        "encoding, epochs=ft_epochs, learning_rate=ft_lr[trainable], batch_size=ft_batch, "
        "seed=100*seed+node, device, augment=hflip=(trainable != 'head'))): weight decay 0; "
        "top-k = sparse fine-tuning (dense run at ft_lr, the k = ceil(F x trainable parameter "
        "entries) entries that moved most re-trained alone from the base at "
        "edge.transfer.SPARSE_LEARNING_RATE 3e-2; the encoder sends exactly those entries)",
        "env": env,
        "data": data_info,
        "seeds": seeds,
    }
    (args.out / "run.json").write_text(json.dumps(meta, indent=1))
    raw = run_study(cfg, seeds, runner, args.out, args.max_tier)
    doc = assemble(raw, meta, time.perf_counter() - started)
    (args.out / "transfer_cifar.json").write_text(json.dumps(doc, indent=1))
    plot(doc["summary"], args.out / "transfer_cifar.png")
    summary = doc["summary"]
    sys.stdout.write(table(summary) + "\n")
    sys.stdout.write(
        f"base {fmt(summary['base_accuracy'])}  baseline {fmt(summary['baseline_accuracy'])}  "
        f"central-ft {fmt(summary['central_finetune_accuracy'])}  "
        f"failures {raw['failures']}  not started {raw['not_started']}  "
        f"total {doc['seconds']:.0f} s\n"
    )
    return 0 if not raw["failures"] else 1


def assemble(raw: dict[str, Any], meta: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The results document: design, settings, environment, summary and raw per-seed data."""
    summary = aggregate(raw)
    return {
        "study": "CIFAR-10 transfer learning (issue 7)",
        "design": {
            "source": f"classes {list(SOURCE_CLASSES)}, train images "
            f"{SOURCE_IMAGES[0]:04d}-{SOURCE_IMAGES[1] - 1:04d} of each",
            "target": f"all {NUM_CLASSES} classes, train images "
            f"{TARGET_IMAGES[0]:04d}-{TARGET_IMAGES[1] - 1:04d} of each, "
            f"{NODES} nodes, shard skew {SKEW}, shard seed = run seed",
            "test": "each node's shard of the CIFAR-10 test split (same shard call), pooled",
            "network": "resnet20",
            "latent_dim": LATENT_DIM,
            "compression_ratio": COMPRESSION_RATIO,
        },
        **meta,
        "summary": summary,
        "raw": _jsonable(raw),
        "seconds": seconds,
    }


if __name__ == "__main__":
    sys.exit(main())
