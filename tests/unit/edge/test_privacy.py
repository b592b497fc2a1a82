"""The latent-noise defence: calibration, statistics, identity at zero, refused parameters."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest

from common.errors import ConfigError, DataError
from edge.cli import EdgeConfig, configure_parser, load_config
from edge.privacy import LatentNoise, LatentNoiseConfig, check_noise_std


def _latents(n: int = 20000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scales = np.array([0.1, 1.0, 5.0, 0.0], dtype=np.float32)  # the last dimension is constant
    return (rng.standard_normal((n, 4)).astype(np.float32) * scales + 3.0).astype(np.float32)


def test_zero_noise_is_the_identity() -> None:
    z = _latents(100)
    noise = LatentNoise(LatentNoiseConfig(0.0), z)
    out = noise(z)
    np.testing.assert_array_equal(out, z)
    np.testing.assert_array_equal(noise.sigma, np.zeros(4, dtype=np.float32))


@pytest.mark.parametrize("level", [0.1, 0.5, 2.0])
def test_noise_is_zero_mean_gaussian_scaled_by_each_dimension_std(level: float) -> None:
    z = _latents()
    noise = LatentNoise(LatentNoiseConfig(level, seed=1), z)
    np.testing.assert_allclose(noise.sigma, level * z.std(axis=0), rtol=1e-5, atol=1e-7)
    delta = noise(z).astype(np.float64) - z
    n = len(z)
    for j, sigma in enumerate(noise.sigma.astype(np.float64)):
        if sigma == 0:
            assert np.all(delta[:, j] == 0)  # a constant dimension stays exact
            continue
        assert abs(delta[:, j].mean()) < 5 * sigma / math.sqrt(n)
        assert delta[:, j].std() == pytest.approx(sigma, rel=0.03)
        standard = delta[:, j] / sigma
        assert abs(float(np.mean(standard**3))) < 0.1  # symmetric
        assert float(np.mean(standard**4)) == pytest.approx(3.0, abs=0.2)  # Gaussian kurtosis
    # independent across dimensions
    corr = np.corrcoef(delta[:, :3].T)
    assert np.all(np.abs(corr[np.triu_indices(3, 1)]) < 0.05)


def test_fresh_noise_on_every_call_and_calibration_is_fixed() -> None:
    z = _latents(1000)
    noise = LatentNoise(LatentNoiseConfig(1.0, seed=3), z)
    first, second = noise(z[:10]), noise(z[:10])
    assert not np.array_equal(first, second)
    sigma = noise.sigma.copy()
    noise(z[:5] * 100)  # later batches (test latents) reuse the training calibration
    np.testing.assert_array_equal(noise.sigma, sigma)


def test_seed_reproduces_and_default_is_unpredictable() -> None:
    z = _latents(50)
    a = LatentNoise(LatentNoiseConfig(0.5, seed=7), z)(z)
    b = LatentNoise(LatentNoiseConfig(0.5, seed=7), z)(z)
    np.testing.assert_array_equal(a, b)
    c = LatentNoise(LatentNoiseConfig(0.5), z)(z)
    d = LatentNoise(LatentNoiseConfig(0.5), z)(z)
    assert not np.array_equal(c, d)
    assert c.dtype == np.float32 and c.shape == z.shape


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf, -math.inf])
def test_bad_noise_std_names_the_flag(bad: float) -> None:
    with pytest.raises(ConfigError, match="--latent-noise"):
        LatentNoiseConfig(bad)
    with pytest.raises(ConfigError, match=r"--latent-noise \(edge.latent_noise\)"):
        EdgeConfig(latent_noise=bad)
    with pytest.raises(ConfigError, match="--latent-noise"):
        check_noise_std(bad)


def test_flag_reaches_the_config_and_bad_values_are_refused_at_load() -> None:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    base = ["--server", "127.0.0.1:1", "--node-id", "n0"]
    config, _ = load_config(parser.parse_args([*base, "--latent-noise", "0.5"]))
    assert config.latent_noise == 0.5
    assert load_config(parser.parse_args(base))[0].latent_noise == 0.0
    with pytest.raises(ConfigError, match="--latent-noise"):
        load_config(parser.parse_args([*base, "--latent-noise", "nan"]))


def test_shape_and_value_errors() -> None:
    z = _latents(10)
    noise = LatentNoise(LatentNoiseConfig(1.0, seed=0), z)
    with pytest.raises(DataError, match="calibrated for 4"):
        noise(np.zeros((3, 5), dtype=np.float32))
    with pytest.raises(DataError, match="non-finite"):
        noise(np.full((2, 4), np.nan, dtype=np.float32))
    with pytest.raises(DataError, match="0 latents"):
        LatentNoise(LatentNoiseConfig(1.0), np.zeros((0, 4), dtype=np.float32))
    with pytest.raises(DataError, match="float"):
        LatentNoise(LatentNoiseConfig(1.0), np.zeros((4, 4), dtype=np.int64))
