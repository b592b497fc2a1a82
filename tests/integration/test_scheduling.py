"""Round scheduling over gRPC: nodes report profiles, the server solves, nodes get decisions."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from common.errors import UplinkError
from common.records import EnergyProfile, NodeRegistration
from edge.uplink import UplinkClient
from server.allocation import Cell
from tests.support_grpc import RunningServer, energy_profile, running_server

CELL = Cell(
    bandwidth_hz=2e6,
    noise_psd_w_per_hz=4e-21,
    min_samples=1000,
    weight_energy=1.0,
    weight_latency=0.5,
)
GAINS = (1e-9, 3e-10, 1e-10, 3e-11)
IDLE = Cell(
    bandwidth_hz=2e6,
    noise_psd_w_per_hz=4e-21,
    min_samples=0,
    weight_energy=1.0,
    weight_latency=0.0,
)
"""Nothing must be covered and latency is free: fine-tuning locally wins, nobody uploads."""


@pytest.fixture
def scheduling_server(tmp_path: Path) -> Iterator[RunningServer]:
    yield from running_server(tmp_path, cell=CELL)


def _register_fleet(client: UplinkClient) -> None:
    for i, gain in enumerate(GAINS):
        client.register(
            NodeRegistration(
                node_id=f"n{i}",
                latent_dim=4,
                num_classes=10,
                samples=600,
                profile=energy_profile(gain),
            )
        )


def _device_cost(
    upload: bool, bandwidth_hz: float, p: EnergyProfile, samples: int
) -> tuple[float, float]:
    """(energy J, time s) of one device, straight from the equations of docs/allocation.md."""
    if not upload:
        return p.finetune_energy_j, p.finetune_latency_s
    snr = p.tx_power_w * p.channel_gain / (CELL.noise_psd_w_per_hz * bandwidth_hz)
    rate = bandwidth_hz * math.log2(1 + snr)
    t_up = p.upload_bits / rate
    t_c = p.cycles_per_sample * samples / p.cpu_hz
    e_c = p.kappa * p.cycles_per_sample * samples * p.cpu_hz**2
    return e_c + p.tx_power_w * t_up, t_c + t_up


def test_every_node_gets_a_consistent_decision(scheduling_server: RunningServer) -> None:
    with UplinkClient(scheduling_server.address) as client:
        _register_fleet(client)
        schedules = [client.schedule(f"n{i}") for i in range(len(GAINS))]
        status = client.status()
    assert {s.round for s in schedules} == {1}
    uploaders = [i for i, s in enumerate(schedules) if s.upload]
    assert 600 * len(uploaders) >= CELL.min_samples  # coverage
    assert sum(s.bandwidth_hz for s in schedules) <= CELL.bandwidth_hz * (1 + 1e-9)
    assert all(s.bandwidth_hz == 0 for s in schedules if not s.upload)
    # the reported energy/latency and the plan's objective follow the model's equations
    energy = latency = 0.0
    for i, s in enumerate(schedules):
        e, t = _device_cost(s.upload, s.bandwidth_hz, energy_profile(GAINS[i]), 600)
        assert s.energy_j == pytest.approx(e, rel=1e-6)
        assert s.latency_s == pytest.approx(t, rel=1e-6)
        energy, latency = energy + e, max(latency, t)
    plan = json.loads(status.last_plan_json)
    assert plan["round"] == 1
    assert plan["objective"] == pytest.approx(
        CELL.weight_energy * energy + CELL.weight_latency * latency, rel=1e-6
    )
    assert plan["lower_bound"] <= plan["objective"] * (1 + 1e-9)
    assert [d["upload"] for d in plan["devices"]] == [s.upload for s in schedules]


def test_round_advances_once_selected_nodes_uploaded(scheduling_server: RunningServer) -> None:
    x = np.zeros((600, 4), np.float32)
    y = np.zeros(600, np.int64)
    with UplinkClient(scheduling_server.address) as client:
        _register_fleet(client)
        schedules = {f"n{i}": client.schedule(f"n{i}") for i in range(len(GAINS))}
        selected = [n for n, s in schedules.items() if s.upload]
        assert selected
        for node in selected[:-1]:
            client.push_latents(node, x, y, num_classes=10)
            assert client.schedule(node).round == 1  # round still open
        client.push_latents(selected[-1], x, y, num_classes=10)
        assert client.schedule("n0").round == 2


def test_scheduling_errors(scheduling_server: RunningServer, tmp_path: Path) -> None:
    with UplinkClient(scheduling_server.address) as client:
        client.register(NodeRegistration(node_id="plain", latent_dim=4, num_classes=10))
        with pytest.raises(UplinkError, match=r"FAILED_PRECONDITION.*without an energy profile"):
            client.schedule("plain")
        with pytest.raises(UplinkError, match="NOT_FOUND"):
            client.schedule("ghost")
        # one node with 600 samples cannot cover min_samples=1000
        client.register(
            NodeRegistration(
                node_id="n0",
                latent_dim=4,
                num_classes=10,
                samples=600,
                profile=energy_profile(1e-9),
            )
        )
        with pytest.raises(UplinkError, match=r"FAILED_PRECONDITION.*infeasible"):
            client.schedule("n0")


def test_scheduling_off_without_cell(tmp_path: Path) -> None:
    for server in running_server(tmp_path):
        with UplinkClient(server.address) as client:
            client.register(
                NodeRegistration(
                    node_id="n0",
                    latent_dim=4,
                    num_classes=10,
                    samples=5,
                    profile=energy_profile(1e-9),
                )
            )
            with pytest.raises(UplinkError, match=r"FAILED_PRECONDITION.*scheduling is off"):
                client.schedule("n0")


def test_plan_is_stable_for_late_joiners_and_idle_rounds(tmp_path: Path) -> None:
    for server in running_server(tmp_path, cell=IDLE):
        with UplinkClient(server.address) as client:
            client.register(
                NodeRegistration(
                    node_id="n0",
                    latent_dim=4,
                    num_classes=10,
                    samples=600,
                    profile=energy_profile(1e-9, 1e-3),
                )
            )
            first = client.schedule("n0")
            assert not first.upload  # fine-tuning locally is cheaper and nothing must be covered
            assert client.schedule("n0").round == first.round  # an idle round stays current
            client.register(
                NodeRegistration(
                    node_id="n1",
                    latent_dim=4,
                    num_classes=10,
                    samples=600,
                    profile=energy_profile(1e-9, 1e-3),
                )
            )
            # nothing to wait for in an idle round: a late joiner opens the next round, whose
            # plan includes it (before the fix it got round 1's "not planned" answer forever)
            late = client.schedule("n1")
            assert late.round == first.round + 1
            plan = json.loads(client.status().last_plan_json)
            assert sorted(d["id"] for d in plan["devices"]) == ["n0", "n1"]
            assert client.schedule("n1") == late  # the new plan is stable for its holders
            assert client.schedule("n0").round == late.round


def test_an_idle_round_closes_after_its_timeout(tmp_path: Path) -> None:
    for server in running_server(tmp_path, cell=IDLE, round_timeout_s=0.3):
        with UplinkClient(server.address) as client:
            client.register(
                NodeRegistration("n0", 4, 10, samples=600, profile=energy_profile(1e-9, 1e-3))
            )
            first = client.schedule("n0")
            assert not first.upload and client.schedule("n0").round == first.round
            time.sleep(0.5)
            assert client.schedule("n0").round == first.round + 1


def test_round_closes_after_its_timeout_when_a_node_stays_silent(tmp_path: Path) -> None:
    for server in running_server(tmp_path, cell=CELL, round_timeout_s=0.3):
        with UplinkClient(server.address) as client:
            _register_fleet(client)
            first = client.schedule("n0")
            assert client.schedule("n0").round == first.round
            time.sleep(0.5)  # nobody uploaded
            assert client.schedule("n0").round == first.round + 1
