"""Resistive devices for analog in-memory training: response functions and the device-spec language.

A weight stored on a resistive element moves by pulses. One pulse up changes it by
``dw · q₊(w) · (1 + asym)``, one pulse down by ``−dw · q₋(w) · (1 − asym)``: the *response
functions* ``q₊``, ``q₋`` say how the step depends on the weight itself (Wu, Xiao, Gokmen,
Fagbohungbe, Chen 2025; aihwkit's pulsed devices). Kinds (``w`` in device units, bounds
``lo < 0 < hi`` of each device):

* ``softbounds``: ``q₊ = 1 − w/hi``, ``q₋ = 1 − w/lo`` (with ``hi = −lo = τ``:
  ``q₊ = 1 − w/τ``, ``q₋ = 1 + w/τ``, the form of ``../shared/REFERENCES.md``);
* ``linearstep``: ``q₊ = 1 − slope·w/hi``, ``q₋ = 1 − slope·w/lo`` (default ``asym=0.05``, so
  up and down steps differ);
* ``expstep``: ``z = (2w − hi − lo)/(hi − lo)``, ``q₊ = max(0, 1 − a·e^(γz))``,
  ``q₋ = max(0, 1 − a·e^(−γz))``;
* ``powstep``: ``q₊ = (2(hi − w)/(hi − lo))^γ``, ``q₋ = (2(w − lo)/(hi − lo))^γ``.

Every step is clipped at zero and the weight at the device's bounds. A spec is
``kind[:key=value,key=value]`` (``softbounds`` alone is valid; :data:`DEVICE_KEYS` lists the keys
and ``docs/analog-training.md`` the defaults). :class:`AnalogArray` holds one tensor of devices
(with its device-to-device draws) and applies a desired change ``Δ`` as pulses:

* ``mode=pulsed`` (default): ``n = ⌊|Δ|/dw_min + u⌋`` pulses, ``u ~ U(0, 1)`` (stochastic
  rounding, so ``E[n·dw_min] = |Δ|``), at most ``bl`` per update, applied one after the other
  with the step re-evaluated at the moving weight and cycle-to-cycle noise on each pulse;
* ``mode=expected``: the expected change ``Δ · q(w) · (dw/dw_min)`` in one step (no
  quantisation), with Gaussian cycle-to-cycle noise of the variance that ``|Δ|/dw_min`` pulses
  would carry.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, replace
from enum import StrEnum

import numpy as np
import torch

from common.errors import ConfigError


class ResponseKind(StrEnum):
    """Shape of the response functions q₊, q₋."""

    SOFTBOUNDS = "softbounds"
    LINEARSTEP = "linearstep"
    EXPSTEP = "expstep"
    POWSTEP = "powstep"


class UpdateMode(StrEnum):
    """How a desired change becomes a device change."""

    PULSED = "pulsed"
    """Stochastically rounded pulse trains of at most ``bl`` pulses."""
    EXPECTED = "expected"
    """The expected change of those pulses, in one step."""


@dataclass(frozen=True)
class DeviceConfig:
    """One resistive device model (nominal values; per-device draws in :class:`AnalogArray`)."""

    kind: ResponseKind = ResponseKind.SOFTBOUNDS
    """Response-function shape."""
    states: float = 1200.0
    """Number of pulse steps between ``w_min`` and ``w_max``: dw_min = (w_max − w_min) / states."""
    w_max: float = 1.0
    """Upper bound of the weight (device units, > 0)."""
    w_min: float = -1.0
    """Lower bound of the weight (device units, < 0)."""
    asym: float = 0.0
    """Up/down asymmetry: up steps scale by (1 + asym), down steps by (1 − asym); in (−1, 1)."""
    slope: float = 1.0
    """``linearstep``: how fast the step shrinks towards a bound (0 = constant step)."""
    a: float = 0.05
    """``expstep``: amplitude of the exponential term."""
    gamma: float = 3.0
    """``expstep``: exponential rate; ``powstep``: the power."""
    bound_d2d: float = 0.0
    """Device-to-device std of the bounds, relative (each device's w_max, w_min × (1 + σ ξ))."""
    step_d2d: float = 0.0
    """Device-to-device std of the step dw, relative."""
    c2c: float = 0.0
    """Cycle-to-cycle std of each pulse's size, relative."""
    mode: UpdateMode = UpdateMode.PULSED
    """``pulsed`` or ``expected`` (see the module docstring)."""
    bl: int = 31
    """Most pulses one update may fire on one device (the pulse train's bit length)."""
    text: str = field(default="", compare=False)
    """The spec this came from (empty when built in code)."""

    def __post_init__(self) -> None:
        checks: list[tuple[bool, str, str]] = [
            (self.states >= 2, "states", ">= 2"),
            (self.w_max > 0, "w_max", "> 0"),
            (self.w_min < 0, "w_min", "< 0"),
            (-1 < self.asym < 1, "asym", "in (-1, 1)"),
            (self.slope >= 0, "slope", ">= 0"),
            (0 <= self.a < 1, "a", "in [0, 1)"),
            (self.gamma > 0, "gamma", "> 0"),
            (0 <= self.bound_d2d < 1, "bound_d2d", "in [0, 1)"),
            (0 <= self.step_d2d < 1, "step_d2d", "in [0, 1)"),
            (self.c2c >= 0, "c2c", ">= 0"),
            (1 <= self.bl <= 1000, "bl", "in [1, 1000]"),
        ]
        for ok, key, expected in checks:
            if not ok:
                where = f"device spec {self.text!r}: " if self.text else "device "
                raise ConfigError(
                    f"{where}{self.kind}.{key} must be {expected}, got {getattr(self, key)!r}"
                )

    @property
    def dw_min(self) -> float:
        """Nominal weight change of one pulse at the symmetric point (device units)."""
        return (self.w_max - self.w_min) / self.states


_COMMON_KEYS = (
    "states",
    "dw_min",
    "w_max",
    "w_min",
    "asym",
    "bound_d2d",
    "step_d2d",
    "c2c",
    "mode",
    "bl",
)
DEVICE_KEYS: dict[ResponseKind, tuple[str, ...]] = {
    ResponseKind.SOFTBOUNDS: _COMMON_KEYS,
    ResponseKind.LINEARSTEP: (*_COMMON_KEYS, "slope"),
    ResponseKind.EXPSTEP: (*_COMMON_KEYS, "a", "gamma"),
    ResponseKind.POWSTEP: (*_COMMON_KEYS, "gamma"),
}
"""Keys each kind accepts in a spec."""

KIND_DEFAULTS: dict[ResponseKind, dict[str, float]] = {
    ResponseKind.SOFTBOUNDS: {},
    ResponseKind.LINEARSTEP: {"slope": 0.5, "asym": 0.05},
    ResponseKind.EXPSTEP: {"a": 0.05, "gamma": 3.0},
    ResponseKind.POWSTEP: {"gamma": 2.0},
}
"""Where a kind's defaults differ from :class:`DeviceConfig`'s."""

DEVICE_KINDS: tuple[str, ...] = tuple(k.value for k in ResponseKind)
"""Every kind the spec language knows."""


def parse_device_spec(text: str) -> DeviceConfig:
    """Parse ``kind[:key=value,...]`` (e.g. ``softbounds:states=1200,c2c=0.1``).

    ``dw_min=X`` is another way to give ``states`` (``states = (w_max − w_min)/X``); ``w_min``
    defaults to ``−w_max``.

    Raises:
        ConfigError: unknown kind or key (the message lists the valid ones), a value that is not a
            number or outside its range, a key given twice, or both ``states`` and ``dw_min``.
    """
    where = f"device spec {text!r}"
    kind_text, _, body = text.strip().partition(":")
    try:
        kind = ResponseKind(kind_text.strip().lower())
    except ValueError:
        raise ConfigError(
            f"{where}: unknown device kind {kind_text.strip()!r}; valid kinds: "
            f"{', '.join(DEVICE_KINDS)}"
        ) from None
    raw: dict[str, str] = {}
    for token in (t.strip() for t in body.split(",")) if body.strip() else ():
        key, eq, value = (s.strip() for s in token.partition("="))
        if not eq or not key:
            raise ConfigError(
                f"{where}: expected key=value, got {token!r}; valid keys for {kind}: "
                f"{', '.join(DEVICE_KEYS[kind])}"
            )
        if key not in DEVICE_KEYS[kind]:
            raise ConfigError(
                f"{where}: unknown key {key!r} for device kind {kind!r}; valid keys: "
                f"{', '.join(DEVICE_KEYS[kind])}"
            )
        if key in raw:
            raise ConfigError(f"{where}: key {kind}.{key} given twice")
        raw[key] = value
    if "states" in raw and "dw_min" in raw:
        raise ConfigError(f"{where}: give {kind}.states or {kind}.dw_min, not both")
    values: dict[str, object] = dict(KIND_DEFAULTS[kind])
    for key, value in raw.items():
        if key == "mode":
            try:
                values["mode"] = UpdateMode(value.lower())
            except ValueError:
                raise ConfigError(
                    f"{where}: {kind}.mode must be pulsed or expected, got {value!r}"
                ) from None
        elif key == "bl":
            try:
                values["bl"] = int(value)
            except ValueError:
                raise ConfigError(f"{where}: {kind}.bl must be an integer, got {value!r}") from None
        else:
            try:
                number = float(value)
            except ValueError:
                raise ConfigError(
                    f"{where}: {kind}.{key} must be a number, got {value!r}"
                ) from None
            if not math.isfinite(number):
                raise ConfigError(f"{where}: {kind}.{key} must be finite, got {value!r}")
            values[key] = number
    w_max = float(values.get("w_max", 1.0))  # type: ignore[arg-type]
    values.setdefault("w_min", -w_max)
    if "dw_min" in values:
        dw = float(values.pop("dw_min"))  # type: ignore[arg-type]
        if not dw > 0:
            raise ConfigError(f"{where}: {kind}.dw_min must be > 0, got {dw!r}")
        values["states"] = (w_max - float(values["w_min"])) / dw  # type: ignore[arg-type]
    return DeviceConfig(kind=kind, text=text.strip(), **values)  # type: ignore[arg-type]


def response(
    config: DeviceConfig, w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q₊(w), q₋(w))`` of each device, asymmetry not included, clipped at zero.

    Args:
        config: The device model.
        w: Weights (device units).
        lo: Lower bound of each device (broadcastable to ``w``, < 0).
        hi: Upper bound of each device (> 0).
    """
    kind = config.kind
    if kind is ResponseKind.SOFTBOUNDS:
        up, down = 1.0 - w / hi, 1.0 - w / lo
    elif kind is ResponseKind.LINEARSTEP:
        up, down = 1.0 - config.slope * w / hi, 1.0 - config.slope * w / lo
    elif kind is ResponseKind.EXPSTEP:
        z = (2.0 * w - hi - lo) / (hi - lo)
        up = 1.0 - config.a * torch.exp(config.gamma * z)
        down = 1.0 - config.a * torch.exp(-config.gamma * z)
    else:
        span = hi - lo
        up = (2.0 * (hi - w) / span).clamp(min=0.0) ** config.gamma
        down = (2.0 * (w - lo) / span).clamp(min=0.0) ** config.gamma
    return up.clamp(min=0.0), down.clamp(min=0.0)


def nominal_steps(config: DeviceConfig, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Size of one pulse up and one pulse down at ``w`` on a nominal device (both >= 0)."""
    lo = torch.tensor(config.w_min, dtype=w.dtype)
    hi = torch.tensor(config.w_max, dtype=w.dtype)
    up, down = response(config, w, lo, hi)
    return config.dw_min * up * (1 + config.asym), config.dw_min * down * (1 - config.asym)


def symmetry_point(
    config: DeviceConfig, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None
) -> torch.Tensor:
    """The weight where a pulse up and a pulse down cancel (``(1+asym)q₊ = (1−asym)q₋``).

    Closed form for the affine kinds, bisection (60 halvings) on every device at once for the
    others; the nominal device when no bounds are given.
    Analog SGD's implicit penalty pulls weights towards this point.
    """
    lo_t = torch.tensor(config.w_min, dtype=torch.float64) if lo is None else lo.double()
    hi_t = torch.tensor(config.w_max, dtype=torch.float64) if hi is None else hi.double()
    if config.kind in (ResponseKind.SOFTBOUNDS, ResponseKind.LINEARSTEP):
        # (1+a)(1 − s·w/hi) = (1−a)(1 − s·w/lo)  ⇒  w = 2a / (s·((1+a)/hi − (1−a)/lo))
        slope = 1.0 if config.kind is ResponseKind.SOFTBOUNDS else config.slope
        if slope == 0:  # a constant step: balanced everywhere (a = 0) or nowhere; report 0
            return torch.zeros_like(lo_t + hi_t)
        a = config.asym
        point = 2 * a / (slope * ((1 + a) / hi_t - (1 - a) / lo_t))
        return torch.minimum(torch.maximum(point, lo_t), hi_t)
    left, right = (lo_t + 0 * hi_t).clone(), (hi_t + 0 * lo_t).clone()  # broadcast
    for _ in range(60):
        mid = (left + right) / 2
        up, down = response(config, mid, lo_t, hi_t)
        excess = up * (1 + config.asym) - down * (1 - config.asym)  # decreasing in w
        above = excess > 0
        left = torch.where(above, mid, left)
        right = torch.where(above, right, mid)
    middle: torch.Tensor = (left + right) / 2
    return middle


class AnalogArray:
    """A tensor of resistive devices: its weights (device units) and device-to-device draws.

    Soft-bounds and linear-step devices have affine steps, so ``n`` pulses in a row have a closed
    form (``w_n = c − (c − w)·ρⁿ`` with per-device constants ``c``, ``ρ``): exact without
    cycle-to-cycle noise; with it, the noise of the ``n`` pulses is added as one Gaussian of
    std ``c2c · step(w) · √n``. The other kinds fire their pulses one by one (a loop over pulse
    index, vectorised over the devices that still have pulses to fire).

    Args:
        config: The device model.
        initial: Weights to program (device units; clipped at each device's bounds; exact).
        rng: Source of every random draw (device-to-device now, pulse rounding and noise later).
    """

    def __init__(
        self, config: DeviceConfig, initial: torch.Tensor, rng: np.random.Generator
    ) -> None:
        self.config = config
        self.rng = rng
        like = initial.detach()
        self._like = like
        self._cuda_gen: torch.Generator | None = None
        if like.device.type != "cpu":
            seed = int(rng.integers(2**62))
            self._cuda_gen = torch.Generator(device=like.device).manual_seed(seed)
        ones = torch.ones((), dtype=like.dtype, device=like.device)
        self.hi = config.w_max * (
            (1 + config.bound_d2d * self._randn()).clamp(min=0.05) if config.bound_d2d else ones
        )
        self.lo = config.w_min * (
            (1 + config.bound_d2d * self._randn()).clamp(min=0.05) if config.bound_d2d else ones
        )
        self.dw = config.dw_min * (
            (1 + config.step_d2d * self._randn()).clamp(min=0.05) if config.step_d2d else ones
        )
        self.w = torch.minimum(torch.maximum(like.clone(), self.lo), self.hi).contiguous()
        self._buffers: list[torch.Tensor] = []
        self._affine = config.kind in (ResponseKind.SOFTBOUNDS, ResponseKind.LINEARSTEP)
        slope = 1.0 if config.kind is ResponseKind.SOFTBOUNDS else config.slope
        self._slope = slope
        # per-device constants: python floats without device-to-device variation (cheaper ops)
        d_up, d_down = self.dw * (1 + config.asym), self.dw * (1 - config.asym)
        self._d_up, self._d_down = _coef(d_up), _coef(d_down)
        gain = self.dw / config.dw_min
        # expected step per unit Δ: q_up = a_up − b_up·w, q_down = a_down − b_down·w
        self._a_up, self._a_down = _coef(gain * (1 + config.asym)), _coef(gain * (1 - config.asym))
        self._b_up = _coef(gain * (1 + config.asym) * slope / self.hi)
        self._b_down = _coef(gain * (1 - config.asym) * slope / self.lo)
        # one pulse up: w ← ρ_up·w + d_up, ρ_up = 1 − d_up·slope/hi; n pulses: c − (c − w)·ρⁿ
        self._log_rho_up = _coef((1 - d_up * slope / self.hi).clamp(min=1e-30).log())
        self._log_rho_down = _coef((1 + d_down * slope / self.lo).clamp(min=1e-30).log())
        self._c_up = _coef(self.hi / slope) if slope else 0.0
        self._c_down = _coef(self.lo / slope) if slope else 0.0
        self._scalar = not (config.bound_d2d or config.step_d2d)

    def _randn(self, shape: torch.Size | None = None) -> torch.Tensor:
        like = self._like
        size = like.shape if shape is None else shape
        if self._cuda_gen is not None:
            return torch.randn(size, generator=self._cuda_gen, device=like.device, dtype=like.dtype)
        return torch.from_numpy(self.rng.standard_normal(tuple(size), dtype=np.float32)).to(
            like.dtype
        )

    def _uniform(self) -> torch.Tensor:
        """U(0, 1) per device; on the CPU with 8-bit resolution (midpoints of 256 bins)."""
        like = self._like
        if self._cuda_gen is not None:
            return torch.rand(
                like.shape, generator=self._cuda_gen, device=like.device, dtype=like.dtype
            )
        raw = _random_bytes(self.rng, like.numel())
        return raw.reshape(like.shape).to(like.dtype).add_(0.5).mul_(1 / 256)

    def symmetry_point(self) -> torch.Tensor:
        """Each device's symmetric point (its own bounds), same dtype as the weights."""
        lo, hi = self.lo.expand_as(self.w), self.hi.expand_as(self.w)
        return symmetry_point(self.config, lo, hi).to(self.w.dtype)

    def update(self, delta: torch.Tensor) -> None:
        """Apply the desired change ``delta`` (device units) through the devices' response."""
        if self.config.mode is UpdateMode.EXPECTED:
            self._update_expected(delta)
        else:
            self._update_pulsed(delta)

    def _clip(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` (in place) within each device's bounds."""
        if self.lo.ndim == 0:
            return w.clamp_(float(self.lo), float(self.hi))
        return w.clamp_(self.lo, self.hi)

    def _update_expected(self, delta: torch.Tensor) -> None:
        cfg = self.config
        w = self.w
        if (
            self._affine
            and not cfg.c2c
            and all(
                isinstance(c, float) for c in (self._a_up, self._a_down, self._b_up, self._b_down)
            )
        ):
            # Δ·q = a_up·Δ⁺ + a_dn·Δ⁻ − w·(b_up·Δ⁺ + b_dn·Δ⁻), Δ± = (Δ ± |Δ|)/2: 7 passes
            a_up, a_dn, b_up, b_dn = (
                float(c) for c in (self._a_up, self._a_down, self._b_up, self._b_down)
            )
            size, shrink = self._scratch(2)
            torch.abs(delta, out=size)
            torch.mul(delta, (b_up + b_dn) / 2, out=shrink).add_(size, alpha=(b_up - b_dn) / 2)
            w.addcmul_(w, shrink, value=-1.0)
            w.add_(delta, alpha=(a_up + a_dn) / 2).add_(size, alpha=(a_up - a_dn) / 2)
            self.w = self._clip(w)
            return
        if self._affine:  # q = a − b·w per direction
            q_up = (w * -self._b_up).add_(self._a_up)
            q_down = (w * -self._b_down).add_(self._a_down)
        else:
            up, down = response(cfg, w, self.lo, self.hi)
            q_up, q_down = up.mul_(self._a_up), down.mul_(self._a_down)
        up_part, down_part = delta.clamp(min=0.0), delta.clamp(max=0.0)
        change = up_part * q_up
        change.addcmul_(down_part, q_down)
        if cfg.c2c:  # the spread of |Δ|/dw_min pulses, each of relative std c2c
            spread = up_part.sqrt_().mul_(q_up).addcmul_(down_part.neg_().sqrt_(), q_down)
            change.addcmul_(spread, self._randn(w.shape), value=cfg.c2c * math.sqrt(cfg.dw_min))
        self.w = self._clip(w.add_(change))

    def _scratch(self, count: int) -> list[torch.Tensor]:
        """``count`` preallocated tensors shaped like the weights (no page faults per step)."""
        while len(self._buffers) < count:
            self._buffers.append(torch.empty_like(self.w))
        return self._buffers[:count]

    def _counts(self, delta: torch.Tensor) -> torch.Tensor:
        """Signed pulse counts: stochastic rounding of Δ/dw_min, at most ``bl`` each way."""
        (n,) = self._scratch(1)
        torch.abs(delta, out=n).mul_(1 / self.config.dw_min).add_(self._uniform())
        return n.floor_().clamp_(max=float(self.config.bl)).copysign_(delta)

    def _update_pulsed(self, delta: torch.Tensor) -> None:
        if self._affine and self._slope and not self.config.c2c and self._scalar:
            self._pulses_affine_scalar(delta)
            return
        signed = self._counts(delta)
        if self._affine:
            self._pulses_affine(signed)
        else:
            self._pulses_loop(signed)

    def _pulses_affine_scalar(self, delta: torch.Tensor) -> None:
        """:meth:`_pulses_affine` for identical devices without c2c noise, in 12-15 passes.

        With ``σ = sign(Δ)``: ``n = ⌊(|Δ|·256/dw_min + r + ½)/256⌋`` (``r`` uniform on 0..255,
        the same stochastic rounding), ``ln ρ = L_m + L_d·σ``, ``c = c_m + c_d·σ`` and
        ``w ← w + (c − w) − ρⁿ·(c − w)``.
        """
        cfg = self.config
        w = self.w
        count, sign, gap = self._scratch(3)
        torch.sign(delta, out=sign)
        if self._cuda_gen is not None:
            torch.abs(delta, out=count).mul_(256 / cfg.dw_min)
            count.add_(torch.rand(w.shape, generator=self._cuda_gen, device=w.device), alpha=256)
        else:  # r + (256/dw_min)·Δ·σ in one pass: the same floats as (|Δ|·256/dw_min) + r
            raw = _random_bytes(self.rng, w.numel()).reshape(w.shape)
            torch.addcmul(raw, delta, sign, value=256 / cfg.dw_min, out=count).add_(0.5)
        count.mul_(1 / 256).floor_().clamp_(max=float(cfg.bl))  # exact: 256 is a power of 2
        log_up, log_down = float(self._log_rho_up), float(self._log_rho_down)
        c_up, c_down = float(self._c_up), float(self._c_down)
        if log_up == log_down:
            count.mul_(log_up)
        else:
            count.mul_(
                torch.mul(sign, (log_up - log_down) / 2, out=gap).add_((log_up + log_down) / 2)
            )
        power = count.exp_()  # ρⁿ (exp is vectorised, expm1 is not)
        if c_up + c_down:
            torch.mul(sign, (c_up - c_down) / 2, out=gap).add_((c_up + c_down) / 2).sub_(w)
            w.add_(gap).addcmul_(power, gap, value=-1.0)
        else:  # w − c in one pass (c = c_d·σ is exact); the same floats as with c − w
            torch.sub(w, sign, alpha=(c_up - c_down) / 2, out=gap)
            w.sub_(gap).addcmul_(power, gap)
        self.w = self._clip(w)

    def _pulses_affine(self, signed: torch.Tensor) -> None:
        """Closed form of ``n`` pulses; ``signed`` is scratch space and is overwritten."""
        cfg = self.config
        w = self.w
        _, up, down = self._scratch(3)
        torch.clamp(signed, min=0.0, out=up)
        torch.clamp(signed, max=0.0, out=down).neg_()
        noise: torch.Tensor | None = None
        if cfg.c2c:  # one Gaussian for the n pulses: std c2c · step(w) · √n
            size = (w * -self._b_up).add_(self._a_up).mul_(up.sqrt()).mul_(cfg.dw_min)
            size.addcmul_((w * -self._b_down).add_(self._a_down), down.sqrt(), value=cfg.dw_min)
            noise = size.mul_(self._randn(w.shape)).mul_(cfg.c2c)
        if self._slope == 0:
            w.add_(up.mul_(self._d_up)).sub_(down.mul_(self._d_down))
        else:  # w_n = c − (c − w)·ρⁿ = w + (1 − ρⁿ)(c − w), c = hi/slope (up) or lo/slope (down)
            up.mul_(self._log_rho_up).exp_().neg_().add_(1)
            down.mul_(self._log_rho_down).exp_().neg_().add_(1)
            gap = torch.mul(w, -1.0, out=signed).add_(self._c_up)  # c_up − w
            up.mul_(gap)
            gap.sub_(self._c_up).add_(self._c_down)  # c_down − w
            w.add_(up).addcmul_(down, gap)
        if noise is not None:
            w.add_(noise)
        self.w = self._clip(w)

    def _loop_constants(
        self, idx: torch.Tensor, n: torch.Tensor, sign: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | float, torch.Tensor | float]:
        """Per firing device (``idx``): counts, ``σ·d_σ``, the folded response constants.

        Also each device's bounds (python floats when every device shares them).
        """
        cfg = self.config
        like = self.w
        dtype = like.dtype

        def per_device(t: torch.Tensor | float) -> torch.Tensor | float:
            if isinstance(t, float) or t.ndim == 0:
                return float(t)
            return t.expand_as(like).reshape(-1).index_select(0, idx)

        lo, hi = per_device(self.lo), per_device(self.hi)
        d_up, d_down = per_device(self._d_up), per_device(self._d_down)
        plus = sign > 0
        if isinstance(d_up, float) and d_up == d_down:
            sd = sign * d_up
        else:
            sd = torch.where(plus, d_up, -d_down).to(dtype)
        tensors: dict[str, torch.Tensor] = {"n": n, "sd": sd}
        span = hi - lo
        if cfg.kind is ResponseKind.EXPSTEP:
            sg = sign * cfg.gamma
            log_a = math.log(cfg.a) if cfg.a > 0 else -math.inf
            tensors["A"] = sg * 2.0 / span
            tensors["B"] = (sg * -(hi + lo) / span).add_(log_a)
        else:
            tensors["C"] = sign * 2.0 / span
            tensors["bound"] = torch.where(plus, hi, lo).to(dtype)
        if isinstance(lo, torch.Tensor):
            tensors["lo"] = lo
        if isinstance(hi, torch.Tensor):
            tensors["hi"] = hi
        return tensors, lo, hi

    def _pulses_loop(self, signed: torch.Tensor) -> None:
        """Pulse by pulse: iteration ``k`` fires pulse ``k`` on every device with ``|n| > k``.

        Each device keeps one direction ``σ`` for the whole train, so its step is
        ``σ·d_σ·q_σ(w)`` with per-device constants folded in up front: ``expstep``
        ``q_σ = 1 − e^(min(0, A·w + B))`` with ``A = 2σγ/(hi − lo)``,
        ``B = ln a − σγ(hi + lo)/(hi − lo)``; ``powstep`` ``q_σ = (C·(b_σ − w))₊^γ`` with
        ``C = 2σ/(hi − lo)`` and ``b_σ`` = hi (up) or lo (down): 7 in-place passes per pulse
        instead of ~20 (the same formulas; float32 rounding of a step may differ in its last
        bits). Devices that are done get ``σ·d_σ = 0``, so their weight stays as it is; the
        buffers are compacted only when at least half of them (and 2048) are done. With c2c the
        noise of pulse ``k`` is drawn for the ``|n| > k`` devices in index order, as before.
        """
        cfg = self.config
        flat = signed.reshape(-1)
        idx = _where_nonzero(flat)
        if idx.numel() == 0:
            return
        like = self.w
        n = flat.index_select(0, idx)
        sign = torch.sign(n)
        n.abs_()
        # devices still firing at pulse k: remaining[k] = #{|n| > k}, known up front (no syncs)
        hist = torch.bincount(n.to(torch.int64), minlength=cfg.bl + 1).tolist()
        remaining = [idx.numel()]
        for count in hist[1:]:
            remaining.append(remaining[-1] - count)

        tensors, lo, hi = self._loop_constants(idx, n, sign)
        w = like.reshape(-1).index_select(0, idx)
        work = torch.empty_like(w)
        size = w.numel()
        for k in range(len(remaining) - 1):
            alive = remaining[k]
            if alive == 0:
                break
            if alive < size:  # devices with |n| == k are done
                if size - alive >= max(2048, size // 2):
                    like.view(-1).index_copy_(0, idx, w)
                    keep = _where_nonzero(tensors["n"] > k)
                    idx, w = idx.index_select(0, keep), w.index_select(0, keep)
                    tensors = {key: t.index_select(0, keep) for key, t in tensors.items()}
                    work = work[: keep.numel()]
                    size = keep.numel()
                elif remaining[k - 1] > alive:
                    tensors["sd"].masked_fill_(tensors["n"] == k, 0.0)
            if "A" in tensors:  # q = 1 − e^(min(0, A·w + B))
                torch.addcmul(tensors["B"], w, tensors["A"], out=work)
                work.clamp_(max=0.0).exp_().neg_().add_(1.0)
            else:  # q = (C·(b − w))₊^γ
                torch.sub(tensors["bound"], w, out=work).mul_(tensors["C"])
                work.clamp_(min=0.0).pow_(cfg.gamma)
            if cfg.c2c:
                noise = self._randn(torch.Size([alive])).mul_(cfg.c2c).add_(1.0)
                if alive == size:
                    work.mul_(noise)
                else:
                    firing = tensors["n"] > k
                    work[firing] = work[firing] * noise
            w.addcmul_(work, tensors["sd"])
            lo_k, hi_k = tensors.get("lo", lo), tensors.get("hi", hi)
            if isinstance(lo_k, float):
                w.clamp_(lo_k, hi_k)  # type: ignore[arg-type]
            else:
                torch.minimum(torch.maximum(w, lo_k, out=w), hi_k, out=w)  # type: ignore[arg-type]
        like.view(-1).index_copy_(0, idx, w)


def _random_bytes(rng: np.random.Generator, count: int) -> torch.Tensor:
    """``rng.bytes(count)`` as a uint8 tensor, the same bytes and generator state, faster.

    ``Generator.bytes`` draws ``⌈count/4⌉`` uint32 and copies them three times. PCG64 serves
    uint32 as the low, then the high half of one 64-bit output, so with an even number of
    words and no half-word buffered, the raw 64-bit outputs (little-endian) are those bytes.
    """
    if count <= 0:  # Generator.bytes(0) still draws one word: keep its stream
        rng.bytes(0)
        return torch.empty(0, dtype=torch.uint8)
    words = (count - 1) // 4 + 1
    bits = rng.bit_generator
    if (
        words % 2 == 0
        and sys.byteorder == "little"
        and isinstance(bits, np.random.PCG64)
        and not bits.state["has_uint32"]
    ):
        raw = np.asarray(bits.random_raw(words // 2), dtype=np.uint64).view(np.uint8)[:count]
        return torch.from_numpy(raw)
    return torch.frombuffer(bytearray(rng.bytes(count)), dtype=torch.uint8)


def _where_nonzero(t: torch.Tensor) -> torch.Tensor:
    """Flat indices of the non-zero entries of a 1-D tensor (numpy on the CPU: ~10x faster)."""
    if t.device.type != "cpu":
        return torch.nonzero(t).squeeze(1)
    mask = t.numpy() if t.dtype == torch.bool else t.numpy() != 0
    return torch.from_numpy(np.flatnonzero(mask))


def _coef(t: torch.Tensor) -> torch.Tensor | float:
    """A per-device constant: a python float when it is the same on every device."""
    return float(t) if t.ndim == 0 else t


def with_mode(config: DeviceConfig, mode: UpdateMode) -> DeviceConfig:
    """``config`` with another update mode."""
    return replace(config, mode=mode)
