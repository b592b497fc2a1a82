"""``latentedge simulate`` as a user runs it: real subprocesses on real data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from scipy import stats

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"
MNIST12 = DATA / "onnx_mnist12" / "mnist-12.onnx"
SHUFFLENET_INT8 = DATA / "onnx_shufflenet_v2_12_int8" / "shufflenet-v2-12-int8.onnx"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not MNIST12.is_file(), reason="shared data not mounted"),
]


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "latentedge", "simulate", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def mnist_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with np.load(DATA / "mnist" / "mnist_tiny.npz") as raw:
        x = (raw["x_test"][:200] / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
        y = raw["y_test"][:200]
    path = tmp_path_factory.mktemp("data") / "mnist.npz"
    np.savez(path, x=x, y=y, images=x[:, 0])
    return path


def test_noise_run_writes_report_and_summary(mnist_npz: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    result = _cli(
        MNIST12, "--data", mnist_npz, "--noise", "awgn:snr_db=5", "--draws", "4", "--out", out
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["analog_tensors"] == ["Parameter5", "Parameter87", "Parameter193"]
    assert report["draws"] == 4 and len(report["per_draw"]) == 4
    assert report["clean_accuracy"] > 0.95
    # the mean and 95% t-interval recomputed from the reported draws (scipy), not the mean
    # checked against its own interval
    per_draw = np.asarray(report["per_draw"])
    assert report["accuracy_mean"] == pytest.approx(per_draw.mean(), abs=1e-12)
    half = stats.t.ppf(0.975, per_draw.size - 1) * per_draw.std(ddof=1) / np.sqrt(per_draw.size)
    assert report["accuracy_ci95"] == pytest.approx(
        [per_draw.mean() - half, per_draw.mean() + half], abs=1e-3 * half + 1e-12
    )
    assert report["normalized_accuracy"] == pytest.approx(
        report["accuracy_mean"] / report["clean_accuracy"]
    )
    assert "clean accuracy" in result.stdout and "normalised" in result.stdout
    assert "draw 4/4" in result.stderr  # progress goes to the log


def test_clean_run_has_zero_spread(mnist_npz: Path, tmp_path: Path) -> None:
    out = tmp_path / "clean.json"
    result = _cli(MNIST12, "--data", mnist_npz, "--draws", "3", "--out", out)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["noise"] == "none"
    assert report["accuracy_std"] == 0.0
    # the clean accuracy is plain onnxruntime's on the same data, not only equal to itself
    with np.load(mnist_npz) as data:
        x, y = data["x"], data["y"]
    session = ort.InferenceSession(str(MNIST12), providers=["CPUExecutionProvider"])
    scores = np.concatenate([session.run(None, {"Input3": x[i : i + 1]})[0] for i in range(len(x))])
    plain = float(np.mean(scores.argmax(axis=1) == y))
    assert 0.9 < plain < 1.0
    assert report["clean_accuracy"] == plain
    assert report["per_draw"] == [plain] * 3


def test_sweep_writes_levels_and_plot(mnist_npz: Path, tmp_path: Path) -> None:
    out, plot = tmp_path / "sweep.json", tmp_path / "curve.png"
    result = _cli(
        MNIST12, "--data", mnist_npz, "--sweep", "awgn:snr_db=-5,20", "--draws", "3",
        "--out", out, "--plot", plot,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    levels = json.loads(out.read_text())["levels"]
    assert [level["value"] for level in levels] == [-5.0, 20.0]
    assert levels[0]["accuracy_mean"] < levels[1]["accuracy_mean"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--noise", "pcm:time=3"], "unknown parameter 'time' for noise kind 'pcm'"),
        (["--noise", "thermal:t=1"], "unknown noise kind 'thermal'; valid kinds: adc, awgn"),
        (["--x-key", "images"], "data x has shape (200, 28, 28) but model input"),
        (["--y-key", "labels"], "has no array 'labels'; arrays: ['x', 'y', 'images']"),
    ],
)
def test_bad_input_exits_3_with_one_line(mnist_npz: Path, args: list[str], message: str) -> None:
    result = _cli(MNIST12, "--data", mnist_npz, *args, "--log-level", "WARNING")
    assert result.returncode == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("latentedge simulate: error: ")
    assert message in lines[0]


def test_quantized_model_is_refused(mnist_npz: Path) -> None:
    result = _cli(SHUFFLENET_INT8, "--data", mnist_npz, "--log-level", "WARNING")
    assert result.returncode == 3
    assert "QLinearConv" in result.stderr and "not simulated" in result.stderr
