from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from common.models import ClassifierConfig
from common.records import EnergyProfile
from common.tls import ServerTls
from server.allocation import Cell
from server.auth import Authenticator
from server.classifier import ClassifierMode
from server.core import IngestLimits, SplitLearningServer
from server.grpc_app import create_server
from server.servicer import UplinkServicer
from server.store import SqliteStore


@dataclass
class RunningServer:
    address: str
    db: Path
    core: SplitLearningServer
    channel: grpc.Channel


def running_server(
    tmp_path: Path,
    cell: Cell | None = None,
    round_timeout_s: float = 600.0,
    tls: ServerTls | None = None,
    auth: bool = False,
) -> Iterator[RunningServer]:
    """A real gRPC server on 127.0.0.1:0 over a real SQLite file; small upload limit.

    ``auth``: credentials required on every RPC (as ``latentedge server`` with TLS does).
    """
    db = tmp_path / "server.db"
    store = SqliteStore(db)
    core = SplitLearningServer(
        store,
        limits=IngestLimits(max_upload_bytes=1_000_000),
        classifier_mode=ClassifierMode.PER_NODE,
        classifier_config=ClassifierConfig(epochs=5),
        cell=cell,
        round_timeout_s=round_timeout_s,
    )
    core.start()
    servicer = UplinkServicer(core, auth=Authenticator(store, required=auth))
    server, port, _health = create_server("127.0.0.1:0", servicer, tls=tls)
    address = f"127.0.0.1:{port}"
    channel = grpc.insecure_channel(address)
    yield RunningServer(address=address, db=db, core=core, channel=channel)
    channel.close()
    server.stop(grace=None).wait()
    core.stop()
    store.close()


def energy_profile(gain: float, finetune_energy_j: float = 1.5) -> EnergyProfile:
    """A node's energy profile for scheduling tests: only the channel gain (and the cost of
    fine-tuning locally) vary."""
    return EnergyProfile(
        upload_bits=4e6,
        cycles_per_sample=1e6,
        cpu_hz=1.5e9,
        kappa=1e-28,
        tx_power_w=0.2,
        channel_gain=gain,
        energy_budget_j=20.0,
        finetune_energy_j=finetune_energy_j,
        finetune_latency_s=6.0,
    )
