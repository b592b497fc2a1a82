"""Domain records of the edge <-> server protocol (what ``common/serde.py`` converts)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from common.tensors import WireTensor


class UploadMode(enum.Enum):
    """How a committed upload combines with a node's earlier latents."""

    REPLACE = "replace"
    APPEND = "append"


@dataclass(frozen=True)
class EnergyProfile:
    """A node's energy/radio profile for the round scheduler (see docs/allocation.md)."""

    upload_bits: float
    """Bits the node sends if it uploads this round."""
    cycles_per_sample: float
    """CPU cycles to encode one sample."""
    cpu_hz: float
    """CPU frequency (Hz)."""
    kappa: float
    """Effective switched capacitance (J·s²/cycle³)."""
    tx_power_w: float
    """Transmit power (W)."""
    channel_gain: float
    """Channel power gain (dimensionless)."""
    energy_budget_j: float
    """Energy budget for the round (J)."""
    finetune_energy_j: float
    """Energy (J) spent when the node only fine-tunes locally."""
    finetune_latency_s: float
    """Time (s) the node needs when it only fine-tunes locally."""


@dataclass(frozen=True)
class NodeRegistration:
    """What a node declares when it registers."""

    node_id: str
    latent_dim: int
    """Length of each latent vector."""
    num_classes: int
    """Labels are in ``[0, num_classes)``."""
    samples: int = 0
    """Training samples the node holds."""
    profile: EnergyProfile | None = None
    """Absent: the node takes no part in scheduling."""
    reset: bool = False
    """Drop the node's stored latents first."""


@dataclass(frozen=True)
class LatentChunk:
    """One streamed piece of an upload."""

    node_id: str
    upload_id: str
    seq: int
    last: bool
    latents: WireTensor
    labels: WireTensor
    mode: UploadMode = UploadMode.REPLACE
    """Read from seq 0 only."""
    total_samples: int = 0
    """Read from seq 0 only: samples in the whole upload."""


@dataclass(frozen=True)
class UploadAck:
    """The server's acknowledgement of a durably committed upload."""

    upload_id: str
    samples: int
    payload_bytes: int
    deduplicated: bool
    stored_samples: int


@dataclass(frozen=True)
class Prediction:
    """Classifier output for a batch of latents."""

    labels: np.ndarray
    """(n,) int64."""
    probabilities: np.ndarray
    """(n, num_classes) float32."""
    classifier_version: int


@dataclass(frozen=True)
class Schedule:
    """One node's decision for a round."""

    round: int
    upload: bool
    bandwidth_hz: float
    energy_j: float
    latency_s: float
    round_latency_s: float


@dataclass(frozen=True)
class NodeStatus:
    """What the server holds for one node."""

    node_id: str
    latent_dim: int
    num_classes: int
    samples: int
    uploads: int
    payload_bytes: int
    has_profile: bool


@dataclass(frozen=True)
class ClassifierStatus:
    """The server's current classifier."""

    version: int = 0
    mode: str = ""
    nodes: tuple[str, ...] = ()
    samples: int = 0
    train_accuracy: float = 0.0
    trained_at: float = 0.0
    """Seconds since the epoch; 0 = not trained yet."""
    training: bool = False


@dataclass(frozen=True)
class ServerStatus:
    """Everything ``latentedge status`` prints."""

    nodes: tuple[NodeStatus, ...]
    classifier: ClassifierStatus
    last_plan_json: str = ""
    """The last allocation plan as JSON; empty when none."""
