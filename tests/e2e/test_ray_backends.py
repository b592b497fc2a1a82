"""The Ray backends on one real local Ray instance (started once for the module).

``fleet``: virtual nodes as Ray actors against a real ``latentedge server`` process over gRPC.
``simulate``: draws and sweep points spread over Ray actors give exactly the numbers of the
local run (the CLI in a subprocess) for the same seed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_sim.ray_backend import RayDraws
from device_sim.runner import RunnerConfig, simulate, simulate_per_layer, simulate_sweep
from edge.fleet import FleetConfig, make_backend, run_fleet
from latentedge.fleet_cli import fleet_nodes
from tests.conftest import SHARED_DATA, run_cli
from tests.support_fleet import check_fleet_report, start_fleet_server

pytestmark = pytest.mark.e2e

MNIST12 = SHARED_DATA / "onnx_mnist12" / "mnist-12.onnx"


@pytest.fixture(scope="module")
def ray_instance() -> Iterator[Any]:
    import ray  # the [ray] extra is part of the test set-up (scripts/setup): fail, never skip

    ray.init(
        "local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False
    )
    yield ray
    ray.shutdown()


def test_fleet_on_ray(tmp_path: Path, ray_instance: Any) -> None:
    server = start_fleet_server(tmp_path)
    try:
        config = FleetConfig(
            server=server.address,
            nodes=4,
            rounds=2,
            workers=2,
            model_cache=str(tmp_path / "cache"),
        )
        backend = make_backend("ray", config)
        try:
            report = run_fleet(config, fleet_nodes(4, seed=3), backend, backend_name="ray")
        finally:
            backend.close()
        assert ray_instance.is_initialized()  # a backend leaves a Ray it did not start running
        doc = report.to_json_dict()
        assert doc["backend"] == "ray" and doc["workers"] == 2
        check_fleet_report(doc, server.address, nodes=4, rounds=2)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def mnist_npz(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    with np.load(SHARED_DATA / "mnist" / "mnist_tiny.npz") as raw:
        x = (raw["x_test"][:100] / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
        y = raw["y_test"][:100]
    path = tmp_path_factory.mktemp("data") / "mnist.npz"
    np.savez(path, x=x, y=y)
    return path, x, y


def _numbers(doc: dict[str, Any]) -> dict[str, Any]:
    """A report without its timings."""
    if isinstance(doc, dict):
        return {k: _numbers(v) for k, v in doc.items() if k != "seconds"}
    if isinstance(doc, list):
        return [_numbers(v) for v in doc]  # type: ignore[return-value]
    return doc


def test_simulate_on_ray_equals_local(
    tmp_path: Path, ray_instance: Any, mnist_npz: tuple[Path, np.ndarray, np.ndarray]
) -> None:
    path, x, y = mnist_npz
    sweep, draws, seed = "awgn:snr_db=0,10+adc:bits=6", 6, 7
    out = tmp_path / "local.json"
    proc = run_cli(
        "simulate", str(MNIST12), "--data", str(path), "--sweep", sweep, "--draws", str(draws),
        "--seed", str(seed), "--draws-per-session", "4", "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    local = json.loads(out.read_text())
    config = RunnerConfig(draws_per_session=4)
    backend = RayDraws()
    try:
        ray_sweep = simulate_sweep(
            MNIST12, x, y, sweep, draws, seed, config=config, backend=backend
        ).to_json_dict()
        # the levels really differ draw to draw (else equality would prove little)
        assert len(set(ray_sweep["levels"][0]["per_draw"])) > 1
        assert _numbers(ray_sweep) == _numbers(local)
        # one run and the per-layer runs: ray equals the in-process local backend
        for run in (simulate, simulate_per_layer):
            kwargs: dict[str, Any] = {"config": config}
            on_ray = run(MNIST12, x, y, "awgn:snr_db=3", 4, seed, backend=backend, **kwargs)
            here = run(MNIST12, x, y, "awgn:snr_db=3", 4, seed, **kwargs)
            assert _numbers(on_ray.to_json_dict()) == _numbers(here.to_json_dict())
    finally:
        backend.close()
