"""Single-cell 5G scenarios for the allocation model (``latentedge allocate generate``).

Every number below is a documented choice (docs/allocation.md, "Scenario generator"). All
regimes share the cell and the devices' radios, CPUs and data:

* geometry: devices uniform over the annulus 35–500 m around the base station (uniform in area);
* path loss: 3GPP TR 38.901 UMa NLOS, ``PL = 13.54 + 39.08 log10(d) + 20 log10(f_c)`` dB with
  ``f_c = 3.5`` GHz, plus log-normal shadowing with σ = 6 dB; no antenna gains;
* transmit power uniform in 20–23 dBm; noise PSD −174 dBm/Hz;
* CPUs uniform in 0.5–2 GHz, κ = 1e-28;
* samples per device uniform in 50–500; upload bits follow from the autoencoder: a 28×28×8-bit
  image compressed by ``COMPRESSION_RATIO`` to float16 latents plus an 8-bit label;
* weights: w_E = 1 /J, w_T = 0.1·K J/s (one second of round latency is worth 0.1 J per device).

The regimes (:data:`REGIMES`) differ in what the two options cost and in the constraints:

* ``upload-cheap`` (the generator's fleets before issue 10): 100 MHz at every K, encode 2e6
  cycles/sample, fine-tuning ``FINETUNE_CYCLES_PER_SAMPLE`` cycles/sample and no delta, budgets
  0.8–3 × the fine-tuning energy, coverage 30 %. Uploading costs 45–72× less energy than
  fine-tuning, so (nearly) every device uploads.
* ``competitive`` (default), ``scarce-bandwidth``, ``tight-budget``: the costs a node derives
  for itself (``common.costs``, as ``edge/transfer.py`` does): the encoder's MACs per sample;
  fine-tuning lenet's head for ``FINETUNE_EPOCHS`` epochs (one forward pass, then 3 × head MACs
  per epoch), at ``CYCLES_PER_MAC``; ``E^ft = κ C n f²``, ``T^ft = C n / f``; plus the air
  time of the int8 head delta at an equal share ``B / K`` (as ``server/scheduler.py`` adds it).
  B is a fixed share per device times K, so the per-device physics, and the balance of the
  decision, is the same at every K. Budgets are a uniform multiple of the cheaper option at
  an equal share (encode + latents vs fine-tune + delta), so every device can afford one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.costs import cpu_latency_energy, training_macs
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
"""Cell uplink bandwidth of ``upload-cheap`` (the largest FR1 carrier), Hz."""
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
"""CPU cycles of one encoder forward pass (``upload-cheap``), cycles."""
FINETUNE_CYCLES_PER_SAMPLE = 1.5e8
"""CPU cycles of local fine-tuning per sample (epochs × forward + backward; ``upload-cheap``),
cycles."""
BUDGET_FACTOR = (0.8, 3.0)
"""Energy budget as a multiple of the device's fine-tuning energy (``upload-cheap``)."""
COVERAGE_FRACTION = 0.3
"""min_samples as a fraction of all samples (``upload-cheap``)."""
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


@dataclass(frozen=True)
class Regime:
    """How a generated fleet's two options and constraints are set (docs/allocation.md)."""

    name: str
    bandwidth_hz: float
    """Cell uplink bandwidth B, Hz (``upload-cheap``: fixed at every K)."""
    bandwidth_per_device_hz: float
    """If > 0, B = this × K instead (the same share per device at every K), Hz."""
    coverage_fraction: float
    """min_samples as a fraction of all samples."""
    budget_factor: tuple[float, float]
    """Energy budget as a uniform multiple of the device's reference energy."""
    budget_of_cheaper: bool
    """Reference energy: the cheaper option at an equal share ``B / K`` (True), or the
    fine-tuning energy alone (False, the ``upload-cheap`` fleets)."""
    finetune_cycles_per_sample: float
    """Cycles of the whole fine-tuning run per sample."""
    encode_cycles_per_sample: float
    """Cycles of one encoder pass."""
    delta_bits: float
    """Bits of the delta a fine-tuning device sends (its air time at ``B / K`` is added to
    the fine-tuning cost, as ``server/scheduler.py`` does); 0 = none."""


# lenet on 1x28x28 images, 10 classes (common/zoo.py), fine-tuning its head for the edge's
# default EPOCHS with an int8 delta (edge/transfer.py); the counts are checked against the zoo
# by tests/unit/server/allocation/test_allocation_generate.py.
LENET_FORWARD_MACS = 4_241_152
"""MACs of one lenet forward pass on a 1x28x28 image (``common.zoo.flops_per_sample``)."""
LENET_HEAD_MACS = 128 * 10
"""MACs of lenet's head, Linear(128, 10)."""
FINETUNE_EPOCHS = 100
"""Epochs of local fine-tuning (``edge.transfer.EPOCHS``)."""
HEAD_INT8_DELTA_BITS = 8 * (128 * 10 + 10) + 2 * 32
"""Bits of lenet's head delta in int8: 1,290 values plus a float32 scale per tensor."""
AE_ENCODER_MACS = 304_192
"""MACs of one pass of the (16, 32)-channel convolutional encoder to 32 latents (28x28)."""
CYCLES_PER_MAC = 1.0
"""CPU cycles per multiply-accumulate (``latentedge edge --cycles-per-mac`` default)."""

_HEAD_FT_CYCLES = CYCLES_PER_MAC * training_macs(
    "head", forward=LENET_FORWARD_MACS, head=LENET_HEAD_MACS, frozen=0, epochs=FINETUNE_EPOCHS
)
_COMPETING = {
    "finetune_cycles_per_sample": float(_HEAD_FT_CYCLES),
    "encode_cycles_per_sample": CYCLES_PER_MAC * AE_ENCODER_MACS,
    "delta_bits": float(HEAD_INT8_DELTA_BITS),
}
REGIMES: dict[str, Regime] = {
    "upload-cheap": Regime(
        "upload-cheap",
        bandwidth_hz=BANDWIDTH_HZ,
        bandwidth_per_device_hz=0.0,
        coverage_fraction=COVERAGE_FRACTION,
        budget_factor=BUDGET_FACTOR,
        budget_of_cheaper=False,
        finetune_cycles_per_sample=FINETUNE_CYCLES_PER_SAMPLE,
        encode_cycles_per_sample=ENCODE_CYCLES_PER_SAMPLE,
        delta_bits=0.0,
    ),
    "competitive": Regime(
        "competitive",
        bandwidth_hz=0.0,
        bandwidth_per_device_hz=10e3,
        coverage_fraction=0.75,
        budget_factor=(1.0, 3.0),
        budget_of_cheaper=True,
        **_COMPETING,
    ),
    "scarce-bandwidth": Regime(
        "scarce-bandwidth",
        bandwidth_hz=0.0,
        bandwidth_per_device_hz=2e3,
        coverage_fraction=0.5,
        budget_factor=(1.0, 3.0),
        budget_of_cheaper=True,
        **_COMPETING,
    ),
    "tight-budget": Regime(
        "tight-budget",
        bandwidth_hz=0.0,
        bandwidth_per_device_hz=10e3,
        coverage_fraction=0.7,
        budget_factor=(1.0, 1.3),
        budget_of_cheaper=True,
        **_COMPETING,
    ),
}
"""The generator's regimes by name (``--regime``)."""
DEFAULT_REGIME = "competitive"
"""The regime ``allocate generate`` uses unless told otherwise."""


def equal_share_rate(
    bandwidth_hz: float, power_w: FloatArray, gain: FloatArray, noise_psd: float
) -> FloatArray:
    """Rate ``b log2(1 + p g / (N0 b))`` at bandwidth ``b``, bit/s."""
    rate: FloatArray = bandwidth_hz * np.log2(1.0 + power_w * gain / (noise_psd * bandwidth_hz))
    return rate


def generate(
    devices: int, rng: np.random.Generator, regime: str = DEFAULT_REGIME
) -> AllocationProblem:
    """Draw a single-cell scenario with ``devices`` devices in ``regime``.

    Every regime draws the same random numbers in the same order; ``upload-cheap`` reproduces
    the generator's earlier fleets exactly.

    Args:
        devices: K ≥ 1.
        rng: Source of all randomness.
        regime: a name in :data:`REGIMES`.

    Raises:
        AllocationError: if ``devices`` < 1 or the regime is unknown.
    """
    if devices < 1:
        raise AllocationError(f"--devices must be >= 1, got {devices}")
    if regime not in REGIMES:
        raise AllocationError(f"--regime must be one of {list(REGIMES)}, got {regime!r}")
    spec = REGIMES[regime]
    k = devices
    noise_psd = 10.0 ** (NOISE_DBM_PER_HZ / 10.0) / 1000.0
    r_in, r_out = RADIUS_M
    distance = np.sqrt(rng.uniform(r_in**2, r_out**2, k))
    gain = path_gain(distance, rng)
    power_w = 10.0 ** (rng.uniform(*TX_POWER_DBM, k) / 10.0) / 1000.0
    cpu_hz = rng.uniform(*CPU_HZ, k)
    samples = rng.integers(SAMPLES[0], SAMPLES[1] + 1, k).astype(np.float64)
    kappa = np.full(k, KAPPA)
    bandwidth = spec.bandwidth_per_device_hz * k or spec.bandwidth_hz
    finetune_s, finetune_j = cpu_latency_energy(
        spec.finetune_cycles_per_sample * samples, cpu_hz, kappa
    )
    upload_bits = samples * upload_bits_per_sample()
    factor = rng.uniform(*spec.budget_factor, k)
    rate = equal_share_rate(bandwidth / k, power_w, gain, noise_psd)
    if spec.delta_bits:
        delta_s = spec.delta_bits / rate
        finetune_s = finetune_s + delta_s
        finetune_j = finetune_j + power_w * delta_s
    if spec.budget_of_cheaper:
        _, encode_j = cpu_latency_energy(spec.encode_cycles_per_sample * samples, cpu_hz, kappa)
        upload_j = encode_j + power_w * upload_bits / rate
        reference = np.minimum(finetune_j, upload_j)
    else:
        reference = finetune_j
    columns = {
        "samples": samples,
        "upload_bits": upload_bits,
        "cycles_per_sample": np.full(k, spec.encode_cycles_per_sample),
        "cpu_hz": cpu_hz,
        "kappa": kappa,
        "tx_power_w": power_w,
        "channel_gain": gain,
        "energy_budget_j": reference * factor,
        "finetune_energy_j": finetune_j,
        "finetune_latency_s": finetune_s,
    }
    width = len(str(k - 1))
    ids = [f"dev{i:0{width}d}" for i in range(k)]
    cell = Cell(
        bandwidth_hz=bandwidth,
        noise_psd_w_per_hz=noise_psd,
        min_samples=int(spec.coverage_fraction * samples.sum()),
        weight_energy=1.0,
        weight_latency=LATENCY_WEIGHT_PER_DEVICE * k,
    )
    return AllocationProblem.from_columns(ids, columns, cell)
