"""A scheduled round in which both branches happen: one node uploads latents, one sends a delta.

Real processes: `latentedge server` with a [cell] and a base model, two `latentedge edge
--scheduled` nodes whose energy profiles leave the derivable fields at 0 (the node fills them
in from its model and data). Node "near" has a good channel; node "far" has one so weak that
uploading its latents would cost more than its energy budget, so the plan must let it fine-tune.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from common.modelfile import from_torch, write_model_file
from common.records import EnergyProfile, NodeRegistration
from common.zoo import ModelSpec, build_model
from edge.uplink import UplinkClient
from tests.conftest import ROOT, latentedge_cmd, start_server_process

pytestmark = pytest.mark.e2e

PROFILE = """
[profile]
cpu_hz = 1.2e9
kappa = 1.0e-28
tx_power_w = 0.2
energy_budget_j = 5.0
channel_gain = {gain}
"""


def _hand(gain: float) -> EnergyProfile:
    return EnergyProfile(
        cpu_hz=1.2e9,
        kappa=1e-28,
        tx_power_w=0.2,
        energy_budget_j=5.0,
        channel_gain=gain,
        upload_bits=600 * 520,
        cycles_per_sample=5e5,
        finetune_energy_j=0.05,
        finetune_latency_s=0.5,
    )


def _edge_config(path: Path, server: str, node: str, shard: str, gain: float, cache: Path) -> Path:
    path.write_text(
        f"""
[edge]
server = "{server}"
node_id = "{node}"
data = "digits"
shard = "{shard}"
latent_dim = 16
epochs = 2
finetune_epochs = 3
scheduled = true
model_cache = "{cache}"
report = "{path.with_suffix(".json")}"
"""
        + PROFILE.format(gain=gain)
    )
    return path


def test_scheduled_round_runs_both_branches(tmp_path: Path) -> None:
    base = tmp_path / "base.safetensors"
    spec = ModelSpec("lenet", 1, 8, 8, 10)
    write_model_file(from_torch(spec, build_model(spec, seed=0)), base)
    server_toml = tmp_path / "server.toml"
    server_toml.write_text(
        """
[server]
seed = 0

[cell]
bandwidth_hz = 2.0e6
noise_psd_w_per_hz = 4.0e-21
min_samples = 100
weight_energy = 1.0
weight_latency = 0.1
"""
    )
    server = start_server_process(
        tmp_path / "s.db", "--config", str(server_toml), "--base-model", str(base)
    )
    try:
        configs = {
            "near": _edge_config(
                tmp_path / "near.toml", server.address, "near", "0/2", 1e-9, tmp_path / "c0"
            ),
            "far": _edge_config(
                tmp_path / "far.toml", server.address, "far", "1/2", 1e-16, tmp_path / "c1"
            ),
        }
        # both are registered before either asks for the round's plan, so the plan covers both
        with UplinkClient(server.address) as client:
            for node, gain in (("near", 1e-9), ("far", 1e-16)):
                client.register(NodeRegistration(node, 16, 10, samples=600, profile=_hand(gain)))
        procs = {
            node: subprocess.Popen(
                latentedge_cmd("edge", "--config", str(config)),
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for node, config in configs.items()
        }
        outputs = {node: proc.communicate(timeout=240) for node, proc in procs.items()}
        for node, proc in procs.items():
            assert proc.returncode == 0, outputs[node][1][-2000:]
        reports = {
            node: json.loads(config.with_suffix(".json").read_text())
            for node, config in configs.items()
        }
        with UplinkClient(server.address) as client:
            status = client.status()
    finally:
        server.stop()

    near, far = reports["near"], reports["far"]
    assert near["schedule"]["round"] == far["schedule"]["round"]
    assert near["schedule"]["upload"] is True and near["mode"] == "latents"
    assert near["uploaded_bytes"] > 0
    assert far["schedule"]["upload"] is False and far["mode"] == "finetune"
    assert far["delta_params"] == 128 * 10 + 10  # the lenet head, fp16 by default
    assert far["delta_bytes"] == 2 * far["delta_params"]
    assert "uploaded" in outputs["near"][0] and "fine-tuned head" in outputs["far"][0]
    nodes = {n.node_id: n for n in status.nodes}
    assert nodes["near"].samples == near["samples"] and nodes["near"].deltas == 0
    assert nodes["far"].samples == 0 and nodes["far"].deltas == 1
    assert nodes["far"].delta_bytes == far["delta_bytes"]
    # the profiles the nodes derived and registered
    p = far["profile"]
    assert p["delta_bits"] == pytest.approx(16 * far["delta_params"])
    assert p["finetune_latency_s"] > 0 and p["finetune_energy_j"] > 0
    assert p["finetune_energy_j"] == pytest.approx(
        1e-28 * p["finetune_latency_s"] * 1.2e9 * 1.2e9**2, rel=1e-9
    )  # E = kappa C f^2 with C = T f
    q = near["profile"]
    assert q["upload_bits"] == pytest.approx(near["samples"] * (16 * 32 + 8))  # fp32 + uint8 labels
    plan = json.loads(status.last_plan_json)
    assert {d["id"]: d["upload"] for d in plan["devices"]} == {"near": True, "far": False}
