"""Analog non-ideality models and the noise-spec language.

Weight models implement :class:`NoiseModel` (``apply(weights, rng, channel_axis)``); the
input/output models :class:`DacConfig` and :class:`AdcConfig` are applied by rewriting the graph
(:func:`device_sim.graph.add_io_quantization`). A spec string such as ``pcm:t=3600+adc:bits=8``
parses into one :class:`NoiseSpec`; ``--sweep`` strings (one parameter with several
comma-separated values) parse into a list of them. Every formula and its source is in
``docs/noise-models.md``.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from common.errors import NoiseInjectionError

FloatArray = np.ndarray


def _reduce_axes(ndim: int, channel_axis: int | None) -> tuple[int, ...]:
    """Axes to reduce for per-channel statistics (all but ``channel_axis``)."""
    if channel_axis is None:
        return tuple(range(ndim))
    return tuple(a for a in range(ndim) if a != channel_axis % ndim)


def _abs_max(weights: FloatArray, per: str, channel_axis: int | None) -> FloatArray:
    """max|W| per tensor (a 0-d array) or per output channel (broadcastable to ``weights``)."""
    if per == "channel" and channel_axis is not None and weights.ndim > 0:
        axes = _reduce_axes(weights.ndim, channel_axis)
        return np.asarray(np.max(np.abs(weights), axis=axes, keepdims=True))
    return np.asarray(np.max(np.abs(weights)) if weights.size else 0.0)


class NoiseModel(ABC):
    """A non-ideality of the weights an analog array stores.

    Subclasses are frozen dataclasses; ``apply`` never mutates its input and draws all randomness
    from ``rng``, so a draw is reproducible from the generator's seed.
    """

    kind: ClassVar[str]

    @abstractmethod
    def apply(
        self, weights: FloatArray, rng: np.random.Generator, channel_axis: int | None = None
    ) -> FloatArray:
        """Return a perturbed copy of ``weights``.

        Args:
            weights: the clean weights of one analog layer, as the layer consumes them.
            rng: source of all randomness.
            channel_axis: axis of ``weights`` indexing the layer's output channels (rows of the
                crossbar), or None when the tensor has none.

        Returns:
            An array of the same shape and dtype.
        """

    def apply_scaled(
        self, weights: FloatArray, rng: np.random.Generator, channel_axis: int | None = None
    ) -> tuple[FloatArray, float]:
        """:meth:`apply` split into the array's weights and a digital output scale.

        ``apply`` equals ``weights · scale``. Models with a digital correction applied after the
        ADC (the PCM drift compensation) return the uncompensated weights and the factor; the
        others return ``(apply(...), 1.0)``. Same draws as :meth:`apply`.
        """
        return self.apply(weights, rng, channel_axis), 1.0


def _gaussian_like(weights: FloatArray, rng: np.random.Generator) -> FloatArray:
    return np.asarray(rng.standard_normal(weights.shape))


@dataclass(frozen=True)
class AwgnNoise(NoiseModel):
    """Additive white Gaussian noise at a given SNR per layer (Fagbohungbe–Qian)."""

    kind: ClassVar[str] = "awgn"
    snr_db: float
    """Signal-to-noise ratio of the layer's weights in dB: σ_n = σ_W / sqrt(10^(snr_db/10))."""

    def apply(
        self, weights: FloatArray, rng: np.random.Generator, channel_axis: int | None = None
    ) -> FloatArray:
        """W + N(0, σ_n²), σ_n = std(W) / sqrt(10^(snr_db/10))."""
        sigma = float(np.std(weights)) / math.sqrt(10.0 ** (self.snr_db / 10.0))
        return (weights + sigma * _gaussian_like(weights, rng)).astype(weights.dtype)


@dataclass(frozen=True)
class GaussianNoise(NoiseModel):
    """Additive Gaussian noise relative to max|W| (aihwkit / Analog Foundation Models style)."""

    kind: ClassVar[str] = "gaussian"
    std: float
    """Noise std as a fraction of max|W| (dimensionless)."""
    per: str = "tensor"
    """Where max|W| is taken: ``tensor`` or ``channel`` (each output channel, a crossbar row)."""

    def apply(
        self, weights: FloatArray, rng: np.random.Generator, channel_axis: int | None = None
    ) -> FloatArray:
        """W + σ ξ with σ = std · max|W| (per tensor or per output channel)."""
        sigma = self.std * _abs_max(weights, self.per, channel_axis)
        return np.asarray(weights + sigma * _gaussian_like(weights, rng)).astype(weights.dtype)


@dataclass(frozen=True)
class MultiplicativeNoise(NoiseModel):
    """Multiplicative Gaussian noise: W ⊙ (1 + std · ξ)."""

    kind: ClassVar[str] = "multiplicative"
    std: float
    """Relative std of each weight (dimensionless)."""

    def apply(
        self, weights: FloatArray, rng: np.random.Generator, channel_axis: int | None = None
    ) -> FloatArray:
        """W ⊙ (1 + std · ξ)."""
        return (weights * (1.0 + self.std * _gaussian_like(weights, rng))).astype(weights.dtype)


@dataclass(frozen=True)
class QuantNoise(NoiseModel):
    """Symmetric uniform weight quantisation (deterministic)."""

    kind: ClassVar[str] = "quant"
    bits: int
    """Bits per weight including sign: 2^(bits-1) − 1 levels each side of zero."""
    per: str = "tensor"
    """Where the range max|W| is taken: ``tensor`` or ``channel``."""

    def apply(
        self, weights: FloatArray, rng: np.random.Generator, channel_axis: int | None = None
    ) -> FloatArray:
        """round(W / Δ) · Δ with Δ = max|W| / (2^(bits−1) − 1)."""
        levels = 2 ** (self.bits - 1) - 1
        step = _abs_max(weights, self.per, channel_axis) / levels
        safe = np.where(step > 0, step, 1.0)
        return (np.round(weights / safe) * safe).astype(weights.dtype)


@dataclass(frozen=True)
class StuckNoise(NoiseModel):
    """Stuck-at devices: each weight is stuck with probability p."""

    kind: ClassVar[str] = "stuck"
    p: float
    """Probability that a weight's device is stuck (0..1)."""
    at: str = "zero"
    """Where a stuck weight sits: ``zero`` (device off) or ``max`` (±max|W|, random sign)."""

    def apply(
        self, weights: FloatArray, rng: np.random.Generator, channel_axis: int | None = None
    ) -> FloatArray:
        """Replace a Bernoulli(p) subset of the weights by 0 or by ±max|W|."""
        stuck = rng.random(weights.shape) < self.p
        if self.at == "zero":
            value = np.zeros_like(weights)
        else:
            sign = np.where(rng.random(weights.shape) < 0.5, -1.0, 1.0)
            value = sign * _abs_max(weights, "tensor", None)
        return np.where(stuck, value, weights).astype(weights.dtype)


@dataclass(frozen=True)
class PcmNoise(NoiseModel):
    """aihwkit's PCM-like statistical inference model (``PCMLikeNoiseModel`` defaults).

    Differential pair per weight up to g_max, programming noise, conductance-dependent drift, 1/f
    read noise and optional global drift compensation. As in aihwkit's programme-then-drift flow
    (``drift_weights(t)`` -> ``apply_drift_noise_to_conductance``), ``t = 0`` has no drift
    (t_total = t_0) but does have read noise (accumulated over t_0) and the compensation factor.
    """

    kind: ClassVar[str] = "pcm"
    t: float
    """Inference time after programming, seconds (t_inference)."""
    compensate: bool = True
    """Apply global drift compensation (aihwkit's ``GlobalDriftCompensation``)."""
    g_max: float = 25.0
    """Maximum conductance of one device, µS."""
    t0: float = 20.0
    """Drift reference time t_0, seconds."""
    t_read: float = 250e-9
    """Read duration for the 1/f noise, seconds."""
    prog_coeff: tuple[float, float, float] = (0.26348, 1.9650, -1.1731)
    """Programming-noise polynomial (c0, c1, c2) in µS, for g_max = 25 µS."""

    def programming_sigma(self, g_target: FloatArray) -> FloatArray:
        """σ_prog(g_T) = (c0 + c1·g_T/g_max + c2·(g_T/g_max)²) · g_max/25, µS."""
        c0, c1, c2 = self.prog_coeff
        g_rel = g_target / self.g_max
        return np.asarray((c0 + c1 * g_rel + c2 * g_rel**2) * (self.g_max / 25.0))

    def drift_moments(self, g_target: FloatArray) -> tuple[FloatArray, FloatArray]:
        """(μ_ν, σ_ν) of the drift exponent for target conductances ``g_target``."""
        g_rel = np.maximum(np.abs(g_target) / self.g_max, 1e-7)
        mu = np.clip(-0.0155 * np.log(g_rel) + 0.0244, 0.049, 0.1)
        sigma = np.clip(-0.0125 * np.log(g_rel) - 0.0059, 0.008, 0.045)
        return np.asarray(mu), np.asarray(sigma)

    def read_sigma(self, g_prog: FloatArray) -> FloatArray:
        """Relative 1/f read-noise std at time t for programmed conductances ``g_prog``."""
        q = np.minimum(0.0088 / np.maximum((np.abs(g_prog) / self.g_max) ** 0.65, 1e-3), 0.2)
        t_total = self.t + self.t0
        return np.asarray(q * math.sqrt(math.log((t_total + self.t_read) / (2.0 * self.t_read))))

    def _device(
        self, g_target: FloatArray, rng: np.random.Generator
    ) -> tuple[FloatArray, FloatArray]:
        """One device array: (conductance right after programming, conductance at time t)."""
        g_prog = np.maximum(
            g_target + self.programming_sigma(g_target) * rng.standard_normal(g_target.shape), 0.0
        )
        # t = 0 (t_total = t_0): drift factor 1, read noise accumulated over t_0 (as aihwkit)
        mu, sigma = self.drift_moments(g_target)
        nu = np.abs(mu + sigma * rng.standard_normal(g_target.shape))
        t_total = self.t + self.t0
        g_drift = g_prog * (t_total / self.t0) ** (-nu)
        read = self.read_sigma(g_prog) * rng.standard_normal(g_target.shape)
        return g_prog, np.maximum(g_drift + np.abs(g_drift) * read, 0.0)

    def apply(
        self, weights: FloatArray, rng: np.random.Generator, channel_axis: int | None = None
    ) -> FloatArray:
        """Map W to a differential pair, perturb both devices, map back (and compensate drift)."""
        w_now, factor = self._draw(weights, rng)
        return np.asarray(w_now * factor).astype(weights.dtype)

    def apply_scaled(
        self, weights: FloatArray, rng: np.random.Generator, channel_axis: int | None = None
    ) -> tuple[FloatArray, float]:
        """The drifted (uncompensated) weights and the global drift compensation factor."""
        w_now, factor = self._draw(weights, rng)
        return np.asarray(w_now).astype(weights.dtype), factor

    def _draw(self, weights: FloatArray, rng: np.random.Generator) -> tuple[FloatArray, float]:
        """(weights at time t in float64, compensation factor or 1)."""
        w_max = float(np.max(np.abs(weights))) if weights.size else 0.0
        if w_max == 0.0:
            return weights.astype(np.float64), 1.0
        w = weights.astype(np.float64)
        scale = self.g_max / w_max
        g_plus_t = np.clip(w * scale, 0.0, self.g_max)
        g_minus_t = np.clip(-w * scale, 0.0, self.g_max)
        plus_prog, plus_now = self._device(g_plus_t, rng)
        minus_prog, minus_now = self._device(g_minus_t, rng)
        w_now = (plus_now - minus_now) / scale
        if not self.compensate:
            return w_now, 1.0
        return w_now, _readout((plus_prog - minus_prog) / scale) / _readout(w_now)


def _readout(weights: FloatArray) -> float:
    """The global drift readout of aihwkit: the layer read with the identity (one input each).

    The outputs for the one-hot inputs are the weights themselves, so the summed |output| is
    Σ|w| over the whole tensor (aihwkit takes the mean, the same ratio). Floored like aihwkit's
    ``clamp(min=0.0001)`` on the mean.
    """
    return max(float(np.sum(np.abs(weights), dtype=np.float64)), 1e-4 * weights.size)


@dataclass(frozen=True)
class DacConfig:
    """Input quantisation of every analog layer (a DAC per crossbar row input)."""

    bits: int
    """DAC resolution: 2^bits − 2 steps over [−1, 1] after per-vector abs-max scaling."""


@dataclass(frozen=True)
class AdcConfig:
    """Output noise, clipping and quantisation of every analog layer (the column ADCs)."""

    bits: int
    """ADC resolution: 2^bits − 2 steps over [−bound, bound] in normalised output units."""
    noise: float = 0.0
    """Std of additive Gaussian output noise, in normalised output units (aihwkit uses 0.06)."""
    bound: float = 12.0
    """Output clipping bound in normalised units (input range 1 · max|W| = 1)."""
    bm: str = "clip"
    """Output bound management: ``clip`` (one pass, saturated outputs clipped to ±bound) or
    ``iterative`` (aihwkit's default: a saturated input vector is re-run with its input halved,
    up to :attr:`bm_passes` passes; ``docs/noise-models.md``)."""

    def bm_passes(self, dac_bits: int | None) -> int:
        """Passes of ``bm=iterative`` (1 for ``clip``): aihwkit's limit on the reduction 2^k.

        aihwkit stops after the pass with reduction 2^k once 2^k > ``max_bm_factor`` (1000) or
        2^k > ``max_bm_res`` / (2 · ``inp_res``) (0.25 · (2^bits − 2) / 2 for a ``bits``-bit DAC;
        without a DAC term, aihwkit's default 7-bit DAC), so passes k = 0 … K with K the smallest
        k where 2^k exceeds the smaller limit: K = 4 for 7 bits, 5 for 8 bits, at most 10.
        """
        if self.bm != "iterative":
            return 1
        bits = _AIHWKIT_DAC_BITS if dac_bits is None else dac_bits
        limit = min(_MAX_BM_FACTOR, _MAX_BM_RES * (2**bits - 2) / 2)
        passes = 1
        while 2 ** (passes - 1) <= limit:
            passes += 1
        return passes


_AIHWKIT_DAC_BITS = 7
"""aihwkit's default DAC (``IOParameters.inp_res = 1 / (2^7 − 2)``), used for ``bm=iterative``'s
pass limit when the spec has no ``dac`` term."""
_MAX_BM_FACTOR = 1000.0
"""aihwkit's ``IOParameters.max_bm_factor``."""
_MAX_BM_RES = 0.25
"""aihwkit's ``IOParameters.max_bm_res``."""


@dataclass(frozen=True)
class NoiseSpec:
    """A composed noise specification: weight models applied in order, then IO models."""

    text: str
    """The spec as written (``none`` for the clean run)."""
    weight_models: tuple[NoiseModel, ...] = ()
    """Weight models, applied left to right."""
    dac: DacConfig | None = None
    """Input quantisation, or None."""
    adc: AdcConfig | None = None
    """Output noise/quantisation, or None."""

    @property
    def is_clean(self) -> bool:
        """True when the spec perturbs nothing."""
        return not self.weight_models and self.dac is None and self.adc is None

    @property
    def is_random(self) -> bool:
        """True when draws differ from each other."""
        return any(not isinstance(m, QuantNoise) for m in self.weight_models) or bool(
            self.adc is not None and self.adc.noise > 0
        )

    def perturb(
        self, weights: FloatArray, rng: np.random.Generator, channel_axis: int | None
    ) -> FloatArray:
        """Apply every weight model in order."""
        out = weights
        for model in self.weight_models:
            out = model.apply(out, rng, channel_axis)
        return out

    def perturb_scaled(
        self, weights: FloatArray, rng: np.random.Generator, channel_axis: int | None
    ) -> tuple[FloatArray, float]:
        """:meth:`perturb` with the digital output scale kept apart (applied after the ADC).

        Returns the array's weights and the product of the models' scales (drift compensation).
        Every weight model is scale-equivariant (model(a·W) = a·model(W) for a > 0, same draws),
        so deferring the scale past later models gives the draw of :meth:`perturb` as
        ``weights · scale``.
        """
        out, total = weights, 1.0
        for model in self.weight_models:
            out, scale = model.apply_scaled(out, rng, channel_axis)
            total *= scale
        return out, total


@dataclass(frozen=True)
class SweepLevel:
    """One level of a sweep: the swept value and the full spec at that value."""

    value: float
    """The swept parameter's value."""
    spec: NoiseSpec
    """The spec evaluated at this level."""


@dataclass(frozen=True)
class _Param:
    parse: Callable[[str, str], object]
    default: object = None
    required: bool = False


def _number(kind: str, key: str, minimum: float = -math.inf, maximum: float = math.inf) -> _Param:
    def parse(value: str, where: str) -> object:
        try:
            number = float(value)
        except ValueError:
            raise NoiseInjectionError(
                f"{where}: {kind}.{key} must be a number, got {value!r}"
            ) from None
        if not (minimum <= number <= maximum) or math.isnan(number):
            raise NoiseInjectionError(
                f"{where}: {kind}.{key} must be in [{minimum:g}, {maximum:g}], got {value}"
            )
        return number

    return _Param(parse, required=True)


def _integer(kind: str, key: str, minimum: int, maximum: int) -> _Param:
    def parse(value: str, where: str) -> object:
        try:
            number = int(value)
        except ValueError:
            raise NoiseInjectionError(
                f"{where}: {kind}.{key} must be an integer, got {value!r}"
            ) from None
        if not minimum <= number <= maximum:
            raise NoiseInjectionError(
                f"{where}: {kind}.{key} must be in [{minimum}, {maximum}], got {number}"
            )
        return number

    return _Param(parse, required=True)


def _choice(kind: str, key: str, options: tuple[str, ...], default: str) -> _Param:
    def parse(value: str, where: str) -> object:
        if value not in options:
            raise NoiseInjectionError(
                f"{where}: {kind}.{key} must be one of {', '.join(options)}; got {value!r}"
            )
        return value

    return _Param(parse, default=default)


def _boolean(kind: str, key: str, default: bool) -> _Param:
    def parse(value: str, where: str) -> object:
        lowered = value.lower()
        if lowered in {"true", "1", "yes", "on"}:
            return True
        if lowered in {"false", "0", "no", "off"}:
            return False
        raise NoiseInjectionError(f"{where}: {kind}.{key} must be true or false, got {value!r}")

    return _Param(parse, default=default)


def _optional(param: _Param, default: object) -> _Param:
    return _Param(param.parse, default=default)


_PARAMS: dict[str, dict[str, _Param]] = {
    "awgn": {"snr_db": _number("awgn", "snr_db")},
    "gaussian": {
        "std": _number("gaussian", "std", 0.0),
        "per": _choice("gaussian", "per", ("tensor", "channel"), "tensor"),
    },
    "multiplicative": {"std": _number("multiplicative", "std", 0.0)},
    "pcm": {
        "t": _number("pcm", "t", 0.0),
        "compensate": _boolean("pcm", "compensate", True),
    },
    "quant": {
        "bits": _integer("quant", "bits", 2, 32),
        "per": _choice("quant", "per", ("tensor", "channel"), "tensor"),
    },
    "stuck": {
        "p": _number("stuck", "p", 0.0, 1.0),
        "at": _choice("stuck", "at", ("zero", "max"), "zero"),
    },
    "dac": {"bits": _integer("dac", "bits", 2, 24)},
    "adc": {
        "bits": _integer("adc", "bits", 2, 24),
        "noise": _optional(_number("adc", "noise", 0.0), 0.0),
        "bound": _optional(_number("adc", "bound", 1e-6), 12.0),
        "bm": _choice("adc", "bm", ("clip", "iterative"), "clip"),
    },
}

_WEIGHT_MODELS: Mapping[str, type[NoiseModel]] = {
    cls.kind: cls
    for cls in (AwgnNoise, GaussianNoise, MultiplicativeNoise, PcmNoise, QuantNoise, StuckNoise)
}

NOISE_KINDS: tuple[str, ...] = tuple(sorted(_PARAMS))
"""Every noise kind the spec language knows."""


def _split_params(body: str, kind: str, where: str) -> dict[str, list[str]]:
    """``a=1,2,b=x`` -> {"a": ["1", "2"], "b": ["x"]} (values without ``=`` extend the last key)."""
    params: dict[str, list[str]] = {}
    last: str | None = None
    for token in (t.strip() for t in body.split(",")):
        if not token:
            raise NoiseInjectionError(f"{where}: empty parameter in {kind!r} (stray comma?)")
        if "=" in token:
            key, value = (s.strip() for s in token.split("=", 1))
            if key in params:
                raise NoiseInjectionError(f"{where}: parameter {kind}.{key} given twice")
            params[key] = [value]
            last = key
        elif last is None:
            raise NoiseInjectionError(
                f"{where}: expected key=value in {kind!r}, got {token!r}; "
                f"valid parameters: {', '.join(_PARAMS[kind])}"
            )
        else:
            params[last].append(token)
    return params


def _parse_term(term: str, where: str) -> tuple[str, dict[str, list[str]]]:
    kind, _, body = term.partition(":")
    kind = kind.strip().lower()
    if kind not in _PARAMS:
        raise NoiseInjectionError(
            f"{where}: unknown noise kind {kind!r}; valid kinds: {', '.join(NOISE_KINDS)}, none"
        )
    raw = _split_params(body, kind, where) if body.strip() else {}
    for key in raw:
        if key not in _PARAMS[kind]:
            raise NoiseInjectionError(
                f"{where}: unknown parameter {key!r} for noise kind {kind!r}; "
                f"valid parameters: {', '.join(_PARAMS[kind])}"
            )
    for key, param in _PARAMS[kind].items():
        if param.required and key not in raw:
            raise NoiseInjectionError(
                f"{where}: noise kind {kind!r} needs parameter {key!r} "
                f"(e.g. {kind}:{key}=...); valid parameters: {', '.join(_PARAMS[kind])}"
            )
    return kind, raw


def _build(text: str, terms: list[tuple[str, dict[str, object]]]) -> NoiseSpec:
    models: list[NoiseModel] = []
    dac: DacConfig | None = None
    adc: AdcConfig | None = None
    for kind, values in terms:
        if kind == "dac":
            if dac is not None:
                raise NoiseInjectionError(f"noise spec {text!r}: dac given twice")
            dac = DacConfig(**values)  # type: ignore[arg-type]
        elif kind == "adc":
            if adc is not None:
                raise NoiseInjectionError(f"noise spec {text!r}: adc given twice")
            adc = AdcConfig(**values)  # type: ignore[arg-type]
        else:
            models.append(_WEIGHT_MODELS[kind](**values))
    return NoiseSpec(text=text, weight_models=tuple(models), dac=dac, adc=adc)


_MODEL_JOIN = re.compile(r"(?<![0-9.][eE])\+")


def _terms(text: str) -> list[str]:
    stripped = text.strip()
    if not stripped:
        raise NoiseInjectionError(
            f"noise spec is empty; valid kinds: {', '.join(NOISE_KINDS)}, none"
        )
    # "+" joins models, except inside a number's exponent (t=3.15e+07)
    return [t.strip() for t in _MODEL_JOIN.split(stripped)]


def _values(kind: str, raw: dict[str, list[str]], where: str) -> dict[str, object]:
    params = _PARAMS[kind]
    values = {key: p.default for key, p in params.items() if not p.required}
    for key, texts in raw.items():
        values[key] = params[key].parse(texts[0], where)
    return values


def parse_noise_spec(text: str) -> NoiseSpec:
    """Parse ``kind:key=value,...[+kind:...]`` (or ``none``) into a :class:`NoiseSpec`.

    Raises:
        NoiseInjectionError: unknown kind or parameter (the message lists the valid ones), a missing
            or malformed value, or a list of values (that needs ``--sweep``).
    """
    where = f"noise spec {text!r}"
    if text.strip().lower() == "none":
        return NoiseSpec(text="none")
    terms: list[tuple[str, dict[str, object]]] = []
    for term in _terms(text):
        kind, raw = _parse_term(term, where)
        for key, texts in raw.items():
            if len(texts) > 1:
                raise NoiseInjectionError(
                    f"{where}: {kind}.{key} has {len(texts)} values; use --sweep for a list"
                )
        terms.append((kind, _values(kind, raw, where)))
    return _build(text.strip(), terms)


def parse_sweep(text: str) -> tuple[str, list[SweepLevel]]:
    """Parse a sweep such as ``awgn:snr_db=0,5,10+adc:bits=8``: exactly one parameter has a list.

    Returns:
        The swept parameter as ``kind.key`` and one :class:`SweepLevel` per value, in order.

    Raises:
        NoiseInjectionError: as :func:`parse_noise_spec`, or when no or several parameters have
            lists, or the swept parameter is not numeric.
    """
    where = f"sweep {text!r}"
    parsed = [_parse_term(term, where) for term in _terms(text)]
    swept = [(i, key) for i, (_, raw) in enumerate(parsed) for key, v in raw.items() if len(v) > 1]
    if len(swept) != 1:
        raise NoiseInjectionError(
            f"{where}: exactly one parameter must list several values (e.g. awgn:snr_db=0,10,20); "
            f"found {len(swept)}"
        )
    index, key = swept[0]
    kind = parsed[index][0]
    levels: list[SweepLevel] = []
    for value_text in parsed[index][1][key]:
        terms: list[tuple[str, dict[str, object]]] = []
        pieces: list[str] = []
        for i, (term_kind, raw) in enumerate(parsed):
            level_raw = {
                k: ([value_text] if i == index and k == key else v) for k, v in raw.items()
            }
            values = _values(term_kind, level_raw, where)
            terms.append((term_kind, values))
            body = ",".join(f"{k}={v[0]}" for k, v in level_raw.items())
            pieces.append(f"{term_kind}:{body}" if body else term_kind)
        value = terms[index][1][key]
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise NoiseInjectionError(f"{where}: swept parameter {kind}.{key} must be numeric")
        levels.append(SweepLevel(value=float(value), spec=_build("+".join(pieces), terms)))
    return f"{kind}.{key}", levels
