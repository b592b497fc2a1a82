"""Analog in-memory training: Analog SGD and Residual Learning (Tiki-Taka) on resistive devices.

:class:`InMemoryOptimizer` trains any torch model whose Conv2d/Linear weights sit on analog
arrays (:class:`common.analog_devices.AnalogArray`); every other parameter (biases, norm
affines) is digital and takes plain SGD steps. Per analog weight tensor, with ``s`` the
tensor's mapping scale (weight = ``s`` × device value, fixed at the start so that the initial
max|W| sits at ``init_fraction`` of the device's ``w_max``), learning rate ``α`` and gradient
``g`` (``../shared/REFERENCES.md``, "Analog training with response functions"):

* ``digital-sgd``: ``W ← W − α g`` (the reference, no device);
* ``analog-sgd``: the device applies ``Δ = −α g / s``; for soft bounds with ``τ = w_max`` that
  is ``W ← W − α g − (α/τ)|g| ⊙ W`` in expectation, the implicit penalty towards the symmetric
  point;
* ``residual`` (Residual Learning, Tiki-Taka v1 form, Wu et al. 2025): a fast array ``P``
  and a slow array ``W``; the model's weight is ``W̄ = s·(W + γ·P)`` and the gradient is taken
  there; every step the device applies ``Δ_P = −α g / s`` to ``P``; every ``transfer_every``
  steps it applies ``Δ_W = transfer_rate · P`` to ``W``. ``P`` is read relative to each device's
  own symmetric point (zero-shifting, as the paper assumes), so ``P = 0`` is where its pulses
  balance.

Signs: REFERENCES.md writes ``P ← P + β g`` and ``W ← W − α P`` (P accumulates the gradient)
together with ``W̄ = W + γ P``; with those three, a step along ``P`` moves ``W̄`` *up* the
gradient and ``P`` grows by ``(1 + βγ)`` per step (``experiments/analog_training.py`` shows it
running off). We use the paper's consistent form: ``P`` accumulates ``−g``, ``W ← W + rate·P``,
``W̄ = W + γ P``. The parameters of the model always hold ``W̄`` (``analog-sgd``: ``s·W``), so
evaluation and ONNX export see the digital-equivalent weights.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from common.analog_config import Algorithm, InMemoryConfig
from common.analog_devices import AnalogArray, DeviceConfig
from common.errors import ConfigError, DataError
from common.types import FloatArray, LabelArray

logger = logging.getLogger(__name__)


def analog_weights(model: nn.Module) -> list[nn.Parameter]:
    """The weights of every Conv2d and Linear layer (the ones an analog array stores)."""
    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    return [m.weight for m in layers if isinstance(m.weight, nn.Parameter)]


@dataclass
class _Tile:
    """One analog weight tensor: its arrays and mapping scale."""

    param: nn.Parameter
    scale: float
    slow: AnalogArray | None
    fast: AnalogArray | None
    fast_zero: torch.Tensor | None
    scratch: tuple[torch.Tensor, torch.Tensor]
    """Two buffers shaped like the weight (the desired changes, ``P − zero``)."""


class InMemoryOptimizer:
    """SGD whose analog weights move through device response functions (see module docstring).

    Args:
        analog: Parameters stored on analog arrays (e.g. :func:`analog_weights`).
        digital: Parameters updated by plain SGD (biases, norm affines).
        config: Algorithm and settings.
        device: The device model (ignored by ``digital-sgd``).
        seed: Seed of device-to-device draws and pulse noise.
    """

    def __init__(
        self,
        analog: Iterable[nn.Parameter],
        digital: Iterable[nn.Parameter],
        config: InMemoryConfig,
        device: DeviceConfig,
        *,
        seed: int = 0,
    ) -> None:
        self.config = config
        self.device = device
        self.digital = list(digital)
        self.steps = 0
        analog_list = list(analog)
        self.rng = np.random.default_rng(seed)
        self.tiles: list[_Tile] = []
        algo = config.algorithm
        for p in analog_list:
            w = p.detach()
            peak = float(w.abs().max()) if w.numel() else 0.0
            scale = peak / (config.init_fraction * device.w_max) if peak > 0 else 1.0
            if algo is Algorithm.DIGITAL_SGD:
                self.tiles.append(_Tile(p, 1.0, None, None, None, (w, w)))
                continue
            slow = AnalogArray(device, w / scale, self.rng)
            fast = zero = None
            if algo is Algorithm.RESIDUAL:
                fast = AnalogArray(device, torch.zeros_like(w), self.rng)
                zero = fast.symmetry_point()
                fast.w = torch.minimum(torch.maximum(zero.clone(), fast.lo), fast.hi)
            scratch = (torch.empty_like(w), torch.empty_like(w))
            tile = _Tile(p, scale, slow, fast, zero, scratch)
            self.tiles.append(tile)
            self._write(tile)

    def zero_grad(self) -> None:
        """Drop every gradient."""
        for p in self.parameters():
            p.grad = None

    def parameters(self) -> list[nn.Parameter]:
        """Every parameter this optimiser moves."""
        return [t.param for t in self.tiles] + self.digital

    @torch.no_grad()
    def step(self) -> None:
        """One update from the gradients in ``.grad``."""
        lr = self.config.learning_rate
        self.steps += 1
        transfer = self.steps % self.config.transfer_every == 0
        for p in self.digital:
            if p.grad is not None:
                p.add_(p.grad, alpha=-lr)
        for tile in self.tiles:
            grad = tile.param.grad
            if grad is None:
                continue
            if tile.slow is None:
                tile.param.add_(grad, alpha=-lr)
                continue
            desired = torch.mul(grad, -lr / tile.scale, out=tile.scratch[0])
            if tile.fast is None:
                tile.slow.update(desired)
                self._write(tile)
                continue
            tile.fast.update(desired)
            assert tile.fast_zero is not None
            # P − zero once: the transfer's Δ_W and the written W̄ share it (P does not move
            # while W is updated)
            fast = torch.sub(tile.fast.w, tile.fast_zero, out=tile.scratch[1])
            if transfer:
                tile.slow.update(torch.mul(fast, self.config.transfer_rate, out=tile.scratch[0]))
            self._write(tile, fast)

    def _write(self, tile: _Tile, fast: torch.Tensor | None = None) -> None:
        """Set the parameter to the digital-equivalent weight (W̄ = s(W + γP) or s·W).

        ``fast``: ``P − zero`` when the caller has it already.
        """
        assert tile.slow is not None
        with torch.no_grad():
            torch.mul(tile.slow.w, tile.scale, out=tile.param.data)
            if tile.fast is not None and tile.fast_zero is not None:
                if fast is None:
                    fast = torch.sub(tile.fast.w, tile.fast_zero)
                tile.param.data.add_(fast, alpha=self.config.gamma * tile.scale)


def optimizer_for(
    model: nn.Module, config: InMemoryConfig, device: DeviceConfig, *, seed: int = 0
) -> InMemoryOptimizer:
    """An :class:`InMemoryOptimizer` over ``model``: Conv2d/Linear weights analog, rest digital."""
    analog = analog_weights(model)
    ids = {id(p) for p in analog}
    digital = [p for p in model.parameters() if id(p) not in ids and p.requires_grad]
    return InMemoryOptimizer(analog, digital, config, device, seed=seed)


@dataclass(frozen=True)
class InMemoryResult:
    """What :func:`train_in_memory` did."""

    steps: int
    epochs: int
    seconds: float
    final_loss: float
    loss_curve: tuple[float, ...]
    """Mean training loss of each epoch."""


def train_in_memory(
    model: nn.Module,
    x: FloatArray,
    y: LabelArray,
    config: InMemoryConfig,
    device: DeviceConfig,
    *,
    epochs: int,
    batch_size: int = 64,
    seed: int = 0,
    on_epoch: Callable[[int, float], None] | None = None,
) -> InMemoryResult:
    """Train ``model`` in place with cross-entropy and an :class:`InMemoryOptimizer`.

    Constant learning rate (no schedule: an analog array has none), shuffled mini-batches from
    ``seed``, on the model's device.

    Raises:
        DataError: empty or mismatched data.
        ConfigError: ``epochs`` or ``batch_size`` < 1.
    """
    if len(x) == 0 or len(x) != len(y):
        raise DataError(f"training needs as many labels as images (> 0), got {len(x)} and {len(y)}")
    if epochs < 1 or batch_size < 1:
        raise ConfigError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    target = next(model.parameters()).device
    optimiser = optimizer_for(model, config, device, seed=seed)
    data = torch.from_numpy(np.ascontiguousarray(x)).to(target)
    labels = torch.from_numpy(np.ascontiguousarray(y)).to(target)
    loss_fn = nn.CrossEntropyLoss()
    rng = np.random.default_rng(seed)
    curve: list[float] = []
    started = time.perf_counter()
    model.train()
    for epoch in range(1, epochs + 1):
        order = torch.from_numpy(rng.permutation(len(x))).to(target)
        total = 0.0
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            optimiser.zero_grad()
            loss = loss_fn(model(data[idx]), labels[idx])
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(idx)
        curve.append(total / len(x))
        if not math.isfinite(curve[-1]):
            logger.warning("epoch %d: training loss is %s", epoch, curve[-1])
        if on_epoch is not None:
            on_epoch(epoch, curve[-1])
    model.eval()
    return InMemoryResult(
        steps=optimiser.steps,
        epochs=epochs,
        seconds=time.perf_counter() - started,
        final_loss=curve[-1],
        loss_curve=tuple(curve),
    )
