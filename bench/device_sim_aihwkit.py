"""device_sim beside aihwkit: PCM inference simulation of the same networks, time per draw.

Run from the repo root (benchmark-only dependency, not in pyproject: aihwkit 1.2.0 has no wheel for
torch 2.13; build it with ``apt-get install libopenblas-dev`` and
``.venv/bin/pip install scikit-build pybind11`` then
``.venv/bin/pip install --no-deps --no-build-isolation --no-binary aihwkit aihwkit==1.2.0``):

    .venv/bin/python -m bench.device_sim_aihwkit [--repeats 3]

The ONNX models' weights are loaded into equivalent torch modules (ResNet8 with its asymmetric
stride-2 padding, mnist-12 with SAME padding); aihwkit converts them to analog layers with its
``PCMLikeNoiseModel`` and global drift compensation. Per draw: program + drift to t = 3600 s, then
one pass over the data. Timed in the same run: the digital torch pass, aihwkit with perfect IO
(weight noise only), aihwkit with its default IO (7-bit DAC, 9-bit ADC, output noise), and
device_sim (``pcm:t=3600``, 8 draws per session). Medians over repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from aihwkit.inference import GlobalDriftCompensation, PCMLikeNoiseModel
from aihwkit.nn.conversion import convert_to_analog
from aihwkit.simulator.configs import InferenceRPUConfig
from onnx import numpy_helper
from torch import nn
from torch.nn import functional

from bench.device_sim_data import MNIST12, RESNET8, load_cifar10_test, load_mnist_test
from device_sim import RunnerConfig, Simulator, parse_noise_spec

T_INFERENCE_S = 3600.0


def _conv_params(path: Path) -> list[tuple[np.ndarray, np.ndarray | None]]:
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type == "Conv":
            bias = inits[node.input[2]] if len(node.input) > 2 else None
            out.append((inits[node.input[1]], bias))
    return out


def _conv(w: np.ndarray, b: np.ndarray | None, stride: int, padding: int) -> nn.Conv2d:
    layer = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], stride, padding, bias=b is not None)
    layer.weight.data = torch.from_numpy(w.copy())
    if b is not None:
        layer.bias.data = torch.from_numpy(b.reshape(-1).copy())
    return layer


class ResNet8(nn.Module):
    """The MLPerf Tiny ResNet8 graph of resnet8_cifar10.onnx, in torch."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        p = _conv_params(path)
        strides = [1, 1, 1, 2, 1, 2, 2, 1, 2]
        pads = [1, 1, 1, 0, 1, 0, 0, 1, 0]  # stride-2 3x3 convs pad (bottom, right) by hand
        self.convs = nn.ModuleList(
            _conv(w, b, s, pad) for (w, b), s, pad in zip(p, strides, pads, strict=True)
        )
        model = onnx.load(str(path))
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.dense = nn.Linear(64, 10)
        self.dense.weight.data = torch.from_numpy(inits["model/dense/MatMul"].copy())
        self.dense.bias.data = torch.from_numpy(
            inits["model/dense/BiasAdd/ReadVariableOp/resource"].copy()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.convs
        s = functional.relu(c[0](x))
        s = functional.relu(s + c[2](functional.relu(c[1](s))))
        a = functional.relu(c[3](functional.pad(s, (0, 1, 0, 1))))
        s = functional.relu(c[5](s) + c[4](a))
        a = functional.relu(c[6](functional.pad(s, (0, 1, 0, 1))))
        s = functional.relu(c[8](s) + c[7](a))
        return torch.softmax(self.dense(functional.avg_pool2d(s, 8).flatten(1)), dim=1)


class Mnist12(nn.Module):
    """The CNTK mnist-12 graph in torch."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        (w1, _), (w2, _) = _conv_params(path)
        model = onnx.load(str(path))
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.conv1 = _conv(w1, inits["Parameter6"], 1, 2)
        self.conv2 = _conv(w2, inits["Parameter88"], 1, 2)
        self.dense = nn.Linear(256, 10)
        self.dense.weight.data = torch.from_numpy(inits["Parameter193"].reshape(256, 10).T.copy())
        self.dense.bias.data = torch.from_numpy(inits["Parameter194"].reshape(-1).copy())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = functional.max_pool2d(functional.relu(self.conv1(x)), 2)
        x = functional.max_pool2d(functional.relu(self.conv2(x)), 3)
        return self.dense(x.flatten(1))


def _accuracy(model: nn.Module, x: torch.Tensor, y: np.ndarray, batch: int) -> float:
    with torch.no_grad():
        pred = torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)]).argmax(1)
    return float((pred.numpy() == y).mean())


def _analog(model: nn.Module, perfect_io: bool) -> nn.Module:
    config = InferenceRPUConfig()
    config.noise_model = PCMLikeNoiseModel(g_max=25.0)
    config.drift_compensation = GlobalDriftCompensation()
    config.forward.is_perfect = perfect_io
    analog = convert_to_analog(model, config)
    analog.eval()
    return analog


def bench(
    name: str,
    path: Path,
    module: nn.Module,
    data: tuple[np.ndarray, np.ndarray],
    batch: int,
    repeats: int,
) -> None:
    x, y = data
    xt = torch.from_numpy(x)
    digital_acc = _accuracy(module, xt, y, batch)
    weight_only = _analog(module, perfect_io=True)
    full_io = _analog(module, perfect_io=False)
    sim = Simulator(path, config=RunnerConfig(batch_size=batch, draws_per_session=8))
    spec = parse_noise_spec(f"pcm:t={T_INFERENCE_S:g}")
    accs: dict[str, list[float]] = {
        "aihwkit weight noise": [],
        "aihwkit full IO": [],
        "device_sim": [],
    }
    draw = iter(range(10**9))

    def aihwkit_draw(model: nn.Module, label: str) -> Callable[[], None]:
        def run() -> None:
            model.program_analog_weights()
            model.drift_analog_weights(T_INFERENCE_S)
            accs[label].append(_accuracy(model, xt, y, batch))

        return run

    def device_sim_draws() -> None:
        start = next(draw) * 8
        for _, out in sim.predictions(x, spec, range(start, start + 8), seed=0):
            accs["device_sim"].append(float((out.argmax(1) == y).mean()))

    def digital() -> None:
        _accuracy(module, xt, y, batch)

    cases: list[tuple[str, Callable[[], None], int, str | None]] = [
        ("torch digital pass", digital, 1, None),
        (
            "aihwkit PCM, weight noise only (perfect IO)",
            aihwkit_draw(weight_only, "aihwkit weight noise"),
            1,
            "aihwkit weight noise",
        ),
        (
            "aihwkit PCM, default IO (DAC/ADC/output noise)",
            aihwkit_draw(full_io, "aihwkit full IO"),
            1,
            "aihwkit full IO",
        ),
        ("device_sim pcm:t=3600 (8 draws/session)", device_sim_draws, 8, "device_sim"),
    ]
    for _, fn, _, _ in cases:
        fn()
    times: dict[str, list[float]] = {label: [] for label, _, _, _ in cases}
    for _ in range(repeats):
        for label, fn, draws, _ in cases:
            t0 = time.process_time()
            fn()
            times[label].append((time.process_time() - t0) / draws)
    base = statistics.median(times["torch digital pass"])
    clean = float((sim.clean_outputs(x).argmax(1) == y).mean())
    print(
        f"\n{name}: {len(x)} samples; torch digital accuracy {digital_acc:.4f}, "
        f"onnxruntime clean {clean:.4f}"
    )
    print(f"{'per draw (CPU time, median)':<50} {'ms':>8} {'x torch':>8} {'accuracy':>9}")
    for label, _, _, key in cases:
        t = statistics.median(times[label])
        acc = f"{np.mean(accs[key]):.4f}" if key else f"{digital_acc:.4f}"
        print(f"{label:<50} {t * 1e3:>8.1f} {t / base:>8.2f} {acc:>9}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    import aihwkit  # noqa: PLC0415  # version only

    print(f"aihwkit {aihwkit.__version__}, torch {torch.__version__}")
    cifar, mnist = load_cifar10_test(2000), load_mnist_test()
    bench("resnet8 (CIFAR-10)", RESNET8, ResNet8(RESNET8).eval(), cifar, 250, args.repeats)
    bench("mnist-12 (MNIST)", MNIST12, Mnist12(MNIST12).eval(), mnist, 1000, args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
