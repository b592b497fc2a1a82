"""Shared pieces of the transfer-learning tests: a tiny base model and hand-built deltas.

The deltas are built by hand (not with common.delta.encode_delta) together with the dense
float32 arrays they stand for, so the tests compare the server against a plain numpy oracle.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np

from common.delta import DeltaEntry, DeltaKind
from common.modelfile import ModelFile, from_torch, write_model_file
from common.tensors import WireTensor, to_wire
from common.zoo import ModelSpec, build_model

SPEC = ModelSpec("mlp", 1, 8, 8, 10)
"""50,890 parameters: features.1 (256x64), last_block.0 (128x256), head (10x128)."""


def write_base(path: Path, seed: int = 0) -> tuple[ModelFile, str]:
    """A freshly initialised tiny network as a model file; (model, content hash)."""
    model = from_torch(SPEC, build_model(SPEC, seed=seed), {"source_data": "test"})
    return model, write_model_file(model, path)


def hand_delta(
    base: dict[str, np.ndarray], seed: int = 0
) -> tuple[list[DeltaEntry], dict[str, np.ndarray]]:
    """One entry of every kind; returns (entries, name -> the dense float32 delta they carry)."""
    rng = np.random.default_rng(seed)
    dense: dict[str, np.ndarray] = {}
    entries: list[DeltaEntry] = []

    d = (rng.normal(size=base["head.weight"].shape) * 0.1).astype(np.float32)
    entries.append(DeltaEntry("head.weight", DeltaKind.DENSE, to_wire(d)))
    dense["head.weight"] = d

    # sparse, index form, float16 values that float16 holds exactly (multiples of 1/64)
    numel = base["last_block.0.weight"].size
    pos = np.sort(rng.choice(numel, size=50, replace=False)).astype(np.uint16)
    vals = (rng.integers(-64, 64, size=50) / 64).astype(np.float16)
    flat = np.zeros(numel, np.float32)
    flat[pos] = vals.astype(np.float32)
    entries.append(
        DeltaEntry(
            "last_block.0.weight",
            DeltaKind.SPARSE_INDEX,
            to_wire(vals),
            positions=to_wire(pos),
        )
    )
    dense["last_block.0.weight"] = flat.reshape(base["last_block.0.weight"].shape)

    # sparse, bitmap form, int8 values with a scale
    numel = base["features.1.bias"].size
    mask = rng.random(numel) < 0.5
    stored = rng.integers(-127, 128, size=int(mask.sum())).astype(np.int8)
    scale = 0.01
    flat = np.zeros(numel, np.float32)
    flat[mask] = stored.astype(np.float32) * np.float32(scale)
    values = WireTensor(data=stored.tobytes(), dtype="int8", shape=stored.shape, scale=scale)
    entries.append(
        DeltaEntry(
            "features.1.bias",
            DeltaKind.SPARSE_BITMAP,
            values,
            positions=to_wire(np.packbits(mask.astype(np.uint8))),
        )
    )
    dense["features.1.bias"] = flat

    # low rank: (256, 2) @ (2, 64)
    left = (rng.normal(size=(256, 2)) * 0.05).astype(np.float32)
    right = rng.normal(size=(2, 64)).astype(np.float32)
    entries.append(
        DeltaEntry("features.1.weight", DeltaKind.LOW_RANK, to_wire(left), right=to_wire(right))
    )
    dense["features.1.weight"] = left @ right
    return entries, dense


def delta_rows(db: Path) -> list[tuple[str, str, str]]:
    """(upload_id, node_id, state) of every row of the deltas table."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT upload_id, node_id, state FROM deltas ORDER BY rowid")
        return [(str(a), str(b), str(c)) for a, b, c in rows]


def staged_delta_chunks(db: Path) -> int:
    """Rows of the delta_chunks table."""
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM delta_chunks").fetchone()[0])


def assert_tensors_close(
    got: dict[str, np.ndarray], want: dict[str, np.ndarray], exact: set[str] | None = None
) -> None:
    """Same names; the ``exact`` ones bit for bit, the rest within float32 matmul rounding."""
    assert set(got) == set(want)
    for name, value in want.items():
        assert got[name].dtype == np.float32 and got[name].shape == value.shape, name
        if exact is not None and name in exact:
            np.testing.assert_array_equal(got[name], value, err_msg=name)
        else:
            np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=1e-6, err_msg=name)
