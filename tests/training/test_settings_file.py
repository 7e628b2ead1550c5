"""Settings files (`mqsa train --config`, `mqsa tune`'s best.toml): read, checked, written, overridden."""

from __future__ import annotations

import json
import re

import pytest

from mqsa.cli import build_parser, main
from mqsa.errors import ConfigError, DataError
from mqsa.training.settings_file import read_settings_file, settings_toml, split_settings, write_settings_file


def test_what_is_written_reads_back_the_same(tmp_path) -> None:
    values = {
        "lr": 0.0021,
        "l2": 1e-05,
        "windows": (2, 4),
        "hidden_size": 32,
        "learn_alpha": True,
        "linear_init": "glorot",
        "init_from": None,  # TOML has no null: left out, so it keeps its default
    }
    path = tmp_path / "best.toml"
    write_settings_file(path, values, ["a comment", ""])
    assert path.read_text().startswith("# a comment\n#\nlr = 0.0021\nl2 = 1e-05\nwindows = [2, 4]\n")
    assert read_settings_file(path) == {k: v for k, v in values.items() if v is not None}


def test_json_works_too_and_ints_are_taken_for_floats(tmp_path) -> None:
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"lr": 1, "windows": 3, "epochs": 7, "device": "cpu"}))
    values = read_settings_file(path)
    assert values == {"lr": 1.0, "windows": (3,), "epochs": 7, "device": "cpu"}
    assert isinstance(values["lr"], float)
    model, train = split_settings(values)
    assert model == {"windows": (3,)} and train == {"lr": 1.0, "epochs": 7, "device": "cpu"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("learning_rate = 0.1\nlr = 0.1\nbatch = 3\n", "unknown settings batch, learning_rate (settings are"),
        ("num_items = 5\n", "unknown setting num_items"),
        ('lr = "fast"\n', "lr must be a number, got 'fast'"),
        ("epochs = 2.5\n", "epochs must be an integer, got 2.5"),
        ("learn_alpha = 1\n", "learn_alpha must be true or false, got 1"),
        ('windows = ["3"]\n', "windows must be an integer or a list of integers, got ['3']"),
        ('device = "tpu"\n', "device must be one of 'auto', 'cpu', 'cuda', got 'tpu'"),
        ("dropout = 1.5\n", "dropout must be in [0, 1), got 1.5"),
        ("num_heads = 3\n", "hidden_size (64) must be divisible by num_heads (3)"),
    ],
)
def test_a_bad_setting_is_a_config_error_naming_the_file_and_the_key(
    tmp_path, text: str, message: str
) -> None:
    path = tmp_path / "settings.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        read_settings_file(path)
    assert str(info.value).startswith(f"{path}: ")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("settings.yaml", "lr: 0.1\n", "a settings file is TOML (.toml) or JSON (.json), not .yaml"),
        ("settings.toml", "lr = = 0.1\n", "not valid TOML"),
        ("settings.json", "[1, 2]", "expected a table of settings"),
        ("missing.toml", None, "no such file"),
    ],
)
def test_a_file_that_is_not_a_settings_file_is_a_data_error(tmp_path, name: str, text, message: str) -> None:
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(DataError, match=re.escape(message)):
        read_settings_file(path)


def test_toml_strings_are_escaped() -> None:
    assert settings_toml({"init_from": 'runs/a "b"/best.pt'}) == 'init_from = "runs/a \\"b\\"/best.pt"\n'


def test_train_flags_override_the_file_and_the_file_overrides_the_defaults(tmp_path) -> None:
    from mqsa.cli import _with_settings_file

    path = tmp_path / "s.toml"
    path.write_text("lr = 0.002\nl2 = 0.0003\nwindows = [2, 4]\n")
    argv = ["train", "--data", "d", "--out", "o", "--config", str(path), "--lr", "0.005"]
    args = _with_settings_file(argv, str(path))
    assert args.lr == 0.005 and args.l2 == 0.0003 and args.windows == [2, 4]  # flag, file, file
    assert args.tau == 0.1 and args.hidden_size == 64  # neither: the dataclass defaults
    plain = build_parser().parse_args(argv)
    assert plain.l2 == 1e-4  # without the reparse the file is not read


def test_a_bad_settings_file_stops_train_in_one_line(tmp_path, capsys) -> None:
    path = tmp_path / "s.toml"
    path.write_text("lr = 0.002\nlearning_rate = 0.1\n")
    assert main(["train", "--data", "d", "--out", str(tmp_path / "o"), "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith(f"mqsa: error: {path}: unknown setting learning_rate (settings are")
        and "\n" not in err
    )
