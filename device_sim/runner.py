"""Monte-Carlo evaluation of a prepared graph with onnxruntime.

Draw ``d`` of a run with seed ``s`` takes the noise of analog tensor ``i`` from the stream
``default_rng([s, d, 0, i])`` and the ADC output noise of layer ``j`` from the run's noise bank
(:func:`adc_noise_bank`) at an offset from ``default_rng([s, d, 1, j])``, and with
``adc:bm=iterative`` pass k ≥ 1 of layer j at an offset from ``default_rng([s, d, 1, j, k])``
(:attr:`NoiseInput.stream`), read in sample order (:func:`adc_noise_window`); so a draw does not
depend on the batch size, the thread count, how draws are grouped into sessions, or which other
tensors are noisy. Several draws share one onnxruntime session: the graph is replicated
``draws_per_session`` times and each copy's weights are written into the serialized graph (the
fastest correct option measured in ``bench/device_sim_throughput.py``).
"""

from __future__ import annotations

import abc
import functools
import logging
import math
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from common.errors import NoiseInjectionError
from device_sim.graph import (
    NoiseInput,
    PreparedGraph,
    adc_scale_name,
    add_io_quantization,
    has_subgraphs,
    load_model,
    noise_start_name,
    prepare,
    replicate,
    scale_weight,
    with_outputs,
)
from device_sim.kernels import io_kernels_library
from device_sim.noise import NoiseSpec, parse_noise_spec, parse_sweep
from device_sim.report import LayerResult, PerLayerReport, SimulationReport, SweepReport

logger = logging.getLogger(__name__)

_WEIGHT_STREAM = 0
_ADC_STREAM = 1


@dataclass(frozen=True)
class RunnerConfig:
    """How the simulator runs onnxruntime."""

    batch_size: int = 256
    """Samples in flight per onnxruntime call, shared by the draws of a session (memory bound)."""
    draws_per_session: int = 8
    """Draws evaluated by one session (graph copies); 1 rebuilds the session for every draw."""
    threads: int = 0
    """onnxruntime intra-op threads; 0: onnxruntime's choice (one per core)."""
    fused_io: bool = True
    """DAC/ADC layers as the compiled kernels of :mod:`device_sim.kernels` where they build here
    (same results, fewer passes over memory); False: plain onnxruntime nodes only."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise NoiseInjectionError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.draws_per_session < 1:
            raise NoiseInjectionError(
                f"draws_per_session must be >= 1, got {self.draws_per_session}"
            )
        if self.threads < 0:
            raise NoiseInjectionError(f"threads must be >= 0, got {self.threads}")


def _session_options(threads: int, kernels: Path | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # unused-initializer warnings are expected after rewriting
    if threads:
        options.intra_op_num_threads = threads
    if kernels is not None:
        options.register_custom_ops_library(str(kernels))
    return options


def _shape_text(shape: Sequence[object]) -> str:
    inner = ", ".join(str(d) for d in shape)
    return f"({inner},)" if len(shape) == 1 else f"({inner})"


@dataclass(frozen=True, eq=False)
class _Template:
    """A (replicated) graph whose per-copy weight initializers are overwritten for each group."""

    model: onnx.ModelProto
    slots: dict[str, int]
    noise_inputs: list[NoiseInput]
    weight_gain: dict[str, float]
    kernels: Path | None
    """The custom-op library its fused DAC/ADC nodes need (None: it has none)."""


class Simulator:
    """A model prepared for analog simulation, ready to evaluate draws on data."""

    def __init__(
        self,
        model: str | Path | onnx.ModelProto,
        *,
        output: str | None = None,
        fold_affine: bool = True,
        analog_include: str | None = None,
        analog_exclude: str | None = None,
        config: RunnerConfig | None = None,
    ) -> None:
        """Load and prepare ``model`` (see :func:`device_sim.graph.prepare` for the options)."""
        proto = model if isinstance(model, onnx.ModelProto) else load_model(model)
        self.name = str(model) if not isinstance(model, onnx.ModelProto) else proto.graph.name
        self.config = config or RunnerConfig()
        self._source = proto
        self._options = (output, fold_affine, analog_include, analog_exclude)
        self.prepared: PreparedGraph = prepare(
            proto,
            output=output,
            fold_affine=fold_affine,
            analog_include=analog_include,
            analog_exclude=analog_exclude,
        )
        self._clean = self._session(self.prepared.model.SerializeToString())
        self._batch_size = self.config.batch_size
        self._batch_checked = not self.prepared.batch_was_fixed
        self._templates: dict[tuple[str, int], _Template] = {}
        self._noise_shapes: dict[str, tuple[int, ...]] = {}
        self._banks: dict[tuple[int, float, str, int], np.ndarray] = {}

    def recipe(self) -> SimulatorRecipe:
        """What rebuilds this simulator in another process (e.g. a Ray worker)."""
        output, fold_affine, include, exclude = self._options
        return SimulatorRecipe(
            model=self._source.SerializeToString(),
            output=output,
            fold_affine=fold_affine,
            analog_include=include,
            analog_exclude=exclude,
            config=self.config,
        )

    @property
    def analog_names(self) -> tuple[str, ...]:
        """Original initializer names of the analog tensors."""
        return tuple(t.name for t in self.prepared.analog)

    def _session(self, model: bytes, kernels: Path | None = None) -> ort.InferenceSession:
        options = _session_options(self.config.threads, kernels)
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    def check_data(self, x: np.ndarray, y: np.ndarray | None = None) -> None:
        """Raise ``NoiseInjectionError`` unless ``x`` (and ``y``) fit the model's data input."""
        want = self.prepared.input_shape
        if x.ndim != len(want) or any(
            isinstance(w, int) and w != h for w, h in zip(want[1:], x.shape[1:], strict=False)
        ):
            raise NoiseInjectionError(
                f"data x has shape {_shape_text(x.shape)} but model input "
                f"{self.prepared.input_name!r} expects {_shape_text(('N', *want[1:]))} "
                f"(model shape {_shape_text(want)})"
            )
        if x.shape[0] == 0:
            raise NoiseInjectionError("data x has no samples")
        if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
            raise NoiseInjectionError(f"data x has non-numeric dtype {x.dtype}")
        if y is not None:
            if y.ndim != 1 or y.shape[0] != x.shape[0]:
                raise NoiseInjectionError(
                    f"labels y have shape {_shape_text(y.shape)}, expected ({x.shape[0]},) "
                    "to match x"
                )
            if not np.issubdtype(y.dtype, np.integer):
                raise NoiseInjectionError(f"labels y must be integers, got dtype {y.dtype}")

    def _batches(self, x: np.ndarray, copies: int = 1) -> Iterator[np.ndarray]:
        """Slices of ``x`` so that ``copies`` graph copies hold at most ``batch_size`` samples."""
        if not self._batch_checked:
            self._probe_batching(x)
        step = max(1, self._batch_size // copies)
        for start in range(0, x.shape[0], step):
            yield np.ascontiguousarray(x[start : start + step], dtype=self.prepared.input_dtype)

    def _probe_batching(self, x: np.ndarray) -> None:
        """Check that the un-fixed batch dimension works; fall back to batch size 1 if not."""
        self._batch_checked = True
        if x.shape[0] < 2:
            return
        pair = np.ascontiguousarray(x[:2], dtype=self.prepared.input_dtype)
        name, out = self.prepared.input_name, self.prepared.output_name
        try:
            (both,) = self._clean.run([out], {name: pair})
            singles = [self._clean.run([out], {name: pair[i : i + 1]})[0] for i in (0, 1)]
            works = both.shape[0] == 2 and np.allclose(
                both, np.concatenate(singles), rtol=1e-4, atol=1e-5
            )
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument types
            logger.debug("batched probe failed: %s", exc)
            works = False
        if not works:
            logger.warning("model only runs one sample at a time (batch fixed to 1 inside)")
            self._batch_size = 1

    def clean_outputs(self, x: np.ndarray) -> np.ndarray:
        """Outputs of the prepared graph without noise (equal to the original model's)."""
        self.check_data(x)
        name, out = self.prepared.input_name, self.prepared.output_name
        return np.concatenate([self._clean.run([out], {name: b})[0] for b in self._batches(x)])

    def accuracy(self, outputs: np.ndarray, y: np.ndarray) -> float:
        """Top-1 accuracy of the selected output's values (see :func:`predicted_classes`)."""
        listing = "; ".join(o.describe() for o in self.prepared.outputs)
        return accuracy(outputs, y, self.prepared.output_name, listing)

    def draw_weights(
        self, spec: NoiseSpec, seed: int, draw: int, tensors: Sequence[int] | None = None
    ) -> dict[str, np.ndarray]:
        """Weights of draw ``draw`` by graph name (noisy only at indices ``tensors``, if given)."""
        out: dict[str, np.ndarray] = {}
        for i, tensor in enumerate(self.prepared.analog):
            clean = self.prepared.weights[tensor.graph_name]
            if tensors is not None and i not in tensors:
                out[tensor.graph_name] = clean
                continue
            rng = np.random.default_rng([seed, draw, _WEIGHT_STREAM, i])
            out[tensor.graph_name] = spec.perturb(clean, rng, tensor.channel_axis)
        return out

    def draw_scaled_weights(
        self, spec: NoiseSpec, seed: int, draw: int, tensors: Sequence[int] | None = None
    ) -> dict[str, tuple[np.ndarray, float]]:
        """Draw ``draw`` as (array weights, digital output scale) per analog tensor.

        The same draw as :meth:`draw_weights` (weights · scale), with the drift compensation
        kept apart so that it can multiply the output after the ADC.
        """
        out: dict[str, tuple[np.ndarray, float]] = {}
        for i, tensor in enumerate(self.prepared.analog):
            clean = self.prepared.weights[tensor.graph_name]
            if tensors is not None and i not in tensors:
                out[tensor.graph_name] = clean, 1.0
                continue
            rng = np.random.default_rng([seed, draw, _WEIGHT_STREAM, i])
            out[tensor.graph_name] = spec.perturb_scaled(clean, rng, tensor.channel_axis)
        return out

    def _template(self, spec: NoiseSpec, copies: int) -> _Template:
        key = (f"{spec.dac}|{spec.adc}", copies)
        if key not in self._templates:
            kernels = None
            if spec.dac is None and spec.adc is None:
                base, noise, gain = self.prepared.model, list[NoiseInput](), dict[str, float]()
            else:
                kernels = io_kernels_library() if self.config.fused_io else None
                io = add_io_quantization(
                    self.prepared,
                    spec.dac,
                    spec.adc,
                    fused=kernels is not None,
                    threads=self.config.threads,
                )
                base, noise, gain = io.model, io.noise_inputs, io.weight_gain
                if not io.uses_kernels:
                    kernels = None
            per_copy = list(self.prepared.weights) + [n.name for n in noise]
            if spec.adc is not None:
                per_copy += [adc_scale_name(t.node) for t in self.prepared.analog]
            model = (
                base
                if copies == 1 and has_subgraphs(base)
                else replicate(base, self.prepared.input_name, per_copy, copies)
            )
            slots = {t.name: i for i, t in enumerate(model.graph.initializer)}
            self._templates[key] = _Template(model, slots, noise, gain, kernels)
        return self._templates[key]

    def _noise_bank(self, seed: int, scale: float, dtype: np.dtype, size: int) -> np.ndarray:
        """:func:`adc_noise_bank` (the last few are kept: 64 MiB each in float32)."""
        key = (seed, scale, np.dtype(dtype).str, size)
        if key not in self._banks:
            while len(self._banks) >= _BANKS_KEPT:
                del self._banks[next(iter(self._banks))]  # the oldest
            self._banks[key] = adc_noise_bank(seed, scale, dtype, size)
        return self._banks[key]

    def _noise_shape(self, noise: NoiseInput, x: np.ndarray) -> tuple[int, ...]:
        """The layer's output shape per sample (probed with one sample, and two when there are).

        Raises:
            NoiseInjectionError: the layer's output does not have the samples on its first axis
                (a sequence-first layout): its output noise could not be drawn per sample.
        """
        if noise.layer_output not in self._noise_shapes:
            if not self._batch_checked:
                self._probe_batching(x)
            probe = with_outputs(self.prepared.model, [noise.layer_output])
            session = self._session(probe.SerializeToString())
            shapes = []
            for count in (1, 2)[: min(2, len(x)) if self._batch_size > 1 else 1]:
                sample = np.ascontiguousarray(x[:count], dtype=self.prepared.input_dtype)
                (value,) = session.run([noise.layer_output], {self.prepared.input_name: sample})
                shapes.append(value.shape)
            if any(
                shape[:1] != (count,) or shape[1:] != shapes[0][1:]
                for count, shape in enumerate(shapes, start=1)
            ):
                raise NoiseInjectionError(
                    f"adc output noise: layer output {noise.layer_output!r} has shape "
                    f"{_shape_text(shapes[0])} for 1 sample"
                    + (f" and {_shape_text(shapes[1])} for 2" if len(shapes) > 1 else "")
                    + "; output noise needs the samples on the first axis (leave out noise=, or "
                    "exclude the layer with --analog-exclude)"
                )
            self._noise_shapes[noise.layer_output] = tuple(shapes[0][1:])
        return self._noise_shapes[noise.layer_output]

    def predictions(
        self,
        x: np.ndarray,
        spec: NoiseSpec,
        draws: Sequence[int],
        seed: int,
        tensors: Sequence[int] | None = None,
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(draw, outputs)`` for each draw: the selected output on all of ``x``."""
        self.check_data(x)
        draws = list(draws)
        group = self.config.draws_per_session
        if has_subgraphs(self.prepared.model):
            group = 1
        for start in range(0, len(draws), group):
            chunk = draws[start : start + group]
            yield from zip(chunk, self._run_group(x, spec, chunk, seed, tensors), strict=True)

    def _run_group(
        self,
        x: np.ndarray,
        spec: NoiseSpec,
        draws: list[int],
        seed: int,
        tensors: Sequence[int] | None,
    ) -> list[np.ndarray]:
        template = self._template(spec, len(draws))
        noise_inputs = template.noise_inputs
        replicated = not (len(draws) == 1 and has_subgraphs(self.prepared.model))

        def name(k: int, n: str) -> str:
            return f"c{k}/{n}" if replicated else n

        # Weights are written into the serialized graph: SessionOptions.add_initializer overrides
        # are silently ignored for Conv weights at ORT_ENABLE_ALL (the NCHWc layout transform).
        initializers = template.model.graph.initializer
        for k, draw in enumerate(draws):
            if spec.adc is None:
                for graph_name, value in self.draw_weights(spec, seed, draw, tensors).items():
                    slot = template.slots[name(k, graph_name)]
                    initializers[slot].CopyFrom(numpy_helper.from_array(value, name(k, graph_name)))
                continue
            # with an ADC, the drift compensation scales the output after it (as aihwkit)
            scaled = self.draw_scaled_weights(spec, seed, draw, tensors)
            for graph_name, (value, _) in scaled.items():
                slot = template.slots[name(k, graph_name)]
                stored = scale_weight(value, template.weight_gain.get(graph_name, 1.0))
                initializers[slot].CopyFrom(numpy_helper.from_array(stored, name(k, graph_name)))
            for tensor in self.prepared.analog:
                value, scale = scaled[tensor.graph_name]
                scale_name = name(k, adc_scale_name(tensor.node))
                initializers[template.slots[scale_name]].CopyFrom(
                    numpy_helper.from_array(np.asarray(scale, dtype=value.dtype), scale_name)
                )
        session = self._session(template.model.SerializeToString(), template.kernels)
        outputs = [name(k, self.prepared.output_name) for k in range(len(draws))]
        # each noise input has its layer's dtype (float16 data may feed float32 layers)
        declared = {i.name: i.type.tensor_type.elem_type for i in template.model.graph.input}
        shapes = [self._noise_shape(n, x) for n in noise_inputs]
        size = adc_noise_bank_size(max((math.prod(shape) for shape in shapes), default=1))
        windows = [
            (
                n,
                name(k, n.name),
                self._noise_bank(
                    seed,
                    n.scale,
                    helper.tensor_dtype_to_np_dtype(declared[name(k, n.name)]),
                    size,
                ),
                adc_noise_offset(seed, draw, n.stream, size),
                shape,
            )
            for k, draw in enumerate(draws)
            for n, shape in zip(noise_inputs, shapes, strict=True)
        ]
        results: list[list[np.ndarray]] = [[] for _ in draws]
        first = 0
        for batch in self._batches(x, len(draws)):
            feed: dict[str, np.ndarray] = {self.prepared.input_name: batch}
            for noise, input_name, bank, offset, shape in windows:
                if noise.fused:  # the node reads the window from the bank itself
                    feed[input_name] = bank
                    start = (offset + first * math.prod(shape)) % len(bank)
                    feed[noise_start_name(input_name)] = np.array([start], dtype=np.int64)
                    continue
                feed[input_name] = adc_noise_window(bank, offset, first, len(batch), shape)
            for k, value in enumerate(session.run(outputs, feed)):
                results[k].append(value)
            first += len(batch)
        return [np.concatenate(r) for r in results]


_NOISE_BITS = 16

ADC_NOISE_BANK = 1 << 24
"""ADC output noise values drawn per run (64 MiB in float32; more for layers with more outputs
per sample, :func:`adc_noise_bank_size`): each draw and layer reads its noise as consecutive
stretches of this bank from a random offset (:func:`adc_noise_window`)."""
_BANK_STREAM = 2
"""Third key of the bank's stream ``[seed, 0, 2]`` (weights use 0, ADC offsets 1)."""
_BANKS_KEPT = 3
"""Noise banks a :class:`Simulator` keeps (a sweep over ADC settings needs one per scale)."""


@dataclass(frozen=True)
class SimulatorRecipe:
    """The serialized model and options of a :class:`Simulator` (picklable, for workers)."""

    model: bytes
    """The source ONNX model, serialized (external data inlined)."""
    output: str | None
    fold_affine: bool
    analog_include: str | None
    analog_exclude: str | None
    config: RunnerConfig

    def build(self, *, threads: int | None = None) -> Simulator:
        """The simulator (``threads``: override the onnxruntime threads; results don't change)."""
        config = self.config if threads is None else replace(self.config, threads=threads)
        return Simulator(
            onnx.load_from_string(self.model),
            output=self.output,
            fold_affine=self.fold_affine,
            analog_include=self.analog_include,
            analog_exclude=self.analog_exclude,
            config=config,
        )


@dataclass(frozen=True)
class DrawJob:
    """Accuracies to compute: ``spec`` on ``tensors`` (None = all analog ones) at ``draws``."""

    spec: NoiseSpec
    draws: tuple[int, ...]
    tensors: tuple[int, ...] | None = None


class DrawBackend(abc.ABC):
    """Evaluates Monte-Carlo draws.

    Draw ``d`` depends only on (seed, d, spec, tensors), so every backend returns exactly the
    numbers of :class:`LocalDraws` for the same seed.
    """

    @abc.abstractmethod
    def accuracies(
        self, sim: Simulator, x: np.ndarray, y: np.ndarray, jobs: Sequence[DrawJob], seed: int
    ) -> list[list[float]]:
        """Per-draw accuracies of each job, in the order of its ``draws``."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release what the backend holds."""


class LocalDraws(DrawBackend):
    """All draws in this process, one job after another (the default)."""

    def accuracies(  # noqa: D102
        self, sim: Simulator, x: np.ndarray, y: np.ndarray, jobs: Sequence[DrawJob], seed: int
    ) -> list[list[float]]:
        return [_job_accuracies(sim, x, y, job, seed) for job in jobs]

    def close(self) -> None:  # noqa: D102
        pass


def _job_accuracies(
    sim: Simulator, x: np.ndarray, y: np.ndarray, job: DrawJob, seed: int
) -> list[float]:
    result: list[float] = []
    started = last = time.perf_counter()
    n = len(job.draws)
    for k, (_, outputs) in enumerate(sim.predictions(x, job.spec, job.draws, seed, job.tensors)):
        result.append(sim.accuracy(outputs, y))
        now = time.perf_counter()
        if n > 1 and (now - last > 2.0 or k == n - 1):
            logger.info(
                "%s: draw %d/%d, mean accuracy %.4f (%.1f s)",
                job.spec.text,
                k + 1,
                n,
                float(np.mean(result)),
                now - started,
            )
            last = now
    return result


@functools.cache
def _normal_quantiles() -> np.ndarray:
    """Φ⁻¹((i + 0.5) / 2^16), i = 0 … 2^16 − 1: 65,536 equiprobable standard-normal levels."""
    inv_cdf = statistics.NormalDist().inv_cdf
    levels = 1 << _NOISE_BITS
    return np.array([inv_cdf((i + 0.5) / levels) for i in range(levels)], dtype=np.float64)


def adc_noise_bank_size(largest: int) -> int:
    """The bank size for noise inputs of at most ``largest`` values per sample.

    :data:`ADC_NOISE_BANK`, or the next power of two ≥ ``largest`` when a layer has more outputs
    per sample, so that every element of a sample gets its own value.
    """
    return max(ADC_NOISE_BANK, 1 << max(largest - 1, 0).bit_length())


def adc_noise_bank(
    seed: int, scale: float, dtype: np.dtype, size: int = ADC_NOISE_BANK
) -> np.ndarray:
    """The ``size`` pre-drawn ADC output noise values of a run with ``seed``: N(0, scale²) each.

    Each value is one of 2^16 equiprobable levels of the Gaussian (the outermost at ±4.32 σ),
    picked by 16 random bits of ``default_rng([seed, 0, 2])``'s raw words (a stream no weight
    stream ``[seed, d, 0, i]`` or offset stream ``[seed, d, 1, …]`` can coincide with); the
    values are independent, and a larger bank extends a smaller one. Read-only;
    :func:`adc_noise_window` reads a draw's noise from it.
    """
    table = (_normal_quantiles() * scale).astype(dtype)
    raw = np.random.default_rng([seed, 0, _BANK_STREAM]).bit_generator.random_raw(-(-size // 4))
    bank = np.take(table, np.asarray(raw).view(np.uint16)[:size])
    bank.flags.writeable = False
    return bank


def adc_noise_offset(seed: int, draw: int, stream: tuple[int, ...], bank_size: int) -> int:
    """Where in a bank of ``bank_size`` values the noise input with ``stream`` starts in ``draw``.

    Uniform over the bank, from ``default_rng([seed, draw, 1, *stream])``.
    """
    return int(np.random.default_rng([seed, draw, _ADC_STREAM, *stream]).integers(bank_size))


def adc_noise_window(
    bank: np.ndarray, offset: int, first: int, samples: int, shape: tuple[int, ...]
) -> np.ndarray:
    """The noise of samples ``first`` … ``first + samples − 1``, shaped ``(samples, *shape)``.

    Sample i reads the ``prod(shape)`` consecutive values from (offset + i · prod(shape)) mod
    len(bank), so its noise does not depend on the batching; consecutive samples read
    consecutive stretches. A view of ``bank`` (no copy) unless the window wraps around its end.
    """
    size = math.prod(shape)
    total = len(bank)
    start = (offset + first * size) % total
    stop = start + samples * size
    if stop <= total:
        flat = bank[start:stop]
    else:  # the tail, whole laps of the bank, the head
        laps, head = divmod(stop - total, total)
        flat = np.concatenate([bank[start:], *([bank] * laps), bank[:head]])
    return flat.reshape(samples, *shape)


def predicted_classes(outputs: np.ndarray, name: str = "output", listing: str = "") -> np.ndarray:
    """Class ids (N,) read from one model output.

    Integer (N,) or (N, 1): class ids, compared as they are. Float (N, C) with C >= 2 (trailing
    size-1 dims allowed, as in (N, C, 1, 1)): class scores or probabilities, argmax. Anything else
    is refused: a float (N,) or (N, 1) is a regression value or a binary score (no class without a
    threshold), and (N, C, H, W) is not one score per class.

    Raises:
        NoiseInjectionError: the output is none of these (one line naming it and ``listing``).
    """
    shape = outputs.shape
    per_sample = shape[1:]
    if np.issubdtype(outputs.dtype, np.integer) and (
        len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)
    ):
        return outputs.reshape(shape[0])
    if (
        np.issubdtype(outputs.dtype, np.floating)
        and len(shape) >= 2
        and sum(d != 1 for d in per_sample) == 1
        and int(np.prod(per_sample)) >= 2
    ):
        return np.asarray(outputs.reshape(shape[0], -1).argmax(axis=1))
    dims = ", ".join(["N", *(str(d) for d in per_sample)])
    if np.issubdtype(outputs.dtype, np.floating) and int(np.prod(per_sample, dtype=np.int64)) == 1:
        why = "one float per sample is a regression value or a binary score, not a class"
    else:
        why = "neither class scores/probabilities (N, C) nor class ids (N,)"
    others = f" (outputs: {listing})" if listing else ""
    raise NoiseInjectionError(
        f"output {name!r} is {outputs.dtype} ({dims}{',' if len(shape) == 1 else ''}): {why}; "
        f"choose another with --output NAME{others}"
    )


def accuracy(outputs: np.ndarray, y: np.ndarray, name: str = "output", listing: str = "") -> float:
    """Top-1 accuracy of one model output against integer labels ``y`` (see predicted_classes)."""
    return float(np.mean(predicted_classes(outputs, name, listing) == y))


def _all_accuracies(
    sim: Simulator,
    x: np.ndarray,
    y: np.ndarray,
    runs: Sequence[tuple[NoiseSpec, Sequence[int] | None]],
    *,
    draws: int,
    seed: int,
    clean: float,
    backend: DrawBackend | None,
) -> list[list[float]]:
    """Per-draw accuracies of each ``(spec, tensors)`` run.

    The random draws of all runs go to ``backend`` at once, so a Ray backend spreads sweep
    points and layers as well as draws.
    """
    if draws < 1:
        raise NoiseInjectionError(f"draws must be >= 1, got {draws}")
    jobs: list[DrawJob] = []
    for spec, tensors in runs:
        if spec.is_clean:
            continue
        # deterministic (quantisation only): every draw is the same, so run draw 0 only
        chosen = tuple(range(draws)) if spec.is_random else (0,)
        jobs.append(DrawJob(spec, chosen, None if tensors is None else tuple(tensors)))
    done = iter((backend or LocalDraws()).accuracies(sim, x, y, jobs, seed))
    out: list[list[float]] = []
    for spec, _ in runs:
        if spec.is_clean:
            out.append([clean] * draws)
            continue
        values = next(done)
        out.append(values if spec.is_random else values * draws)
    return out


def _as_spec(noise: str | NoiseSpec) -> NoiseSpec:
    return parse_noise_spec(noise) if isinstance(noise, str) else noise


def _prepare(  # noqa: PLR0917  # the shared keyword set of the three entry points, in order
    model_path: str | Path,
    x: np.ndarray,
    y: np.ndarray,
    output: str | None,
    analog_include: str | None,
    analog_exclude: str | None,
    fold_affine: bool,
    config: RunnerConfig | None,
) -> tuple[Simulator, float]:
    """Build the simulator, check the data against the model, and measure clean accuracy."""
    sim = Simulator(
        model_path,
        output=output,
        fold_affine=fold_affine,
        analog_include=analog_include,
        analog_exclude=analog_exclude,
        config=config,
    )
    sim.check_data(x, y)
    clean = sim.accuracy(sim.clean_outputs(x), y)
    logger.info("clean accuracy %.4f on %d samples", clean, x.shape[0])
    return sim, clean


def simulate(  # noqa: PLR0917  # the demo calls simulate(model, x, y, spec, draws, seed)
    model_path: str | Path,
    x: np.ndarray,
    y: np.ndarray,
    noise_spec: str | NoiseSpec,
    draws: int = 10,
    seed: int = 0,
    *,
    output: str | None = None,
    analog_include: str | None = None,
    analog_exclude: str | None = None,
    fold_affine: bool = True,
    config: RunnerConfig | None = None,
    backend: DrawBackend | None = None,
) -> SimulationReport:
    """Accuracy of ``model_path`` on ``(x, y)`` under ``noise_spec`` over Monte-Carlo draws.

    Args:
        model_path: ONNX model file.
        x: inputs in the model's layout and scale, samples on axis 0.
        y: integer labels, one per sample.
        noise_spec: spec text (``"pcm:t=3600+adc:bits=8"``, ``"none"``) or a parsed spec.
        draws: number of draws.
        seed: base seed; draw d is reproducible from (seed, d).
        output: model output holding class scores, probabilities or class ids (default: chosen
            by :func:`device_sim.graph.select_output`, refused when ambiguous).
        analog_include: regex; only matching initializer names are analog.
        analog_exclude: regex; matching initializer names are not analog.
        fold_affine: fold BatchNormalization/Mul following an analog layer into its weights.
        config: batch size, draws per session and threads.
        backend: where the draws run (default :class:`LocalDraws`); any backend gives the same
            numbers.

    Returns:
        The report (``to_json_dict()`` for JSON).

    Raises:
        NoiseInjectionError: bad spec, model or data (one-line message).
    """
    started = time.perf_counter()
    spec = _as_spec(noise_spec)
    sim, clean = _prepare(
        model_path, x, y, output, analog_include, analog_exclude, fold_affine, config
    )
    (per_draw,) = _all_accuracies(
        sim, x, y, [(spec, None)], draws=draws, seed=seed, clean=clean, backend=backend
    )
    return _report(
        sim,
        spec,
        seed=seed,
        x=x,
        clean=clean,
        per_draw=per_draw,
        seconds=time.perf_counter() - started,
    )


def _report(
    sim: Simulator,
    spec: NoiseSpec,
    *,
    seed: int,
    x: np.ndarray,
    clean: float,
    per_draw: list[float],
    seconds: float,
    tensors: Sequence[int] | None = None,
) -> SimulationReport:
    analog = sim.prepared.analog
    chosen = analog if tensors is None else tuple(analog[i] for i in tensors)
    return SimulationReport(
        model=sim.name,
        noise=spec.text,
        draws=len(per_draw),
        seed=seed,
        samples=int(x.shape[0]),
        clean_accuracy=clean,
        per_draw=tuple(per_draw),
        analog_tensors=tuple(t.name for t in chosen),
        folded_layers=sim.prepared.folded_layers,
        seconds=seconds,
    )


def simulate_sweep(  # noqa: PLR0917  # the demo calls simulate_sweep(model, x, y, spec, draws, seed)
    model_path: str | Path,
    x: np.ndarray,
    y: np.ndarray,
    sweep: str,
    draws: int = 10,
    seed: int = 0,
    *,
    output: str | None = None,
    analog_include: str | None = None,
    analog_exclude: str | None = None,
    fold_affine: bool = True,
    config: RunnerConfig | None = None,
    backend: DrawBackend | None = None,
) -> SweepReport:
    """Run :func:`simulate` at each level of ``sweep`` (e.g. ``"awgn:snr_db=0,10,20"``).

    The clean baseline is computed once; each level reuses the draws' seeds.
    """
    parameter, levels = parse_sweep(sweep)
    sim, clean = _prepare(
        model_path, x, y, output, analog_include, analog_exclude, fold_affine, config
    )
    started = time.perf_counter()
    per_level = _all_accuracies(
        sim,
        x,
        y,
        [(level.spec, None) for level in levels],
        draws=draws,
        seed=seed,
        clean=clean,
        backend=backend,
    )
    seconds = (time.perf_counter() - started) / len(levels)  # levels run together
    reports = [
        _report(sim, level.spec, seed=seed, x=x, clean=clean, per_draw=per_draw, seconds=seconds)
        for level, per_draw in zip(levels, per_level, strict=True)
    ]
    return SweepReport(
        model=sim.name,
        parameter=parameter,
        values=tuple(level.value for level in levels),
        levels=tuple(reports),
    )


def simulate_per_layer(  # noqa: PLR0917  # the demo calls simulate_per_layer(model, x, y, spec, draws, seed)
    model_path: str | Path,
    x: np.ndarray,
    y: np.ndarray,
    noise_spec: str | NoiseSpec,
    draws: int = 10,
    seed: int = 0,
    *,
    output: str | None = None,
    analog_include: str | None = None,
    analog_exclude: str | None = None,
    fold_affine: bool = True,
    config: RunnerConfig | None = None,
    backend: DrawBackend | None = None,
) -> PerLayerReport:
    """Put the weight noise of ``noise_spec`` on one analog tensor at a time.

    Raises:
        NoiseInjectionError: as :func:`simulate`, or when the spec has DAC/ADC terms (they act on
            every layer, not on one tensor).
    """
    spec = _as_spec(noise_spec)
    if spec.dac is not None or spec.adc is not None:
        raise NoiseInjectionError(
            f"--per-layer takes weight noise only; remove the dac/adc terms from {spec.text!r}"
        )
    sim, clean = _prepare(
        model_path, x, y, output, analog_include, analog_exclude, fold_affine, config
    )
    analog = sim.prepared.analog
    started = time.perf_counter()
    per_layer = _all_accuracies(
        sim,
        x,
        y,
        [(spec, [i]) for i in range(len(analog))],
        draws=draws,
        seed=seed,
        clean=clean,
        backend=backend,
    )
    seconds = (time.perf_counter() - started) / max(1, len(analog))  # layers run together
    layers = [
        LayerResult(
            name=tensor.name,
            report=_report(
                sim,
                spec,
                seed=seed,
                x=x,
                clean=clean,
                per_draw=per_draw,
                seconds=seconds,
                tensors=[i],
            ),
        )
        for i, (tensor, per_draw) in enumerate(zip(analog, per_layer, strict=True))
    ]
    return PerLayerReport(
        model=sim.name, noise=spec.text, clean_accuracy=clean, layers=tuple(layers)
    )
