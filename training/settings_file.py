"""Settings files: the flags of ``mqsa train`` as a TOML or JSON file.

``mqsa train --config FILE`` reads one (flags given on the command line override
it), ``mqsa tune --config FILE`` takes its base settings from one, and ``mqsa tune``
writes the best trial's settings as one (``best.toml``). The keys are the field
names of ``MQSAConfig`` and ``TrainConfig`` (the flags without their dashes and with
underscores), all at the top level:

    # best.toml
    lr = 0.0021
    l2 = 0.00031
    windows = [3]
    linear_init = "torch"

Every key is checked when the file is read: an unknown key, a value of the wrong
type or out of its range is a ConfigError naming the file and the key.
"""

from __future__ import annotations

import json
import math
import tomllib
import types
import typing
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from mqsa.errors import ConfigError, DataError
from mqsa.models.mqsa import MQSAConfig
from mqsa.training.artifacts import write_text_atomic
from mqsa.training.trainer import TrainConfig

SUFFIXES = (".toml", ".json")
NOT_SETTINGS = frozenset({"num_items"})  # from the data, never a setting


def setting_types() -> dict[str, Any]:
    """Every setting a file may hold: field name -> its type hint, model fields first."""
    out: dict[str, Any] = {}
    for cls in (MQSAConfig, TrainConfig):
        hints = typing.get_type_hints(cls)
        out |= {f.name: hints[f.name] for f in fields(cls) if f.name not in NOT_SETTINGS}
    return out


def model_fields() -> frozenset[str]:
    return frozenset(f.name for f in fields(MQSAConfig)) - NOT_SETTINGS


def split_settings(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Flat settings -> (MQSAConfig keyword arguments, TrainConfig keyword arguments)."""
    model = model_fields()
    return {k: v for k, v in values.items() if k in model}, {
        k: v for k, v in values.items() if k not in model
    }


def load_table(path: str | Path) -> dict[str, Any]:
    """The top-level table of a TOML or JSON file, unchecked.

    Raises:
        DataError: no such file, another suffix, or not valid TOML/JSON holding a table.
    """
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise DataError(
            f"a settings file is TOML (.toml) or JSON (.json), not {path.suffix or 'no suffix'}", path
        )
    if not path.is_file():
        raise DataError("no such file", path)
    try:
        text = path.read_text(encoding="utf-8")
        table = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"not valid {path.suffix[1:].upper()}: {exc}", path) from exc
    if not isinstance(table, dict):
        raise DataError("expected a table of settings (name = value) at the top level", path)
    return table


def read_settings_file(path: str | Path) -> dict[str, Any]:
    """Read and check a settings file.

    Returns:
        Setting name -> value, typed as the config fields (``windows`` a tuple).

    Raises:
        DataError: the file is missing or not TOML/JSON.
        ConfigError: an unknown key, a value of the wrong type or out of range, naming it.
    """
    table = load_table(path)
    types_ = setting_types()
    unknown = sorted(set(table) - set(types_))
    if unknown:
        raise ConfigError(
            f"{path}: unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
            f"(settings are the fields of MQSAConfig and TrainConfig: {', '.join(types_)})"
        )
    values = {name: coerce(name, types_[name], value, path) for name, value in table.items()}
    check_settings(values, path)
    return values


def coerce(name: str, hint: Any, value: Any, where: str | Path) -> Any:
    """``value`` as field ``name`` of type ``hint`` takes it (an int for a float, a list for a tuple).

    Raises:
        ConfigError: a value of another type, naming ``where`` and the setting.
    """
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        items = value if isinstance(value, list) else [value]
        if items and all(_is_int(v) for v in items):
            return tuple(items)
        what = "an integer or a list of integers"
    elif typing.get_origin(hint) is typing.Literal:
        if value in args:
            return value
        what = "one of " + ", ".join(map(repr, args))
    elif hint is bool:
        if isinstance(value, bool):
            return value
        what = "true or false"
    elif hint is int:
        if _is_int(value):
            return value
        what = "an integer"
    elif hint is float:
        if _is_int(value) or (isinstance(value, float) and math.isfinite(value)):
            return float(value)
        what = "a number"
    else:  # str, Path
        if isinstance(value, str):
            return value
        what = "a string"
    raise ConfigError(f"{where}: {name} must be {what}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_settings(values: dict[str, Any], where: str | Path) -> None:
    """Build the configs from ``values`` (the rest at their defaults), so a value out of range fails now.

    Raises:
        ConfigError: the configs' own message, naming ``where``.
    """
    model, train = split_settings(values)
    try:
        MQSAConfig(num_items=1, **model)
        TrainConfig(**train)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def toml_value(value: Any) -> str:
    """A setting's value as TOML writes it: ``true``, ``3``, ``0.0003``, ``"torch"``, ``[2, 4]``."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value)  # 1e-05 and 0.5 are TOML floats as Python writes them
    if isinstance(value, tuple | list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string: JSON's escapes are TOML's


def settings_toml(values: dict[str, Any], comments: Sequence[str] = ()) -> str:
    """A settings file's text: ``comments`` as ``#`` lines, then one ``name = value`` per setting.

    Settings whose value is None (TOML has no null) are left out: they keep their default.
    """
    lines = [f"# {c}".rstrip() for c in comments]
    lines += [f"{name} = {toml_value(value)}" for name, value in values.items() if value is not None]
    return "\n".join(lines) + "\n"


def write_settings_file(path: str | Path, values: dict[str, Any], comments: Sequence[str] = ()) -> None:
    """Write a TOML settings file atomically (beside ``path``, then moved into place)."""
    write_text_atomic(path, settings_toml(values, comments))
