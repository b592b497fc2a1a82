"""``latentedge edge``: one edge node's whole run.

Load and shard the local data and register with the server. Then, in ``--mode latents`` (the
default): train the autoencoder without labels, upload latents + labels, wait for the durable
acknowledgement and (with ``--evaluate``) classify the node's test split through the server.
In ``--mode finetune``: download the server's base model, fine-tune part of it on the labelled
shard, upload the compressed delta and classify the test split locally with the fine-tuned
model (``edge/transfer.py``). With ``--scheduled`` the round's plan picks the branch: a node
told to upload sends latents, the others fine-tune. Raw images never leave the node.
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
from common.errors import ConfigError, UplinkError
from common.records import EnergyProfile, NodeRegistration, Schedule
from common.tls import (
    ClientTls,
    add_client_tls_flags,
    add_client_token_flags,
    check_address,
    read_token,
)
from edge.privacy import check_noise_std

if TYPE_CHECKING:
    from collections.abc import Callable

    from common.datasets import Dataset
    from common.modelfile import ModelFile
    from common.models import AutoencoderConfig, ConvAutoencoder
    from common.types import FloatArray
    from edge.transfer import FinetuneConfig
    from edge.uplink import DownloadedModel, UplinkClient

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
    latent_noise: float = 0.0
    """Gaussian noise added to every latent the node sends (uploads and classification), std
    as a fraction of each latent dimension's std (``edge.privacy``; docs/privacy.md); 0 = none."""
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
    mode: str = "latents"
    """``latents`` (train an autoencoder, upload latents) or ``finetune`` (fine-tune the base
    model, upload a delta)."""
    trainable: str = "head"
    """What fine-tuning changes: ``head``, ``last-block``, ``bn``, ``all`` or ``adapters:RANK``."""
    delta_encoding: str = "fp16"
    """``fp32``, ``fp16``, ``int8`` or ``topk:FRACTION[+fp32|+fp16|+int8]``."""
    finetune_epochs: int = 0
    """Fine-tuning epochs (0 = 100)."""
    finetune_lr: float = 0.0
    """Fine-tuning step size (0 = 3e-2 for head, 3e-3 otherwise)."""
    model_cache: str = ""
    """Folder of downloaded models, named by hash (empty = ~/.cache/latentedge/models)."""
    cycles_per_mac: float = 1.0
    """CPU cycles per multiply-accumulate, to derive profile fields left at 0."""
    train_noise: str = ""
    """Noise-aware training of the encoder: a device_sim weight-noise spec (e.g.
    ``awgn:snr_db=10``) injected on every training step; empty = plain training."""
    tls_ca: str = ""
    """PEM CA of the server's certificate: connect with TLS (empty = plaintext, unless a client
    certificate is given)."""
    tls_cert: str = ""
    """PEM client certificate for mutual TLS."""
    tls_key: str = ""
    """PEM key of ``tls_cert``."""
    token: str = ""
    """This node's credential (``latentedge token issue NODE_ID``); prefer ``token_file`` or
    ``$LATENTEDGE_TOKEN`` (a token on a command line shows in ``ps``)."""
    token_file: str = ""
    """File holding this node's credential."""

    def __post_init__(self) -> None:
        if self.mode not in ("latents", "finetune"):
            raise ConfigError(f"edge.mode must be latents or finetune, got {self.mode!r}")
        if self.finetune_epochs < 0 or self.finetune_lr < 0:
            raise ConfigError(
                f"edge.finetune_epochs and edge.finetune_lr must be >= 0, got "
                f"{self.finetune_epochs} and {self.finetune_lr}"
            )
        if not self.cycles_per_mac > 0:
            raise ConfigError(f"edge.cycles_per_mac must be > 0, got {self.cycles_per_mac}")
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
        check_noise_std(self.latent_noise)


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
    "latent_noise",
    "export",
    "report",
    "retry_window_s",
    "mode",
    "trainable",
    "delta_encoding",
    "finetune_epochs",
    "finetune_lr",
    "model_cache",
    "cycles_per_mac",
    "train_noise",
    "tls_ca",
    "tls_cert",
    "tls_key",
    "token",
    "token_file",
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
    parser.add_argument(
        "--latent-noise",
        dest="latent_noise",
        type=float,
        help="defence: add Gaussian noise to the latents sent, std as a fraction of each latent "
        "dimension's std (0 = none; see docs/privacy.md)",
    )
    on_off = argparse.BooleanOptionalAction  # --x / --no-x: the command line beats the file
    parser.add_argument("--evaluate", action=on_off, default=None, help="classify test split")
    parser.add_argument("--export", help="export the encoder to ONNX in this directory")
    parser.add_argument("--report", help="write a JSON report of the run here")
    parser.add_argument("--reset", action=on_off, default=None, help="drop stored latents")
    parser.add_argument(
        "--scheduled", action=on_off, default=None, help="upload only when scheduled"
    )
    parser.add_argument(
        "--retry-window-s", dest="retry_window_s", type=float, help="retry window (60 s)"
    )
    parser.add_argument(
        "--mode", choices=["latents", "finetune"], help="upload latents (default) or a delta"
    )
    parser.add_argument(
        "--trainable", help="finetune: head (default) | last-block | bn | all | adapters:RANK"
    )
    parser.add_argument(
        "--delta-encoding",
        dest="delta_encoding",
        help="finetune: fp32 | fp16 (default) | int8 | topk:FRACTION[+fp16|+int8|+fp32]",
    )
    parser.add_argument(
        "--finetune-epochs", dest="finetune_epochs", type=int, help="fine-tuning epochs (100)"
    )
    parser.add_argument(
        "--finetune-lr", dest="finetune_lr", type=float, help="fine-tuning step size"
    )
    parser.add_argument(
        "--model-cache", dest="model_cache", help="downloaded models (~/.cache/latentedge/models)"
    )
    add_client_tls_flags(parser)
    add_client_token_flags(parser)
    parser.add_argument(
        "--train-noise",
        dest="train_noise",
        help="train the encoder noise-aware under this weight-noise spec, e.g. awgn:snr_db=10",
    )
    parser.add_argument(
        "--cycles-per-mac",
        dest="cycles_per_mac",
        type=float,
        help="CPU cycles per multiply-accumulate (profile fields left at 0 are derived; 1.0)",
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
    overrides.update({k: getattr(args, k) for k in _BOOL_KEYS if getattr(args, k) is not None})
    config = replace(config, **overrides)
    for key in ("server", "node_id"):
        if not getattr(config, key):
            raise ConfigError(f"--{key.replace('_', '-')} is required (or edge.{key} in --config)")
    check_address(config.server, "--server (edge.server)")
    finetune_config(config)  # refuse a bad --trainable / --delta-encoding before any work
    ClientTls.from_paths(config.tls_ca, config.tls_cert, config.tls_key)  # and bad TLS files
    read_token(config.token, config.token_file)  # and a bad token file
    if config.train_noise:
        from edge.trainer import TrainConfig

        TrainConfig(train_noise=config.train_noise)  # and a bad --train-noise
    return config, profile


def run(args: argparse.Namespace) -> int:
    """Run one edge node to completion."""
    config, profile = load_config(args)
    result = run_edge(config, profile)
    if result.get("mode") == "finetune":
        sys.stdout.write(
            f"node {result['node_id']}: fine-tuned {result['trainable']} of {result['model']} on "
            f"{result['samples']} samples; delta {result['delta_params']} parameters "
            f"({100 * result['uploaded_params_fraction']:.3g}% of the model), "
            f"{result['delta_bytes']} bytes ({result['delta_encoding']}); test accuracy "
            f"{result['accuracy']:.4f} (base model {result['base_accuracy']:.4f}) on "
            f"{result['test_samples']} samples\n"
        )
        return 0
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


def local_data(config: EdgeConfig, *, loaded: Dataset | None = None) -> Dataset:
    """This node's shard of its local dataset (never leaves the node).

    ``loaded``: the whole dataset ``config.data`` names, when already loaded.
    """
    from common.datasets import filter_classes, load_dataset, parse_classes, parse_shard, shard

    index, count = parse_shard(config.shard)
    data = load_dataset(config.data) if loaded is None else loaded
    if config.classes:
        data = filter_classes(data, parse_classes(config.classes))
    data = shard(data, index, count, skew=config.skew, seed=config.seed)
    if len(data.y_train) == 0:
        raise ConfigError(f"shard {config.shard} of {config.data!r} has no training samples")
    return data


def finetune_config(config: EdgeConfig) -> FinetuneConfig:
    """The node's fine-tuning settings (ConfigError on a bad trainable or delta encoding)."""
    from common.delta import DeltaEncoding
    from common.finetune import Trainable
    from edge.transfer import EPOCHS, FinetuneConfig

    return FinetuneConfig(
        trainable=Trainable.parse(config.trainable),
        encoding=DeltaEncoding.parse(config.delta_encoding),
        epochs=config.finetune_epochs or EPOCHS,
        learning_rate=config.finetune_lr,
        seed=config.seed,
        cache_dir=Path(config.model_cache),
    )


def _base_if_served(
    client: UplinkClient, config: EdgeConfig, ft: FinetuneConfig
) -> tuple[DownloadedModel, ModelFile] | None:
    """The server's base model, or None when it serves none (only allowed for latents)."""
    from edge.transfer import fetch_base

    try:
        return fetch_base(client, config.node_id, ft)
    except UplinkError as exc:
        if exc.code == "NOT_FOUND" and config.mode == "latents":
            logger.info("the server serves no base model: this node can only upload latents")
            return None
        raise


def _derived_profile(
    profile: EnergyProfile,
    *,
    config: EdgeConfig,
    data: Dataset,
    ae_config: AutoencoderConfig,
    ft: FinetuneConfig,
    base: tuple[DownloadedModel, ModelFile] | None,
) -> EnergyProfile:
    from common.models import ConvAutoencoder
    from common.zoo import flops_per_sample
    from edge.transfer import delta_bits_estimate, derive_profile, training_macs_per_sample
    from edge.uplink import label_dtype_for

    encode_macs = flops_per_sample(ConvAutoencoder(ae_config).encoder, data.input_shape)
    value_bits = 8 * np.dtype(config.latent_dtype).itemsize
    latent_bits = config.latent_dim * value_bits + 8 * label_dtype_for(data.num_classes).itemsize
    extra: dict[str, Any] = {}
    if base is not None:
        from common.finetune import prepare

        network = base[1].to_torch()
        prepare(network, ft.trainable, seed=ft.seed)
        extra = {
            "finetune_macs_per_sample": training_macs_per_sample(
                network, ft.trainable, data.input_shape, ft.epochs
            ),
            "delta_bits": delta_bits_estimate(network, ft.trainable, ft.encoding),
        }
    return derive_profile(
        profile,
        cycles_per_mac=config.cycles_per_mac,
        samples=len(data.y_train),
        encode_macs_per_sample=encode_macs,
        latent_bits_per_sample=latent_bits,
        **extra,
    )


@dataclass
class PreparedNode:
    """A node ready to take part in a round: its shard, models and report so far."""

    config: EdgeConfig
    data: Dataset
    ae_config: AutoencoderConfig
    ft: FinetuneConfig
    base: tuple[DownloadedModel, ModelFile] | None
    """The server's base model (None when it serves none, or not needed)."""
    registration: NodeRegistration
    """What the node registers with (its profile derived from its data and models)."""
    report: dict[str, Any]


@dataclass
class TrainedEncoder:
    """The encoder a node trained and uploaded latents of, with the noise it adds to them."""

    model: ConvAutoencoder
    noise: Callable[[FloatArray], FloatArray]


def prepare_node(
    client: UplinkClient,
    config: EdgeConfig,
    profile: EnergyProfile | None = None,
    *,
    data: Dataset | None = None,
) -> PreparedNode:
    """Load the node's shard, fetch the base model if needed and derive its profile.

    The only RPC is the base model's download; registering is the caller's step.

    Args:
        client: An open client to the server.
        config: The node's settings.
        profile: Its energy profile (fields left at 0 are derived here).
        data: The node's shard when already loaded (else :func:`local_data` of ``config``).
    """
    from common.models import AutoencoderConfig, compression_ratio

    data = local_data(config) if data is None else data
    c, h, w = data.input_shape
    ae_config = AutoencoderConfig(in_channels=c, height=h, width=w, latent_dim=config.latent_dim)
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
    ft = finetune_config(config)
    base = None
    if config.mode == "finetune" or config.scheduled:
        base = _base_if_served(client, config, ft)
    if profile is not None:
        profile = _derived_profile(
            profile, config=config, data=data, ae_config=ae_config, ft=ft, base=base
        )
        reg = replace(reg, profile=profile)
        report["profile"] = asdict(profile)
    return PreparedNode(config, data, ae_config, ft, base, reg, report)


def run_edge(config: EdgeConfig, profile: EnergyProfile | None = None) -> dict[str, Any]:
    """Run the node's branch (latents or fine-tune); return its report (also written if asked)."""
    from edge.uplink import RetryPolicy, UplinkClient

    started = time.perf_counter()
    tls = ClientTls.from_paths(config.tls_ca, config.tls_cert, config.tls_key)
    retry = RetryPolicy(window_s=config.retry_window_s)
    token = read_token(config.token, config.token_file)
    with UplinkClient(config.server, retry=retry, tls=tls, token=token) as client:
        node = prepare_node(client, config, profile)
        report = node.report
        stored = client.register(node.registration)
        logger.info("registered with %s (%d samples already stored)", config.server, stored)
        run_branch(client, node, _branch(client, config, node.base is not None, report))
    report["seconds"] = time.perf_counter() - started
    _write_report(config, report)
    return report


def run_branch(client: UplinkClient, node: PreparedNode, branch: str) -> TrainedEncoder | None:
    """Run ``branch`` (``latents``, ``finetune`` or ``skip``) of a prepared, registered node.

    Updates ``node.report``; returns the trained encoder of the latents branch.
    """
    from edge.transfer import run_finetune

    config = node.config
    if branch == "finetune":
        node.report.update(
            run_finetune(
                client, config.node_id, node.data, node.ft, base=node.base, export_dir=config.export
            )
        )
    elif branch == "latents":
        node.report["mode"] = "latents"
        return _run_latents(client, config, node.data, node.ae_config, node.report)
    return None


def branch_for(sched: Schedule, *, has_base: bool) -> str:
    """``latents`` when selected to upload, else ``finetune`` (``skip`` without a base model)."""
    if sched.upload:
        return "latents"
    return "finetune" if has_base else "skip"


def _branch(
    client: UplinkClient, config: EdgeConfig, has_base: bool, report: dict[str, Any]
) -> str:
    """``latents``, ``finetune`` or ``skip``: the configured mode, or the round's decision."""
    if not config.scheduled:
        return config.mode
    sched = client.schedule(config.node_id)
    report["schedule"] = asdict(sched)
    branch = branch_for(sched, has_base=has_base)
    if branch == "latents":
        logger.info("round %d: upload with %.3g Hz", sched.round, sched.bandwidth_hz)
    elif branch == "finetune":
        logger.info("round %d: not selected to upload: fine-tuning locally", sched.round)
    else:
        logger.info("round %d: not selected to upload", sched.round)
        report["skipped_upload"] = True
    return branch


def upload_latents(
    client: UplinkClient,
    config: EdgeConfig,
    data: Dataset,
    ae_config: AutoencoderConfig,
    report: dict[str, Any],
) -> TrainedEncoder:
    """Train the autoencoder without labels and upload the latents + labels."""
    from edge.privacy import LatentNoise, LatentNoiseConfig
    from edge.trainer import TrainConfig, encode, train_autoencoder

    train_config = TrainConfig(seed=config.seed, train_noise=config.train_noise)
    report["train_noise"] = config.train_noise
    if config.epochs:
        train_config = replace(train_config, epochs=config.epochs)

    def on_epoch(epoch: int, loss: float) -> None:
        if epoch == 1 or epoch % 10 == 0 or epoch == train_config.epochs:
            logger.info("autoencoder epoch %d/%d: loss %.5f", epoch, train_config.epochs, loss)

    t0 = time.perf_counter()
    model = train_autoencoder(data.x_train, ae_config, train_config, on_epoch=on_epoch)
    report["train_seconds"] = time.perf_counter() - t0
    latents = encode(model, data.x_train)
    # calibrated on the clean training latents; fresh OS-entropy noise on everything sent
    noise = LatentNoise(LatentNoiseConfig(config.latent_noise), latents)
    report["latent_noise"] = config.latent_noise
    if config.latent_noise:
        logger.info(
            "adding latent noise: std %g x each latent dimension's std", config.latent_noise
        )
    ack = client.push_latents(
        config.node_id,
        noise(latents),
        data.y_train,
        num_classes=data.num_classes,
        encoding=config.latent_dtype,
    )
    report.update(
        samples=ack.samples, uploaded_bytes=ack.payload_bytes, stored_samples=ack.stored_samples
    )
    return TrainedEncoder(model, noise)


def evaluate_latents(
    client: UplinkClient,
    config: EdgeConfig,
    data: Dataset,
    encoder: TrainedEncoder,
    report: dict[str, Any],
    *,
    wait: bool = True,
) -> None:
    """Classify the node's test split through the server; adds accuracy fields to ``report``.

    ``wait``: first wait for a classifier that covers the node.
    """
    from edge.trainer import encode

    if not len(data.y_test):
        return
    if wait:
        client.wait_for_classifier(config.node_id)
    pred = client.classify(
        config.node_id,
        encoder.noise(encode(encoder.model, data.x_test)),
        encoding=config.latent_dtype,
    )
    correct = int(np.sum(pred.labels == data.y_test))
    report.update(
        accuracy=correct / len(data.y_test),
        correct=correct,
        test_samples=len(data.y_test),
        classifier_version=pred.classifier_version,
    )


def _run_latents(
    client: UplinkClient,
    config: EdgeConfig,
    data: Dataset,
    ae_config: AutoencoderConfig,
    report: dict[str, Any],
) -> TrainedEncoder:
    """Train the autoencoder, upload latents, classify through the server, export."""
    from edge.trainer import reconstruct

    encoder = upload_latents(client, config, data, ae_config, report)
    if config.evaluate:
        evaluate_latents(client, config, data, encoder, report)
    model = encoder.model
    sample = data.x_test if len(data.x_test) else data.x_train
    recon = reconstruct(model, sample[:256])
    report["reconstruction_mse"] = float(np.mean((recon - sample[:256]) ** 2))
    if config.export:
        report.update(_export(config, model, sample, data))
    if config.report:
        path = Path(config.report)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            path.with_suffix(".recon.npz"), original=sample[:16], reconstruction=recon[:16]
        )
    return encoder


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
