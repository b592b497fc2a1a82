"""Hardware-aware training: the analog simulator's weight noise, injected while torch trains.

:func:`inject_weight_noise` makes every Conv/Linear weight of a module noisy on every forward
pass *in training mode*, drawn from a ``device_sim`` noise spec string (``awgn:snr_db=10``,
``pcm:t=86400``, ``gaussian:std=0.03,per=channel+quant:bits=8``, ...). The spec is parsed by
``device_sim.noise.parse_noise_spec`` — one language and one set of parameters for training and
for simulation — and each weight model below is the torch transcription of the numpy model of
the same name in ``device_sim/noise.py`` (same formulas, same per-tensor / per-channel
semantics, output channels on axis 0 as torch stores Conv and Linear weights).
``tests/unit/common/test_noise_aware.py`` checks the torch draws against the numpy draws on the
same weights.

Gradients pass straight through the perturbation (``W + (noisy(W) − W).detach()``), the usual
way noise-aware training is done (Joshi et al. 2020; aihwkit's hardware-aware training), so the
optimiser updates the clean weights that will be programmed. In eval mode the weights are
clean, so evaluation and ONNX export see the trained weights. The input/output models (``dac``,
``adc``) act on activations, not weights, and are refused here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils import parametrize

from common.errors import ConfigError, NoiseInjectionError
from device_sim.noise import (
    AwgnNoise,
    GaussianNoise,
    MultiplicativeNoise,
    NoiseModel,
    NoiseSpec,
    PcmNoise,
    QuantNoise,
    StuckNoise,
    parse_noise_spec,
)

CHANNEL_AXIS = 0
"""Output-channel axis of torch Conv/Linear weights (a crossbar row each)."""


def _reduce_dims(ndim: int, per_channel: bool) -> tuple[int, ...]:
    return tuple(d for d in range(ndim) if d != CHANNEL_AXIS) if per_channel else tuple(range(ndim))


def _abs_max(w: torch.Tensor, per: str) -> torch.Tensor:
    if per == "channel" and w.ndim > 0:
        return w.abs().amax(dim=_reduce_dims(w.ndim, True), keepdim=True)
    return w.abs().max()


def _randn(w: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(w.shape, generator=gen, device=w.device, dtype=w.dtype)


def _awgn(m: AwgnNoise, w: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    sigma = w.std(unbiased=False) / math.sqrt(10.0 ** (m.snr_db / 10.0))
    return w + sigma * _randn(w, gen)


def _gaussian(m: GaussianNoise, w: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return w + m.std * _abs_max(w, m.per) * _randn(w, gen)


def _multiplicative(m: MultiplicativeNoise, w: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return w * (1.0 + m.std * _randn(w, gen))


def _quant(m: QuantNoise, w: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    step = _abs_max(w, m.per) / (2 ** (m.bits - 1) - 1)
    safe = torch.where(step > 0, step, torch.ones_like(step))
    return torch.round(w / safe) * safe


def _stuck(m: StuckNoise, w: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    stuck = torch.rand(w.shape, generator=gen, device=w.device) < m.p
    if m.at == "zero":
        value = torch.zeros_like(w)
    else:
        sign = torch.where(torch.rand(w.shape, generator=gen, device=w.device) < 0.5, -1.0, 1.0)
        value = sign.to(w.dtype) * w.abs().max()
    return torch.where(stuck, value, w)


def _pcm_device(
    m: PcmNoise, g_target: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    c0, c1, c2 = m.prog_coeff
    g_rel = g_target / m.g_max
    sigma_prog = (c0 + c1 * g_rel + c2 * g_rel**2) * (m.g_max / 25.0)
    g_prog = torch.clamp(g_target + sigma_prog * _randn(g_target, gen), min=0.0)
    # t = 0 (t_total = t_0): drift factor 1, read noise accumulated over t_0 (as aihwkit)
    rel = torch.clamp(g_target.abs() / m.g_max, min=1e-7)
    mu = torch.clamp(-0.0155 * torch.log(rel) + 0.0244, 0.049, 0.1)
    sd = torch.clamp(-0.0125 * torch.log(rel) - 0.0059, 0.008, 0.045)
    nu = (mu + sd * _randn(g_target, gen)).abs()
    t_total = m.t + m.t0
    g_drift = g_prog * (t_total / m.t0) ** (-nu)
    q = torch.clamp(0.0088 / torch.clamp((g_prog.abs() / m.g_max) ** 0.65, min=1e-3), max=0.2)
    read = q * math.sqrt(math.log((t_total + m.t_read) / (2.0 * m.t_read)))
    return g_prog, torch.clamp(g_drift + g_drift.abs() * read * _randn(g_target, gen), min=0.0)


def _readout(w: torch.Tensor) -> torch.Tensor:
    """Identity readout, as ``device_sim.noise._readout``: Σ|w| over the tensor."""
    return torch.clamp(w.abs().sum(), min=1e-4 * w.numel())


def _pcm(m: PcmNoise, w: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    # an all-zero tensor stays zero; decided on the device (no host sync per layer and step),
    # with a finite scale in the branch not taken so that its gradient stays finite too
    w_max = w.abs().max()
    scale = m.g_max / torch.where(w_max > 0, w_max, torch.ones_like(w_max))
    plus_prog, plus_now = _pcm_device(m, torch.clamp(w * scale, 0.0, m.g_max), gen)
    minus_prog, minus_now = _pcm_device(m, torch.clamp(-w * scale, 0.0, m.g_max), gen)
    w_now = (plus_now - minus_now) / scale
    if m.compensate:
        w_now = w_now * (_readout((plus_prog - minus_prog) / scale) / _readout(w_now))
    return torch.where(w_max > 0, w_now, w)


_Apply = Callable[[NoiseModel, torch.Tensor, torch.Generator], torch.Tensor]

_TORCH_MODELS: dict[type[NoiseModel], _Apply] = {
    AwgnNoise: _awgn,  # type: ignore[dict-item]
    GaussianNoise: _gaussian,  # type: ignore[dict-item]
    MultiplicativeNoise: _multiplicative,  # type: ignore[dict-item]
    QuantNoise: _quant,  # type: ignore[dict-item]
    StuckNoise: _stuck,  # type: ignore[dict-item]
    PcmNoise: _pcm,  # type: ignore[dict-item]
}
"""device_sim weight model -> its torch transcription."""


def training_spec(spec: str | NoiseSpec) -> NoiseSpec:
    """Parse ``spec`` and check that training can inject it (weight models only).

    Raises:
        ConfigError: a malformed spec (the simulator's message) or an input/output model.
    """
    try:
        parsed = parse_noise_spec(spec) if isinstance(spec, str) else spec
    except NoiseInjectionError as exc:  # the spec language's own precise message
        raise ConfigError(f"--train-noise: {exc}") from exc
    if parsed.dac is not None or parsed.adc is not None:
        raise ConfigError(
            f"--train-noise {parsed.text!r}: dac/adc act on activations, not weights; "
            "training injects weight models only (awgn, gaussian, multiplicative, quant, "
            "stuck, pcm)"
        )
    for model in parsed.weight_models:
        if type(model) not in _TORCH_MODELS:
            raise ConfigError(f"--train-noise: {model.kind!r} has no torch transcription")
    return parsed


def perturb(weights: torch.Tensor, spec: NoiseSpec, gen: torch.Generator) -> torch.Tensor:
    """One draw of ``spec``'s weight models on ``weights`` (output channels on axis 0)."""
    out = weights
    for model in spec.weight_models:
        out = _TORCH_MODELS[type(model)](model, out, gen)
    return out


class _NoisyWeight(nn.Module):
    """Parametrization: a fresh draw in training mode, the clean weight in eval mode."""

    def __init__(self, spec: NoiseSpec, gen: torch.Generator) -> None:
        super().__init__()
        self.spec = spec
        self.gen = gen

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """Straight-through: noisy values forward, identity gradient back."""
        if not self.training:
            return weight
        with torch.no_grad():
            noisy = perturb(weight.detach(), self.spec, self.gen)
        return weight + (noisy - weight.detach())


class WeightNoise:
    """Handle of the noise injected into a module's layers (see :func:`inject_weight_noise`)."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.layers = layers

    def remove(self) -> None:
        """Take the noise out again, keeping the clean (trained) weights (idempotent)."""
        for layer in self.layers:
            if parametrize.is_parametrized(layer, "weight"):
                parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
        self.layers = []


def inject_weight_noise(
    model: nn.Module,
    spec: str | NoiseSpec,
    *,
    seed: int = 0,
    layer_types: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear),
) -> WeightNoise:
    """Make the weights of ``model``'s Conv/Linear layers noisy in every training forward pass.

    Args:
        model: Any module; its layers of ``layer_types`` get the noise.
        spec: A ``device_sim`` noise spec of weight models (e.g. ``"awgn:snr_db=10"``).
        seed: Seed of the noise draws (one torch generator for the whole model).
        layer_types: Which layers are analog.

    Returns:
        A handle whose ``remove()`` takes the noise out (before export, for instance).

    Raises:
        ConfigError: a bad spec, an input/output model, or no layer to inject into.
    """
    parsed = training_spec(spec)
    layers = [m for m in model.modules() if isinstance(m, layer_types)]
    if not layers:
        raise ConfigError(f"--train-noise: the model has no {[t.__name__ for t in layer_types]}")
    device = next(iter(model.parameters())).device
    gen = torch.Generator(device=device).manual_seed(seed)
    for layer in layers:
        parametrize.register_parametrization(layer, "weight", _NoisyWeight(parsed, gen))
    return WeightNoise(layers)


@contextmanager
def weight_noise(
    model: nn.Module, spec: str | NoiseSpec, *, seed: int = 0
) -> Iterator[WeightNoise]:
    """:func:`inject_weight_noise` for the duration of a ``with`` block."""
    handle = inject_weight_noise(model, spec, seed=seed)
    try:
        yield handle
    finally:
        handle.remove()
