"""Network architectures shared by edge and server: the convolutional autoencoder and the MLP.

The encoder is deliberately plain (Conv, ReLU, Flatten, Linear; BatchNorm optional and off by
default) so that it exports to ONNX as Conv/Relu/Flatten/Gemm nodes, which the analog device
simulator can inject noise into.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from common.errors import ConfigError


@dataclass(frozen=True)
class AutoencoderConfig:
    """Geometry and size of a :class:`ConvAutoencoder`."""

    in_channels: int
    """Channels of an input image (1 for grey, 3 for RGB)."""
    height: int
    """Input image height (pixels)."""
    width: int
    """Input image width (pixels)."""
    latent_dim: int
    """Number of latent elements per image (what the node uploads)."""
    channels: tuple[int, ...] = (16, 32)
    """Output channels of each stride-2 3x3 convolution of the encoder (one entry per stage)."""
    batch_norm: bool = False
    """Put BatchNorm after each convolution (off by default: BN hurts analog noise robustness)."""

    def __post_init__(self) -> None:
        for name in ("in_channels", "height", "width", "latent_dim"):
            value = getattr(self, name)
            if value < 1:
                raise ConfigError(f"autoencoder.{name} must be >= 1, got {value}")
        if not self.channels or any(c < 1 for c in self.channels):
            raise ConfigError(
                f"autoencoder.channels must be a non-empty list of positive integers, "
                f"got {list(self.channels)}"
            )

    @property
    def input_elements(self) -> int:
        """Elements of one input image, ``C * H * W``."""
        return self.in_channels * self.height * self.width

    def spatial_sizes(self) -> list[tuple[int, int]]:
        """Feature-map ``(height, width)`` before each stage and after the last one."""
        sizes = [(self.height, self.width)]
        for _ in self.channels:
            h, w = sizes[-1]
            sizes.append((math.ceil(h / 2), math.ceil(w / 2)))
        return sizes


def compression_ratio(config: AutoencoderConfig) -> float:
    """Input elements per latent element (the papers' compression ratio)."""
    return config.input_elements / config.latent_dim


class ConvAutoencoder(nn.Module):
    """Convolutional autoencoder: stride-2 conv stages, then a linear layer to the latent.

    The decoder mirrors the encoder with transposed convolutions and ends in a sigmoid, so
    reconstructions lie in [0, 1] like the inputs.
    """

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        sizes = config.spatial_sizes()
        enc: list[nn.Module] = []
        prev = config.in_channels
        for out in config.channels:
            enc.append(nn.Conv2d(prev, out, kernel_size=3, stride=2, padding=1))
            if config.batch_norm:
                enc.append(nn.BatchNorm2d(out))
            enc.append(nn.ReLU())
            prev = out
        last_h, last_w = sizes[-1]
        flat = prev * last_h * last_w
        enc += [nn.Flatten(), nn.Linear(flat, config.latent_dim)]
        self.encoder = nn.Sequential(*enc)

        dec: list[nn.Module] = [
            nn.Linear(config.latent_dim, flat),
            nn.ReLU(),
            nn.Unflatten(1, (prev, last_h, last_w)),
        ]
        outs = [*reversed(config.channels[:-1]), config.in_channels]
        for stage, out in enumerate(outs):
            target_h, target_w = sizes[len(sizes) - 2 - stage]
            dec.append(
                nn.ConvTranspose2d(
                    prev,
                    out,
                    kernel_size=3,
                    stride=2,
                    padding=1,
                    # (in - 1) * 2 - 2 + 3 + pad = target, with in = ceil(target / 2)
                    output_padding=(1 - target_h % 2, 1 - target_w % 2),
                )
            )
            if stage < len(outs) - 1:
                if config.batch_norm:
                    dec.append(nn.BatchNorm2d(out))
                dec.append(nn.ReLU())
            prev = out
        dec.append(nn.Sigmoid())
        self.decoder = nn.Sequential(*dec)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(N, C, H, W)`` -> latents ``(N, latent_dim)``."""
        out: torch.Tensor = self.encoder(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(N, C, H, W)`` -> reconstructions of the same shape, in [0, 1]."""
        out: torch.Tensor = self.decoder(self.encoder(x))
        return out


@dataclass(frozen=True)
class ClassifierConfig:
    """Size and training schedule of the MLP classifier (on latents or raw pixels)."""

    hidden_units: tuple[int, ...] = (256,)
    """Width of each hidden layer (ReLU); empty means a linear (softmax regression) model."""
    epochs: int = 60
    """Passes over the training data."""
    batch_size: int = 64
    """Samples per optimiser step."""
    learning_rate: float = 3e-3
    """Adam step size."""
    weight_decay: float = 1e-4
    """L2 penalty (AdamW decoupled weight decay), dimensionless."""
    dropout: float = 0.1
    """Dropout probability after each hidden layer during training, in [0, 1)."""

    def __post_init__(self) -> None:
        if any(h < 1 for h in self.hidden_units):
            raise ConfigError(
                f"classifier.hidden_units must be positive, got {list(self.hidden_units)}"
            )
        if self.epochs < 1:
            raise ConfigError(f"classifier.epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"classifier.batch_size must be >= 1, got {self.batch_size}")
        if not self.learning_rate > 0:
            raise ConfigError(f"classifier.learning_rate must be > 0, got {self.learning_rate}")
        if self.weight_decay < 0:
            raise ConfigError(f"classifier.weight_decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"classifier.dropout must be in [0, 1), got {self.dropout}")


class MLPClassifier(nn.Module):
    """Multi-layer perceptron: ``Linear -> ReLU (-> Dropout)`` per hidden layer, then logits.

    Used both on latents (server) and on flattened raw pixels (the centralised baseline).
    Dropout is the identity in eval mode and is dropped by ONNX export.
    """

    def __init__(
        self, in_features: int, num_classes: int, hidden_units: tuple[int, ...], dropout: float
    ) -> None:
        super().__init__()
        if in_features < 1 or num_classes < 1:
            raise ConfigError(
                f"classifier needs in_features >= 1 and num_classes >= 1, "
                f"got {in_features} and {num_classes}"
            )
        self.in_features = in_features
        self.num_classes = num_classes
        layers: list[nn.Module] = []
        prev = in_features
        for width in hidden_units:
            layers += [nn.Linear(prev, width), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            prev = width
        layers.append(nn.Linear(prev, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``(N, in_features)`` (or images, flattened here) -> logits ``(N, classes)``."""
        out: torch.Tensor = self.layers(x.flatten(1))
        return out
