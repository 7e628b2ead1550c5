"""The `mqsa` command end to end, as a subprocess (what a user runs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def mqsa(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mqsa.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_synth_stats_train_evaluate(tmp_path) -> None:
    data = tmp_path / "data"
    result = mqsa("data", "synth", "--out", str(data), "--users", "300", "--items", "80", "--clusters", "4")
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


def test_help_lists_subcommands() -> None:
    result = mqsa("--help")
    assert result.returncode == 0
    for name in ("data", "train", "evaluate"):
        assert name in result.stdout
