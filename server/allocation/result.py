"""Output of the allocation solver: the plan, with its certificate, and its JSON form."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from server.allocation.radio import FloatArray


@dataclass(frozen=True)
class DeviceDecision:
    """What one device does this round."""

    id: str
    """Device identifier."""
    upload: bool
    """True: encode and upload; False: fine-tune locally."""
    bandwidth_hz: float
    """Bandwidth share, Hz (0 when not uploading)."""
    energy_j: float
    """Energy the device spends this round, J."""
    latency_s: float
    """Time the device needs this round, s."""


@dataclass(frozen=True, eq=False)
class AllocationPlan:
    """A feasible plan, its objective and a certified lower bound on the optimum.

    Per-device decisions are held as columns (``ids``, ``upload``, ``bandwidth_hz``,
    ``energy_j``, ``latency_s``); :meth:`decisions` turns them into :class:`DeviceDecision` rows.
    """

    objective: float
    """w_E Σ e_k + w_T T evaluated at this plan."""
    lower_bound: float
    """A proven lower bound on the optimal objective."""
    gap: float
    """(objective − lower_bound) / objective, ≥ 0."""
    round_latency_s: float
    """T = max_k τ_k of this plan, s."""
    total_energy_j: float
    """Σ_k e_k of this plan, J."""
    solve_time_s: float
    """Wall-clock time of the solve, s."""
    ids: tuple[str, ...]
    """Device identifiers, in input order."""
    upload: NDArray[np.bool_]
    """(K,) upload decisions x_k."""
    bandwidth_hz: FloatArray
    """(K,) bandwidth b_k, Hz (0 for non-uploaders)."""
    energy_j: FloatArray
    """(K,) device energy e_k, J."""
    latency_s: FloatArray
    """(K,) device time τ_k, s."""
    method: str
    """How the plan was found: ``"enumeration"`` (exact) or ``"lagrangian"``."""

    @property
    def uploaders(self) -> int:
        """Number of devices that upload."""
        return int(self.upload.sum())

    def decisions(self) -> tuple[DeviceDecision, ...]:
        """Return one :class:`DeviceDecision` per device, in input order."""
        return tuple(self._row(i) for i in range(len(self.ids)))

    def decision(self, device_id: str) -> DeviceDecision:
        """Return the decision of one device (linear search; for per-node schedule replies)."""
        return self._row(self.ids.index(device_id))

    def _row(self, i: int) -> DeviceDecision:
        return DeviceDecision(
            id=self.ids[i],
            upload=bool(self.upload[i]),
            bandwidth_hz=float(self.bandwidth_hz[i]),
            energy_j=float(self.energy_j[i]),
            latency_s=float(self.latency_s[i]),
        )

    def to_json_dict(self) -> dict[str, Any]:
        """The plan JSON of docs/allocation.md (plain Python types, ready for ``json.dump``)."""
        up = self.upload.tolist()
        bw = self.bandwidth_hz.tolist()
        en = self.energy_j.tolist()
        lat = self.latency_s.tolist()
        return {
            "objective": self.objective,
            "lower_bound": self.lower_bound,
            "gap": self.gap,
            "round_latency_s": self.round_latency_s,
            "total_energy_j": self.total_energy_j,
            "solve_time_s": self.solve_time_s,
            "devices": [
                {
                    "id": dev_id,
                    "upload": up[i],
                    "bandwidth_hz": bw[i],
                    "energy_j": en[i],
                    "latency_s": lat[i],
                }
                for i, dev_id in enumerate(self.ids)
            ],
        }
