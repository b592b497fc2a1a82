"""The model zoo for transfer learning: named networks with named parameter groups.

Every network reads images ``(N, C, H, W)`` as the datasets store them (float32 in [0, 1]) and
writes class scores ``(N, num_classes)``. Each one names its parameter groups, which is what
``--trainable`` selects on an edge node:

* ``head``: the final Linear layer (the classifier);
* ``last-block``: the last feature block and the head;
* ``bn``: every normalisation layer's affine parameters (and running statistics) and the head;
* ``all``: every parameter;
* ``adapters:RANK``: the head, plus a rank-RANK low-rank update ``B @ A`` of every other
  Conv/Linear weight (LoRA), see :mod:`common.adapters`.

Networks: ``mlp`` (two hidden layers), ``lenet`` (two conv stages + a hidden fc layer),
``resnet8/20/32/44`` (CIFAR-style residual networks, 16/32/64 channels, He et al. 2016) and
``vgg11/16`` (CIFAR-style VGG). Every convolution can be followed by BatchNorm, L1 or TopK
batch normalisation or nothing (``ModelSpec.norm``, ``common.norms``).
A :class:`ModelSpec` describes a network completely (name and data geometry), so a model file
carries its spec and anyone can rebuild the network without code of their own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from common.errors import ConfigError
from common.zoo_spec import ModelSpec as ModelSpec  # noqa: PLC0414 - re-exported for the zoo's users

HEAD_PREFIX = "head."
"""State-dict prefix of the classifier head in every zoo network."""

LAST_BLOCK_PREFIX = "last_block."
"""State-dict prefix of the last feature block in every zoo network."""


def norm_layer(kind: str, channels: int) -> nn.Module:
    """A 2-D normalisation layer of ``kind`` (``none`` gives the identity)."""
    from common.norms import L1BatchNorm2d, TopKBatchNorm2d  # noqa: PLC0415 - cycle-free lazy

    layers: dict[str, Callable[[int], nn.Module]] = {
        "none": lambda _: nn.Identity(),
        "bn": nn.BatchNorm2d,
        "l1": L1BatchNorm2d,
        "topk": TopKBatchNorm2d,
    }
    return layers[kind](channels)


class _Net(nn.Module):
    """``features -> last_block -> head``; all zoo networks share this layout."""

    def __init__(self, features: nn.Module, last_block: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.features = features
        self.last_block = last_block
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> class scores."""
        out: torch.Tensor = self.head(self.last_block(self.features(x)))
        return out


def _mlp(spec: ModelSpec) -> _Net:
    inputs = spec.in_channels * spec.height * spec.width
    return _Net(
        nn.Sequential(nn.Flatten(), nn.Linear(inputs, 256), nn.ReLU()),
        nn.Sequential(nn.Linear(256, 128), nn.ReLU()),
        nn.Linear(128, spec.num_classes),
    )


def _lenet(spec: ModelSpec) -> _Net:
    # one 2x2 pool per stage while the map is at least 16 pixels, so 8x8 digits keep a 4x4 map
    h, w = spec.height, spec.width
    layers: list[nn.Module] = []
    prev = spec.in_channels
    for out in (32, 64):
        norm = [] if spec.norm_kind == "none" else [norm_layer(spec.norm_kind, out)]
        layers += [nn.Conv2d(prev, out, 3, padding=1), *norm, nn.ReLU()]
        if min(h, w) >= 8:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        prev = out
    layers.append(nn.Flatten())
    return _Net(
        nn.Sequential(*layers),
        nn.Sequential(nn.Linear(prev * h * w, 128), nn.ReLU()),
        nn.Linear(128, spec.num_classes),
    )


class _BasicBlock(nn.Module):
    """Two 3x3 conv + BN, identity or 1x1-projection shortcut (He et al. 2016, CIFAR form)."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str = "bn") -> None:
        super().__init__()
        bias = norm == "none"  # a normalisation layer brings its own shift
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)
        self.bn1 = norm_layer(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=bias)
        self.bn2 = norm_layer(norm, cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=bias), norm_layer(norm, cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block."""
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def _resnet(blocks_per_stage: int) -> Callable[[ModelSpec], _Net]:
    def build(spec: ModelSpec) -> _Net:
        norm = spec.norm_kind
        stem = [
            nn.Conv2d(spec.in_channels, 16, 3, padding=1, bias=norm == "none"),
            norm_layer(norm, 16),
            nn.ReLU(),
        ]
        blocks: list[nn.Module] = []
        prev = 16
        for stage, width in enumerate((16, 32, 64)):
            for b in range(blocks_per_stage):
                stride = 2 if stage > 0 and b == 0 and min(spec.height, spec.width) >= 8 else 1
                blocks.append(_BasicBlock(prev, width, stride, norm))
                prev = width
        last = blocks.pop()
        return _Net(
            nn.Sequential(*stem, *blocks),
            nn.Sequential(last, nn.AdaptiveAvgPool2d(1), nn.Flatten()),
            nn.Linear(64, spec.num_classes),
        )

    return build


_VGG_STAGES: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
}
"""Convolutions (output channels) of each stage; a 2x2 max-pool ends each stage."""


def _vgg(name: str) -> Callable[[ModelSpec], _Net]:
    """VGG for small images (Simonyan & Zisserman; CIFAR form: one linear layer on 512 features).

    A stage pools only while the feature map is at least 2 pixels, so 8x8 inputs work too.
    """

    def build(spec: ModelSpec) -> _Net:
        norm = spec.norm_kind
        stages: list[nn.Module] = []
        prev, size = spec.in_channels, min(spec.height, spec.width)
        for widths in _VGG_STAGES[name]:
            layers: list[nn.Module] = []
            for width in widths:
                layers += [
                    nn.Conv2d(prev, width, 3, padding=1, bias=norm == "none"),
                    norm_layer(norm, width),
                    nn.ReLU(),
                ]
                prev = width
            if size >= 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            stages.append(nn.Sequential(*layers))
        last = stages.pop()
        return _Net(
            nn.Sequential(*stages),
            nn.Sequential(last, nn.AdaptiveAvgPool2d(1), nn.Flatten()),
            nn.Linear(512, spec.num_classes),
        )

    return build


_BUILDERS: dict[str, Callable[[ModelSpec], _Net]] = {
    "mlp": _mlp,
    "lenet": _lenet,
    "resnet8": _resnet(1),
    "resnet20": _resnet(3),
    "resnet32": _resnet(5),
    "resnet44": _resnet(7),
    "vgg11": _vgg("vgg11"),
    "vgg16": _vgg("vgg16"),
}


def build_model(spec: ModelSpec, *, seed: int | None = None) -> nn.Module:
    """A fresh network for ``spec`` (initialised from ``seed`` without touching the global RNG)."""
    if seed is None:
        return _BUILDERS[spec.name](spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _BUILDERS[spec.name](spec)


def parameter_count(model: nn.Module) -> int:
    """Number of learnable parameters (entries) of ``model``."""
    return sum(p.numel() for p in model.parameters())


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The named tensors that define the model: parameters and float buffers (BN statistics).

    Integer bookkeeping buffers (``num_batches_tracked``) are left out: they do not change
    the function the network computes.
    """
    return {name: t.detach() for name, t in model.state_dict().items() if t.is_floating_point()}


def check_spec_matches(spec: ModelSpec, input_shape: tuple[int, int, int], classes: int) -> None:
    """Refuse data whose geometry differs from the model's (names both)."""
    if (spec.in_channels, spec.height, spec.width) != input_shape:
        raise ConfigError(
            f"the model expects images {spec.in_channels}x{spec.height}x{spec.width}, the data "
            f"has {input_shape[0]}x{input_shape[1]}x{input_shape[2]}"
        )
    if classes > spec.num_classes:
        raise ConfigError(
            f"the data has labels up to {classes - 1}, the model has {spec.num_classes} outputs"
        )


def flops_per_sample(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Multiply-accumulates of one forward pass over Conv and Linear layers (counted by hooks)."""
    total = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += output[0].numel() * (module.in_channels // module.groups) * kh * kw
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros((1, *input_shape)))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total
