"""``latentedge pretrain``: train a base model on the server's source data, for nodes to fine-tune.

Writes a model file (safetensors, see :mod:`common.modelfile`) that ``latentedge server
--base-model`` serves, a JSON report beside it, and optionally the network as ONNX.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainConfig:
    """What ``latentedge pretrain`` trains."""

    data: str = "digits"
    """Source dataset: ``digits`` or a path."""
    classes: str = ""
    """Comma-separated source classes (empty = all); the model keeps every class's output."""
    model: str = "lenet"
    """Zoo network (``common.zoo.MODEL_NAMES``)."""
    out: Path = Path("base.safetensors")
    """Model file to write."""
    epochs: int = 30
    """Passes over the source data."""
    batch_size: int = 64
    """Samples per step."""
    learning_rate: float = 3e-3
    """Peak AdamW step size (one-cycle schedule)."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    augment: str = "none"
    """``none``, ``shift`` (random shifts by up to 1/8 of the size) or ``shift+flip`` (also
    left-right flips, for natural images)."""
    seed: int = 0
    """Seed of initialisation and batch order."""
    device: str = "cpu"
    """``cpu`` or ``cuda``."""
    onnx: str = ""
    """Also export the network to this ONNX file (checked against torch)."""
    threads: int = 0
    """torch intra-op threads (0 = torch's default)."""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``pretrain`` flags."""
    from common.zoo import MODEL_NAMES

    d = PretrainConfig()
    parser.add_argument("--data", default=d.data, help="digits (default) or a dataset path")
    parser.add_argument("--classes", default=d.classes, help="source classes, e.g. 0,1,2,3")
    parser.add_argument("--model", default=d.model, choices=list(MODEL_NAMES), help="network")
    parser.add_argument("--out", type=Path, default=d.out, help="model file to write")
    parser.add_argument("--epochs", type=int, default=d.epochs, help=f"epochs ({d.epochs})")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="batch size (64)")
    parser.add_argument("--lr", type=float, default=d.learning_rate, help="peak learning rate")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW decay")
    parser.add_argument(
        "--augment",
        default=d.augment,
        choices=["none", "shift", "shift+flip"],
        help="data augmentation (none; shift for digits, shift+flip for natural images)",
    )
    parser.add_argument("--seed", type=int, default=d.seed, help="seed (0)")
    parser.add_argument("--device", default=d.device, choices=["cpu", "cuda"], help="device")
    parser.add_argument("--onnx", default=d.onnx, help="also export the network to this file")
    parser.add_argument("--threads", type=int, default=d.threads, help="torch threads (0 = auto)")


def run(args: argparse.Namespace) -> int:
    """Pre-train and print a one-paragraph summary."""
    config = PretrainConfig(
        data=args.data,
        classes=args.classes,
        model=args.model,
        out=args.out,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        augment=args.augment,
        seed=args.seed,
        device=args.device,
        onnx=args.onnx,
        threads=args.threads,
    )
    report = pretrain(config)
    sys.stdout.write(
        f"pretrained {report['model']} ({report['parameters']:,} parameters) on "
        f"{report['train_samples']} samples of {report['dataset']}: test accuracy "
        f"{report['test_accuracy']:.4f}, {report['seconds']:.1f} s\n"
        f"wrote {report['out']} (sha256 {report['hash']})\n"
    )
    if report.get("onnx"):
        sys.stdout.write(f"wrote {report['onnx']}\n")
    return 0


def pretrain(config: PretrainConfig) -> dict[str, Any]:
    """Train the base model on the source data; write the model file and its report."""
    import torch

    from common.datasets import filter_classes, load_dataset, parse_classes
    from common.finetune import Trainable, TrainSettings, accuracy, train_network
    from common.modelfile import from_torch, write_model_file
    from common.zoo import ModelSpec, build_model, parameter_count

    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here")
    if config.threads:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    data = load_dataset(config.data)
    if config.classes:
        data = filter_classes(data, parse_classes(config.classes))
    spec = ModelSpec(config.model, *data.input_shape, data.num_classes)
    settings = TrainSettings(
        epochs=config.epochs,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        seed=config.seed,
        augment=config.augment != "none",
        hflip=config.augment == "shift+flip",
        device=config.device,
    )
    model = build_model(spec, seed=config.seed)

    def on_epoch(epoch: int, loss: float) -> None:
        if epoch == 1 or epoch % 5 == 0 or epoch == config.epochs:
            logger.info("pretrain epoch %d/%d: loss %.4f", epoch, config.epochs, loss)

    logger.info(
        "pretraining %s (%d parameters) on %d samples of %s",
        spec.name,
        parameter_count(model),
        len(data.y_train),
        data.name,
    )
    result = train_network(
        model, data.x_train, data.y_train, Trainable("all"), settings, on_epoch=on_epoch
    )
    model.cpu()
    test_acc = accuracy(model, data.x_test, data.y_test)
    meta = {
        "source_data": data.name,
        "source_classes": config.classes or "all",
        "source_test_accuracy": f"{test_acc:.6f}",
        "seed": str(config.seed),
    }
    digest = write_model_file(from_torch(spec, model, meta), config.out)
    report: dict[str, Any] = {
        "model": spec.name,
        "spec": json.loads(spec.to_json()),
        "parameters": parameter_count(model),
        "dataset": data.name,
        "train_samples": len(data.y_train),
        "test_samples": len(data.y_test),
        "test_accuracy": test_acc,
        "epochs": result.epochs,
        "steps": result.steps,
        "out": str(config.out),
        "hash": digest,
    }
    if config.onnx:
        from common.export import export_network

        sample = data.x_test[:64] if len(data.x_test) else data.x_train[:64]
        report["onnx"] = config.onnx
        report["onnx_max_abs_diff"] = export_network(model, config.onnx, sample)
    report["seconds"] = time.perf_counter() - started
    Path(config.out).with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    return report
