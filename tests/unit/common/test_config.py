from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from common.config import from_mapping, read_tables, read_toml
from common.errors import ConfigError


@dataclass(frozen=True)
class _Cfg:
    name: str = "a"
    epochs: int = 3
    lr: float = 0.1
    path: Path | None = None


def test_from_mapping_coerces_and_defaults() -> None:
    cfg = from_mapping(_Cfg, {"epochs": 5, "lr": 1, "path": "x.npz"})
    assert cfg == _Cfg(name="a", epochs=5, lr=1.0, path=Path("x.npz"))


def test_unknown_key_names_dotted_key_and_known_keys() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'edge.epoch'.*'epochs'"):
        from_mapping(_Cfg, {"epoch": 5}, prefix="edge.")


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("epochs", "5", "edge.epochs must be an integer"),
        ("epochs", True, "integer"),
        ("lr", "x", "number"),
    ],
)
def test_wrong_type_names_key(key: str, value: object, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        from_mapping(_Cfg, {key: value}, prefix="edge.")


def test_read_toml_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        read_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("a = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_toml(bad)


@dataclass(frozen=True)
class _Other:
    x: float = 0.0


def test_read_tables(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[main]\nepochs = 7\n[other]\nx = 2\n")
    tables = read_tables(path, {"main": _Cfg, "other": _Other})
    assert tables == {"main": _Cfg(epochs=7), "other": _Other(x=2.0)}
    path.write_text("[main]\nepochs = 7\n[extra]\ny = 1\n")
    with pytest.raises(
        ConfigError, match=r"unknown table\(s\) \['extra'\].*expected \[main\], \[other\]"
    ):
        read_tables(path, {"main": _Cfg, "other": _Other})
    path.write_text("main = 3\n")
    with pytest.raises(ConfigError, match=r"main .* must be a table"):
        read_tables(path, {"main": _Cfg})
    path.write_text("[other]\nx = 'a'\n")
    with pytest.raises(ConfigError, match=r"other\.x must be a number"):
        read_tables(path, {"other": _Other})
