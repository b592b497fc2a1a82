"""CPU cost model shared by the edge (profiles derived on the node) and the server's scenarios.

Pure arithmetic, no torch: ``edge/transfer.py`` counts a network's multiply-accumulates with
hooks and calls these; ``server/allocation/generate.py`` calls them with the counts of a zoo
model recorded as constants (docs/allocation.md, "Profiles derived on the node").
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
from numpy.typing import NDArray

Number = TypeVar("Number", float, NDArray[np.float64])


def training_macs(kind: str, *, forward: int, head: int, frozen: int, epochs: int) -> int:
    """Multiply-accumulates of a whole fine-tuning run, per training sample.

    Args:
        kind: the trainable subset (``head``, ``last-block``, ``bn``, ``adapters``, ``all``).
        forward: MACs of one forward pass of the whole network.
        head: MACs of the head (``in_features * out_features``).
        frozen: MACs of the layers before the last block (``features``; ``last-block`` only).
        epochs: passes over the data.

    Each epoch costs a forward pass plus the backward pass (about twice the forward cost) over
    the layers gradients flow through: the last block and the head for ``last-block``,
    everything for ``bn``, ``adapters`` and ``all``. ``head`` runs the frozen layers once (their
    output is cached) and then trains the head alone.
    """
    if kind == "head":
        return forward + 3 * head * epochs
    if kind == "last-block":
        return (forward + 2 * (forward - frozen)) * epochs
    return 3 * forward * epochs


def cpu_latency_energy(cycles: Number, cpu_hz: Number, kappa: Number) -> tuple[Number, Number]:
    """Time ``C / f`` (s) and energy ``κ C f²`` (J) of ``cycles`` on a CPU at ``cpu_hz``."""
    return cycles / cpu_hz, kappa * cycles * cpu_hz**2
