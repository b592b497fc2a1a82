"""The fine-tune branch of an edge node: base model down, compressed delta up.

:func:`run_finetune` downloads the server's base model (cached by hash), fine-tunes the chosen
parameters on the node's labelled shard, encodes ``new - base`` with the chosen delta encoding,
uploads it (acknowledged after a durable commit), then downloads its fine-tuned model back from
the server (the server's copy: base + the delta as it was received) and classifies its own
test split with it locally. Raw images never leave the node, so the node, which holds the
fine-tuned model anyway, classifies locally instead of through ``Classify``.

:func:`derive_profile` fills in the energy-profile fields the node can know from its model and
data (see docs/allocation.md, "Profiles derived on the node").
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from common.costs import cpu_latency_energy, training_macs
from common.delta import DeltaEncoding, DeltaEntry, encode_delta, stats, topk_count
from common.errors import ConfigError
from common.export import export_network
from common.finetune import (
    Trainable,
    TrainResult,
    TrainSettings,
    accuracy,
    fine_tuned_update,
    sparse_masks,
    train_network,
)
from common.modelfile import ModelFile, read_model_file
from common.records import EnergyProfile
from common.types import FloatArray, LabelArray
from common.zoo import check_spec_matches, flops_per_sample, parameter_count

if TYPE_CHECKING:
    from common.datasets import Dataset
    from edge.uplink import DownloadedModel, UplinkClient

logger = logging.getLogger(__name__)

HEAD_LEARNING_RATE = 3e-2
"""Default fine-tuning step size for ``head`` (a convex problem on fixed features)."""
LEARNING_RATE = 3e-3
"""Default fine-tuning step size for every other trainable subset."""
SPARSE_LEARNING_RATE = 3e-2
"""Default step size of the sparse re-training behind a top-k delta (few entries move; on
digits, 1 % of lenet's entries reach 0.91 at 3e-2 and 0.80 at 3e-3)."""
EPOCHS = 100
"""Default fine-tuning epochs."""


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/latentedge/models`` (``~/.cache/latentedge/models``)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "latentedge" / "models"


@dataclass(frozen=True)
class FinetuneConfig:
    """How a node fine-tunes and what it sends."""

    trainable: Trainable
    encoding: DeltaEncoding
    epochs: int = EPOCHS
    learning_rate: float = 0.0
    """0 = the default for the trainable subset."""
    batch_size: int = 32
    seed: int = 0
    cache_dir: Path = Path()
    """Where downloaded models are cached (empty = :func:`default_cache_dir`)."""
    device: str = "cpu"
    """torch device of the training (``cpu`` or ``cuda``)."""
    augment: bool = False
    """Random shifts of each batch (and left-right flips with ``hflip``), for natural images."""
    hflip: bool = False
    """With ``augment``: also flip half of each batch left-right."""

    def __post_init__(self) -> None:
        if self.encoding.topk < 1.0 and self.trainable.kind == "adapters":
            raise ConfigError(
                "top-k delta encodings apply to dense deltas; with --trainable adapters:RANK "
                "use fp32, fp16 or int8"
            )
        if self.epochs < 1:
            raise ConfigError(f"fine-tuning epochs must be >= 1, got {self.epochs}")
        if self.learning_rate < 0:
            raise ConfigError(f"fine-tuning learning rate must be >= 0, got {self.learning_rate}")

    def settings(self, *, sparse: bool = False) -> TrainSettings:
        """The training schedule (``sparse``: of the re-training behind a top-k delta)."""
        default = HEAD_LEARNING_RATE if self.trainable.kind == "head" else LEARNING_RATE
        if sparse:
            default = max(default, SPARSE_LEARNING_RATE)
        return TrainSettings(
            epochs=self.epochs,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate or default,
            seed=self.seed,
            device=self.device,
            augment=self.augment,
            hflip=self.hflip,
            threads=1 if self.device == "cpu" else 0,  # small models; nodes may share a host
        )

    def cache(self) -> Path:
        """The model cache folder."""
        return self.cache_dir if str(self.cache_dir) not in ("", ".") else default_cache_dir()


def fetch_base(
    client: UplinkClient, node_id: str, config: FinetuneConfig
) -> tuple[DownloadedModel, ModelFile]:
    """Download (or take from the cache) the current base model and parse it."""
    got = client.download_model(config.cache(), node_id=node_id)
    model, _ = read_model_file(got.path)
    return got, model


@dataclass(frozen=True)
class FineTuned:
    """A fine-tuned network and the encoded delta a node sends for it."""

    network: nn.Module
    """The network as trained locally (before the delta's encoding)."""
    entries: list[DeltaEntry]
    """The delta, encoded (:func:`common.delta.encode_delta`)."""
    result: TrainResult
    """The (last) training run."""


def fine_tune_delta(
    base: ModelFile,
    x: FloatArray,
    y: LabelArray,
    config: FinetuneConfig,
    *,
    on_epoch: Callable[[int, float], None] | None = None,
) -> FineTuned:
    """Fine-tune ``base`` on ``(x, y)`` and encode the delta, as an edge node does.

    With a top-k encoding this is sparse fine-tuning: a dense run finds the ``k`` entries that
    move most, then a second run from the base trains only those, so the top-k delta carries
    exactly what was trained rather than a truncation of a dense update (on digits, 1 % of
    lenet: 0.91 accuracy this way, 0.80 = no better than the base by truncation).
    """
    network = base.to_torch()
    result = train_network(network, x, y, config.trainable, config.settings(), on_epoch=on_epoch)
    k: int | None = None
    if config.encoding.topk < 1.0:
        # k counts the trained parameters' entries (statistics are not re-trained, so they
        # stay at the base and are not sent)
        k = topk_count(config.encoding.topk, result.trained_params)
        masks = sparse_masks(network, base.tensors, k)
        logger.info("sparse fine-tuning: re-training the %d entries that moved most", k)
        network = base.to_torch()
        result = train_network(
            network,
            x,
            y,
            config.trainable,
            config.settings(sparse=True),
            on_epoch=on_epoch,
            masks=masks,
        )
    dense, low_rank = fine_tuned_update(network, config.trainable)
    entries = encode_delta(base.tensors, dense, config.encoding, low_rank, k=k)
    return FineTuned(network.cpu(), entries, result)


def run_finetune(
    client: UplinkClient,
    node_id: str,
    data: Dataset,
    config: FinetuneConfig,
    *,
    base: tuple[DownloadedModel, ModelFile] | None = None,
    export_dir: str = "",
) -> dict[str, Any]:
    """Fine-tune on ``data``, upload the delta, evaluate the server's fine-tuned model.

    Returns:
        The report fields of the fine-tune branch (bytes, parameter fraction, accuracies, ...).
    """
    got, base_model = base or fetch_base(client, node_id, config)
    spec = base_model.spec
    check_spec_matches(spec, data.input_shape, data.num_classes)
    network = base_model.to_torch()
    total_params = parameter_count(network)
    report: dict[str, Any] = {
        "mode": "finetune",
        "model": spec.name,
        "base_version": got.version,
        "base_hash": got.hash,
        "model_bytes": got.size_bytes,
        "model_params": total_params,
        "trainable": str(config.trainable),
        "delta_encoding": str(config.encoding),
        "base_accuracy": accuracy(network, data.x_test, data.y_test),
    }

    def on_epoch(epoch: int, loss: float) -> None:
        if epoch == 1 or epoch % 10 == 0 or epoch == config.epochs:
            logger.info("fine-tune epoch %d/%d: loss %.5f", epoch, config.epochs, loss)

    logger.info(
        "fine-tuning %s (%s of %d parameters) on %d samples, base v%d accuracy %.4f",
        spec.name,
        config.trainable,
        total_params,
        len(data.y_train),
        got.version,
        report["base_accuracy"],
    )
    tuned_local = fine_tune_delta(base_model, data.x_train, data.y_train, config, on_epoch=on_epoch)
    result, entries = tuned_local.result, tuned_local.entries
    report["local_accuracy"] = accuracy(tuned_local.network, data.x_test, data.y_test)
    st = stats(entries)
    ack, wire_bytes = client.push_delta(
        node_id,
        entries,
        base_version=got.version,
        base_hash=got.hash,
        samples=len(data.y_train),
        trainable=str(config.trainable),
    )
    tuned_file = client.download_model(config.cache(), node_id=node_id, fine_tuned_for=node_id)
    tuned, _ = read_model_file(tuned_file.path)
    tuned_net = tuned.to_torch()
    if ack.base_version != ack.current_version:
        logger.warning(
            "the server moved to base v%d while this delta was made on v%d: it serves this "
            "node's model but is not in the next aggregation",
            ack.current_version,
            ack.base_version,
        )
    report.update(
        train_seconds=result.seconds,
        train_steps=result.steps,
        trained_params=result.trained_params,
        delta_tensors=st.tensors,
        delta_params=st.params,
        delta_bytes=st.payload_bytes,
        delta_index_bytes=st.index_bytes,
        delta_wire_bytes=wire_bytes,
        uploaded_params_fraction=st.params / total_params,
        upload_id=ack.upload_id,
        deduplicated=ack.deduplicated,
        server_version=ack.current_version,
        samples=len(data.y_train),
        uploaded_bytes=st.payload_bytes,
        test_samples=len(data.y_test),
        accuracy=accuracy(tuned_net, data.x_test, data.y_test),
    )
    report["correct"] = round(report["accuracy"] * len(data.y_test))
    if export_dir:
        out = Path(export_dir)
        path = out / f"finetuned_{node_id}.onnx"
        sample = data.x_test[:64] if len(data.x_test) else data.x_train[:64]
        report["onnx"] = str(path)
        report["onnx_max_abs_diff"] = export_network(tuned_net, path, sample)
        np.savez_compressed(out / f"test_{node_id}.npz", x=data.x_test, y=data.y_test)
    logger.info(
        "delta: %d tensors, %d params (%.3f%% of the model), %d bytes (%d of them index); "
        "accuracy %.4f (base %.4f)",
        st.tensors,
        st.params,
        100 * report["uploaded_params_fraction"],
        st.payload_bytes,
        st.index_bytes,
        report["accuracy"],
        report["base_accuracy"],
    )
    return report


# -- energy profile ------------------------------------------------------------------------------


def training_macs_per_sample(
    network: nn.Module, trainable: Trainable, input_shape: tuple[int, int, int], epochs: int
) -> int:
    """Multiply-accumulates of a whole fine-tuning run, per training sample.

    Each epoch costs a forward pass plus the backward pass (about twice the forward cost) over
    the layers gradients flow through: the last block and the head for ``last-block``,
    everything for ``bn``, ``adapters`` and ``all``. ``head`` runs the frozen layers once
    (``common.finetune`` caches their output) and then trains the head alone.
    """
    forward = flops_per_sample(network, input_shape)
    head_macs = frozen = 0
    if trainable.kind == "head":
        head = network.head
        assert isinstance(head, nn.Linear)
        head_macs = head.in_features * head.out_features
    if trainable.kind == "last-block":
        features = network.features
        assert isinstance(features, nn.Module)
        frozen = flops_per_sample(features, input_shape)
    return training_macs(
        trainable.kind,
        forward=forward,
        head=head_macs,
        frozen=frozen,
        epochs=epochs,
    )


def delta_bits_estimate(network: nn.Module, trainable: Trainable, encoding: DeltaEncoding) -> float:
    """Bits of the delta a node will send, before fine-tuning (``network`` already prepared).

    Exact for dense encodings and adapters (the sizes do not depend on the values); for
    top-k, ``k`` values plus a 2- or 4-byte index each (the bitmap form can only be smaller).
    """
    dense, low_rank = fine_tuned_update(network, trainable)
    if encoding.topk >= 1.0:
        shapes = {
            k: np.zeros((a.shape[0], b.shape[1]), np.float32) for k, (a, b) in low_rank.items()
        }
        sent = encode_delta({**dense, **shapes}, dense, encoding, low_rank)
        return 8.0 * stats(sent).payload_bytes
    n = sum(p.numel() for p in network.parameters() if p.requires_grad)  # what k counts
    index_bits = 16 if all(v.size <= 65536 for v in dense.values()) else 32
    value_bits = 8 * np.dtype(encoding.values).itemsize
    scales = 32 * len(dense) if encoding.values == "int8" else 0
    return float(topk_count(encoding.topk, n) * (value_bits + index_bits) + scales)


def derive_profile(
    profile: EnergyProfile,
    *,
    cycles_per_mac: float,
    samples: int,
    encode_macs_per_sample: int,
    latent_bits_per_sample: float,
    finetune_macs_per_sample: int = 0,
    delta_bits: float = 0.0,
) -> EnergyProfile:
    """Fill the fields left at 0 from what the node knows (explicit values are kept).

    * ``upload_bits = samples * latent_bits_per_sample`` (latents + labels);
    * ``cycles_per_sample = encode_macs_per_sample * cycles_per_mac``;
    * fine-tuning cycles ``C = finetune_macs_per_sample * samples * cycles_per_mac`` (the MACs
      of the whole run per sample, :func:`training_macs_per_sample`),
      ``finetune_latency_s = C / cpu_hz`` and ``finetune_energy_j = kappa * C * cpu_hz^2``
      (the same CPU model as encoding, docs/allocation.md);
    * ``delta_bits`` from the delta encoding.
    """
    if not profile.cpu_hz > 0:
        raise ConfigError(f"profile.cpu_hz must be > 0 to derive CPU costs, got {profile.cpu_hz}")
    values: dict[str, float] = {}
    if profile.upload_bits == 0:
        values["upload_bits"] = samples * latent_bits_per_sample
    if profile.cycles_per_sample == 0:
        values["cycles_per_sample"] = encode_macs_per_sample * cycles_per_mac
    if finetune_macs_per_sample:
        cycles = float(finetune_macs_per_sample * samples * cycles_per_mac)
        latency, energy = cpu_latency_energy(cycles, profile.cpu_hz, profile.kappa)
        if profile.finetune_latency_s == 0:
            values["finetune_latency_s"] = latency
        if profile.finetune_energy_j == 0:
            values["finetune_energy_j"] = energy
    if profile.delta_bits == 0 and delta_bits:
        values["delta_bits"] = delta_bits
    derived = replace(profile, **values)
    if values:
        logger.info(
            "profile derived on the node: %s",
            ", ".join(f"{k}={v:.4g}" for k, v in sorted(values.items())),
        )
    return derived
