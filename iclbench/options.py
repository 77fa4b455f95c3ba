"""Option schemas: each task, model and the trainer declares a dataclass whose defaults are its defaults.

Overrides arrive as YAML scalars or ``--set key=value`` strings; they are checked against the dataclass
field names and coerced to the default's type so that an unknown key or a wrong type fails with one line.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import yaml

from .errors import ICLBenchError, did_you_mean


def parse_scalar(text: str) -> Any:
    """Parse a ``--set`` value the way YAML would (``0.1`` → float, ``true`` → bool, ``[1, 2]`` → list)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def coerce(value: Any, default: Any, where: str) -> Any:
    """Coerce ``value`` to the type of ``default``; raise a one-line error naming ``where`` otherwise."""
    if default is None or isinstance(default, (list, dict, tuple)):
        return value
    kind = type(default)
    if isinstance(value, str) and kind in (int, float):
        try:  # YAML 1.1 reads '1e6' as a string
            value = float(value)
        except ValueError:
            pass
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ICLBenchError(f"{where}: expected {kind.__name__}, got {value!r}")


def build_options(cls, overrides: dict[str, Any], where: str):
    """Instantiate the dataclass ``cls`` with ``overrides`` validated against its fields."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    defaults = cls()
    values = {}
    for key, value in overrides.items():
        if key not in fields:
            raise ICLBenchError(f"unknown key '{where}.{key}'" + did_you_mean(key, fields))
        values[key] = coerce(value, getattr(defaults, key), f"{where}.{key}")
    try:
        options = dataclasses.replace(defaults, **values)
        check = getattr(options, "validate", None)
        if check is not None:
            check()
    except (ValueError, TypeError) as exc:
        raise ICLBenchError(f"{where}: {exc}") from None
    return options


def describe_options(cls) -> dict[str, Any]:
    return dataclasses.asdict(cls())
