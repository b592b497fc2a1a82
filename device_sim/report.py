"""Simulation results: per-draw accuracies, their statistics, JSON and a human summary."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Student t 0.975 quantiles for 1..30 degrees of freedom.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_quantile_975(dof: int) -> float:
    """Two-sided 95% Student t quantile for ``dof`` degrees of freedom (Cornish–Fisher above 30)."""
    if dof < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {dof}")
    if dof <= len(_T975):
        return _T975[dof - 1]
    z = 1.959963984540054
    return z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)


def summarize(per_draw: Sequence[float]) -> tuple[float, float, tuple[float, float]]:
    """Mean, sample std (ddof=1) and the 95% t-interval of the mean of ``per_draw``."""
    values = np.asarray(per_draw, dtype=np.float64)
    mean = float(values.mean())
    if values.size < 2 or np.all(values == values[0]):
        return mean, 0.0, (mean, mean)
    std = float(values.std(ddof=1))
    half = t_quantile_975(values.size - 1) * std / math.sqrt(values.size)
    return mean, std, (mean - half, mean + half)


@dataclass(frozen=True)
class SimulationReport:
    """Accuracy of one model under one noise spec over Monte-Carlo draws."""

    model: str
    """Model file (or name) simulated."""
    noise: str
    """Noise spec text."""
    draws: int
    """Number of Monte-Carlo draws."""
    seed: int
    """Base seed; draw d uses the streams of (seed, d)."""
    samples: int
    """Number of evaluated samples."""
    clean_accuracy: float
    """Accuracy without noise (fraction, 0..1)."""
    per_draw: tuple[float, ...]
    """Accuracy of each draw (fraction)."""
    analog_tensors: tuple[str, ...]
    """Initializers that were perturbed."""
    folded_layers: tuple[str, ...]
    """Affine nodes folded into analog weights, ``"BatchNormalization 'bn' -> Conv 'c'"``."""
    seconds: float
    """Wall time of the simulation, seconds."""

    @property
    def accuracy_mean(self) -> float:
        """Mean accuracy over draws."""
        return summarize(self.per_draw)[0]

    @property
    def accuracy_std(self) -> float:
        """Sample std of the accuracy over draws."""
        return summarize(self.per_draw)[1]

    @property
    def accuracy_ci95(self) -> tuple[float, float]:
        """95% confidence interval of the mean accuracy (Student t)."""
        return summarize(self.per_draw)[2]

    @property
    def normalized_accuracy(self) -> float:
        """Mean accuracy / clean accuracy (NaN when the clean accuracy is 0)."""
        return self.accuracy_mean / self.clean_accuracy if self.clean_accuracy else math.nan

    def to_json_dict(self) -> dict[str, Any]:
        """Plain-JSON form (the ``--out`` file)."""
        lo, hi = self.accuracy_ci95
        return {
            "model": self.model,
            "noise": self.noise,
            "draws": self.draws,
            "seed": self.seed,
            "samples": self.samples,
            "clean_accuracy": self.clean_accuracy,
            "accuracy_mean": self.accuracy_mean,
            "accuracy_std": self.accuracy_std,
            "accuracy_ci95": [lo, hi],
            "normalized_accuracy": self.normalized_accuracy,
            "per_draw": list(self.per_draw),
            "analog_tensors": list(self.analog_tensors),
            "folded_layers": list(self.folded_layers),
            "seconds": self.seconds,
        }

    def summary(self) -> str:
        """A few human-readable lines."""
        lo, hi = self.accuracy_ci95
        return (
            f"model {self.model}: {len(self.analog_tensors)} analog tensors, "
            f"{self.samples} samples, noise {self.noise}, {self.draws} draws (seed {self.seed})\n"
            f"clean accuracy {self.clean_accuracy:.4f}; noisy {self.accuracy_mean:.4f} "
            f"± {self.accuracy_std:.4f} (95% CI [{lo:.4f}, {hi:.4f}]); "
            f"normalised {self.normalized_accuracy:.4f}; {self.seconds:.1f} s\n"
        )


@dataclass(frozen=True)
class SweepReport:
    """One :class:`SimulationReport` per level of a swept noise parameter."""

    model: str
    """Model file (or name) simulated."""
    parameter: str
    """Swept parameter as ``kind.key`` (e.g. ``awgn.snr_db``)."""
    values: tuple[float, ...]
    """The swept values, in order."""
    levels: tuple[SimulationReport, ...]
    """The report at each value."""

    def to_json_dict(self) -> dict[str, Any]:
        """Plain-JSON form: ``levels`` is a list of reports, each with its ``value``."""
        return {
            "model": self.model,
            "parameter": self.parameter,
            "levels": [
                {"value": v, **r.to_json_dict()}
                for v, r in zip(self.values, self.levels, strict=True)
            ],
        }

    def summary(self) -> str:
        """A table, one row per level."""
        first = self.levels[0]
        lines = [
            f"model {self.model}: sweep of {self.parameter}, {first.draws} draws per level, "
            f"clean accuracy {first.clean_accuracy:.4f}",
            f"{self.parameter:>14} {'mean':>8} {'std':>8} {'ci95':>19} {'normalised':>10}",
        ]
        for value, r in zip(self.values, self.levels, strict=True):
            lo, hi = r.accuracy_ci95
            lines.append(
                f"{value:>14g} {r.accuracy_mean:>8.4f} {r.accuracy_std:>8.4f} "
                f"[{lo:.4f}, {hi:.4f}] {r.normalized_accuracy:>10.4f}"
            )
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class LayerResult:
    """Accuracy with noise on one analog tensor only."""

    name: str
    """The perturbed initializer."""
    report: SimulationReport
    """The simulation with only this tensor noisy."""

    @property
    def accuracy_drop(self) -> float:
        """Clean accuracy minus mean noisy accuracy."""
        return self.report.clean_accuracy - self.report.accuracy_mean


@dataclass(frozen=True)
class PerLayerReport:
    """Sensitivity of each analog tensor: noise on one tensor at a time."""

    model: str
    """Model file (or name) simulated."""
    noise: str
    """Noise spec text."""
    clean_accuracy: float
    """Accuracy without noise."""
    layers: tuple[LayerResult, ...]
    """One result per analog tensor, in graph order."""

    def to_json_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {
            "model": self.model,
            "noise": self.noise,
            "clean_accuracy": self.clean_accuracy,
            "layers": [
                {"tensor": r.name, "accuracy_drop": r.accuracy_drop, **r.report.to_json_dict()}
                for r in self.layers
            ],
        }

    def summary(self) -> str:
        """A table of accuracy drops, one row per tensor."""
        lines = [
            f"model {self.model}: noise {self.noise} on one tensor at a time, "
            f"clean accuracy {self.clean_accuracy:.4f}",
            f"{'tensor':<40} {'mean':>8} {'std':>8} {'drop':>8}",
        ]
        for r in self.layers:
            name = r.name if len(r.name) <= 40 else "..." + r.name[-37:]
            lines.append(
                f"{name:<40} {r.report.accuracy_mean:>8.4f} {r.report.accuracy_std:>8.4f} "
                f"{r.accuracy_drop:>8.4f}"
            )
        return "\n".join(lines) + "\n"
