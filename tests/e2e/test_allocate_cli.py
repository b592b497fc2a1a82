"""``latentedge allocate`` end to end, in subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "latentedge", "allocate", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("alloc")
    out = _cli(
        "generate",
        "--devices",
        "40",
        "--seed",
        "3",
        "--out",
        "data/devices.csv",
        "--scenario-out",
        "scenario.toml",
        # the fleets these tests were written for; test_default_regime_... covers the default
        "--regime",
        "upload-cheap",
        cwd=work,
    )
    assert out.returncode == 0, out.stderr
    assert "wrote 40 devices" in out.stdout
    return work / "scenario.toml"


def test_default_regime_splits_the_fleet_and_binds_coverage(tmp_path: Path) -> None:
    """The default fleet: >= 10 % of the devices on each branch, coverage met within 2 %."""
    out = _cli(
        "generate",
        "--devices",
        "2000",
        "--seed",
        "0",
        "--out",
        "d.csv",
        "--scenario-out",
        "s.toml",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "(regime competitive)" in out.stdout
    out = _cli("--scenario", "s.toml", "--out", "plan.json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    plan = json.loads((tmp_path / "plan.json").read_text())
    up = [d["upload"] for d in plan["devices"]]
    assert 0.1 <= sum(up) / len(up) <= 0.9
    assert plan["gap"] <= 2e-3
    rows = (tmp_path / "d.csv").read_text().splitlines()[1:]
    samples = [int(float(row.split(",")[1])) for row in rows]
    uploaded = sum(n for n, u in zip(samples, up, strict=True) if u)
    cell = dict(
        line.split(" = ")
        for line in (tmp_path / "s.toml").read_text().splitlines()
        if " = " in line
    )
    need = int(cell["min_samples"])
    assert need <= uploaded <= 1.02 * need


def test_generate_then_solve_from_scenario(scenario: Path) -> None:
    work = scenario.parent
    out = _cli("--scenario", "scenario.toml", "--out", "plan.json", cwd=work)
    assert out.returncode == 0, out.stderr
    assert "allocation for 40 devices" in out.stdout
    plan = json.loads((work / "plan.json").read_text())
    assert len(plan["devices"]) == 40
    assert plan["lower_bound"] <= plan["objective"]
    assert plan["gap"] <= 1e-3


def test_flags_give_the_same_plan_as_the_scenario(scenario: Path) -> None:
    work = scenario.parent
    cell = dict(line.split(" = ") for line in scenario.read_text().splitlines() if " = " in line)
    flags = [
        arg
        for key in (
            "bandwidth_hz",
            "noise_psd_w_per_hz",
            "min_samples",
            "weight_energy",
            "weight_latency",
        )
        for arg in (f"--{key.replace('_', '-')}", cell[key])
    ]
    out = _cli("--devices", "data/devices.csv", *flags, "--out", "flags.json", cwd=work)
    assert out.returncode == 0, out.stderr
    out = _cli("--scenario", "scenario.toml", "--out", "same.json", cwd=work)
    assert out.returncode == 0, out.stderr
    a = json.loads((work / "flags.json").read_text())
    b = json.loads((work / "same.json").read_text())
    assert a["objective"] == pytest.approx(b["objective"], rel=1e-12)
    assert [d["upload"] for d in a["devices"]] == [d["upload"] for d in b["devices"]]


@pytest.mark.parametrize("action", [[], ["generate"]])
def test_help_exits_0(tmp_path: Path, action: list[str]) -> None:
    out = _cli(*action, "--help", cwd=tmp_path)
    assert out.returncode == 0
    assert "--out" in out.stdout


def test_infeasible_exits_5_with_one_line(scenario: Path) -> None:
    out = _cli(
        "--scenario",
        "scenario.toml",
        "--min-samples",
        "100000000",
        "--out",
        "x.json",
        cwd=scenario.parent,
    )
    assert out.returncode == 5
    errors = [ln for ln in out.stderr.splitlines() if "error:" in ln]
    assert errors == [errors[0]]
    assert "infeasible: coverage: min_samples=100000000" in errors[0]


def test_malformed_input_exits_3_naming_row_and_column(scenario: Path) -> None:
    work = scenario.parent
    rows = (work / "data" / "devices.csv").read_text().splitlines()
    fields = rows[3].split(",")
    fields[6] = "-1"  # tx_power_w of the third device
    rows[3] = ",".join(fields)
    (work / "bad.csv").write_text("\n".join(rows) + "\n")
    out = _cli("--devices", "bad.csv", "--scenario", "scenario.toml", "--out", "x.json", cwd=work)
    assert out.returncode == 3
    assert "(data row 3): tx_power_w must be a number > 0, got -1.0" in out.stderr


def test_missing_cell_flag_is_named(tmp_path: Path, scenario: Path) -> None:
    out = _cli(
        "--devices",
        str(scenario.parent / "data" / "devices.csv"),
        "--bandwidth-hz",
        "1e6",
        "--out",
        "x.json",
        cwd=tmp_path,
    )
    assert out.returncode == 3
    assert "--noise-psd-w-per-hz" in out.stderr


def test_plot_writes_a_png(scenario: Path) -> None:
    work = scenario.parent
    out = _cli("--scenario", "scenario.toml", "--out", "p.json", "--plot", "p.png", cwd=work)
    assert out.returncode == 0, out.stderr
    assert (work / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_solve_path_imports_neither_torch_nor_matplotlib() -> None:
    code = (
        "import sys\n"
        "import server.allocation.cli\n"
        "assert 'torch' not in sys.modules\n"
        "assert 'matplotlib' not in sys.modules\n"
        "assert 'edge' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
