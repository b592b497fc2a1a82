"""L1 and TopK batch normalisation: the formulas, eval mode as BatchNorm, ONNX, folding."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from common.errors import ConfigError
from common.norms import L1BatchNorm2d, TopKBatchNorm2d, fold_into_conv, topk_constant


def _numpy_reference(x: np.ndarray, kind: str, k: int, gamma: np.ndarray, beta: np.ndarray):
    values = x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1).astype(np.float64)
    mu = values.mean(axis=1)
    c = np.abs(values - mu[:, None])
    if kind == "l1":
        spread = math.sqrt(math.pi / 2) * c.mean(axis=1)
    else:
        n = values.shape[1]
        top = -np.sort(-c, axis=1)[:, :k].mean(axis=1)
        spread = 0.5 * (1 + math.sqrt(math.pi * math.log(4))) / math.sqrt(2 * math.log(n)) * top
    scale = 1 / (spread + 1e-5)
    shape = (1, -1, 1, 1)
    out = (x - mu.reshape(shape)) * (scale * gamma).reshape(shape) + beta.reshape(shape)
    return out, mu, scale


@pytest.mark.parametrize(
    ("layer", "kind"), [(L1BatchNorm2d(3), "l1"), (TopKBatchNorm2d(3, k=5), "topk")]
)
def test_training_forward_follows_the_formula(layer: nn.Module, kind: str) -> None:
    rng = np.random.default_rng(0)
    spread = np.array([1, 3, 0.5])[None, :, None, None]
    x = (rng.normal(size=(4, 3, 5, 5)) * spread + 2).astype(np.float32)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        layer.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
    layer.train()
    out = layer(torch.from_numpy(x)).detach().numpy()
    ref, mu, scale = _numpy_reference(x, kind, 5, np.array([1, 2, 0.5]), np.array([0, -1, 3]))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(layer.running_mean.numpy(), 0.1 * mu, rtol=1e-4)
    np.testing.assert_allclose(layer.running_scale.numpy(), 0.9 + 0.1 * scale, rtol=1e-4)


def test_l1_spread_estimates_the_standard_deviation_of_gaussian_data() -> None:
    x = torch.randn(64, 2, 16, 16, generator=torch.Generator().manual_seed(0)) * 3.0
    centred = x.transpose(0, 1).reshape(2, -1)
    assert L1BatchNorm2d(2).spread(centred - centred.mean(1, keepdim=True)) == pytest.approx(
        torch.tensor([3.0, 3.0]), rel=0.02
    )
    assert topk_constant(2) > topk_constant(1000) > 0


@pytest.mark.parametrize("layer", [L1BatchNorm2d(4), TopKBatchNorm2d(4)])
def test_eval_exports_to_onnx_batchnorm_and_folds_into_the_conv(
    layer: nn.Module, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 4, 3, padding=1)
    net = nn.Sequential(conv, layer)
    net.train()
    for _ in range(5):  # running statistics move away from their initial values
        net(torch.randn(8, 2, 6, 6) * 2 + 1)
    net.eval()
    x = torch.randn(3, 2, 6, 6)
    expected = net(x).detach()
    # eval mode: the same function as BatchNorm2d with var = 1/scale^2 - eps
    bn = nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.weight.copy_(layer.weight)
        bn.bias.copy_(layer.bias)
        bn.running_mean.copy_(layer.running_mean)
        bn.running_var.copy_(layer.running_scale.pow(-2) - bn.eps)
    torch.testing.assert_close(bn(conv(x)), expected, rtol=1e-5, atol=1e-5)
    # folded into the convolution, as a crossbar would store it
    torch.testing.assert_close(fold_into_conv(conv, layer)(x), expected, rtol=1e-4, atol=1e-5)
    # ONNX: a BatchNormalization node, and onnxruntime agrees with torch
    path = tmp_path / "n.onnx"
    torch.onnx.export(net, (x,), str(path), input_names=["x"], output_names=["y"], dynamo=False)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "BatchNormalization" in ops or ops == {"Conv"}  # exporters may fold BN into the conv
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()}
    )[0]
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-5)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ConfigError, match="expects"):
        L1BatchNorm2d(3)(torch.zeros(2, 4, 3, 3))
    with pytest.raises(ConfigError, match="k >= 1"):
        TopKBatchNorm2d(3, k=0)
    with pytest.raises(ConfigError, match="num_features"):
        L1BatchNorm2d(0)
    with pytest.raises(ConfigError, match="cannot fold"):
        fold_into_conv(nn.Conv2d(1, 2, 1), nn.LayerNorm(2))
