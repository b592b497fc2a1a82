"""Analog in-memory training: Analog SGD vs Residual Learning on a 1-D quadratic and on MNIST.

(a) 1-D quadratic (``../shared/REFERENCES.md``, "Analog training with response functions"):
    f(w) = ½(w − 0.5)², gradient w − 0.5 + 0.1·ξ, soft-bounds device with τ = 1 and 1200 states.
    Analog SGD's fixed point beside the value its expected update predicts (solve
    E[g] + E[|g|]·w/τ = 0 with g ~ N(w − 0.5, 0.1²): 0.4604), Residual Learning (γ = 0.4) at 0.5;
    both update modes, several seeds (each seed: 100 independent replicas, one tensor),
    convergence curves. Also every device kind's Analog SGD fixed point (each kind's symmetric
    point pulls it), and the signs REFERENCES.md writes for Residual Learning taken literally.
(b) MNIST (../shared/data/mnist/mnist.npz, a subset, CPU): the zoo ``mlp`` and ``lenet`` by
    digital SGD, Analog SGD and Residual Learning on each device kind: test accuracy and the
    relative distance ‖W − W*‖/‖W*‖ of the Conv/Linear weights from the digital optimum W*: digital
    SGD from the same initialisation (same seed) run for 4× the epochs.

    python experiments/analog_training.py --out docs/analog_training.json --plots docs/img
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.analog_devices import AnalogArray, DeviceConfig, parse_device_spec
from common.analog_training import Algorithm, InMemoryConfig, analog_weights, train_in_memory
from common.finetune import accuracy
from common.zoo import ModelSpec, build_model

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist" / "mnist.npz"
OPTIMUM = 0.5
NOISE_STD = 0.1
REPLICAS = 100


def predicted_fixed_point(
    tau: float = 1.0, optimum: float = OPTIMUM, sigma: float = NOISE_STD
) -> float:
    """Root of E[g] + E[|g|]·w/τ = 0, g ~ N(w − optimum, σ²) (bisection, closed-form E|g|)."""

    def excess(w: float) -> float:
        mu = w - optimum
        mean_abs = sigma * math.sqrt(2 / math.pi) * math.exp(-(mu**2) / (2 * sigma**2)) + mu * (
            math.erf(mu / (sigma * math.sqrt(2)))
        )
        return mu + mean_abs * w / tau

    lo, hi = -tau, optimum
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if excess(mid) < 0 else (lo, mid)
    return (lo + hi) / 2


def quadratic_run(
    device: DeviceConfig,
    algorithm: str,
    seed: int,
    steps: int,
    lr: float = 0.05,
    gamma: float = 0.4,
    rate: float = 0.05,
) -> np.ndarray:
    """Mean over replicas of the model's weight after each step (``(steps,)``)."""
    rng = np.random.default_rng(seed)
    noise = torch.Generator().manual_seed(seed)
    start = torch.zeros(REPLICAS, dtype=torch.float64)
    slow = AnalogArray(device, start, rng)
    fast = AnalogArray(device, start, rng)
    zero = fast.symmetry_point()
    fast.w = zero.clone()
    curve = np.empty(steps)
    for t in range(steps):
        p = fast.w - zero
        weight = slow.w if algorithm == "analog-sgd" else slow.w + gamma * p
        grad = (
            weight
            - OPTIMUM
            + NOISE_STD * torch.randn(REPLICAS, generator=noise, dtype=torch.float64)
        )
        if algorithm == "analog-sgd":
            slow.update(-lr * grad)
        elif algorithm == "residual":  # P accumulates −g; W ← W + rate·P (the paper's signs)
            fast.update(-lr * grad)
            slow.update(rate * (fast.w - zero))
        else:  # "residual-as-written": P ← P + βg, W ← W − αP, W̄ = W + γP (REFERENCES.md)
            fast.update(lr * grad)
            slow.update(-rate * (fast.w - zero))
        final = slow.w if algorithm == "analog-sgd" else slow.w + gamma * (fast.w - zero)
        curve[t] = float(final.mean())
    return curve


def part_a(seeds: list[int], steps: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "predicted_analog_sgd": predicted_fixed_point(),
        "runs": {},
        "curves": {},
    }
    for mode in ("pulsed", "expected"):
        device = parse_device_spec(f"softbounds:states=1200,mode={mode}")
        for algorithm in ("analog-sgd", "residual"):
            tails = []
            for seed in seeds:
                curve = quadratic_run(device, algorithm, seed, steps)
                tails.append(float(np.mean(curve[steps // 2 :])))
                if seed == seeds[0]:
                    out["curves"][f"{algorithm} {mode}"] = curve.tolist()
            out["runs"][f"{algorithm} {mode}"] = _summary(tails)
    literal = quadratic_run(parse_device_spec("softbounds:mode=expected"), "as-written", 0, steps)
    tail = literal[steps // 2 :]
    out["residual_as_written"] = {
        "tail_mean": float(tail.mean()),
        "tail_std_over_time": float(tail.std()),
        "tail_min": float(tail.min()),
        "tail_max": float(tail.max()),
    }
    out["curves"]["residual as written expected"] = literal.tolist()
    sweep = {}
    for lr in (0.05, 0.025, 0.0125):  # residual bias against the fast array's step size
        n = int(steps * 0.05 / lr)
        device = parse_device_spec("softbounds:mode=expected")
        tails = [
            float(np.mean(quadratic_run(device, "residual", s, n, lr=lr, rate=lr)[n // 2 :]))
            for s in seeds[:3]
        ]
        sweep[str(lr)] = _summary(tails)
    out["residual_lr_sweep"] = sweep
    kinds: dict[str, Any] = {}
    for spec in ("softbounds", "linearstep", "expstep", "powstep", "linearstep:asym=0.2"):
        device = parse_device_spec(f"{spec}{':' if ':' not in spec else ','}mode=expected")
        sym = float(
            AnalogArray(
                device, torch.zeros(1, dtype=torch.float64), np.random.default_rng(0)
            ).symmetry_point()[0]
        )
        row = {"symmetry_point": sym}
        for algorithm in ("analog-sgd", "residual"):
            tails = [
                float(np.mean(quadratic_run(device, algorithm, s, steps)[steps // 2 :]))
                for s in seeds[:3]
            ]
            row[algorithm] = _summary(tails)
        kinds[spec] = row
    out["kinds"] = kinds
    return out


def aihwkit_run(algorithm: str, seed: int, steps: int, lr: float = 0.05) -> np.ndarray:
    """The same 1-D problem on aihwkit's pulsed SoftBounds device / TransferCompound (γ = 0.4).

    One analog tile of 100 rows and 1 column (the replicas), input 1, ``tile.update(x, g)``
    with aihwkit's default stochastic pulse trains (BL 31, update management). Residual:
    ``TransferCompound`` of two SoftBounds devices, effective weight γ·A + C, a transfer of the
    (one) column every step at rate 0.05, read without IO noise.
    """
    from aihwkit.simulator.configs import SingleRPUConfig, UnitCellRPUConfig  # noqa: PLC0415
    from aihwkit.simulator.configs.devices import (  # noqa: PLC0415
        SoftBoundsDevice,
        TransferCompound,
    )
    from aihwkit.simulator.parameters import IOParameters  # noqa: PLC0415
    from aihwkit.simulator.tiles import AnalogTile  # noqa: PLC0415

    def device() -> SoftBoundsDevice:
        zero = {
            k: 0.0
            for k in (
                "up_down",
                "dw_min_dtod",
                "dw_min_std",
                "w_max_dtod",
                "w_min_dtod",
                "up_down_dtod",
            )
        }
        return SoftBoundsDevice(dw_min=2 / 1200, w_max=1.0, w_min=-1.0, **zero)

    torch.manual_seed(seed)
    if algorithm == "analog-sgd":
        config: Any = SingleRPUConfig(device=device())
    else:
        config = UnitCellRPUConfig(
            device=TransferCompound(
                unit_cell_devices=[device(), device()],
                gamma=0.4,
                transfer_every=1.0,
                units_in_mbatch=False,
                n_reads_per_transfer=1,
                transfer_lr=0.05,
                scale_transfer_lr=False,
                transfer_forward=IOParameters(is_perfect=True),
            )
        )
    tile = AnalogTile(REPLICAS, 1, config)
    tile.set_learning_rate(lr)
    tile.set_weights(torch.zeros(REPLICAS, 1))
    x = torch.ones(1, 1)
    curve = np.empty(steps)
    for t in range(steps):
        w = tile.get_weights()[0][:, 0]
        tile.update(x, (w - OPTIMUM + NOISE_STD * torch.randn(REPLICAS))[None, :])
        curve[t] = float(tile.get_weights()[0][:, 0].mean())
    return curve


def part_c(seeds: list[int], steps: int, ours: dict[str, Any]) -> dict[str, Any]:
    """aihwkit against our pulsed soft-bounds runs (fixed points and curves)."""
    try:
        import aihwkit  # noqa: PLC0415
    except ImportError as exc:
        return {"available": False, "reason": str(exc)}
    out: dict[str, Any] = {
        "available": True,
        "version": aihwkit.__version__,
        "runs": {},
        "curves": {},
    }
    device = parse_device_spec("softbounds:states=1200")
    for algorithm in ("analog-sgd", "residual"):
        theirs, mine, rms = [], [], []
        for seed in seeds:
            a = aihwkit_run(algorithm, seed, steps)
            b = quadratic_run(device, algorithm, seed, steps)
            theirs.append(float(np.mean(a[steps // 2 :])))
            mine.append(float(np.mean(b[steps // 2 :])))
            rms.append(float(np.sqrt(np.mean((a[: steps // 4] - b[: steps // 4]) ** 2))))
            if seed == seeds[0]:
                out["curves"][f"aihwkit {algorithm}"] = a.tolist()
                out["curves"][f"latentedge {algorithm}"] = b.tolist()
        out["runs"][algorithm] = {
            "aihwkit": _summary(theirs),
            "latentedge": _summary(mine),
            "rms_curve_difference_first_quarter": statistics.fmean(rms),
        }
    out["predicted_analog_sgd"] = ours.get("predicted_analog_sgd", predicted_fixed_point())
    return out


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def _mnist(train: int, test: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    with np.load(MNIST) as d:
        x = (d["x_train"][:train, None] / 255.0).astype(np.float32)
        y = d["y_train"][:train].astype(np.int64)
        xt = (d["x_test"][:test, None] / 255.0).astype(np.float32)
        yt = d["y_test"][:test].astype(np.int64)
    return x, y, xt, yt


def _distance(model: torch.nn.Module, reference: list[torch.Tensor]) -> float:
    weights = analog_weights(model)
    num = sum(float((w.detach() - r).pow(2).sum()) for w, r in zip(weights, reference, strict=True))
    den = sum(float(r.pow(2).sum()) for r in reference)
    return math.sqrt(num / den)


def part_b(
    seeds: list[int],
    models: dict[str, tuple[int, int]],
    test: int,
    lr: float,
    specs: list[str],
    reference_factor: int = 4,
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, (train, epochs) in models.items():
        x, y, xt, yt = _mnist(train, test)
        spec = ModelSpec(name, 1, 28, 28, 10)
        rows: dict[str, list[dict[str, float]]] = {}
        for seed in seeds:
            # the digital optimum: digital SGD from the same start, `reference_factor`× the epochs
            optimum = build_model(spec, seed=seed)
            r = train_in_memory(
                optimum,
                x,
                y,
                InMemoryConfig(Algorithm.DIGITAL_SGD, lr),
                parse_device_spec("softbounds"),
                epochs=epochs * reference_factor,
                seed=seed,
            )
            reference = [w.detach().clone() for w in analog_weights(optimum)]
            rows.setdefault(f"digital optimum ({reference_factor}x epochs)", []).append(
                {"accuracy": accuracy(optimum, xt, yt), "distance": 0.0, "seconds": r.seconds}
            )
            digital = build_model(spec, seed=seed)
            r = train_in_memory(
                digital,
                x,
                y,
                InMemoryConfig(Algorithm.DIGITAL_SGD, lr),
                parse_device_spec("softbounds"),
                epochs=epochs,
                seed=seed,
            )
            rows.setdefault("digital-sgd", []).append(
                {
                    "accuracy": accuracy(digital, xt, yt),
                    "distance": _distance(digital, reference),
                    "seconds": r.seconds,
                }
            )
            for device_spec in specs:
                device = parse_device_spec(device_spec)
                for algorithm in (Algorithm.ANALOG_SGD, Algorithm.RESIDUAL):
                    model = build_model(spec, seed=seed)
                    r = train_in_memory(
                        model, x, y, InMemoryConfig(algorithm, lr), device, epochs=epochs, seed=seed
                    )
                    rows.setdefault(f"{algorithm} {device_spec}", []).append(
                        {
                            "accuracy": accuracy(model, xt, yt),
                            "distance": _distance(model, reference),
                            "seconds": r.seconds,
                        }
                    )
        results[name] = {
            "train_samples": train,
            "test_samples": test,
            "epochs": epochs,
            "reference_epochs": epochs * reference_factor,
            "rows": {
                key: {
                    "accuracy": _summary([v["accuracy"] for v in values]),
                    "distance": _summary([v["distance"] for v in values]),
                    "seconds": statistics.fmean(v["seconds"] for v in values),
                }
                for key, values in rows.items()
            },
        }
    return results


def plot(report: dict[str, Any], folder: Path) -> None:
    """Convergence curves (1-D) and MNIST accuracy bars, from a report (saved or fresh)."""
    import matplotlib  # noqa: PLC0415 - only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    steps = report["settings"].get("steps", 4000)
    a = report.get("quadratic")
    if a:
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
        for ax, mode in zip(axes[:2], ("pulsed", "expected"), strict=True):
            for algorithm, colour in (("analog-sgd", "tab:red"), ("residual", "tab:blue")):
                curve = a["curves"][f"{algorithm} {mode}"]
                x = np.arange(len(curve)) * steps / len(curve)
                ax.plot(x, curve, color=colour, lw=1, label=f"{algorithm} (mean of {REPLICAS})")
            ax.axhline(OPTIMUM, color="k", ls="--", lw=0.8, label="optimum 0.5")
            ax.axhline(
                a["predicted_analog_sgd"], color="tab:red", ls=":", lw=0.8, label="predicted 0.4604"
            )
            ax.set_title(f"soft bounds τ=1, 1200 states, {mode}", fontsize=10)
            ax.set_xlabel("step")
            ax.set_ylim(0.3, 0.55)
        axes[0].set_ylabel("w (Analog SGD) / W + γP (residual)")
        axes[0].legend(fontsize=7, loc="lower right")
        literal = a["curves"]["residual as written expected"]
        axes[2].plot(
            np.arange(len(literal)) * steps / len(literal), literal, lw=0.8, color="tab:gray"
        )
        axes[2].axhline(OPTIMUM, color="k", ls="--", lw=0.8)
        axes[2].set_title("residual with REFERENCES.md's signs taken literally", fontsize=10)
        axes[2].set_xlabel("step")
        fig.tight_layout()
        fig.savefig(folder / "analog_training_quadratic.png", dpi=110)
        plt.close(fig)
    c = report.get("aihwkit")
    if c and c.get("available"):
        fig, ax = plt.subplots(figsize=(7, 3.8))
        for algorithm, colour in (("analog-sgd", "tab:red"), ("residual", "tab:blue")):
            for source, style in (("latentedge", "-"), ("aihwkit", "--")):
                curve = c["curves"][f"{source} {algorithm}"]
                x = np.arange(len(curve)) * steps / len(curve)
                ax.plot(x, curve, style, color=colour, lw=1, label=f"{source} {algorithm}")
        ax.axhline(OPTIMUM, color="k", ls=":", lw=0.8)
        ax.axhline(c["predicted_analog_sgd"], color="tab:red", ls=":", lw=0.8)
        ax.set_ylim(0.3, 0.55)
        ax.set_xlabel("step")
        ax.set_title("1-D quadratic: latentedge vs aihwkit (pulsed soft bounds)", fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(folder / "analog_training_aihwkit.png", dpi=110)
        plt.close(fig)
    mnist = report.get("mnist")
    if mnist:
        fig, axes = plt.subplots(1, len(mnist), figsize=(7 * len(mnist), 4), squeeze=False)
        for ax, (name, m) in zip(axes[0], mnist.items(), strict=True):
            keys = list(m["rows"])
            means = [m["rows"][k]["accuracy"]["mean"] for k in keys]
            errs = [m["rows"][k]["accuracy"]["std"] for k in keys]
            colours = [
                "k"
                if k.startswith("digital")
                else "tab:red"
                if k.startswith("analog")
                else "tab:blue"
                for k in keys
            ]
            ax.barh(range(len(keys)), means, xerr=errs, color=colours)
            ax.set_yticks(
                range(len(keys)), [k.replace(":mode=expected", " (exp.)") for k in keys], fontsize=7
            )
            ax.invert_yaxis()
            ax.set_xlim(0, 1)
            ax.set_xlabel("test accuracy")
            ax.set_title(f"{name}: {m['train_samples']} images, {m['epochs']} epochs", fontsize=10)
        fig.tight_layout()
        fig.savefig(folder / "analog_training_mnist.png", dpi=110)
        plt.close(fig)


def render(report: dict[str, Any]) -> str:
    """Markdown tables of a saved report (docs/analog-training.md quotes them)."""
    lines: list[str] = []
    a = report.get("quadratic")
    if a:
        lines += [
            f"Predicted Analog SGD fixed point: {a['predicted_analog_sgd']:.4f}",
            "",
            "| run | mean of w (tail) | std over seeds | seeds |",
            "|---|---|---|---|",
        ]
        for key, r in a["runs"].items():
            lines.append(f"| {key} | {r['mean']:.4f} | {r['std']:.4f} | {r['n']} |")
        lit = a["residual_as_written"]
        lines += [
            "",
            f"REFERENCES.md signs taken literally: tail mean {lit['tail_mean']:.3f}, oscillating "
            f"over time with std {lit['tail_std_over_time']:.3f} in "
            f"[{lit['tail_min']:.3f}, {lit['tail_max']:.3f}]",
            "",
            "| fast-array lr (= transfer rate) | residual mean of W + γP | std over seeds |",
            "|---|---|---|",
        ]
        for lr, r in a["residual_lr_sweep"].items():
            lines.append(f"| {lr} | {r['mean']:.4f} | {r['std']:.4f} |")
        lines += [
            "",
            "| device (expected mode) | symmetric point | Analog SGD | Residual Learning |",
            "|---|---|---|---|",
        ]
        for spec, row in a["kinds"].items():
            lines.append(
                f"| `{spec}` | {row['symmetry_point']:.3f} | {row['analog-sgd']['mean']:.4f} "
                f"± {row['analog-sgd']['std']:.4f} | {row['residual']['mean']:.4f} "
                f"± {row['residual']['std']:.4f} |"
            )
    c = report.get("aihwkit")
    if c and c.get("available"):
        lines += [
            "",
            f"aihwkit {c['version']}, soft bounds τ = 1, 1200 states, same problem and seeds:",
            "",
            "| algorithm | aihwkit | latentedge (pulsed) | RMS gap of mean curves, 1st quarter |",
            "|---|---|---|---|",
        ]
        for algorithm, r in c["runs"].items():
            lines.append(
                f"| {algorithm} | {r['aihwkit']['mean']:.4f} ± {r['aihwkit']['std']:.4f} | "
                f"{r['latentedge']['mean']:.4f} ± {r['latentedge']['std']:.4f} | "
                f"{r['rms_curve_difference_first_quarter']:.4f} |"
            )
    elif c:
        lines += ["", f"aihwkit cross-check not run: {c.get('reason')}"]
    networks = [
        (name, m)
        for key in ("mnist", "mnist_digital_optimum")
        for name, m in report.get(key, {}).items()
    ]
    for name, m in networks:
        optimum = any(k.startswith("digital optimum") for k in m["rows"])
        distance_header = "‖W − W*‖/‖W*‖" if optimum else "‖W − W_dig‖/‖W_dig‖ (same steps)"
        lines += [
            "",
            f"**{name}**: {m['train_samples']} training images, {m['epochs']} epochs, "
            f"{m['test_samples']} test images",
            "",
            f"| algorithm, device | test accuracy | {distance_header} | s per run |",
            "|---|---|---|---|",
        ]
        for key, r in m["rows"].items():
            acc, dist = r["accuracy"], r["distance"]
            lines.append(
                f"| {key} | {acc['mean']:.4f} ± {acc['std']:.4f} | {dist['mean']:.3f} "
                f"± {dist['std']:.3f} | {r['seconds']:.1f} |"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--mlp", type=int, nargs=2, default=[10000, 3], metavar=("TRAIN", "EPOCHS"))
    parser.add_argument(
        "--lenet", type=int, nargs=2, default=[4000, 2], metavar=("TRAIN", "EPOCHS")
    )
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument(
        "--devices",
        nargs="+",
        default=[
            "softbounds",
            "softbounds:mode=expected",
            "linearstep:mode=expected",
            "expstep:mode=expected",
            "powstep:mode=expected",
        ],
    )
    parser.add_argument(
        "--parts", default="abc", help="which of a, b, c to run (merged into --out)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("docs/analog_training.json"))
    parser.add_argument("--plots", type=Path, default=Path("docs/img"))
    parser.add_argument("--render", type=Path, default=None, help="print tables of a saved report")
    args = parser.parse_args()
    if args.render is not None:
        saved = json.loads(args.render.read_text())
        plot(saved, args.plots)
        print(render(saved))
        return 0
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    report: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report.setdefault("settings", {}).update({f"parts {args.parts}": settings, "steps": args.steps})
    if "a" in args.parts:
        report["quadratic"] = part_a(args.seeds, args.steps)
        print(json.dumps({k: v for k, v in report["quadratic"].items() if k != "curves"}, indent=1))
    if "c" in args.parts:
        report["aihwkit"] = part_c(args.seeds, args.steps, report.get("quadratic", {}))
        print(json.dumps({k: v for k, v in report["aihwkit"].items() if k != "curves"}, indent=1))
    if "b" in args.parts:
        models = {
            name: tuple(size)
            for name, size in (("mlp", args.mlp), ("lenet", args.lenet))
            if size[1] > 0  # EPOCHS 0 skips the network
        }
        report["mnist"] = part_b(args.seeds, models, args.test, args.lr, args.devices)  # type: ignore[arg-type]
        print(json.dumps(report["mnist"], indent=1))
    report["seconds"] = time.perf_counter() - started
    for part in ("quadratic", "aihwkit"):
        if part in report and "curves" in report[part]:
            report[part]["curves"] = {
                k: v if len(v) <= 400 else v[:: len(v) // 400]
                for k, v in report[part]["curves"].items()
            }
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, args.plots)
    print(render(report))
    print(f"{report['seconds']:.0f} s, wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
