"""Accuracy-against-noise-level curve of a sweep (matplotlib is imported only when plotting)."""

from __future__ import annotations

from pathlib import Path

from common.errors import NoiseInjectionError
from device_sim.report import SweepReport


def plot_sweep(report: SweepReport, path: str | Path, title: str | None = None) -> Path:
    """Draw mean accuracy with its 95% CI band and the clean baseline against the swept value.

    Returns:
        The written path (PNG, or any format matplotlib infers from the suffix).
    """
    import matplotlib  # noqa: PLC0415  # lazy: device_sim must not import matplotlib at import time

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415  # lazy, as above

    out = Path(path)
    values = list(report.values)
    means = [r.accuracy_mean for r in report.levels]
    lows = [r.accuracy_ci95[0] for r in report.levels]
    highs = [r.accuracy_ci95[1] for r in report.levels]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.fill_between(values, lows, highs, alpha=0.25, label="95% CI of the mean")
    ax.plot(values, means, marker="o", label="mean accuracy")
    ax.axhline(report.levels[0].clean_accuracy, color="grey", linestyle="--", label="clean")
    ax.set_xlabel(report.parameter)
    ax.set_ylabel("accuracy")
    ax.set_title(title or Path(report.model).name, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=120)
    except (OSError, ValueError) as exc:
        raise NoiseInjectionError(f"cannot write plot {str(out)!r}: {exc}") from exc
    finally:
        plt.close(fig)
    return out
