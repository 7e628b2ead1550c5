"""The shape of the project as a whole: one import name, short functions."""

from __future__ import annotations

import ast
import importlib.metadata
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import mqsa

ROOT = Path(__file__).resolve().parents[1]
SOURCE_FOLDERS = ("mqsa", "models", "training", "service")
LONGEST_FUNCTION = 60  # lines, docstring included


def test_the_wheel_adds_one_import_name(tmp_path) -> None:
    """Installed into an application's environment, the project must not bring generic top-level
    names (`models`, `service`, `training`) that collide with the application's own."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in SOURCE_FOLDERS:
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        "out",
        "./src",
    ]  # ./: a path, not a name
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = (tmp_path / "out").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert {n.split("/")[0] for n in names} == {"mqsa", f"mqsa_ted-{version}.dist-info"}
    for module in (
        "mqsa/models/mqsa.py",
        "mqsa/training/trainer.py",
        "mqsa/service/app.py",
        "mqsa/service/static/dashboard/index.html",  # package data: the dashboard and its chart library
        "mqsa/service/static/dashboard/vendor/uplot/uPlot.iife.min.js",
        "mqsa/errors.py",
    ):
        assert module in names


def test_the_version_comes_from_the_installed_metadata() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert mqsa.__version__ == importlib.metadata.version(mqsa.DISTRIBUTION) == version


def function_lengths() -> list[tuple[int, str]]:
    out = []
    for folder in SOURCE_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = node.end_lineno - node.lineno + 1
                    out.append((lines, f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"))
    return out


def test_no_function_is_longer_than_60_lines() -> None:
    lengths = function_lengths()
    assert len(lengths) > 200  # every source folder was read
    too_long = sorted((n, where) for n, where in lengths if n > LONGEST_FUNCTION)
    assert too_long == [], too_long
