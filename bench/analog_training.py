"""Simulated analog in-memory training of the MNIST MLP against digital SGD, same loop and data.

Run from the repo root:  .venv/bin/python -m bench.analog_training [--repeats 5] [--device cpu]

One epoch of 6,000 MNIST training images (batch 64, 94 steps) of the zoo ``mlp`` (784-256-128-10,
234,752 analog weights) per run, with ``common.analog_training.train_in_memory``; each variant is
timed right after a digital-SGD run (interleaved, so load from other jobs hits both alike) and the
ratio to that run is taken; medians over repeats of wall time and of process CPU time (the CPU
ratio is the robust one on a shared machine). Variants: analog-sgd on ``softbounds`` (pulsed
and expected-update modes) and on ``expstep`` and ``powstep`` (pulse-by-pulse loop), residual on
``softbounds``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common.analog_devices import parse_device_spec
from common.analog_training import Algorithm, InMemoryConfig, train_in_memory
from common.zoo import ModelSpec, build_model

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist" / "mnist.npz"
VARIANTS = (
    ("analog-sgd", "softbounds"),
    ("analog-sgd", "softbounds:mode=expected"),
    ("analog-sgd", "expstep"),
    ("analog-sgd", "powstep"),
    ("residual", "softbounds"),
)


def _data(samples: int, path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as d:
        x = (d["x_train"][:samples, None] / 255.0).astype(np.float32)
        y = d["y_train"][:samples].astype(np.int64)
    return x, y


def _time(algo: str, spec: str, x: np.ndarray, y: np.ndarray, device: str) -> tuple[float, float]:
    model = build_model(ModelSpec("mlp", 1, 28, 28, 10), seed=0).to(device)
    wall, cpu = time.perf_counter(), time.process_time()
    train_in_memory(
        model, x, y, InMemoryConfig(Algorithm(algo)), parse_device_spec(spec), epochs=1, seed=0
    )
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> int:
    """Time the variants, print a table and JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--samples", type=int, default=6000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", type=Path, default=MNIST, help="an MNIST .npz (x_train, y_train)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x, y = _data(args.samples, args.data)
    _time("digital-sgd", "softbounds", x, y, args.device)  # warm-up
    results: dict[str, dict[str, float]] = {}
    for algo, spec in VARIANTS:
        wall_ratio, cpu_ratio, digital_wall, analog_wall = [], [], [], []
        for _ in range(args.repeats):
            d_wall, d_cpu = _time("digital-sgd", spec, x, y, args.device)
            a_wall, a_cpu = _time(algo, spec, x, y, args.device)
            wall_ratio.append(a_wall / d_wall)
            cpu_ratio.append(a_cpu / d_cpu)
            digital_wall.append(d_wall)
            analog_wall.append(a_wall)
        key = f"{algo} {spec}"
        results[key] = {
            "digital_s": statistics.median(digital_wall),
            "analog_s": statistics.median(analog_wall),
            "wall_ratio": statistics.median(wall_ratio),
            "cpu_ratio": statistics.median(cpu_ratio),
        }
        r = results[key]
        sys.stdout.write(
            f"{key:38s} digital {r['digital_s']:.3f} s  analog {r['analog_s']:.3f} s  "
            f"ratio wall {r['wall_ratio']:.2f}x  cpu {r['cpu_ratio']:.2f}x\n"
        )
    meta = {
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "threads": args.threads,
        "samples": args.samples,
    }
    sys.stdout.write(json.dumps({"settings": meta, "results": results}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
