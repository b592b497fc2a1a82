"""``latentedge train``: train a zoo network (optionally noise-aware) and export it to ONNX.

    latentedge train --model lenet --data digits [--train-noise awgn:snr_db=5] [--norm l1]
        [--lr 3e-3] [--epochs 30] [--device cpu|cuda] [--seed 0] --out model.onnx

The ONNX graph takes the dataset's samples as stored, cast to float32, in NCHW (MNIST: values
0-255; digits: 0-16): the scaling to [0, 1] is part of the graph. Beside it: ``model.json``
(clean test accuracy in torch and in onnxruntime, settings, seconds) and ``model.test.npz``
(the test split as stored: ``x``, ``y``), so ``latentedge simulate model.onnx --data
model.test.npz`` runs it on a simulated analog device unchanged. :func:`train_job` is also what
``latentedge pretrain`` trains with.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.errors import ConfigError, ModelExportError

if TYPE_CHECKING:
    from torch import nn

    from common.datasets import Dataset
    from common.finetune import TrainResult
    from common.zoo import ModelSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainJob:
    """One supervised training of a zoo network on a dataset (``train`` and ``pretrain``)."""

    data: str = "digits"
    """``digits`` or a dataset path."""
    classes: str = ""
    """Comma-separated class filter (empty = all); the model keeps every class's output."""
    model: str = "lenet"
    """Zoo network (``common.zoo_spec.MODEL_NAMES``)."""
    norm: str = ""
    """``none``, ``bn``, ``l1``, ``topk``; empty = the network's default."""
    epochs: int = 30
    """Passes over the training data."""
    batch_size: int = 64
    """Samples per step."""
    learning_rate: float = 3e-3
    """Peak AdamW step size (one-cycle schedule)."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    augment: str = "none"
    """``none``, ``shift`` or ``shift+flip`` (natural images)."""
    train_noise: str = ""
    """A device_sim weight-noise spec injected on every training step (noise-aware training)."""
    weight_clip: float = 0.0
    """Clip Conv/Linear weights to ``±k·σ`` of each tensor after every step (0 = off)."""
    seed: int = 0
    """Seed of initialisation, batch order and training noise."""
    device: str = "cpu"
    """``cpu`` or ``cuda``."""
    threads: int = 0
    """torch intra-op threads (0 = torch's default)."""

    def __post_init__(self) -> None:
        if self.augment not in ("none", "shift", "shift+flip"):
            raise ConfigError(f"--augment must be none, shift or shift+flip, got {self.augment!r}")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.threads < 0:
            raise ConfigError(f"--threads must be >= 0, got {self.threads}")
        if not 0.0 <= self.weight_clip < math.inf:
            raise ConfigError(
                f"--weight-clip must be a finite number of standard deviations >= 0 "
                f"(0 = off), got {self.weight_clip}"
            )


@dataclass(frozen=True)
class Trained:
    """What :func:`train_job` returns."""

    spec: ModelSpec
    model: nn.Module
    """In eval mode, on the CPU, without training noise."""
    data: Dataset
    result: TrainResult
    test_accuracy: float
    seconds: float


def add_training_flags(parser: argparse.ArgumentParser, defaults: TrainJob) -> None:
    """The flags of a :class:`TrainJob` (shared by ``train`` and ``pretrain``)."""
    d = defaults
    parser.add_argument("--data", default=d.data, help="digits (default) or a dataset path")
    parser.add_argument("--classes", default=d.classes, help="class filter, e.g. 0,1,2,3")
    parser.add_argument("--model", default=d.model, help="zoo network (default %(default)s)")
    parser.add_argument("--norm", default=d.norm, help="none | bn | l1 | topk (network default)")
    parser.add_argument("--epochs", type=int, default=d.epochs, help="epochs (%(default)s)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="batch size")
    parser.add_argument("--lr", type=float, default=d.learning_rate, help="peak learning rate")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW decay")
    parser.add_argument(
        "--augment", default=d.augment, help="none | shift (digits) | shift+flip (natural images)"
    )
    parser.add_argument(
        "--train-noise", default=d.train_noise, help="weight-noise spec for noise-aware training"
    )
    parser.add_argument(
        "--weight-clip",
        type=float,
        default=d.weight_clip,
        metavar="K",
        help="clip Conv/Linear weights to ±K std of each tensor after every step (0 = off)",
    )
    parser.add_argument("--seed", type=int, default=d.seed, help="seed (0)")
    parser.add_argument("--device", default=d.device, help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=d.threads, help="torch threads (0 = auto)")


def job_from_args(args: argparse.Namespace) -> TrainJob:
    """The :class:`TrainJob` the flags of :func:`add_training_flags` describe."""
    return TrainJob(
        data=args.data,
        classes=args.classes,
        model=args.model,
        norm=args.norm,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        augment=args.augment,
        train_noise=args.train_noise,
        weight_clip=args.weight_clip,
        seed=args.seed,
        device=args.device,
        threads=args.threads,
    )


def load_job_data(job: TrainJob) -> tuple[Dataset, ModelSpec]:
    """Check the device, set the threads, load (and filter) the data; the network it needs.

    Shared by :func:`train_job` and ``train --in-memory`` (``server/inmemory_cli.py``).
    """
    import torch

    from common.datasets import filter_classes, load_dataset, parse_classes
    from common.zoo import ModelSpec

    if job.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here")
    if job.threads:
        torch.set_num_threads(job.threads)
    data = load_dataset(job.data)
    if job.classes:
        data = filter_classes(data, parse_classes(job.classes))
    return data, ModelSpec(job.model, *data.input_shape, data.num_classes, job.norm)


def train_job(job: TrainJob, *, what: str = "train") -> Trained:
    """Load the data, build the network, train every parameter, score the test split."""
    from common.finetune import Trainable, TrainSettings, accuracy, train_network
    from common.noise_aware import inject_weight_noise, training_spec
    from common.zoo import build_model, parameter_count

    spec_check = training_spec(job.train_noise) if job.train_noise else None
    started = time.perf_counter()
    data, spec = load_job_data(job)
    settings = TrainSettings(
        epochs=job.epochs,
        batch_size=job.batch_size,
        learning_rate=job.learning_rate,
        weight_decay=job.weight_decay,
        seed=job.seed,
        augment=job.augment != "none",
        hflip=job.augment == "shift+flip",
        device=job.device,
        weight_clip_sigma=job.weight_clip,
    )
    model = build_model(spec, seed=job.seed).to(job.device)
    noise = inject_weight_noise(model, spec_check, seed=job.seed) if spec_check else None
    logger.info(
        "%s: %s (norm %s, %d parameters) on %d samples of %s%s",
        what,
        spec.name,
        spec.norm_kind,
        parameter_count(model),
        len(data.y_train),
        data.name,
        f", training noise {job.train_noise}" if job.train_noise else "",
    )

    def on_epoch(epoch: int, loss: float) -> None:
        if epoch == 1 or epoch % 5 == 0 or epoch == job.epochs:
            logger.info("%s epoch %d/%d: loss %.4f", what, epoch, job.epochs, loss)

    result = train_network(
        model, data.x_train, data.y_train, Trainable("all"), settings, on_epoch=on_epoch
    )
    if noise is not None:
        noise.remove()
    model.cpu().eval()
    return Trained(
        spec=spec,
        model=model,
        data=data,
        result=result,
        test_accuracy=accuracy(model, data.x_test, data.y_test),
        seconds=time.perf_counter() - started,
    )


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``train`` flags."""
    from server.inmemory_cli import add_in_memory_flags

    add_training_flags(parser, TrainJob())
    add_in_memory_flags(parser)
    parser.add_argument("--out", type=Path, required=True, help="ONNX file to write")


def _stored_input(net: nn.Module, scale: float) -> nn.Module:
    """``net`` reading samples as stored: ``net(x / scale)`` (the scaling is in the graph)."""
    import torch
    from torch import nn

    class StoredInput(nn.Module):
        inverse_scale: torch.Tensor

        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.register_buffer("inverse_scale", torch.tensor(1.0 / scale))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.net(x * self.inverse_scale)
            return out

    return StoredInput().eval()


def run(args: argparse.Namespace) -> int:
    """Train, export, report."""
    from common.datasets import check_dataset_spec
    from common.zoo_spec import check_model_name

    # the flags first, before torch and onnx are imported: a typo fails at once
    out: Path = args.out
    if out.suffix != ".onnx":
        raise ConfigError(f"--out must name an .onnx file, got {str(out)!r}")
    job = job_from_args(args)
    check_model_name(job.model, job.norm)
    check_dataset_spec(job.data)

    import numpy as np

    from common.datasets import stored_scale
    from common.export import export_network
    from common.zoo import parameter_count

    in_memory: dict[str, Any] = {}
    if getattr(args, "in_memory", ""):
        from server.inmemory_cli import config_from_args, in_memory_job, report_section

        in_memory_config = config_from_args(args)
        trained, in_memory_result = in_memory_job(job, args.in_memory, in_memory_config)
        in_memory = report_section(args.in_memory, in_memory_config, in_memory_result)
    else:
        trained = train_job(job)
    scale = stored_scale(job.data)
    data = trained.data
    x_test = np.ascontiguousarray(data.x_test * np.float32(scale))
    wrapped = _stored_input(trained.model, scale)
    sample = x_test[:64] if len(x_test) else np.ascontiguousarray(data.x_train[:64] * scale)
    diff = export_network(wrapped, out, sample)
    test_path = out.with_suffix(".test.npz")
    np.savez_compressed(test_path, x=x_test, y=data.y_test)
    onnx_accuracy = _onnx_accuracy(out, x_test, data.y_test)
    report: dict[str, Any] = {
        "model": trained.spec.name,
        "spec": json.loads(trained.spec.to_json()),
        "norm": trained.spec.norm_kind,
        "parameters": parameter_count(trained.model),
        "dataset": data.name,
        "train_samples": len(data.y_train),
        "test_samples": len(data.y_test),
        "train_noise": job.train_noise,
        "weight_clip": job.weight_clip,
        "settings": {
            "epochs": job.epochs,
            "batch_size": job.batch_size,
            "learning_rate": job.learning_rate,
            "weight_decay": job.weight_decay,
            "augment": job.augment,
            "seed": job.seed,
            "device": job.device,
        },
        "input_scale": scale,
        "test_accuracy": trained.test_accuracy,
        "onnx_test_accuracy": onnx_accuracy,
        "onnx_max_abs_diff": diff,
        "onnx": str(out),
        "test_data": str(test_path),
        "steps": trained.result.steps,
        "seconds": trained.seconds,
    }
    if in_memory:
        report["in_memory"] = in_memory
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    sys.stdout.write(
        f"trained {trained.spec.name} (norm {trained.spec.norm_kind}"
        f"{', noise-aware ' + job.train_noise if job.train_noise else ''}"
        f"{', in-memory ' + args.in_memory + ' ' + args.algorithm if in_memory else ''}) on "
        f"{len(data.y_train)} samples of {data.name}: clean test accuracy "
        f"{trained.test_accuracy:.4f} (onnxruntime {onnx_accuracy:.4f}), {trained.seconds:.1f} s\n"
        f"wrote {out}, {out.with_suffix('.json')}, {test_path}\n"
        f"next: latentedge simulate {out} --data {test_path} --noise awgn:snr_db=10\n"
    )
    return 0


def _onnx_accuracy(path: Path, x: Any, y: Any) -> float:
    import numpy as np
    import onnxruntime as ort

    if len(y) == 0:
        return 0.0
    correct = 0
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for start in range(0, len(y), 512):
            (scores,) = session.run(None, {"image": x[start : start + 512]})
            correct += int(np.sum(np.argmax(scores, axis=1) == y[start : start + 512]))
    except Exception as exc:  # onnxruntime raises its own untyped exceptions
        raise ModelExportError(f"onnxruntime cannot run the export {str(path)!r}: {exc}") from exc
    return correct / len(y)
