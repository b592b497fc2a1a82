"""The privacy-preserving split-learning experiment on full MNIST (Fagbohungbe et al. 2020).

3 non-IID edge nodes (``shard(..., skew)``) each train their own convolutional autoencoder
on their 20k training images without labels and upload latents; the server trains the
latent classifier (DEFAULT_MODE, also the other mode); each node's test shard is classified
through it. The baseline is the same MLP family trained centrally on all 60k raw pixels, in the
same run. Latent sizes 98, 49, 24, 12 give compression ratios 8, 16, 32.7, 65.3 (784 inputs).

    .venv/bin/python bench/split_mnist_paper.py [--repeats 1] [--ae-epochs 10] [--out-dir DIR]

Prints a markdown table (median over repeats) and writes ``DIR/split_mnist.png`` + ``.json``.
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
import torch

from common.datasets import Dataset, load_dataset, shard
from common.models import AutoencoderConfig, ClassifierConfig, compression_ratio
from edge.trainer import TrainConfig, encode, reconstruct, train_autoencoder
from server.classifier import ClassifierMode, train_baseline, train_classifier

logger = logging.getLogger("split_mnist_paper")

MNIST = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist" / "mnist.npz")


def run_ratio(
    ds: Dataset,
    latent_dim: int,
    nodes: int,
    skew: float,
    train_config: TrainConfig,
    classifier_config: ClassifierConfig,
    seed: int,
) -> dict[str, Any]:
    c, h, w = ds.input_shape
    ae_config = AutoencoderConfig(c, h, w, latent_dim)
    train: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    test: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    ae_seconds = []
    mse = []
    for k in range(nodes):
        part = shard(ds, k, nodes, skew=skew, seed=seed)
        started = time.perf_counter()
        model = train_autoencoder(
            part.x_train,
            ae_config,
            TrainConfig(**{**train_config.__dict__, "seed": seed * 1000 + k}),
            on_epoch=lambda epoch, loss, k=k: logger.info(
                "latent %d node %d epoch %d: mse %.5f", latent_dim, k, epoch, loss
            ),
        )
        ae_seconds.append(time.perf_counter() - started)
        mse.append(float(np.mean((reconstruct(model, part.x_test) - part.x_test) ** 2)))
        train[f"node-{k}"] = (encode(model, part.x_train), part.y_train)
        test[f"node-{k}"] = (encode(model, part.x_test), part.y_test)
    result: dict[str, Any] = {
        "latent_dim": latent_dim,
        "compression_ratio": compression_ratio(ae_config),
        "ae_seconds": ae_seconds,
        "test_mse": mse,
    }
    for mode in ClassifierMode:
        started = time.perf_counter()
        clf = train_classifier(train, ds.num_classes, mode, classifier_config, seed=seed)
        correct = sum(int(np.sum(clf.predict(n, z)[0] == y)) for n, (z, y) in test.items())
        total = sum(len(y) for _, y in test.values())
        result[mode.value] = {
            "accuracy": correct / total,
            "train_seconds": time.perf_counter() - started,
        }
        logger.info("latent %d %s: accuracy %.4f", latent_dim, mode.value, correct / total)
    return result


def plot(rows: list[dict[str, Any]], baseline: float, path: Path) -> None:
    import matplotlib  # noqa: PLC0415 - only for the figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6, 4))
    ratios = [r["compression_ratio"] for r in rows]
    for mode in ClassifierMode:
        ax.plot(ratios, [r[mode.value] for r in rows], "o-", label=f"split learning ({mode.value})")
    ax.axhline(baseline, color="k", linestyle="--", label=f"raw-pixel baseline {baseline:.4f}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ratios, [f"{r:.0f}" for r in ratios])
    ax.set_xlabel("compression ratio (input elements / latent elements)")
    ax.set_ylabel("end-to-end test accuracy")
    ax.set_title("MNIST, 3 non-IID nodes, per-node autoencoders")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=MNIST)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--skew", type=float, default=0.5)
    parser.add_argument("--latent-dims", type=int, nargs="+", default=[98, 49, 24, 12])
    parser.add_argument("--ae-epochs", type=int, default=10)
    parser.add_argument("--clf-epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1, help="seeds 0..R-1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=Path("bench/out"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    ds = load_dataset(args.data)
    train_config = TrainConfig(
        epochs=args.ae_epochs, batch_size=args.batch_size, max_steps=0, num_threads=args.threads
    )
    classifier_config = ClassifierConfig(epochs=args.clf_epochs, batch_size=args.batch_size)
    started = time.perf_counter()
    baselines = []
    runs: list[dict[str, Any]] = []
    for seed in range(args.repeats):
        baselines.append(
            train_baseline(
                ds.x_train, ds.y_train, ds.x_test, ds.y_test, config=classifier_config, seed=seed
            )
        )
        for latent_dim in args.latent_dims:
            result = run_ratio(
                ds, latent_dim, args.nodes, args.skew, train_config, classifier_config, seed
            )
            runs.append({**result, "seed": seed})
    baseline = float(np.median(baselines))
    rows = []
    for latent_dim in args.latent_dims:
        sel = [r for r in runs if r["latent_dim"] == latent_dim]
        row: dict[str, Any] = {
            "latent_dim": latent_dim,
            "compression_ratio": sel[0]["compression_ratio"],
            "ae_seconds_per_node": float(np.median([np.median(r["ae_seconds"]) for r in sel])),
            "test_mse": float(np.median([np.mean(r["test_mse"]) for r in sel])),
        }
        for mode in ClassifierMode:
            row[mode.value] = float(np.median([r[mode.value]["accuracy"] for r in sel]))
        rows.append(row)
    lines = [
        f"MNIST {len(ds.y_train)} train / {len(ds.y_test)} test, {args.nodes} nodes, "
        f"skew {args.skew}, AE {args.ae_epochs} epochs, classifier {args.clf_epochs} epochs, "
        f"{args.repeats} repeat(s) (medians), {time.perf_counter() - started:.0f} s total",
        "",
        "| latent | compression ratio | per-node acc | shared acc | baseline (raw pixels) "
        "| per-node / baseline | AE test MSE | AE s/node |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['latent_dim']} | {row['compression_ratio']:.1f} | {row['per_node']:.4f} "
            f"| {row['shared']:.4f} | {baseline:.4f} | {row['per_node'] / baseline:.3f} "
            f"| {row['test_mse']:.4f} | {row['ae_seconds_per_node']:.0f} |"
        )
    sys.stdout.write("\n".join(lines) + "\n")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    plot(rows, baseline, args.out_dir / "split_mnist.png")
    (args.out_dir / "split_mnist.json").write_text(
        json.dumps({"baseline": baselines, "rows": rows, "runs": runs}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
