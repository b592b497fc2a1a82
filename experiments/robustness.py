"""Robustness studies of issue 8 on CIFAR-10: BN ablation, L1/TopK BN, learning rate, noise-aware.

Every run trains a zoo network with ``server.train_cli.train_job`` (what ``latentedge train``
runs) and then measures its accuracy under weight noise on the GPU. The noisy weights come from
``common.noise_aware.perturb`` — the torch transcription of ``device_sim``'s noise models that
``tests/unit/common/test_noise_aware.py`` checks against the numpy draws — so a level here is
the level ``latentedge simulate --noise`` applies; ``--check-onnx`` re-measures exported models
with ``device_sim`` itself on the CPU as a cross-check.

What is measured for each trained network (5 draws per point, the 10,000 test images):

* AWGN sweep 0-30 dB, four placements of the noise: BatchNorm folded into the preceding
  convolution (what a crossbar stores) with the SNR referenced per layer tensor
  (``σ_n = std(W_l) / sqrt(10^(SNR/10))``: the paper's and ``device_sim``'s ``awgn``), per output
  channel, or globally (one σ_W over all the network's weights); and the per-tensor reference on
  unfolded weights (noise before BN, as a digital simulation of the paper's kind may do);
* PCM (aihwkit's PCM-like model) at 0 s, 1 h, 1 day and 1 year, with and without global drift
  compensation, for the ResNet-20 runs of the noise-aware study.

    # on the device machine (12 training processes share the GPU; --budget-s stops new jobs)
    PYTHONPATH=. python3 experiments/robustness.py run --cifar-dir .cache/cifar --device cuda \\
        --workers 12 --budget-s 520 --runs-dir docs/robustness_runs
    # here: tables, plots and the markdown numbers from the run files
    .venv/bin/python experiments/robustness.py report --runs-dir docs/robustness_runs \\
        --out docs/robustness.json --plots docs/img
    .venv/bin/python experiments/robustness.py run --quick --device cpu   # smoke test (digits)

The run files make it resumable: a job whose file exists is not run again.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from common.noise_aware import perturb, training_spec
from common.norms import fold_into_conv
from server.train_cli import TrainJob, train_job

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments.transfer_cifar import prepare_data

SNR_DB = (0, 5, 10, 15, 20, 25, 30)
REFERENCES = ("tensor", "channel", "global", "unfolded")
PCM_TIMES_S = (0.0, 3600.0, 86400.0, 31536000.0)
MODELS = ("resnet20", "resnet44", "vgg11", "vgg16")
LRS = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
DEFAULT_LR = 1e-2
NO_NORM_LR = 2e-3
"""Networks without normalisation diverge at the BN networks' 1e-2; they train at 2e-3."""
AWARE_NOISES = ("awgn:snr_db=10", "pcm:t=86400,compensate=true")
"""Noise-aware variants: AWGN at 10 dB and the PCM model itself at one day."""
PCM_CLIP = 2.5
"""Weight clip of the PCM study (aihwkit's layer-Gaussian clip at 2.5 σ)."""
PCM_VARIANTS = (
    ("", 0.0),
    ("", PCM_CLIP),
    (AWARE_NOISES[1], 0.0),
    (AWARE_NOISES[1], PCM_CLIP),
    (AWARE_NOISES[1], 2.0),
    ("pcm:t=31536000,compensate=true", PCM_CLIP),
    ("pcm:t=31536000,compensate=true", 2.0),
    ("gaussian:std=0.038", PCM_CLIP),
    (AWARE_NOISES[0], 0.0),
)
"""``--pcm-study``: plain and PCM-aware training without and with the weight clip; PCM noise of
one year (stronger than the day it is measured at); Joshi et al.'s recipe (additive Gaussian
noise of 3.8 % of max|W| and a clip); AWGN-aware training (10 dB)."""

logger = logging.getLogger("robustness")


@dataclass(frozen=True)
class Job:
    """One training run and its noise measurements."""

    model: str
    norm: str
    lr: float
    train_noise: str
    seed: int
    studies: tuple[str, ...]
    weight_clip: float = 0.0
    """``latentedge train --weight-clip``: ±k·σ per tensor after every step (0 = off)."""

    @property
    def key(self) -> str:
        """File-name key of the run."""
        noise = self.train_noise.replace(":", "_").replace("=", "").replace(",", "_") or "plain"
        clip = f"-clip{self.weight_clip:g}" if self.weight_clip else ""
        return f"{self.model}-{self.norm}-lr{self.lr:g}-{noise}{clip}-s{self.seed}"


def jobs(seeds: list[int]) -> list[Job]:
    """Every run of the four studies, most important first (shared runs listed once)."""
    wanted: dict[tuple[str, str, float, str], set[str]] = {}

    def add(model: str, norm: str, lr: float, noise: str, study: str) -> None:
        wanted.setdefault((model, norm, lr, noise), set()).add(study)

    add("resnet20", "bn", DEFAULT_LR, "", "bn")
    add("resnet20", "none", NO_NORM_LR, "", "bn")
    for model in MODELS[:0:-1]:  # the long runs early, so they do not end the pool last
        add(model, "bn", DEFAULT_LR, "", "bn")
        add(model, "none", NO_NORM_LR, "", "bn")
    for noise in AWARE_NOISES:
        add("resnet20", "bn", DEFAULT_LR, "", "noise-aware")
        add("resnet20", "bn", DEFAULT_LR, noise, "noise-aware")
    for norm in ("none", "bn", "l1", "topk"):
        add("resnet20", norm, NO_NORM_LR if norm == "none" else DEFAULT_LR, "", "norm")
    for lr in LRS:
        add("resnet20", "bn", lr, "", "lr")
    return [
        Job(model, norm, lr, noise, seed, tuple(sorted(studies)))
        for (model, norm, lr, noise), studies in wanted.items()
        for seed in seeds
    ]


# --------------------------------------------------------------------------- data


def prepare_cifar(cifar_dir: Path, out: Path) -> Path:
    """Decode the CIFAR-10 JPEG zips once (as the transfer study does) into a uint8 ``.npz``.

    ``load_dataset`` reads it as it is (its extra ``train_numbers`` array is ignored).
    """
    if not out.exists():
        prepare_data(cifar_dir, out, quick=False)
    return out


# --------------------------------------------------------------------------- noise on the GPU


def folded(model: Any, sample: Any) -> Any:
    """A copy of ``model`` with every norm that directly follows a Conv2d folded into it."""
    net = copy.deepcopy(model).eval()
    produced: dict[int, tuple[Any, Any]] = {}
    pairs: list[tuple[Any, Any]] = []

    def conv_hook(mod: Any, _inp: Any, out: Any) -> None:
        produced[id(out)] = (mod, out)

    def norm_hook(mod: Any, inp: Any, _out: Any) -> None:
        hit = produced.get(id(inp[0]))
        if hit is not None and hit[1] is inp[0]:
            pairs.append((hit[0], mod))

    hooks = [
        m.register_forward_hook(conv_hook if isinstance(m, nn.Conv2d) else norm_hook)
        for m in net.modules()
        if isinstance(m, nn.Conv2d) or "Norm" in type(m).__name__
    ]
    with torch.no_grad():
        net(sample)
    for h in hooks:
        h.remove()
    parents = {
        id(child): (parent, name)
        for parent in net.modules()
        for name, child in parent.named_children()
    }
    for conv, norm in pairs:
        parent, name = parents[id(conv)]
        setattr(parent, name, fold_into_conv(conv, norm))
        parent, name = parents[id(norm)]
        setattr(parent, name, nn.Identity())
    return net


def _analog_weights(net: Any) -> list[Any]:
    return [m.weight for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _accuracy(net: Any, x: Any, y: Any) -> float:
    correct = 0
    with torch.no_grad():
        for start in range(0, len(y), 2500):
            scores = net(x[start : start + 2500])
            correct += int((scores.argmax(1) == y[start : start + 2500]).sum())
    return correct / len(y)


def noisy_accuracies(
    net: Any,
    x: Any,
    y: Any,
    how: str,
    level: str,
    draws: int,
    seed: int,
    after_draw: Callable[[], None] | None = None,
) -> list[float]:
    """Accuracy of ``draws`` noise draws on ``net``'s Conv/Linear weights.

    ``after_draw`` runs (without gradients) between a draw and its scoring (e.g. AdaBS).

    ``how`` is ``tensor`` (``device_sim``'s spec ``level`` via ``noise_aware.perturb``),
    ``channel`` or ``global`` (AWGN at ``level`` dB with σ_W per output channel / over all
    weights).
    """
    weights = _analog_weights(net)
    clean = [w.detach().clone() for w in weights]
    gen = torch.Generator(device=x.device).manual_seed(seed)
    spec = training_spec(level) if how == "tensor" else None
    global_std = torch.cat([c.flatten() for c in clean]).std(unbiased=False)
    out = []
    try:
        for _ in range(draws):
            with torch.no_grad():
                for w, c in zip(weights, clean, strict=True):
                    if spec is not None:
                        w.copy_(perturb(c, spec, gen))
                        continue
                    snr = 10.0 ** (float(level) / 10.0)
                    if how == "channel":
                        dims = tuple(range(1, c.ndim))
                        std = c.std(dim=dims, unbiased=False, keepdim=True)
                    else:
                        std = global_std
                    noise = torch.randn(c.shape, generator=gen, device=c.device, dtype=c.dtype)
                    w.copy_(c + std / math.sqrt(snr) * noise)
                if after_draw is not None:
                    after_draw()
            out.append(_accuracy(net, x, y))
    finally:
        with torch.no_grad():
            for w, c in zip(weights, clean, strict=True):
                w.copy_(c)
    return out


# --------------------------------------------------------------------------- one run


def run_job(job: Job, data: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Train ``job``'s network, then measure it under every noise placement."""
    torch.set_num_threads(settings["threads"])
    device = settings["device"]
    trained = train_job(
        TrainJob(
            data=data,
            model=job.model,
            norm=job.norm,
            epochs=settings["epochs"],
            batch_size=settings["batch_size"],
            learning_rate=job.lr,
            weight_decay=settings["weight_decay"],
            augment=settings["augment"],
            train_noise=job.train_noise,
            weight_clip=job.weight_clip,
            seed=job.seed,
            device=device,
            threads=settings["threads"],
        ),
        what=job.key,
    )
    started = time.perf_counter()
    limit = settings["limit"] or len(trained.data.y_test)
    x = torch.from_numpy(trained.data.x_test[:limit]).to(device)
    y = torch.from_numpy(trained.data.y_test[:limit]).to(device)
    plain = trained.model.to(device).eval()
    fold = folded(plain, x[:64])
    clean = _accuracy(plain, x, y)
    folded_clean = _accuracy(fold, x, y)
    draws = settings["draws"]
    eval_seed = 1000 + job.seed
    awgn: dict[str, dict[str, list[float]]] = {}
    refs = REFERENCES if "bn" in job.studies else ("tensor",)
    for ref in refs:
        if ref == "unfolded" and job.norm == "none":
            continue
        net = plain if ref == "unfolded" else fold
        how = "tensor" if ref == "unfolded" else ref
        awgn[ref] = {
            str(snr): noisy_accuracies(
                net,
                x,
                y,
                how,
                f"awgn:snr_db={snr}" if how == "tensor" else str(snr),
                draws,
                eval_seed + snr,
            )
            for snr in SNR_DB
        }
    pcm: dict[str, list[float]] = {}
    if "noise-aware" in job.studies:
        for t in PCM_TIMES_S:
            for comp in ("false", "true"):
                level = f"pcm:t={t:g},compensate={comp}"
                pcm[level] = noisy_accuracies(fold, x, y, "tensor", level, draws, eval_seed)
    return {
        "job": asdict(job),
        "key": job.key,
        "settings": settings,
        "clean_accuracy": clean,
        "folded_clean_accuracy": folded_clean,
        "train_accuracy_torch": trained.test_accuracy,
        "final_loss": trained.result.final_loss,
        "train_seconds": trained.seconds,
        "eval_seconds": time.perf_counter() - started,
        "test_samples": int(limit),
        "awgn": awgn,
        "pcm": pcm,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
    }


def _worker(task: tuple[Job, str, dict[str, Any], float, str]) -> tuple[str, str]:
    job, data, settings, deadline, runs_dir = task
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    if time.time() > deadline:
        return job.key, "skipped (budget)"
    started = time.perf_counter()
    try:
        result = run_job(job, data, settings)
    except Exception as exc:
        return job.key, f"FAILED: {type(exc).__name__}: {exc}"
    path = Path(runs_dir) / f"{job.key}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    return job.key, (
        f"clean {result['clean_accuracy']:.4f}, {time.perf_counter() - started:.0f} s "
        f"(train {result['train_seconds']:.0f} s)"
    )


def cmd_run(args: argparse.Namespace) -> None:
    runs_dir = Path(args.runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    if args.quick:
        data = "digits"
        settings = {"epochs": 1, "batch_size": 64, "weight_decay": 0.05, "augment": "shift"}
        todo = [
            Job("resnet8", norm, DEFAULT_LR, noise, 0, ("bn", "noise-aware"))
            for norm, noise in (("bn", ""), ("none", ""), ("l1", ""), ("bn", "pcm:t=86400"))
        ]
        args.draws, args.limit = 2, 200
    elif args.lr_sweep:  # the learning-rate study alone, on another model and dataset
        data = args.data
        settings = {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "weight_decay": args.weight_decay,
            "augment": "none",
        }
        todo = [Job(args.lr_sweep, "bn", lr, "", s, ("lr",)) for lr in LRS for s in args.seeds]
    else:
        data = str(prepare_cifar(Path(args.cifar_dir), Path(args.cache)))
        settings = {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "weight_decay": args.weight_decay,
            "augment": "shift+flip",
        }
        todo = (
            [
                Job("resnet20", "bn", DEFAULT_LR, noise, s, ("noise-aware",), clip)
                for noise, clip in PCM_VARIANTS
                for s in args.seeds
            ]
            if args.pcm_study
            else jobs(args.seeds)
        )
    settings.update(device=args.device, draws=args.draws, limit=args.limit, threads=args.threads)
    if args.only:
        todo = [j for j in todo if any(part in j.key for part in args.only.split(","))]
    todo = [j for j in todo if not (runs_dir / f"{j.key}.json").exists()]
    logger.info("%d runs to do, %d workers", len(todo), args.workers)
    deadline = time.time() + args.budget_s
    tasks = [(j, data, settings, deadline, str(runs_dir)) for j in todo]
    started = time.perf_counter()
    if args.workers <= 1:
        results = map(_worker, tasks)
        for key, what in results:
            logger.info("[%4.0f s] %s: %s", time.perf_counter() - started, key, what)
        return
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(args.workers, maxtasksperchild=1) as pool:
        for key, what in pool.imap_unordered(_worker, tasks):
            logger.info("[%4.0f s] %s: %s", time.perf_counter() - started, key, what)


# --------------------------------------------------------------------------- report


def _average_normalised(run: dict[str, Any], ref: str) -> float:
    clean = run["folded_clean_accuracy"] if ref != "unfolded" else run["clean_accuracy"]
    curve = run["awgn"][ref]
    return float(np.mean([statistics.mean(curve[str(s)]) / clean for s in SNR_DB]))


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.mean(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def cmd_report(args: argparse.Namespace) -> None:
    runs = [json.loads(p.read_text()) for p in sorted(Path(args.runs_dir).glob("*.json"))]
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        j = run["job"]
        clip = j.get("weight_clip", 0.0)
        name = f"{j['model']}|{j['norm']}|{j['lr']:g}|{j['train_noise']}|{clip:g}"
        groups.setdefault(name, []).append(run)
    table = []
    for name, members in sorted(groups.items()):
        model, norm, lr, noise, clip = name.split("|")
        row: dict[str, Any] = {
            "model": model,
            "norm": norm,
            "lr": float(lr),
            "train_noise": noise,
            "weight_clip": float(clip),
            "studies": sorted({s for r in members for s in r["job"]["studies"]}),
            "seeds": sorted(r["job"]["seed"] for r in members),
            "clean": _spread([r["clean_accuracy"] for r in members]),
            "train_seconds": _spread([r["train_seconds"] for r in members]),
        }
        for ref in REFERENCES:
            if all(ref in r["awgn"] for r in members):
                row[f"avg_norm_{ref}"] = _spread([_average_normalised(r, ref) for r in members])
                row[f"curve_{ref}"] = {
                    str(s): statistics.mean(
                        statistics.mean(r["awgn"][ref][str(s)])
                        / (r["clean_accuracy"] if ref == "unfolded" else r["folded_clean_accuracy"])
                        for r in members
                    )
                    for s in SNR_DB
                }
        if all(r["pcm"] for r in members):
            row["pcm"] = {
                level: {
                    "accuracy": _spread([statistics.mean(r["pcm"][level]) for r in members]),
                    "normalised": _spread(
                        [
                            statistics.mean(r["pcm"][level]) / r["folded_clean_accuracy"]
                            for r in members
                        ]
                    ),
                }
                for level in members[0]["pcm"]
            }
        table.append(row)
    doc = {
        "runs": len(runs),
        "settings": runs[0]["settings"] if runs else {},
        "device": runs[0]["device"] if runs else "",
        "table": table,
    }
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    for row in table:
        text = ", ".join(
            f"{ref} {row[f'avg_norm_{ref}']['mean']:.4f} [{row[f'avg_norm_{ref}']['min']:.4f}, "
            f"{row[f'avg_norm_{ref}']['max']:.4f}]"
            for ref in REFERENCES
            if f"avg_norm_{ref}" in row
        )
        sys.stdout.write(
            f"{row['model']:9s} {row['norm']:5s} lr {row['lr']:<7g} "
            f"{_training(row):36s}"
            f" n={len(row['seeds'])} clean {row['clean']['mean']:.4f} "
            f"[{row['clean']['min']:.4f}, {row['clean']['max']:.4f}]  avg normalised: {text}\n"
        )
        for level, v in row.get("pcm", {}).items():
            sys.stdout.write(
                f"    {level:34s} accuracy {v['accuracy']['mean']:.4f} normalised "
                f"{v['normalised']['mean']:.4f} [{v['normalised']['min']:.4f}, "
                f"{v['normalised']['max']:.4f}]\n"
            )
    if args.plots:
        _plots(table, Path(args.plots))
    sys.stdout.write(f"wrote {args.out}\n")


def _training(row: dict[str, Any]) -> str:
    clip = f" clip {row['weight_clip']:g}σ" if row.get("weight_clip") else ""
    return (row["train_noise"] or "plain") + clip


def _plots(table: list[dict[str, Any]], out_dir: Path) -> None:
    import matplotlib  # noqa: PLC0415 - only the report needs it (the GPU machine may lack it)

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # noqa: PLC0415

    out_dir.mkdir(parents=True, exist_ok=True)
    studies = {s for row in table for s in row["studies"]}
    if "bn" in studies:
        _plot_bn(plt, table, out_dir)
    if studies & {"norm", "lr"}:
        _plot_norm_lr(plt, table, out_dir)
    if any("pcm" in row for row in table):
        _plot_pcm(plt, table, out_dir)


def _plot_bn(plt: Any, table: list[dict[str, Any]], out_dir: Path) -> None:
    fig, axes = plt.subplots(1, 4, figsize=(18, 4), sharey=True)
    for ax, model in zip(axes, MODELS, strict=True):
        for row in table:
            if row["model"] != model or row["train_noise"] or "bn" not in row["studies"]:
                continue
            if row["lr"] not in (DEFAULT_LR, NO_NORM_LR):
                continue
            for ref, style in (("tensor", "-"), ("unfolded", ":"), ("global", "--")):
                if f"curve_{ref}" in row:
                    curve = row[f"curve_{ref}"]
                    ax.plot(
                        SNR_DB,
                        [curve[str(s)] for s in SNR_DB],
                        style,
                        marker="o",
                        label=f"{row['norm']} ({ref})",
                    )
        ax.set_title(model)
        ax.set_xlabel("SNR (dB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("normalised accuracy")
    fig.tight_layout()
    fig.savefig(out_dir / "robustness_bn.png", dpi=110)
    plt.close(fig)


def _plot_norm_lr(plt: Any, table: list[dict[str, Any]], out_dir: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for row in table:
        if row["model"] == "resnet20" and "norm" in row["studies"] and "curve_tensor" in row:
            curve = row["curve_tensor"]
            axes[0].plot(SNR_DB, [curve[str(s)] for s in SNR_DB], marker="o", label=row["norm"])
    axes[0].set_title("ResNet-20: normalisation layer (BN folded, per-tensor SNR)")
    axes[0].set_xlabel("SNR (dB)")
    axes[0].set_ylabel("normalised accuracy")
    axes[0].legend()
    axes[0].grid(alpha=0.3)
    for model, marker in (("resnet20", "o"), ("lenet", "^")):
        lr_rows = sorted(
            (r for r in table if "lr" in r["studies"] and r["model"] == model),
            key=lambda r: r["lr"],
        )
        if not lr_rows:
            continue
        lrs = [r["lr"] for r in lr_rows]
        axes[1].errorbar(
            lrs,
            [r["clean"]["mean"] for r in lr_rows],
            yerr=[
                [r["clean"]["mean"] - r["clean"]["min"] for r in lr_rows],
                [r["clean"]["max"] - r["clean"]["mean"] for r in lr_rows],
            ],
            marker=marker,
            label=f"{model}: clean accuracy",
        )
        axes[1].errorbar(
            lrs,
            [r["avg_norm_tensor"]["mean"] for r in lr_rows],
            yerr=[
                [r["avg_norm_tensor"]["mean"] - r["avg_norm_tensor"]["min"] for r in lr_rows],
                [r["avg_norm_tensor"]["max"] - r["avg_norm_tensor"]["mean"] for r in lr_rows],
            ],
            marker=marker,
            linestyle="--",
            label=f"{model}: average normalised accuracy",
        )
        axes[1].set_xscale("log")
        axes[1].set_xlabel("peak learning rate (AdamW, one-cycle)")
        axes[1].set_title("learning rate (BN networks)")
        axes[1].legend()
        axes[1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "robustness_norm_lr.png", dpi=110)
    plt.close(fig)


def _plot_pcm(plt: Any, table: list[dict[str, Any]], out_dir: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, comp in zip(axes, ("false", "true"), strict=True):
        for row in table:
            if "pcm" not in row:
                continue
            ys = [
                row["pcm"][f"pcm:t={t:g},compensate={comp}"]["accuracy"]["mean"]
                for t in PCM_TIMES_S
            ]
            ax.plot(range(len(PCM_TIMES_S)), ys, marker="o", label=_training(row))
        ax.set_xticks(range(len(PCM_TIMES_S)), ["0 s", "1 h", "1 day", "1 year"])
        ax.set_title(f"ResNet-20 on PCM, drift compensation {'on' if comp == 'true' else 'off'}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("test accuracy")
    fig.tight_layout()
    fig.savefig(out_dir / "robustness_pcm.png", dpi=110)
    plt.close(fig)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="train and measure (resumable)")
    run.add_argument("--cifar-dir", default=".cache/cifar")
    run.add_argument("--cache", default="/tmp/cifar10_robustness.npz")
    run.add_argument("--runs-dir", default="docs/robustness_runs")
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    run.add_argument("--epochs", type=int, default=30)
    run.add_argument("--batch-size", type=int, default=512)
    run.add_argument("--weight-decay", type=float, default=0.05)
    run.add_argument("--draws", type=int, default=5)
    run.add_argument("--limit", type=int, default=0, help="test samples (0 = all)")
    run.add_argument("--device", default="cuda")
    run.add_argument("--threads", type=int, default=1)
    run.add_argument("--workers", type=int, default=12)
    run.add_argument("--budget-s", type=float, default=1e9, help="no job starts after this")
    run.add_argument("--only", default="", help="comma-separated key substrings")
    run.add_argument("--quick", action="store_true", help="digits, resnet8, 1 epoch")
    run.add_argument("--lr-sweep", default="", help="only the LR study, on this zoo model")
    run.add_argument("--data", default="digits", help="dataset of --lr-sweep")
    run.add_argument(
        "--pcm-study", action="store_true", help="only ResNet-20 plain/PCM-aware x weight clip"
    )
    report = sub.add_parser("report", help="tables and plots from the run files")
    report.add_argument("--runs-dir", default="docs/robustness_runs")
    report.add_argument("--out", default="docs/robustness.json")
    report.add_argument("--plots", default="")
    args = parser.parse_args()
    cmd_run(args) if args.cmd == "run" else cmd_report(args)


if __name__ == "__main__":
    main()
