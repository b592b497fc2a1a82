"""The console script as users run it: real subprocesses, real files, real gRPC on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from common.datasets import load_dataset, shard
from tests.conftest import (
    MNIST_TINY,
    ROOT,
    SHARED_DATA,
    ServerProcess,
    assert_one_line_error,
    run_cli,
    start_server_process,
)
from tests.support_tls import Pki, make_pki

pytestmark = pytest.mark.e2e


def test_version_and_help() -> None:
    assert run_cli("--version").stdout.startswith("latentedge ")
    helptext = run_cli("--help").stdout
    for command in (
        "demo",
        "server",
        "pretrain",
        "edge",
        "status",
        "models",
        "allocate",
        "simulate",
    ):
        assert command in helptext


@pytest.fixture(scope="module")
def digits_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One `latentedge demo` at its defaults, plus noise-aware encoders beside the plain ones.

    The plain part is the default demo (the same nodes, epochs and seed); the two tests below
    read one run (it takes a minute and a half), the output folder and stdout.
    """
    out = tmp_path_factory.mktemp("demo")
    proc = run_cli(
        "demo",
        "--train-noise",
        "awgn:snr_db=5",
        "--analog-sweep",
        "awgn:snr_db=0,30",
        "--analog-draws",
        "5",
        "--out",
        str(out),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, proc.stdout


def test_demo_on_digits_meets_targets(digits_demo: tuple[Path, str]) -> None:
    tmp_path, stdout = digits_demo
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in (
        "dataset",
        "nodes",
        "latent_dim",
        "compression_ratio",
        "raw_bytes",
        "uploaded_bytes",
        "accuracy",
        "baseline_accuracy",
        "per_node",
        "seconds",
    ):
        assert key in summary
    assert summary["nodes"] == 3 and len(summary["per_node"]) == 3
    assert summary["compression_ratio"] >= 4
    assert summary["accuracy"] >= 0.90
    assert summary["baseline_accuracy"] - summary["accuracy"] <= 0.03
    assert summary["uploaded_bytes"] < summary["raw_bytes"]
    assert (tmp_path / "summary.png").stat().st_size > 10_000
    assert "accuracy" in stdout and "compression ratio" in stdout


def test_demo_on_mnist_tiny(tmp_path: Path) -> None:
    # over TLS, with a token per node, as a deployment runs
    pki = make_pki(tmp_path / "pki")
    proc = run_cli(
        "demo",
        "--dataset",
        str(MNIST_TINY),
        "--latent-dim",
        "49",
        "--epochs",
        "8",
        "--out",
        str(tmp_path),
        "--tls-cert",
        str(pki.server_cert),
        "--tls-key",
        str(pki.server_key),
        "--tls-ca",
        str(pki.ca),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "tokens").iterdir()) == [
        "node-0.token",
        "node-1.token",
        "node-2.token",
    ]
    assert "TLS, credentials required" in (tmp_path / "server.log").read_text()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["compression_ratio"] == pytest.approx(784 / 49)
    assert summary["test_samples"] == 500  # the three test shards partition the test split
    assert summary["train_samples"] == 1000
    assert summary["accuracy"] > 0.6  # 1000 training images, 8 epochs: far above chance (0.1)
    assert summary["uploaded_bytes"] == 1000 * (49 * 2 + 1)  # float16 latents + uint8 labels


def test_server_and_edge_processes(server_process: ServerProcess, tmp_path: Path) -> None:
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
        "1/2",
        "--latent-dim",
        "32",
        "--epochs",
        "5",
        "--evaluate",
        "--export",
        str(tmp_path / "onnx"),
        "--report",
        str(report),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "test accuracy through the server" in proc.stdout
    doc = json.loads(report.read_text())
    expected = shard(load_dataset(str(MNIST_TINY)), 1, 2)
    assert doc["samples"] == len(expected.y_train) and doc["test_samples"] == len(expected.y_test)
    assert doc["onnx_max_abs_diff"] < 1e-4
    model = onnx.load(str(tmp_path / "onnx" / "encoder_n0.onnx"))
    onnx.checker.check_model(model)
    test_split = np.load(tmp_path / "onnx" / "test_n0.npz")
    np.testing.assert_array_equal(test_split["x"], expected.x_test)

    status = run_cli("status", "--server", server_process.address)
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert doc["nodes"][0]["node_id"] == "n0"
    assert doc["nodes"][0]["samples"] == len(expected.y_train)
    assert doc["classifier"]["nodes"] == ["n0"]


def _tls_paths(text: str, pki: Pki) -> str:
    """The deploy configs' TLS paths pointed at a test PKI made with openssl."""
    return (
        text.replace("/etc/latentedge/tls/ca.pem", str(pki.ca))
        .replace("/etc/latentedge/tls/server.pem", str(pki.server_cert))
        .replace("/etc/latentedge/tls/server.key", str(pki.server_key))
    )


def _credentials(tmp_path: Path, db: Path, node_id: str) -> tuple[Path, str]:
    """A token file for ``node_id`` and an admin token, issued into ``db`` by the CLI."""
    node = run_cli("token", "issue", node_id, "--db", str(db))
    admin = run_cli("token", "issue", "--admin", "--db", str(db))
    assert node.returncode == 0 and admin.returncode == 0, node.stderr + admin.stderr
    token_file = tmp_path / "node.token"
    token_file.write_text(node.stdout)
    return token_file, admin.stdout.strip()


def test_edge_reads_deploy_example_config(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    token_file, admin = _credentials(tmp_path, tmp_path / "s.db", "plant-a-camera-1")
    server = start_server_process(
        tmp_path / "s.db", "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)
    )
    try:
        text = _tls_paths((ROOT / "deploy" / "edge.toml").read_text(), pki)
        text = text.replace("/etc/latentedge/node.token", str(token_file))
        text = text.replace('"latentedge-server:50051"', f'"{server.address}"')
        text = text.replace('"/data/local.npz"', f'"{MNIST_TINY}"')
        text = text.replace("/var/lib/latentedge", str(tmp_path))
        text = text.replace("epochs = 0", "epochs = 2")
        config = tmp_path / "edge.toml"
        config.write_text(text)
        proc = run_cli("edge", "--config", str(config), "--shard", "0/4")
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert (tmp_path / "edge-report.json").exists()
        status = json.loads(
            run_cli(
                "status", "--server", server.address, "--tls-ca", str(pki.ca), "--token", admin
            ).stdout
        )
    finally:
        server.stop()
    assert status["nodes"][0]["has_profile"] is True
    assert status["nodes"][0]["samples"] == len(shard(load_dataset(str(MNIST_TINY)), 0, 4).y_train)


def test_scheduled_edge_with_deploy_configs(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    token_file, admin = _credentials(tmp_path, tmp_path / "s.db", "plant-a-camera-1")
    server_toml = _tls_paths((ROOT / "deploy" / "server.toml").read_text(), pki)
    server = start_server_process(
        tmp_path / "s.db", "--config", str(_write(tmp_path / "server.toml", server_toml))
    )
    try:
        text = _tls_paths((ROOT / "deploy" / "edge.toml").read_text(), pki)
        text = text.replace('"latentedge-server:50051"', f'"{server.address}"')
        text = text.replace('"/data/local.npz"', f'"{MNIST_TINY}"')
        text = text.replace("/var/lib/latentedge", str(tmp_path))
        text = text.replace("epochs = 0", "epochs = 2").replace(
            "scheduled = false", "scheduled = true"
        )
        text = text.replace("/etc/latentedge/node.token", str(token_file))
        proc = run_cli("edge", "--config", str(_write(tmp_path / "edge.toml", text)))
        assert proc.returncode == 0, proc.stderr[-2000:]
        report = json.loads((tmp_path / "edge-report.json").read_text())
        assert report["schedule"]["round"] == 1
        # a lone node must upload to reach min_samples, with the whole band
        assert report["schedule"]["upload"] is True
        assert report["schedule"]["bandwidth_hz"] == pytest.approx(2.0e7)
        status = json.loads(
            run_cli(
                "status", "--server", server.address, "--tls-ca", str(pki.ca), "--token", admin
            ).stdout
        )
        assert status["last_plan"]["devices"][0]["id"] == "plant-a-camera-1"
        assert status["nodes"][0]["samples"] == report["samples"] > 0
    finally:
        server.stop()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (
            ("edge", "--server", "127.0.0.1:1", "--node-id", "a", "--data", "/no/such.npz"),
            3,
            "/no/such.npz",
        ),
        (("edge", "--server", "127.0.0.1:1", "--node-id", "a", "--shard", "5/3"), 3, "shard"),
        (
            ("edge", "--server", "127.0.0.1:1", "--node-id", "a", "--latent-dim", "0"),
            3,
            "latent_dim",
        ),
        (("edge", "--node-id", "a"), 3, "--server is required"),
        (("server", "--config", "/no/such.toml"), 3, "does not exist"),
        (("server", "--listen", "nonsense"), 3, "HOST:PORT"),
        (("status", "--server", "127.0.0.1:1", "--retry-window-s", "0.5"), 4, "unreachable"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(args: tuple[str, ...], code: int, needle: str) -> None:
    assert_one_line_error(run_cli(*args, timeout=60), code, needle)


def test_bad_flag_type_is_usage_error() -> None:
    proc = run_cli("edge", "--latent-dim", "abc")
    assert proc.returncode == 2 and "invalid int value" in proc.stderr


def test_unknown_config_key_names_it(tmp_path: Path) -> None:
    config = tmp_path / "s.toml"
    config.write_text('[server]\nlisten = "127.0.0.1:0"\ndb_path = "x"\n')
    assert_one_line_error(
        run_cli("server", "--config", str(config)), 3, "unknown key 'server.db_path'"
    )


def test_config_file_gives_flag_defaults_to_any_subcommand(tmp_path: Path) -> None:
    scenario_dir = tmp_path / "alloc"
    assert (
        run_cli(
            "allocate",
            "generate",
            "--devices",
            "20",
            "--seed",
            "1",
            "--out",
            str(scenario_dir / "d.csv"),
            "--scenario-out",
            str(scenario_dir / "s.toml"),
        ).returncode
        == 0
    )
    config = _write(
        tmp_path / "allocate.toml",
        f'[allocate]\nscenario = "{scenario_dir / "s.toml"}"\nout = "{tmp_path / "plan.json"}"\n',
    )
    proc = run_cli("allocate", "--config", str(config))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "plan.json").read_text())["devices"]
    # the command line wins over the file
    proc = run_cli("allocate", "--config", str(config), "--out", str(tmp_path / "other.json"))
    assert proc.returncode == 0 and (tmp_path / "other.json").exists()
    _write(config, "[allocate]\nscenaro = 'x'\n")
    assert_one_line_error(
        run_cli("allocate", "--config", str(config)), 3, "unknown key 'allocate.scenaro'"
    )
    _write(config, "[allocate]\nout = 3\n")
    assert_one_line_error(
        run_cli("allocate", "--config", str(config)), 3, "allocate.out must be str, got 3"
    )
    _write(config, "[status]\nserver = 'x:1'\n")
    assert_one_line_error(run_cli("allocate", "--config", str(config)), 3, "expected [allocate]")


def test_command_line_flag_beats_its_exclusive_twin_from_the_file(tmp_path: Path) -> None:
    tiny = np.load(MNIST_TINY)
    data = tmp_path / "d.npz"
    np.savez(data, x=(tiny["x_test"][:40, None] / 255).astype(np.float32), y=tiny["y_test"][:40])
    model = SHARED_DATA / "onnx_mnist12" / "mnist-12.onnx"
    config = _write(
        tmp_path / "s.toml", f'[simulate]\ndata = "{data}"\nsweep = "awgn:snr_db=0,10"\ndraws = 2\n'
    )
    report = tmp_path / "r.json"
    proc = run_cli(
        "simulate",
        str(model),
        "--config",
        str(config),
        "--noise",
        "awgn:snr_db=20",
        "--out",
        str(report),
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(report.read_text())["noise"] == "awgn:snr_db=20"


def test_edge_refuses_a_bad_train_noise_spec_before_any_work() -> None:
    proc = run_cli(
        "edge",
        "--server",
        "127.0.0.1:1",
        "--node-id",
        "n0",
        "--train-noise",
        "pcm:t=3600+adc:bits=8",
    )
    assert_one_line_error(proc, 3, "act on activations")


def test_demo_with_noise_aware_encoders_beside_plain_ones(digits_demo: tuple[Path, str]) -> None:
    tmp_path, stdout = digits_demo
    summary = json.loads((tmp_path / "summary.json").read_text())
    aware = summary["noise_aware"]
    assert aware["train_noise"] == "awgn:snr_db=5"
    assert set(aware["per_node"]) == {"aware-0", "aware-1", "aware-2"}
    assert aware["accuracy"] > 0.8
    plain_0db = summary["analog"]["accuracy_mean"][0]
    aware_0db = aware["analog"]["accuracy_mean"][0]
    assert aware_0db > plain_0db + 0.05  # trained under the noise, it tolerates it far better
    assert "noise-aware" in stdout
