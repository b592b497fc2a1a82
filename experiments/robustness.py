"""Robustness studies of issue 8: BN ablation, L1/TopK BN, learning rate, noise-aware training.

Every run trains a zoo network with ``server.train_cli.train_job`` (what ``latentedge train``
runs), exports it to ONNX and sweeps additive Gaussian weight noise with ``device_sim`` (the
same simulator as ``latentedge simulate``; SNR referenced per layer tensor: σ_n = σ_W /
sqrt(10^(SNR/10)), σ_W the std of that layer's weights), with BatchNorm folded into the
weights as a crossbar stores them (``--no-fold`` puts the noise on unfolded weights instead).
The figure of merit is the paper's *average normalised accuracy*: the mean over the SNR grid of
noisy / clean accuracy.

    python experiments/robustness.py --study bn --data CIFAR_DIR \
        --models resnet20,resnet44,vgg11,vgg16 --seeds 0 1 2 --epochs 60 --device cuda \
        --out docs/robustness_bn.json
    python experiments/robustness.py --study norm ...   # none / bn / l1 / topk
    python experiments/robustness.py --study lr --lrs 3e-4,1e-3,3e-3,1e-2,3e-2,1e-1 ...
    python experiments/robustness.py --study noise-aware --train-noise awgn:snr_db=10 ...
    python experiments/robustness.py --quick            # digits, one epoch: a smoke test on CPU

CIFAR_DIR is an image folder with train/ and test/ (unzip ../shared/data/cifar10_jpeg there).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from common.export import export_network
from device_sim import simulate_sweep
from server.train_cli import TrainJob, train_job

SNR_GRID = "awgn:snr_db=0,5,10,15,20,25,30"


def _variants(args: argparse.Namespace) -> list[dict[str, Any]]:
    models = args.models.split(",")
    if args.study == "bn":
        return [{"model": m, "norm": n} for m in models for n in ("none", "bn")]
    if args.study == "norm":
        return [{"model": m, "norm": n} for m in models for n in ("none", "bn", "l1", "topk")]
    if args.study == "lr":
        return [{"model": m, "lr": float(lr)} for m in models for lr in args.lrs.split(",")]
    return [{"model": m, "train_noise": t} for m in models for t in ("", args.train_noise)]


def run_one(args: argparse.Namespace, variant: dict[str, Any], seed: int) -> dict[str, Any]:
    job = TrainJob(
        data=args.data,
        model=variant["model"],
        norm=variant.get("norm", ""),
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=variant.get("lr", args.lr),
        weight_decay=args.weight_decay,
        augment=args.augment,
        train_noise=variant.get("train_noise", ""),
        seed=seed,
        device=args.device,
    )
    started = time.perf_counter()
    trained = train_job(job, what=f"{variant} seed {seed}")
    x, y = trained.data.x_test, trained.data.y_test
    if args.limit:
        x, y = x[: args.limit], y[: args.limit]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_network(trained.model, path, x[:32])
        sweep = simulate_sweep(
            path, x, y, args.sweep, args.draws, seed, fold_affine=not args.no_fold
        )
    clean = sweep.levels[0].clean_accuracy
    normalised = [level.accuracy_mean / clean if clean else 0.0 for level in sweep.levels]
    return {
        **variant,
        "seed": seed,
        "clean_accuracy": clean,
        "levels": list(sweep.values),
        "accuracy_mean": [level.accuracy_mean for level in sweep.levels],
        "normalised": normalised,
        "average_normalised_accuracy": float(np.mean(normalised)),
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study", choices=["bn", "norm", "lr", "noise-aware"], default="bn")
    parser.add_argument("--data", default="digits")
    parser.add_argument("--models", default="resnet20")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--lrs", default="3e-4,1e-3,3e-3,1e-2,3e-2,1e-1")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--augment", default="shift+flip")
    parser.add_argument("--train-noise", default="awgn:snr_db=10")
    parser.add_argument("--sweep", default=SNR_GRID)
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--limit", type=int, default=0, help="test samples (0 = all)")
    parser.add_argument("--no-fold", action="store_true", help="noise on unfolded BN weights")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="digits, resnet8, 1 epoch, 1 seed")
    parser.add_argument("--out", type=Path, default=Path("robustness.json"))
    args = parser.parse_args()
    if args.quick:
        args.data, args.models, args.seeds, args.epochs = "digits", "resnet8", [0], 1
        args.augment, args.draws, args.lrs = "shift", 2, "1e-3,1e-2"
    runs = []
    for variant in _variants(args):
        for seed in args.seeds:
            run = run_one(args, variant, seed)
            runs.append(run)
            print(
                f"{json.dumps(variant)} seed {seed}: clean {run['clean_accuracy']:.4f}, average "
                f"normalised {run['average_normalised_accuracy']:.4f} ({run['seconds']:.0f} s)",
                flush=True,
            )
    table = []
    for variant in _variants(args):
        mine = [r for r in runs if all(r[k] == v for k, v in variant.items())]
        avg = [r["average_normalised_accuracy"] for r in mine]
        clean = [r["clean_accuracy"] for r in mine]
        table.append(
            {
                **variant,
                "clean_mean": statistics.mean(clean),
                "average_normalised_mean": statistics.mean(avg),
                "average_normalised_min": min(avg),
                "average_normalised_max": max(avg),
            }
        )
        print(
            f"{json.dumps(variant):50s} clean {statistics.mean(clean):.4f}  avg normalised "
            f"{statistics.mean(avg):.4f} [{min(avg):.4f}, {max(avg):.4f}]"
        )
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    doc = {"study": args.study, "settings": settings, "table": table, "runs": runs}
    args.out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
