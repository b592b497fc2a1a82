"""The ADC output noise: a bank of Gaussian values on 2^16 levels, read in per-sample windows."""

from __future__ import annotations

import statistics

import numpy as np
import pytest

from device_sim.runner import (
    ADC_NOISE_BANK,
    adc_noise_bank,
    adc_noise_bank_size,
    adc_noise_offset,
    adc_noise_window,
)

F32 = np.dtype(np.float32)


def test_bank_values_are_gaussian_with_the_given_std() -> None:
    values = adc_noise_bank(0, 0.5, F32, size=1_001_000).astype(np.float64) / 0.5
    assert values.dtype == np.float64 and len(values) == 1_001_000
    assert abs(values.mean()) < 0.003
    assert values.std() == pytest.approx(1.0, abs=0.003)
    assert np.mean(np.abs(values) < 1) == pytest.approx(0.6827, abs=0.002)
    assert np.mean(np.abs(values) > 2) == pytest.approx(0.0455, abs=0.001)
    assert np.mean(np.abs(values) > 3) == pytest.approx(0.0027, abs=0.0003)
    assert np.abs(values).max() < 4.33  # the outermost of the 2^16 levels: 4.3249
    assert len(np.unique(values)) > 60_000


def test_bank_depends_on_the_seed_and_scale_only() -> None:
    a = adc_noise_bank(3, 0.25, F32, size=4099)
    np.testing.assert_array_equal(a, adc_noise_bank(3, 0.25, F32, size=4099))
    np.testing.assert_array_equal(a * 2, adc_noise_bank(3, 0.5, F32, size=4099))
    assert not np.array_equal(a, adc_noise_bank(4, 0.25, F32, size=4099))
    assert adc_noise_bank(3, 0.25, np.dtype(np.float64), size=10).dtype == np.float64


def test_neighbouring_values_are_uncorrelated() -> None:
    values = adc_noise_bank(1, 1.0, F32, size=1_000_000).astype(np.float64)
    for lag in (1, 2, 3, 4, 5):
        assert abs(np.corrcoef(values[:-lag], values[lag:])[0, 1]) < 0.005


def test_windows_are_consecutive_stretches_from_the_offset_modulo_the_bank() -> None:
    bank = np.arange(100, dtype=np.float32)
    window = adc_noise_window(bank, 90, 1, 3, (2, 2))
    # sample 1 starts at 90 + 1·4 = 94; the third sample wraps around the end of the bank
    expected = np.array([94, 95, 96, 97, 98, 99, 0, 1, 2, 3, 4, 5], np.float32).reshape(3, 2, 2)
    np.testing.assert_array_equal(window, expected)
    inside = adc_noise_window(bank, 10, 2, 2, (3,))
    np.testing.assert_array_equal(inside, [[16, 17, 18], [19, 20, 21]])
    assert np.shares_memory(inside, bank)  # fed to onnxruntime without a copy


@pytest.mark.parametrize("size", [7, 8, 13])
def test_a_sample_gets_the_same_noise_whatever_the_batching(size: int) -> None:
    bank = adc_noise_bank(2, 0.5, F32, size=97)  # small: the windows wrap
    whole = adc_noise_window(bank, 41, 0, 10, (size,))
    parts, first = [], 0
    for n in (3, 1, 6):
        parts.append(adc_noise_window(bank, 41, first, n, (size,)))
        first += n
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_offsets_are_uniform_and_differ_between_draws_and_streams() -> None:
    offsets = [adc_noise_offset(0, draw, (0,), ADC_NOISE_BANK) for draw in range(2000)]
    assert min(offsets) >= 0 and max(offsets) < ADC_NOISE_BANK
    assert np.mean(offsets) / ADC_NOISE_BANK == pytest.approx(0.5, abs=0.02)
    assert len(set(offsets)) == 2000
    n = ADC_NOISE_BANK
    assert adc_noise_offset(0, 5, (1,), n) != adc_noise_offset(0, 5, (2,), n)
    assert adc_noise_offset(0, 5, (1,), n) != adc_noise_offset(0, 5, (1, 1), n)
    assert adc_noise_offset(0, 5, (1,), n) == adc_noise_offset(0, 5, (1,), n)
    assert adc_noise_offset(0, 5, (1,), 7) < 7


def test_the_bank_stream_is_none_of_the_weight_or_offset_streams() -> None:
    # numpy pads a seed list with zeros: [S, 1] would be draw 1's stream of analog tensor 0
    raw = np.random.default_rng([4, 0, 2]).bit_generator.random_raw(8)
    for draw in range(4):
        for key in ([4, draw, 0, 0], [4, draw, 0], [4, draw, 1, 0], [4, draw, 1], [4, draw]):
            assert not np.array_equal(raw, np.random.default_rng(key).bit_generator.random_raw(8))
    # the bank is made of exactly these words: 16 bits each, a level of the quantile table
    bank = adc_noise_bank(4, 1.0, F32, size=32)
    levels = np.array([statistics.NormalDist().inv_cdf((u + 0.5) / 65536) for u in range(65536)])
    np.testing.assert_allclose(bank, levels[raw.view(np.uint16)[:32]], rtol=1e-6)


def test_bank_is_read_only_and_grows_for_layers_larger_than_it() -> None:
    bank = adc_noise_bank(0, 1.0, F32, size=64)
    with pytest.raises(ValueError, match="read-only"):
        bank[0] = 1.0
    assert adc_noise_bank_size(10) == ADC_NOISE_BANK
    assert adc_noise_bank_size(ADC_NOISE_BANK) == ADC_NOISE_BANK
    assert adc_noise_bank_size(ADC_NOISE_BANK + 1) == 2 * ADC_NOISE_BANK
    np.testing.assert_array_equal(adc_noise_bank(0, 1.0, F32, size=128)[:64], bank)


def test_windows_longer_than_the_bank_go_round_it_again() -> None:
    bank = np.arange(10, dtype=np.float32)
    window = adc_noise_window(bank, 7, 0, 4, (6,))  # 24 values from 7: three laps in all
    np.testing.assert_array_equal(window.ravel(), (7 + np.arange(24)) % 10)
