"""Analog device simulator: run any float ONNX graph with analog non-idealities, Monte Carlo.

Imports only numpy, onnx, onnxruntime and ``common.errors`` (no torch, no matplotlib).
"""

from __future__ import annotations

from device_sim.noise import NOISE_KINDS as NOISE_KINDS
from device_sim.noise import NoiseModel as NoiseModel
from device_sim.noise import NoiseSpec as NoiseSpec
from device_sim.noise import parse_noise_spec as parse_noise_spec
from device_sim.noise import parse_sweep as parse_sweep
from device_sim.report import PerLayerReport as PerLayerReport
from device_sim.report import SimulationReport as SimulationReport
from device_sim.report import SweepReport as SweepReport
from device_sim.runner import RunnerConfig as RunnerConfig
from device_sim.runner import Simulator as Simulator
from device_sim.runner import simulate as simulate
from device_sim.runner import simulate_per_layer as simulate_per_layer
from device_sim.runner import simulate_sweep as simulate_sweep

__all__ = [
    "NOISE_KINDS",
    "NoiseModel",
    "NoiseSpec",
    "PerLayerReport",
    "RunnerConfig",
    "SimulationReport",
    "Simulator",
    "SweepReport",
    "parse_noise_spec",
    "parse_sweep",
    "simulate",
    "simulate_per_layer",
    "simulate_sweep",
]
