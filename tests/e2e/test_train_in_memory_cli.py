"""`latentedge train --in-memory`: analog training -> ONNX -> `latentedge simulate`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import assert_one_line_error, run_cli

pytestmark = pytest.mark.e2e


def test_residual_training_exports_the_effective_weights_for_simulate(tmp_path: Path) -> None:
    out = tmp_path / "analog.onnx"
    proc = run_cli(
        "train",
        "--model",
        "mlp",
        "--data",
        "digits",
        "--epochs",
        "2",
        "--in-memory",
        "softbounds:states=600,c2c=0.05",
        "--algorithm",
        "residual",
        "--transfer-every",
        "2",
        "--gamma",
        "0.3",
        "--threads",
        "1",  # torch's default pool stalls on a shared 2-core machine
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    section = report["in_memory"]
    assert section["algorithm"] == "residual" and section["gamma"] == 0.3
    assert section["transfer_every"] == 2 and section["device"]["states"] == 600
    assert section["device"]["c2c"] == 0.05 and "W + gamma*P" in section["exported_weights"]
    assert report["steps"] == 2 * 22  # 1347 digits, batch 64
    assert report["onnx_test_accuracy"] == pytest.approx(report["test_accuracy"], abs=1 / 450)
    assert report["test_accuracy"] > 0.5  # far above chance after 2 epochs
    assert "in-memory softbounds:states=600,c2c=0.05 residual" in proc.stdout
    sim = run_cli(
        "simulate", str(out), "--data", str(out.with_suffix(".test.npz")), "--noise", "none"
    )
    assert sim.returncode == 0, sim.stderr[-3000:]
    clean = float(re.search(r"clean accuracy ([0-9.]+)", sim.stdout).group(1))  # type: ignore[union-attr]
    assert clean == pytest.approx(report["onnx_test_accuracy"], abs=1e-4)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--in-memory", "softbounds:states=abc"], "softbounds.states must be a number"),
        (["--in-memory", "softbounds", "--train-noise", "awgn:snr_db=5"], "--train-noise"),
    ],
)
def test_bad_in_memory_input_is_a_one_line_error_with_exit_3(
    args: list[str], needle: str, tmp_path: Path
) -> None:
    proc = run_cli("train", "--epochs", "1", *args, "--out", str(tmp_path / "m.onnx"))
    assert_one_line_error(proc, 3, needle)
