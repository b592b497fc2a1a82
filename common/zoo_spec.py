"""Names of the model zoo's networks and :class:`ModelSpec`, without importing torch.

``latentedge train`` checks ``--model``/``--norm`` with these before it imports torch, so a
typo fails at once; :mod:`common.zoo` builds the networks.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from common.errors import ConfigError

MODEL_NAMES: tuple[str, ...] = (
    "mlp",
    "lenet",
    "resnet8",
    "resnet20",
    "resnet32",
    "resnet44",
    "vgg11",
    "vgg16",
)
"""Networks :func:`build_model` knows."""

NORMS: tuple[str, ...] = ("none", "bn", "l1", "topk")
"""Normalisation layers a network can use (``""`` = the network's own default)."""

_DEFAULT_NORM = {"mlp": "none", "lenet": "none"}
"""Networks whose default is not ``bn``."""


def check_model_name(name: str, norm: str = "") -> None:
    """Raise ConfigError unless ``name`` is a zoo network and ``norm`` one it can use."""
    if name not in MODEL_NAMES:
        raise ConfigError(f"model must be one of {list(MODEL_NAMES)}, got {name!r}")
    if norm and norm not in NORMS:
        raise ConfigError(f"norm must be one of {list(NORMS)}, got {norm!r}")
    if name == "mlp" and norm not in ("", "none"):
        raise ConfigError("the mlp has no convolutions to normalise; use norm none")


@dataclass(frozen=True)
class ModelSpec:
    """What it takes to rebuild a zoo network: its name and the data's geometry."""

    name: str
    """One of :data:`MODEL_NAMES`."""
    in_channels: int
    """Channels of an input image."""
    height: int
    """Input height (pixels)."""
    width: int
    """Input width (pixels)."""
    num_classes: int
    """Outputs of the head."""
    norm: str = ""
    """Normalisation after each convolution: ``none``, ``bn``, ``l1`` or ``topk``
    (``common.norms``); empty = the network's default (``bn`` for ResNets and VGGs, ``none``
    for ``mlp`` and ``lenet``)."""

    def __post_init__(self) -> None:
        check_model_name(self.name, self.norm)
        for key in ("in_channels", "height", "width"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key} must be >= 1, got {getattr(self, key)}")
        if self.num_classes < 2:
            raise ConfigError(f"model.num_classes must be >= 2, got {self.num_classes}")

    def to_json(self) -> str:
        """Canonical JSON (sorted keys) of the spec."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        """Parse :meth:`to_json` output; ConfigError on anything else."""
        try:
            doc = json.loads(text)
            return cls(**doc)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"not a model spec: {text[:200]!r} ({exc})") from exc

    @property
    def norm_kind(self) -> str:
        """The normalisation in effect (the default resolved)."""
        return self.norm or _DEFAULT_NORM.get(self.name, "bn")
