"""The `mqsa` command end to end, as a subprocess (what a user runs)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def mqsa(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mqsa.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_synth_stats_train_evaluate(tmp_path) -> None:
    data = tmp_path / "data"
    result = mqsa("data", "synth", "--out", str(data), "--users", "300", "--items", "80", "--bundles", "40")
    assert result.returncode == 0, result.stderr
    stats = mqsa("data", "stats", str(data / "sequences.txt"))
    assert stats.returncode == 0, stats.stderr
    assert "users  300" in stats.stdout and "items  80" in stats.stdout
    run = tmp_path / "run"
    args = ["--data", str(data / "sequences.txt"), "--out", str(run), "--epochs", "1", "--max-len", "10"]
    trained = mqsa("train", *args, "--hidden-size", "16", "--linear-init", "glorot", "--adam-beta2", "0.98")
    assert trained.returncode == 0, trained.stderr
    assert "| ItemTransition |" in trained.stdout and "best epoch 1" in trained.stdout
    evaluated = mqsa(
        "evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(data / "sequences.txt"), "--json"
    )
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["model_config"]["linear_init"] == "glorot" and saved["train_config"]["adam_beta2"] == 0.98
    assert abs(result["test"]["NDCG@10"] - saved["test"]["NDCG@10"]) < 1e-6
    longer = [*args[:5], "2", *args[6:], "--hidden-size", "16", "--linear-init", "glorot"]
    resumed = mqsa("train", *longer, "--adam-beta2", "0.98", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run / "metrics.json").read_text())["resumed_at"] == [1]
    refused = mqsa("train", *longer, "--resume")  # Adam's beta2 left at its default this time
    assert refused.returncode == 2 and "train_config.adam_beta2: 0.98 -> 0.999" in refused.stderr


def test_prepare_from_raw_log(tmp_path) -> None:
    log = tmp_path / "log.csv"
    rows = ["user_id,item_id,timestamp"]
    rows += [f"u{u},i{(u + t) % 7},{t}" for u in range(12) for t in range(6)]
    log.write_text("\n".join(rows) + "\n")
    result = mqsa("data", "prepare", str(log), "--out", str(tmp_path / "prep"), "--k", "5")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "prep" / "sequences.txt").is_file() and (tmp_path / "prep" / "items.json").is_file()


def test_bad_input_is_one_clear_line(tmp_path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("0 1 2 3\n1 4 five 6\n")
    result = mqsa("data", "stats", str(bad))
    assert result.returncode == 2
    assert f"{bad}:2: 'five' is not an integer item index" in result.stderr
    assert "Traceback" not in result.stderr
    missing = mqsa("train", "--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o"))
    assert missing.returncode == 2 and "nope.txt: no such file" in missing.stderr


def test_help_lists_every_subcommand_with_its_help() -> None:
    from mqsa.cli import build_parser

    result = mqsa("--help")
    assert result.returncode == 0
    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    listed = {choice.dest: choice.help for choice in subcommands._choices_actions}
    assert set(listed) == {
        "data",
        "events",
        "train",
        "tune",
        "export",
        "serve",
        "demo",
        "catalogue",
        "keys",
        "evaluate",
        "promote",
        "rollback",
        "versions",
    }
    shown = " ".join(result.stdout.split())  # argparse wraps long lines
    for name, text in listed.items():  # the usage line names them too: check each one's help line
        assert f" {name} {text}" in shown, name


def test_train_flags_are_the_config_fields_with_their_docs() -> None:
    from mqsa.flags import attribute_help
    from mqsa.models.mqsa import MQSAConfig
    from mqsa.training.trainer import TrainConfig

    result = mqsa("train", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # argparse wraps help text
    for cls in (MQSAConfig, TrainConfig):
        for field in fields(cls):
            if field.name == "num_items":
                assert "--num-items" not in text
                continue
            flag = "--" + field.name.replace("_", "-")
            help_text = " ".join(attribute_help(cls)[field.name].split())
            assert f"{flag}" in text and help_text in text, field.name
    assert "--window " in text  # the older name of --windows still works
    assert "(default: 0.5)" in text and "(default: 200)" in text


def test_flag_values_reach_the_configs(tmp_path) -> None:
    from mqsa.cli import build_parser

    args = build_parser().parse_args(
        ["train", "--data", "d", "--out", "o", "--window", "2", "4", "--learn-alpha", "--precision", "bf16"]
    )
    assert args.windows == [2, 4] and args.learn_alpha is True and args.precision == "bf16"
    assert args.lr == 1e-3 and args.hidden_size == 64  # untouched flags keep the dataclass defaults
    bad = mqsa("train", "--data", "d", "--out", "o", "--precision", "fp8")
    assert bad.returncode == 2 and "invalid choice: 'fp8'" in bad.stderr


def test_a_bad_setting_is_one_line_naming_it(tmp_path) -> None:
    result = mqsa("train", "--data", str(tmp_path / "d.txt"), "--out", str(tmp_path), "--dropout", "1.5")
    assert result.returncode == 2
    assert result.stderr.strip() == "mqsa: error: dropout must be in [0, 1), got 1.5"


def test_an_error_that_is_not_the_users_keeps_its_traceback(tmp_path, monkeypatch) -> None:
    """Only the project's errors become one line with exit 2; a RuntimeError (a CUDA fault, a torch
    bug) is not the user's mistake: it propagates with its traceback (exit 1 from Python)."""
    from mqsa import cli

    def crash(args: argparse.Namespace) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(cli, "_data_stats", crash)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        cli.main(["data", "stats", str(tmp_path / "any.txt")])
    code = (
        "import sys, mqsa.cli as c\n"
        "def crash(args): raise RuntimeError('CUDA error: an illegal memory access')\n"
        "c._data_stats = crash\n"
        "sys.exit(c.main(['data', 'stats', 'x']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "RuntimeError: CUDA error" in result.stderr


def test_every_project_error_is_an_mqsa_error_with_exit_code_2_but_a_refusal() -> None:
    """Exit 2 for every mistake; 3 only for a candidate the quality gate refused (`mqsa promote`)."""
    from mqsa import errors

    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, Exception)]
    assert {c.__name__ for c in classes} >= {"DataError", "ConfigError", "ResumeError", "BundleError"}
    for cls in classes:
        assert issubclass(cls, errors.MQSAError), cls
        assert cls.exit_code == (3 if cls is errors.PromotionRefused else 2), cls
        assert cls.__name__ in errors.__doc__  # the tree in the docstring names every class
    service = [c for c in classes if issubclass(c, errors.ServiceError) and c is not errors.ServiceError]
    assert {c.__name__: c.status_code for c in service} == {
        "Unauthorized": 401,
        "Forbidden": 403,
        "NotFound": 404,
        "BundleRefused": 409,
        "InferenceError": 500,
        "BundleError": 503,
        "StoreUnavailable": 503,
    }


def test_user_mistakes_about_files_are_one_line(tmp_path, trained_run) -> None:
    """Each of these was a traceback once the CLI stopped catching every OSError and RuntimeError."""
    import torch

    redis_url = "redis://127.0.0.1:6379/0"  # never reached: the file is opened first
    ckpt = torch.load(trained_run["dir"] / "best.pt", weights_only=False)
    ckpt["model_config"]["hidden_size"] = 8  # the weights are 32 wide
    torch.save(ckpt, tmp_path / "mismatched.pt")
    cases = [
        (("export", "--checkpoint", str(tmp_path / "mismatched.pt"), "--out", str(tmp_path / "b")),
         "mismatched.pt: the checkpoint does not make an MQSA network"),
        (("data", "export-events", "--out", str(tmp_path / "no" / "log.csv"), "--redis-url", redis_url),
         "log.csv: cannot write here"),
        (("data", "synth", "--out", str(tmp_path / "mismatched.pt" / "x")), "cannot write here"),
    ]  # fmt: skip
    for args, message in cases:
        result = mqsa(*args)
        assert result.returncode == 2, (args, result.stderr[-2000:])
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mqsa: error:") and message in lines[0], lines


def test_a_busy_port_stops_the_demo_before_it_trains(tmp_path) -> None:
    import socket
    import time

    from mqsa.demo import DemoConfig, run_demo
    from mqsa.errors import ConfigError

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        started = time.monotonic()
        with pytest.raises(ConfigError, match=r"port \d+ is in use"):
            run_demo(DemoConfig(workdir=tmp_path, port=busy.getsockname()[1]), keep_running=False)
    assert time.monotonic() - started < 5 and not (tmp_path / "run").exists()
