"""device_sim's ``pcm`` model against aihwkit's ``PCMLikeNoiseModel``, weight by weight.

Run from the repo root (aihwkit 1.2.0 built from source into .venv, see docs/benchmarks.md):

    .venv/bin/python -m bench.device_sim_aihwkit_weights --parts probe --probe-draws 100 \
        --fixture tests/data/aihwkit_pcm_weights.json
    .venv/bin/python -m bench.device_sim_aihwkit_weights --parts tile
    .venv/bin/python -m bench.device_sim_aihwkit_weights --parts networks,accuracy \
        --acc-times 3600 --max-draws 800 --out runs/aihwkit_pcm_weights.json

(``tile`` needs the compiled ``aihwkit.simulator.rpu_base``; the other parts use only aihwkit's
Python noise-model objects.)

Both simulators perturb the SAME weights and every comparison is at the weight level:

* aihwkit side: its own objects on tensors, in the order its inference tile calls them
  (``InferenceTileWithPeriphery.program_weights`` / ``drift_weights``):
  ``PCMLikeNoiseModel.apply_programming_noise`` (``g_converter.convert_to_conductances``,
  ``apply_programming_noise_to_conductance`` and ``generate_drift_coefficients`` per device,
  ``convert_back_to_weights``), then per time ``apply_drift_noise`` (which converts the programmed
  weights to conductances again and calls ``apply_drift_noise_to_conductance``), and the global
  drift compensation ``GlobalDriftCompensation``: ``readout`` of the layer read with
  ``get_readout_tensor`` (the identity) after programming, then ``apply`` after drift (perfect IO,
  i.e. ``forward.is_perfect = True``: the readout is the exact product).
* device_sim side: ``PcmNoise(t).apply_scaled`` (drifted weights and the compensation factor) and
  ``PcmNoise._device`` for the programmed weights and the change of one draw.

Errors are ``(programmed − target)``, ``(drifted − target)``, ``(compensated − target)`` and the
change ``(drifted − programmed)`` of one draw per weight, divided by the layer's max|W| (for
negative targets the sign is flipped so that both devices of the pair pool). Statistics: mean,
std, quantiles 1/5/25/50/75/95/99 %, with the standard error of each from its spread between
draws; ``z`` is the difference in units of the combined standard error.

Weight sets: (1) every analog tensor of the two ONNX models of ../shared/data (ResNet8, mnist-12),
exactly as device_sim's ``Simulator`` prepares them; (2) a probe tensor with fixed target levels
(|w|/w_max in ``PROBE_LEVELS``, alternating signs), whose aihwkit statistics per level become the
unit-test fixture (``--fixture``). Accuracies: device_sim's onnxruntime graph run with either noise
model (aihwkit's applied through :class:`AihwkitPcm`, a device_sim ``NoiseModel``), with the number
of draws chosen from a pilot's per-draw std so that a 1-point difference is detectable.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from aihwkit.inference import GlobalDriftCompensation, PCMLikeNoiseModel

from bench.device_sim_data import MNIST12, RESNET8, load_cifar10_test, load_mnist_test
from device_sim import RunnerConfig, Simulator
from device_sim.noise import NoiseModel, NoiseSpec, PcmNoise

TIMES: dict[str, float] = {"0 s": 0.0, "1 h": 3600.0, "1 day": 86400.0, "1 year": 31536000.0}
"""Inference times after programming (seconds)."""
QUANTILES: tuple[float, ...] = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
STAT_NAMES: tuple[str, ...] = ("mean", "std", *(f"q{round(q * 100):02d}" for q in QUANTILES))
PROBE_LEVELS: tuple[float, ...] = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75)
"""Target |w|/w_max of the probe tensor's columns."""
PROBE_ROWS = 10_000
"""Rows of the probe tensor (row j has sign (−1)^j), plus one row [0, ..., 0, 1] that sets
w_max = 1 with a single weight, as in a trained layer (not in the statistics)."""
STATES: tuple[str, ...] = ("programmed", "drifted", "compensated", "change")
"""``change`` is (drifted − programmed) of one draw: drift and read noise without the programming
noise, so that a read-noise difference is not hidden by the larger programming spread."""
G_MAX = 25.0


def probe_weights(rows: int = PROBE_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """The probe tensor (rows + 1, levels) and its row signs (rows + 1, 1).

    Rows 0..rows-1 hold the levels with sign (−1)^row; the last row is zero but for one weight
    at 1.0 (w_max), so that max|W| is one weight as in a trained layer.
    """
    sign = np.where(np.arange(rows + 1) % 2 == 0, 1.0, -1.0)[:, None]
    weights = sign * np.asarray(PROBE_LEVELS)[None, :]
    weights[rows] = 0.0
    weights[rows, -1] = 1.0
    sign[rows] = 1.0
    return weights.astype(np.float32), sign


def _as_matrix(weights: np.ndarray, channel_axis: int | None) -> np.ndarray:
    """(output channels, everything else), as a crossbar stores the layer."""
    if weights.ndim < 2:
        return weights.reshape(1, -1)
    axis = 0 if channel_axis is None else channel_axis % weights.ndim
    return np.moveaxis(weights, axis, 0).reshape(weights.shape[axis], -1)


def _from_matrix(matrix: np.ndarray, like: np.ndarray, channel_axis: int | None) -> np.ndarray:
    if like.ndim < 2:
        return matrix.reshape(like.shape)
    axis = 0 if channel_axis is None else channel_axis % like.ndim
    moved = np.moveaxis(like, axis, 0).shape
    return np.moveaxis(matrix.reshape(moved), 0, axis)


@dataclass
class AihwkitStates:
    """One draw of a layer: programmed weights, per time drifted weights, α and the change."""

    programmed: np.ndarray
    drifted: dict[float, np.ndarray]
    alpha: dict[float, float]
    change: dict[float, np.ndarray]
    """drifted − programmed of the same devices (aihwkit: the same draw; device_sim: its own)."""


def aihwkit_states(
    matrix: np.ndarray, times: Sequence[float], model: PCMLikeNoiseModel, seed: int
) -> AihwkitStates:
    """Programme once and drift to each time, as ``program_weights``/``drift_weights`` do."""
    torch.manual_seed(seed)
    reference = torch.from_numpy(np.array(matrix, dtype=np.float32))
    programmed, nu = model.apply_programming_noise(reference)
    compensation = GlobalDriftCompensation()
    readout = compensation.get_readout_tensor(reference.shape[1])
    baseline = compensation.readout(readout @ programmed.T)
    drifted: dict[float, np.ndarray] = {}
    alpha: dict[float, float] = {}
    for t in times:
        now = model.apply_drift_noise(programmed, nu, t)
        alpha[t] = float(compensation.apply(readout @ now.T, baseline))
        drifted[t] = now.numpy().astype(np.float64)
    programmed_np = programmed.numpy().astype(np.float64)
    change = {t: now - programmed_np for t, now in drifted.items()}
    return AihwkitStates(programmed_np, drifted, alpha, change)


@dataclass(frozen=True)
class AihwkitPcm(NoiseModel):
    """aihwkit's PCMLikeNoiseModel as a device_sim weight model (torch RNG seeded from ``rng``)."""

    kind: ClassVar[str] = "aihwkit-pcm"
    t: float
    compensate: bool = True

    def apply(
        self, weights: np.ndarray, rng: np.random.Generator, channel_axis: int | None = None
    ) -> np.ndarray:
        """Programme, drift to ``t`` and (optionally) scale by aihwkit's compensation α."""
        matrix = _as_matrix(weights, channel_axis)
        model = PCMLikeNoiseModel(g_max=G_MAX)
        states = aihwkit_states(matrix, [self.t], model, int(rng.integers(2**62)))
        scale = states.alpha[self.t] if self.compensate else 1.0
        out = _from_matrix(states.drifted[self.t] * scale, weights, channel_axis)
        return np.asarray(out).astype(weights.dtype)


def device_sim_devices(
    weights: np.ndarray, t: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """device_sim's (programmed, drifted) weights of one draw, from ``PcmNoise._device``."""
    model = PcmNoise(t=t)
    w = weights.astype(np.float64)
    scale = model.g_max / float(np.max(np.abs(w)))
    plus_prog, plus_now = model._device(np.clip(w * scale, 0.0, model.g_max), rng)
    minus_prog, minus_now = model._device(np.clip(-w * scale, 0.0, model.g_max), rng)
    return np.asarray((plus_prog - minus_prog) / scale), np.asarray((plus_now - minus_now) / scale)


def device_sim_states(
    weights: np.ndarray, times: Sequence[float], rng: np.random.Generator
) -> AihwkitStates:
    """device_sim's draw in the same shape (a fresh draw per time, as each spec draws anew)."""
    drifted: dict[float, np.ndarray] = {}
    alpha: dict[float, float] = {}
    change: dict[float, np.ndarray] = {}
    for t in times:
        now, factor = PcmNoise(t=t).apply_scaled(weights.astype(np.float64), rng)
        drifted[t], alpha[t] = np.asarray(now, dtype=np.float64), factor
    programmed, _ = device_sim_devices(weights, 0.0, rng)
    for t in times:
        before, after = device_sim_devices(weights, t, rng)
        change[t] = after - before
    return AihwkitStates(programmed, drifted, alpha, change)


def statistics(errors: np.ndarray, axis: int | None = None) -> np.ndarray:
    """(mean, std, quantiles...) of ``errors`` pooled (axis None) or per column (axis 0)."""
    e = errors.ravel() if axis is None else errors
    return np.concatenate(
        [np.mean(e, axis=0)[None], np.std(e, axis=0)[None], np.quantile(e, QUANTILES, axis=0)]
    )


@dataclass
class Summary:
    """A statistic over all draws, and the std of its per-draw value (for standard errors)."""

    value: np.ndarray
    per_draw_sd: np.ndarray
    draws: int

    @property
    def se(self) -> np.ndarray:
        return np.asarray(self.per_draw_sd / math.sqrt(self.draws))

    def to_json(self) -> dict[str, Any]:
        return {
            "value": np.round(self.value, 7).tolist(),
            "per_draw_sd": np.round(self.per_draw_sd, 7).tolist(),
            "draws": self.draws,
        }


def summarize(per_draw_errors: list[np.ndarray], axis: int | None) -> Summary:
    """Statistics of the pooled errors, with the per-draw spread of each statistic."""
    pooled = np.concatenate(per_draw_errors, axis=0 if axis is not None else None)
    value = statistics(pooled, axis)
    per_draw = np.stack([statistics(e, axis) for e in per_draw_errors])
    return Summary(value.squeeze(), per_draw.std(axis=0, ddof=1).squeeze(), len(per_draw_errors))


def _state_errors(
    states: AihwkitStates, target: np.ndarray, w_max: float, sign: np.ndarray | float
) -> dict[tuple[str, float], np.ndarray]:
    out = {("programmed", -1.0): sign * (states.programmed - target) / w_max}
    for t, now in states.drifted.items():
        out["drifted", t] = sign * (now - target) / w_max
        out["compensated", t] = sign * (now * states.alpha[t] - target) / w_max
        out["change", t] = sign * states.change[t] / w_max
    return out


def _keys(times: Sequence[float]) -> list[tuple[str, float]]:
    return [("programmed", -1.0)] + [(s, t) for t in times for s in STATES[1:]]


def compare_layers(
    layers: list[tuple[np.ndarray, int | None]], times: Sequence[float], draws: int, seed: int
) -> dict[str, dict[tuple[str, float], Summary]]:
    """Pooled per-weight error statistics over ``layers`` for both simulators."""
    model = PCMLikeNoiseModel(g_max=G_MAX)
    errors: dict[str, dict[tuple[str, float], list[np.ndarray]]] = {
        "aihwkit": {k: [] for k in _keys(times)},
        "device_sim": {k: [] for k in _keys(times)},
    }
    for draw in range(draws):
        per_draw: dict[str, dict[tuple[str, float], list[np.ndarray]]] = {
            "aihwkit": {k: [] for k in _keys(times)},
            "device_sim": {k: [] for k in _keys(times)},
        }
        for index, (weights, axis) in enumerate(layers):
            target = _as_matrix(weights, axis).astype(np.float64)
            w_max = float(np.max(np.abs(target)))
            sign = np.where(target < 0, -1.0, 1.0)
            rng = np.random.default_rng([seed, draw, index])
            sides = {
                "aihwkit": aihwkit_states(target, times, model, int(rng.integers(2**62))),
                "device_sim": device_sim_states(target, times, rng),
            }
            for side, states in sides.items():
                for key, err in _state_errors(states, target, w_max, sign).items():
                    per_draw[side][key].append(err.ravel())
        for side, keyed in per_draw.items():
            for key, parts in keyed.items():
                errors[side][key].append(np.concatenate(parts))
    return {
        side: {key: summarize(errs, None) for key, errs in keyed.items()}
        for side, keyed in errors.items()
    }


def probe_aihwkit(draws: int, seed: int, times: Sequence[float]) -> dict[str, Any]:
    """aihwkit's per-level statistics on the probe tensor (the unit-test fixture)."""
    weights, sign = probe_weights()
    model = PCMLikeNoiseModel(g_max=G_MAX)
    errors: dict[tuple[str, float], list[np.ndarray]] = {k: [] for k in _keys(times)}
    alphas: dict[float, list[float]] = {t: [] for t in times}
    for draw in range(draws):
        states = aihwkit_states(weights, times, model, seed * 1_000_003 + draw)
        for key, err in _state_errors(states, weights, 1.0, sign).items():
            errors[key].append(err[:-1])
        for t in times:
            alphas[t].append(states.alpha[t])
    return _probe_json(errors, alphas, draws)


def probe_device_sim(draws: int, seed: int, times: Sequence[float]) -> dict[str, Any]:
    """device_sim's per-level statistics on the probe tensor (what the unit test computes)."""
    weights, sign = probe_weights()
    errors: dict[tuple[str, float], list[np.ndarray]] = {k: [] for k in _keys(times)}
    alphas: dict[float, list[float]] = {t: [] for t in times}
    for draw in range(draws):
        states = device_sim_states(weights, times, np.random.default_rng([seed, draw]))
        for key, err in _state_errors(states, weights, 1.0, sign).items():
            errors[key].append(err[:-1])
        for t in times:
            alphas[t].append(states.alpha[t])
    return _probe_json(errors, alphas, draws)


def _probe_json(
    errors: dict[tuple[str, float], list[np.ndarray]],
    alphas: dict[float, list[float]],
    draws: int,
) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    for (state, t), errs in errors.items():
        label = state if state == "programmed" else f"{state}@{t:g}"
        stats[label] = summarize(errs, 0).to_json()
    factor = {
        f"{t:g}": {
            "value": round(float(np.mean(a)), 7),
            "per_draw_sd": round(float(np.std(a, ddof=1)), 7),
            "draws": draws,
        }
        for t, a in alphas.items()
    }
    return {"statistics": stats, "compensation_factor": factor}


def _network_layers(path: Path) -> list[tuple[np.ndarray, int | None]]:
    sim = Simulator(path)
    return [(sim.prepared.weights[t.graph_name], t.channel_axis) for t in sim.prepared.analog]


def accuracy_comparison(
    path: Path,
    data: tuple[np.ndarray, np.ndarray],
    t: float,
    pilot: int,
    max_draws: int,
    seed: int,
) -> dict[str, Any]:
    """Mean accuracy of both models through device_sim's graph; draws from the pilot's std."""
    x, y = data
    sim = Simulator(path, config=RunnerConfig(batch_size=500, draws_per_session=8))
    specs = {
        "aihwkit": NoiseSpec(text=f"aihwkit-pcm:t={t:g}", weight_models=(AihwkitPcm(t=t),)),
        "device_sim": NoiseSpec(text=f"pcm:t={t:g}", weight_models=(PcmNoise(t=t),)),
    }
    accs: dict[str, list[float]] = {k: [] for k in specs}

    def run(side: str, n: int) -> None:
        start = len(accs[side])
        for _, out in sim.predictions(x, specs[side], range(start, start + n), seed=seed):
            accs[side].append(sim.accuracy(out, y))

    for side in specs:
        run(side, pilot)
    sigma = max(float(np.std(a, ddof=1)) for a in accs.values())
    needed = math.ceil((2 * 1.96 * sigma / 0.01) ** 2)
    target = min(max(needed, pilot), max_draws)
    for side in specs:
        run(side, target - pilot)
    out: dict[str, Any] = {"t": t, "needed_draws": needed, "images": len(x)}
    for side, a in accs.items():
        arr = np.asarray(a)
        out[side] = {
            "mean": float(arr.mean()),
            "sd": float(arr.std(ddof=1)),
            "draws": len(arr),
        }
    a, d = out["aihwkit"], out["device_sim"]
    out["difference"] = d["mean"] - a["mean"]
    out["ci95_half_width"] = 1.96 * math.sqrt(a["sd"] ** 2 / a["draws"] + d["sd"] ** 2 / d["draws"])
    return out


def tile_check(draws: int, t: float) -> dict[str, Any] | None:
    """aihwkit's real tile flow (AnalogLinear, program + drift) against the direct calls."""
    try:
        from aihwkit.nn import AnalogLinear  # noqa: PLC0415  # needs the compiled rpu_base
        from aihwkit.simulator.configs import InferenceRPUConfig  # noqa: PLC0415
    except ImportError:
        return None
    weights, sign = probe_weights(511)
    config = InferenceRPUConfig()
    config.noise_model = PCMLikeNoiseModel(g_max=G_MAX)
    config.drift_compensation = GlobalDriftCompensation()
    config.forward.is_perfect = True
    layer = AnalogLinear(weights.shape[1], weights.shape[0], bias=False, rpu_config=config)
    layer.set_weights(torch.from_numpy(weights))
    layer.eval()
    tile_err, direct_err = [], []
    model = PCMLikeNoiseModel(g_max=G_MAX)
    eye = torch.eye(weights.shape[1])
    torch.manual_seed(1)
    for draw in range(draws):
        layer.program_analog_weights()
        layer.drift_analog_weights(t)
        with torch.no_grad():
            effective = layer(eye).T.numpy().astype(np.float64)  # α · W_drift, exactly
        tile_err.append((sign * (effective - weights))[:-1])
        states = aihwkit_states(weights, [t], model, 10_000 + draw)
        direct_err.append((sign * (states.drifted[t] * states.alpha[t] - weights))[:-1])
    tile, direct = summarize(tile_err, 0), summarize(direct_err, 0)
    z = (tile.value - direct.value) / np.sqrt(tile.se**2 + direct.se**2 + 1e-30)
    return {
        "t": t,
        "draws": draws,
        "max_abs_z": float(np.max(np.abs(z))),
        "tile": tile.to_json(),
        "direct": direct.to_json(),
    }


def _z(a: Summary, d: Summary) -> np.ndarray:
    se = np.sqrt(a.se**2 + d.se**2)
    return np.asarray(np.where(se > 0, (d.value - a.value) / np.where(se > 0, se, 1.0), 0.0))


def _print_network(name: str, result: dict[str, dict[tuple[str, float], Summary]]) -> None:
    print(f"\n{name}: per-weight error / w_max, aihwkit | device_sim | z (diff / combined SE)")
    print(f"{'state':<22}" + "".join(f"{s:>25}" for s in STAT_NAMES))
    for key, a in result["aihwkit"].items():
        d = result["device_sim"][key]
        z = _z(a, d)
        label = key[0] if key[0] == "programmed" else f"{key[0]} {key[1]:g}s"
        cells = "".join(
            f"{a.value[i]:>9.4f}|{d.value[i]:>8.4f}|{z[i]:>5.1f}" for i in range(len(STAT_NAMES))
        )
        print(f"{label:<22}{cells}")


def _network_json(result: dict[str, dict[tuple[str, float], Summary]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, a in result["aihwkit"].items():
        d = result["device_sim"][key]
        label = key[0] if key[0] == "programmed" else f"{key[0]}@{key[1]:g}"
        out[label] = {
            "statistics": list(STAT_NAMES),
            "aihwkit": a.to_json(),
            "device_sim": d.to_json(),
            "z": np.round(_z(a, d), 2).tolist(),
        }
    return out


def _print_probe(aihw: dict[str, Any], dsim: dict[str, Any]) -> None:
    print("\nprobe tensor: per level, std and median of error / w_max (aihwkit | device_sim | z)")
    print(f"{'state':<22}" + "".join(f"{lv:>26g}" for lv in PROBE_LEVELS))
    for label, a in aihw["statistics"].items():
        d = dsim["statistics"][label]
        for i, stat in ((1, "std"), (5, "median")):
            av, dv = np.asarray(a["value"][i]), np.asarray(d["value"][i])
            se = np.sqrt(
                (np.asarray(a["per_draw_sd"][i]) ** 2 / a["draws"])
                + (np.asarray(d["per_draw_sd"][i]) ** 2 / d["draws"])
            )
            z = np.where(se > 0, (dv - av) / np.where(se > 0, se, 1.0), 0.0)
            cells = "".join(
                f"{av[j]:>9.5f}|{dv[j]:>9.5f}|{z[j]:>6.1f}" for j in range(len(PROBE_LEVELS))
            )
            print(f"{label + ' ' + stat:<22}{cells}")
    for t, a in aihw["compensation_factor"].items():
        d = dsim["compensation_factor"][t]
        print(
            f"compensation factor t={t}: aihwkit {a['value']:.5f} ± {a['per_draw_sd']:.5f}, "
            f"device_sim {d['value']:.5f} ± {d['per_draw_sd']:.5f}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--draws", type=int, default=40, help="weight draws per network")
    parser.add_argument("--probe-draws", type=int, default=100, help="aihwkit draws of the probe")
    parser.add_argument("--acc-times", default="3600", help="comma-separated t for accuracies")
    parser.add_argument("--acc-pilot", type=int, default=32)
    parser.add_argument("--max-draws", type=int, default=1600)
    parser.add_argument("--cifar-images", type=int, default=1000)
    parser.add_argument("--acc-models", default="resnet8,mnist-12", help="models for accuracies")
    parser.add_argument(
        "--parts", default="probe,tile,networks,accuracy", help="comma-separated subset to run"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write every figure as JSON here")
    parser.add_argument("--fixture", type=Path, help="write the probe fixture (aihwkit) here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import aihwkit  # noqa: PLC0415  # version only

    started = time.time()
    times = list(TIMES.values())
    command = "python -m bench.device_sim_aihwkit_weights " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    versions = {
        "aihwkit": aihwkit.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
    print(", ".join(f"{k} {v}" for k, v in versions.items()))
    report: dict[str, Any] = {"command": command, "versions": versions, "times_s": TIMES}

    parts = set(args.parts.split(","))
    if "probe" in parts:
        aihw_probe = probe_aihwkit(args.probe_draws, args.seed, times)
        dsim_probe = probe_device_sim(args.probe_draws, args.seed + 1, times)
        _print_probe(aihw_probe, dsim_probe)
        report["probe"] = {"aihwkit": aihw_probe, "device_sim": dsim_probe}
        if args.fixture:
            fixture = {
                "what": (
                    "aihwkit PCMLikeNoiseModel(g_max=25) + GlobalDriftCompensation statistics of "
                    "(state - target)/w_max on the probe tensor, per target level; change = "
                    "(drifted - programmed)/w_max of the same draw"
                ),
                "command": command,
                "versions": versions,
                "probe": {
                    "levels": list(PROBE_LEVELS),
                    "rows": PROBE_ROWS,
                    "sign": "(-1)^row",
                    "extra_row": "zeros but 1.0 in the last column (w_max), not in the statistics",
                    "g_max_uS": G_MAX,
                },
                "statistics_order": list(STAT_NAMES),
                "times_s": TIMES,
                **aihw_probe,
            }
            args.fixture.write_text(json.dumps(fixture, indent=1) + "\n")
            print(f"fixture written to {args.fixture}")

    if "tile" in parts:
        tile = tile_check(200, 3600.0)
        if tile is not None:
            z = tile["max_abs_z"]
            print(f"\naihwkit tile flow vs direct calls (t=3600 s, 200 draws): max |z| {z:.2f}")
        report["tile_check"] = tile

    if "networks" in parts:
        report["networks"] = {}
        for name, path in (("resnet8", RESNET8), ("mnist-12", MNIST12)):
            result = compare_layers(_network_layers(path), times, args.draws, args.seed)
            _print_network(name, result)
            report["networks"][name] = _network_json(result)

    if "accuracy" in parts:
        report["accuracy"] = []
        cifar = load_cifar10_test(args.cifar_images)
        mnist = load_mnist_test()
        for t in (float(v) for v in args.acc_times.split(",")):
            for name, path, data in (("resnet8", RESNET8, cifar), ("mnist-12", MNIST12, mnist)):
                if name not in args.acc_models.split(","):
                    continue
                acc = accuracy_comparison(path, data, t, args.acc_pilot, args.max_draws, args.seed)
                acc["model"] = name
                report["accuracy"].append(acc)
                a, d = acc["aihwkit"], acc["device_sim"]
                print(
                    f"\naccuracy {name} t={t:g}s ({acc['images']} images): aihwkit {a['mean']:.4f} "
                    f"(sd {a['sd']:.4f}, {a['draws']} draws), device_sim {d['mean']:.4f} "
                    f"(sd {d['sd']:.4f}, {d['draws']} draws); difference {acc['difference']:+.4f} "
                    f"± {acc['ci95_half_width']:.4f} (95 %); draws needed for 1 point: "
                    f"{acc['needed_draws']}",
                    flush=True,
                )
    report["elapsed_s"] = round(time.time() - started, 1)
    print(f"\nelapsed {report['elapsed_s']} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
