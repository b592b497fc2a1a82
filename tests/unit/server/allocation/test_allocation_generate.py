"""The scenario generator's regimes: both options compete, and coverage and budgets bind.

The ``upload-cheap`` fleets (the generator before issue 10) make the decision trivial: every
device uploads. The realistic regimes must put at least 10 % of the devices on each branch,
and their coverage and budget constraints must change the plan; the checks below fail on the
old fleets.
"""

from __future__ import annotations

import numpy as np
import pytest

from common.delta import DeltaEncoding
from common.finetune import Trainable, prepare
from common.records import EnergyProfile
from common.zoo import ModelSpec, build_model, flops_per_sample
from edge.transfer import EPOCHS, delta_bits_estimate, derive_profile, training_macs_per_sample
from server.allocation import AllocationPlan, AllocationProblem, solve
from server.allocation import generate as gen
from server.allocation.generate import DEFAULT_REGIME, REGIMES, generate

K = 2000
REALISTIC = ("competitive", "scarce-bandwidth", "tight-budget")
SHAPE = (1, 28, 28)


def _solved(regime: str, k: int = K, seed: int = 0) -> tuple[AllocationProblem, AllocationPlan]:
    problem = generate(k, np.random.default_rng(seed), regime)
    return problem, solve(problem)


def _with_budgets(problem: AllocationProblem, scale: float) -> AllocationProblem:
    cols = {name: np.array(problem.column(name)) for name in problem.columns}
    cols["energy_budget_j"] = cols["energy_budget_j"] * scale
    return AllocationProblem.from_columns(problem.ids, cols, problem.cell)


def test_the_default_regime_is_a_competing_one() -> None:
    assert DEFAULT_REGIME in REALISTIC
    assert set(REGIMES) == {*REALISTIC, "upload-cheap"}


def test_the_constants_are_the_zoo_models_counts() -> None:
    net = build_model(ModelSpec("lenet", 1, 28, 28, 10), seed=0)
    assert flops_per_sample(net, SHAPE) == gen.LENET_FORWARD_MACS
    assert gen.FINETUNE_EPOCHS == EPOCHS
    head = Trainable("head")
    prepare(net, head)
    assert delta_bits_estimate(net, head, DeltaEncoding("int8")) == gen.HEAD_INT8_DELTA_BITS
    from common.models import AutoencoderConfig, ConvAutoencoder

    ae = ConvAutoencoder(AutoencoderConfig(1, 28, 28, 32))
    assert flops_per_sample(ae.encoder, SHAPE) == gen.AE_ENCODER_MACS
    assert (
        pytest.approx(gen.upload_bits_per_sample())
        == 32 * gen.LATENT_BITS_PER_VALUE + gen.LABEL_BITS
    )


def test_fine_tuning_costs_are_what_the_node_derives() -> None:
    """The generator's E^ft, T^ft minus the delta's air time equal ``derive_profile``'s."""
    problem = generate(5, np.random.default_rng(1), "competitive")
    net = build_model(ModelSpec("lenet", 1, 28, 28, 10), seed=0)
    macs = training_macs_per_sample(net, Trainable("head"), SHAPE, EPOCHS)
    col = problem.column
    b = problem.cell.bandwidth_hz / problem.size
    snr = col("tx_power_w") * col("channel_gain") / (problem.cell.noise_psd_w_per_hz * b)
    delta_s = gen.HEAD_INT8_DELTA_BITS / (b * np.log2(1 + snr))
    for i in range(problem.size):
        profile = EnergyProfile(
            cpu_hz=float(col("cpu_hz")[i]),
            kappa=float(col("kappa")[i]),
            tx_power_w=1.0,
            channel_gain=1.0,
            energy_budget_j=1.0,
        )
        derived = derive_profile(
            profile,
            cycles_per_mac=gen.CYCLES_PER_MAC,
            samples=int(col("samples")[i]),
            encode_macs_per_sample=gen.AE_ENCODER_MACS,
            latent_bits_per_sample=gen.upload_bits_per_sample(),
            finetune_macs_per_sample=macs,
        )
        assert derived.cycles_per_sample == col("cycles_per_sample")[i]
        assert derived.upload_bits == pytest.approx(col("upload_bits")[i], rel=1e-12)
        assert derived.finetune_latency_s == pytest.approx(
            col("finetune_latency_s")[i] - delta_s[i], rel=1e-12
        )
        assert derived.finetune_energy_j == pytest.approx(
            col("finetune_energy_j")[i] - col("tx_power_w")[i] * delta_s[i], rel=1e-12
        )


def test_upload_cheap_fleets_make_the_decision_trivial() -> None:
    """The old fleets: every device uploads, coverage and budgets have slack."""
    problem, plan = _solved("upload-cheap")
    assert plan.uploaders == K
    uploaded = float(problem.column("samples")[np.array(plan.upload)].sum())
    assert uploaded > 3 * problem.cell.min_samples
    assert not np.any(np.array(plan.energy_j) >= 0.5 * problem.column("energy_budget_j"))


@pytest.mark.parametrize("regime", REALISTIC)
def test_realistic_fleets_split_and_their_constraints_bind(regime: str) -> None:
    problem, plan = _solved(regime)
    up = np.array(plan.upload)
    assert 0.1 <= up.mean() <= 0.9, f"{regime}: {up.mean():.3f} of the devices upload"
    assert plan.gap <= 2e-3
    # coverage binds: met within 2 %, and without it fewer samples go up
    samples = problem.column("samples")
    uploaded = float(samples[up].sum())
    need = problem.cell.min_samples
    assert need <= uploaded <= 1.02 * need
    free = solve(problem.with_cell(min_samples=0))
    assert float(samples[np.array(free.upload)].sum()) < need
    # budgets bind: >= 1 % of the devices spend their whole budget, and larger budgets help
    energy, budget = np.array(plan.energy_j), problem.column("energy_budget_j")
    assert np.all(energy <= budget * (1 + 1e-9))
    assert np.mean(energy >= budget * (1 - 1e-6)) >= 0.01
    assert solve(_with_budgets(problem, 100.0)).objective < plan.objective * (1 - 1e-4)


def test_tight_budgets_hold_many_devices_at_their_budget() -> None:
    problem, plan = _solved("tight-budget")
    at_budget = np.array(plan.energy_j) >= problem.column("energy_budget_j") * (1 - 1e-6)
    assert at_budget.mean() >= 0.1


@pytest.mark.parametrize("regime", REALISTIC)
def test_bandwidth_is_a_fixed_share_per_device(regime: str) -> None:
    small = generate(100, np.random.default_rng(0), regime).cell.bandwidth_hz
    large = generate(1000, np.random.default_rng(0), regime).cell.bandwidth_hz
    assert large == pytest.approx(10 * small)
    assert generate(100, np.random.default_rng(0), "upload-cheap").cell.bandwidth_hz == 100e6


def test_unknown_regime_is_refused() -> None:
    from common.errors import AllocationError

    with pytest.raises(AllocationError, match="--regime must be one of"):
        generate(10, np.random.default_rng(0), "free-lunch")
