"""Domain records of the edge <-> server protocol (what ``common/serde.py`` converts)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

from common.delta import DeltaEntry
from common.tensors import WireTensor


class UploadMode(enum.Enum):
    """How a committed upload combines with a node's earlier latents."""

    REPLACE = "replace"
    APPEND = "append"


@dataclass(frozen=True)
class EnergyProfile:
    """A node's energy/radio profile for the round scheduler (see docs/allocation.md).

    The fields a node can know from its own model and data (``upload_bits``,
    ``cycles_per_sample``, ``finetune_energy_j``, ``finetune_latency_s``, ``delta_bits``)
    may be left at 0: an edge node derives them before it registers.
    """

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
    upload_bits: float = field(default=0.0, kw_only=True)
    """Bits the node sends if it uploads this round (0 = derived on the node)."""
    cycles_per_sample: float = field(default=0.0, kw_only=True)
    """CPU cycles to encode one sample (0 = derived on the node)."""
    finetune_energy_j: float = field(default=0.0, kw_only=True)
    """Energy (J) spent when the node only fine-tunes locally (0 = derived on the node)."""
    finetune_latency_s: float = field(default=0.0, kw_only=True)
    """Time (s) the node needs when it only fine-tunes locally (0 = derived on the node)."""
    delta_bits: float = field(default=0.0, kw_only=True)
    """Bits of the fine-tuning delta sent instead of latents; the scheduler adds its air time
    to the fine-tuning energy and latency (0 = no delta, or derived on the node)."""


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
    deltas: int = 0
    """Committed fine-tuning deltas."""
    delta_bytes: int = 0
    """Payload bytes of the newest delta."""
    delta_base_version: int = 0
    """Base version the newest delta was computed against (0 = none)."""


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
    models: tuple[ModelVersion, ...] = ()
    """Every base model version, oldest first."""
    next_page_token: str = ""
    """Set when more nodes follow (``GetStatus`` pages); empty on the last page."""


@dataclass(frozen=True)
class ModelVersion:
    """One version of the served base model."""

    version: int
    hash: str
    """SHA-256 hex of the model file."""
    parent_version: int = 0
    """The version it was aggregated from (0 = loaded from a file)."""
    nodes: tuple[str, ...] = ()
    """Nodes whose deltas were averaged into it."""
    samples: int = 0
    """Their training samples (the weights of the average)."""
    source: str = ""
    """``file:PATH`` or ``aggregate``."""
    created_at: float = 0.0


@dataclass(frozen=True)
class DeltaChunk:
    """One streamed piece of a delta upload."""

    node_id: str
    upload_id: str
    seq: int
    last: bool
    tensors: tuple[DeltaEntry, ...]
    base_version: int = 0
    """Read from seq 0 only (as are the fields below)."""
    base_hash: str = ""
    samples: int = 0
    """Training samples behind the delta (its aggregation weight)."""
    trainable: str = ""
    total_tensors: int = 0


@dataclass(frozen=True)
class DeltaAck:
    """The server's acknowledgement of a durably committed delta."""

    upload_id: str
    tensors: int
    params: int
    payload_bytes: int
    deduplicated: bool
    base_version: int
    current_version: int = 0
    """The base version after this upload (newer when it triggered an aggregation)."""


@dataclass(frozen=True)
class StoredDelta:
    """A committed delta as the server keeps it."""

    upload_id: str
    node_id: str
    base_version: int
    samples: int
    entries: tuple[DeltaEntry, ...]


@dataclass(frozen=True)
class TokenRecord:
    """A stored credential: who it speaks for and a salted hash of its secret (never the secret)."""

    token_id: str
    """Public part of the token (also in the token text), the key to look it up by."""
    subject: str
    """The node id it acts for (admin tokens: a free label)."""
    admin: bool
    salt: bytes
    digest: bytes
    """SHA-256 of ``salt + secret``."""
    created_at: float
    revoked_at: float | None = None
