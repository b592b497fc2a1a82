"""Settings of analog in-memory training (torch-free, so command-line parsing stays light).

:mod:`common.analog_training` runs them; ``docs/analog-training.md`` explains each.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from common.errors import ConfigError


class Algorithm(StrEnum):
    """Training algorithms."""

    DIGITAL_SGD = "digital-sgd"
    ANALOG_SGD = "analog-sgd"
    RESIDUAL = "residual"


ALGORITHMS: tuple[str, ...] = tuple(a.value for a in Algorithm)
"""What ``--algorithm`` accepts (``train --in-memory`` takes the analog two)."""


@dataclass(frozen=True)
class InMemoryConfig:
    """An in-memory training algorithm and its settings."""

    algorithm: Algorithm = Algorithm.ANALOG_SGD
    """Which update rule."""
    learning_rate: float = 0.1
    """SGD step size α (fast array's for ``residual``)."""
    gamma: float = 0.4
    """``residual``: weight of the fast array in W̄ = W + γ P."""
    transfer_every: int = 1
    """``residual``: steps between transfers of P into W."""
    transfer_rate: float = 0.1
    """``residual``: a transfer applies ``transfer_rate · P`` to W (device units)."""
    init_fraction: float = 0.5
    """Mapping: the initial max|W| of a tensor maps to this fraction of the device's w_max."""

    def __post_init__(self) -> None:
        checks = [
            (self.learning_rate > 0, "learning_rate", "> 0"),
            (self.gamma > 0, "gamma", "> 0"),
            (self.transfer_every >= 1, "transfer_every", ">= 1"),
            (self.transfer_rate > 0, "transfer_rate", "> 0"),
            (0 < self.init_fraction <= 1, "init_fraction", "in (0, 1]"),
        ]
        for ok, key, expected in checks:
            if not ok:
                raise ConfigError(f"in-memory {key} must be {expected}, got {getattr(self, key)}")
