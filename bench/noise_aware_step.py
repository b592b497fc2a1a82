"""Cost of one noise-aware training step against a plain one (ResNet-20, CIFAR-10 geometry).

Run from the repo root:  .venv/bin/python -m bench.noise_aware_step [--device cuda] [--steps 50]

Times SGD steps (forward, backward, update) of the zoo's ResNet-20 on random 32x32 images, batch
128, plain and with device_sim weight noise injected into every Conv/Linear
(``common.noise_aware.inject_weight_noise``): the PCM recipe of experiments/pcm_adabs.py
(``pcm:t=31536000,compensate=true``) and AWGN at 10 dB. Medians over ``--repeats`` runs of
``--steps`` steps after a warm-up; on CUDA the clock stops after a synchronize.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from common.noise_aware import inject_weight_noise
from common.zoo import build_model
from common.zoo_spec import ModelSpec

SPECS = ("pcm:t=31536000,compensate=true", "awgn:snr_db=10")


def _step_ms(model: nn.Module, device: torch.device, steps: int, repeats: int) -> float:
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.rand(128, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (128,), generator=gen).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    model.train()

    def run(n: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / n * 1e3

    run(5)  # warm-up: kernels, allocator
    return statistics.median(run(steps) for _ in range(repeats))


def main() -> int:
    """Print the step times."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    spec = ModelSpec("resnet20", 3, 32, 32, 10)
    print(f"torch {torch.__version__}, device {device}, ResNet-20, batch 128")
    plain = _step_ms(build_model(spec, seed=0).to(device), device, args.steps, args.repeats)
    print(f"{'plain':<36} {plain:8.2f} ms/step")
    for text in SPECS:
        model = build_model(spec, seed=0).to(device)
        inject_weight_noise(model, text, seed=0)
        noisy = _step_ms(model, device, args.steps, args.repeats)
        print(f"{text:<36} {noisy:8.2f} ms/step  {noisy / plain:5.2f}x plain")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
