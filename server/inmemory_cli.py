"""``latentedge train --in-memory DEVICE_SPEC``: train a zoo network on simulated analog arrays.

The same data, zoo network and outputs as ``latentedge train``; the weights of every Conv2d and
Linear layer sit on resistive devices (:mod:`common.analog_devices`) and move by Analog SGD or
Residual Learning (:mod:`common.analog_training`); the model that is exported holds the
digital-equivalent weights (Residual Learning: ``W̄ = W + γP``).
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from common.analog_config import Algorithm, InMemoryConfig
from common.errors import ConfigError

if TYPE_CHECKING:
    from common.analog_training import InMemoryResult
    from server.train_cli import Trained, TrainJob

logger = logging.getLogger(__name__)

ANALOG_ALGORITHMS = (Algorithm.ANALOG_SGD.value, Algorithm.RESIDUAL.value)
"""What ``--algorithm`` accepts."""


def add_in_memory_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of in-memory training (``train`` only)."""
    d = InMemoryConfig()
    group = parser.add_argument_group("analog in-memory training (docs/analog-training.md)")
    group.add_argument(
        "--in-memory",
        default="",
        metavar="DEVICE_SPEC",
        help="train on simulated resistive devices, e.g. softbounds or linearstep:asym=0.1",
    )
    group.add_argument(
        "--algorithm",
        default=Algorithm.ANALOG_SGD.value,
        choices=ANALOG_ALGORITHMS,
        help="with --in-memory: analog-sgd (default) or residual (Tiki-Taka)",
    )
    group.add_argument(
        "--sgd-lr", type=float, default=d.learning_rate, help="in-memory SGD step (%(default)s)"
    )
    group.add_argument(
        "--gamma", type=float, default=d.gamma, help="residual: W̄ = W + γP (%(default)s)"
    )
    group.add_argument(
        "--transfer-every",
        type=int,
        default=d.transfer_every,
        help="residual: steps between transfers of P into W (%(default)s)",
    )
    group.add_argument(
        "--transfer-rate",
        type=float,
        default=d.transfer_rate,
        help="residual: a transfer applies rate·P to W (%(default)s)",
    )


def config_from_args(args: argparse.Namespace) -> InMemoryConfig:
    """The :class:`InMemoryConfig` the flags describe."""
    return InMemoryConfig(
        algorithm=Algorithm(args.algorithm),
        learning_rate=args.sgd_lr,
        gamma=args.gamma,
        transfer_every=args.transfer_every,
        transfer_rate=args.transfer_rate,
    )


def in_memory_job(
    job: TrainJob, device_spec: str, config: InMemoryConfig
) -> tuple[Trained, InMemoryResult]:
    """Load the data, build the network, train it on analog arrays, score the test split.

    Raises:
        ConfigError: a bad device spec, or a ``train`` option in-memory training does not take.
    """
    from common.analog_devices import parse_device_spec
    from common.analog_training import train_in_memory
    from common.finetune import TrainResult, accuracy
    from common.zoo import build_model, parameter_count
    from server.train_cli import Trained, load_job_data

    device = parse_device_spec(device_spec)
    refused = {
        "--train-noise": bool(job.train_noise),
        "--augment": job.augment != "none",
        "--weight-decay": job.weight_decay > 0,
        "--weight-clip": job.weight_clip > 0,
    }
    for flag, given in refused.items():
        if given:
            raise ConfigError(f"{flag} does not combine with --in-memory (plain SGD on devices)")
    started = time.perf_counter()
    data, spec = load_job_data(job)
    model = build_model(spec, seed=job.seed).to(job.device)
    logger.info(
        "train --in-memory %s (%s): %s (%d parameters) on %d samples of %s",
        device.text,
        config.algorithm,
        spec.name,
        parameter_count(model),
        len(data.y_train),
        data.name,
    )

    def on_epoch(epoch: int, loss: float) -> None:
        if epoch == 1 or epoch % 5 == 0 or epoch == job.epochs:
            logger.info("in-memory epoch %d/%d: loss %.4f", epoch, job.epochs, loss)

    result = train_in_memory(
        model,
        data.x_train,
        data.y_train,
        config,
        device,
        epochs=job.epochs,
        batch_size=job.batch_size,
        seed=job.seed,
        on_epoch=on_epoch,
    )
    model.cpu().eval()
    seconds = time.perf_counter() - started
    samples = max(result.steps * job.batch_size, 1)
    trained = Trained(
        spec=spec,
        model=model,
        data=data,
        result=TrainResult(
            steps=result.steps,
            epochs=result.epochs,
            seconds=result.seconds,
            seconds_per_sample=result.seconds / min(samples, result.epochs * len(data.y_train)),
            final_loss=result.final_loss,
            trained_params=parameter_count(model),
        ),
        test_accuracy=accuracy(model, data.x_test, data.y_test),
        seconds=seconds,
    )
    return trained, result


def report_section(
    device_spec: str, config: InMemoryConfig, result: InMemoryResult
) -> dict[str, Any]:
    """What the JSON report records about in-memory training."""
    from common.analog_devices import parse_device_spec

    device = parse_device_spec(device_spec)
    section: dict[str, Any] = {
        k: (str(v) if not isinstance(v, int | float) else v) for k, v in asdict(config).items()
    }
    section["device_spec"] = device.text
    section["device"] = {
        k: (str(v) if not isinstance(v, int | float) else v) for k, v in asdict(device).items()
    }
    section["dw_min"] = device.dw_min
    section["loss_curve"] = list(result.loss_curve)
    section["exported_weights"] = (
        "W + gamma*P (Residual Learning's effective weight)"
        if config.algorithm is Algorithm.RESIDUAL
        else "W (the analog array's weights)"
    )
    return section
