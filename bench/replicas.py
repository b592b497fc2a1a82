"""Server replicas on PostgreSQL: ingest throughput of one vs two replicas, and correctness.

Each repeat runs, interleaved (machine noise hits all alike), the same ``--clients`` edge
processes (bench/ingest.py's clients: register, then stream ``--samples`` x ``--latent-dim``
float32 latents through :class:`~edge.uplink.UplinkClient`) against:

* ``sqlite``: one ``latentedge server`` on a SQLite file (the embedded default, baseline);
* ``pg-1``/``pg-2``: one / two replicas on one PostgreSQL database, payloads in the database;
* ``pg-seg-1``/``pg-seg-2``: the same with a shared ``--payload-dir`` (segment files).

With two replicas, client *i* talks to replica *i mod 2*. PostgreSQL is a fresh local cluster
with its durable defaults (``fsync=on``, ``synchronous_commit=on``), started here as the tests
start theirs. After every run the bench checks, through **every** replica: each node's stored
samples and bytes are exactly what was sent, and re-sending one upload id through the other
replica is deduplicated (nothing stored twice). Throughput = payload bytes / wall time from
the first client's first byte to the last ack; medians over repeats, and the ratio to ``pg-1``.

    .venv/bin/python bench/replicas.py [--clients 8] [--samples 50000] [--latent-dim 64]
        [--repeats 3] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import shutil
import statistics
import sys
import tempfile
from dataclasses import asdict
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.ingest import (  # noqa: E402
    NUM_CLASSES,
    RssSampler,
    ingest_client_main,
    make_payload,
    run_clients,
    start_latentedge_server,
    stop_process,
    summarise,
)
from common.constants import CHUNK_BYTES  # noqa: E402
from common.records import UploadMode  # noqa: E402
from edge.uplink import UplinkClient  # noqa: E402
from tests.support_postgres import PostgresServer, start_postgres  # noqa: E402

logger = logging.getLogger("bench.replicas")

SETUPS = ("sqlite", "pg-1", "pg-2", "pg-seg-1", "pg-seg-2")


def replica_client_main(
    addresses: str, index: int, args: dict[str, int], barrier: Barrier, results: mp.Queue[Any]
) -> None:
    """bench/ingest.py's client, on replica ``index mod replicas``."""
    choices = addresses.split(",")
    ingest_client_main(choices[index % len(choices)], index, args, barrier, results)


def verify(addresses: list[str], clients: int, args: dict[str, int]) -> None:
    """Every replica sees every node's data exactly once; a re-sent upload is deduplicated."""
    expected_samples = args["samples"]
    for address in addresses:
        with UplinkClient(address) as client:
            nodes = {n.node_id: n for n in client.status().nodes}
            for i in range(clients):
                node = nodes.get(f"bench-{i}")
                if node is None or node.samples != expected_samples or node.uploads != 1:
                    raise AssertionError(
                        f"{address}: bench-{i} is {node}, expected one upload "
                        f"of {expected_samples} samples"
                    )
    # client 0 uploaded through replica 0 with an id the client chose; re-send it through the
    # last replica under an explicit id: first stored, then deduplicated there and everywhere
    latents, labels = make_payload(64, args["latent_dim"], seed=99)
    acks = []
    for address in (addresses[-1], addresses[0]):
        with UplinkClient(address) as client:
            acks.append(
                client.push_latents(
                    "bench-0",
                    latents,
                    labels,
                    num_classes=NUM_CLASSES,
                    mode=UploadMode.APPEND,
                    upload_id="bench-resend",
                )
            )
    first, again = acks
    with UplinkClient(addresses[0]) as client:
        stored = {n.node_id: n.samples for n in client.status().nodes}["bench-0"]
    if first.deduplicated or not again.deduplicated or stored != expected_samples + 64:
        raise AssertionError(f"re-sent upload: first {first}, again {again}, stored {stored}")


def run_setup(
    ctx: mp.context.SpawnContext,
    setup: str,
    pg: PostgresServer,
    args: dict[str, int],
    workdir: Path,
) -> dict[str, Any]:
    run_dir = Path(tempfile.mkdtemp(prefix=f"{setup}-", dir=workdir))
    replicas = 2 if setup.endswith("-2") else 1
    extra: list[str] = []
    if setup == "sqlite":
        db = str(run_dir / "server.db")
    else:
        db = pg.new_database()
        if setup.startswith("pg-seg"):
            (run_dir / "payloads").mkdir()
            extra = ["--payload-dir", str(run_dir / "payloads")]
    procs = []
    try:
        for r in range(replicas):
            procs.append(start_latentedge_server(db, run_dir / f"server-{r}.log", *extra))
        addresses = [address for _proc, address in procs]
        with RssSampler(procs[0][0].pid, 0.05) as rss:
            out = run_clients(ctx, replica_client_main, ",".join(addresses), args["clients"], args)
        result = summarise(setup, out, rss, 0.05)
        verify(addresses, args["clients"], args)
    finally:
        for proc, _address in procs:
            stop_process(proc)
        shutil.rmtree(run_dir, ignore_errors=True)
    return {"setup": setup, "replicas": replicas, "mb_per_s": result.mb_per_s, **asdict(result)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--clients", type=int, default=8, help="concurrent edge processes")
    p.add_argument("--samples", type=int, default=50_000, help="latent rows per client")
    p.add_argument("--latent-dim", type=int, default=64, help="latent size (float32)")
    p.add_argument("--repeats", type=int, default=3, help="rounds of every setup (medians)")
    p.add_argument("--setups", nargs="+", default=list(SETUPS), choices=SETUPS)
    p.add_argument("--out", type=Path, default=None, help="write all results as JSON here")
    a = p.parse_args(argv)
    if min(a.clients, a.samples, a.latent_dim, a.repeats) < 1:
        p.error("--clients, --samples, --latent-dim and --repeats must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = {
        "clients": a.clients,
        "samples": a.samples,
        "latent_dim": a.latent_dim,
        "chunk_bytes": CHUNK_BYTES,
    }
    ctx = mp.get_context("spawn")
    workdir = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    pg = start_postgres(durable=True)
    rows: list[dict[str, Any]] = []
    try:
        for repeat in range(a.repeats):
            for setup in a.setups:
                row = run_setup(ctx, setup, pg, args, workdir)
                row["repeat"] = repeat
                rows.append(row)
                logger.info(
                    "repeat %d %-9s %7.1f MB/s (verified through %d replica(s))",
                    repeat,
                    setup,
                    row["mb_per_s"],
                    row["replicas"],
                )
    finally:
        pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    medians = {
        s: statistics.median(r["mb_per_s"] for r in rows if r["setup"] == s) for s in a.setups
    }
    base = medians.get("pg-1")
    print(f"{'setup':10s} {'MB/s (median)':>14s} {'vs pg-1':>8s}")
    for setup, value in medians.items():
        ratio = f"{value / base:.2f}x" if base else "-"
        print(f"{setup:10s} {value:14.1f} {ratio:>8s}")
    if a.out:
        a.out.write_text(
            json.dumps(
                {
                    "settings": vars(a) | {"out": str(a.out)},
                    "medians_mb_per_s": medians,
                    "runs": rows,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
