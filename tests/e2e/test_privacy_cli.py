"""``latentedge edge --latent-noise``: accepted end to end, refused with one line when bad."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.datasets import load_dataset, shard
from tests.conftest import MNIST_TINY, ServerProcess, assert_one_line_error, run_cli

pytestmark = pytest.mark.e2e


def test_edge_uploads_noisy_latents_and_classifies_through_the_server(
    server_process: ServerProcess, tmp_path: Path
) -> None:
    report = tmp_path / "n0.json"
    proc = run_cli(
        "edge",
        "--server",
        server_process.address,
        "--node-id",
        "n0",
        "--data",
        str(MNIST_TINY),
        "--shard",
        "0/4",
        "--latent-dim",
        "16",
        "--epochs",
        "2",
        "--latent-noise",
        "0.5",
        "--evaluate",
        "--report",
        str(report),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "adding latent noise" in proc.stderr
    doc = json.loads(report.read_text())
    assert doc["latent_noise"] == 0.5
    expected = shard(load_dataset(str(MNIST_TINY)), 0, 4)
    assert doc["samples"] == len(expected.y_train)
    assert doc["test_samples"] == len(expected.y_test)
    assert 0.0 <= doc["accuracy"] <= 1.0


@pytest.mark.parametrize("value", ["-0.5", "nan", "inf"])
def test_bad_latent_noise_is_one_line_exit_3(value: str) -> None:
    proc = run_cli(
        "edge", "--server", "127.0.0.1:1", "--node-id", "a", f"--latent-noise={value}", timeout=60
    )
    assert_one_line_error(proc, 3, "--latent-noise")


def test_bad_latent_noise_in_the_config_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "edge.toml"
    config.write_text('[edge]\nserver = "127.0.0.1:1"\nnode_id = "a"\nlatent_noise = -1.0\n')
    assert_one_line_error(run_cli("edge", "--config", str(config), timeout=60), 3, "latent_noise")
