"""Edge config: the command line beats the file, also for switching a boolean off."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from edge.cli import configure_parser, load_config


def _load(tmp_path: Path, *flags: str) -> object:
    toml = tmp_path / "edge.toml"
    toml.write_text('[edge]\nserver = "127.0.0.1:1"\nnode_id = "n0"\nevaluate = true\n')
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    config, _ = load_config(parser.parse_args(["--config", str(toml), *flags]))
    return config


@pytest.mark.parametrize(
    ("flags", "evaluate", "scheduled"),
    [
        ((), True, False),
        (("--no-evaluate",), False, False),
        (("--evaluate", "--scheduled"), True, True),
        (("--no-evaluate", "--no-scheduled"), False, False),
    ],
)
def test_boolean_flags_override_the_file_both_ways(
    tmp_path: Path, flags: tuple[str, ...], evaluate: bool, scheduled: bool
) -> None:
    config = _load(tmp_path, *flags)
    assert config.evaluate is evaluate  # type: ignore[attr-defined]
    assert config.scheduled is scheduled  # type: ignore[attr-defined]
