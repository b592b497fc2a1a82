"""``latentedge demo``: the whole split-learning pipeline on loopback, as real processes.

Starts one ``latentedge server`` and N ``latentedge edge`` processes talking gRPC on
127.0.0.1. Each node trains its own autoencoder on its (non-IID) shard without labels,
uploads latents + labels, and classifies its held-out test split through the server. The
demo then trains the same classifier family centrally on raw pixels as the baseline,
then writes ``summary.json`` and ``summary.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from common.errors import ConfigError, LatentEdgeError

logger = logging.getLogger(__name__)

_EPOCH = re.compile(r"epoch (\d+)/(\d+)")
_LISTENING = re.compile(r"listening on (\S+)")


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs."""

    dataset: str = "digits"
    """Dataset name or path (every node reads its own shard of it)."""
    nodes: int = 3
    """Edge node processes."""
    latent_dim: int = 16
    """Latent size of every node's autoencoder."""
    skew: float = 0.5
    """Non-IID class skew of the shards (0 = IID)."""
    epochs: int = 0
    """Autoencoder epochs (0 = the trainer's default)."""
    latent_dtype: str = "float16"
    """Wire encoding of latents (float16 halves the bytes at no measurable accuracy cost)."""
    classifier_mode: str = "per_node"
    """Server classifier: ``per_node`` or ``shared``."""
    seed: int = 0
    """Seed of sharding and training."""
    analog_sweep: str = "awgn:snr_db=0,5,10,15,20,30"
    """Noise sweep for the encoders on a simulated analog device ("" = skip that step)."""
    analog_draws: int = 20
    """Monte-Carlo draws per sweep level."""
    out: Path = Path("runs/demo")
    """Output directory."""
    mode: str = "latents"
    """``latents`` (split learning: autoencoders, latents up) or ``transfer`` (the server
    pre-trains a base model, nodes fine-tune it and send deltas up)."""
    model: str = "lenet"
    """transfer: the zoo network."""
    source_classes: str = "0,1,2,3,4,5,6,7"
    """transfer: the classes of the server's source data (the nodes hold every class)."""
    trainable: str = "head"
    """transfer: what the nodes fine-tune."""
    delta_encoding: str = "int8"
    """transfer: how the nodes encode their deltas."""
    pretrain_epochs: int = 60
    """transfer: epochs of pre-training (and of the centralised baseline)."""
    train_noise: str = ""
    """latents: also run every node with a noise-aware encoder (``aware-i``, trained under this
    weight-noise spec) beside the plain one, and compare their analog curves."""
    tls_cert: str = ""
    """PEM certificate of the demo's server (valid for 127.0.0.1): the demo runs over TLS with
    a node token per node, as a deployment does; empty = plaintext loopback."""
    tls_key: str = ""
    """PEM key of ``tls_cert``."""
    tls_ca: str = ""
    """PEM CA the nodes trust (the one that signed ``tls_cert``)."""

    def __post_init__(self) -> None:
        if self.mode not in ("latents", "transfer"):
            raise ConfigError(f"--mode must be latents or transfer, got {self.mode!r}")
        if self.pretrain_epochs < 1:
            raise ConfigError(f"--pretrain-epochs must be >= 1, got {self.pretrain_epochs}")
        if self.train_noise:
            if self.mode != "latents":
                raise ConfigError("--train-noise applies to --mode latents (the nodes' encoders)")
            from common.noise_aware import training_spec

            training_spec(self.train_noise)
        if not 1 <= self.nodes <= 64:
            raise ConfigError(f"--nodes must be in 1..64, got {self.nodes}")
        if self.latent_dim < 1:
            raise ConfigError(f"--latent-dim must be >= 1, got {self.latent_dim}")
        if not 0.0 <= self.skew < 1.0:
            raise ConfigError(f"--skew must be in [0, 1), got {self.skew}")
        if self.analog_draws < 1:
            raise ConfigError(f"--analog-draws must be >= 1, got {self.analog_draws}")
        if bool(self.tls_cert) != bool(self.tls_key) or bool(self.tls_cert) != bool(self.tls_ca):
            raise ConfigError("a TLS demo needs all of --tls-cert, --tls-key and --tls-ca")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``demo`` flags."""
    d = DemoConfig()
    parser.add_argument("--dataset", default=d.dataset, help="digits (default) or a dataset path")
    parser.add_argument("--nodes", type=int, default=d.nodes, help="edge nodes (3)")
    parser.add_argument("--latent-dim", type=int, default=d.latent_dim, help="latent size (16)")
    parser.add_argument("--skew", type=float, default=d.skew, help="non-IID class skew (0.5)")
    parser.add_argument("--epochs", type=int, default=d.epochs, help="autoencoder epochs")
    parser.add_argument(
        "--latent-dtype", default=d.latent_dtype, choices=["float32", "float16", "int8"]
    )
    parser.add_argument(
        "--classifier-mode", default=d.classifier_mode, choices=["per_node", "shared"]
    )
    parser.add_argument("--seed", type=int, default=d.seed, help="seed (0)")
    parser.add_argument(
        "--analog-sweep",
        default=d.analog_sweep,
        help=f"noise sweep for the encoders on the analog device ('' = skip; {d.analog_sweep})",
    )
    parser.add_argument(
        "--analog-draws", type=int, default=d.analog_draws, help="Monte-Carlo draws per level"
    )
    parser.add_argument("--out", type=Path, default=d.out, help="output directory")
    parser.add_argument(
        "--mode",
        default=d.mode,
        choices=["latents", "transfer"],
        help="latents: split learning (default); transfer: pre-trained model down, deltas up",
    )
    parser.add_argument("--model", default=d.model, help="transfer: zoo network (lenet)")
    parser.add_argument(
        "--source-classes", default=d.source_classes, help="transfer: the server's classes"
    )
    parser.add_argument("--trainable", default=d.trainable, help="transfer: what nodes fine-tune")
    parser.add_argument(
        "--delta-encoding", default=d.delta_encoding, help="transfer: delta encoding (int8)"
    )
    parser.add_argument(
        "--pretrain-epochs", type=int, default=d.pretrain_epochs, help="transfer: epochs (60)"
    )
    parser.add_argument(
        "--train-noise",
        default=d.train_noise,
        help="also run noise-aware encoders (trained under this weight-noise spec) beside plain",
    )
    parser.add_argument("--tls-cert", default="", help="TLS demo: the server's PEM certificate")
    parser.add_argument("--tls-key", default="", help="TLS demo: its PEM key")
    parser.add_argument("--tls-ca", default="", help="TLS demo: the CA the nodes trust")


def run(args: argparse.Namespace) -> int:
    """Run the demo and print its summary."""
    config = DemoConfig(
        dataset=args.dataset,
        nodes=args.nodes,
        latent_dim=args.latent_dim,
        skew=args.skew,
        epochs=args.epochs,
        latent_dtype=args.latent_dtype,
        classifier_mode=args.classifier_mode,
        seed=args.seed,
        analog_sweep=args.analog_sweep,
        analog_draws=args.analog_draws,
        out=args.out,
        mode=args.mode,
        model=args.model,
        source_classes=args.source_classes,
        trainable=args.trainable,
        delta_encoding=args.delta_encoding,
        pretrain_epochs=args.pretrain_epochs,
        train_noise=args.train_noise,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_ca=args.tls_ca,
    )
    if config.mode == "transfer":
        from latentedge.demo_transfer import human_summary, run_transfer_demo

        sys.stdout.write(human_summary(run_transfer_demo(config)))
        return 0
    summary = run_demo(config)
    sys.stdout.write(_human_summary(summary))
    return 0


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "latentedge", *args]


class DemoServer:
    """A ``latentedge server`` child process."""

    def __init__(self, config: DemoConfig, *extra: str) -> None:
        db = config.out / "server.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        self._log: IO[str] = (config.out / "server.log").open("w")
        self.proc = subprocess.Popen(
            _cli(
                "server",
                "--listen",
                "127.0.0.1:0",
                "--db",
                str(db),
                "--classifier-mode",
                config.classifier_mode,
                "--seed",
                str(config.seed),
                *(
                    ("--tls-cert", config.tls_cert, "--tls-key", config.tls_key)
                    * bool(config.tls_cert)
                ),
                *extra,
            ),
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.address = self._wait_listening()

    def _wait_listening(self) -> str:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._log.write(line)  # the banner (address, TLS, credentials) into server.log
            self._log.flush()
            match = _LISTENING.search(line)
            if match:
                return match.group(1)
        raise LatentEdgeError("the demo's server exited before listening; see server.log")

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after 30 s) and close its log."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _node_token(config: DemoConfig, node_id: str) -> Path:
    """Issue ``node_id`` a token in the demo's database; the file holding it (mode 0600)."""
    from server.auth import issue_token
    from server.store import open_store

    store = open_store(config.out / "server.db")
    try:
        text, _ = issue_token(store, node_id)
    finally:
        store.close()
    folder = config.out / "tokens"
    folder.mkdir(exist_ok=True)
    path = folder / f"{node_id}.token"
    path.touch(mode=0o600)
    path.write_text(text + "\n")
    return path


def start_edges(
    config: DemoConfig,
    address: str,
    *,
    data: str = "",
    branch_args: list[str] | None = None,
    prefix: str = "node",
    extra: tuple[str, ...] = (),
) -> list[tuple[str, subprocess.Popen[str], Path]]:
    """Start the edge node processes ``PREFIX-0``, ``PREFIX-1``, ...

    ``branch_args`` replace the latents flags; ``data`` replaces the dataset; ``extra`` flags
    are added to every node's command line.
    """
    edges = []
    for i in range(config.nodes):
        node_id = f"{prefix}-{i}"
        log_path = config.out / f"{node_id}.log"
        branch = branch_args or [
            "--latent-dim",
            str(config.latent_dim),
            "--latent-dtype",
            config.latent_dtype,
            "--evaluate",
        ]
        args = [
            "edge",
            "--server",
            address,
            "--node-id",
            node_id,
            "--data",
            data or config.dataset,
            "--shard",
            f"{i}/{config.nodes}",
            "--skew",
            str(config.skew),
            "--seed",
            str(config.seed),  # the same for every node: shards must partition the data
            *branch,
            "--export",
            str(config.out / "onnx"),
            "--report",
            str(config.out / f"{node_id}.json"),
            "--retry-window-s",
            "60",
            *extra,
        ]
        if config.epochs:
            args += ["--epochs", str(config.epochs)]
        if config.tls_ca:
            args += ["--tls-ca", config.tls_ca, "--token-file", str(_node_token(config, node_id))]
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                _cli(*args), stdout=subprocess.DEVNULL, stderr=log, text=True, env=os.environ.copy()
            )
        edges.append((node_id, proc, log_path))
    return edges


def _progress_line(log_path: Path) -> str:
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    for line in reversed(lines):
        if "Uplink.PushLatents" in line or "Uplink.PushDelta" in line:
            return "uploaded, evaluating"
        match = _EPOCH.search(line)
        if match:
            return f"training epoch {match.group(1)}/{match.group(2)}"
        if "registered with" in line:
            return "registered, training"
    return "starting"


def wait_edges(edges: list[tuple[str, subprocess.Popen[str], Path]]) -> None:
    """Show the nodes' progress until all exit; raise naming the first that failed."""
    shown: dict[str, str] = {}
    while True:
        running = False
        for node_id, proc, log_path in edges:
            state = (
                _progress_line(log_path)
                if proc.poll() is None
                else f"done (exit {proc.returncode})"
            )
            running = running or proc.poll() is None
            if shown.get(node_id) != state:
                shown[node_id] = state
                logger.info("%s: %s", node_id, state)
        if not running:
            break
        time.sleep(0.5)
    failed = [(n, p.returncode, log) for n, p, log in edges if p.returncode != 0]
    if failed:
        node_id, code, log_path = failed[0]
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise LatentEdgeError(f"{node_id} exited with {code}: {tail[0]} (full log: {log_path})")


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run server + nodes, compute the baseline, write summary.json and summary.png."""
    import torch

    from common.datasets import load_dataset
    from server.classifier import train_baseline

    # the baseline MLP is tiny and shares the host with N+1 processes: one thread is fastest
    torch.set_num_threads(1)
    started = time.perf_counter()
    config.out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(config.dataset)  # fail fast on a bad dataset, before any process starts
    logger.info(
        "demo: %s (%d train / %d test), %d nodes, latent %d, out %s",
        data.name,
        len(data.y_train),
        len(data.y_test),
        config.nodes,
        config.latent_dim,
        config.out,
    )
    server = DemoServer(config)
    try:
        logger.info("server listening on %s", server.address)
        edges = start_edges(config, server.address)
        if config.train_noise:
            edges += start_edges(
                config, server.address, prefix="aware", extra=("--train-noise", config.train_noise)
            )
        logger.info("started %d edge node processes", len(edges))
        try:
            wait_edges(edges)
        finally:  # on an error or Ctrl-C, no node outlives the demo
            for _, proc, _ in edges:
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait(timeout=30)
    finally:
        server.stop()
    baseline = train_baseline(
        data.x_train,
        data.y_train,
        data.x_test,
        data.y_test,
        num_classes=data.num_classes,
        seed=config.seed,
    )
    logger.info("centralised raw-pixel baseline accuracy %.4f", baseline)
    reports = [json.loads((config.out / f"node-{i}.json").read_text()) for i in range(config.nodes)]
    correct = sum(r["correct"] for r in reports)
    tested = sum(r["test_samples"] for r in reports)
    summary: dict[str, Any] = {
        "mode": "latents",
        "dataset": data.name,
        "nodes": config.nodes,
        "latent_dim": config.latent_dim,
        "latent_dtype": config.latent_dtype,
        "classifier_mode": config.classifier_mode,
        "compression_ratio": reports[0]["compression_ratio"],
        "train_samples": sum(r["samples"] for r in reports),
        "test_samples": tested,
        "raw_bytes": sum(r["raw_bytes"] for r in reports),
        "uploaded_bytes": sum(r["uploaded_bytes"] for r in reports),
        "accuracy": correct / tested,
        "baseline_accuracy": baseline,
        "per_node": {
            r["node_id"]: {
                "accuracy": r["accuracy"],
                "train_samples": r["samples"],
                "test_samples": r["test_samples"],
                "uploaded_bytes": r["uploaded_bytes"],
                "reconstruction_mse": r["reconstruction_mse"],
                "onnx_max_abs_diff": r.get("onnx_max_abs_diff"),
            }
            for r in reports
        },
        "seconds": 0.0,
    }
    if config.train_noise:
        aware = [
            json.loads((config.out / f"aware-{i}.json").read_text()) for i in range(config.nodes)
        ]
        summary["noise_aware"] = {
            "train_noise": config.train_noise,
            "accuracy": sum(r["correct"] for r in aware) / sum(r["test_samples"] for r in aware),
            "per_node": {r["node_id"]: {"accuracy": r["accuracy"]} for r in aware},
        }
    if config.analog_sweep:
        summary["analog"] = _analog(config, list(summary["per_node"]))
        if config.train_noise:
            summary["noise_aware"]["analog"] = _analog(
                config, list(summary["noise_aware"]["per_node"])
            )
    _plot(config, summary)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    (config.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def build_pipelines(out: Path, nodes: list[str]) -> dict[str, Path]:
    """Compose each node's exported encoder with the server's classifier for that node.

    Reads the server's newest classifier from ``out/server.db``, exports its network for each
    node to ONNX (checked against torch on the node's stored latents) and writes
    ``out/onnx/pipeline_<node>.onnx`` (image -> logits; encoder names prefixed ``encoder/``,
    classifier names ``classifier/``).

    Returns:
        Node id -> composed pipeline path.
    """
    from common.export import compose_pipeline, export_classifier
    from server.classifier import LatentClassifier
    from server.store import SqliteStore

    onnx_dir = out / "onnx"
    store = SqliteStore(out / "server.db")
    try:
        latest = store.latest_classifier()
        if latest is None:
            raise LatentEdgeError(f"the server stored no classifier in {out / 'server.db'}")
        classifier = LatentClassifier.from_bytes(latest[2])
        samples = {n: store.node_data(n)[0][:64] for n in nodes}
    finally:
        store.close()
    pipelines = {}
    for node_id, latents in samples.items():
        cls_path = onnx_dir / f"classifier_{node_id}.onnx"
        export_classifier(classifier.node_network(node_id), cls_path, latents)
        pipelines[node_id] = compose_pipeline(
            onnx_dir / f"encoder_{node_id}.onnx", cls_path, onnx_dir / f"pipeline_{node_id}.onnx"
        )
    return pipelines


def _analog(config: DemoConfig, nodes: list[str]) -> dict[str, Any]:
    """Each node's encoder on a simulated analog device, feeding the server's classifier.

    Only the encoder's weights (``^encoder/``) are analog; the classifier stays digital on
    the server. Accuracy is pooled over the nodes' test splits.
    """
    import numpy as np

    from device_sim import simulate_sweep

    means: list[np.ndarray] = []
    clean = 0.0
    values: tuple[float, ...] = ()
    weights = []
    for node_id, pipeline in build_pipelines(config.out, nodes).items():
        test = np.load(config.out / "onnx" / f"test_{node_id}.npz")
        logger.info("%s: analog encoder sweep %s", node_id, config.analog_sweep)
        sweep = simulate_sweep(
            pipeline,
            test["x"],
            test["y"],
            config.analog_sweep,
            config.analog_draws,
            config.seed,
            analog_include="^encoder/",
        )
        values = sweep.values
        weights.append(len(test["y"]))
        means.append(np.array([level.accuracy_mean for level in sweep.levels]))
        clean += sweep.levels[0].clean_accuracy * len(test["y"])
    total = sum(weights)
    pooled = np.average(np.stack(means), axis=0, weights=weights)
    clean /= total
    return {
        "sweep": config.analog_sweep,
        "draws": config.analog_draws,
        "levels": list(values),
        "clean_accuracy": clean,
        "accuracy_mean": [float(v) for v in pooled],
        "normalized_accuracy": [float(v / clean) for v in pooled],
    }


def _plot(config: DemoConfig, summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    nodes = list(summary["per_node"])
    show = 6
    fig = plt.figure(figsize=(10, 1.1 * len(nodes) + 4.5), layout="constrained")
    top, bottom = np.asarray(fig.subfigures(2, 1, height_ratios=[1.1 * len(nodes) + 0.4, 4.0]))
    top.suptitle("held-out test images: input | decoded by the node's own autoencoder", fontsize=10)
    axes = top.subplots(len(nodes), 2 * show, squeeze=False)
    for row, node_id in enumerate(nodes):
        recon = np.load(config.out / f"{node_id}.recon.npz")
        for k in range(show):
            for j, key in enumerate(("original", "reconstruction")):
                ax = axes[row, 2 * k + j]
                ax.set_xticks([])
                ax.set_yticks([])
                if k < len(recon[key]):
                    img = np.transpose(recon[key][k], (1, 2, 0)).squeeze()
                    ax.imshow(img, cmap="gray", vmin=0, vmax=1)
        axes[row, 0].set_ylabel(node_id, fontsize=9)
    if "analog" in summary:
        ax, ax_analog = bottom.subplots(1, 2, width_ratios=[3, 2])
        analog = summary["analog"]
        plain_label = "plain encoder" if "noise_aware" in summary else "analog encoder"
        ax_analog.plot(analog["levels"], analog["accuracy_mean"], "o-", label=plain_label)
        if "analog" in summary.get("noise_aware", {}):
            aware = summary["noise_aware"]
            ax_analog.plot(
                aware["analog"]["levels"],
                aware["analog"]["accuracy_mean"],
                "s-",
                label=f"noise-aware encoder ({aware['train_noise']})",
            )
        ax_analog.axhline(analog["clean_accuracy"], color="gray", ls="--", label="digital")
        ax_analog.set_xlabel(analog["sweep"].split("=")[0])
        ax_analog.set_ylabel("test accuracy (mean of draws)")
        ax_analog.set_title("encoders on a simulated analog device", fontsize=10)
        ax_analog.legend(fontsize=8)
    else:
        ax = bottom.subplots()
    labels = [*nodes, "all nodes", "baseline\n(raw pixels)"]
    values = [summary["per_node"][n]["accuracy"] for n in nodes]
    values += [summary["accuracy"], summary["baseline_accuracy"]]
    colors = ["tab:blue"] * len(nodes) + ["tab:green", "tab:gray"]
    ax.bar(labels, values, color=colors)
    for x, v in enumerate(values):
        ax.text(x, v + 0.005, f"{v:.3f}", ha="center", fontsize=8)
    ax.set_ylim(min(values) - 0.1, 1.02)
    ax.set_ylabel("test accuracy")
    ax.set_title(
        f"{summary['dataset']}: latent {summary['latent_dim']} "
        f"(compression {summary['compression_ratio']:.0f}x)",
        fontsize=10,
    )
    fig.savefig(config.out / "summary.png", dpi=110)
    plt.close(fig)


def _analog_line(label: str, analog: dict[str, Any]) -> str:
    parameter = analog["sweep"].split("=")[0]
    pairs = ", ".join(
        f"{level:g}: {acc:.3f}"
        for level, acc in zip(analog["levels"], analog["accuracy_mean"], strict=True)
    )
    return (
        f"{label} accuracy at {parameter} {pairs} "
        f"({analog['draws']} draws each; digital {analog['clean_accuracy']:.3f})"
    )


def _human_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"dataset            {summary['dataset']} across {summary['nodes']} nodes",
        f"latent             {summary['latent_dim']} ({summary['latent_dtype']}), "
        f"compression ratio {summary['compression_ratio']:.1f}x",
        f"bytes on the wire  {summary['uploaded_bytes']:,} uploaded vs "
        f"{summary['raw_bytes']:,} raw ({summary['uploaded_bytes'] / summary['raw_bytes']:.2f}x)",
        f"accuracy           {summary['accuracy']:.4f} end to end through the server "
        f"({summary['classifier_mode']} classifier)",
        f"baseline           {summary['baseline_accuracy']:.4f} (same classifier, raw pixels, "
        "centralised)",
    ]
    for node_id, node in summary["per_node"].items():
        lines.append(
            f"  {node_id:<16} accuracy {node['accuracy']:.4f} on {node['test_samples']} test "
            f"samples, {node['train_samples']} uploaded"
        )
    aware = summary.get("noise_aware")
    if aware is not None:
        lines.append(
            f"noise-aware        {aware['accuracy']:.4f} end to end with encoders trained under "
            f"{aware['train_noise']} (nodes aware-0..)"
        )
    if "analog" in summary:
        lines.append(_analog_line("analog encoders   ", summary["analog"]))
    if aware is not None and "analog" in aware:
        lines.append(_analog_line("  noise-aware     ", aware["analog"]))
    lines.append(f"time               {summary['seconds']:.1f} s")
    return "\n".join(lines) + "\n"
