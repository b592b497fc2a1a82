"""A node-side defence against reconstruction of its images from uploaded latents.

Latents carry much more than the label: a server holding some (image, latent) pairs of a node,
or just public images of the same kind, can learn to decode them (``docs/privacy.md`` measures
how well). :class:`LatentNoise` adds Gaussian noise to every latent before it leaves the node,
calibrated per latent dimension: ``sigma_j = noise_std * std_j``, where ``std_j`` is the
standard deviation of dimension ``j`` over the node's own training latents (computed once, on
the node, and never sent). The same calibrated noise, freshly drawn, perturbs every latent the
node sends (training uploads and classification requests alike), so the server's classifier
trains and predicts on the same distribution.

This is a calibrated perturbation, not differential privacy: latents are not clipped, so no
sensitivity bound and no (epsilon, delta) guarantee follows. The noise must be unpredictable
to the server, so by default it is drawn from fresh OS entropy; pass ``seed`` only for tests
and experiments (a known seed lets anyone regenerate and subtract the noise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from common.errors import ConfigError, DataError
from common.types import FloatArray

FLAG = "--latent-noise"
"""The ``latentedge edge`` flag that sets :attr:`LatentNoiseConfig.noise_std`."""


def check_noise_std(value: float) -> float:
    """``value`` as a float if it is a finite number >= 0.

    Raises:
        ConfigError: naming the flag (``--latent-noise``) and its config key otherwise.
    """
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number < 0:
        raise ConfigError(
            f"{FLAG} (edge.latent_noise) must be a finite number >= 0 (noise std as a fraction "
            f"of each latent dimension's std), got {value!r}"
        )
    return number


@dataclass(frozen=True)
class LatentNoiseConfig:
    """How much noise a node adds to its latents."""

    noise_std: float = 0.0
    """Noise std as a fraction of each latent dimension's std over the node's training latents
    (0 = no noise: latents are sent unchanged)."""
    seed: int | None = None
    """Seed of the noise; None (the default, and what ``latentedge edge`` uses) = fresh OS
    entropy. A fixed seed makes the noise reproducible, hence removable by whoever knows it."""

    def __post_init__(self) -> None:
        check_noise_std(self.noise_std)


class LatentNoise:
    """Calibrated Gaussian noise on latents; calibrate once on the node's training latents.

    Args:
        config: Noise level and seed.
        reference: The node's clean training latents ``(N, latent_dim)``; their per-dimension
            std (population, ``ddof=0``) scales the noise.

    Raises:
        DataError: ``reference`` is not a non-empty finite 2-D float array.
    """

    def __init__(self, config: LatentNoiseConfig, reference: FloatArray) -> None:
        ref = _check_latents(reference, "reference latents", None)
        if len(ref) == 0:
            raise DataError("cannot calibrate latent noise on 0 latents")
        self.config = config
        self.sigma: FloatArray = (config.noise_std * ref.std(axis=0, dtype=np.float64)).astype(
            np.float32
        )
        """Per-dimension noise std, float32 ``(latent_dim,)``."""
        self._rng = np.random.default_rng(config.seed)

    @property
    def latent_dim(self) -> int:
        """Latent length this noise was calibrated for."""
        return len(self.sigma)

    def __call__(self, latents: FloatArray) -> FloatArray:
        """``latents`` plus fresh noise, as a new float32 array.

        With ``noise_std == 0`` this returns ``latents`` itself, unchanged.

        Raises:
            DataError: ``latents`` is not finite, 2-D and ``(n, latent_dim)``.
        """
        x = _check_latents(latents, "latents", self.latent_dim)
        if self.config.noise_std == 0:
            return latents
        noise = self._rng.standard_normal(x.shape, dtype=np.float32) * self.sigma
        out: FloatArray = x + noise
        return out


def _check_latents(latents: FloatArray, where: str, dim: int | None) -> FloatArray:
    x = np.asarray(latents)
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{where} must be a float (n, latent_dim) array, got {x.dtype} {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise DataError(f"{where} have {x.shape[1]} dimensions, the noise was calibrated for {dim}")
    if not np.all(np.isfinite(x)):
        raise DataError(f"{where} contain non-finite values")
    return x.astype(np.float32, copy=False)
