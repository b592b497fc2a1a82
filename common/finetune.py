"""Supervised training of zoo networks: pre-training (everything) and fine-tuning (a subset).

:class:`Trainable` says which parameters train (``head``, ``last-block``, ``bn``, ``all`` or
``adapters:RANK``, see :mod:`common.zoo`); :func:`train_network` runs Adam with cross-entropy
over them, deterministically for a given seed; :func:`fine_tuned_update` returns what changed
(dense tensors, or low-rank adapter factors) for :func:`common.delta.encode_delta`.

Frozen layers stay in eval mode while training, so their BatchNorm statistics do not move;
with ``bn`` every normalisation layer trains, statistics included (they are part of the delta).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from common.errors import ConfigError, DataError
from common.norms import L1BatchNorm2d, TopKBatchNorm2d
from common.types import FloatArray, LabelArray
from common.zoo import HEAD_PREFIX, LAST_BLOCK_PREFIX, model_state

logger = logging.getLogger(__name__)

TRAINABLE_KINDS: tuple[str, ...] = ("head", "last-block", "bn", "all", "adapters")
"""What ``--trainable`` accepts (``adapters`` takes ``:RANK``)."""

_NORM_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.GroupNorm,
    nn.LayerNorm,
    L1BatchNorm2d,
    TopKBatchNorm2d,
)


@dataclass(frozen=True)
class Trainable:
    """Which parameters fine-tuning changes."""

    kind: str = "head"
    """One of :data:`TRAINABLE_KINDS`."""
    rank: int = 0
    """Adapter rank (``adapters`` only)."""

    def __post_init__(self) -> None:
        if self.kind not in TRAINABLE_KINDS:
            raise ConfigError(
                f"trainable must be one of {list(TRAINABLE_KINDS)}, got {self.kind!r}"
            )
        if (self.kind == "adapters") != (self.rank >= 1):
            raise ConfigError(
                f"adapters need a rank >= 1 (adapters:RANK) and only adapters take one, "
                f"got kind {self.kind!r} rank {self.rank}"
            )

    @classmethod
    def parse(cls, text: str) -> Trainable:
        """``head | last-block | bn | all | adapters:RANK``."""
        kind, _, rank = text.strip().partition(":")
        if kind == "adapters":
            try:
                return cls(kind, int(rank))
            except ValueError:
                raise ConfigError(
                    f"trainable {text!r}: adapters need an integer rank, e.g. adapters:4"
                ) from None
        if rank:
            raise ConfigError(f"trainable {text!r}: only adapters take a ':RANK'")
        return cls(kind)

    def __str__(self) -> str:
        return f"adapters:{self.rank}" if self.kind == "adapters" else self.kind


@dataclass(frozen=True)
class TrainSettings:
    """Schedule of one supervised training run."""

    epochs: int = 30
    """Passes over the training data."""
    batch_size: int = 64
    """Samples per optimiser step."""
    learning_rate: float = 3e-3
    """Adam step size."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW)."""
    seed: int = 0
    """Seed of batch order (and of adapter initialisation)."""
    max_steps: int = 0
    """Cap on optimiser steps (0 = none)."""
    augment: bool = False
    """Random shifts by up to ``max(1, size // 8)`` pixels (zero padding) of every batch."""
    hflip: bool = True
    """With ``augment``: also flip half of each batch left-right (natural images, not digits)."""
    device: str = "cpu"
    """torch device (``cpu`` or ``cuda``)."""
    threads: int = 0
    """torch intra-op threads while training (0 keeps torch's setting)."""
    weight_clip_sigma: float = 0.0
    """After every step, clip each Conv/Linear weight tensor to ``±k·σ`` of its own entries
    (``k`` = this; 0 = off): aihwkit's ``WeightClipType.LAYER_GAUSSIAN``, which keeps outliers
    from setting a crossbar's conductance range (a tensor is mapped by its largest weight)."""

    def __post_init__(self) -> None:
        if self.weight_clip_sigma < 0 or not math.isfinite(self.weight_clip_sigma):
            raise ConfigError(
                f"weight_clip_sigma must be a finite number >= 0 (0 = off), got "
                f"{self.weight_clip_sigma}"
            )
        if self.epochs < 1 or self.batch_size < 1 or self.max_steps < 0 or self.threads < 0:
            raise ConfigError(
                f"training needs epochs >= 1, batch_size >= 1, max_steps >= 0, threads >= 0, "
                f"got {self.epochs}, {self.batch_size}, {self.max_steps}, {self.threads}"
            )
        if not self.learning_rate > 0 or self.weight_decay < 0:
            raise ConfigError(
                f"training needs learning_rate > 0 and weight_decay >= 0, got "
                f"{self.learning_rate}, {self.weight_decay}"
            )


@dataclass(frozen=True)
class TrainResult:
    """What a training run did."""

    steps: int
    epochs: int
    seconds: float
    seconds_per_sample: float
    """Wall time of one sample's forward + backward + update (measured, the whole run)."""
    final_loss: float
    trained_params: int
    """Parameter entries free to change (adapter factors counted, frozen weights not; with
    masks, the masked entries)."""


class LowRankAdapter(nn.Module):
    """``W + (B @ A).reshape(W.shape)``: B ``(rows, r)`` starts at zero, A ``(r, cols)`` random."""

    def __init__(self, shape: tuple[int, ...], rank: int, generator: torch.Generator) -> None:
        super().__init__()
        rows, cols = shape[0], math.prod(shape[1:])
        r = min(rank, rows, cols)
        self.left = nn.Parameter(torch.zeros(rows, r))
        self.right = nn.Parameter(torch.randn(r, cols, generator=generator) / math.sqrt(cols))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The adapted weight."""
        return weight + (self.left @ self.right).reshape(weight.shape)


def prepare(model: nn.Module, trainable: Trainable, *, seed: int = 0) -> list[nn.Parameter]:
    """Freeze everything but ``trainable`` (adding adapters when asked); return what trains.

    Raises:
        ConfigError: the network has nothing of that kind (e.g. ``bn`` without norm layers).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    names = dict(model.named_parameters())
    selected: list[str]
    if trainable.kind == "all":
        selected = list(names)
    elif trainable.kind == "head":
        selected = [n for n in names if n.startswith(HEAD_PREFIX)]
    elif trainable.kind == "last-block":
        selected = [n for n in names if n.startswith((HEAD_PREFIX, LAST_BLOCK_PREFIX))]
    elif trainable.kind == "bn":
        norm = {
            f"{m_name}.{p_name}"
            for m_name, m in model.named_modules()
            if isinstance(m, _NORM_TYPES)
            for p_name, _ in m.named_parameters(recurse=False)
        }
        if not norm:
            raise ConfigError(
                "trainable bn: this network has no normalisation layers; "
                "use head, last-block, all or adapters:RANK"
            )
        selected = [n for n in names if n in norm or n.startswith(HEAD_PREFIX)]
    else:
        selected = [n for n in names if n.startswith(HEAD_PREFIX)]
        generator = torch.Generator().manual_seed(seed)
        for m_name, module in list(model.named_modules()):
            if isinstance(module, nn.Conv2d | nn.Linear) and not m_name.startswith("head"):
                adapter = LowRankAdapter(tuple(module.weight.shape), trainable.rank, generator)
                parametrize.register_parametrization(module, "weight", adapter)
    if not selected:
        raise ConfigError(f"trainable {trainable}: no parameters selected in this network")
    params = [names[n] for n in selected]
    for p in params:
        p.requires_grad_(True)
    params += [p for m in model.modules() if isinstance(m, LowRankAdapter) for p in m.parameters()]
    return params


def _set_modes(model: nn.Module, trainable: Trainable) -> None:
    """Train mode only where parameters train (frozen BatchNorm keeps its statistics)."""
    model.eval()
    if trainable.kind == "all":
        model.train()
    elif trainable.kind == "bn":
        for m in model.modules():
            if isinstance(m, _NORM_TYPES):
                m.train()
    elif trainable.kind == "last-block":
        getattr(model, "last_block", nn.Identity()).train()


def train_network(
    model: nn.Module,
    x: FloatArray,
    y: LabelArray,
    trainable: Trainable,
    settings: TrainSettings,
    *,
    on_epoch: Callable[[int, float], None] | None = None,
    masks: Mapping[str, torch.Tensor] | None = None,
) -> TrainResult:
    """Train ``model`` in place (cross-entropy, AdamW) over the ``trainable`` parameters.

    Args:
        model: A zoo network (after this call, with adapters attached if asked).
        x: Images float32 ``(N, C, H, W)``.
        y: Labels int64 ``(N,)``.
        trainable: What trains.
        settings: Schedule, seed, device.
        on_epoch: Called after each epoch with ``(epoch, mean_loss)``.
        masks: Sparse fine-tuning: only these entries (boolean, by parameter name) of the
            trainable parameters move; the others, weight decay and every normalisation
            statistic stay exactly as they are (see :func:`sparse_masks`).

    Raises:
        DataError: empty or mismatched data.
    """
    if len(x) == 0 or len(x) != len(y):
        raise DataError(f"training needs as many labels as images (> 0), got {len(x)} and {len(y)}")
    device = torch.device(settings.device)
    torch.set_num_threads(settings.threads or torch.get_num_threads())
    params = prepare(model, trainable, seed=settings.seed)
    model.to(device)  # before the masks, so their gradient hooks live on the model's device
    params = params if masks is None else _apply_masks(model, masks)
    total_steps = settings.epochs * math.ceil(len(x) / settings.batch_size)
    total_steps = min(total_steps, settings.max_steps or total_steps)
    optimiser, scheduler = _optimiser(
        params, settings if masks is None else replace(settings, weight_decay=0.0), total_steps
    )
    loss_fn = nn.CrossEntropyLoss()
    data = torch.from_numpy(np.ascontiguousarray(x)).to(device)
    labels = torch.from_numpy(np.ascontiguousarray(y)).to(device)
    # Only the head trains and nothing random happens before it: run the frozen layers once
    # and train the head on their output (the same result, epochs times fewer forward passes).
    cached = trainable.kind == "head" and not settings.augment and _has_zoo_layout(model)
    data, stepped = (
        (_frozen_features(model, data), _part(model, "head")) if cached else (data, model)
    )
    rng = np.random.default_rng(settings.seed)
    gen = torch.Generator(device=device).manual_seed(settings.seed)
    steps = 0
    mean_loss = math.nan
    epoch = 0
    started = time.perf_counter()
    for epoch in range(1, settings.epochs + 1):
        if masks is None:
            _set_modes(model, trainable)
        order = torch.from_numpy(rng.permutation(len(x))).to(device)
        total = torch.zeros((), device=device)
        seen = 0
        for start in range(0, len(x), settings.batch_size):
            idx = order[start : start + settings.batch_size]
            batch = data[idx]
            if settings.augment:
                batch = _augment(batch, gen, hflip=settings.hflip)
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(stepped(batch), labels[idx])
            loss.backward()
            _step(optimiser, scheduler, model, settings.weight_clip_sigma)
            total += loss.detach() * len(idx)  # summed on the device: no host sync per step
            seen += len(idx)
            steps += 1
            if steps >= total_steps:
                break
        mean_loss = float(total) / max(seen, 1)
        if on_epoch is not None:
            on_epoch(epoch, mean_loss)
        if steps >= total_steps:
            break
    model.eval()
    seconds = time.perf_counter() - started
    samples = max(steps * settings.batch_size, 1)
    return TrainResult(
        steps=steps,
        epochs=epoch,
        seconds=seconds,
        seconds_per_sample=seconds / min(samples, epoch * len(x)),
        final_loss=mean_loss,
        trained_params=(
            sum(p.numel() for p in params)
            if masks is None
            else sum(int(m.sum()) for m in masks.values())
        ),
    )


def _step(
    optimiser: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    model: nn.Module,
    clip_sigma: float,
) -> None:
    optimiser.step()
    scheduler.step()
    if clip_sigma:
        clip_weights(model, clip_sigma)


def clip_weights(model: nn.Module, sigma: float) -> None:
    """Clip every trainable Conv/Linear weight in place to ``±sigma·std`` of its own tensor.

    Under a noise-injecting parametrisation the stored (clean) weight is clipped, the one that
    will be programmed.
    """
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, (nn.Conv2d, nn.Linear)):
                continue
            for name, weight in module.named_parameters():
                if name not in ("weight", "parametrizations.weight.original"):
                    continue
                if weight.requires_grad and weight.numel() > 1:
                    bound = sigma * weight.std()
                    weight.clamp_(-bound, bound)


def sparse_masks(
    model: nn.Module, base: Mapping[str, np.ndarray], k: int
) -> dict[str, torch.Tensor]:
    """Boolean masks of the ``k`` trainable parameter entries that moved most from ``base``.

    One global threshold on ``|new - base|`` over every trainable parameter (after a dense
    fine-tuning run). Re-training from the base with these masks (``train_network(...,
    masks=...)``) is sparse fine-tuning: the delta is then exactly ``k`` entries, so a top-k
    encoding sends what was trained instead of truncating it.
    """
    named = {n: p for n, p in model.named_parameters() if p.requires_grad and n in base}
    moved = {n: np.abs(p.detach().cpu().numpy() - base[n]).ravel() for n, p in named.items()}
    flat = np.concatenate(list(moved.values())) if moved else np.zeros(0)
    if k < 1 or flat.size == 0:
        raise ConfigError(f"sparse fine-tuning needs k >= 1 trainable entries, got k={k}")
    chosen = np.zeros(flat.size, dtype=bool)
    chosen[np.argpartition(-flat, min(k, flat.size) - 1)[: min(k, flat.size)]] = True
    masks: dict[str, torch.Tensor] = {}
    start = 0
    for name, values in moved.items():
        shape = named[name].shape
        masks[name] = torch.from_numpy(chosen[start : start + values.size].reshape(shape))
        start += values.size
    return masks


def _apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> list[nn.Parameter]:
    """Freeze trainable parameters without a mask, zero masked-out gradients of the others."""
    params = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        mask = masks.get(name)
        if mask is None or not bool(mask.any()):
            p.requires_grad_(False)
            continue
        keep = mask.to(device=p.device, dtype=p.dtype)
        p.register_hook(lambda grad, keep=keep: grad * keep.to(grad.device))  # type: ignore[no-untyped-call]
        params.append(p)
    if not params:
        raise ConfigError("sparse fine-tuning: the masks select no trainable entry")
    return params


def _optimiser(
    params: list[nn.Parameter], settings: TrainSettings, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW with a one-cycle schedule peaking at ``settings.learning_rate``."""
    optimiser = torch.optim.AdamW(
        params, lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=settings.learning_rate, total_steps=max(total_steps, 1), pct_start=0.15
    )
    return optimiser, scheduler


def _part(model: nn.Module, name: str) -> nn.Module:
    part = getattr(model, name)
    assert isinstance(part, nn.Module)
    return part


def _has_zoo_layout(model: nn.Module) -> bool:
    return all(isinstance(getattr(model, k, None), nn.Module) for k in ("features", "last_block"))


def _frozen_features(model: nn.Module, data: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """``last_block(features(x))`` in eval mode, batched, without gradients."""
    model.eval()
    parts = []
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            batch = data[start : start + batch_size]
            parts.append(_part(model, "last_block")(_part(model, "features")(batch)))
    return torch.cat(parts)


def _augment(batch: torch.Tensor, gen: torch.Generator, *, hflip: bool) -> torch.Tensor:
    """Random shifts (zero padding) and, if asked, left-right flips of a batch."""
    n, _, h, w = batch.shape
    pad = max(1, min(h, w) // 8)
    padded = nn.functional.pad(batch, (pad, pad, pad, pad))
    dev = batch.device
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=dev)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=dev)
    rows = (dy[:, None] + torch.arange(h, device=dev)[None, :])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=dev)[None, :])[:, None, None, :]
    chan = torch.arange(batch.shape[1], device=dev)[None, :, None, None]
    out = padded[torch.arange(n, device=dev)[:, None, None, None], chan, rows, cols]
    if not hflip:
        return out
    flip = torch.rand(n, generator=gen, device=dev) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def fine_tuned_update(
    model: nn.Module, trainable: Trainable
) -> tuple[dict[str, np.ndarray], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """What fine-tuning changed: ``(dense tensors, low-rank factors)`` keyed by base names.

    Dense: every trained parameter (and, for ``bn``/``last-block``/``all``, the BatchNorm
    statistics of the layers that trained), as its new value. Low rank: for each adapted weight
    ``name -> (B, A)``; the adapted weight is ``base + B @ A``.
    """
    dense: dict[str, np.ndarray] = {}
    low_rank: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for m_name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            for adapter in module.parametrizations["weight"]:
                if isinstance(adapter, LowRankAdapter):
                    low_rank[f"{m_name}.weight"] = (
                        adapter.left.detach().cpu().numpy().copy(),
                        adapter.right.detach().cpu().numpy().copy(),
                    )
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    trained_modules = {n.rsplit(".", 1)[0] for n in trained}
    for name, tensor in _plain_state(model).items():
        owner = name.rsplit(".", 1)[0]
        is_stat = name.endswith(("running_mean", "running_var", "running_scale"))
        if name in trained or (is_stat and owner in trained_modules and trainable.kind != "head"):
            dense[name] = tensor.cpu().numpy().copy()
    return dense, low_rank


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """State with parametrized weights under their plain names (``x.weight``), originals."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model_state(model).items():
        if ".parametrizations." in key and not key.endswith(".original"):
            continue
        out[key.replace(".parametrizations.weight.original", ".weight")] = tensor
    return out


def predict(model: nn.Module, x: FloatArray, *, batch_size: int = 512) -> LabelArray:
    """Predicted labels (argmax of the class scores), in eval mode, on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    out = np.empty(len(x), dtype=np.int64)
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size]))
            out[start : start + len(batch)] = model(batch.to(device)).argmax(1).cpu().numpy()
    return out


def accuracy(model: nn.Module, x: FloatArray, y: LabelArray) -> float:
    """Fraction of ``x`` classified as ``y`` (0 for no samples)."""
    return float(np.mean(predict(model, x) == y)) if len(y) else 0.0
