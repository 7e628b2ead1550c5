from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from mqsa import flags
from mqsa.cli import README_MARKERS, readme_settings

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Example:
    """An example config.

    Attributes:
        size: how big, in units; a long text
            that goes on over two lines.
        mode: fast or slow.
        windows: several values.
        loud: say it out loud.
        where: a path, or none.
    """

    size: int = 3
    mode: Literal["fast", "slow"] = "fast"
    windows: tuple[int, ...] = (3,)
    loud: bool = False
    where: Path | None = None


def test_attribute_help_reads_the_docstring_with_continuation_lines() -> None:
    helps = flags.attribute_help(Example)
    assert helps["size"] == "how big, in units; a long text that goes on over two lines."
    assert list(helps) == ["size", "mode", "windows", "loud", "where"]


def test_one_flag_per_field_with_type_choices_and_default() -> None:
    parser = argparse.ArgumentParser()
    flags.add_flags(parser, Example)
    args = parser.parse_args([])
    assert flags.values(args, Example) == {
        "size": 3,
        "mode": "fast",
        "windows": (3,),
        "loud": False,
        "where": None,
    }
    args = parser.parse_args(
        ["--size", "5", "--mode", "slow", "--windows", "2", "4", "--loud", "--where", "x"]
    )
    assert Example(**flags.values(args, Example)) == Example(5, "slow", [2, 4], True, Path("x"))
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "medium"])
    assert "how big, in units; a long text that goes on over two lines. (default: 3)" in " ".join(
        parser.format_help().split()
    )


def test_a_field_without_a_docstring_entry_is_refused() -> None:
    @dataclass
    class Undocumented:
        """No attributes section."""

        size: int = 3

    with pytest.raises(TypeError, match=r"Undocumented\.size has no entry"):
        flags.add_flags(argparse.ArgumentParser(), Undocumented)


def test_the_readme_settings_tables_match_the_config_dataclasses() -> None:
    """Every default and its meaning has one source: the dataclasses. Run `make readme-settings`
    after changing one."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start, end = readme.index(README_MARKERS[0]), readme.index(README_MARKERS[1])
    assert readme[start + len(README_MARKERS[0]) : end].strip() == readme_settings().strip()
    for row in ("| `--hidden-size` | `64` |", "| `--lr` | `0.001` |", "| `--windows` | `3` |"):
        assert row in readme


def test_the_readme_lists_every_service_setting_with_its_default() -> None:
    from mqsa.cli import SERVICE_MARKERS, service_settings
    from mqsa.service.settings import Settings

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start, end = readme.index(SERVICE_MARKERS[0]), readme.index(SERVICE_MARKERS[1])
    assert readme[start + len(SERVICE_MARKERS[0]) : end].strip() == service_settings().strip()
    for name in Settings.model_fields:
        assert f"| `MQSA_{name.upper()}` |" in readme
    assert "| `MQSA_DEDUP_CAP` | `128` |" in readme and "| `MQSA_BUNDLE_DIR` | (required) |" in readme
