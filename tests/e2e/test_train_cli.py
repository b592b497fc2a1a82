"""`latentedge train`: zoo network -> (noise-aware) training -> ONNX -> `latentedge simulate`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.conftest import assert_one_line_error, run_cli

pytestmark = pytest.mark.e2e


def test_train_exports_a_model_that_simulate_runs_unchanged(tmp_path: Path) -> None:
    out = tmp_path / "lenet.onnx"
    proc = run_cli(
        "train",
        "--model",
        "lenet",
        "--data",
        "digits",
        "--norm",
        "l1",
        "--epochs",
        "3",
        "--train-noise",
        "gaussian:std=0.02,per=channel",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["norm"] == "l1" and report["train_noise"] == "gaussian:std=0.02,per=channel"
    assert report["input_scale"] == 16.0  # digits are stored as 0..16
    assert report["onnx_test_accuracy"] == pytest.approx(report["test_accuracy"], abs=1 / 450)
    assert report["test_accuracy"] > 0.5  # 3 epochs on digits: far above chance (0.1)
    test = np.load(out.with_suffix(".test.npz"))
    assert test["x"].shape == (450, 1, 8, 8) and test["x"].max() == pytest.approx(16.0)
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "BatchNormalization" in ops  # the L1 norm exports as BN, so it folds like BN
    assert "clean test accuracy" in proc.stdout
    sim = run_cli(
        "simulate",
        str(out),
        "--data",
        str(out.with_suffix(".test.npz")),
        "--noise",
        "awgn:snr_db=20",
        "--draws",
        "3",
    )
    assert sim.returncode == 0, sim.stderr[-3000:]
    clean = float(re.search(r"clean accuracy ([0-9.]+)", sim.stdout).group(1))  # type: ignore[union-attr]
    assert clean == pytest.approx(report["onnx_test_accuracy"], abs=1e-4)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--model", "resnet99"], "model must be one of"),
        (["--norm", "l2"], "norm must be one of"),
        (["--train-noise", "awgn:snr=3"], "train-noise"),
        (["--train-noise", "adc:bits=8"], "act on activations"),
        (["--data", "/nonexistent.npz"], "/nonexistent.npz"),
        (["--augment", "rotate"], "--augment"),
    ],
)
def test_bad_input_is_a_one_line_error_with_exit_3(
    args: list[str], needle: str, tmp_path: Path
) -> None:
    proc = run_cli("train", "--epochs", "1", *args, "--out", str(tmp_path / "m.onnx"))
    assert_one_line_error(proc, 3, needle)
