"""The ADC output noise generator: a Gaussian on 2^16 levels, independent of the batching."""

from __future__ import annotations

import numpy as np
import pytest

from device_sim.runner import adc_noise, adc_noise_table


def _noise(seed: int, shape: tuple[int, int], scale: float = 0.5) -> np.ndarray:
    bits = np.random.default_rng([seed, 0, 1, 0]).bit_generator
    table = adc_noise_table(scale, np.dtype(np.float32))
    return adc_noise(bits, table, np.empty(shape, np.float32))


def test_noise_is_gaussian_with_the_given_std() -> None:
    values = _noise(0, (1000, 1001)).astype(np.float64) / 0.5
    assert abs(values.mean()) < 0.003
    assert values.std() == pytest.approx(1.0, abs=0.003)
    assert np.mean(np.abs(values) < 1) == pytest.approx(0.6827, abs=0.002)
    assert np.mean(np.abs(values) > 2) == pytest.approx(0.0455, abs=0.001)
    assert np.mean(np.abs(values) > 3) == pytest.approx(0.0027, abs=0.0003)
    assert np.abs(values).max() < 4.33  # the outermost of the 2^16 levels: 4.3249
    assert len(np.unique(values)) > 60_000


def test_neighbouring_elements_and_samples_are_uncorrelated() -> None:
    values = _noise(1, (2000, 500)).astype(np.float64)
    along = np.corrcoef(values[:, :-1].ravel(), values[:, 1:].ravel())[0, 1]
    across = np.corrcoef(values[:-1].ravel(), values[1:].ravel())[0, 1]
    assert abs(along) < 0.005 and abs(across) < 0.005


@pytest.mark.parametrize("size", [7, 8, 13])
def test_a_sample_gets_the_same_noise_whatever_the_batching(size: int) -> None:
    whole = _noise(2, (10, size))
    bits = np.random.default_rng([2, 0, 1, 0]).bit_generator
    table = adc_noise_table(0.5, np.dtype(np.float32))
    parts = [adc_noise(bits, table, np.empty((n, size), np.float32)).copy() for n in (3, 1, 6)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
