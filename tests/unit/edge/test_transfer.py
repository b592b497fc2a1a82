"""The edge's fine-tune branch without a server: its config, cost model and delta size estimate."""

from __future__ import annotations

import numpy as np
import pytest

from common.delta import DeltaEncoding, apply_delta, encode_delta, stats, topk_count
from common.errors import ConfigError
from common.finetune import Trainable, fine_tuned_update, prepare
from common.modelfile import from_torch
from common.records import EnergyProfile
from common.zoo import ModelSpec, build_model, flops_per_sample
from edge.transfer import (
    HEAD_LEARNING_RATE,
    LEARNING_RATE,
    FinetuneConfig,
    delta_bits_estimate,
    derive_profile,
    fine_tune_delta,
    training_macs_per_sample,
)

MLP = ModelSpec("mlp", 1, 8, 8, 10)
RESNET = ModelSpec("resnet8", 1, 8, 8, 10)
MLP_FORWARD = 64 * 256 + 256 * 128 + 128 * 10  # hand-counted MACs


def test_finetune_config_checks_and_defaults() -> None:
    with pytest.raises(ConfigError, match=r"top-k delta encodings apply to dense deltas"):
        FinetuneConfig(Trainable("adapters", 2), DeltaEncoding.parse("topk:0.01"))
    with pytest.raises(ConfigError, match=r"fine-tuning epochs must be >= 1, got 0"):
        FinetuneConfig(Trainable(), DeltaEncoding(), epochs=0)
    with pytest.raises(ConfigError, match=r"fine-tuning learning rate must be >= 0"):
        FinetuneConfig(Trainable(), DeltaEncoding(), learning_rate=-1)
    head = FinetuneConfig(Trainable("head"), DeltaEncoding(), epochs=3).settings()
    assert (head.epochs, head.learning_rate) == (3, HEAD_LEARNING_RATE)
    assert (
        FinetuneConfig(Trainable("all"), DeltaEncoding()).settings().learning_rate == LEARNING_RATE
    )
    given = FinetuneConfig(Trainable("all"), DeltaEncoding(), learning_rate=0.5).settings()
    assert given.learning_rate == 0.5


@pytest.mark.parametrize("epochs", [1, 7])
def test_training_macs_of_a_whole_run_per_sample(epochs: int) -> None:
    net = build_model(MLP)
    shape = (1, 8, 8)
    assert flops_per_sample(net, shape) == MLP_FORWARD
    head = 128 * 10
    behind_features = 256 * 128 + head  # last block + head
    # head: the frozen layers run once (cached), then forward + backward of the head per epoch
    assert training_macs_per_sample(net, Trainable("head"), shape, epochs) == (
        MLP_FORWARD + 3 * head * epochs
    )
    assert training_macs_per_sample(net, Trainable("last-block"), shape, epochs) == (
        (MLP_FORWARD + 2 * behind_features) * epochs
    )
    for kind in (Trainable("all"), Trainable("adapters", 2)):
        assert training_macs_per_sample(net, kind, shape, epochs) == 3 * MLP_FORWARD * epochs


def test_derive_profile_fills_only_the_fields_left_at_zero() -> None:
    profile = EnergyProfile(
        cpu_hz=1e9, kappa=1e-28, tx_power_w=0.2, channel_gain=1e-6, energy_budget_j=5.0
    )
    derived = derive_profile(
        profile,
        cycles_per_mac=2.0,
        samples=100,
        encode_macs_per_sample=1000,
        latent_bits_per_sample=136.0,
        finetune_macs_per_sample=15000,
        delta_bits=4096.0,
    )
    cycles = 15000 * 100 * 2.0
    assert derived.upload_bits == 100 * 136.0
    assert derived.cycles_per_sample == 1000 * 2.0
    assert derived.finetune_latency_s == pytest.approx(cycles / 1e9)
    assert derived.finetune_energy_j == pytest.approx(1e-28 * cycles * 1e9**2)
    assert derived.delta_bits == 4096.0
    assert (derived.cpu_hz, derived.kappa, derived.energy_budget_j) == (1e9, 1e-28, 5.0)
    explicit = EnergyProfile(
        cpu_hz=1e9,
        kappa=1e-28,
        tx_power_w=0.2,
        channel_gain=1e-6,
        energy_budget_j=5.0,
        upload_bits=7.0,
        cycles_per_sample=8.0,
        finetune_energy_j=9.0,
        finetune_latency_s=10.0,
        delta_bits=11.0,
    )
    kept = derive_profile(
        explicit,
        cycles_per_mac=2.0,
        samples=100,
        encode_macs_per_sample=1000,
        latent_bits_per_sample=136.0,
        finetune_macs_per_sample=15000,
        delta_bits=4096.0,
    )
    assert kept == explicit


@pytest.mark.parametrize("encoding", ["fp32", "fp16"])
@pytest.mark.parametrize(
    ("spec", "trainable"),
    [
        pytest.param(spec, kind, id=f"{spec.name}-{kind}")
        for spec, kind in [
            (MLP, "head"),
            (MLP, "last-block"),
            (MLP, "all"),
            (MLP, "adapters:2"),
            (RESNET, "head"),
            (RESNET, "adapters:2"),
            (RESNET, "bn"),
            (RESNET, "last-block"),
        ]
    ],
)
def test_delta_bits_estimate_is_the_dense_delta_the_node_sends(
    spec: ModelSpec, trainable: str, encoding: str
) -> None:
    # what edge/cli.py feeds the estimate: the parameters prepare() selects
    t = Trainable.parse(trainable)
    enc = DeltaEncoding.parse(encoding)
    net = build_model(spec, seed=0)
    base = from_torch(spec, net)
    prepare(net, t, seed=0)
    # what run_finetune then sends (BatchNorm statistics of trained layers included)
    dense, low_rank = fine_tuned_update(net, t)
    actual_bits = 8 * stats(encode_delta(base.tensors, dense, enc, low_rank)).payload_bytes
    assert delta_bits_estimate(net, t, enc) == actual_bits


def test_delta_bits_estimate_for_topk_bounds_what_is_sent() -> None:
    net = build_model(MLP, seed=0)
    base = from_torch(MLP, net)
    prepare(net, Trainable("all"))
    dense = {k: v + 1.0 + 0.001 * i for i, (k, v) in enumerate(base.tensors.items())}
    for spec in ("topk:0.01+fp16", "topk:0.1+int8", "topk:0.5+fp32"):
        enc = DeltaEncoding.parse(spec)
        sent = stats(encode_delta(base.tensors, dense, enc))
        assert 8 * sent.payload_bytes <= delta_bits_estimate(net, Trainable("all"), enc)


@pytest.mark.parametrize("trainable", ["head", "all"])
def test_sparse_fine_tuning_sends_what_it_trained(trainable: str) -> None:
    spec = ModelSpec("mlp", 1, 8, 8, 10)
    base = from_torch(spec, build_model(spec, seed=0))
    rng = np.random.default_rng(0)
    x = rng.random((64, 1, 8, 8), dtype=np.float32)
    y = rng.integers(0, 10, 64)
    config = FinetuneConfig(
        trainable=Trainable.parse(trainable),
        encoding=DeltaEncoding.parse("topk:0.05+fp32"),
        epochs=3,
    )
    tuned = fine_tune_delta(base, x, y, config)
    trainable_entries = sum(p.numel() for p in prepare(build_model(spec), config.trainable))
    k = topk_count(0.05, trainable_entries)
    assert tuned.result.trained_params == k  # the sparse run frees exactly the k entries
    new = from_torch(spec, tuned.network).tensors
    moved = sum(int(np.count_nonzero(new[n] != base.tensors[n])) for n in new)
    sent = stats(tuned.entries)
    # the masked run moved at most k entries, and every one of them is sent, exactly (fp32)
    assert 0 < moved <= k
    assert sent.params == moved
    applied = apply_delta(base.tensors, tuned.entries)
    for name in new:
        np.testing.assert_allclose(applied[name], new[name], rtol=0, atol=1e-6)  # f32 a+(b-a)


def test_derive_profile_needs_a_cpu_clock() -> None:
    profile = EnergyProfile(
        cpu_hz=0.0, kappa=1e-28, tx_power_w=0.2, channel_gain=1e-9, energy_budget_j=5.0
    )
    with pytest.raises(ConfigError, match=r"cpu_hz must be > 0"):
        derive_profile(
            profile,
            cycles_per_mac=1.0,
            samples=10,
            encode_macs_per_sample=100,
            latent_bits_per_sample=64.0,
            finetune_macs_per_sample=100,
        )
