"""``latentedge fleet``: N virtual edge nodes against a running server, round after round.

    latentedge fleet --nodes 1000 --server HOST:PORT [--devices devices.csv] [--data digits]
        [--backend local|ray] [--ray-address ADDR] [--rounds R] [--out report.json]

Node ``i`` holds shard ``i/N`` of the data and the device profile of row ``i`` of the devices
file (``latentedge allocate generate``), or of a fleet drawn here with the same generator
(``--regime``, ``--seed``). From a row it takes the hardware and radio (``cpu_hz``, ``kappa``,
``tx_power_w``, ``channel_gain``) and the energy budget, scaled from the row's ``samples`` to
the node's shard (the same joules per sample); the workload fields (bits and cycles of an
upload, cost of fine-tuning, delta bits) are derived on the node from its shard and models, as
``latentedge edge`` does. The server needs a ``[cell]`` table to schedule rounds.

The fleet lives in ``edge/fleet.py``; this module (in the umbrella package, which may use the
server's allocation code) only builds the nodes' profiles, runs it and prints the rounds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
from pathlib import Path

from common.errors import ConfigError, UplinkError
from common.records import EnergyProfile
from common.tls import (
    add_client_tls_flags,
    add_client_token_flags,
    check_address,
    client_tls_from_args,
    client_token_from_args,
)
from edge.fleet import FleetConfig, FleetNode, RoundSummary, make_backend, run_fleet

logger = logging.getLogger(__name__)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``fleet`` flags."""
    parser.add_argument("--nodes", type=int, required=True, help="number of virtual nodes N")
    parser.add_argument("--server", required=True, help="HOST:PORT of the server")
    add_client_tls_flags(parser)
    add_client_token_flags(parser)
    parser.add_argument(
        "--devices",
        type=Path,
        help="devices CSV (latentedge allocate generate): row i is node i's device profile "
        "(default: draw N devices with --regime and --seed)",
    )
    parser.add_argument(
        "--regime", default="competitive", help="without --devices: the generator's regime"
    )
    parser.add_argument("--data", default="digits", help="digits | PATH (default: digits)")
    parser.add_argument(
        "--backend", choices=["local", "ray"], default="local", help="local processes or Ray"
    )
    parser.add_argument(
        "--ray-address", dest="ray_address", default="", help="Ray cluster to join (ray backend)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="scheduling rounds (default: 1)")
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="worker processes / Ray actors, each running many nodes (default: one per CPU)",
    )
    parser.add_argument(
        "--node-prefix", dest="node_prefix", default="fleet-", help="node id prefix (fleet-)"
    )
    parser.add_argument("--latent-dim", dest="latent_dim", type=int, default=8, help="(8)")
    parser.add_argument("--epochs", type=int, default=1, help="autoencoder epochs per upload (1)")
    parser.add_argument(
        "--finetune-epochs", dest="finetune_epochs", type=int, default=1, help="(1)"
    )
    parser.add_argument("--trainable", default="head", help="what fine-tuning changes (head)")
    parser.add_argument(
        "--delta-encoding", dest="delta_encoding", default="int8", help="delta encoding (int8)"
    )
    parser.add_argument(
        "--latent-dtype",
        dest="latent_dtype",
        choices=["float32", "float16", "int8"],
        default="float16",
    )
    parser.add_argument(
        "--samples-per-node",
        dest="samples_per_node",
        type=int,
        default=0,
        help="0: node i holds shard i/N (exact partition; default); K > 0: each node draws K "
        "training samples (and K/3 test samples) of its own, overlapping other nodes' (for "
        "fleets larger than the data allows)",
    )
    parser.add_argument("--skew", type=float, default=0.0, help="non-IID class skew (0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of shards, training, devices")
    parser.add_argument(
        "--evaluate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="classify uploaders' test splits through the server each round (default: on)",
    )
    parser.add_argument(
        "--model-cache", dest="model_cache", default="", help="downloaded models folder"
    )
    parser.add_argument(
        "--retry-window-s", dest="retry_window_s", type=float, default=60.0, help="(60 s)"
    )
    parser.add_argument("--out", type=Path, help="write the JSON report here")


def fleet_nodes(
    count: int, *, devices: Path | None = None, regime: str = "competitive", seed: int = 0
) -> list[FleetNode]:
    """``count`` nodes with the device profiles of ``devices`` rows, or drawn by the generator.

    Raises:
        AllocationError: a malformed devices file or an unknown regime.
        ConfigError: fewer device rows than nodes.
    """
    import numpy as np

    from server.allocation.generate import generate
    from server.allocation.io import read_devices_csv
    from server.allocation.problem import Cell

    if devices is not None:
        # the cell is not read from a devices file; the server's [cell] schedules the rounds
        placeholder = Cell(
            bandwidth_hz=1.0,
            noise_psd_w_per_hz=1.0,
            min_samples=0,
            weight_energy=1.0,
            weight_latency=0.0,
        )
        rows = read_devices_csv(devices, placeholder).devices()
        if len(rows) < count:
            raise ConfigError(
                f"--devices {str(devices)!r} has {len(rows)} device row(s); --nodes "
                f"{count} needs at least that many"
            )
    else:
        rows = generate(count, np.random.default_rng(seed), regime).devices()
    return [
        FleetNode(
            index=i,
            profile=EnergyProfile(
                cpu_hz=d.cpu_hz,
                kappa=d.kappa,
                tx_power_w=d.tx_power_w,
                channel_gain=d.channel_gain,
                energy_budget_j=d.energy_budget_j,
            ),
            profile_samples=int(d.samples),
        )
        for i, d in enumerate(rows[:count])
    ]


def _round_line(s: RoundSummary, rounds: int) -> str:
    acc = "n/a" if s.accuracy is None else f"{s.accuracy:.4f} on {s.test_samples} samples"
    return (
        f"round {s.round}/{rounds} (server round {s.server_round}): {s.uploaded} uploaded, "
        f"{s.finetuned} fine-tuned, {s.skipped} skipped, {s.failed} failed; "
        f"{s.uploaded_bytes} bytes; predicted {s.predicted_energy_j:.4g} J, round latency "
        f"{s.predicted_latency_s:.4g} s; accuracy {acc}; {s.wall_s:.2f} s"
    )


def run(args: argparse.Namespace) -> int:
    """Run the fleet; one progress line per round on stderr, a summary on stdout."""
    check_address(args.server, "--server")
    if args.workers < 0:
        raise ConfigError(f"--workers must be >= 0 (0 = one per CPU), got {args.workers}")
    if args.nodes < 1:
        raise ConfigError(f"--nodes must be >= 1, got {args.nodes}")
    config = FleetConfig(
        server=args.server,
        nodes=args.nodes,
        data=args.data,
        rounds=args.rounds,
        node_prefix=args.node_prefix,
        latent_dim=args.latent_dim,
        epochs=args.epochs,
        finetune_epochs=args.finetune_epochs,
        trainable=args.trainable,
        delta_encoding=args.delta_encoding,
        latent_dtype=args.latent_dtype,
        skew=args.skew,
        seed=args.seed,
        evaluate=args.evaluate,
        model_cache=args.model_cache,
        retry_window_s=args.retry_window_s,
        tls=client_tls_from_args(args),
        token=client_token_from_args(args),
        samples_per_node=args.samples_per_node,
        workers=min(args.nodes, args.workers or os.cpu_count() or 1),
    )
    nodes = fleet_nodes(args.nodes, devices=args.devices, regime=args.regime, seed=args.seed)

    def progress(summary: RoundSummary) -> None:
        sys.stderr.write(_round_line(summary, config.rounds) + "\n")

    backend = make_backend(args.backend, config, ray_address=args.ray_address)
    try:
        report = run_fleet(
            config,
            nodes,
            backend,
            backend_name=args.backend,
            on_round=progress,
        )
    finally:
        backend.close()
    if args.out is not None:
        try:
            args.out.write_text(json.dumps(report.to_json_dict(), indent=2) + "\n")
        except OSError as exc:
            raise ConfigError(f"cannot write --out {str(args.out)!r}: {exc}") from exc
    rounds = report.rounds
    sys.stdout.write(
        f"fleet of {report.nodes} nodes on {report.workers} {args.backend} worker(s): "
        f"set-up {report.setup_s:.2f} s; {len(rounds)} round(s), median "
        f"{statistics.median(s.wall_s for s in rounds):.2f} s per round\n"
    )
    for s in rounds:
        sys.stdout.write(_round_line(s, config.rounds) + "\n")
    if report.registration_failed:
        raise UplinkError(
            f"{report.registration_failed} node(s) could not register; first: "
            f"{report.registration_errors[0]}"
        )
    failed = sum(s.failed for s in rounds)
    if failed:
        first = next(e for s in rounds for e in s.errors)
        raise UplinkError(f"{failed} node round(s) failed; first: {first}")
    return 0
