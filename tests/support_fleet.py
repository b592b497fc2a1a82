"""A real server for fleets of virtual nodes, and the checks of a fleet report against it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.modelfile import from_torch, write_model_file
from common.tls import ClientTls
from common.zoo import ModelSpec, build_model
from edge.uplink import UplinkClient
from tests.conftest import ServerProcess, start_server_process

SERVER_TOML = """
[server]
seed = 0
retrain_min_interval_s = 0.0

[cell]
bandwidth_hz = 40.0e3
noise_psd_w_per_hz = 4.0e-21
min_samples = 300
weight_energy = 1.0
weight_latency = 0.4
"""
"""A cell where 4 digits nodes (~337 training samples each) need at least one uploader."""


def start_fleet_server(tmp_path: Path, *extra: str) -> ServerProcess:
    """``latentedge server`` with a [cell] (scheduling on) and a lenet base model (8x8 digits);
    ``extra`` server flags (TLS, say)."""
    base = tmp_path / "base.safetensors"
    spec = ModelSpec("lenet", 1, 8, 8, 10)
    write_model_file(from_torch(spec, build_model(spec, seed=0)), base)
    toml = tmp_path / "server.toml"
    toml.write_text(SERVER_TOML)
    return start_server_process(
        tmp_path / "server.db", "--config", str(toml), "--base-model", str(base), *extra
    )


def check_fleet_report(
    report: dict[str, Any],
    address: str,
    nodes: int,
    rounds: int,
    *,
    tls: ClientTls | None = None,
    token: str = "",
) -> None:
    """Every round ran every node on a fresh server round, and the server holds what it says."""
    assert report["nodes"] == nodes and len(report["rounds"]) == rounds
    assert report["registration_failed"] == 0, report["registration_errors"]
    server_rounds = []
    for r in report["rounds"]:
        assert r["failed"] == 0 and r["errors"] == [], r
        assert r["uploaded"] >= 1 and r["uploaded"] + r["finetuned"] == nodes, r
        assert r["skipped"] == 0
        assert r["uploaded_bytes"] > 0
        assert r["predicted_energy_j"] > 0 and r["predicted_latency_s"] > 0
        assert r["test_samples"] > 0 and 0.0 <= r["accuracy"] <= 1.0
        server_rounds.append(r["server_round"])
    assert server_rounds == list(range(server_rounds[0], server_rounds[0] + rounds))
    with UplinkClient(address, tls=tls, token=token) as client:
        status = client.status()
    by_id = {n.node_id: n for n in status.nodes}
    assert len(by_id) == nodes
    # what the server committed matches the report's per-round counts
    uploaders = {i for r in report["rounds"] for i in r["uploader_ids"]}
    assert {i for i, n in by_id.items() if n.uploads} == uploaders, status
    assert sum(n.deltas for n in by_id.values()) == sum(r["finetuned"] for r in report["rounds"])
