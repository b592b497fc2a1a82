"""Split learning on the digits, simulated in one process (no gRPC): the demo's pipeline.

Each of 3 non-IID nodes (``shard(..., skew=0.5)``) trains its own autoencoder on its training
shard without labels, encodes its train and test shards; the "server" trains a per-node or a
shared classifier on the training latents; every node's test shard is classified through it.
The raw-pixel baseline is the same MLP family trained centrally on all raw training pixels.

    .venv/bin/python experiments/split_digits.py [--latent-dims 16 8] [--repeats 1] [--out R.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from common.datasets import Dataset, load_dataset, shard
from common.models import AutoencoderConfig, ClassifierConfig, compression_ratio
from edge.trainer import TrainConfig, encode, train_autoencoder
from server.classifier import ClassifierMode, train_baseline, train_classifier

logger = logging.getLogger("split_digits")

NODES = 3
SKEW = 0.5


def run_split(
    ds: Dataset,
    latent_dim: int,
    train_config: TrainConfig,
    classifier_config: ClassifierConfig,
    seed: int,
) -> dict[str, Any]:
    """One pipeline run; returns accuracies of both classifier modes and timings."""
    c, h, w = ds.input_shape
    ae_config = AutoencoderConfig(c, h, w, latent_dim)
    train: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    test: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    ae_seconds = []
    for k in range(NODES):
        part = shard(ds, k, NODES, skew=SKEW, seed=seed)
        started = time.perf_counter()
        model = train_autoencoder(
            part.x_train, ae_config, TrainConfig(**{**train_config.__dict__, "seed": seed + k})
        )
        ae_seconds.append(time.perf_counter() - started)
        node = f"node-{k}"
        train[node] = (encode(model, part.x_train), part.y_train)
        test[node] = (encode(model, part.x_test), part.y_test)
    result: dict[str, Any] = {
        "latent_dim": latent_dim,
        "compression_ratio": compression_ratio(ae_config),
        "ae_seconds": ae_seconds,
    }
    for mode in ClassifierMode:
        started = time.perf_counter()
        clf = train_classifier(train, ds.num_classes, mode, classifier_config, seed=seed)
        seconds = time.perf_counter() - started
        correct = 0
        per_node = {}
        for node, (latents, labels) in test.items():
            predicted, _ = clf.predict(node, latents)
            per_node[node] = float(np.mean(predicted == labels))
            correct += int(np.sum(predicted == labels))
        total = sum(len(labels) for _, labels in test.values())
        result[mode.value] = {
            "accuracy": correct / total,
            "per_node": per_node,
            "train_seconds": seconds,
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--latent-dims", type=int, nargs="+", default=[16, 8])
    parser.add_argument("--repeats", type=int, default=1, help="seeds 0..R-1")
    parser.add_argument("--epochs", type=int, default=TrainConfig().epochs)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    ds = load_dataset(args.dataset)
    train_config = TrainConfig(epochs=args.epochs)
    classifier_config = ClassifierConfig()
    rows = []
    for seed in range(args.repeats):
        started = time.perf_counter()
        baseline = train_baseline(
            ds.x_train, ds.y_train, ds.x_test, ds.y_test, config=classifier_config, seed=seed
        )
        baseline_seconds = time.perf_counter() - started
        for latent_dim in args.latent_dims:
            result = run_split(ds, latent_dim, train_config, classifier_config, seed)
            result.update(seed=seed, baseline=baseline, baseline_seconds=baseline_seconds)
            rows.append(result)
    lines = [
        "| seed | latent | ratio | per-node acc | shared acc | baseline | AE s/node (max) "
        "| per-node clf s | shared clf s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['latent_dim']} | {r['compression_ratio']:.1f} "
            f"| {r['per_node']['accuracy']:.4f} | {r['shared']['accuracy']:.4f} "
            f"| {r['baseline']:.4f} | {max(r['ae_seconds']):.1f} "
            f"| {r['per_node']['train_seconds']:.1f} | {r['shared']['train_seconds']:.1f} |"
        )
    for latent_dim in args.latent_dims:
        sel = [r for r in rows if r["latent_dim"] == latent_dim]
        per_node = np.median([r["per_node"]["accuracy"] for r in sel])
        shared = np.median([r["shared"]["accuracy"] for r in sel])
        baseline = np.median([r["baseline"] for r in sel])
        lines.append(
            f"\nlatent {latent_dim}: median per-node {per_node:.4f}, "
            f"median shared {shared:.4f}, median baseline {baseline:.4f}"
        )
    sys.stdout.write("\n".join(lines) + "\n")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
