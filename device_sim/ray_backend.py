"""Monte-Carlo draws on a Ray cluster (``latentedge simulate --backend ray``).

Each chunk of draws (``draws_per_session`` of them) of any job is one Ray task, so sweep points
and layers are spread as well as draws; a Ray worker process rebuilds the simulator from its
:class:`~device_sim.runner.SimulatorRecipe` once per run and reuses it for every chunk it gets.
Draw ``d`` takes its noise from streams seeded by ``(seed, d, ...)`` only, so the numbers equal
the local run's whichever worker runs it.

``ray`` is an optional extra (``pip install latentedge[ray]``), imported only here, only when the
backend is made.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence

import numpy as np

from common.ray_session import start_ray
from device_sim.runner import DrawBackend, DrawJob, Simulator, SimulatorRecipe

logger = logging.getLogger(__name__)

"""The one-line error when Ray is asked for but not importable."""


_SIMULATORS: dict[str, Simulator] = {}
"""The simulator of the current run, built once per Ray worker process (keyed by run id)."""


def _draw_chunk(  # noqa: PLR0917  # a Ray task's arguments
    run_id: str,
    recipe: SimulatorRecipe,
    x: np.ndarray,
    y: np.ndarray,
    threads: int,
    job: DrawJob,
    seed: int,
) -> list[float]:
    """Accuracies of ``job``'s draws (a Ray task; Ray reuses its worker processes)."""
    sim = _SIMULATORS.get(run_id)
    if sim is None:
        _SIMULATORS.clear()  # one run at a time per worker: drop the last run's model
        sim = _SIMULATORS[run_id] = recipe.build(threads=threads)
    outputs = sim.predictions(x, job.spec, job.draws, seed, job.tensors)
    return [sim.accuracy(out, y) for _, out in outputs]


class RayDraws(DrawBackend):
    """Draws spread over the CPUs of a Ray cluster, as tasks."""

    def __init__(self, address: str = "") -> None:
        """Join the Ray cluster at ``address``, or start a local one for this process (empty).

        Each task takes one CPU and runs onnxruntime on one thread, so Ray runs one task per
        CPU of the cluster.
        """
        self._ray, self._started = start_ray(address)

    def accuracies(  # noqa: D102
        self, sim: Simulator, x: np.ndarray, y: np.ndarray, jobs: Sequence[DrawJob], seed: int
    ) -> list[list[float]]:
        if not jobs:
            return []
        ray = self._ray
        started = time.perf_counter()
        chunk = sim.config.draws_per_session
        pieces = [
            (j, DrawJob(job.spec, job.draws[k : k + chunk], job.tensors))
            for j, job in enumerate(jobs)
            for k in range(0, len(job.draws), chunk)
        ]
        task = ray.remote(num_cpus=1)(_draw_chunk)
        recipe, xs, ys = ray.put(sim.recipe()), ray.put(x), ray.put(y)
        run_id = uuid.uuid4().hex
        values = ray.get([task.remote(run_id, recipe, xs, ys, 1, p, seed) for _, p in pieces])
        out: list[list[float]] = [[] for _ in jobs]
        for (j, _), part in zip(pieces, values, strict=True):
            out[j].extend(part)
        logger.info(
            "ray: %d job(s), %d draw chunk(s) in %.2f s",
            len(jobs),
            len(pieces),
            time.perf_counter() - started,
        )
        return out

    def close(self) -> None:  # noqa: D102
        if self._started:
            self._ray.shutdown()
