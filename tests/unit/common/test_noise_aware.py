"""Noise-aware training injects the simulator's weight noise: torch draws vs numpy draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from common.errors import ConfigError
from common.noise_aware import _readout as _torch_readout
from common.noise_aware import inject_weight_noise, perturb, training_spec, weight_noise
from device_sim.noise import _readout as _numpy_readout
from device_sim.noise import parse_noise_spec

DRAWS = 300


def _weights() -> np.ndarray:
    rng = np.random.default_rng(3)
    # rows of different scales, so per-channel statistics differ from per-tensor ones
    return (rng.normal(size=(48, 40)) * np.linspace(0.2, 2.0, 48)[:, None]).astype(np.float32)


def _numpy_draws(spec: str, w: np.ndarray) -> np.ndarray:
    parsed = parse_noise_spec(spec)
    rng = np.random.default_rng(0)
    return np.stack([parsed.perturb(w, rng, 0) for _ in range(DRAWS)])


def _torch_draws(spec: str, w: np.ndarray) -> np.ndarray:
    parsed = training_spec(spec)
    gen = torch.Generator().manual_seed(0)
    t = torch.from_numpy(w)
    return np.stack([perturb(t, parsed, gen).numpy() for _ in range(DRAWS)])


@pytest.mark.parametrize(
    "spec",
    [
        "awgn:snr_db=10",
        "awgn:snr_db=0",
        "gaussian:std=0.05",
        "gaussian:std=0.05,per=channel",
        "multiplicative:std=0.1",
        "stuck:p=0.1",
        "stuck:p=0.05,at=max",
        "pcm:t=0",
        "pcm:t=0,compensate=false",
        "pcm:t=1",
        "pcm:t=3600,compensate=false",
        "pcm:t=86400",
        "gaussian:std=0.03+quant:bits=8",
    ],
)
def test_torch_and_numpy_draws_have_the_same_statistics(spec: str) -> None:
    w = _weights()
    ours, ref = _torch_draws(spec, w) - w, _numpy_draws(spec, w) - w
    # per output channel (row): spread and mean of the perturbation over draws and columns
    std_ours, std_ref = np.std(ours, axis=(0, 2)), np.std(ref, axis=(0, 2))
    # (stuck-at perturbations are rare and large: their spread converges more slowly)
    rtol = 0.15 if spec.startswith("stuck") else 0.06
    np.testing.assert_allclose(std_ours, std_ref, rtol=rtol, atol=1e-6)
    # means agree within 5 standard errors of the difference of two independent estimates
    stderr = np.sqrt(2.0) * std_ref / np.sqrt(ours.shape[0] * ours.shape[2])
    diff = np.abs(np.mean(ours, axis=(0, 2)) - np.mean(ref, axis=(0, 2)))
    assert np.all(diff <= 5 * stderr + 1e-6), (diff / (stderr + 1e-12)).max()
    # and the fraction of weights left exactly unchanged (stuck-at, clipping) agrees
    assert np.mean(ours == 0) == pytest.approx(np.mean(ref == 0), abs=0.01)


def test_pcm_readout_is_the_numpy_readout_and_stable_for_zero_sum_rows() -> None:
    # the identity readout Σ|w| (aihwkit's GlobalDriftCompensation), the same function as numpy's
    rng = np.random.default_rng(12)
    w = rng.normal(0.0, 0.3, (32, 3, 3))
    w = (w - w.mean(axis=(1, 2), keepdims=True)).astype(np.float32)  # filters summing to 0
    assert float(_torch_readout(torch.from_numpy(w))) == pytest.approx(_numpy_readout(w), rel=1e-5)
    factors = []
    for seed in range(40):
        t = torch.from_numpy(w)
        raw = perturb(t, training_spec("pcm:t=86400,compensate=false"), _gen(seed)).numpy()
        fixed = perturb(t, training_spec("pcm:t=86400"), _gen(seed)).numpy()
        nonzero = np.abs(raw) > 1e-3
        factors.append(float(np.median(fixed[nonzero] / raw[nonzero])))
    assert np.std(factors) / np.mean(factors) < 0.03, factors


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("spec", ["quant:bits=4", "quant:bits=6,per=channel"])
def test_quantisation_is_the_same_function(spec: str) -> None:
    w = _weights()
    ours = perturb(torch.from_numpy(w), training_spec(spec), torch.Generator()).numpy()
    ref = parse_noise_spec(spec).perturb(w, np.random.default_rng(0), 0)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
    bits = int(spec.split("=")[1].split(",", maxsplit=1)[0])
    assert max(len(np.unique(row)) for row in ours) <= 2**bits - 1


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def test_noise_in_training_mode_only_and_gradients_pass_straight_through() -> None:
    net = _net()
    x = torch.rand(5, 1, 8, 8)
    clean = net(x).detach()
    handle = inject_weight_noise(net, "gaussian:std=0.1", seed=1)
    net.eval()
    torch.testing.assert_close(net(x), clean)  # eval: the clean weights
    net.train()
    first, second = net(x), net(x)
    assert not torch.allclose(first, clean) and not torch.allclose(first, second)  # fresh draws
    second.sum().backward()
    linear = net[3]
    weight = linear.parametrizations.weight.original
    assert weight.grad is not None and torch.isfinite(weight.grad).all()
    handle.remove()
    assert dict(net.named_parameters()).keys() == {"0.weight", "0.bias", "3.weight", "3.bias"}
    net.eval()
    torch.testing.assert_close(net(x), clean)  # removal keeps the clean weights


@pytest.mark.parametrize("spec", ["pcm:t=86400", "pcm:t=0,compensate=false"])
def test_pcm_keeps_an_all_zero_tensor_zero_with_finite_gradients(spec: str) -> None:
    parsed = training_spec(spec)
    gen = torch.Generator().manual_seed(0)
    zero = torch.zeros(6, 5, requires_grad=True)
    out = perturb(zero, parsed, gen)
    assert torch.equal(out, torch.zeros(6, 5))
    out.sum().backward()
    assert zero.grad is not None and torch.isfinite(zero.grad).all()
    w = torch.from_numpy(_weights()).requires_grad_(True)
    noisy = perturb(w, parsed, gen)
    assert not torch.equal(noisy, w)  # a nonzero tensor does get the device's noise
    noisy.pow(2).sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


def test_draws_are_reproducible_from_the_seed() -> None:
    x = torch.rand(2, 1, 8, 8)
    outs = []
    for _ in range(2):
        net = _net().train()
        with weight_noise(net, "pcm:t=3600", seed=7):
            outs.append(net(x).detach())
    torch.testing.assert_close(outs[0], outs[1])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("awgn:snr=10", "awgn"),
        ("adc:bits=8", "act on activations"),
        ("gaussian:std=0.03+dac:bits=6", "act on activations"),
    ],
)
def test_bad_training_specs_are_refused(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        inject_weight_noise(_net(), spec)
