from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from common.errors import CodecError
from common.records import (
    ClassifierStatus,
    EnergyProfile,
    LatentChunk,
    NodeRegistration,
    NodeStatus,
    Prediction,
    Schedule,
    ServerStatus,
    UploadAck,
    UploadMode,
)
from common.serde import (
    latent_chunk_from_proto,
    latent_chunk_to_proto,
    prediction_from_proto,
    prediction_to_proto,
    registration_from_proto,
    registration_to_proto,
    schedule_from_proto,
    schedule_to_proto,
    status_from_proto,
    status_to_proto,
    tensor_from_proto,
    tensor_to_proto,
    upload_ack_from_proto,
    upload_ack_to_proto,
)
from common.tensors import WireTensor, from_wire, to_wire

EXACT = ["float32", "float16", "uint8", "int16", "int32", "int64", "int8"]


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(EXACT),
    shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
    data=st.data(),
)
def test_round_trip_is_bit_exact(dtype: str, shape: tuple[int, ...], data: st.DataObject) -> None:
    arr = data.draw(hnp.arrays(np.dtype(dtype), shape))
    wire = to_wire(arr)
    assert wire.dtype == dtype and wire.shape == arr.shape
    back = from_wire(tensor_from_proto(tensor_to_proto(wire)))
    assert back.dtype == arr.dtype and back.flags.writeable
    assert back.shape == arr.shape and back.tobytes() == np.ascontiguousarray(arr).tobytes()


def test_bytes_are_little_endian() -> None:
    wire = to_wire(np.array([1], dtype=">i4"))
    assert wire.data == b"\x01\x00\x00\x00"


def test_float64_travels_as_float32() -> None:
    assert to_wire(np.array([0.5])).dtype == "float32"


@pytest.mark.parametrize(("encoding", "atol"), [("float16", 1e-3), ("int8", 1 / 127)])
def test_lossy_encodings_are_close(encoding: str, atol: float) -> None:
    x = np.random.default_rng(0).uniform(-1, 1, size=(50, 8)).astype(np.float32)
    wire = to_wire(x, encoding)
    assert wire.nbytes == x.size * np.dtype(encoding).itemsize
    back = from_wire(wire)
    assert back.dtype == (np.float16 if encoding == "float16" else np.float32)
    np.testing.assert_allclose(back.astype(np.float32), x, atol=atol)


def test_int8_of_zeros_and_empty() -> None:
    assert np.all(from_wire(to_wire(np.zeros((3, 2), np.float32), "int8")) == 0)
    assert from_wire(to_wire(np.zeros((0, 4), np.float32), "int8")).shape == (0, 4)


@pytest.mark.parametrize(
    ("tensor", "needle"),
    [
        (WireTensor(b"\x00" * 7, "float32", (2,)), "latents.data has 7 bytes, expected 8"),
        (WireTensor(b"", "complex64", (0,)), "latents.dtype must be one of"),
        (WireTensor(b"", "float32", (-1,)), "latents.shape must have at most 32 non-negative"),
        (WireTensor(b"\x01", "int8", (1,), scale=float("nan")), "latents.scale"),
    ],
)
def test_bad_tensors_name_the_field(tensor: WireTensor, needle: str) -> None:
    with pytest.raises(CodecError, match=needle):
        from_wire(tensor, "latents")


def test_encoding_errors() -> None:
    with pytest.raises(CodecError, match="encoding must be one of"):
        to_wire(np.zeros(2, np.float32), "bfloat16")
    with pytest.raises(CodecError, match="applies to float arrays"):
        to_wire(np.zeros(2, np.int64), "float16")
    with pytest.raises(CodecError, match="non-finite"):
        to_wire(np.array([np.nan], np.float32), "int8")


def test_records_round_trip_through_protos() -> None:
    profile = EnergyProfile(
        cpu_hz=1e9,
        kappa=1e-28,
        tx_power_w=0.2,
        channel_gain=1e-9,
        energy_budget_j=5.0,
        upload_bits=1e6,
        cycles_per_sample=2e6,
        finetune_energy_j=0.8,
        finetune_latency_s=4.0,
    )
    reg = NodeRegistration("n0", 16, 10, samples=7, profile=profile, reset=True)
    assert registration_from_proto(registration_to_proto(reg)) == reg
    assert (
        registration_from_proto(registration_to_proto(NodeRegistration("n1", 4, 3))).profile is None
    )
    chunk = LatentChunk(
        "n0",
        "u",
        3,
        True,
        to_wire(np.ones((2, 4), np.float16)),
        to_wire(np.arange(2, dtype=np.uint8)),
        UploadMode.APPEND,
        9,
    )
    assert latent_chunk_from_proto(latent_chunk_to_proto(chunk)) == chunk
    ack = UploadAck("u", 5, 100, True, 12)
    assert upload_ack_from_proto(upload_ack_to_proto(ack)) == ack
    sched = Schedule(3, True, 1.5e5, 0.25, 1.75, 2.0)
    assert schedule_from_proto(schedule_to_proto(sched)) == sched
    status = ServerStatus(
        nodes=(NodeStatus("n0", 16, 10, 5, 1, 100, True),),
        classifier=ClassifierStatus(2, "per_node", ("n0",), 5, 0.9, 1.0, False),
        last_plan_json='{"a": 1}',
    )
    assert status_from_proto(status_to_proto(status)) == status
    pred = Prediction(np.array([1, 2]), np.eye(2, 3, dtype=np.float32), 4)
    back = prediction_from_proto(prediction_to_proto(pred))
    np.testing.assert_array_equal(back.labels, pred.labels)
    np.testing.assert_array_equal(back.probabilities, pred.probabilities)
    assert back.classifier_version == 4


def test_unknown_upload_mode_is_rejected() -> None:
    msg = latent_chunk_to_proto(
        LatentChunk(
            "n0", "u", 0, True, to_wire(np.ones((1, 2), np.float32)), to_wire(np.zeros(1, np.uint8))
        )
    )
    msg.mode = 7  # type: ignore[assignment]
    with pytest.raises(CodecError, match="mode must be one of"):
        latent_chunk_from_proto(msg)
