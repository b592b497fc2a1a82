"""Fused DAC/ADC kernels: a small onnxruntime custom-op library compiled on first use.

``csrc/io_kernels.c`` defines two ops in the domain :data:`DOMAIN`, each doing in one pass what
:func:`device_sim.graph.add_io_quantization` otherwise writes as a chain of onnxruntime nodes,
with the same float32 operations in the same order (the outputs are equal, which the tests
check): ``DacCodes`` (scale and round the DAC input) and ``AdcOutput`` (ADC noise, clip, round,
scale, bias, optionally a residual Add and a Relu). onnxruntime ships no C headers, so the library
declares the few entries of onnxruntime's C API (asked for at version 17; an append-only function
table) that it calls; its threads are the session's own (``KernelContext_ParallelFor``).

The library is built with the system C compiler (``$CC``, else ``cc`` or ``gcc``) into
``$LATENTEDGE_CACHE_DIR`` (default ``$XDG_CACHE_HOME/latentedge`` or ``~/.cache/latentedge``),
named by a hash of the source, flags and machine, and checked against numpy once per process.
Where there is no compiler or the check fails, :func:`io_kernels_library` returns ``None`` (and
logs why once) and the simulator writes the plain onnxruntime nodes instead: slower, same results.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

logger = logging.getLogger(__name__)

DOMAIN = "ai.latentedge.device_sim"
"""The custom ops' domain (opset version 1)."""
SOURCE = Path(__file__).with_name("csrc") / "io_kernels.c"
_FLAGS = (
    "-O3",
    "-ffp-contract=off",
    "-fno-math-errno",
    "-fPIC",
    "-shared",
)
"""No FMA contraction, so a*b + c rounds twice, as the onnxruntime Mul and Add nodes do."""
_NATIVE = ("-march=native",)
_BUILD_TIMEOUT_S = 120.0


def cache_dir() -> Path:
    """Where compiled kernels are kept (``$LATENTEDGE_CACHE_DIR``, else the user cache)."""
    if explicit := os.environ.get("LATENTEDGE_CACHE_DIR"):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "latentedge"


def _compiler() -> str | None:
    if explicit := os.environ.get("CC"):
        return explicit
    return shutil.which("cc") or shutil.which("gcc")


def _cpu_model() -> str:
    """The CPU model line of /proc/cpuinfo (``-march=native`` builds differ between CPUs)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name") or line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor()


def _build(compiler: str, flags: tuple[str, ...], target: Path) -> str | None:
    """Compile the library to ``target`` (atomically); the compiler's complaint on failure."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".part")
        os.close(fd)
    except OSError as exc:
        return f"cannot write {target.parent}: {exc}"
    try:
        done = subprocess.run(
            [compiler, *flags, "-o", partial, str(SOURCE), "-lm"],
            capture_output=True,
            text=True,
            timeout=_BUILD_TIMEOUT_S,
            check=False,
        )
        if done.returncode != 0:
            return (done.stderr or done.stdout).strip()[-500:] or f"exit {done.returncode}"
        os.replace(partial, target)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    finally:
        Path(partial).unlink(missing_ok=True)  # gone after a successful replace
    return None


def _self_test(library: Path) -> str | None:
    """Run both ops on a small case against numpy; what differs, or None."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 2, 5)) * 4).astype(np.float32)
    w_max_step = np.array(0.75, np.float32)
    scale = np.array(1.25, np.float32)
    bias = np.array([0.25, -1.0], np.float32)
    bank = (rng.standard_normal(7) * 2).astype(np.float32)
    start = np.array([5], np.int64)

    def f(name: str, elem: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, elem, None)

    nodes = [
        helper.make_node("DacCodes", ["x"], ["codes", "s"], domain=DOMAIN, levels=7.0, tiny=1e-30),
        helper.make_node(
            "AdcOutput",
            ["codes", "s", "w_max_step", "scale", "bias", "bank", "start"],
            ["out"],
            domain=DOMAIN,
            limit=6.0,
            layout=0,
            relu=1,
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "self_test",
        [f(n) for n in ("x", "w_max_step", "scale", "bias", "bank")]
        + [f("start", TensorProto.INT64)],
        [f("codes"), f("s"), f("out")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)]
    )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        options.register_custom_ops_library(str(library))
        session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        feed = {"x": x, "w_max_step": w_max_step, "scale": scale, "bias": bias, "bank": bank}
        codes, s, out = session.run(None, {**feed, "start": start})
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        return f"onnxruntime could not run the ops: {exc}"
    want_s = np.abs(x).reshape(3, -1).max(axis=1).reshape(3, 1, 1)
    want_codes = np.rint(x * (np.float32(7.0) / want_s))
    noise = bank[(start[0] + np.arange(x.size)) % bank.size].reshape(x.shape)
    adc = np.rint(np.clip(want_codes + noise, -6.0, 6.0)) * (want_s * w_max_step * scale)
    want_out = np.maximum(adc + bias[None, :, None], 0.0)
    if not all(
        np.array_equal(a, b) for a, b in ((s, want_s), (codes, want_codes), (out, want_out))
    ):
        return "the ops' outputs differ from numpy's"
    return None


@functools.cache
def io_kernels_library() -> Path | None:
    """The compiled, checked custom-op library, or None where it cannot be built here."""
    compiler = _compiler()
    if compiler is None:
        logger.warning(
            "no C compiler (cc, gcc or $CC): DAC/ADC simulation uses plain onnxruntime nodes "
            "(same results, about 1.5x slower)"
        )
        return None
    source = SOURCE.read_bytes()
    reasons: list[str] = []
    for flags in ((*_FLAGS, *_NATIVE), _FLAGS):
        what = [" ".join(flags), platform.machine(), _cpu_model()]
        key = hashlib.sha256(b"\0".join([source, *(w.encode() for w in what)])).hexdigest()[:16]
        target = cache_dir() / f"io_kernels-{key}.so"
        if not target.exists():
            started = time.perf_counter()
            if (complaint := _build(compiler, flags, target)) is not None:
                reasons.append(f"{compiler} {' '.join(flags)}: {complaint}")
                continue
            logger.info(
                "compiled the fused DAC/ADC kernels to %s in %.1f s",
                target,
                time.perf_counter() - started,
            )
        if (failure := _self_test(target)) is None:
            return target
        reasons.append(f"{target}: {failure}")
    logger.warning(
        "fused DAC/ADC kernels unavailable, using plain onnxruntime nodes (same results, "
        "slower): %s",
        "; ".join(reasons),
    )
    return None
