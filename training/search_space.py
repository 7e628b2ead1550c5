"""The settings ``mqsa tune`` searches, and the space file that narrows, widens or fixes them.

The default space is the neighbourhood of the paper's settings (spec sections 3-7):

    lr         1e-4 .. 5e-3, log scale      alpha      0 .. 1
    l2         0 .. 1e-3                    lambda_kd  0 .. 0.5
    dropout    0.1 .. 0.7                   tau        0.05 .. 0.5, log scale
    windows    1 .. 5 (L of the one long-query branch)

A space file (TOML or JSON, ``mqsa tune --space FILE``) holds one table per setting;
each replaces that setting's default entry or adds a setting to the search (any
MQSAConfig or TrainConfig field but those of SEARCH_EXCLUDED):

    [lr]                    # a range; log = true draws on a log scale
    low = 5e-4
    high = 2e-3
    log = true

    [hidden_size]           # a few values
    choices = [32, 64, 128]

    [dropout]               # not searched: every trial uses 0.5
    value = 0.5

An integer setting's range may have a ``step``.

A grid (``mqsa tune --sampler grid``) runs every combination of the space file's
choices once: its space is the file's entries only (the default ranges do not
apply; the settings it does not name come from the base), and each searched entry
must be a list of choices, not a range. Every entry is checked when the file
is read (its name, its keys, that low < high, that every bound is a valid value of
its setting): a ConfigError names the file and the setting. Settings that do not go
together (``num_heads`` that does not divide ``hidden_size``) fail their trial only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from mqsa.errors import ConfigError
from mqsa.training.settings_file import check_settings, coerce, load_table, setting_types

# Settings that say how long, where or how fast a trial runs, not what it learns: never searched.
SEARCH_EXCLUDED = frozenset(
    {
        "epochs",
        "patience",
        "seed",
        "eval_every",
        "valid_sample",
        "device",
        "precision",
        "threads",
        "chunk",
        "init_from",
    }
)
ENTRY_KEYS = frozenset({"low", "high", "log", "step", "choices", "value"})


@dataclass(frozen=True)
class Param:
    """One setting of the search space: a range, a list of choices or a fixed value.

    Attributes:
        name: the setting (an MQSAConfig or TrainConfig field; ``windows`` is one long
            branch's L, an integer).
        integer: drawn as an integer (integer settings and ``windows``).
        low: the range's lower end, included.
        high: the range's upper end, included.
        log: draw the range on a log scale (low > 0).
        step: the range's spacing (None: continuous, or 1 for an integer).
        choices: the values to pick from, instead of a range.
        value: the fixed value of a setting that is not searched.
    """

    name: str
    integer: bool = False
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] | None = None
    value: Any = None

    @property
    def searched(self) -> bool:
        return self.value is None

    def suggest(self, trial: optuna.Trial) -> Any:
        """The trial's value of this setting, as Optuna draws (or a resumed trial replays) it."""
        if not self.searched:
            return self.value
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.integer:
            return trial.suggest_int(
                self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def contains(self, value: Any) -> bool:
        """Whether ``value`` (as drawn: ``windows`` an integer L) is one this entry can draw."""
        if self.choices is not None:
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and value != int(value):
            return False
        if not self.low <= value <= self.high:
            return False
        return not self.step or math.isclose(
            (value - self.low) / self.step, round((value - self.low) / self.step)
        )

    def describe(self) -> str:
        """How the report shows it: ``0.0001 .. 0.005 (log)``, ``one of 32, 64``, ``fixed at 0.5``."""
        if not self.searched:
            return f"fixed at {self.value:g}" if isinstance(self.value, float) else f"fixed at {self.value}"
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        step = f", step {self.step:g}" if self.step else ""
        return f"{self.low:g} .. {self.high:g}{' (log)' if self.log else ''}{step}"


DEFAULT_PARAMS = (
    Param("lr", low=1e-4, high=5e-3, log=True),
    Param("l2", low=0.0, high=1e-3),
    Param("dropout", low=0.1, high=0.7),
    Param("windows", integer=True, low=1, high=5),
    Param("alpha", low=0.0, high=1.0),
    Param("lambda_kd", low=0.0, high=0.5),
    Param("tau", low=0.05, high=0.5, log=True),
)


@dataclass(frozen=True)
class SearchSpace:
    """The searched and fixed settings of a study, in order.

    Attributes:
        params: one entry per setting.
    """

    params: tuple[Param, ...] = DEFAULT_PARAMS

    @classmethod
    def from_file(cls, path: str | Path | None, grid: bool = False) -> SearchSpace:
        """The default space with a space file's entries on top (None: the default space).

        With ``grid``, the file's entries alone, each searched one a list of choices.

        Raises:
            DataError: the file is missing or not TOML/JSON.
            ConfigError: an unknown setting or key, or a bad bound, naming it; for a
                grid, no file, a range, or no setting with choices.
        """
        if path is None:
            if grid:
                raise ConfigError(
                    "a grid needs a space file (--space) with the choices of each setting to vary"
                )
            return cls()
        return cls.from_table(load_table(path), str(path), grid)

    @classmethod
    def from_table(cls, table: dict[str, Any], where: str, grid: bool = False) -> SearchSpace:
        """The default space (none for a ``grid``) with ``table``'s entries on top.

        ``where`` names the source in errors.
        """
        types_ = setting_types()
        searchable = [n for n in types_ if n not in SEARCH_EXCLUDED]
        unknown = sorted(set(table) - set(searchable))
        if unknown:
            raise ConfigError(
                f"{where}: unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                f"(searchable: {', '.join(searchable)})"
            )
        params = {} if grid else {p.name: p for p in DEFAULT_PARAMS}
        for name, entry in table.items():
            params[name] = parse_entry(name, entry, types_[name], where)
        space = cls(tuple(params.values()))
        if grid:
            ranges = [p.name for p in space.searched() if p.choices is None]
            if ranges:
                raise ConfigError(
                    f"{where}: a grid takes choices or a value, not a range: {', '.join(ranges)}"
                )
            if not space.searched():
                raise ConfigError(f"{where}: a grid needs at least one setting with choices")
        return space

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Every entry's value for ``trial``, as config fields take them (``windows`` a tuple)."""
        return {p.name: as_setting(p.name, p.suggest(trial)) for p in self.params}

    def searched(self) -> list[Param]:
        return [p for p in self.params if p.searched]

    def starting_point(self, settings: dict[str, Any]) -> dict[str, Any]:
        """The searched entries' values in ``settings`` (every config field's), as a trial to
        enqueue: those the space can draw (``windows`` only when it is one branch)."""
        point = {}
        for param in self.searched():
            value = settings.get(param.name)
            if param.name == "windows":
                value = value[0] if isinstance(value, tuple) and len(value) == 1 else None
            if param.contains(value):
                point[param.name] = value
        return point

    def grid(self) -> dict[str, list[Any]]:
        """Each searched setting's choices, as Optuna's GridSampler takes them (a grid's space)."""
        return {p.name: list(p.choices or ()) for p in self.searched()}

    def grid_size(self) -> int:
        """The number of combinations of a grid's choices."""
        return math.prod(len(choices) for choices in self.grid().values())


def as_setting(name: str, value: Any) -> Any:
    """A drawn value as its config field takes it: the window L -> ``windows=(L,)``."""
    return (int(value),) if name == "windows" and not isinstance(value, tuple) else value


FORM_KEYS = {"range": {"low", "high", "log", "step"}, "choices": {"choices"}, "value": {"value"}}


def parse_entry(name: str, entry: Any, hint: Any, where: str) -> Param:
    """One space-file entry -> a checked Param.

    Raises:
        ConfigError: not a table, unknown keys, mixed or missing forms, bad bounds.
    """
    at = f"{where}: {name}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{at}: expected a table: {{low, high[, log, step]}}, {{choices}} or {{value}}")
    unknown = sorted(set(entry) - ENTRY_KEYS)
    if unknown:
        raise ConfigError(f"{at}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
    forms = [form for form, keys in FORM_KEYS.items() if keys & set(entry)]
    if len(forms) != 1:
        given = " and ".join(forms) or "none"
        raise ConfigError(f"{at}: give exactly one of a range (low, high), choices or value; got {given}")
    integer = name == "windows" or hint is int
    value_hint = int if name == "windows" else hint
    if forms == ["value"]:
        param = Param(name, integer, value=coerce(name, value_hint, entry["value"], where))
    elif forms == ["choices"]:
        param = _choices(name, entry["choices"], integer, value_hint, where)
    else:
        param = _range(name, entry, integer, value_hint, where)
    for value in (param.low, param.high, param.value, *(param.choices or ())):
        if value is not None:  # each value as its own setting; combinations are checked per trial
            partner = {"hidden_size": value} if name == "num_heads" else {}  # heads must divide it
            check_settings({name: as_setting(name, value), **partner}, at)
    return param


def _choices(name: str, choices: Any, integer: bool, hint: Any, where: str) -> Param:
    if not isinstance(choices, list) or not choices:
        raise ConfigError(f"{where}: {name}: choices must be a non-empty list, got {choices!r}")
    return Param(name, integer, choices=tuple(coerce(name, hint, c, where) for c in choices))


def _range(name: str, entry: dict[str, Any], integer: bool, hint: Any, where: str) -> Param:
    at = f"{where}: {name}"
    if hint not in (int, float):
        raise ConfigError(f"{at}: not a number: give choices or a value, not a range")
    if not {"low", "high"} <= set(entry):
        raise ConfigError(f"{at}: a range needs both low and high")
    low, high = (coerce(name, hint, entry[k], where) for k in ("low", "high"))
    log, step = entry.get("log", False), entry.get("step")
    if not isinstance(log, bool):
        raise ConfigError(f"{at}: log must be true or false, got {log!r}")
    if not low < high:
        raise ConfigError(f"{at}: low must be below high, got low {low} and high {high}")
    if log and low <= 0:
        raise ConfigError(f"{at}: a log-scale range needs low > 0, got {low}")
    if step is not None:
        step = coerce(name, hint, step, where)
        if step <= 0 or log:
            raise ConfigError(f"{at}: step must be > 0 and cannot go with log, got step {step}")
    return Param(name, integer, low=low, high=high, log=log, step=step)
