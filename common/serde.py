"""Domain records <-> generated protobuf messages (the only common module that imports protos)."""

from __future__ import annotations

import struct
from collections.abc import Iterator

from common.delta import DeltaEntry, DeltaKind
from common.errors import CodecError
from common.records import (
    ClassifierStatus,
    DeltaAck,
    DeltaChunk,
    EnergyProfile,
    LatentChunk,
    ModelVersion,
    NodeRegistration,
    NodeStatus,
    Prediction,
    Schedule,
    ServerStatus,
    UploadAck,
    UploadMode,
)
from common.tensors import WireArray, WireTensor, from_wire, to_wire
from protos import tensor_pb2, uplink_pb2

_MODE_TO_PROTO = {
    UploadMode.REPLACE: uplink_pb2.UPLOAD_MODE_REPLACE,
    UploadMode.APPEND: uplink_pb2.UPLOAD_MODE_APPEND,
}
_MODE_FROM_PROTO: dict[int, UploadMode] = {
    uplink_pb2.UPLOAD_MODE_UNSPECIFIED: UploadMode.REPLACE,
    uplink_pb2.UPLOAD_MODE_REPLACE: UploadMode.REPLACE,
    uplink_pb2.UPLOAD_MODE_APPEND: UploadMode.APPEND,
}


def tensor_to_proto(tensor: WireTensor) -> tensor_pb2.Tensor:
    """Wire tensor -> proto."""
    return tensor_pb2.Tensor(
        data=bytes(tensor.data), dtype=tensor.dtype, shape=list(tensor.shape), scale=tensor.scale
    )


def tensor_from_proto(msg: tensor_pb2.Tensor) -> WireTensor:
    """Proto -> wire tensor (not yet decoded; see :func:`common.tensors.from_wire`)."""
    return WireTensor(
        data=bytes(msg.data),
        dtype=msg.dtype,
        shape=tuple(int(d) for d in msg.shape),
        scale=msg.scale,
    )


def profile_to_proto(profile: EnergyProfile) -> uplink_pb2.EnergyProfile:
    """Energy profile -> proto."""
    return uplink_pb2.EnergyProfile(
        upload_bits=profile.upload_bits,
        cycles_per_sample=profile.cycles_per_sample,
        cpu_hz=profile.cpu_hz,
        kappa=profile.kappa,
        tx_power_w=profile.tx_power_w,
        channel_gain=profile.channel_gain,
        energy_budget_j=profile.energy_budget_j,
        finetune_energy_j=profile.finetune_energy_j,
        finetune_latency_s=profile.finetune_latency_s,
        delta_bits=profile.delta_bits,
    )


def profile_from_proto(msg: uplink_pb2.EnergyProfile) -> EnergyProfile:
    """Proto -> energy profile."""
    return EnergyProfile(
        upload_bits=msg.upload_bits,
        cycles_per_sample=msg.cycles_per_sample,
        cpu_hz=msg.cpu_hz,
        kappa=msg.kappa,
        tx_power_w=msg.tx_power_w,
        channel_gain=msg.channel_gain,
        energy_budget_j=msg.energy_budget_j,
        finetune_energy_j=msg.finetune_energy_j,
        finetune_latency_s=msg.finetune_latency_s,
        delta_bits=msg.delta_bits,
    )


def registration_to_proto(reg: NodeRegistration) -> uplink_pb2.RegisterNodeRequest:
    """Node registration -> proto."""
    msg = uplink_pb2.RegisterNodeRequest(
        node_id=reg.node_id,
        latent_dim=reg.latent_dim,
        num_classes=reg.num_classes,
        samples=reg.samples,
        reset=reg.reset,
    )
    if reg.profile is not None:
        msg.profile.CopyFrom(profile_to_proto(reg.profile))
    return msg


def registration_from_proto(msg: uplink_pb2.RegisterNodeRequest) -> NodeRegistration:
    """Proto -> node registration."""
    return NodeRegistration(
        node_id=msg.node_id,
        latent_dim=msg.latent_dim,
        num_classes=msg.num_classes,
        samples=msg.samples,
        profile=profile_from_proto(msg.profile) if msg.HasField("profile") else None,
        reset=msg.reset,
    )


def latent_chunk_to_proto(chunk: LatentChunk) -> uplink_pb2.LatentChunk:
    """Upload chunk -> proto."""
    return uplink_pb2.LatentChunk(
        node_id=chunk.node_id,
        upload_id=chunk.upload_id,
        seq=chunk.seq,
        last=chunk.last,
        latents=tensor_to_proto(chunk.latents),
        labels=tensor_to_proto(chunk.labels),
        mode=_MODE_TO_PROTO[chunk.mode],
        total_samples=chunk.total_samples,
    )


# -- hand-written LatentChunk serialiser --------------------------------------------------
# The bytes protobuf's SerializeToString gives for the same message (fields in number order,
# proto3 defaults left out, ``shape`` packed), built with one copy of the payload instead of
# four (ndarray -> bytes -> message -> serialised message). The schema is protos/uplink.proto
# and protos/tensor.proto; tests/unit/common/test_serde_wire.py checks byte equality.

_WIRE_VARINT = 0
_WIRE_FIXED64 = 1
_WIRE_LEN = 2
_WIRE_FIXED32 = 5
_U32_MASK = (1 << 32) - 1
_U64_MASK = (1 << 64) - 1


def _varint(value: int) -> bytes:
    """Base-128 varint of ``value`` (negative values as their 64-bit two's complement)."""
    value &= _U64_MASK
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint((field << 3) | wire_type)


def _len_field(field: int, payload_bytes: int) -> bytes:
    """Key and length prefix of a length-delimited field (the payload follows)."""
    return _key(field, _WIRE_LEN) + _varint(payload_bytes)


def _string_field(field: int, value: str) -> bytes:
    if not value:
        return b""
    raw = value.encode("utf-8")
    return _len_field(field, len(raw)) + raw


def _varint_field(field: int, value: int) -> bytes:
    return _key(field, _WIRE_VARINT) + _varint(value) if value else b""


def _tensor_parts(tensor: WireArray) -> tuple[bytes, memoryview | None, bytes]:
    """A ``Tensor`` message as (head, data, tail): head ends with data's key and length."""
    data = tensor.buffer()
    size = len(data)
    head = _len_field(1, size) if size else b""
    tail = _string_field(2, tensor.dtype)
    if tensor.shape:
        dims = b"".join(_varint(d) for d in tensor.shape)
        tail += _len_field(3, len(dims)) + dims
    scale = struct.pack("<f", tensor.scale)
    if scale != b"\0\0\0\0":  # proto3 leaves out a float whose bits are all zero
        tail += _key(4, _WIRE_FIXED32) + scale
    return head, data if size else None, tail


def latent_chunk_to_bytes(
    *,
    node_id: str,
    upload_id: str,
    seq: int,
    last: bool,
    latents: WireArray,
    labels: WireArray,
    mode: UploadMode,
    total_samples: int,
) -> bytes:
    """The serialised ``LatentChunk``, copying each tensor's payload once, from its array.

    The bytes equal ``latent_chunk_to_proto(...).SerializeToString()`` for the same chunk.
    """
    parts: list[bytes | memoryview] = [
        _string_field(1, node_id) + _string_field(2, upload_id) + _varint_field(3, seq)
    ]
    if last:
        parts.append(_key(4, _WIRE_VARINT) + b"\x01")
    for field, tensor in ((5, latents), (6, labels)):
        head, data, tail = _tensor_parts(tensor)
        size = len(head) + (len(data) if data is not None else 0) + len(tail)
        parts.append(_len_field(field, size) + head)
        if data is not None:
            parts.append(data)
        parts.append(tail)
    parts.append(_varint_field(7, int(_MODE_TO_PROTO[mode])) + _varint_field(8, total_samples))
    return b"".join(parts)


def latent_chunk_from_bytes(data: bytes) -> LatentChunk:
    """Parse a serialised ``LatentChunk`` without copying its tensors' payloads.

    The result equals ``latent_chunk_from_proto(LatentChunk.FromString(data))``, but each
    tensor's ``data`` is a read-only ``memoryview`` of ``data`` (a 4 MiB chunk is not copied
    into a message and then out of it). Wire-format rules as protobuf applies them: the last
    value of a scalar field wins, a repeated message field merges, ``shape`` may be packed or
    not, fields of unknown number or of an unexpected wire type are skipped, strings must be
    UTF-8.

    Raises:
        CodecError: the bytes are not a well-formed ``LatentChunk`` (truncated, a varint of
            more than 10 bytes, a group, invalid UTF-8, an unknown upload mode).
    """
    view = memoryview(data)
    node_id = upload_id = ""
    seq = total_samples = mode = 0
    last = False
    tensors: dict[int, _TensorFields] = {}
    for field, wire_type, value in _fields(data, 0, len(data)):
        if wire_type == _WIRE_LEN and isinstance(value, tuple):
            if field in (1, 2):
                text = _utf8(view[value[0] : value[1]], "node_id" if field == 1 else "upload_id")
                node_id, upload_id = (text, upload_id) if field == 1 else (node_id, text)
            elif field in (5, 6):
                _merge_tensor(tensors.setdefault(field, _TensorFields()), data, view, *value)
        elif wire_type == _WIRE_VARINT and isinstance(value, int):
            if field == 3:
                seq = value & 0xFFFFFFFF
            elif field == 4:
                last = value != 0
            elif field == 7:
                mode = _signed(value & 0xFFFFFFFF, 32)
            elif field == 8:
                total_samples = value
    empty = _TensorFields()
    return LatentChunk(
        node_id=node_id,
        upload_id=upload_id,
        seq=seq,
        last=last,
        latents=tensors.get(5, empty).wire(),
        labels=tensors.get(6, empty).wire(),
        mode=_mode_from_proto(mode),
        total_samples=total_samples,
    )


class _TensorFields:
    """A ``Tensor`` message as its fields arrive (several occurrences merge)."""

    def __init__(self) -> None:
        self.data: memoryview | bytes = b""
        self.dtype = ""
        self.shape: list[int] = []
        self.scale = 0.0

    def wire(self) -> WireTensor:
        return WireTensor(self.data, self.dtype, tuple(self.shape), self.scale)


def _merge_tensor(into: _TensorFields, data: bytes, view: memoryview, start: int, end: int) -> None:
    for field, wire_type, value in _fields(data, start, end):
        if field == 1 and isinstance(value, tuple):
            into.data = view[value[0] : value[1]]
        elif field == 2 and isinstance(value, tuple):
            into.dtype = _utf8(view[value[0] : value[1]], "tensor dtype")
        elif field == 3 and wire_type == _WIRE_LEN and isinstance(value, tuple):  # packed
            pos, stop = value
            while pos < stop:
                dim, pos = _read_varint(data, pos, stop)
                into.shape.append(_signed(dim, 64))
        elif field == 3 and wire_type == _WIRE_VARINT and isinstance(value, int):
            into.shape.append(_signed(value, 64))
        elif field == 4 and wire_type == _WIRE_FIXED32 and isinstance(value, int):
            (into.scale,) = struct.unpack("<f", value.to_bytes(4, "little"))


def _fields(data: bytes, pos: int, end: int) -> Iterator[tuple[int, int, int | tuple[int, int]]]:
    """(field number, wire type, value) of each field in ``data[pos:end]``.

    The value is an int for varint and fixed-width fields, (start, end) for length-delimited.
    """
    while pos < end:
        key, pos = _read_varint(data, pos, end)
        field, wire_type = key >> 3, key & 7
        if field == 0:
            raise CodecError("malformed message: field number 0")
        if key > _U32_MASK:  # protobuf reads a key as 32 bits: field numbers end at 2^29 - 1
            raise CodecError(f"malformed message: field key {key} is wider than 32 bits")
        value: int | tuple[int, int]
        if wire_type == _WIRE_VARINT:
            value, pos = _read_varint(data, pos, end)
        elif wire_type in (_WIRE_FIXED64, _WIRE_FIXED32):
            width = 8 if wire_type == _WIRE_FIXED64 else 4
            if end - pos < width:
                raise CodecError(f"malformed message: field {field} is truncated")
            value = int.from_bytes(data[pos : pos + width], "little")
            pos += width
        elif wire_type == _WIRE_LEN:
            size, pos = _read_varint(data, pos, end)
            if size > end - pos:
                raise CodecError(
                    f"malformed message: field {field} declares {size} bytes, {end - pos} remain"
                )
            value = (pos, pos + size)
            pos += size
        else:
            raise CodecError(f"malformed message: field {field} has wire type {wire_type}")
        yield field, wire_type, value


def _read_varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise CodecError("malformed message: truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result & _U64_MASK, pos
        shift += 7
        if shift >= 70:
            raise CodecError("malformed message: varint longer than 10 bytes")


def _signed(value: int, bits: int) -> int:
    return value - (1 << bits) if value >= 1 << (bits - 1) else value


def _utf8(raw: memoryview, what: str) -> str:
    try:
        return str(raw, "utf-8")
    except UnicodeDecodeError as exc:
        raise CodecError(f"{what} is not valid UTF-8: {exc}") from exc


def latent_chunk_from_proto(msg: uplink_pb2.LatentChunk) -> LatentChunk:
    """Proto -> upload chunk (an unset mode means REPLACE)."""
    return LatentChunk(
        node_id=msg.node_id,
        upload_id=msg.upload_id,
        seq=msg.seq,
        last=msg.last,
        latents=tensor_from_proto(msg.latents),
        labels=tensor_from_proto(msg.labels),
        mode=_mode_from_proto(msg.mode),
        total_samples=msg.total_samples,
    )


def _mode_from_proto(value: int) -> UploadMode:
    mode = _MODE_FROM_PROTO.get(int(value))
    if mode is None:
        raise CodecError(f"mode must be one of {sorted(_MODE_FROM_PROTO)}, got {value}")
    return mode


def upload_ack_to_proto(ack: UploadAck) -> uplink_pb2.PushLatentsReply:
    """Upload acknowledgement -> proto."""
    return uplink_pb2.PushLatentsReply(
        upload_id=ack.upload_id,
        samples=ack.samples,
        payload_bytes=ack.payload_bytes,
        deduplicated=ack.deduplicated,
        stored_samples=ack.stored_samples,
    )


def upload_ack_from_proto(msg: uplink_pb2.PushLatentsReply) -> UploadAck:
    """Proto -> upload acknowledgement."""
    return UploadAck(
        upload_id=msg.upload_id,
        samples=msg.samples,
        payload_bytes=msg.payload_bytes,
        deduplicated=msg.deduplicated,
        stored_samples=msg.stored_samples,
    )


def prediction_to_proto(pred: Prediction) -> uplink_pb2.ClassifyReply:
    """Prediction -> proto."""
    return uplink_pb2.ClassifyReply(
        labels=tensor_to_proto(to_wire(pred.labels)),
        probabilities=tensor_to_proto(to_wire(pred.probabilities)),
        classifier_version=pred.classifier_version,
    )


def prediction_from_proto(msg: uplink_pb2.ClassifyReply) -> Prediction:
    """Proto -> prediction."""
    return Prediction(
        labels=from_wire(tensor_from_proto(msg.labels), "labels"),
        probabilities=from_wire(tensor_from_proto(msg.probabilities), "probabilities"),
        classifier_version=msg.classifier_version,
    )


def schedule_to_proto(schedule: Schedule) -> uplink_pb2.GetScheduleReply:
    """Schedule -> proto."""
    return uplink_pb2.GetScheduleReply(
        round=schedule.round,
        upload=schedule.upload,
        bandwidth_hz=schedule.bandwidth_hz,
        energy_j=schedule.energy_j,
        latency_s=schedule.latency_s,
        round_latency_s=schedule.round_latency_s,
    )


def schedule_from_proto(msg: uplink_pb2.GetScheduleReply) -> Schedule:
    """Proto -> schedule."""
    return Schedule(
        round=msg.round,
        upload=msg.upload,
        bandwidth_hz=msg.bandwidth_hz,
        energy_j=msg.energy_j,
        latency_s=msg.latency_s,
        round_latency_s=msg.round_latency_s,
    )


def status_to_proto(status: ServerStatus) -> uplink_pb2.GetStatusReply:
    """Server status -> proto."""
    c = status.classifier
    return uplink_pb2.GetStatusReply(
        nodes=[
            uplink_pb2.NodeStatus(
                node_id=n.node_id,
                latent_dim=n.latent_dim,
                num_classes=n.num_classes,
                samples=n.samples,
                uploads=n.uploads,
                payload_bytes=n.payload_bytes,
                has_profile=n.has_profile,
                deltas=n.deltas,
                delta_bytes=n.delta_bytes,
                delta_base_version=n.delta_base_version,
            )
            for n in status.nodes
        ],
        classifier=uplink_pb2.ClassifierStatus(
            version=c.version,
            mode=c.mode,
            nodes=list(c.nodes),
            samples=c.samples,
            train_accuracy=c.train_accuracy,
            trained_at=c.trained_at,
            training=c.training,
        ),
        last_plan_json=status.last_plan_json,
        models=[model_version_to_proto(m) for m in status.models],
        next_page_token=status.next_page_token,
    )


def status_from_proto(msg: uplink_pb2.GetStatusReply) -> ServerStatus:
    """Proto -> server status."""
    c = msg.classifier
    return ServerStatus(
        nodes=tuple(
            NodeStatus(
                node_id=n.node_id,
                latent_dim=n.latent_dim,
                num_classes=n.num_classes,
                samples=n.samples,
                uploads=n.uploads,
                payload_bytes=n.payload_bytes,
                has_profile=n.has_profile,
                deltas=n.deltas,
                delta_bytes=n.delta_bytes,
                delta_base_version=n.delta_base_version,
            )
            for n in msg.nodes
        ),
        classifier=ClassifierStatus(
            version=c.version,
            mode=c.mode,
            nodes=tuple(c.nodes),
            samples=c.samples,
            train_accuracy=c.train_accuracy,
            trained_at=c.trained_at,
            training=c.training,
        ),
        last_plan_json=msg.last_plan_json,
        models=tuple(model_version_from_proto(m) for m in msg.models),
        next_page_token=msg.next_page_token,
    )


def model_version_to_proto(m: ModelVersion) -> uplink_pb2.ModelVersion:
    """Base model version -> proto."""
    return uplink_pb2.ModelVersion(
        version=m.version,
        hash=m.hash,
        parent_version=m.parent_version,
        nodes=list(m.nodes),
        samples=m.samples,
        source=m.source,
        created_at=m.created_at,
    )


def model_version_from_proto(msg: uplink_pb2.ModelVersion) -> ModelVersion:
    """Proto -> base model version."""
    return ModelVersion(
        version=msg.version,
        hash=msg.hash,
        parent_version=msg.parent_version,
        nodes=tuple(msg.nodes),
        samples=msg.samples,
        source=msg.source,
        created_at=msg.created_at,
    )


_KIND_TO_PROTO = {
    DeltaKind.DENSE: uplink_pb2.DELTA_KIND_DENSE,
    DeltaKind.SPARSE_INDEX: uplink_pb2.DELTA_KIND_SPARSE_INDEX,
    DeltaKind.SPARSE_BITMAP: uplink_pb2.DELTA_KIND_SPARSE_BITMAP,
    DeltaKind.LOW_RANK: uplink_pb2.DELTA_KIND_LOW_RANK,
}
_KIND_FROM_PROTO: dict[int, DeltaKind] = {int(v): k for k, v in _KIND_TO_PROTO.items()}


def delta_entry_to_proto(entry: DeltaEntry) -> uplink_pb2.DeltaTensor:
    """Delta entry -> proto."""
    msg = uplink_pb2.DeltaTensor(
        name=entry.name, kind=_KIND_TO_PROTO[entry.kind], values=tensor_to_proto(entry.values)
    )
    if entry.positions is not None:
        msg.positions.CopyFrom(tensor_to_proto(entry.positions))
    if entry.right is not None:
        msg.right.CopyFrom(tensor_to_proto(entry.right))
    return msg


def delta_entry_from_proto(msg: uplink_pb2.DeltaTensor) -> DeltaEntry:
    """Proto -> delta entry (shapes and values are checked later, against the base)."""
    kind = _KIND_FROM_PROTO.get(int(msg.kind))
    if kind is None:
        raise CodecError(
            f"tensor {msg.name!r}: kind must be one of {sorted(_KIND_FROM_PROTO)}, got {msg.kind}"
        )
    return DeltaEntry(
        name=msg.name,
        kind=kind,
        values=tensor_from_proto(msg.values),
        positions=tensor_from_proto(msg.positions) if msg.HasField("positions") else None,
        right=tensor_from_proto(msg.right) if msg.HasField("right") else None,
    )


def delta_chunk_to_proto(chunk: DeltaChunk) -> uplink_pb2.DeltaChunk:
    """Delta chunk -> proto."""
    return uplink_pb2.DeltaChunk(
        node_id=chunk.node_id,
        upload_id=chunk.upload_id,
        seq=chunk.seq,
        last=chunk.last,
        base_version=chunk.base_version,
        base_hash=chunk.base_hash,
        samples=chunk.samples,
        trainable=chunk.trainable,
        total_tensors=chunk.total_tensors,
        tensors=[delta_entry_to_proto(e) for e in chunk.tensors],
    )


def delta_chunk_from_proto(msg: uplink_pb2.DeltaChunk) -> DeltaChunk:
    """Proto -> delta chunk."""
    return DeltaChunk(
        node_id=msg.node_id,
        upload_id=msg.upload_id,
        seq=msg.seq,
        last=msg.last,
        tensors=tuple(delta_entry_from_proto(t) for t in msg.tensors),
        base_version=msg.base_version,
        base_hash=msg.base_hash,
        samples=msg.samples,
        trainable=msg.trainable,
        total_tensors=msg.total_tensors,
    )


def delta_ack_to_proto(ack: DeltaAck) -> uplink_pb2.PushDeltaReply:
    """Delta acknowledgement -> proto."""
    return uplink_pb2.PushDeltaReply(
        upload_id=ack.upload_id,
        tensors=ack.tensors,
        params=ack.params,
        payload_bytes=ack.payload_bytes,
        deduplicated=ack.deduplicated,
        base_version=ack.base_version,
        current_version=ack.current_version,
    )


def delta_ack_from_proto(msg: uplink_pb2.PushDeltaReply) -> DeltaAck:
    """Proto -> delta acknowledgement."""
    return DeltaAck(
        upload_id=msg.upload_id,
        tensors=msg.tensors,
        params=msg.params,
        payload_bytes=msg.payload_bytes,
        deduplicated=msg.deduplicated,
        base_version=msg.base_version,
        current_version=msg.current_version,
    )
