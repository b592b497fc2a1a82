"""Unsupervised autoencoder training on an edge node, and encoding with the trained encoder.

Training never sees labels. It is deterministic for a given :attr:`TrainConfig.seed`: the
weights are initialised inside a forked torch RNG seeded from it, and batches are shuffled by
a ``np.random.Generator`` seeded from it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from common.errors import ConfigError, DataError
from common.models import AutoencoderConfig, ConvAutoencoder
from common.noise_aware import inject_weight_noise, training_spec
from common.types import FloatArray

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Schedule of the autoencoder training."""

    epochs: int = 150
    """Passes over the node's training images (tuned on the digits: ~450 images per node)."""
    batch_size: int = 32
    """Images per optimiser step."""
    max_steps: int = 3000
    """Cap on optimiser steps (0 = no cap), so large datasets train in bounded time: the digits
    demo (~15 steps per epoch) runs all its epochs; a 20k-image MNIST shard stops after ~5."""
    learning_rate: float = 3e-3
    """Adam step size."""
    seed: int = 0
    """Seed of weight initialisation and batch shuffling."""
    num_threads: int = 1
    """torch intra-op threads while training (0 keeps torch's setting); 1 suits small models
    and several node processes sharing a 2-core machine."""
    train_noise: str = ""
    """A ``device_sim`` weight-noise spec injected into the encoder's Conv/Linear weights on
    every training step (noise-aware training, ``common.noise_aware``); empty = plain."""

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"train.epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"train.batch_size must be >= 1, got {self.batch_size}")
        if self.max_steps < 0:
            raise ConfigError(f"train.max_steps must be >= 0, got {self.max_steps}")
        if not self.learning_rate > 0:
            raise ConfigError(f"train.learning_rate must be > 0, got {self.learning_rate}")
        if self.num_threads < 0:
            raise ConfigError(f"train.num_threads must be >= 0, got {self.num_threads}")
        if self.train_noise:
            training_spec(self.train_noise)  # ConfigError naming the bad part of the spec


def train_autoencoder(
    x: FloatArray,
    ae_config: AutoencoderConfig,
    train_config: TrainConfig,
    *,
    on_epoch: Callable[[int, float], None] | None = None,
) -> ConvAutoencoder:
    """Train a fresh autoencoder to reconstruct ``x`` (mean squared error, Adam).

    Args:
        x: Training images, float32 ``(N, C, H, W)`` in [0, 1], matching ``ae_config``.
        ae_config: Architecture.
        train_config: Schedule and seed.
        on_epoch: Called after each epoch with ``(epoch, mean_loss)``, epochs counted from 1.

    Returns:
        The trained model, in eval mode.

    Raises:
        DataError: ``x`` is empty or its shape does not match ``ae_config``.
    """
    _check_images(x, ae_config)
    if train_config.num_threads:
        torch.set_num_threads(train_config.num_threads)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(train_config.seed)
        model = ConvAutoencoder(ae_config)
    noise = (
        inject_weight_noise(model.encoder, train_config.train_noise, seed=train_config.seed)
        if train_config.train_noise
        else None
    )
    rng = np.random.default_rng(train_config.seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=train_config.learning_rate)
    loss_fn = nn.MSELoss()
    data = torch.from_numpy(np.ascontiguousarray(x))
    n = len(data)
    started = time.perf_counter()
    max_steps = train_config.max_steps or None
    steps = 0
    model.train()
    for epoch in range(1, train_config.epochs + 1):
        order = torch.from_numpy(rng.permutation(n))
        total = 0.0
        seen = 0
        for start in range(0, n, train_config.batch_size):
            batch = data[order[start : start + train_config.batch_size]]
            optimiser.zero_grad()
            loss = loss_fn(model(batch), batch)
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(batch)
            seen += len(batch)
            steps += 1
            if steps == max_steps:
                break
        mean_loss = total / seen
        if on_epoch is not None:
            on_epoch(epoch, mean_loss)
        logger.debug("autoencoder epoch %d/%d: mse %.5f", epoch, train_config.epochs, mean_loss)
        if steps == max_steps:
            logger.info("autoencoder reached max_steps=%d in epoch %d", steps, epoch)
            break
    model.eval()
    if noise is not None:
        noise.remove()  # the clean trained weights stay; the device adds its own noise
    logger.info(
        "trained autoencoder on %d images %s -> %d latents: %d epochs (%d steps), "
        "final mse %.5f, %.1f s",
        n,
        tuple(x.shape[1:]),
        ae_config.latent_dim,
        epoch,
        steps,
        mean_loss,
        time.perf_counter() - started,
    )
    return model


def encode(model: ConvAutoencoder, x: FloatArray, batch_size: int = 512) -> FloatArray:
    """Latents of ``x``: float32 ``(N, latent_dim)``.

    Raises:
        DataError: ``x`` does not match the model's input shape.
    """
    _check_images(x, model.config, allow_empty=True)
    return _run(model.encode, x, batch_size, (model.config.latent_dim,))


def reconstruct(model: ConvAutoencoder, x: FloatArray, batch_size: int = 512) -> FloatArray:
    """Reconstructions of ``x``: float32, same shape as ``x``, in [0, 1].

    Raises:
        DataError: ``x`` does not match the model's input shape.
    """
    _check_images(x, model.config, allow_empty=True)
    return _run(model, x, batch_size, tuple(x.shape[1:]))


def _run(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: FloatArray,
    batch_size: int,
    out_shape: tuple[int, ...],
) -> FloatArray:
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    out = np.empty((len(x), *out_shape), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size]))
            out[start : start + len(batch)] = fn(batch).numpy()
    return out


def _check_images(x: FloatArray, config: AutoencoderConfig, *, allow_empty: bool = False) -> None:
    expected = (config.in_channels, config.height, config.width)
    if x.dtype != np.float32 or x.ndim != 4 or tuple(x.shape[1:]) != expected:
        raise DataError(
            f"images must be float32 (N, {expected[0]}, {expected[1]}, {expected[2]}) for this "
            f"autoencoder, got {x.dtype} with shape {x.shape}"
        )
    if not allow_empty and len(x) == 0:
        raise DataError("cannot train an autoencoder on 0 images")
