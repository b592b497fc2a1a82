"""Realistic single-cell 5G scenarios for the allocation model (``latentedge allocate generate``).

Every number below is a documented choice (docs/allocation.md, "Scenario generator"):

* geometry: devices uniform over the annulus 35–500 m around the base station (uniform in area);
* path loss: 3GPP TR 38.901 UMa NLOS, ``PL = 13.54 + 39.08 log10(d) + 20 log10(f_c)`` dB with
  ``f_c = 3.5`` GHz, plus log-normal shadowing with σ = 6 dB; no antenna gains;
* transmit power uniform in 20–23 dBm; noise PSD −174 dBm/Hz; cell bandwidth 100 MHz (the
  largest FR1 carrier);
* CPUs uniform in 0.5–2 GHz, κ = 1e-28;
* samples per device uniform in 50–500; upload bits follow from the autoencoder: a 28×28×8-bit
  image compressed by ``COMPRESSION_RATIO`` to float16 latents plus an 8-bit label;
* encode cost 2e6 cycles/sample (a small convolutional encoder); local fine-tuning costs
  ``FINETUNE_CYCLES_PER_SAMPLE`` cycles per sample on the same CPU (forward + backward passes,
  a few epochs), which fixes ``E^ft = κ C n f²`` and ``T^ft = C n / f``;
* energy budgets uniform in 0.8–3 × the fine-tuning energy, so some devices must upload;
* coverage: 30 % of all samples; weights: w_E = 1 /J, w_T = 0.1·K J/s (one second of round
  latency is worth 0.1 J per device).
"""

from __future__ import annotations

import numpy as np

from common.errors import AllocationError
from server.allocation.problem import AllocationProblem, Cell
from server.allocation.radio import FloatArray

CARRIER_GHZ = 3.5
"""Carrier frequency f_c of the path-loss model, GHz."""
SHADOWING_DB = 6.0
"""Std. dev. of log-normal shadowing, dB."""
RADIUS_M = (35.0, 500.0)
"""Inner and outer radius of the cell, m."""
TX_POWER_DBM = (20.0, 23.0)
"""Range of device transmit power, dBm."""
NOISE_DBM_PER_HZ = -174.0
"""Thermal noise PSD, dBm/Hz."""
BANDWIDTH_HZ = 100e6
"""Cell uplink bandwidth, Hz."""
CPU_HZ = (0.5e9, 2.0e9)
"""Range of device CPU clocks, Hz."""
KAPPA = 1e-28
"""Effective switched capacitance, J·s²/cycle³."""
SAMPLES = (50, 500)
"""Range of samples per device (inclusive)."""
RAW_BITS_PER_SAMPLE = 28 * 28 * 8
"""Bits of one raw sample (a 28×28 8-bit image)."""
COMPRESSION_RATIO = 24.5
"""Autoencoder compression ratio: 784 pixels to 32 latents."""
LATENT_BITS_PER_VALUE = 16
"""Bits per uploaded latent value (float16 on the wire)."""
LABEL_BITS = 8
"""Bits of the label uploaded with each sample."""
ENCODE_CYCLES_PER_SAMPLE = 2e6
"""CPU cycles of one encoder forward pass, cycles."""
FINETUNE_CYCLES_PER_SAMPLE = 1.5e8
"""CPU cycles of local fine-tuning per sample (epochs × forward + backward), cycles."""
BUDGET_FACTOR = (0.8, 3.0)
"""Energy budget as a multiple of the device's fine-tuning energy."""
COVERAGE_FRACTION = 0.3
"""min_samples as a fraction of all samples."""
LATENCY_WEIGHT_PER_DEVICE = 0.1
"""w_T / K, J/s."""


def upload_bits_per_sample() -> float:
    """Bits one sample costs on the uplink: latents at ``LATENT_BITS_PER_VALUE`` plus a label."""
    latents = RAW_BITS_PER_SAMPLE / 8 / COMPRESSION_RATIO
    return latents * LATENT_BITS_PER_VALUE + LABEL_BITS


def path_gain(distance_m: FloatArray, rng: np.random.Generator) -> FloatArray:
    """Linear channel power gain at ``distance_m`` (UMa NLOS path loss + shadowing)."""
    loss_db = 13.54 + 39.08 * np.log10(distance_m) + 20.0 * np.log10(CARRIER_GHZ)
    loss_db = loss_db + rng.normal(0.0, SHADOWING_DB, distance_m.shape)
    gain: FloatArray = 10.0 ** (-loss_db / 10.0)
    return gain


def generate(devices: int, rng: np.random.Generator) -> AllocationProblem:
    """Draw a single-cell scenario with ``devices`` devices.

    Args:
        devices: K ≥ 1.
        rng: Source of all randomness.

    Raises:
        AllocationError: if ``devices`` < 1.
    """
    if devices < 1:
        raise AllocationError(f"--devices must be >= 1, got {devices}")
    k = devices
    r_in, r_out = RADIUS_M
    distance = np.sqrt(rng.uniform(r_in**2, r_out**2, k))
    gain = path_gain(distance, rng)
    power_w = 10.0 ** (rng.uniform(*TX_POWER_DBM, k) / 10.0) / 1000.0
    cpu_hz = rng.uniform(*CPU_HZ, k)
    samples = rng.integers(SAMPLES[0], SAMPLES[1] + 1, k).astype(np.float64)
    ft_cycles = FINETUNE_CYCLES_PER_SAMPLE * samples
    finetune_j = KAPPA * ft_cycles * cpu_hz**2
    columns = {
        "samples": samples,
        "upload_bits": samples * upload_bits_per_sample(),
        "cycles_per_sample": np.full(k, ENCODE_CYCLES_PER_SAMPLE),
        "cpu_hz": cpu_hz,
        "kappa": np.full(k, KAPPA),
        "tx_power_w": power_w,
        "channel_gain": gain,
        "energy_budget_j": finetune_j * rng.uniform(*BUDGET_FACTOR, k),
        "finetune_energy_j": finetune_j,
        "finetune_latency_s": ft_cycles / cpu_hz,
    }
    width = len(str(k - 1))
    ids = [f"dev{i:0{width}d}" for i in range(k)]
    cell = Cell(
        bandwidth_hz=BANDWIDTH_HZ,
        noise_psd_w_per_hz=10.0 ** (NOISE_DBM_PER_HZ / 10.0) / 1000.0,
        min_samples=int(COVERAGE_FRACTION * samples.sum()),
        weight_energy=1.0,
        weight_latency=LATENCY_WEIGHT_PER_DEVICE * k,
    )
    return AllocationProblem.from_columns(ids, columns, cell)
