"""Unit checks of the server's resource limits (the gRPC-level ones: tests/integration)."""

from __future__ import annotations

import argparse
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from common.config import from_mapping
from common.errors import (
    BusyError,
    ConfigError,
    InvalidRequestError,
    StreamAbortedError,
    TooLargeError,
)
from common.records import EnergyProfile, NodeRegistration, UploadMode
from common.tensors import to_wire
from server.cli import ServerConfig, configure_parser, load_config
from server.core import MAX_NODE_SAMPLES, IngestLimits, validate_registration
from server.limits import (
    DEFAULT_MAX_CONCURRENT_RPCS,
    DEFAULT_MAX_CONCURRENT_STREAMS,
    DEFAULT_MAX_NODE_BYTES,
    DEFAULT_MAX_NODES,
    DEFAULT_STREAM_IDLE_TIMEOUT_S,
    StreamGate,
    StreamLimits,
)
from server.store import SqliteStore

_END = object()


class _Rpc:
    """A fake RPC whose request stream is a queue; cancel() ends a blocked read."""

    def __init__(self) -> None:
        self.requests: queue.Queue[object] = queue.Queue()
        self.cancels = 0

    def cancel(self) -> None:
        self.cancels += 1
        self.requests.put(_END)

    def stream(self) -> Iterator[int]:
        while (item := self.requests.get()) is not _END:
            assert isinstance(item, int)
            yield item


# --- StreamGate ------------------------------------------------------------------------------


def test_gate_refuses_a_stream_over_the_limit_at_once_and_frees_slots() -> None:
    gate = StreamGate(StreamLimits(max_concurrent_streams=2, stream_idle_timeout_s=5))
    with gate.admit(_Rpc(), "PushLatents"), gate.admit(_Rpc(), "PushLatents"):
        assert gate.in_flight == 2
        started = time.monotonic()
        with (
            pytest.raises(BusyError, match=r"server\.max_concurrent_streams = 2"),
            gate.admit(_Rpc(), "PushDelta"),
        ):
            pass  # pragma: no cover
        assert time.monotonic() - started < 0.5
    assert gate.in_flight == 0
    with gate.admit(_Rpc(), "PushLatents"):
        assert gate.in_flight == 1


def test_gate_cuts_off_an_idle_stream_and_cancels_its_rpc() -> None:
    gate = StreamGate(StreamLimits(max_concurrent_streams=4, stream_idle_timeout_s=0.3))
    rpc = _Rpc()
    rpc.requests.put(0)
    got: list[int] = []
    started = time.monotonic()
    with (
        pytest.raises(StreamAbortedError, match=r"server\.stream_idle_timeout_s = 0\.3"),
        gate.admit(rpc, "PushLatents") as stream,
    ):
        got.extend(stream.watch(rpc.stream()))
    elapsed = time.monotonic() - started
    assert got == [0]
    assert rpc.cancels == 1
    assert 0.25 < elapsed < 3.0
    assert gate.in_flight == 0


def test_gate_times_only_the_client_not_the_server_work_between_chunks() -> None:
    gate = StreamGate(StreamLimits(max_concurrent_streams=4, stream_idle_timeout_s=0.2))
    rpc = _Rpc()
    for i in range(3):
        rpc.requests.put(i)
    rpc.requests.put(_END)
    got = []
    with gate.admit(rpc, "PushLatents") as stream:
        for item in stream.watch(rpc.stream()):
            time.sleep(0.35)  # the server is slow with each chunk: not the client's idling
            got.append(item)
    assert got == [0, 1, 2] and rpc.cancels == 0


def test_gate_cuts_only_the_idle_stream() -> None:
    gate = StreamGate(StreamLimits(max_concurrent_streams=4, stream_idle_timeout_s=0.3))
    idle, busy = _Rpc(), _Rpc()
    outcome: dict[str, object] = {}

    def run(name: str, rpc: _Rpc) -> None:
        try:
            with gate.admit(rpc, name) as stream:
                outcome[name] = list(stream.watch(rpc.stream()))
        except StreamAbortedError as exc:
            outcome[name] = exc

    threads = [threading.Thread(target=run, args=a) for a in (("idle", idle), ("busy", busy))]
    for t in threads:
        t.start()
    for i in range(8):  # a chunk every 0.1 s: never idle for 0.3 s
        busy.requests.put(i)
        time.sleep(0.1)
    busy.requests.put(_END)
    for t in threads:
        t.join(timeout=10)
    assert isinstance(outcome["idle"], StreamAbortedError)
    assert outcome["busy"] == list(range(8))
    assert idle.cancels == 1 and busy.cancels == 0


def test_gate_watchdog_runs_only_while_streams_are_in_flight() -> None:
    gate = StreamGate(StreamLimits(max_concurrent_streams=4, stream_idle_timeout_s=0.2))
    rpc = _Rpc()
    rpc.requests.put(_END)
    with gate.admit(rpc, "PushLatents") as stream:
        assert list(stream.watch(rpc.stream())) == []
        assert any(t.name == "stream-watchdog" for t in threading.enumerate())
    deadline = time.monotonic() + 5
    while any(t.name == "stream-watchdog" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the watchdog outlived its streams"
        time.sleep(0.02)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"max_concurrent_streams": 0}, "server.max_concurrent_streams must be >= 1"),
        ({"stream_idle_timeout_s": 0.0}, "server.stream_idle_timeout_s must be > 0"),
        ({"stream_idle_timeout_s": float("nan")}, "server.stream_idle_timeout_s must be > 0"),
    ],
)
def test_stream_limits_reject_bad_values(kwargs: dict[str, float], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        StreamLimits(**kwargs)  # type: ignore[arg-type]


# --- registration fields -----------------------------------------------------------------------


def _profile(**overrides: float) -> EnergyProfile:
    fields: dict[str, float] = {
        "cpu_hz": 1e9,
        "kappa": 1e-28,
        "tx_power_w": 0.2,
        "channel_gain": 1e-6,
        "energy_budget_j": 5.0,
        "upload_bits": 1e6,
        "cycles_per_sample": 1e6,
    }
    fields.update(overrides)
    return EnergyProfile(**fields)


def test_a_valid_registration_passes() -> None:
    validate_registration(NodeRegistration("n0", 8, 10, samples=100, profile=_profile()))
    validate_registration(NodeRegistration("n0", 8, 10, samples=MAX_NODE_SAMPLES))


@pytest.mark.parametrize(
    ("reg", "needle"),
    [
        (
            NodeRegistration("n0", 8, 10, samples=2**63),
            "samples must be in 0..9007199254740992, got",
        ),
        (
            NodeRegistration("n0", 8, 10, samples=2**64 - 1),
            "samples must be in 0..9007199254740992, got",
        ),
        (NodeRegistration("n0", 8, 10, samples=-1), "samples must be in"),
        (NodeRegistration("n0", 0, 10), "latent_dim must be in 1..65536"),
        (NodeRegistration("n0", 2**32 - 1, 10), "latent_dim must be in"),
        (NodeRegistration("n0", 8, 1), "num_classes must be in 2..65536"),
        (NodeRegistration("n0", 8, 2**32 - 1), "num_classes must be in"),
        (
            NodeRegistration("n0", 8, 10, 5, _profile(cpu_hz=float("inf"))),
            "profile.cpu_hz must be finite",
        ),
        (
            NodeRegistration("n0", 8, 10, 5, _profile(kappa=float("nan"))),
            "profile.kappa must be finite",
        ),
        (
            NodeRegistration("n0", 8, 10, 5, _profile(tx_power_w=-1.0)),
            "profile.tx_power_w must be finite and >= 0, got -1.0",
        ),
        (
            NodeRegistration("n0", 8, 10, 5, _profile(energy_budget_j=1e300)),
            r"profile.energy_budget_j must be <= 1e\+30, got 1e\+300",
        ),
        (NodeRegistration("n0", 8, 10, 5, _profile(cpu_hz=0.0)), "cpu_hz must be a number > 0"),
        (
            NodeRegistration("n0", 8, 10, 5, _profile(channel_gain=0.0)),
            "channel_gain must be a number > 0",
        ),
    ],
)
def test_registration_fields_out_of_range_name_the_field(
    reg: NodeRegistration, needle: str
) -> None:
    with pytest.raises(InvalidRequestError, match=needle):
        validate_registration(reg)


# --- store: node count and per-node bytes, enforced in the commit transaction --------------------


def _stage(store: SqliteStore, upload_id: str, n: int, mode: UploadMode) -> int:
    """Stage one chunk of ``n`` (8-dim float32, uint8 label) samples; return its bytes."""
    x = np.ones((n, 8), np.float32)
    y = np.zeros(n, np.uint8)
    store.begin_upload(upload_id, "n0", mode)
    store.put_chunk(upload_id, 0, to_wire(x), to_wire(y), n)
    return x.nbytes + y.nbytes


def test_store_refuses_a_new_node_over_max_nodes_but_re_registers_old_ones(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path / "s.db")
    try:
        for i in range(3):
            store.register_node(NodeRegistration(f"n{i}", 8, 10), max_nodes=3)
        with pytest.raises(TooLargeError, match=r"holds 3 nodes.*server\.max_nodes = 3"):
            store.register_node(NodeRegistration("n3", 8, 10), max_nodes=3)
        store.register_node(NodeRegistration("n1", 8, 10, samples=7), max_nodes=3)
        assert [n.node_id for n in store.list_nodes()] == ["n0", "n1", "n2"]
    finally:
        store.close()


def test_store_commit_over_max_node_bytes_changes_nothing(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    try:
        store.register_node(NodeRegistration("n0", 8, 10))
        size = _stage(store, "u1", 10, UploadMode.REPLACE)  # 330 bytes
        store.commit_upload("u1", 1, max_node_bytes=500)
        _stage(store, "u2", 10, UploadMode.APPEND)
        with pytest.raises(TooLargeError, match=r"660 bytes.*server\.max_node_bytes = 500"):
            store.commit_upload("u2", 1, max_node_bytes=500)
        store.abort_upload("u2")
        assert store.node_payload_bytes("n0") == size
        assert len(store.node_data("n0")[1]) == 10
        _stage(store, "u3", 12, UploadMode.REPLACE)  # replaces: only its own bytes count
        store.commit_upload("u3", 1, max_node_bytes=500)
        assert len(store.node_data("n0")[1]) == 12
    finally:
        store.close()


# --- config: keys, defaults, flags -----------------------------------------------------------


def test_config_defaults_and_limits() -> None:
    config = ServerConfig()
    assert config.max_nodes == DEFAULT_MAX_NODES == 10_000
    assert config.max_node_bytes == DEFAULT_MAX_NODE_BYTES == 1 << 30
    assert config.max_concurrent_streams == DEFAULT_MAX_CONCURRENT_STREAMS == 64
    assert config.max_concurrent_rpcs == DEFAULT_MAX_CONCURRENT_RPCS == 128
    assert config.stream_idle_timeout_s == DEFAULT_STREAM_IDLE_TIMEOUT_S == 60.0
    IngestLimits(max_upload_bytes=1)


@pytest.mark.parametrize(
    ("table", "needle"),
    [
        ({"max_nodes": 0}, "server.max_nodes must be >= 1"),
        ({"max_node_bytes": -1}, "server.max_node_bytes must be >= 1"),
        ({"max_concurrent_streams": 8, "max_concurrent_rpcs": 8}, "must exceed"),
        ({"stream_idle_timeout_s": 0}, "server.stream_idle_timeout_s must be > 0"),
        ({"dedupe_drain_timeout_s": -1}, "server.dedupe_drain_timeout_s must be > 0"),
        ({"retrain_min_interval_s": -1}, "server.retrain_min_interval_s must be >= 0"),
        ({"max_nodes": "many"}, "server.max_nodes must be an integer"),
    ],
)
def test_config_rejects_bad_limits(table: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        from_mapping(ServerConfig, table, prefix="server.")


def test_limit_flags_override_the_file(tmp_path: Path) -> None:
    toml = tmp_path / "server.toml"
    toml.write_text("[server]\nmax_nodes = 5\nstream_idle_timeout_s = 9.5\n")
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    args = parser.parse_args(
        ["--config", str(toml), "--max-nodes", "7", "--max-concurrent-streams", "3"]
    )
    config = load_config(args)
    assert config.max_nodes == 7
    assert config.max_concurrent_streams == 3
    assert config.stream_idle_timeout_s == 9.5
    assert config.retrain_min_interval_s == ServerConfig().retrain_min_interval_s
