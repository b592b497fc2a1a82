"""``latentedge pretrain``: train a base model on the server's source data, for nodes to fine-tune.

Writes a model file (safetensors, see :mod:`common.modelfile`) that ``latentedge server
--base-model`` serves, a JSON report beside it, and optionally the network as ONNX.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from server.train_cli import TrainJob, add_training_flags, job_from_args, train_job

logger = logging.getLogger(__name__)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``pretrain`` flags."""
    add_training_flags(parser, TrainJob())
    parser.add_argument(
        "--out", type=Path, default=Path("base.safetensors"), help="model file to write"
    )
    parser.add_argument("--onnx", default="", help="also export the network to this file")


def run(args: argparse.Namespace) -> int:
    """Pre-train and print a short summary."""
    report = pretrain(job_from_args(args), args.out, onnx=args.onnx)
    sys.stdout.write(
        f"pretrained {report['model']} ({report['parameters']:,} parameters) on "
        f"{report['train_samples']} samples of {report['dataset']}: test accuracy "
        f"{report['test_accuracy']:.4f}, {report['seconds']:.1f} s\n"
        f"wrote {report['out']} (sha256 {report['hash']})\n"
    )
    if report.get("onnx"):
        sys.stdout.write(f"wrote {report['onnx']}\n")
    return 0


def pretrain(job: TrainJob, out: Path, *, onnx: str = "") -> dict[str, Any]:
    """Train the base model on the source data; write the model file and its JSON report."""
    from common.modelfile import from_torch, write_model_file
    from common.zoo import parameter_count

    trained = train_job(job, what="pretrain")
    data = trained.data
    meta = {
        "source_data": data.name,
        "source_classes": job.classes or "all",
        "source_test_accuracy": f"{trained.test_accuracy:.6f}",
        "seed": str(job.seed),
    }
    if job.train_noise:
        meta["train_noise"] = job.train_noise
    digest = write_model_file(from_torch(trained.spec, trained.model, meta), out)
    report: dict[str, Any] = {
        "model": trained.spec.name,
        "spec": json.loads(trained.spec.to_json()),
        "parameters": parameter_count(trained.model),
        "dataset": data.name,
        "train_samples": len(data.y_train),
        "test_samples": len(data.y_test),
        "test_accuracy": trained.test_accuracy,
        "epochs": trained.result.epochs,
        "steps": trained.result.steps,
        "out": str(out),
        "hash": digest,
    }
    if onnx:
        from common.export import export_network

        sample = data.x_test[:64] if len(data.x_test) else data.x_train[:64]
        report["onnx"] = onnx
        report["onnx_max_abs_diff"] = export_network(trained.model, onnx, sample)
    report["seconds"] = trained.seconds
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    return report
