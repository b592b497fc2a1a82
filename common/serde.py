"""Domain records <-> generated protobuf messages (the only common module that imports protos)."""

from __future__ import annotations

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
from common.tensors import WireTensor, from_wire, to_wire
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
        data=tensor.data, dtype=tensor.dtype, shape=list(tensor.shape), scale=tensor.scale
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
    )
