"""bench/sweep.py's --grid parsing (the rest of it is mqsa tune's grid, tested there)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from sweep import parse_grid


def test_a_grid_parses_into_typed_axes_with_window_as_windows() -> None:
    assert parse_grid(["lr=5e-4,2e-3", "window=2,4.0"]) == {"lr": [5e-4, 2e-3], "windows": [2, 4]}
    assert isinstance(parse_grid(["window=4.0"])["windows"][0], int)


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        (["lr"], "expected name=v1,v2"),
        (["nope=1"], "unknown setting 'nope'"),
        (["lr=fast"], "'fast' is not a number"),
        (["windows=2.5"], "windows takes integers, got '2.5'"),
        (["windows=inf"], "'inf' is not a finite number"),
        (["lr=nan"], "'nan' is not a finite number"),
        (["lr=1e-3,0.001"], "'0.001' is given twice"),
        (["lr=1e-3", "lr=2e-3"], "lr is given twice"),
        (["linear_init=torch,torch"], "'torch' is given twice"),
    ],
)
def test_a_bad_grid_stops_naming_what_is_wrong(specs: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        parse_grid(specs)
