"""Model files: a zoo network's named tensors plus its spec, in the safetensors format.

A model file is a plain `safetensors <https://huggingface.co/docs/safetensors>`_ file (no
pickle: loading one never runs code): the network's parameters and BatchNorm statistics as
named float32 tensors, and string metadata ``latentedge.format`` (``model/1``),
``latentedge.spec`` (the :class:`~common.zoo.ModelSpec` as JSON) and any ``meta.*`` keys the
writer added (source data, accuracy, ...). Any safetensors reader (Python, Rust, JS) opens it.

The *content hash* of a model is the SHA-256 of the file's bytes; the server names every base
model version by it and nodes cache downloads under it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors
import safetensors.numpy
import torch
from torch import nn

from common.errors import ConfigError
from common.zoo import ModelSpec, build_model, model_state

FORMAT = "model/1"
"""Value of the ``latentedge.format`` metadata key."""

_FORMAT_KEY = "latentedge.format"
_SPEC_KEY = "latentedge.spec"
_META_PREFIX = "meta."


@dataclass(frozen=True)
class ModelFile:
    """A model as stored: its spec, its named float32 tensors and free-form metadata."""

    spec: ModelSpec
    tensors: dict[str, np.ndarray]
    """Name -> float32 array (parameters and BatchNorm statistics)."""
    meta: dict[str, str] = field(default_factory=dict)
    """Free-form string metadata (source dataset, accuracy, parent version, ...)."""

    def to_bytes(self) -> bytes:
        """The safetensors bytes of this model (deterministic for equal content)."""
        metadata = {_FORMAT_KEY: FORMAT, _SPEC_KEY: self.spec.to_json()}
        metadata.update({_META_PREFIX + k: v for k, v in sorted(self.meta.items())})
        arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.tensors.items()}
        return _canonical(bytes(safetensors.numpy.save(arrays, metadata=metadata)))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every tensor."""
        return {k: tuple(int(d) for d in v.shape) for k, v in self.tensors.items()}

    def to_torch(self) -> nn.Module:
        """The network with these tensors loaded, in eval mode."""
        model = build_model(self.spec)
        expected = model_state(model)
        missing = sorted(set(expected) - set(self.tensors))
        unknown = sorted(set(self.tensors) - set(expected))
        if missing or unknown:
            raise ConfigError(
                f"model file does not fit a {self.spec.name} network: missing tensors "
                f"{missing[:5]}, unknown tensors {unknown[:5]}"
            )
        for name, ref in expected.items():
            if tuple(ref.shape) != self.tensors[name].shape:
                raise ConfigError(
                    f"model file tensor {name!r} has shape {list(self.tensors[name].shape)}, "
                    f"the {self.spec.name} network needs {list(ref.shape)}"
                )
        state = {
            k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in self.tensors.items()
        }
        model.load_state_dict(state, strict=False)
        model.eval()
        return model


def from_torch(
    spec: ModelSpec, model: nn.Module, meta: Mapping[str, str] | None = None
) -> ModelFile:
    """Snapshot a zoo network as a :class:`ModelFile`."""
    tensors = {
        k: v.cpu().numpy().astype(np.float32, copy=True) for k, v in model_state(model).items()
    }
    return ModelFile(spec=spec, tensors=tensors, meta=dict(meta or {}))


def parse_model_bytes(data: bytes, where: str = "model") -> ModelFile:
    """Read a model file's bytes; ConfigError naming ``where`` if they are not one."""
    try:
        arrays = safetensors.numpy.load(data)
        with_meta = _metadata(data)
    except (safetensors.SafetensorError, ValueError, OSError) as exc:
        raise ConfigError(f"{where} is not a safetensors model file: {exc}") from exc
    if with_meta.get(_FORMAT_KEY) != FORMAT:
        found = with_meta.get(_FORMAT_KEY)
        raise ConfigError(
            f"{where} is a safetensors file but not a latentedge model: metadata {_FORMAT_KEY} "
            f"must be {FORMAT!r}, got {found!r} (write one with `latentedge pretrain`)"
        )
    spec = ModelSpec.from_json(with_meta.get(_SPEC_KEY, ""))
    for name, arr in arrays.items():
        if arr.dtype != np.float32:
            raise ConfigError(f"{where}: tensor {name!r} is {arr.dtype}, expected float32")
    meta = {k[len(_META_PREFIX) :]: v for k, v in with_meta.items() if k.startswith(_META_PREFIX)}
    return ModelFile(spec=spec, tensors=dict(arrays), meta=meta)


def _canonical(data: bytes) -> bytes:
    """The same safetensors file with its JSON header in one canonical form.

    safetensors writes the metadata keys in a different order on every call; re-writing the
    header with sorted keys and no spaces (padded with spaces to a multiple of 8 bytes, as the
    format asks) makes equal content give equal bytes, hence an equal hash. The tensor
    offsets are relative to the data section, which does not move.
    """
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":"))
    raw = header.encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + data[8 + n :]


def _metadata(data: bytes) -> dict[str, str]:
    if len(data) < 8:
        raise ValueError("file shorter than the 8-byte header length")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError(f"header length {n} exceeds the file")
    header = json.loads(data[8 : 8 + n])
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else {}
    return {str(k): str(v) for k, v in meta.items()}


def read_model_file(path: str | Path) -> tuple[ModelFile, str]:
    """Load a model file; return it and its content hash (SHA-256 hex of the bytes)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read model file {str(p)!r}: {exc}") from exc
    return parse_model_bytes(data, repr(str(p))), content_hash(data)


def write_model_file(model: ModelFile, path: str | Path) -> str:
    """Write ``model`` to ``path`` (atomically: temp file + rename); return its content hash."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    data = model.to_bytes()
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(p)
    return content_hash(data)


def content_hash(data: bytes) -> str:
    """SHA-256 hex digest: the name of a model's content."""
    return hashlib.sha256(data).hexdigest()
