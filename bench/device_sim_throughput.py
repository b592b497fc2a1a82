"""Per-draw cost of device_sim against one clean onnxruntime pass, for each way of swapping weights.

Run from the repo root:  .venv/bin/python -m bench.device_sim_throughput [--repeats 5]

Models and data: resnet8 on 2,000 CIFAR-10 test images, mnist-12 on the 10,000 MNIST test images.
Options timed per draw (noise generation included), each right after a clean pass, as ratios to
that pass; medians over repeats of wall time and of process CPU time (all onnxruntime threads; the
CPU ratio is the robust one when other jobs share the machine):
  rebuild          patch the initializers in the ModelProto, serialize, new session (1 draw/session)
  add_initializer  SessionOptions.add_initializer overrides (1 draw/session); NOTE: ignored for Conv
                   weights at ORT_ENABLE_ALL, so its output is checked against the patched graph
  weights_as_input weights become graph inputs, one session for all draws
  copies=K         device_sim's runner: K graph copies per session (K draws per session)
and the runner with DAC/ADC, clipping or with iterative bound management (copies=8; --io-only
times only these, with the clean pass; --no-iterative leaves out the slow bm=iterative cases).
Memory:
--memory runs a 10,000-image resnet8 simulation and prints peak RSS growth against the input size.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from bench.device_sim_data import MNIST12, RESNET8, load_cifar10_test, load_mnist_test
from device_sim import RunnerConfig, Simulator, parse_noise_spec, simulate

SPEC = parse_noise_spec("pcm:t=3600")


def _run(
    session: ort.InferenceSession, feed_name: str, x: np.ndarray, batch: int, extra=None
) -> list:
    outs = []
    for start in range(0, len(x), batch):
        feed = {feed_name: x[start : start + batch], **(extra or {})}
        outs.append(session.run(None, feed))
    return outs


def _options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return options


def bench_model(
    name: str,
    path,
    x: np.ndarray,
    repeats: int,
    batch: int,
    io_only: bool = False,
    iterative: bool = True,
) -> list[tuple[str, float, float]]:
    sim = Simulator(path, config=RunnerConfig(batch_size=batch))
    prepared = sim.prepared
    inp = prepared.input_name
    clean_session = ort.InferenceSession(
        prepared.model.SerializeToString(), _options(), providers=["CPUExecutionProvider"]
    )
    draw_counter = iter(range(10**9))

    def clean() -> None:
        _run(clean_session, inp, x, batch)

    def rebuild() -> None:
        weights = sim.draw_weights(SPEC, 0, next(draw_counter))
        model = onnx.ModelProto()
        model.CopyFrom(prepared.model)
        for tensor in model.graph.initializer:
            if tensor.name in weights:
                tensor.CopyFrom(numpy_helper.from_array(weights[tensor.name], tensor.name))
        session = ort.InferenceSession(
            model.SerializeToString(), _options(), providers=["CPUExecutionProvider"]
        )
        _run(session, inp, x, batch)

    serialized = prepared.model.SerializeToString()

    def add_initializer() -> None:
        weights = sim.draw_weights(SPEC, 0, next(draw_counter))
        options = _options()
        values = [ort.OrtValue.ortvalue_from_numpy(v) for v in weights.values()]
        for key, value in zip(weights, values, strict=True):
            options.add_initializer(key, value)
        session = ort.InferenceSession(serialized, options, providers=["CPUExecutionProvider"])
        _run(session, inp, x, batch)

    as_inputs = onnx.ModelProto()
    as_inputs.CopyFrom(prepared.model)
    kept = [t for t in as_inputs.graph.initializer if t.name not in prepared.weights]
    del as_inputs.graph.initializer[:]
    as_inputs.graph.initializer.extend(kept)
    for key, value in prepared.weights.items():
        as_inputs.graph.input.append(
            helper.make_tensor_value_info(
                key, helper.np_dtype_to_tensor_dtype(value.dtype), value.shape
            )
        )
    input_session = ort.InferenceSession(
        as_inputs.SerializeToString(), _options(), providers=["CPUExecutionProvider"]
    )

    def weights_as_input() -> None:
        weights = sim.draw_weights(SPEC, 0, next(draw_counter))
        _run(input_session, inp, x, batch, weights)

    cases: list[tuple[str, Callable[[], None], int]] = [
        ("rebuild (patch + serialize)", rebuild, 1),
        ("add_initializer override", add_initializer, 1),
        ("weights as graph inputs", weights_as_input, 1),
    ]
    if io_only:
        cases = []
    for copies in () if io_only else (1, 4, 8, 16):
        runner = Simulator(path, config=RunnerConfig(batch_size=batch, draws_per_session=copies))

        def run_copies(runner=runner, copies=copies) -> None:
            start = next(draw_counter) * copies
            for _ in runner.predictions(x, SPEC, range(start, start + copies), seed=0):
                pass

        cases.append((f"device_sim copies={copies}", run_copies, copies))
    for spec_text in (
        "pcm:t=3600+dac:bits=8+adc:bits=8",
        "pcm:t=3600+dac:bits=8+adc:bits=8,noise=0.06",
        "pcm:t=3600+dac:bits=8+adc:bits=8,bm=iterative",
        "pcm:t=3600+dac:bits=8+adc:bits=8,noise=0.06,bm=iterative",
    )[: None if iterative else 2]:
        io_spec = parse_noise_spec(spec_text)
        io_runner = Simulator(path, config=RunnerConfig(batch_size=batch, draws_per_session=8))

        def run_io(runner=io_runner, spec=io_spec) -> None:
            start = next(draw_counter) * 8
            for _ in runner.predictions(x, spec, range(start, start + 8), seed=0):
                pass

        cases.append((f"device_sim copies=8 {spec_text}", run_io, 8))
    # warm-up: first session of each kind, template building
    clean()
    for _, fn, _ in cases:
        fn()
    clean_wall: list[float] = []
    clean_cpu: list[float] = []
    wall: dict[str, list[float]] = {label: [] for label, _, _ in cases}
    cpu: dict[str, list[float]] = {label: [] for label, _, _ in cases}
    for _ in range(repeats):
        for label, fn, draws in cases:
            w0, c0 = time.perf_counter(), time.process_time()
            clean()
            w1, c1 = time.perf_counter(), time.process_time()
            fn()
            w2, c2 = time.perf_counter(), time.process_time()
            clean_wall.append(w1 - w0)
            clean_cpu.append(c1 - c0)
            wall[label].append((w2 - w1) / draws / (w1 - w0))
            cpu[label].append((c2 - c1) / draws / (c1 - c0))
    wall_s, cpu_s = statistics.median(clean_wall), statistics.median(clean_cpu)
    print(
        f"\n{name}: {len(x)} samples, batch {batch}; clean pass: wall {wall_s * 1e3:.1f} ms, "
        f"CPU {cpu_s * 1e3:.1f} ms (medians of {len(clean_wall)})"
    )
    print(f"{'option (per draw)':<78} {'wall ms':>8} {'x clean':>8} {'CPU ms':>8} {'x clean':>8}")
    rows = []
    for label, _, _ in cases:
        w_ratio, c_ratio = statistics.median(wall[label]), statistics.median(cpu[label])
        rows.append((label, w_ratio, c_ratio))
        print(
            f"{label:<78} {w_ratio * wall_s * 1e3:>8.1f} {w_ratio:>8.2f} "
            f"{c_ratio * cpu_s * 1e3:>8.1f} {c_ratio:>8.2f}"
        )
    return rows


def check_add_initializer_is_ignored_for_conv() -> None:
    sim = Simulator(RESNET8)
    conv = sim.prepared.analog[1]
    x = load_cifar10_test(20)[0]
    outs = []
    for scale in (1.0, 3.0):
        options = _options()
        value = ort.OrtValue.ortvalue_from_numpy(sim.prepared.weights[conv.graph_name] * scale)
        options.add_initializer(conv.graph_name, value)
        session = ort.InferenceSession(
            sim.prepared.model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        outs.append(session.run(None, {sim.prepared.input_name: x})[0])
    print(
        f"add_initializer on Conv weight {conv.name!r} changes the output: "
        f"{not np.allclose(*outs)} (onnxruntime {ort.__version__}, ORT_ENABLE_ALL)"
    )


def memory() -> None:
    x, y = load_cifar10_test(None)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report = simulate(RESNET8, x, y, "pcm:t=3600", 8, 0)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        f"memory: input {x.nbytes / 2**20:.0f} MiB ({x.shape}); peak RSS before simulate "
        f"{before / 2**20:.0f} MiB, after {after / 2**20:.0f} MiB; "
        f"growth {(after - before) / 2**20:.0f} MiB = {(after - before) / x.nbytes:.2f}x input; "
        f"accuracy {report.accuracy_mean:.4f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory", action="store_true", help="only the 10,000-image memory check")
    parser.add_argument(
        "--no-iterative", action="store_true", help="leave out the two bm=iterative cases (slow)"
    )
    parser.add_argument(
        "--io-only", action="store_true", help="only the DAC/ADC cases (with and without noise)"
    )
    args = parser.parse_args()
    print(f"onnxruntime {ort.__version__}, numpy {np.__version__}, python {sys.version.split()[0]}")
    if args.memory:
        memory()
        return 0
    if not args.io_only:
        check_add_initializer_is_ignored_for_conv()
    cifar, mnist = load_cifar10_test(2000)[0], load_mnist_test()[0]
    iterative = not args.no_iterative
    bench_model("resnet8 (CIFAR-10)", RESNET8, cifar, args.repeats, 250, args.io_only, iterative)
    bench_model("mnist-12 (MNIST)", MNIST12, mnist, args.repeats, 1000, args.io_only, iterative)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
