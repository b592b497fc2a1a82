"""The server streams uploads to storage: its RSS does not grow with the upload's size.

One 200 MB upload goes through a real ``latentedge server`` process (validation and staging
of every chunk in SQLite, exactly as a committed upload) while psutil samples the process's
RSS. The stream ends without a chunk marked ``last``, so nothing is committed and the
classifier trainer (which loads all committed latents into memory, by design) stays idle and
cannot blur the measurement.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest

from common.constants import MAX_MESSAGE_BYTES
from common.records import LatentChunk, NodeRegistration
from common.serde import latent_chunk_to_proto
from common.tensors import to_wire
from edge.uplink import UplinkClient
from protos import uplink_pb2, uplink_pb2_grpc
from tests.conftest import start_server_process

DIM = 1024
ROWS = 1024  # 4 MiB of float32 latents per chunk, like CHUNK_BYTES
CHUNKS = 48  # ~200 MB in all
MAX_GROWTH_BYTES = 100_000_000  # half the payload: retaining it would exceed this


def _stream(upload_id: str, chunks: int) -> Iterator[uplink_pb2.LatentChunk]:
    rng = np.random.default_rng(0)
    latents = to_wire(rng.normal(size=(ROWS, DIM)).astype(np.float32))
    labels = to_wire(rng.integers(0, 10, ROWS).astype(np.uint8))
    for seq in range(chunks):  # never marked last: staged, then discarded
        yield latent_chunk_to_proto(
            LatentChunk(
                node_id="n0",
                upload_id=upload_id,
                seq=seq,
                last=False,
                latents=latents,
                labels=labels,
            )
        )


def _push(stub: uplink_pb2_grpc.UplinkStub, upload_id: str, chunks: int) -> str:
    with pytest.raises(grpc.RpcError) as info:
        stub.PushLatents(_stream(upload_id, chunks), timeout=120)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return str(info.value.details())


def test_server_rss_stays_flat_during_a_200mb_upload(tmp_path: Path) -> None:
    server = start_server_process(tmp_path / "server.db")
    try:
        with UplinkClient(server.address) as client:
            client.register(
                NodeRegistration(node_id="n0", latent_dim=DIM, num_classes=10, samples=ROWS)
            )
        proc = psutil.Process(server.proc.pid)
        with grpc.insecure_channel(
            server.address, options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        ) as channel:
            stub = uplink_pb2_grpc.UplinkStub(channel)
            _push(stub, "warm-up", 4)  # first-use allocations: connections, caches, buffers
            before = proc.memory_info().rss
            peak = before
            done = threading.Event()

            def sample() -> None:
                nonlocal peak
                while not done.wait(0.01):
                    peak = max(peak, proc.memory_info().rss)

            sampler = threading.Thread(target=sample)
            sampler.start()
            try:
                details = _push(stub, "big", CHUNKS)
            finally:
                done.set()
                sampler.join()
        # the server really took in (validated and staged) every chunk before rejecting
        assert f"ended after {CHUNKS} chunk(s) without a chunk marked last" in details
        payload_mb = CHUNKS * ROWS * (DIM * 4 + 1) / 1e6
        assert peak - before < MAX_GROWTH_BYTES, (
            f"server RSS grew by {(peak - before) / 1e6:.0f} MB while ingesting "
            f"{payload_mb:.0f} MB (limit {MAX_GROWTH_BYTES / 1e6:.0f} MB)"
        )
    finally:
        server.stop()
