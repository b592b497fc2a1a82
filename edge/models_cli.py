"""``latentedge models``: list, aggregate and fetch a server's models (transfer learning).

latentedge models --server HOST:PORT                       # versions, as JSON
latentedge models --server HOST:PORT --aggregate [--min-nodes N]
latentedge models --server HOST:PORT --get [VERSION] --out model.safetensors [--onnx m.onnx]
latentedge models --server HOST:PORT --fine-tuned NODE --out node.safetensors [--onnx ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from common.constants import DEFAULT_LISTEN
from common.errors import ConfigError
from common.tls import add_client_tls_flags, add_client_token_flags


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``models`` flags."""
    parser.add_argument(
        "--server", default=DEFAULT_LISTEN, help=f"HOST:PORT (default {DEFAULT_LISTEN})"
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument(
        "--aggregate", action="store_true", help="average the pending deltas into a new version"
    )
    action.add_argument(
        "--get",
        nargs="?",
        const=0,
        type=int,
        metavar="VERSION",
        help="download a base version (default: the current one)",
    )
    action.add_argument("--fine-tuned", metavar="NODE", help="download NODE's fine-tuned model")
    parser.add_argument("--min-nodes", type=int, default=1, help="--aggregate: at least (1)")
    parser.add_argument("--out", type=Path, help="where to write the downloaded model file")
    parser.add_argument("--onnx", type=Path, help="also export the downloaded model to ONNX")
    add_client_tls_flags(parser)
    add_client_token_flags(parser)
    parser.add_argument(
        "--retry-window-s", type=float, default=5.0, help="retry an unreachable server (5 s)"
    )


def run(args: argparse.Namespace) -> int:
    """Do the one thing asked and print its result."""
    from edge.uplink import client_from_args

    downloading = args.get is not None or args.fine_tuned
    if downloading and args.out is None and args.onnx is None:
        raise ConfigError("--get/--fine-tuned need --out PATH (and/or --onnx PATH)")
    if args.min_nodes < 1:
        raise ConfigError(f"--min-nodes must be >= 1, got {args.min_nodes}")
    with client_from_args(args) as client:
        if args.aggregate:
            made = client.aggregate(args.min_nodes)
            sys.stdout.write(json.dumps(asdict(made), indent=2) + "\n")
            return 0
        if downloading:
            with tempfile.TemporaryDirectory() as cache:
                got = client.download_model(
                    cache, version=args.get or 0, fine_tuned_for=args.fine_tuned or ""
                )
                if args.onnx is not None:
                    _export(got.path, args.onnx)
                if args.out is not None:
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(got.path, args.out)
            what = f"fine-tuned model of {args.fine_tuned}" if args.fine_tuned else "base model"
            wrote = ", ".join(str(p) for p in (args.out, args.onnx) if p is not None)
            sys.stdout.write(
                f"{what} (base version {got.version}, sha256 {got.hash}, {got.size_bytes} "
                f"bytes): wrote {wrote}\n"
            )
            return 0
        status = client.status()
    doc = {
        "server": args.server,
        "models": [asdict(m) for m in status.models],
        "deltas": {
            n.node_id: {"deltas": n.deltas, "bytes": n.delta_bytes, "base": n.delta_base_version}
            for n in status.nodes
            if n.deltas
        },
    }
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    return 0


def _export(model_path: Path, onnx_path: Path) -> None:
    """Export a model file's network to ONNX, checked against torch on random images."""
    import numpy as np

    from common.export import export_network
    from common.modelfile import read_model_file

    model, _ = read_model_file(model_path)
    spec = model.spec
    sample = np.random.default_rng(0).random(
        (8, spec.in_channels, spec.height, spec.width), dtype=np.float32
    )
    export_network(model.to_torch(), onnx_path, sample)
