from __future__ import annotations

import pytest
import torch
from torch import nn

from common.errors import ConfigError
from common.models import (
    AutoencoderConfig,
    ClassifierConfig,
    ConvAutoencoder,
    MLPClassifier,
    compression_ratio,
)


@pytest.mark.parametrize(
    ("shape", "latent_dim", "ratio"),
    [((1, 8, 8), 16, 4.0), ((1, 28, 28), 49, 16.0), ((3, 32, 32), 96, 32.0)],
)
def test_autoencoder_shapes(shape: tuple[int, int, int], latent_dim: int, ratio: float) -> None:
    config = AutoencoderConfig(*shape, latent_dim=latent_dim)
    model = ConvAutoencoder(config)
    x = torch.rand(5, *shape)
    with torch.no_grad():
        assert model.encode(x).shape == (5, latent_dim)
        out = model(x)
    assert out.shape == x.shape
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert compression_ratio(config) == ratio


def test_odd_sizes_reconstruct_to_input_size() -> None:
    model = ConvAutoencoder(AutoencoderConfig(1, 7, 9, 4, channels=(4, 4, 4)))
    assert model(torch.rand(2, 1, 7, 9)).shape == (2, 1, 7, 9)


def test_encoder_is_plain_conv_relu_linear_by_default() -> None:
    plain = ConvAutoencoder(AutoencoderConfig(1, 28, 28, 12))
    kinds = {type(m) for m in plain.encoder}
    assert kinds == {nn.Conv2d, nn.ReLU, nn.Flatten, nn.Linear}
    with_bn = ConvAutoencoder(AutoencoderConfig(1, 28, 28, 12, batch_norm=True))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in with_bn.encoder) == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"latent_dim": 0}, r"autoencoder.latent_dim must be >= 1, got 0"),
        ({"channels": ()}, r"autoencoder.channels must be a non-empty list"),
        ({"channels": (8, 0)}, r"autoencoder.channels must be .* positive integers, got \[8, 0\]"),
    ],
)
def test_autoencoder_config_errors(kwargs: dict[str, object], message: str) -> None:
    base: dict[str, object] = {"in_channels": 1, "height": 8, "width": 8, "latent_dim": 4}
    with pytest.raises(ConfigError, match=message):
        AutoencoderConfig(**{**base, **kwargs})  # type: ignore[arg-type]


def test_mlp_shapes_and_eval_dropout_is_identity() -> None:
    net = MLPClassifier(16, 10, (32, 8), dropout=0.5).eval()
    x = torch.rand(4, 16)
    with torch.no_grad():
        assert net(x).shape == (4, 10)
    assert torch.equal(net(x), net(x))
    assert MLPClassifier(64, 3, (), dropout=0.0)(torch.rand(2, 1, 8, 8)).shape == (2, 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epochs": 0}, r"classifier.epochs must be >= 1, got 0"),
        ({"dropout": 1.0}, r"classifier.dropout must be in \[0, 1\)"),
        ({"hidden_units": (0,)}, r"classifier.hidden_units must be positive"),
        ({"learning_rate": 0.0}, r"classifier.learning_rate must be > 0"),
    ],
)
def test_classifier_config_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ClassifierConfig(**kwargs)  # type: ignore[arg-type]
