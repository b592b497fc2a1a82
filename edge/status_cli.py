"""``latentedge status``: print a running server's state as JSON (``--remove NODE``: delete a node).

latentedge status --server HOST:PORT [--tls-ca ca.pem] [--token-file admin.token]
latentedge status --server HOST:PORT --remove NODE_ID   # the node itself or an admin
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from common.constants import DEFAULT_LISTEN
from common.tls import add_client_tls_flags, add_client_token_flags


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``status`` flags."""
    parser.add_argument(
        "--server", default=DEFAULT_LISTEN, help=f"HOST:PORT (default {DEFAULT_LISTEN})"
    )
    add_client_tls_flags(parser)
    add_client_token_flags(parser)
    parser.add_argument(
        "--retry-window-s",
        type=float,
        default=5.0,
        help="retry an unreachable server this long (5 s)",
    )
    parser.add_argument(
        "--remove", metavar="NODE_ID", help="delete this node and all its data on the server"
    )


def run(args: argparse.Namespace) -> int:
    """Fetch the status and print it."""
    from edge.uplink import client_from_args

    with client_from_args(args) as client:
        if args.remove:
            samples, deltas = client.remove_node(args.remove)
            doc = {"removed": args.remove, "samples": samples, "deltas": deltas}
            sys.stdout.write(json.dumps(doc) + "\n")
            return 0
        status = client.status()
    doc = {
        "server": args.server,
        "nodes": [asdict(n) for n in status.nodes],
        "classifier": asdict(status.classifier),
        "last_plan": json.loads(status.last_plan_json) if status.last_plan_json else None,
        "models": [asdict(m) for m in status.models],
    }
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    return 0
