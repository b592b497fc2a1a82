"""``latentedge edge``: one edge node's whole run.

Load and shard the local data, register with the server, train the autoencoder without
labels, upload latents + labels, wait for the durable acknowledgement and (with
``--evaluate``) classify the node's test split through the server. Raw images never leave.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from common.config import read_tables
from common.constants import RETRY_WINDOW_S
from common.errors import ConfigError
from common.records import EnergyProfile, NodeRegistration

if TYPE_CHECKING:
    from common.datasets import Dataset
    from common.models import ConvAutoencoder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EdgeConfig:
    """Settings of one edge node (TOML table ``[edge]``; ``[profile]`` holds its EnergyProfile)."""

    server: str = ""
    """HOST:PORT of the latentedge server."""
    node_id: str = ""
    """This node's id (letters, digits, '_', '.', '-')."""
    data: str = "digits"
    """Dataset: ``digits`` or a path (.npz, IDX .gz file or folder, image folder)."""
    shard: str = "0/1"
    """``i/n``: this node's part of an exact partition of the data into n shards."""
    skew: float = 0.0
    """Non-IID class skew of the shards in [0, 1): 0 = IID, larger = more home-class heavy."""
    classes: str = ""
    """Comma-separated class filter (e.g. ``0,1,2``); empty = all classes."""
    latent_dim: int = 16
    """Latent vector length (compression ratio = input elements / latent_dim)."""
    epochs: int = 0
    """Autoencoder epochs; 0 = the trainer's default."""
    seed: int = 0
    """Seed of sharding and training."""
    latent_dtype: str = "float32"
    """Wire encoding of latents: float32, float16 or int8."""
    evaluate: bool = False
    """Classify the test split through the server and report accuracy."""
    export: str = ""
    """Directory to export the encoder to ONNX into; empty = no export."""
    report: str = ""
    """Write a JSON report of the run to this path; empty = none."""
    reset: bool = False
    """Drop latents the server stores for this node before registering."""
    scheduled: bool = False
    """Ask the server's round schedule first and upload only when selected."""
    retry_window_s: float = RETRY_WINDOW_S
    """Seconds to keep retrying an unreachable server before failing."""

    def __post_init__(self) -> None:
        if self.latent_dtype not in ("float32", "float16", "int8"):
            raise ConfigError(
                f"edge.latent_dtype must be float32, float16 or int8, got {self.latent_dtype!r}"
            )
        if self.retry_window_s < 0:
            raise ConfigError(f"edge.retry_window_s must be >= 0, got {self.retry_window_s}")
        if self.latent_dim < 1:
            raise ConfigError(f"edge.latent_dim must be >= 1, got {self.latent_dim}")
        if self.epochs < 0:
            raise ConfigError(f"edge.epochs must be >= 0, got {self.epochs}")


_FLAG_KEYS = (
    "server",
    "node_id",
    "data",
    "shard",
    "skew",
    "classes",
    "latent_dim",
    "epochs",
    "seed",
    "latent_dtype",
    "export",
    "report",
    "retry_window_s",
)
_BOOL_KEYS = ("evaluate", "reset", "scheduled")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``edge`` flags."""
    parser.add_argument("--config", type=Path, help="TOML file with [edge] (and [profile])")
    parser.add_argument("--server", help="HOST:PORT of the server")
    parser.add_argument("--node-id", dest="node_id", help="this node's id")
    parser.add_argument("--data", help="digits | PATH (.npz, IDX .gz, image folder)")
    parser.add_argument("--shard", help="i/n: this node's part of n exact shards (default 0/1)")
    parser.add_argument("--skew", type=float, help="non-IID class skew in [0, 1) (default 0)")
    parser.add_argument("--classes", help="comma-separated class filter, e.g. 0,1,2")
    parser.add_argument("--latent-dim", dest="latent_dim", type=int, help="latent size (16)")
    parser.add_argument("--epochs", type=int, help="autoencoder epochs")
    parser.add_argument("--seed", type=int, help="seed (0)")
    parser.add_argument(
        "--latent-dtype", dest="latent_dtype", choices=["float32", "float16", "int8"]
    )
    parser.add_argument("--evaluate", action="store_true", default=None, help="classify test split")
    parser.add_argument("--export", help="export the encoder to ONNX in this directory")
    parser.add_argument("--report", help="write a JSON report of the run here")
    parser.add_argument("--reset", action="store_true", default=None, help="drop stored latents")
    parser.add_argument(
        "--scheduled", action="store_true", default=None, help="upload only when scheduled"
    )
    parser.add_argument(
        "--retry-window-s", dest="retry_window_s", type=float, help="retry window (60 s)"
    )


def load_config(args: argparse.Namespace) -> tuple[EdgeConfig, EnergyProfile | None]:
    """The config file (if any) overlaid with the flags given; checks required fields."""
    tables = (
        read_tables(args.config, {"edge": EdgeConfig, "profile": EnergyProfile})
        if args.config
        else {}
    )
    config: EdgeConfig = tables.get("edge", EdgeConfig())
    profile: EnergyProfile | None = tables.get("profile")
    overrides: dict[str, Any] = {
        k: getattr(args, k) for k in _FLAG_KEYS if getattr(args, k) is not None
    }
    overrides.update({k: True for k in _BOOL_KEYS if getattr(args, k)})
    config = replace(config, **overrides)
    for key in ("server", "node_id"):
        if not getattr(config, key):
            raise ConfigError(f"--{key.replace('_', '-')} is required (or edge.{key} in --config)")
    return config, profile


def run(args: argparse.Namespace) -> int:
    """Run one edge node to completion."""
    config, profile = load_config(args)
    result = run_edge(config, profile)
    summary = f"node {result['node_id']}: uploaded {result['samples']} samples"
    summary += (
        f" ({result['uploaded_bytes']} bytes, compression {result['compression_ratio']:.1f}x)"
    )
    if result.get("skipped_upload"):
        summary = f"node {result['node_id']}: not scheduled this round; nothing uploaded"
    if "accuracy" in result:
        summary += f"; test accuracy through the server {result['accuracy']:.4f}"
        summary += f" on {result['test_samples']} samples"
    sys.stdout.write(summary + "\n")
    return 0


def _local_data(config: EdgeConfig) -> Dataset:
    """This node's shard of its local dataset (never leaves the node)."""
    from common.datasets import filter_classes, load_dataset, parse_classes, parse_shard, shard

    index, count = parse_shard(config.shard)
    data = load_dataset(config.data)
    if config.classes:
        data = filter_classes(data, parse_classes(config.classes))
    data = shard(data, index, count, skew=config.skew, seed=config.seed)
    if len(data.y_train) == 0:
        raise ConfigError(f"shard {config.shard} of {config.data!r} has no training samples")
    return data


def run_edge(config: EdgeConfig, profile: EnergyProfile | None = None) -> dict[str, Any]:
    """Train, upload and optionally evaluate; return the run's report (also written if asked)."""
    from common.models import AutoencoderConfig, compression_ratio
    from edge.trainer import TrainConfig, encode, reconstruct, train_autoencoder
    from edge.uplink import RetryPolicy, UplinkClient

    started = time.perf_counter()
    data = _local_data(config)
    c, h, w = data.input_shape
    ae_config = AutoencoderConfig(in_channels=c, height=h, width=w, latent_dim=config.latent_dim)
    train_config = TrainConfig(seed=config.seed)
    if config.epochs:
        train_config = replace(train_config, epochs=config.epochs)
    logger.info(
        "node %s: %d train / %d test samples of %s, input %dx%dx%d, latent %d",
        config.node_id,
        len(data.y_train),
        len(data.y_test),
        data.name,
        c,
        h,
        w,
        config.latent_dim,
    )
    report: dict[str, Any] = {
        "node_id": config.node_id,
        "dataset": data.name,
        "latent_dim": config.latent_dim,
        "input_shape": [c, h, w],
        "compression_ratio": compression_ratio(ae_config),
        "latent_dtype": config.latent_dtype,
        "samples": 0,
        "uploaded_bytes": 0,
        # raw images as 8-bit pixels, the cheapest lossless form they could travel in
        "raw_bytes": int(data.x_train.size),
    }
    reg = NodeRegistration(
        node_id=config.node_id,
        latent_dim=config.latent_dim,
        num_classes=data.num_classes,
        samples=len(data.y_train),
        profile=profile,
        reset=config.reset,
    )
    with UplinkClient(config.server, retry=RetryPolicy(window_s=config.retry_window_s)) as client:
        stored = client.register(reg)
        logger.info("registered with %s (%d samples already stored)", config.server, stored)
        if config.scheduled:
            sched = client.schedule(config.node_id)
            report["schedule"] = asdict(sched)
            if not sched.upload:
                logger.info("round %d: not selected to upload", sched.round)
                report["skipped_upload"] = True
                _write_report(config, report)
                return report
            logger.info("round %d: upload with %.3g Hz", sched.round, sched.bandwidth_hz)

        def on_epoch(epoch: int, loss: float) -> None:
            if epoch == 1 or epoch % 10 == 0 or epoch == train_config.epochs:
                logger.info("autoencoder epoch %d/%d: loss %.5f", epoch, train_config.epochs, loss)

        t0 = time.perf_counter()
        model = train_autoencoder(data.x_train, ae_config, train_config, on_epoch=on_epoch)
        report["train_seconds"] = time.perf_counter() - t0
        ack = client.push_latents(
            config.node_id,
            encode(model, data.x_train),
            data.y_train,
            num_classes=data.num_classes,
            encoding=config.latent_dtype,
        )
        report.update(
            samples=ack.samples, uploaded_bytes=ack.payload_bytes, stored_samples=ack.stored_samples
        )
        if config.evaluate and len(data.y_test):
            client.wait_for_classifier(config.node_id)
            pred = client.classify(
                config.node_id, encode(model, data.x_test), encoding=config.latent_dtype
            )
            correct = int(np.sum(pred.labels == data.y_test))
            report.update(
                accuracy=correct / len(data.y_test),
                correct=correct,
                test_samples=len(data.y_test),
                classifier_version=pred.classifier_version,
            )
    sample = data.x_test if len(data.x_test) else data.x_train
    recon = reconstruct(model, sample[:256])
    report["reconstruction_mse"] = float(np.mean((recon - sample[:256]) ** 2))
    if config.export:
        report.update(_export(config, model, sample, data))
    report["seconds"] = time.perf_counter() - started
    _write_report(config, report)
    if config.report:
        np.savez_compressed(
            Path(config.report).with_suffix(".recon.npz"),
            original=sample[:16],
            reconstruction=recon[:16],
        )
    return report


def _export(
    config: EdgeConfig, model: ConvAutoencoder, sample: np.ndarray, data: Dataset
) -> dict[str, Any]:
    """Export the encoder to ONNX (checked against torch) beside the node's test split."""
    from common.export import export_encoder

    out = Path(config.export)
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / f"encoder_{config.node_id}.onnx"
    diff = export_encoder(model, onnx_path, sample[:64])
    np.savez_compressed(out / f"test_{config.node_id}.npz", x=data.x_test, y=data.y_test)
    logger.info("exported encoder to %s (max |onnx - torch| = %.2e)", onnx_path, diff)
    return {"onnx": str(onnx_path), "onnx_max_abs_diff": diff}


def _write_report(config: EdgeConfig, report: dict[str, Any]) -> None:
    if config.report:
        path = Path(config.report)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
