"""A fleet of virtual edge nodes against one real server, round after round.

Every virtual node is an ordinary edge node (``edge/cli.py``: the same shard loading, profile
derivation, registration, schedule request, autoencoder training or fine-tuning, uploads and
evaluation), only many of them share a worker process. The fleet's nodes are split over
``workers`` long-lived workers (node ``i`` always on worker ``i % workers``, so a worker keeps its
nodes' shards and trained encoders between phases); a backend runs the workers:

* :class:`LocalBackend` (the default): one single-process pool per worker, forked from a fork
  server that imported torch once (the driver itself never imports torch);
* :class:`RayBackend`: one Ray actor per worker on a local or remote Ray cluster (``ray`` is an
  optional extra and is imported only here, only when chosen).

A round runs in three phases, each a barrier over all workers, so the server's plan covers
every node and no upload closes a round before every node has asked for it:

1. *schedule*: every node asks ``GetSchedule`` (the first request makes the round's plan);
2. *work*: nodes selected to upload train their autoencoder and upload latents; the others
   fine-tune the base model and upload a delta (or skip, when the server serves no base);
3. *evaluate*: uploaders classify their test split through the server's new classifier
   (fine-tuners evaluated the server's fine-tuned model in phase 2).

The round's summary (:class:`RoundSummary`) counts uploaders and fine-tuners, adds up the bytes
sent and the energy the plan predicts, and gives the plan's round latency and the nodes' test
accuracy.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from common.constants import RETRY_WINDOW_S
from common.datasets import load_dataset
from common.errors import ConfigError, LatentEdgeError, UplinkError
from common.ray_session import start_ray
from common.records import EnergyProfile, Schedule
from common.tls import ClientTls
from edge.cli import (
    EdgeConfig,
    PreparedNode,
    TrainedEncoder,
    branch_for,
    evaluate_latents,
    finetune_config,
    local_data,
    prepare_node,
    run_branch,
)
from edge.uplink import RetryPolicy, UplinkClient

if TYPE_CHECKING:
    from common.datasets import Dataset

logger = logging.getLogger(__name__)

BACKENDS = ("local", "ray")
"""Names of the fleet backends (``--backend``)."""
"""The one-line error when Ray is asked for but not importable."""


@dataclass(frozen=True)
class FleetConfig:
    """What every virtual node of a fleet shares (``latentedge fleet`` flags)."""

    server: str
    """HOST:PORT of the latentedge server."""
    nodes: int
    """Number of virtual nodes N; node ``i`` holds shard ``i/N`` of the data."""
    data: str = "digits"
    """Dataset: ``digits`` or a path (as ``latentedge edge --data``)."""
    rounds: int = 1
    """Scheduling rounds to run."""
    node_prefix: str = "fleet-"
    """Node ids are this prefix followed by the zero-padded node index."""
    latent_dim: int = 8
    """Latent vector length."""
    epochs: int = 1
    """Autoencoder epochs per upload (small: virtual nodes must be cheap)."""
    finetune_epochs: int = 1
    """Fine-tuning epochs per delta."""
    trainable: str = "head"
    """What fine-tuning changes (as ``latentedge edge --trainable``)."""
    delta_encoding: str = "int8"
    """Delta encoding (as ``latentedge edge --delta-encoding``)."""
    latent_dtype: str = "float16"
    """Wire encoding of latents."""
    skew: float = 0.0
    """Non-IID class skew of the shards in [0, 1)."""
    seed: int = 0
    """Seed of sharding and training (the same for every node, as for ``latentedge edge``)."""
    evaluate: bool = True
    """Classify uploaders' test splits through the server after each round."""
    model_cache: str = ""
    """Folder of downloaded models (empty = ~/.cache/latentedge/models)."""
    retry_window_s: float = RETRY_WINDOW_S
    """Seconds each node keeps retrying an unreachable server."""
    tls: ClientTls | None = field(default=None, repr=False)
    """The server's CA (and a client certificate for mutual TLS); None = plaintext."""
    token: str = field(default="", repr=False)
    """Credential sent with every RPC. An admin token acts for every virtual node; a node
    token only for its own id, so a fleet on a server that requires tokens needs an admin one."""
    workers: int = 1
    """Worker processes (local) or actors (Ray); each runs many nodes one after another."""
    samples_per_node: int = 0
    """0: node ``i`` holds shard ``i/N``, an exact partition (a small dataset leaves nodes of a
    large fleet empty). > 0: node ``i`` draws this many training samples, and a third as many
    test samples, from the whole dataset with its own seed ``(seed, i)``: overlapping shards,
    so 1,000 nodes fit on the digits."""

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ConfigError(f"fleet.nodes must be >= 1, got {self.nodes}")
        if self.rounds < 1:
            raise ConfigError(f"fleet.rounds must be >= 1, got {self.rounds}")
        if self.workers < 1:
            raise ConfigError(f"fleet.workers must be >= 1, got {self.workers}")
        if self.samples_per_node < 0:
            raise ConfigError(
                f"fleet.samples_per_node must be >= 0 (0 = exact shards), got "
                f"{self.samples_per_node}"
            )
        if self.epochs < 1 or self.finetune_epochs < 1:
            raise ConfigError(
                f"fleet.epochs and fleet.finetune_epochs must be >= 1, got {self.epochs} and "
                f"{self.finetune_epochs}"
            )
        self.edge_config(0)  # the node settings' own checks (latent_dtype, trainable, ...)

    def node_id(self, index: int) -> str:
        """The id of node ``index``."""
        return f"{self.node_prefix}{index:0{len(str(self.nodes - 1))}d}"

    def edge_config(self, index: int) -> EdgeConfig:
        """The settings of node ``index``, as one ``latentedge edge --scheduled`` would have."""
        config = EdgeConfig(
            server=self.server,
            node_id=self.node_id(index),
            data=self.data,
            shard=f"{index}/{self.nodes}",
            skew=self.skew,
            latent_dim=self.latent_dim,
            epochs=self.epochs,
            seed=self.seed,
            latent_dtype=self.latent_dtype,
            scheduled=True,
            retry_window_s=self.retry_window_s,
            trainable=self.trainable,
            delta_encoding=self.delta_encoding,
            finetune_epochs=self.finetune_epochs,
            model_cache=self.model_cache,
        )
        finetune_config(config)  # refuse a bad trainable / delta encoding up front
        return config


@dataclass(frozen=True)
class FleetNode:
    """One virtual node: its index (and so its id and shard) and its device profile."""

    index: int
    profile: EnergyProfile
    """Hardware and radio; workload fields left at 0 are derived on the node."""
    profile_samples: int = 0
    """Samples the profile's energy budget was made for; > 0 scales the budget to the node's
    shard (the same joules per sample), 0 keeps it."""


@dataclass(frozen=True)
class RoundSummary:
    """What one round of the fleet did (one row of the report)."""

    round: int
    """1-based round of this fleet run."""
    server_round: int
    """The server's round number of the plan the nodes received."""
    uploaded: int
    """Nodes that uploaded latents."""
    finetuned: int
    """Nodes that fine-tuned and uploaded a delta."""
    skipped: int
    """Nodes not selected to upload with no base model to fine-tune."""
    failed: int
    """Nodes whose round failed (their errors are in ``errors``)."""
    uploaded_bytes: int
    """Payload bytes of all uploads (latents + deltas)."""
    predicted_energy_j: float
    """Energy the plan predicts for all nodes (J)."""
    predicted_latency_s: float
    """The plan's round latency (s)."""
    accuracy: float | None
    """Test accuracy over the nodes evaluated (None when none had test samples)."""
    test_samples: int
    """Test samples behind ``accuracy``."""
    wall_s: float
    """Wall time of the round (s)."""
    phase_s: dict[str, float] = field(default_factory=dict)
    """Wall time of each phase (schedule, work, evaluate), s."""
    errors: list[str] = field(default_factory=list)
    """The first few node errors."""
    uploader_ids: list[str] = field(default_factory=list)
    """Ids of the nodes that uploaded latents."""


@dataclass(frozen=True)
class FleetReport:
    """The whole run."""

    nodes: int
    workers: int
    backend: str
    setup_s: float
    """Start-up: workers and registration of every node (s)."""
    rounds: list[RoundSummary]
    registration_failed: int = 0
    """Nodes that could not register (they take no part in the rounds)."""
    registration_errors: list[str] = field(default_factory=list)
    """The first few registration errors."""

    def to_json_dict(self) -> dict[str, Any]:
        """Plain Python types, ready for ``json.dump``."""
        return asdict(self)


# -- the worker: many virtual nodes in one process -----------------------------------------------


@dataclass
class _NodeState:
    node: PreparedNode
    has_base: bool
    encoder: TrainedEncoder | None = None
    """The encoder of this round's latents upload (kept for the evaluate phase)."""


class FleetWorker:
    """Runs the phases of a round for the nodes it is given (one per process or actor)."""

    def __init__(self, config: FleetConfig) -> None:
        import torch  # noqa: PLC0415  # in the worker only: the driver stays torch-free

        torch.set_num_threads(1)  # many small models; the workers share the cores
        self._config = config
        self._client: UplinkClient | None = None
        self._dataset: Dataset | None = None
        self._nodes: dict[int, _NodeState] = {}

    def _uplink(self) -> UplinkClient:
        if self._client is None:
            retry = RetryPolicy(window_s=self._config.retry_window_s)
            self._client = UplinkClient(
                self._config.server, retry=retry, tls=self._config.tls, token=self._config.token
            ).__enter__()
        return self._client

    def _shard(self, config: EdgeConfig, index: int) -> Dataset:
        if self._dataset is None:
            self._dataset = load_dataset(self._config.data)
        n = self._config.samples_per_node
        if n == 0:
            return local_data(config, loaded=self._dataset)
        whole = self._dataset
        rng = np.random.default_rng([self._config.seed, index])
        train = rng.choice(len(whole.y_train), min(n, len(whole.y_train)), replace=False)
        m = min(max(1, n // 3), len(whole.y_test))
        test = rng.choice(len(whole.y_test), m, replace=False)
        return replace(
            whole,
            x_train=whole.x_train[train],
            y_train=whole.y_train[train],
            x_test=whole.x_test[test],
            y_test=whole.y_test[test],
        )

    def register(self, nodes: Sequence[FleetNode]) -> list[dict[str, Any]]:
        """Prepare and register ``nodes``; returns one result per node."""
        client = self._uplink()
        results = []
        for spec in nodes:
            config = self._config.edge_config(spec.index)
            try:
                data = self._shard(config, spec.index)
                profile = spec.profile
                if spec.profile_samples > 0:
                    scale = len(data.y_train) / spec.profile_samples
                    profile = replace(profile, energy_budget_j=profile.energy_budget_j * scale)
                node = prepare_node(client, config, profile, data=data)
                client.register(node.registration)
            except LatentEdgeError as exc:
                results.append({"node_id": config.node_id, "error": str(exc)})
                continue
            self._nodes[spec.index] = _NodeState(node, has_base=node.base is not None)
            results.append({"node_id": config.node_id})
        return results

    def schedule(self, indices: Sequence[int]) -> list[Schedule | str]:
        """Each node's decision for the round (or its error text)."""
        client = self._uplink()
        out: list[Schedule | str] = []
        for index in indices:
            try:
                out.append(client.schedule(self._config.node_id(index)))
            except LatentEdgeError as exc:
                out.append(str(exc))
        return out

    def work(self, tasks: Sequence[tuple[int, Schedule]]) -> list[dict[str, Any]]:
        """Run each ``(node index, its schedule)``'s branch; returns the nodes' report fields."""
        from edge.transfer import fetch_base  # noqa: PLC0415  # torch: in the worker only

        client = self._uplink()
        results = []
        for index, sched in tasks:
            state = self._nodes[index]
            node = state.node
            branch = branch_for(sched, has_base=state.has_base)
            node.report = {"node_id": node.config.node_id, "branch": branch}
            state.encoder = None
            try:
                if branch == "finetune":  # this round's base (the server may have aggregated)
                    node.base = fetch_base(client, node.config.node_id, node.ft)
                state.encoder = run_branch(client, node, branch)
            except LatentEdgeError as exc:
                node.report["error"] = str(exc)
            results.append(_node_result(node.report))
        return results

    def evaluate(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Classify the test split of this round's uploaders among ``indices``."""
        client = self._uplink()
        results = []
        covered: set[str] = set()
        """Nodes the newest finished classifier covers (one wait serves many nodes)."""
        for index in indices:
            state = self._nodes[index]
            if state.encoder is None:
                continue
            node = state.node
            node_id = node.config.node_id
            report: dict[str, Any] = {"node_id": node_id}
            try:
                if len(node.data.y_test) and node_id not in covered:
                    covered = set(client.wait_for_classifier(node_id).classifier.nodes)
                evaluate_latents(client, node.config, node.data, state.encoder, report, wait=False)
            except LatentEdgeError as exc:
                report["error"] = str(exc)
            state.encoder = None
            results.append(_node_result(report))
        return results

    def close(self, _: object = None) -> None:
        """Close the worker's connection (the argument is the backends' calling convention)."""
        if self._client is not None:
            self._client.__exit__(None, None, None)
            self._client = None


_RESULT_KEYS = ("node_id", "branch", "uploaded_bytes", "accuracy", "correct", "test_samples")


def _node_result(report: dict[str, Any]) -> dict[str, Any]:
    """The fields of a node's report the round summary needs (small, to cross processes)."""
    out = {k: report[k] for k in _RESULT_KEYS if k in report}
    if "error" in report:
        out["error"] = report["error"]
    return out


# -- backends ------------------------------------------------------------------------------------


class FleetBackend(abc.ABC):
    """Runs one :class:`FleetWorker` per worker slot and calls a method on all of them."""

    workers: int

    @abc.abstractmethod
    def call(self, method: str, args: Sequence[Any]) -> list[Any]:
        """``worker[k].method(args[k])`` for every worker at once; results in worker order."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop the workers (and what the backend started)."""


_WORKER: FleetWorker | None = None
"""The worker of this pool process (local backend)."""


def _init_worker(config: FleetConfig) -> None:
    global _WORKER  # noqa: PLW0603  # one worker per pool process, made by the pool's initializer
    _WORKER = FleetWorker(config)


def _call_worker(method: str, arg: Any) -> Any:
    assert _WORKER is not None
    return getattr(_WORKER, method)(arg)


class LocalBackend(FleetBackend):
    """One single-process pool per worker: worker ``k`` is always the same process."""

    def __init__(self, config: FleetConfig) -> None:
        self.workers = config.workers
        # a fork server imports torch once and forks every worker from it (not from this
        # process, so no gRPC channel or thread of the driver is forked)
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["edge.transfer", "edge.trainer"])
        self._pools = [
            ProcessPoolExecutor(
                max_workers=1, mp_context=context, initializer=_init_worker, initargs=(config,)
            )
            for _ in range(config.workers)
        ]

    def call(self, method: str, args: Sequence[Any]) -> list[Any]:  # noqa: D102
        futures = [
            pool.submit(_call_worker, method, arg)
            for pool, arg in zip(self._pools, args, strict=True)
        ]
        return [f.result() for f in futures]

    def close(self) -> None:  # noqa: D102
        with contextlib.suppress(Exception):  # best effort: the processes exit next anyway
            self.call("close", [None] * self.workers)
        for pool in self._pools:
            pool.shutdown(wait=True, cancel_futures=True)


class RayBackend(FleetBackend):
    """One Ray actor per worker, on the cluster at ``address`` or on a local one started here."""

    def __init__(self, config: FleetConfig, address: str = "") -> None:
        ray, self._started = start_ray(address)
        self._ray = ray
        self.workers = config.workers
        actor = ray.remote(num_cpus=0)(FleetWorker)
        self._actors = [actor.remote(config) for _ in range(config.workers)]

    def call(self, method: str, args: Sequence[Any]) -> list[Any]:  # noqa: D102
        refs = [getattr(a, method).remote(arg) for a, arg in zip(self._actors, args, strict=True)]
        return list(self._ray.get(refs))

    def close(self) -> None:  # noqa: D102
        with contextlib.suppress(Exception):  # best effort: the actors are killed next anyway
            self.call("close", [None] * self.workers)
        for a in self._actors:
            self._ray.kill(a)
        if self._started:
            self._ray.shutdown()


def make_backend(name: str, config: FleetConfig, *, ray_address: str = "") -> FleetBackend:
    """The backend called ``name`` (``local`` or ``ray``) with ``config.workers`` workers."""
    if name == "local":
        if ray_address:
            raise ConfigError("--ray-address needs --backend ray")
        return LocalBackend(config)
    if name == "ray":
        return RayBackend(config, ray_address)
    raise ConfigError(f"--backend must be one of {list(BACKENDS)}, got {name!r}")


# -- the driver ----------------------------------------------------------------------------------


def _split(items: Sequence[Any], workers: int, key: Callable[[Any], int]) -> list[list[Any]]:
    """``items`` by worker: the one whose node index is ``k`` modulo ``workers`` goes to ``k``."""
    out: list[list[Any]] = [[] for _ in range(workers)]
    for item in items:
        out[key(item) % workers].append(item)
    return out


def run_fleet(
    config: FleetConfig,
    nodes: Sequence[FleetNode],
    backend: FleetBackend,
    *,
    backend_name: str = "",
    on_round: Callable[[RoundSummary], None] | None = None,
) -> FleetReport:
    """Register ``nodes`` and run ``config.rounds`` scheduled rounds on ``backend``.

    Raises:
        UplinkError: no node could register (the server is down or refuses every node).
    """
    w = backend.workers
    started = time.perf_counter()
    registered = [
        r for part in backend.call("register", _split(nodes, w, lambda n: n.index)) for r in part
    ]
    failed = [r for r in registered if "error" in r]
    if len(failed) == len(registered):
        raise UplinkError(f"no node of the fleet registered; first error: {failed[0]['error']}")
    if failed:
        logger.warning("%d node(s) failed to register; first: %s", len(failed), failed[0]["error"])
    ok = sorted(
        n.index for n in nodes if config.node_id(n.index) not in {f["node_id"] for f in failed}
    )
    setup_s = time.perf_counter() - started
    logger.info("fleet: %d node(s) registered on %d worker(s) in %.2f s", len(ok), w, setup_s)
    by_worker = _split(ok, w, lambda i: i)
    summaries: list[RoundSummary] = []
    for r in range(1, config.rounds + 1):
        summary = _round(config, backend, by_worker, r)
        if summaries and summary.server_round == summaries[-1].server_round:
            why = (
                f"the server did not start a new round (still round {summary.server_round}): "
                "its plan waits for uploads of nodes outside this fleet, or selected no uploader"
            )
            summary = replace(summary, failed=summary.failed + 1, errors=[why, *summary.errors])
        summaries.append(summary)
        if on_round is not None:
            on_round(summaries[-1])
    return FleetReport(
        nodes=len(nodes),
        workers=w,
        backend=backend_name,
        setup_s=setup_s,
        rounds=summaries,
        registration_failed=len(failed),
        registration_errors=[f"{f['node_id']}: {f['error']}" for f in failed[:5]],
    )


def _round(
    config: FleetConfig, backend: FleetBackend, by_worker: list[list[int]], number: int
) -> RoundSummary:
    t0 = time.perf_counter()
    decisions = backend.call("schedule", by_worker)
    t1 = time.perf_counter()
    errors: list[str] = []
    tasks: list[list[tuple[int, Schedule]]] = []
    schedules: list[Schedule] = []
    for indices, answers in zip(by_worker, decisions, strict=True):
        mine = []
        for index, answer in zip(indices, answers, strict=True):
            if isinstance(answer, str):
                errors.append(f"{config.node_id(index)}: {answer}")
                continue
            schedules.append(answer)
            mine.append((index, answer))
        tasks.append(mine)
    results = [r for part in backend.call("work", tasks) for r in part]
    t2 = time.perf_counter()
    evaluated: list[dict[str, Any]] = []
    if config.evaluate:
        evaluated = [r for part in backend.call("evaluate", by_worker) for r in part]
    t3 = time.perf_counter()
    for r in results + evaluated:
        if "error" in r:
            errors.append(f"{r['node_id']}: {r['error']}")
    scored = [r for r in results + evaluated if "correct" in r and r.get("test_samples")]
    test_samples = sum(int(r["test_samples"]) for r in scored)
    correct = sum(int(r["correct"]) for r in scored)
    rounds = {s.round for s in schedules}
    if len(rounds) > 1:
        errors.append(f"nodes received plans of several server rounds: {sorted(rounds)}")
    return RoundSummary(
        round=number,
        server_round=max(rounds, default=0),
        uploaded=sum(1 for r in results if r.get("branch") == "latents" and "error" not in r),
        finetuned=sum(1 for r in results if r.get("branch") == "finetune" and "error" not in r),
        skipped=sum(1 for r in results if r.get("branch") == "skip"),
        failed=len(errors),
        uploaded_bytes=sum(int(r.get("uploaded_bytes", 0)) for r in results),
        predicted_energy_j=sum(s.energy_j for s in schedules),
        predicted_latency_s=max((s.round_latency_s for s in schedules), default=0.0),
        accuracy=correct / test_samples if test_samples else None,
        test_samples=test_samples,
        wall_s=t3 - t0,
        phase_s={"schedule": t1 - t0, "work": t2 - t1, "evaluate": t3 - t2},
        errors=errors[:5],
        uploader_ids=sorted(
            r["node_id"] for r in results if r.get("branch") == "latents" and "error" not in r
        ),
    )
