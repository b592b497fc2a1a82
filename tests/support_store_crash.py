"""A child process for the segment crash tests: stores uploads, then waits to be SIGKILLed.

    python -m tests.support_store_crash DB MODE

Registers node ``n0`` (latent_dim :data:`DIM`), commits upload ``first`` (acknowledged: prints
``ACK first``), stages upload ``second`` chunk by chunk, prints ``STAGED`` and waits for a line
on stdin. With MODE ``commit`` or ``acked`` it then prints ``COMMITTING`` and commits
``second`` for real (in ``commit`` mode the test holds the database's write lock, so the child
stops inside ``commit_upload`` after the payload fsync and before the metadata commit), then
prints ``ACK second``. Then it sleeps until killed.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from common.records import NodeRegistration, UploadMode
from common.tensors import to_wire
from server.store import SqliteStore

DIM = 8
ROWS = 100
CHUNKS = 3


SEEDS = {"first": 1, "second": 2}
"""Upload id -> the seed of its payload."""


def payload(upload: str) -> tuple[np.ndarray, np.ndarray]:
    """The latents (float32) and labels (uint8) of an upload."""
    rng = np.random.default_rng(SEEDS[upload])
    x = rng.normal(size=(CHUNKS * ROWS, DIM)).astype(np.float32)
    y = rng.integers(0, 10, len(x)).astype(np.uint8)
    return x, y


def stage(store: SqliteStore, upload: str, mode: UploadMode) -> None:
    x, y = payload(upload)
    store.begin_upload(upload, "n0", mode)
    for seq in range(CHUNKS):
        rows = slice(seq * ROWS, (seq + 1) * ROWS)
        store.put_chunk(upload, seq, to_wire(x[rows]), to_wire(y[rows]), ROWS)


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(db: str, mode: str) -> None:
    store = SqliteStore(db)
    store.register_node(NodeRegistration(node_id="n0", latent_dim=DIM, num_classes=10))
    stage(store, "first", UploadMode.APPEND)
    store.commit_upload("first", CHUNKS)
    say("ACK first")
    stage(store, "second", UploadMode.APPEND)
    say("STAGED")
    sys.stdin.readline()  # the test may take the database's write lock meanwhile
    if mode in ("commit", "acked"):
        say("COMMITTING")
        store.commit_upload("second", CHUNKS)
        say("ACK second")
    while True:
        time.sleep(60)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
