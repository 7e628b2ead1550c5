"""Command-line flags made from the config dataclasses, so every default has one source.

Each field of a config dataclass (``MQSAConfig``, ``TrainConfig``, ``ExportConfig``)
becomes one flag: ``hidden_size`` -> ``--hidden-size``, its type and default from
the field, its help from the class docstring's ``Attributes:`` section. The
README's settings table is rendered by :func:`settings_table` from the same
source, and a test checks that the two agree (``make readme-settings`` rewrites it).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def attribute_help(cls: type) -> dict[str, str]:
    """Field name -> text, from the ``Attributes:`` section of a Google-style class docstring."""
    lines = (inspect.getdoc(cls) or "").splitlines()
    if "Attributes:" not in lines:
        return {}
    out: dict[str, str] = {}
    name = None
    for line in lines[lines.index("Attributes:") + 1 :]:
        if not line.strip():
            break
        if line.startswith("    ") and not line.startswith("     "):
            name, _, text = line.strip().partition(":")
            out[name] = text.strip()
        elif name is not None:
            out[name] += " " + line.strip()
    return out


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _fields(cls: type, exclude: Iterable[str]) -> list[dataclasses.Field]:
    skip = set(exclude)
    return [f for f in dataclasses.fields(cls) if f.name not in skip]


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    raise TypeError(f"{field.name} has no default: it cannot be an optional flag")


def add_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    exclude: Iterable[str] = (),
    aliases: dict[str, list[str]] | None = None,
) -> None:
    """Add one flag per field of dataclass ``cls`` (but ``exclude``) to ``parser``.

    Args:
        parser: the (sub)command's parser.
        cls: the config dataclass.
        exclude: fields that are not flags (e.g. ``num_items``, which comes from the data).
        aliases: field name -> extra flag names kept for compatibility.

    Raises:
        TypeError: a field without a docstring entry or of a type no flag can carry.
    """
    helps = attribute_help(cls)
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} settings")
    for field in _fields(cls, exclude):
        if field.name not in helps:
            raise TypeError(f"{cls.__name__}.{field.name} has no entry in the class docstring's Attributes")
        default = _default(field)
        names = [flag_name(field.name), *(aliases or {}).get(field.name, [])]
        kwargs = _argument(hints[field.name], default)
        text = helps[field.name].replace("%", "%%")
        if kwargs.get("action") is not argparse.BooleanOptionalAction:  # that one adds its own
            text += f" (default: {shown(default)})"
        group.add_argument(*names, dest=field.name, default=default, help=text, **kwargs)


def _argument(hint: Any, default: Any) -> dict[str, Any]:
    """argparse keyword arguments for a field of type ``hint``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None: the flag is optional
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(hint) is typing.Literal:
        choices = typing.get_args(hint)
        return {"type": type(choices[0]), "choices": choices}
    if typing.get_origin(hint) is tuple:
        return {"type": typing.get_args(hint)[0], "nargs": "+", "metavar": "N"}
    if hint in (int, float, str, Path):
        return {"type": hint}
    raise TypeError(f"no flag for a field of type {hint!r} (default {default!r})")


def values(args: argparse.Namespace, cls: type, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The parsed values of ``cls``'s flags, as keyword arguments for ``cls``."""
    return {f.name: getattr(args, f.name) for f in _fields(cls, exclude)}


def shown(value: Any) -> str:
    """A default as a user types it: ``(3,)`` -> ``3``, ``True`` -> ``true``."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple | list):
        return " ".join(map(str, value))
    if value is None:
        return "none"
    return str(value)


def settings_table(classes: Iterable[tuple[type, Iterable[str]]]) -> str:
    """A markdown table of every flag: ``| flag | default | meaning |``.

    Args:
        classes: (config dataclass, fields to leave out) pairs, in table order.
    """
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for cls, exclude in classes:
        helps = attribute_help(cls)
        for field in _fields(cls, exclude):
            meaning = helps[field.name].replace("|", "\\|")  # a pipe would end the cell
            rows.append(f"| `{flag_name(field.name)}` | `{shown(_default(field))}` | {meaning} |")
    return "\n".join(rows) + "\n"
