"""``latentedge simulate``: Monte-Carlo accuracy of an ONNX model under analog non-idealities."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from common.errors import NoiseInjectionError
from device_sim.noise import NOISE_KINDS
from device_sim.runner import (
    DrawBackend,
    LocalDraws,
    RunnerConfig,
    simulate,
    simulate_per_layer,
    simulate_sweep,
)

logger = logging.getLogger(__name__)

_EXAMPLES = """noise kinds: {kinds}
examples:
  latentedge simulate mnist-12.onnx --data mnist.npz --noise awgn:snr_db=10 --draws 20
  latentedge simulate model.onnx --data d.npz --noise pcm:t=3600+adc:bits=8 --out report.json
  latentedge simulate model.onnx --data d.npz --sweep awgn:snr_db=0,5,10,20,30 --plot curve.png
"""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``simulate`` options to ``parser``."""
    parser.description = (
        "Run an ONNX classifier with analog non-idealities on its Conv/Gemm/MatMul weights "
        "(and optional DAC/ADC), Monte Carlo over draws; report accuracy statistics."
    )
    parser.epilog = _EXAMPLES.format(kinds=", ".join(NOISE_KINDS)) + "\n" + (parser.epilog or "")
    parser.add_argument("model", type=Path, help="ONNX model file")
    parser.add_argument(
        "--data", type=Path, required=True, help=".npz with inputs x and integer labels y"
    )
    parser.add_argument("--x-key", default="x", help="array of inputs in --data (default: x)")
    parser.add_argument("--y-key", default="y", help="array of labels in --data (default: y)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--noise",
        default="none",
        help="noise spec, terms joined by '+', e.g. pcm:t=3600+adc:bits=8 (default: none)",
    )
    mode.add_argument(
        "--sweep", help="spec with one parameter listing values, e.g. awgn:snr_db=0,5,10,20"
    )
    parser.add_argument("--draws", type=int, default=10, help="Monte-Carlo draws (default: 10)")
    parser.add_argument("--seed", type=int, default=0, help="base seed (default: 0)")
    parser.add_argument(
        "--output",
        help="model output holding class scores, probabilities or class ids (default: the only "
        "one, else the one class-id output, else the one score output; refused if ambiguous)",
    )
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    parser.add_argument("--plot", type=Path, help="with --sweep: write the accuracy curve (PNG)")
    parser.add_argument(
        "--per-layer", action="store_true", help="noise on one analog tensor at a time"
    )
    parser.add_argument("--analog-include", help="regex: only matching initializers are analog")
    parser.add_argument("--analog-exclude", help="regex: matching initializers are not analog")
    parser.add_argument(
        "--no-fold", action="store_true", help="do not fold BatchNorm/Mul into analog weights"
    )
    parser.add_argument("--limit", type=int, help="use only the first N samples")
    parser.add_argument(
        "--batch-size", type=int, default=256, help="samples in flight per onnxruntime call (256)"
    )
    parser.add_argument(
        "--draws-per-session", type=int, default=8, help="draws per onnxruntime session (8)"
    )
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: auto)")
    parser.add_argument(
        "--backend",
        choices=["local", "ray"],
        default="local",
        help="where the draws run: this process (default) or Ray actors (same numbers)",
    )
    parser.add_argument(
        "--ray-address",
        dest="ray_address",
        default="",
        help="Ray cluster to join (default: start a local one); with --backend ray",
    )


def _load_data(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    path: Path = args.data
    if not path.is_file():
        raise NoiseInjectionError(f"--data {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.keys())
            for key in (args.x_key, args.y_key):
                if key not in keys:
                    raise NoiseInjectionError(
                        f"--data {str(path)!r} has no array {key!r}; arrays: {keys}"
                    )
            x, y = archive[args.x_key], archive[args.y_key]
    except (OSError, ValueError) as exc:
        raise NoiseInjectionError(f"--data {str(path)!r} is not a readable .npz: {exc}") from exc
    if args.limit is not None:
        if args.limit < 1:
            raise NoiseInjectionError(f"--limit must be >= 1, got {args.limit}")
        x, y = x[: args.limit], y[: args.limit]
    return x, y


def run(args: argparse.Namespace) -> int:
    """Run the simulation described by ``args``; write the summary to stdout."""
    if args.plot is not None and args.sweep is None:
        raise NoiseInjectionError("--plot needs --sweep")
    if args.per_layer and args.sweep is not None:
        raise NoiseInjectionError("--per-layer takes --noise, not --sweep")
    if args.backend == "local" and args.ray_address:
        raise NoiseInjectionError("--ray-address needs --backend ray")
    x, y = _load_data(args)
    backend: DrawBackend = LocalDraws()
    if args.backend == "ray":
        from device_sim.ray_backend import RayDraws

        backend = RayDraws(args.ray_address)
    try:
        return _run(args, x, y, backend)
    finally:
        backend.close()


def _run(args: argparse.Namespace, x: np.ndarray, y: np.ndarray, backend: DrawBackend) -> int:
    config = RunnerConfig(
        batch_size=args.batch_size,
        draws_per_session=args.draws_per_session,
        threads=args.threads,
    )
    common = {
        "draws": args.draws,
        "seed": args.seed,
        "output": args.output,
        "analog_include": args.analog_include,
        "analog_exclude": args.analog_exclude,
        "fold_affine": not args.no_fold,
        "config": config,
        "backend": backend,
    }
    if args.sweep is not None:
        sweep = simulate_sweep(args.model, x, y, args.sweep, **common)
        report: dict[str, object] = sweep.to_json_dict()
        text = sweep.summary()
        if args.plot is not None:
            from device_sim.plot import plot_sweep  # matplotlib only when plotting

            text += f"plot written to {plot_sweep(sweep, args.plot)}\n"
    elif args.per_layer:
        layers = simulate_per_layer(args.model, x, y, args.noise, **common)
        report, text = layers.to_json_dict(), layers.summary()
    else:
        single = simulate(args.model, x, y, args.noise, **common)
        report, text = single.to_json_dict(), single.summary()
    if args.out is not None:
        try:
            args.out.write_text(json.dumps(report, indent=2) + "\n")
        except OSError as exc:
            raise NoiseInjectionError(f"cannot write --out {str(args.out)!r}: {exc}") from exc
        text += f"report written to {args.out}\n"
    sys.stdout.write(text)
    return 0
