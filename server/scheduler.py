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
from server.allocation import AllocationProblem, Cell, Device, solve
from server.allocation.generate import equal_share_rate
from server.store import RoundState, Store

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
    """Makes and serves one allocation plan per round.

    The round's state lives in the store (the plan, when it was made, the uploaders it still
    waits for), so every server replica on a shared store serves the same round: the replica
    that finds a round due makes the next plan, and if another replica stored that round first,
    its plan is the one served.
    """

    def __init__(self, store: Store, cell: Cell | None, *, round_timeout_s: float = 600.0) -> None:
        self._store = store
        self._cell = cell
        self._round_timeout_s = round_timeout_s
        self._lock = threading.Lock()
        self._round = 0
        """The round whose plan is cached below."""
        self._round_latency_s = 0.0
        self._decisions: dict[str, Schedule] = {}
        self._selected = 0
        """Uploaders the cached plan selected."""

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
            state = self._store.round_state()
            if state is not None and state.round != self._round:
                self._load()  # another replica (or an earlier run) made this round's plan
            if state is None or self._due(state, node_id):
                self._new_round(self._cell, 0 if state is None else state.round)
            decision = self._decisions.get(node_id)
            if decision is None:
                return Schedule(
                    round=self._round,
                    upload=False,
                    bandwidth_hz=0.0,
                    energy_j=0.0,
                    latency_s=0.0,
                    round_latency_s=self._round_latency_s,
                )
            return decision

    def _due(self, state: RoundState, node_id: str) -> bool:
        """Whether the stored (and cached) round is over for a request of ``node_id``."""
        if self._selected and not state.waiting:
            return True  # every selected uploader committed
        expired = time.time() - state.created_at > self._round_timeout_s
        idle = not self._selected
        if expired and state.waiting:
            logger.warning(
                "round %d timed out waiting for %d uploader(s)", state.round, state.waiting
            )
            return True
        if expired and idle:
            return True
        if idle and node_id not in self._decisions:
            logger.info("round %d selected no uploader; %s joined: new round", state.round, node_id)
            return True
        return False

    def _load(self) -> None:
        """Cache the stored plan of the newest round (made by this replica or another)."""
        last = self._store.last_plan()
        if last is None:
            raise ConflictError("the scheduling round's plan disappeared from the store")
        self._cache(last[0], json.loads(last[1]))

    def _cache(self, round_index: int, doc: dict[str, object]) -> None:
        devices = doc.get("devices", [])
        assert isinstance(devices, list)
        latency = float(str(doc.get("round_latency_s", 0.0)))
        self._round = round_index
        self._round_latency_s = latency
        self._decisions = {
            str(d["id"]): Schedule(
                round=round_index,
                upload=bool(d["upload"]),
                bandwidth_hz=float(d["bandwidth_hz"]),
                energy_j=float(d["energy_j"]),
                latency_s=float(d["latency_s"]),
                round_latency_s=latency,
            )
            for d in devices
        }
        self._selected = sum(1 for d in devices if d["upload"])

    def _new_round(self, cell: Cell, last_round: int) -> None:
        regs = [self._store.get_node(status.node_id) for status in self._store.list_nodes()]
        regs = [reg for reg in regs if reg.profile is not None]
        devices = [device_for(reg, cell, len(regs)) for reg in regs]
        try:
            plan = solve(AllocationProblem.from_devices(devices, cell))
        except InfeasibleAllocationError as exc:
            raise ConflictError(f"this round's allocation is infeasible: {exc}") from exc
        round_index = last_round + 1
        doc = plan.to_json_dict()
        doc["round"] = round_index
        uploaders = [d.id for d in plan.decisions() if d.upload]
        if not self._store.save_plan(round_index, json.dumps(doc), uploaders):
            logger.info("round %d was planned by another replica; serving its plan", round_index)
            self._load()
            return
        self._cache(round_index, doc)
        logger.info(
            "round %d: %d of %d node(s) upload; objective %.4g, gap %.2e, round latency %.3g s",
            round_index,
            len(uploaders),
            len(devices),
            plan.objective,
            plan.gap,
            plan.round_latency_s,
        )
