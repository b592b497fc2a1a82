"""Allocation at scale: K = 10,000 and 100,000 generated devices, whole command and solver.

For each K it writes a generated scenario (``--regime``, default the generator's: both options
compete, coverage and some budgets bind; ``upload-cheap`` gives the earlier fleets, where every
device uploads), then runs ``latentedge allocate --scenario ...`` in a
fresh process ``--repeats`` times (wall time and peak RSS of that process) and reads
``solve_time_s`` and ``gap`` from each plan; it also times ``solve()`` in-process (wall and
CPU). Medians over repeats. Targets (issue 3): at the largest K gap ≤ 1e-3, solve_time_s ≤ 2 s,
peak memory < 1 GiB; whole-command time grows ≤ 15× from the smallest to the largest K.
Per K it also prints the share of devices on each branch, uploaded samples over ``min_samples``
(1.00: coverage binds) and the share of devices that spend their whole budget.

    .venv/bin/python bench/allocation_scale.py [--sizes 10000 100000] [--repeats 3] [--seed 0]
        [--regime competitive|scarce-bandwidth|tight-budget|upload-cheap]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from server.allocation import AllocationPlan, AllocationProblem, solve
from server.allocation.generate import DEFAULT_REGIME, REGIMES, generate
from server.allocation.io import (
    cell_from_mapping,
    read_devices_csv,
    read_scenario,
    write_devices_csv,
    write_scenario,
)

# Runs the command as a child and reports its wall time and peak RSS (KiB on Linux).
_WRAPPER = (
    "import json, resource, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "rc = subprocess.run(sys.argv[1:]).returncode\n"
    "wall = time.perf_counter() - t\n"
    "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
    "print(json.dumps({'rc': rc, 'wall_s': wall, 'rss_kib': rss}))\n"
)


def _command(scenario: Path, plan: Path) -> dict[str, float]:
    cmd = [
        sys.executable,
        "-c",
        _WRAPPER,
        sys.executable,
        "-m",
        "latentedge",
        "allocate",
        "--log-level",
        "WARNING",
        "--scenario",
        str(scenario),
        "--out",
        str(plan),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise SystemExit(f"allocate failed: {out.stderr}")
    data = json.loads(plan.read_text())
    result.update(solve_time_s=data["solve_time_s"], gap=data["gap"])
    return result


def _binding(problem: AllocationProblem, plan: AllocationPlan) -> dict[str, float]:
    """Branch shares and how tight coverage and budgets are in ``plan``."""
    up = np.array(plan.upload)
    samples = problem.column("samples")
    budget = problem.column("energy_budget_j")
    need = max(problem.cell.min_samples, 1)
    return {
        "upload_share": float(up.mean()),
        "coverage_ratio": float(samples[up].sum()) / need,
        "at_budget": float(np.mean(np.array(plan.energy_j) >= budget * (1 - 1e-6))),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--regime", choices=list(REGIMES), default=DEFAULT_REGIME)
    args = parser.parse_args()
    print(f"regime {args.regime}, seed {args.seed}, {args.repeats} repeats", flush=True)
    med = statistics.median
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for k in args.sizes:
            problem = generate(k, np.random.default_rng(args.seed), args.regime)
            devices, scenario = work / f"devices_{k}.csv", work / f"scenario_{k}.toml"
            write_devices_csv(problem, devices)
            write_scenario(scenario, devices, problem.cell)
            runs = [_command(scenario, work / f"plan_{k}.json") for _ in range(args.repeats)]
            path, table = read_scenario(scenario)
            loaded = read_devices_csv(path, cell_from_mapping(table, str(scenario)))
            walls, cpus, gaps = [], [], []
            for _ in range(args.repeats):
                wall, cpu = time.perf_counter(), time.process_time()
                plan = solve(loaded)
                walls.append(time.perf_counter() - wall)
                cpus.append(time.process_time() - cpu)
                gaps.append(plan.gap)
            rows.append(
                {
                    "k": k,
                    "command_s": med(r["wall_s"] for r in runs),
                    "rss_mib": max(r["rss_kib"] for r in runs) / 1024,
                    "cli_solve_s": med(r["solve_time_s"] for r in runs),
                    "solve_s": med(walls),
                    "solve_cpu_s": med(cpus),
                    "gap": max(*(r["gap"] for r in runs), *gaps),
                    "uploaders": plan.uploaders,
                    **_binding(loaded, plan),
                }
            )
            r = rows[-1]
            print(
                f"K = {k:>7}: command {r['command_s']:6.2f} s, peak RSS {r['rss_mib']:6.0f} MiB, "
                f"solve_time_s {r['cli_solve_s']:5.2f} s (in-process {r['solve_s']:5.2f} s wall, "
                f"{r['solve_cpu_s']:5.2f} s cpu), gap {r['gap']:.1e}, {r['uploaders']} upload "
                f"({r['upload_share']:.1%}; fine-tune {1 - r['upload_share']:.1%}), coverage "
                f"{r['coverage_ratio']:.4f} x min_samples, {r['at_budget']:.1%} at their budget",
                flush=True,
            )
    small, large = rows[0], rows[-1]
    growth = large["command_s"] / small["command_s"]
    print(f"whole-command growth K={small['k']} -> {large['k']}: {growth:.1f}x (target <= 15x)")
    ok = (
        large["gap"] <= 1e-3
        and large["cli_solve_s"] <= 2.0
        and large["rss_mib"] < 1024
        and growth <= 15.0
    )
    print("targets met" if ok else "targets NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
