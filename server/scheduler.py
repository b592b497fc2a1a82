"""Per-round scheduling: which registered nodes upload, and with how much bandwidth.

Each round the server solves the joint energy/latency allocation (``server.allocation``)
over the registered nodes that reported an energy profile. A round's plan is made at the
first schedule request, and a new round starts once every node selected to upload has
committed an upload. A node that registers after its round's plan was made waits for the next
round (``upload=False``): a plan, once handed out, is never changed under the nodes holding it.
A round whose selected nodes have not all uploaded within ``round_timeout_s`` is closed anyway,
so one silent node cannot stall the cell. A round that selects no uploader has nothing to wait
for: it closes as soon as a node outside its plan asks (so late joiners are scheduled), or after
``round_timeout_s``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict

import numpy as np

from common.errors import ConflictError, InfeasibleAllocationError
from common.records import NodeRegistration, Schedule
from server.allocation import AllocationPlan, AllocationProblem, Cell, Device, solve
from server.allocation.generate import equal_share_rate
from server.store import Store

logger = logging.getLogger(__name__)


def device_for(reg: NodeRegistration, cell: Cell | None = None, share_of: int = 1) -> Device:
    """The allocation row of a registered node with a profile.

    A node that does not upload latents fine-tunes and sends its delta (``delta_bits``); the
    delta's air time at an equal share ``B / share_of`` of the cell's bandwidth,
    ``t = delta_bits / (b log2(1 + p g / (N0 b)))``, and its energy ``p t`` are added to the
    profile's fine-tuning latency and energy (not without a cell).

    Raises:
        AllocationError: the profile breaks the allocation model's rules.
    """
    assert reg.profile is not None
    fields = asdict(reg.profile)
    delta_bits = fields.pop("delta_bits")
    if delta_bits > 0 and cell is not None:
        p = reg.profile
        b = cell.bandwidth_hz / max(1, share_of)
        rate = float(
            equal_share_rate(
                b, np.asarray(p.tx_power_w), np.asarray(p.channel_gain), cell.noise_psd_w_per_hz
            )
        )
        if rate > 0:
            seconds = delta_bits / rate
            fields["finetune_latency_s"] += seconds
            fields["finetune_energy_j"] += reg.profile.tx_power_w * seconds
    return Device(id=reg.node_id, samples=reg.samples, **fields)


class RoundScheduler:
    """Makes and serves one allocation plan per round."""

    def __init__(self, store: Store, cell: Cell | None, *, round_timeout_s: float = 600.0) -> None:
        self._store = store
        self._cell = cell
        self._round_timeout_s = round_timeout_s
        self._opened_at = 0.0
        self._lock = threading.Lock()
        last = store.last_plan()
        self._round = last[0] if last else 0
        self._plan: AllocationPlan | None = None
        self._decisions: dict[str, Schedule] = {}
        self._waiting: set[str] = set()
        self._selected = 0
        """Uploaders the current plan selected."""
        self._closed = False

    def schedule(self, node_id: str) -> Schedule:
        """This round's decision for ``node_id`` (making the round's plan when due).

        Raises:
            ConflictError: scheduling is off, the node has no profile, or the plan is infeasible.
            NotFoundError: the node is not registered.
        """
        if self._cell is None:
            raise ConflictError(
                "scheduling is off: start the server with a [cell] table in its --config"
            )
        node = self._store.get_node(node_id)
        if node.profile is None:
            raise ConflictError(
                f"node {node_id!r} registered without an energy profile; add a [profile] "
                "table to its config to take part in scheduling"
            )
        with self._lock:
            expired = time.monotonic() - self._opened_at > self._round_timeout_s
            idle = self._plan is not None and not self._selected
            overdue = expired and (bool(self._waiting) or idle)
            if overdue and self._waiting:
                logger.warning(
                    "round %d timed out waiting for %s", self._round, sorted(self._waiting)
                )
            joiner = idle and node_id not in self._decisions
            if joiner:
                logger.info(
                    "round %d selected no uploader; %s joined: new round", self._round, node_id
                )
            if self._plan is None or self._closed or overdue or joiner:
                self._new_round(self._cell)
            decision = self._decisions.get(node_id)
            if decision is None:
                assert self._plan is not None
                return Schedule(
                    round=self._round,
                    upload=False,
                    bandwidth_hz=0.0,
                    energy_j=0.0,
                    latency_s=0.0,
                    round_latency_s=self._plan.round_latency_s,
                )
            return decision

    def on_node_removed(self, node_id: str) -> None:
        """A removed node is no longer awaited this round."""
        with self._lock:
            if node_id in self._waiting:
                self._waiting.discard(node_id)
                self._closed = not self._waiting

    def on_upload_committed(self, node_id: str) -> None:
        """Count a committed upload towards closing the round."""
        with self._lock:
            if node_id in self._waiting:
                self._waiting.discard(node_id)
                self._closed = not self._waiting

    def _new_round(self, cell: Cell) -> None:
        regs = [self._store.get_node(status.node_id) for status in self._store.list_nodes()]
        regs = [reg for reg in regs if reg.profile is not None]
        devices = [device_for(reg, cell, len(regs)) for reg in regs]
        try:
            plan = solve(AllocationProblem.from_devices(devices, cell))
        except InfeasibleAllocationError as exc:
            raise ConflictError(f"this round's allocation is infeasible: {exc}") from exc
        self._round += 1
        doc = plan.to_json_dict()
        doc["round"] = self._round
        self._store.save_plan(self._round, json.dumps(doc))
        self._plan = plan
        self._decisions = {
            d.id: Schedule(
                round=self._round,
                upload=d.upload,
                bandwidth_hz=d.bandwidth_hz,
                energy_j=d.energy_j,
                latency_s=d.latency_s,
                round_latency_s=plan.round_latency_s,
            )
            for d in plan.decisions()
        }
        self._waiting = {d.id for d in plan.decisions() if d.upload}
        self._selected = len(self._waiting)
        self._closed = False
        self._opened_at = time.monotonic()
        logger.info(
            "round %d: %d of %d node(s) upload; objective %.4g, gap %.2e, round latency %.3g s",
            self._round,
            len(self._waiting),
            len(devices),
            plan.objective,
            plan.gap,
            plan.round_latency_s,
        )
