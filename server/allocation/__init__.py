"""Joint energy/latency allocation: who uploads this round, and how the bandwidth is split.

The model and its equations are docs/allocation.md, "The model"; the method and the
lower-bound derivation are in docs/allocation.md.
"""

from __future__ import annotations

from server.allocation.problem import AllocationProblem as AllocationProblem
from server.allocation.problem import Cell as Cell
from server.allocation.problem import Device as Device
from server.allocation.result import AllocationPlan as AllocationPlan
from server.allocation.result import DeviceDecision as DeviceDecision
from server.allocation.solver import solve as solve

__all__ = ["AllocationPlan", "AllocationProblem", "Cell", "Device", "DeviceDecision", "solve"]
