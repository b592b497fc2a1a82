"""Fleets of virtual nodes against one real server: wall time per round, Ray vs local processes.

For each fleet size N and each repeat, both backends run the same fleet (same devices, seed and
data: digits, 8 training + 2 test samples drawn per node) against a fresh ``latentedge server``
process with a base model and a [cell] sized for N nodes (10 kHz per node; coverage half of all
training samples),
one after the other (interleaved, so machine noise hits both alike). Each run is the real CLI,
``latentedge fleet ... --out``, in a subprocess. Figures: the median wall time of a round
(schedule + train/upload or fine-tune/delta + evaluate), the set-up (workers up, every node
registered), the whole process, and Ray's overhead per round against the local process pool.

Without ``--evaluate`` a round is schedule + train/upload or fine-tune/delta: the fleet's own
work; with it, uploaders also wait for the server's new classifier and classify their tests.

    .venv/bin/python bench/fleet.py --nodes 100 300 1000 --rounds 3 [--repeats 1] [--evaluate]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common.modelfile import from_torch, write_model_file  # noqa: E402
from common.zoo import ModelSpec, build_model  # noqa: E402
from tests.conftest import run_cli, start_server_process  # noqa: E402

SAMPLES_PER_NODE = 8
"""Training samples each virtual node draws from the digits (``--samples-per-node``): 1,347
training images cannot be split into 1,000 exact shards that all hold one of every class."""


def _server_toml(path: Path, nodes: int) -> Path:
    path.write_text(
        f"""
[server]
seed = 0

[cell]
bandwidth_hz = {10e3 * nodes}
noise_psd_w_per_hz = 4.0e-21
min_samples = {SAMPLES_PER_NODE * nodes // 2}
weight_energy = 1.0
weight_latency = {0.1 * nodes}
"""
    )
    return path


def _run(
    folder: Path, nodes: int, rounds: int, backend: str, workers: int, evaluate: bool
) -> dict[str, Any]:
    base = folder / "base.safetensors"
    if not base.exists():
        spec = ModelSpec("lenet", 1, 8, 8, 10)
        write_model_file(from_torch(spec, build_model(spec, seed=0)), base)
    db = folder / f"{backend}-{nodes}-{time.monotonic_ns()}.db"
    toml = _server_toml(folder / "server.toml", nodes)
    server = start_server_process(db, "--config", str(toml), "--base-model", str(base))
    try:
        out = db.with_suffix(".json")
        started = time.perf_counter()
        proc = run_cli(
            "--log-level", "WARNING", "fleet",
            "--nodes", str(nodes), "--rounds", str(rounds), "--backend", backend,
            "--workers", str(workers), "--server", server.address,
            "--samples-per-node", str(SAMPLES_PER_NODE),
            "--evaluate" if evaluate else "--no-evaluate",
            "--model-cache", str(folder / "cache"), "--out", str(out),
            timeout=3600,
        )  # fmt: skip
        total = time.perf_counter() - started
    finally:
        server.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"fleet {backend} N={nodes} failed: {proc.stderr[-2000:]}")
    report = json.loads(out.read_text())
    walls = [r["wall_s"] for r in report["rounds"]]
    return {
        "backend": backend,
        "nodes": nodes,
        "workers": report["workers"],
        "process_s": total,
        "setup_s": report["setup_s"],
        "round_wall_s": walls,
        "round_median_s": statistics.median(walls),
        "phase_median_s": {
            k: statistics.median(r["phase_s"][k] for r in report["rounds"])
            for k in ("schedule", "work", "evaluate")
        },
        "uploaded": [r["uploaded"] for r in report["rounds"]],
        "finetuned": [r["finetuned"] for r in report["rounds"]],
        "skipped": [r["skipped"] for r in report["rounds"]],
        "uploaded_bytes": [r["uploaded_bytes"] for r in report["rounds"]],
        "accuracy": [r["accuracy"] for r in report["rounds"]],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--backends", nargs="+", default=["local", "ray"])
    parser.add_argument("--workers", type=int, default=2, help="worker processes / actors")
    parser.add_argument(
        "--evaluate",
        action="store_true",
        help="also classify uploaders' test splits each round (bounded by the server's "
        "per-node classifier training: minutes at 1,000 nodes)",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.nodes:
            for _ in range(args.repeats):
                for backend in args.backends:
                    r = _run(Path(tmp), n, args.rounds, backend, args.workers, args.evaluate)
                    results.append(r)
                    print(
                        f"N={n:5d} {backend:5s}: set-up {r['setup_s']:7.2f} s, round median "
                        f"{r['round_median_s']:7.2f} s {[round(w, 2) for w in r['round_wall_s']]}"
                        f", process {r['process_s']:7.2f} s; uploaded {r['uploaded']}, fine-tuned "
                        f"{r['finetuned']}, skipped {r['skipped']}",
                        flush=True,
                    )
    summary = []
    for n in args.nodes:
        row: dict[str, Any] = {"nodes": n}
        for backend in args.backends:
            runs = [r for r in results if r["nodes"] == n and r["backend"] == backend]
            row[backend] = {
                k: statistics.median(r[k] for r in runs)
                for k in ("round_median_s", "setup_s", "process_s")
            }
        if {"local", "ray"} <= set(args.backends):
            row["ray_round_overhead"] = (
                row["ray"]["round_median_s"] / row["local"]["round_median_s"] - 1
            )
        summary.append(row)
        print(json.dumps(row))
    if args.out:
        args.out.write_text(json.dumps({"runs": results, "summary": summary}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
