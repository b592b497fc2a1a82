"""``latentedge demo --mode transfer``: pre-trained model down, fine-tuning deltas up, on loopback.

The dataset's training images are split in two halves with a seeded permutation: the
server's (``source.npz``; it pre-trains on the ``--source-classes`` among them) and the nodes'
(``target.npz``: every class, sharded non-IID across the nodes, with the whole test split).
Then, as real processes talking gRPC on 127.0.0.1:

1. ``latentedge pretrain`` trains the base model on the source data;
2. ``latentedge server --base-model base.safetensors --aggregate-after N`` serves it;
3. N ``latentedge edge --mode finetune`` nodes download it, fine-tune ``--trainable`` on their
   shard, upload the encoded delta and classify their test split locally with the fine-tuned
   model the server built from the delta (downloaded back);
4. the server averages the deltas into base version 2 once all N arrived.

The demo then trains the same network centrally, all parameters, on all the nodes' raw target
data (the baseline) and writes ``summary.json`` and ``summary.png``.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import LatentEdgeError
from latentedge.demo import DemoConfig, DemoServer, _cli, start_edges, wait_edges

logger = logging.getLogger(__name__)


def _split_data(config: DemoConfig) -> tuple[Path, Path]:
    """Write the server's half (source.npz) and the nodes' half (target.npz)."""
    from common.datasets import halve_train, load_dataset

    data = load_dataset(config.dataset)
    halves = halve_train(data, config.seed)
    paths = (config.out / "source.npz", config.out / "target.npz")
    for path, part in zip(paths, halves, strict=True):
        np.savez_compressed(
            path, x_train=part.x_train, y_train=part.y_train, x_test=part.x_test, y_test=part.y_test
        )
    logger.info(
        "demo: %s split into the server's %d and the nodes' %d training images (%d test)",
        data.name,
        len(halves[0].y_train),
        len(halves[1].y_train),
        len(data.y_test),
    )
    return paths


def _pretrain(config: DemoConfig, source: Path) -> Path:
    base = config.out / "base.safetensors"
    log = config.out / "pretrain.log"
    args = [
        "pretrain",
        "--data",
        str(source),
        "--classes",
        config.source_classes,
        "--model",
        config.model,
        "--epochs",
        str(config.pretrain_epochs),
        "--augment",
        "shift",
        "--seed",
        str(config.seed),
        "--threads",
        "2",
        "--out",
        str(base),
        "--onnx",
        str(config.out / "onnx" / "base.onnx"),
    ]
    logger.info("pretraining %s on classes %s", config.model, config.source_classes)
    with log.open("w") as fh:
        done = subprocess.run(_cli(*args), stdout=fh, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise LatentEdgeError(f"pretrain exited with {done.returncode}: {tail[0]} (log: {log})")
    return base


def run_transfer_demo(config: DemoConfig) -> dict[str, Any]:
    """Run pretrain, server and nodes; compute the baseline; write summary.json and .png."""
    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    (config.out / "onnx").mkdir(parents=True, exist_ok=True)
    source, target = _split_data(config)
    base_path = _pretrain(config, source)
    server = DemoServer(
        config, "--base-model", str(base_path), "--aggregate-after", str(config.nodes)
    )
    try:
        logger.info("server listening on %s", server.address)
        edges = start_edges(
            config,
            server.address,
            data=str(target),
            branch_args=[
                "--mode",
                "finetune",
                "--trainable",
                config.trainable,
                "--delta-encoding",
                config.delta_encoding,
                "--model-cache",
                str(config.out / "model-cache"),
            ],
        )
        logger.info("started %d edge node processes", len(edges))
        try:
            wait_edges(edges)
        finally:
            for _, proc, _ in edges:
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait(timeout=30)
    finally:
        server.stop()
    reports = [json.loads((config.out / f"node-{i}.json").read_text()) for i in range(config.nodes)]
    summary = _summarise(config, reports, target, base_path)
    _plot(config, summary)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    (config.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _summarise(
    config: DemoConfig, reports: list[dict[str, Any]], target: Path, base_path: Path
) -> dict[str, Any]:
    from common.datasets import load_dataset
    from common.finetune import Trainable, TrainSettings, accuracy, train_network
    from common.modelfile import parse_model_bytes
    from common.zoo import build_model
    from server.store import SqliteStore

    data = load_dataset(str(target))
    base = parse_model_bytes(base_path.read_bytes(), str(base_path))
    baseline_net = build_model(base.spec, seed=config.seed + 1)
    logger.info("training the centralised baseline on the nodes' %d raw images", len(data.y_train))
    train_network(
        baseline_net,
        data.x_train,
        data.y_train,
        Trainable("all"),
        TrainSettings(
            epochs=config.pretrain_epochs, seed=config.seed, augment=True, hflip=False, threads=2
        ),
    )
    store = SqliteStore(config.out / "server.db")
    try:
        versions = store.list_models()
        newest = store.get_model()
    finally:
        store.close()
    tested = sum(r["test_samples"] for r in reports)
    summary: dict[str, Any] = {
        "mode": "transfer",
        "dataset": config.dataset,
        "nodes": config.nodes,
        "model": base.spec.name,
        "source_classes": config.source_classes,
        "trainable": config.trainable,
        "delta_encoding": config.delta_encoding,
        "train_samples": sum(r["samples"] for r in reports),
        "test_samples": tested,
        "base_accuracy": sum(r["base_accuracy"] * r["test_samples"] for r in reports) / tested,
        "accuracy": sum(r["correct"] for r in reports) / tested,
        "baseline_accuracy": accuracy(baseline_net, data.x_test, data.y_test),
        "uploaded_params_fraction": max(r["uploaded_params_fraction"] for r in reports),
        "delta_bytes": sum(r["delta_bytes"] for r in reports),
        "delta_index_bytes": sum(r["delta_index_bytes"] for r in reports),
        "model_bytes": base_path.stat().st_size,
        "model_params": reports[0]["model_params"],
        "raw_bytes": sum(int(r["raw_bytes"]) for r in reports),
        "per_node": {
            r["node_id"]: {
                key: r[key]
                for key in (
                    "accuracy",
                    "base_accuracy",
                    "local_accuracy",
                    "samples",
                    "test_samples",
                    "delta_params",
                    "delta_bytes",
                    "delta_wire_bytes",
                    "uploaded_params_fraction",
                    "train_seconds",
                    "onnx_max_abs_diff",
                )
                if key in r
            }
            for r in reports
        },
        "model_versions": [
            {"version": v.version, "source": v.source, "nodes": list(v.nodes), "hash": v.hash}
            for v in versions
        ],
        "seconds": 0.0,
    }
    if newest is not None and newest[0].version > 1:
        aggregated = parse_model_bytes(newest[1]).to_torch()
        summary["aggregated_version"] = newest[0].version
        summary["aggregated_accuracy"] = accuracy(aggregated, data.x_test, data.y_test)
    return summary


def _plot(config: DemoConfig, summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes = list(summary["per_node"])
    fig, (ax, ax_bytes) = plt.subplots(
        1, 2, figsize=(11, 4.2), width_ratios=[3, 2], layout="constrained"
    )
    labels = ["base\n(no fine-tune)", *nodes, "all nodes", "aggregated", "baseline\n(central)"]
    values = [
        summary["base_accuracy"],
        *[summary["per_node"][n]["accuracy"] for n in nodes],
        summary["accuracy"],
        summary.get("aggregated_accuracy", float("nan")),
        summary["baseline_accuracy"],
    ]
    colors = ["tab:gray", *["tab:blue"] * len(nodes), "tab:green", "tab:olive", "black"]
    ax.bar(labels, values, color=colors)
    for x, v in enumerate(values):
        if np.isfinite(v):
            ax.text(x, v + 0.005, f"{v:.3f}", ha="center", fontsize=8)
    ax.axhline(0.95 * summary["baseline_accuracy"], color="tab:red", ls="--", lw=1)
    ax.text(
        len(values) - 0.5,
        0.95 * summary["baseline_accuracy"],
        "95% of baseline",
        fontsize=7,
        color="tab:red",
        ha="right",
        va="bottom",
    )
    finite = [v for v in values if np.isfinite(v)]
    ax.set_ylim(max(0.0, min(finite) - 0.1), 1.02)
    ax.set_ylabel("test accuracy (each node: its own test shard)")
    ax.set_title(
        f"{summary['dataset']}: {summary['model']} pre-trained on classes "
        f"{summary['source_classes']}; nodes fine-tune {summary['trainable']}",
        fontsize=9,
    )
    per_node = summary["delta_bytes"] / summary["nodes"]
    kinds = ["delta up\n(per node)", "base model\ndown", "raw images\n(per node)"]
    sizes = [per_node, summary["model_bytes"], summary["raw_bytes"] / summary["nodes"]]
    ax_bytes.bar(kinds, sizes, color=["tab:green", "tab:gray", "tab:red"])
    ax_bytes.set_yscale("log")
    for x, v in enumerate(sizes):
        ax_bytes.text(x, v * 1.1, f"{v:,.0f} B", ha="center", fontsize=8)
    ax_bytes.set_ylabel("bytes")
    ax_bytes.set_title(
        f"{100 * summary['uploaded_params_fraction']:.2f}% of the parameters up "
        f"({summary['delta_encoding']})",
        fontsize=9,
    )
    fig.savefig(config.out / "summary.png", dpi=110)
    plt.close(fig)


def human_summary(summary: dict[str, Any]) -> str:
    """The demo's console summary."""
    ratio = summary["accuracy"] / summary["baseline_accuracy"]
    lines = [
        f"dataset            {summary['dataset']}: the server pre-trains {summary['model']} on "
        f"classes {summary['source_classes']}; {summary['nodes']} nodes hold all classes",
        f"delta              {summary['trainable']}, {summary['delta_encoding']}: "
        f"{100 * summary['uploaded_params_fraction']:.2f}% of {summary['model_params']:,} "
        f"parameters, {summary['delta_bytes']:,} bytes up in all vs a {summary['model_bytes']:,}"
        "-byte model",
        f"accuracy           {summary['accuracy']:.4f} with the fine-tuned models "
        f"({ratio:.3f} of the baseline)",
        f"base model         {summary['base_accuracy']:.4f} (pre-trained, not fine-tuned)",
        f"baseline           {summary['baseline_accuracy']:.4f} (same network, all parameters, "
        "trained centrally on the nodes' raw data)",
    ]
    if "aggregated_accuracy" in summary:
        lines.append(
            f"aggregated         {summary['aggregated_accuracy']:.4f} (base version "
            f"{summary['aggregated_version']}: sample-weighted mean of the deltas)"
        )
    for node_id, node in summary["per_node"].items():
        lines.append(
            f"  {node_id:<16} accuracy {node['accuracy']:.4f} (base {node['base_accuracy']:.4f}) "
            f"on {node['test_samples']} test samples, {node['delta_bytes']} delta bytes"
        )
    lines.append(f"time               {summary['seconds']:.1f} s")
    return "\n".join(lines) + "\n"
