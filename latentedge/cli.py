"""The umbrella command line: ``latentedge <subcommand> ...`` (also ``python -m latentedge``).

Each role package owns its subcommand in its own ``cli.py`` module, which provides
``configure_parser(parser)`` and ``run(args) -> int``. This module imports only the one
module the user asked for, so ``latentedge simulate`` never imports torch.

Exit codes: see ``EXIT_CODES`` (also printed by ``latentedge --help``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from common.config import read_toml
from common.constants import LOG_LEVEL_ENV
from common.errors import (
    ConfigError,
    InfeasibleAllocationError,
    LatentEdgeError,
    UplinkError,
)
from latentedge import __version__

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_UNAVAILABLE = 4
EXIT_INFEASIBLE = 5
EXIT_INTERRUPTED = 130

EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success",
    EXIT_FAILURE: "unexpected internal error (a bug: please report it with the log)",
    EXIT_USAGE: "bad command-line usage (unknown flag, missing argument)",
    EXIT_INPUT: "bad input: config, data file, flag value, noise spec or model",
    EXIT_UNAVAILABLE: "the server could not be reached or refused the request",
    EXIT_INFEASIBLE: "the allocation problem has no feasible plan",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "latentedge.demo",
        "run server + edge nodes on loopback: the whole split-learning pipeline",
    ),
    "server": ("server.cli", "run the gRPC server (stores latents, trains and serves classifiers)"),
    "pretrain": ("server.pretrain_cli", "train a base model on source data for nodes to fine-tune"),
    "train": (
        "server.train_cli",
        "train a zoo network (optionally noise-aware) and export it to ONNX for simulate",
    ),
    "token": ("server.token_cli", "issue, revoke and list node and admin credentials"),
    "edge": ("edge.cli", "run one edge node: train its autoencoder, upload latents, evaluate"),
    "status": ("edge.status_cli", "print a running server's state as JSON"),
    "models": (
        "edge.models_cli",
        "list a server's model versions, aggregate deltas, download a base or fine-tuned model",
    ),
    "allocate": (
        "server.allocation.cli",
        "solve the joint energy/latency upload and bandwidth plan",
    ),
    "simulate": ("device_sim.cli", "run an ONNX model with analog non-idealities, Monte Carlo"),
    "fleet": (
        "latentedge.fleet_cli",
        "run N virtual edge nodes (local processes or Ray) against a server, round after round",
    ),
}

logger = logging.getLogger(__name__)


class _SubcommandModule(Protocol):
    def configure_parser(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


def _epilog() -> str:
    lines = ["exit codes:"] + [f"  {code:>3}  {text}" for code, text in EXIT_CODES.items()]
    return "\n".join(lines)


def _add_common_options(parser: argparse.ArgumentParser, *, top: bool = False) -> None:
    # accepted before or after the subcommand; the subcommand's copy only overrides if given
    parser.add_argument(
        "--log-level",
        default=os.environ.get(LOG_LEVEL_ENV, "INFO") if top else argparse.SUPPRESS,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help=f"logging level (default: ${LOG_LEVEL_ENV} or INFO)",
    )


def _build_parser(
    selected: str | None,
) -> tuple[argparse.ArgumentParser, _SubcommandModule | None, argparse.ArgumentParser | None]:
    parser = argparse.ArgumentParser(
        prog="latentedge",
        description="Deploy and compress neural networks at the edge.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"latentedge {__version__}")
    _add_common_options(parser, top=True)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    module: _SubcommandModule | None = None
    selected_parser: argparse.ArgumentParser | None = None
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=_epilog(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if name == selected:
            module = importlib.import_module(module_name)
            assert module is not None
            module.configure_parser(sub)
            _add_common_options(sub)
            if "--config" not in sub._option_string_actions:
                sub.add_argument(
                    "--config",
                    dest="flag_defaults_file",
                    type=Path,
                    help=f"TOML file whose [{name}] table gives defaults for these flags",
                )
            selected_parser = sub
    return parser, module, selected_parser


def _drop_overridden_alternatives(
    sub: argparse.ArgumentParser,
    args: argparse.Namespace,
    argv: Sequence[str],
    file_defaults: dict[str, object],
    originals: dict[str, object],
) -> None:
    """A flag given on the command line beats the file's value for a mutually exclusive twin."""
    given = {opt.split("=", 1)[0] for opt in argv if opt.startswith("--")}
    for group in sub._mutually_exclusive_groups:
        members = group._group_actions
        if any(given & set(a.option_strings) for a in members):
            for action in members:
                if not given & set(action.option_strings) and action.dest in file_defaults:
                    setattr(args, action.dest, originals[action.dest])


def _config_path(argv: Sequence[str]) -> Path | None:
    for i, token in enumerate(argv):
        if token == "--config" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if token.startswith("--config="):
            return Path(token.split("=", 1)[1])
    return None


def _flag_defaults(path: Path, command: str, sub: argparse.ArgumentParser) -> dict[str, object]:
    """Flag defaults from the ``[command]`` table of a TOML file, checked against the flags."""
    doc = read_toml(path)
    unknown_tables = sorted(set(doc) - {command})
    if unknown_tables:
        raise ConfigError(
            f"unknown table(s) {unknown_tables} in {str(path)!r}; expected [{command}]"
        )
    actions = {
        a.dest: a
        for a in sub._actions
        if a.option_strings and a.dest not in ("help", "log_level", "flag_defaults_file")
    }
    table = doc.get(command, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{command} in {str(path)!r} must be a table")
    defaults: dict[str, object] = {}
    for key, value in table.items():
        dest = key.replace("-", "_")
        action = actions.get(dest)
        if action is None:
            raise ConfigError(f"unknown key '{command}.{key}'; known keys: {sorted(actions)}")
        expected: tuple[type, ...] = (str,)
        if isinstance(action, argparse._StoreTrueAction):
            expected = (bool,)
        elif action.type in (int, float):
            expected = (int,) if action.type is int else (int, float)
        if isinstance(value, bool) != (bool in expected) or not isinstance(value, expected):
            raise ConfigError(
                f"{command}.{key} must be {' or '.join(t.__name__ for t in expected)}, "
                f"got {value!r}"
            )
        if action.choices is not None and value not in action.choices:
            raise ConfigError(
                f"{command}.{key} must be one of {list(action.choices)}, got {value!r}"
            )
        defaults[dest] = Path(str(value)) if action.type is Path else value
        action.required = False  # the file supplies it
    return defaults


def _selected_command(argv: Sequence[str]) -> str | None:
    tokens = iter(argv)
    for token in tokens:
        if token == "--log-level":
            next(tokens, None)  # its value
        elif token in SUBCOMMANDS:
            return token
        elif not token.startswith("-"):
            return None
    return None


def configure_logging(level: str) -> None:
    """Send log records to stderr; the only place handlers are installed."""
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )


def _fail(command: str, message: str, code: int) -> int:
    sys.stderr.write(f"latentedge {command}: error: {message}\n")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run one subcommand and return its exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    selected = _selected_command(args_list)
    parser, module, sub = _build_parser(selected)
    defaults_file = _config_path(args_list)
    file_defaults: dict[str, object] = {}
    if (
        sub is not None
        and selected is not None
        and defaults_file is not None
        and sub._option_string_actions["--config"].dest == "flag_defaults_file"
    ):
        originals = {a.dest: a.default for a in sub._actions}
        try:  # before parsing, so the file can supply required flags; the command line wins
            file_defaults = _flag_defaults(defaults_file, selected, sub)
        except ConfigError as exc:
            return _fail(selected, str(exc), EXIT_INPUT)
        sub.set_defaults(**file_defaults)
    args = parser.parse_args(args_list)
    if sub is not None and file_defaults:
        _drop_overridden_alternatives(sub, args, args_list, file_defaults, originals)
    if module is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    command = str(args.command)
    configure_logging(args.log_level)
    try:
        return module.run(args)
    except KeyboardInterrupt:
        return _fail(command, "interrupted", EXIT_INTERRUPTED)
    except InfeasibleAllocationError as exc:
        return _fail(command, f"infeasible: {exc}", EXIT_INFEASIBLE)
    except UplinkError as exc:
        return _fail(command, str(exc), EXIT_UNAVAILABLE)
    except LatentEdgeError as exc:
        return _fail(command, str(exc), EXIT_INPUT)
    except Exception as exc:
        logger.exception("unexpected error")
        return _fail(command, f"internal error: {type(exc).__name__}: {exc}", EXIT_FAILURE)
