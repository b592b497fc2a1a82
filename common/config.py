"""Read one TOML file per process into frozen dataclasses.

An unknown key or a value of the wrong type raises :class:`~common.errors.ConfigError`
naming the dotted key, the expected type and what came in.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from common.errors import ConfigError

T = TypeVar("T")


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file, turning I/O and syntax errors into ``ConfigError``."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {str(p)!r} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"config file {str(p)!r} cannot be read: {exc}") from exc


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: unsupported value {value!r}")
    if origin is tuple:
        (item_tp, *_rest) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__} {value!r}")
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {type(value).__name__} {value!r}")
        return value
    if isinstance(tp, type) and issubclass(tp, Path):
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a path string, got {value!r}")
        return Path(value)
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


def from_mapping(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build the frozen dataclass ``cls`` from a mapping, checking keys and types.

    Args:
        cls: A dataclass type.
        data: Keys and values, e.g. one TOML table.
        prefix: Dotted path of ``data`` inside the file, used in error messages.

    Raises:
        ConfigError: on an unknown key or a value of the wrong type; the message names
            the dotted key and lists the known keys.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown key {dotted!r}; known keys: {sorted(fields)}")
        kwargs[key] = _coerce(value, hints[key], dotted)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from exc


def read_tables(path: str | Path, tables: dict[str, type[Any]]) -> dict[str, Any]:
    """Read a TOML file whose top-level tables each map to a dataclass.

    Args:
        path: The TOML file.
        tables: Table name -> dataclass, e.g. ``{"edge": EdgeConfig, "profile": EnergyProfile}``.

    Returns:
        Table name -> dataclass instance, for the tables present in the file.

    Raises:
        ConfigError: unreadable file, a table not in ``tables``, or a bad key or value in one.
    """
    doc = read_toml(path)
    unknown = sorted(set(doc) - set(tables))
    if unknown:
        expected = ", ".join(f"[{name}]" for name in tables)
        raise ConfigError(f"unknown table(s) {unknown} in {str(path)!r}; expected {expected}")
    out: dict[str, Any] = {}
    for name, cls in tables.items():
        if name in doc:
            if not isinstance(doc[name], dict):
                raise ConfigError(f"{name} in {str(path)!r} must be a table, got {doc[name]!r}")
            out[name] = from_mapping(cls, doc[name], prefix=f"{name}.")
    return out
