"""Analog SGD and Residual Learning (common.analog_training): the 1-D bias and the optimiser."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from common.analog_devices import parse_device_spec
from common.analog_training import (
    Algorithm,
    InMemoryConfig,
    InMemoryOptimizer,
    optimizer_for,
    train_in_memory,
)
from common.errors import ConfigError

REPLICAS = 400
OPTIMUM, SIGMA = 0.5, 0.1


def _predicted(tau: float = 1.0) -> float:
    """Root of E[g] + E|g|·w/τ = 0 for g ~ N(w − 0.5, 0.1²) (REFERENCES.md's 0.4604)."""

    def excess(w: float) -> float:
        mu = w - OPTIMUM
        mean_abs = SIGMA * math.sqrt(2 / math.pi) * math.exp(-(mu**2) / (2 * SIGMA**2))
        return mu + (mean_abs + mu * math.erf(mu / (SIGMA * math.sqrt(2)))) * w / tau

    lo, hi = 0.0, OPTIMUM
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if excess(mid) < 0 else (lo, mid)
    return (lo + hi) / 2


def _quadratic(algorithm: Algorithm, spec: str, steps: int = 3000, seed: int = 0) -> float:
    """Mean over replicas and the last half of the steps of the model's 1-D weight."""
    weight = nn.Parameter(torch.zeros(REPLICAS, 1, dtype=torch.float64))
    config = InMemoryConfig(algorithm, learning_rate=0.05, gamma=0.4, transfer_rate=0.05)
    opt = InMemoryOptimizer([weight], [], config, parse_device_spec(spec), seed=seed)
    noise = torch.Generator().manual_seed(seed + 100)
    tail = []
    for t in range(steps):
        xi = torch.randn(REPLICAS, 1, generator=noise, dtype=torch.float64)
        weight.grad = weight.detach() - OPTIMUM + SIGMA * xi
        opt.step()
        if t >= steps // 2:
            tail.append(float(weight.detach().mean()))
    return float(np.mean(tail))


def test_predicted_fixed_point_is_the_reference_value() -> None:
    assert _predicted() == pytest.approx(0.4604, abs=5e-5)


@pytest.mark.parametrize("mode", ["expected", "pulsed"])
def test_analog_sgd_settles_at_the_predicted_biased_point(mode: str) -> None:
    w = _quadratic(Algorithm.ANALOG_SGD, f"softbounds:states=1200,mode={mode}")
    assert w == pytest.approx(_predicted(), abs=0.002)
    assert OPTIMUM - w > 0.035  # the implicit penalty: clearly below the optimum


def test_residual_learning_does_not_show_the_bias() -> None:
    w = _quadratic(Algorithm.RESIDUAL, "softbounds:states=1200,mode=expected")
    assert w == pytest.approx(OPTIMUM, abs=0.002)
    assert abs(w - OPTIMUM) < 0.1 * (OPTIMUM - _predicted())


def test_digital_sgd_reaches_the_optimum() -> None:
    assert _quadratic(Algorithm.DIGITAL_SGD, "softbounds", steps=1000) == pytest.approx(
        OPTIMUM, abs=0.003
    )


def test_optimizer_puts_conv_and_linear_weights_on_devices_and_exports_w_plus_gamma_p() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    config = InMemoryConfig(Algorithm.RESIDUAL, learning_rate=0.1, gamma=0.3, transfer_every=2)
    opt = optimizer_for(model, config, parse_device_spec("softbounds"), seed=0)
    assert [t.param for t in opt.tiles] == [model[0].weight, model[2].weight]
    assert {id(p) for p in opt.digital} == {id(model[0].bias), id(model[2].bias)}
    initial = model[2].weight.detach().clone()
    assert float(initial.abs().max()) == pytest.approx(0.5 * opt.tiles[1].scale)  # init_fraction
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for tile in opt.tiles:
        assert tile.slow is not None and tile.fast is not None and tile.fast_zero is not None
        effective = tile.scale * (tile.slow.w + 0.3 * (tile.fast.w - tile.fast_zero))
        torch.testing.assert_close(tile.param.detach(), effective)
    assert not torch.equal(model[2].weight.detach(), initial)


def test_train_in_memory_learns_a_separable_problem() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 1, 4, 4, generator=gen).numpy()
    y = (x.reshape(512, -1).sum(1) > 0).astype(np.int64)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    result = train_in_memory(
        model, x, y, InMemoryConfig(Algorithm.ANALOG_SGD), parse_device_spec("softbounds"), epochs=3
    )
    assert result.steps == 24 and result.loss_curve[-1] < result.loss_curve[0]
    accuracy = (model(torch.from_numpy(x)).argmax(1).numpy() == y).mean()
    assert accuracy > 0.9


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"gamma": 0.0}, "gamma"),
        ({"transfer_every": 0}, "transfer_every"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"init_fraction": 1.5}, "init_fraction"),
    ],
)
def test_bad_settings_raise_config_error(kwargs: dict[str, float], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        InMemoryConfig(**kwargs)  # type: ignore[arg-type]
