"""``latentedge allocate``: solve a plan offline, or ``allocate generate`` a scenario.

    latentedge allocate --scenario scenario.toml --out plan.json [--plot plan.png]
    latentedge allocate --devices devices.csv --bandwidth-hz B --noise-psd-w-per-hz N0
        --min-samples N --weight-energy WE --weight-latency WT --out plan.json
    latentedge allocate generate --devices N --seed S --out devices.csv [--scenario-out s.toml]
        [--regime competitive|scarce-bandwidth|tight-budget|upload-cheap]

Cell flags override single keys of the scenario's ``[cell]`` table; ``--devices`` overrides
its devices file.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import AllocationError
from server.allocation.generate import DEFAULT_REGIME, REGIMES, generate
from server.allocation.io import (
    CELL_KEYS,
    cell_from_mapping,
    read_devices_csv,
    read_scenario,
    write_devices_csv,
    write_plan_json,
    write_scenario,
)
from server.allocation.result import AllocationPlan
from server.allocation.solver import TARGET_GAP, solve

logger = logging.getLogger(__name__)

_CELL_FLAGS: dict[str, tuple[type, str]] = {
    "bandwidth_hz": (float, "uplink bandwidth B shared by uploaders, Hz"),
    "noise_psd_w_per_hz": (float, "noise power spectral density N0, W/Hz"),
    "min_samples": (int, "samples the server needs uploaded this round (coverage)"),
    "weight_energy": (float, "weight w_E of total device energy, 1/J (> 0)"),
    "weight_latency": (float, "weight w_T of the round latency, 1/s (>= 0)"),
}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``allocate`` flags and its ``generate`` action to ``parser``."""
    parser.add_argument("--scenario", type=Path, help="scenario TOML (devices path + [cell])")
    parser.add_argument(
        "--devices", type=Path, help="devices CSV (overrides the scenario's devices file)"
    )
    for key, (kind, text) in _CELL_FLAGS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", dest=key, type=kind, help=text)
    parser.add_argument("--out", type=Path, help="where to write the plan JSON")
    parser.add_argument(
        "--plot", type=Path, help="also draw the Pareto front and per-device decisions (PNG)"
    )
    parser.add_argument(
        "--target-gap",
        type=float,
        default=TARGET_GAP,
        help=f"relative gap at which the search stops for K > 12 (default {TARGET_GAP})",
    )
    actions = parser.add_subparsers(dest="allocate_action", metavar="{generate}")
    gen = actions.add_parser(
        "generate",
        help="write a realistic single-cell 5G scenario (see docs/allocation.md)",
        description="Write a realistic single-cell 5G scenario (see docs/allocation.md).",
    )
    gen.add_argument(
        "--devices", dest="generate_devices", type=int, required=True, help="number of devices K"
    )
    gen.add_argument("--seed", type=int, required=True, help="seed of the generator")
    gen.add_argument(
        "--out", dest="generate_out", type=Path, required=True, help="devices CSV to write"
    )
    gen.add_argument("--scenario-out", type=Path, help="also write a scenario TOML for it")
    gen.add_argument(
        "--regime",
        choices=list(REGIMES),
        default=DEFAULT_REGIME,
        help=f"costs and constraints of the fleet (default {DEFAULT_REGIME}; "
        "upload-cheap: the earlier fleets, where every device uploads)",
    )
    gen.add_argument(
        "--log-level",
        default=argparse.SUPPRESS,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``allocate`` or ``allocate generate``; return the exit code."""
    if args.allocate_action == "generate":
        return _run_generate(args)
    return _run_solve(args)


def _run_generate(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    problem = generate(args.generate_devices, np.random.default_rng(args.seed), args.regime)
    write_devices_csv(problem, args.generate_out)
    lines = [f"wrote {problem.size} devices to {args.generate_out} (regime {args.regime})"]
    if args.scenario_out is not None:
        write_scenario(args.scenario_out, args.generate_out, problem.cell)
        lines.append(f"wrote scenario to {args.scenario_out}")
    logger.info("generated %d devices in %.3fs", problem.size, time.perf_counter() - start)
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _run_solve(args: argparse.Namespace) -> int:
    if args.out is None:
        raise AllocationError("--out is required: where to write the plan JSON")
    table: dict[str, Any] = {}
    devices_path: Path | None = args.devices
    if args.scenario is not None:
        scenario_devices, table = read_scenario(args.scenario)
        devices_path = devices_path or scenario_devices
        where = f"{args.scenario}: [cell]"
    else:
        where = "cell flags"
    if devices_path is None:
        raise AllocationError("give --scenario SCENARIO.toml or --devices DEVICES.csv")
    for key in CELL_KEYS:
        value = getattr(args, key)
        if value is not None:
            table[key] = value
    missing = [f"--{k.replace('_', '-')}" for k in CELL_KEYS if k not in table]
    if missing and args.scenario is None:
        raise AllocationError(f"without --scenario these cell flags are required: {missing}")
    cell = cell_from_mapping(table, where)
    t0 = time.perf_counter()
    problem = read_devices_csv(devices_path, cell)
    logger.info(
        "read %d devices from %s in %.3fs", problem.size, devices_path, time.perf_counter() - t0
    )
    plan = solve(problem, target_gap=args.target_gap)
    write_plan_json(plan, args.out)
    sys.stdout.write(summary(plan) + f"  wrote {args.out}\n")
    if args.plot is not None:
        from server.allocation.plot import plot_plan

        plot_plan(problem, plan, args.plot, rng=np.random.default_rng(0))
        sys.stdout.write(f"  wrote {args.plot}\n")
    return 0


def summary(plan: AllocationPlan) -> str:
    """A short human summary of a plan (several lines, each ending in a newline)."""
    k = len(plan.ids)
    return (
        f"allocation for {k} devices ({plan.method}): {plan.uploaders} upload, "
        f"{k - plan.uploaders} fine-tune locally\n"
        f"  objective {plan.objective:.6g} (lower bound {plan.lower_bound:.6g}, "
        f"gap {plan.gap:.2e})\n"
        f"  round latency {plan.round_latency_s:.4g} s, total energy {plan.total_energy_j:.6g} J, "
        f"bandwidth used {float(plan.bandwidth_hz.sum()):.6g} Hz, solved in "
        f"{plan.solve_time_s:.3f} s\n"
    )
