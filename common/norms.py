"""L1 and TopK batch normalisation (Hoffer et al. 2018), the variants of the L1-BN robustness study.

Per channel over the ``N = batch · H · W`` values of a batch, with ``μ`` their mean:

* L1: ``scale = 1 / (sqrt(π/2) · mean|x − μ| + ε)``;
* TopK: ``scale = 1 / (C(N) · mean of the k largest |x − μ| + ε)``,
  ``C(N) = 0.5 · (1 + sqrt(π · ln 4)) / sqrt(2 · ln N)``;

then ``out = (x − μ) · scale · γ + β`` (formulas: ``../shared/REFERENCES.md``). Running
estimates of ``μ`` and ``scale`` (momentum 0.1, as ``nn.BatchNorm2d``) serve in eval mode, where
both layers compute exactly what a ``BatchNorm2d`` with ``running_var = 1/scale² − ε`` computes.
That is also how they export: an ONNX ``BatchNormalization`` node, which every tool (and a
crossbar mapping) folds into the preceding convolution like ordinary BN.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional

from common.errors import ConfigError


class _ScaleNorm2d(nn.Module):
    """Batch normalisation whose spread statistic is not the standard deviation."""

    running_mean: torch.Tensor
    running_scale: torch.Tensor

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        if num_features < 1 or not eps > 0 or not 0 < momentum <= 1:
            raise ConfigError(
                f"{type(self).__name__} needs num_features >= 1, eps > 0, 0 < momentum <= 1; "
                f"got {num_features}, {eps}, {momentum}"
            )
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_scale", torch.ones(num_features))

    def spread(self, centred: torch.Tensor) -> torch.Tensor:
        """The per-channel spread estimate of ``centred`` ``(C, N)`` values (estimates σ)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` ``(N, C, H, W)`` with batch statistics (training) or running ones."""
        tracing = torch.jit.is_tracing()  # type: ignore[attr-defined,no-untyped-call]
        if not tracing and (x.ndim != 4 or x.shape[1] != self.num_features):
            raise ConfigError(
                f"{type(self).__name__}({self.num_features}) expects (N, {self.num_features}, H, "
                f"W) inputs, got {list(x.shape)}"
            )
        if not self.training:
            # (x − μ) · s == (x − μ) / sqrt(var + ε) with var = 1/s² − ε: BatchNorm exactly
            var = self.running_scale.pow(-2) - self.eps
            return functional.batch_norm(
                x, self.running_mean, var, self.weight, self.bias, False, 0.0, self.eps
            )
        values = x.transpose(0, 1).reshape(self.num_features, -1)
        mean = values.mean(dim=1)
        scale = 1.0 / (self.spread(values - mean[:, None]) + self.eps)
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_scale.lerp_(scale, self.momentum)
        shape = (1, -1, 1, 1)
        return (x - mean.view(shape)) * (scale * self.weight).view(shape) + self.bias.view(shape)


class L1BatchNorm2d(_ScaleNorm2d):
    """Batch normalisation by the mean absolute deviation, ``sqrt(π/2) · mean|x − μ|``."""

    def spread(self, centred: torch.Tensor) -> torch.Tensor:
        """``sqrt(π/2) · mean|x − μ|`` per channel (equals σ for Gaussian values)."""
        return math.sqrt(math.pi / 2.0) * centred.abs().mean(dim=1)


class TopKBatchNorm2d(_ScaleNorm2d):
    """Batch normalisation by the mean of the ``k`` largest ``|x − μ|``, scaled by ``C(N)``."""

    def __init__(
        self, num_features: int, k: int = 10, eps: float = 1e-5, momentum: float = 0.1
    ) -> None:
        super().__init__(num_features, eps, momentum)
        if k < 1:
            raise ConfigError(f"TopKBatchNorm2d needs k >= 1, got {k}")
        self.k = k

    def spread(self, centred: torch.Tensor) -> torch.Tensor:
        """``C(N) · mean of the k largest |x − μ|`` per channel over its ``N`` values."""
        n = centred.shape[1]
        if n < 2:
            raise ConfigError("TopKBatchNorm2d needs at least 2 values per channel to train")
        top = centred.abs().topk(min(self.k, n), dim=1).values.mean(dim=1)
        return topk_constant(n) * top


def topk_constant(n: int) -> float:
    """``C(N) = 0.5 · (1 + sqrt(π · ln 4)) / sqrt(2 · ln N)`` (Hoffer et al. 2018)."""
    return 0.5 * (1.0 + math.sqrt(math.pi * math.log(4.0))) / math.sqrt(2.0 * math.log(n))


def fold_into_conv(conv: nn.Conv2d, norm: nn.Module) -> nn.Conv2d:
    """A new Conv2d computing ``norm(conv(x))`` in eval mode (BatchNorm2d, L1 or TopK).

    ``W' = W · γ · s`` per output channel and ``b' = (b − μ) · γ · s + β``, with ``s`` the running
    scale (``1/sqrt(var + ε)`` for BatchNorm2d) — what a crossbar stores.
    """
    if isinstance(norm, _ScaleNorm2d):
        scale = norm.running_scale
    elif isinstance(norm, nn.BatchNorm2d) and norm.running_var is not None:
        scale = (norm.running_var + norm.eps).rsqrt()
    else:
        raise ConfigError(f"cannot fold {type(norm).__name__} into a convolution")
    mean = norm.running_mean
    assert isinstance(mean, torch.Tensor) and norm.weight is not None and norm.bias is not None
    factor = (norm.weight * scale).detach()
    folded = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,  # type: ignore[arg-type]
        groups=conv.groups,
        bias=True,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        folded.weight.copy_(conv.weight * factor.view(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(mean)
        assert folded.bias is not None
        folded.bias.copy_((bias - mean) * factor + norm.bias)
    return folded
