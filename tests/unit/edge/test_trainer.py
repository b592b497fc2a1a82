from __future__ import annotations

import numpy as np
import pytest
import torch

from common.datasets import load_dataset, shard
from common.errors import ConfigError, DataError
from common.models import AutoencoderConfig, ConvAutoencoder
from edge.trainer import TrainConfig, encode, reconstruct, train_autoencoder

CONFIG = AutoencoderConfig(1, 8, 8, latent_dim=16)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return shard(load_dataset("digits"), 0, 3, skew=0.5).x_train


def test_training_reduces_reconstruction_error(images: np.ndarray) -> None:
    losses: list[tuple[int, float]] = []
    model = train_autoencoder(
        images,
        CONFIG,
        TrainConfig(epochs=8, seed=3),
        on_epoch=lambda e, mse: losses.append((e, mse)),
    )
    with torch.random.fork_rng():
        torch.manual_seed(3)
        untrained = ConvAutoencoder(CONFIG).eval()
    before = float(np.mean((reconstruct(untrained, images) - images) ** 2))
    after = float(np.mean((reconstruct(model, images) - images) ** 2))
    assert after < 0.5 * before
    assert [e for e, _ in losses] == list(range(1, 9))
    assert losses[-1][1] < losses[0][1]
    assert not model.training


def test_training_is_deterministic_in_seed(images: np.ndarray) -> None:
    a = encode(train_autoencoder(images, CONFIG, TrainConfig(epochs=2, seed=1)), images)
    b = encode(train_autoencoder(images, CONFIG, TrainConfig(epochs=2, seed=1)), images)
    c = encode(train_autoencoder(images, CONFIG, TrainConfig(epochs=2, seed=2)), images)
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)


def test_max_steps_caps_training(images: np.ndarray) -> None:
    epochs: list[int] = []
    steps_per_epoch = -(-len(images) // 32)
    train_autoencoder(
        images,
        CONFIG,
        TrainConfig(epochs=50, batch_size=32, max_steps=steps_per_epoch + 2),
        on_epoch=lambda e, _: epochs.append(e),
    )
    assert epochs == [1, 2]


def test_encode_shapes_and_batches(images: np.ndarray) -> None:
    model = ConvAutoencoder(CONFIG).eval()
    full = encode(model, images, batch_size=1000)
    assert full.shape == (len(images), 16) and full.dtype == np.float32
    assert np.allclose(encode(model, images, batch_size=7), full, atol=1e-6)
    assert encode(model, images[:0]).shape == (0, 16)
    assert reconstruct(model, images[:3]).shape == (3, 1, 8, 8)


def test_bad_inputs() -> None:
    with pytest.raises(DataError, match=r"float32 \(N, 1, 8, 8\).*got float64 with shape"):
        wrong_dtype = np.zeros((4, 1, 8, 8))
        train_autoencoder(wrong_dtype, CONFIG, TrainConfig(epochs=1))  # type: ignore[arg-type]
    with pytest.raises(DataError, match=r"0 images"):
        train_autoencoder(np.zeros((0, 1, 8, 8), np.float32), CONFIG, TrainConfig(epochs=1))
    with pytest.raises(DataError, match=r"got float32 with shape \(2, 1, 28, 28\)"):
        encode(ConvAutoencoder(CONFIG), np.zeros((2, 1, 28, 28), np.float32))
    with pytest.raises(ConfigError, match=r"train.epochs must be >= 1, got 0"):
        TrainConfig(epochs=0)


def test_noise_aware_training_trains_a_robuster_encoder_with_clean_weights(
    images: np.ndarray,
) -> None:
    plain = train_autoencoder(images, CONFIG, TrainConfig(epochs=20, seed=2))
    aware = train_autoencoder(
        images, CONFIG, TrainConfig(epochs=20, seed=2, train_noise="awgn:snr_db=5")
    )
    # the noise is gone after training: plain parameter names, deterministic encoding
    assert set(dict(aware.named_parameters())) == set(dict(plain.named_parameters()))
    np.testing.assert_array_equal(encode(aware, images[:8]), encode(aware, images[:8]))
    assert not np.allclose(encode(aware, images), encode(plain, images))

    # under the same weight noise on the encoder, the noise-aware one reconstructs better
    def noisy_mse(model: ConvAutoencoder) -> float:
        from common.noise_aware import weight_noise

        errs = []
        for seed in range(10):
            model.train()  # noise is drawn in training mode; no dropout/BN in this model
            with weight_noise(model.encoder, "awgn:snr_db=5", seed=seed), torch.no_grad():
                out = model(torch.from_numpy(images)).numpy()
            errs.append(float(np.mean((out - images) ** 2)))
        model.eval()
        return float(np.mean(errs))

    assert noisy_mse(aware) < noisy_mse(plain)


def test_bad_train_noise_spec_is_refused() -> None:
    with pytest.raises(ConfigError, match="act on activations"):
        TrainConfig(train_noise="adc:bits=8")
    with pytest.raises(ConfigError, match="train-noise"):
        TrainConfig(train_noise="awgn:snr=5")
