"""mqsa tune: tiny studies on the synthetic data (resumed, pruned, with a trial left running, on
scrambled test items, in two processes) and the space file."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from mqsa.cli import main
from mqsa.errors import ConfigError
from mqsa.training import tune as tune_module
from mqsa.training.search_space import Param, SearchSpace
from mqsa.training.sequences import read_sequences, write_sequences
from mqsa.training.settings_file import read_settings_file
from mqsa.training.tune import TuneConfig, tune
from mqsa.training.vocabulary import vocabulary_for

TINY = {"max_len": 10, "hidden_size": 16, "batch_size": 256}  # a trial of 2 epochs: about a second
PNG = b"\x89PNG\r\n\x1a\n"


def load(out: Path, name: str = "mqsa") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")


@pytest.fixture(scope="module")
def base_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("base") / "base.toml"
    path.write_text("".join(f"{k} = {v}\n" for k, v in TINY.items()))
    return path


def tune_args(data: Path, out: Path, base: Path, *extra: str) -> list[str]:
    """A tiny tune's command line: 2 epochs a trial, one thread, no pruning before epoch 5."""
    common = ["--epochs", "2", "--threads", "1", "--startup-trials", "2", "--quiet"]
    return ["tune", "--data", str(data), "--out", str(out), "--config", str(base), *common, *extra]


@pytest.fixture(scope="module")
def resumed(
    synthetic_data: Path, base_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """One command run for 1 trial, then again for 3 trials and 2 final seeds: a resumed tune."""
    out = tmp_path_factory.mktemp("tune")
    assert main(tune_args(synthetic_data, out, base_file, "--trials", "1")) == 0
    first = load(out).trials[0]
    again = tune_args(synthetic_data, out, base_file, "--trials", "3", "--seeds", "2", "--final-epochs", "1")
    assert main(again) == 0
    return {"out": out, "first": first, "data": synthetic_data}


def test_the_same_command_resumes_a_stopped_tune(resumed) -> None:
    trials = load(resumed["out"]).trials
    assert [t.number for t in trials] == [0, 1, 2]  # 3 trials, not 1 + 3
    assert all(t.state == TrialState.COMPLETE for t in trials)
    first = resumed["first"]
    assert trials[0].params == first.params and trials[0].value == first.value
    assert trials[0].datetime_start == first.datetime_start  # kept, not run again
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 3  # the second run drew new settings


def test_a_study_of_other_data_is_refused(resumed, base_file, tmp_path, capsys) -> None:
    other = tmp_path / "other.txt"
    other.write_text("".join(f"{u} 1 2 3 4 5\n" for u in range(20)))
    assert main(tune_args(other, resumed["out"], base_file, "--trials", "4")) == 2
    err = capsys.readouterr().err.strip()
    assert "study 'mqsa' in sqlite:///" in err and "was made for other data" in err and "\n" not in err
    assert len(load(resumed["out"]).trials) == 3


def test_the_report_shows_the_search_and_the_final_runs_beside_the_baselines(resumed) -> None:
    out = resumed["out"]
    report = (out / "report.md").read_text()
    assert (out / "history.png").read_bytes()[:8] == PNG and (out / "importances.png").read_bytes()[:8] == PNG
    assert "![Optimisation history](history.png)" in report and "![Parameter importances]" in report
    assert "3 finished (3 complete, 0 pruned)" in report
    for n in range(3):
        assert f"\n| {n} | complete | " in report
    assert "## Final runs: the best settings with 2 seed(s), test split" in report
    assert "| Popularity |" in report and "| Item Transition |" in report and " ± " in report
    final = json.loads((out / "final.json").read_text())
    assert final["seeds"] == [42, 43] and [r["seed"] for r in final["runs"]] == [42, 43]
    ndcg = [r["test"]["NDCG@20"] for r in final["runs"]]
    assert final["test"]["NDCG@20"]["mean"] == pytest.approx(np.mean(ndcg))
    assert final["test"]["NDCG@20"]["sd"] == pytest.approx(np.std(ndcg, ddof=1))
    assert set(final["baselines"]["ItemTransition"]) == {"valid", "test"}
    trial_dir = out / "trials" / "mqsa-0000"
    assert json.loads((trial_dir / "metrics.json").read_text())["test"] == {}  # trials rank no test item
    assert not list((out / "trials").rglob("*.pt"))  # trials keep no weights


def test_train_takes_the_best_file_and_a_flag_overrides_it(resumed, tmp_path) -> None:
    out = resumed["out"]
    best = read_settings_file(out / "best.toml")
    study = load(out)
    assert best["lr"] == study.best_params["lr"] and best["windows"] == (study.best_params["windows"],)
    assert best["hidden_size"] == 16 and best["max_len"] == 10  # the base settings travel along
    run = tmp_path / "run"
    args = ["--data", str(resumed["data"]), "--out", str(run), "--config", str(out / "best.toml")]
    assert main(["train", *args, "--epochs", "1", "--lr", "0.0042", "--quiet"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train_config"]["lr"] == 0.0042 and metrics["train_config"]["epochs"] == 1
    assert metrics["train_config"]["l2"] == best["l2"] and metrics["train_config"]["tau"] == best["tau"]
    assert metrics["model_config"]["windows"] == list(best["windows"])
    assert (
        metrics["model_config"]["hidden_size"] == 16 and metrics["model_config"]["dropout"] == best["dropout"]
    )


def test_trials_a_stopped_tune_left_behind_are_run_again(synthetic_data, base_file, tmp_path) -> None:
    out = tmp_path / "tune"
    assert main(tune_args(synthetic_data, out, base_file, "--trials", "1")) == 0
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid now names no process
    study = load(out)
    killed = study.ask()  # what a tune killed mid-trial leaves: a RUNNING trial naming its process
    SearchSpace().suggest(killed)
    killed.set_user_attr("worker", {"host": socket.gethostname(), "pid": gone.pid})
    alive = study.ask()  # one whose process (this one) still runs is left alone
    alive.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
    stopped = study.ask()  # what a Ctrl-C leaves: a FAIL trial marked interrupted
    SearchSpace().suggest(stopped)
    stopped.set_user_attr("interrupted", True)
    study.tell(stopped, state=TrialState.FAIL)
    assert main(tune_args(synthetic_data, out, base_file, "--trials", "3")) == 0
    trials = load(out).trials
    states = [TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING, TrialState.FAIL]
    assert [t.state for t in trials] == [*states, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[4].params == trials[1].params and trials[4].system_attrs["failed_trial"] == 1
    assert trials[5].params == trials[3].params and trials[5].system_attrs["failed_trial"] == 3
    report = (out / "report.md").read_text()
    assert "repeats #1" in report and "repeats #3" in report


def tune_stopped_by_ctrl_c(
    data: Path, out: Path, config: TuneConfig, epoch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run a tune into ``out`` that Ctrl-C stops after ``epoch`` was saved (last.pt), before the
    pruner was told of it."""
    report = tune_module.PrunerFeed.__call__

    def ctrl_c(feed: tune_module.PrunerFeed, at: int, valid: dict[str, float]) -> None:
        if at == epoch:
            raise KeyboardInterrupt
        report(feed, at, valid)

    monkeypatch.setattr(tune_module.PrunerFeed, "__call__", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        tune(data, out, config, TINY, progress=False)
    monkeypatch.undo()


def test_a_trial_stopped_by_ctrl_c_goes_on_from_its_last_epoch(synthetic_data, tmp_path, monkeypatch) -> None:
    config = TuneConfig(trials=1, epochs=3, threads=1, pruner="none")
    tune(synthetic_data, tmp_path / "whole", config, TINY, progress=False)
    tune_stopped_by_ctrl_c(synthetic_data, tmp_path / "stopped", config, 2, monkeypatch)
    assert (tmp_path / "stopped" / "trials" / "mqsa-0000" / "last.pt").is_file()
    tune(synthetic_data, tmp_path / "stopped", config, TINY, progress=False)  # the same command again
    (whole,) = load(tmp_path / "whole").trials
    stopped, again = load(tmp_path / "stopped").trials
    assert stopped.state == TrialState.FAIL and again.user_attrs["repeats"] == 0
    metrics = json.loads((tmp_path / "stopped" / "trials" / "mqsa-0001" / "metrics.json").read_text())
    assert metrics["resumed_at"] == [2] and metrics["epochs_run"] == 3  # went on, did not start again
    assert again.params == whole.params and again.value == whole.value  # as if never stopped
    assert again.intermediate_values == whole.intermediate_values  # the pruner saw epochs 1-2 again
    assert not list((tmp_path / "stopped" / "trials").rglob("*.pt"))  # moved on, then removed at the end


def test_a_trial_stopped_after_its_last_epoch_keeps_every_epochs_score(
    synthetic_data, tmp_path, monkeypatch
) -> None:
    """Stopped after its last epoch was saved, the repeat has no epoch left to train: the
    predecessor's scores must still reach the study (the report, the median pruner)."""
    config = TuneConfig(trials=1, epochs=2, threads=1, pruner="none")
    tune(synthetic_data, tmp_path / "whole", config, TINY, progress=False)
    tune_stopped_by_ctrl_c(synthetic_data, tmp_path / "stopped", config, 2, monkeypatch)
    tune(synthetic_data, tmp_path / "stopped", config, TINY, progress=False)
    (whole,) = load(tmp_path / "whole").trials
    _, again = load(tmp_path / "stopped").trials
    assert again.state == TrialState.COMPLETE and again.value == whole.value
    assert again.intermediate_values == whole.intermediate_values and len(whole.intermediate_values) == 2


def test_settings_that_do_not_go_together_fail_their_trial_only(synthetic_data, base_file, tmp_path) -> None:
    space = write_space(tmp_path, "[num_heads]\nchoices = [3]\n")  # a valid value, but 16 / 3 is not whole
    out = tmp_path / "tune"
    assert main(tune_args(synthetic_data, out, base_file, "--trials", "2", "--space", str(space))) == 0
    assert [t.state for t in load(out).trials] == [TrialState.FAIL, TrialState.FAIL]
    assert "No trial has completed yet" in (out / "report.md").read_text()
    assert not (out / "best.toml").exists()
    # Not a grid: the space file, the base or the machine may change, so a rerun tries again.
    assert main(tune_args(synthetic_data, out, base_file, "--trials", "2", "--space", str(space))) == 0
    assert len(load(out).trials) == 4


def scrambled_copy(data: Path, out: Path) -> Path:
    """``data`` with every user's last item (the test target) changed; the rest as it was."""
    out.mkdir()
    shutil.copy(data.parent / "items.json", out / "items.json")
    sequences = read_sequences(data)
    n = len(vocabulary_for(data, sequences.num_items))
    changed = [np.append(s[:-1], (s[-1] + 1) % n) for s in sequences.sequences]
    write_sequences(out / "sequences.txt", changed, sequences.user_ids)
    return out / "sequences.txt"


def test_trials_never_read_the_test_split(synthetic_data, tmp_path) -> None:
    scrambled = scrambled_copy(synthetic_data, tmp_path / "scrambled")
    assert read_sequences(scrambled).sequences[0][-1] != read_sequences(synthetic_data).sequences[0][-1]
    config = TuneConfig(trials=2, epochs=2, threads=1, startup_trials=2, pruner="none")
    seen = {}
    for name, data in (("original", synthetic_data), ("scrambled", scrambled)):
        tune(data, tmp_path / name, config, TINY, progress=False)
        seen[name] = [(t.params, t.value, t.intermediate_values) for t in load(tmp_path / name).trials]
    assert len(seen["original"]) == 2 and seen["original"] == seen["scrambled"]


def test_the_pruner_gets_every_epochs_validation_score(synthetic_data, tmp_path, monkeypatch) -> None:
    asked: list[tuple[int, int]] = []

    class Recording(optuna.pruners.BasePruner):
        def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
            asked.append((trial.number, trial.last_step))
            return trial.number == 1  # the second trial is pruned at its first report

    monkeypatch.setattr(tune_module, "make_pruner", lambda config: Recording())
    tune(synthetic_data, tmp_path, TuneConfig(trials=2, epochs=3, threads=1), TINY, progress=False)
    complete, pruned = load(tmp_path).trials
    with (tmp_path / "trials" / "mqsa-0000" / "history.csv").open() as f:
        history = {int(r["epoch"]): float(r["valid_NDCG@20"]) for r in csv.DictReader(f)}
    assert complete.intermediate_values == history and list(history) == [1, 2, 3]
    assert asked == [(0, 1), (0, 2), (0, 3), (1, 1)]
    assert pruned.state == TrialState.PRUNED and list(pruned.intermediate_values) == [1]
    assert pruned.user_attrs["epochs_run"] == 1 and pruned.user_attrs["stopped"] == "pruned after epoch 1"
    assert pruned.value == pruned.intermediate_values[1]


def test_two_jobs_run_trials_side_by_side_in_one_study(synthetic_data, tmp_path) -> None:
    config = TuneConfig(trials=2, epochs=1, jobs=2, threads=2, pruner="none")
    summary = tune(synthetic_data, tmp_path, config, TINY, progress=False)
    trials = load(tmp_path).trials
    assert summary["trials"] == {"complete": 2} and len(trials) == 2
    assert len({t.user_attrs["worker"]["pid"] for t in trials}) == 2  # two processes
    assert trials[0].params != trials[1].params  # each process's sampler has its own seed


def write_space(tmp_path: Path, text: str, suffix: str = ".toml") -> Path:
    path = tmp_path / f"space{suffix}"
    path.write_text(text)
    return path


def test_a_grid_runs_every_combination_once_and_a_rerun_adds_none(
    synthetic_data, base_file, tmp_path
) -> None:
    space = write_space(
        tmp_path, "[lr]\nchoices = [1e-3, 2e-3]\n[windows]\nchoices = [1, 2]\n[alpha]\nvalue = 0.3\n"
    )
    out = tmp_path / "tune"
    grid = ["--sampler", "grid", "--space", str(space), "--pruner", "none"]
    assert main(tune_args(synthetic_data, out, base_file, *grid, "--trials", "2")) == 0
    assert len(load(out).trials) == 2  # stopped half way ...
    grid += ["--trials", "10"]
    assert main(tune_args(synthetic_data, out, base_file, *grid)) == 0  # ... and resumed
    trials = load(out).trials
    assert sorted((t.params["lr"], t.params["windows"]) for t in trials) == [
        (1e-3, 1),
        (1e-3, 2),
        (2e-3, 1),
        (2e-3, 2),
    ]  # 4 combinations, each once, not --trials 10; the rest from the base, not the default ranges
    assert all(set(t.params) == {"lr", "windows"} and t.state == TrialState.COMPLETE for t in trials)
    assert main(tune_args(synthetic_data, out, base_file, *grid)) == 0
    assert len(load(out).trials) == 4  # the same command again: the grid is done
    best = read_settings_file(out / "best.toml")
    assert best["alpha"] == 0.3 and "lambda_kd" not in best  # fixed value kept, no default range drawn
    assert "a grid of 4 combinations, each run once" in (out / "report.md").read_text()


def test_a_grid_trial_stopped_by_ctrl_c_is_run_again_and_no_combination_is_lost(
    synthetic_data, tmp_path, monkeypatch
) -> None:
    space = write_space(tmp_path, "[lr]\nchoices = [1e-3, 2e-3]\n[tau]\nchoices = [0.1, 0.2]\n")
    config = TuneConfig(trials=10, epochs=1, threads=1, pruner="none", sampler="grid", space=str(space))
    report = tune_module.PrunerFeed.__call__

    def ctrl_c_in_trial_1(feed: tune_module.PrunerFeed, epoch: int, valid: dict[str, float]) -> None:
        report(feed, epoch, valid)
        if feed.trial.number == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(tune_module.PrunerFeed, "__call__", ctrl_c_in_trial_1)
    with pytest.raises(KeyboardInterrupt):
        tune(synthetic_data, tmp_path / "grid", config, TINY, progress=False)
    monkeypatch.undo()
    tune(synthetic_data, tmp_path / "grid", config, TINY, progress=False)
    trials = load(tmp_path / "grid").trials
    assert trials[1].state == TrialState.FAIL and trials[2].user_attrs["repeats"] == 1
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted((t.params["lr"], t.params["tau"]) for t in complete) == [
        (1e-3, 0.1),
        (1e-3, 0.2),
        (2e-3, 0.1),
        (2e-3, 0.2),
    ]  # the repeat took its predecessor's combination, not a fresh one


def test_a_study_of_another_grid_or_search_is_refused(synthetic_data, tmp_path) -> None:
    first = write_space(tmp_path, "[lr]\nchoices = [1e-3]\n")
    config = TuneConfig(trials=1, epochs=1, threads=1, pruner="none", sampler="grid", space=str(first))
    tune(synthetic_data, tmp_path / "out", config, TINY, progress=False)
    other = tmp_path / "other.toml"
    other.write_text("[lr]\nchoices = [1e-3, 2e-3]\n")
    grid = 'holds the grid {"lr": [0.001]}, this run asks for the grid {"lr": [0.001, 0.002]}'
    with pytest.raises(ConfigError, match=re.escape(grid)):
        tune(synthetic_data, tmp_path / "out", replace(config, space=str(other)), TINY, progress=False)
    with pytest.raises(ConfigError, match=re.escape("this run asks for a TPE search")):
        tune(synthetic_data, tmp_path / "out", replace(config, sampler="tpe"), TINY, progress=False)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "a grid needs a space file (--space) with the choices of each setting to vary"),
        (
            "[lr]\nlow = 1e-4\nhigh = 1e-3\n[tau]\nchoices = [0.1]\n",
            "a grid takes choices or a value, not a range: lr",
        ),
        ("[dropout]\nvalue = 0.5\n", "a grid needs at least one setting with choices"),
    ],
)
def test_a_grid_without_choices_is_a_config_error(tmp_path, text: str | None, message: str) -> None:
    path = None if text is None else write_space(tmp_path, text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        SearchSpace.from_file(path, grid=True)


def test_a_space_file_narrows_widens_and_fixes_the_search(tmp_path) -> None:
    entries = {
        "lr": {"low": 5e-4, "high": 2e-3, "log": True},
        "dropout": {"value": 0.5},
        "hidden_size": {"choices": [16, 32]},
        "windows": {"low": 2, "high": 4},
    }
    space = SearchSpace.from_file(write_space(tmp_path, json.dumps(entries), ".json"))
    by_name = {p.name: p for p in space.params}
    assert by_name["lr"] == Param("lr", low=5e-4, high=2e-3, log=True)
    assert not by_name["dropout"].searched and by_name["hidden_size"].choices == (16, 32)
    assert {"alpha", "lambda_kd", "tau", "l2"} <= {p.name for p in space.searched()}  # defaults kept
    for _ in range(5):
        drawn = space.suggest(optuna.create_study().ask())
        assert 5e-4 <= drawn["lr"] <= 2e-3 and drawn["dropout"] == 0.5 and drawn["hidden_size"] in (16, 32)
        assert drawn["windows"] in {(2,), (3,), (4,)}


def test_a_new_tpe_study_starts_with_the_base_settings_the_space_can_draw(
    synthetic_data, base_file, tmp_path
) -> None:
    """The first trial trains the base settings (the paper's, and the base file's), so the
    search never ends below them on validation; an lr outside the space is left to TPE."""
    space = write_space(tmp_path, "[lr]\nlow = 2e-3\nhigh = 4e-3\n[hidden_size]\nchoices = [16, 32]\n")
    out = tmp_path / "tune"
    assert main(tune_args(synthetic_data, out, base_file, "--trials", "2", "--space", str(space))) == 0
    first, second = load(out).trials
    assert first.user_attrs["base_trial"] and "base_trial" not in second.user_attrs
    paper = {"l2": 1e-4, "dropout": 0.5, "windows": 3, "alpha": 0.5, "lambda_kd": 0.1, "tau": 0.1}
    assert {k: first.params[k] for k in paper} == paper and first.params["hidden_size"] == TINY["hidden_size"]
    assert 2e-3 <= first.params["lr"] <= 4e-3  # the base's 1e-3 is outside: drawn
    assert "the base settings" in (out / "report.md").read_text()
    unqueued = tmp_path / "unqueued"
    argv = tune_args(
        synthetic_data, unqueued, base_file, "--trials", "1", "--space", str(space), "--no-base-trial"
    )
    assert main(argv) == 0
    assert "base_trial" not in load(unqueued).trials[0].user_attrs


def test_a_starting_point_holds_only_values_the_space_can_draw() -> None:
    space = SearchSpace.from_table(
        {"lr": {"low": 1e-3, "high": 2e-3}, "batch_size": {"low": 128, "high": 512, "step": 128}}, "t"
    )
    settings = {"lr": 1e-3, "l2": 2e-3, "windows": (2, 3), "batch_size": 256, "dropout": 0.5, "alpha": 0.5}
    point = space.starting_point(settings | {"lambda_kd": 0.1, "tau": 0.1})
    assert point == {
        "lr": 1e-3,
        "batch_size": 256,
        "dropout": 0.5,
        "alpha": 0.5,
        "lambda_kd": 0.1,
        "tau": 0.1,
    }
    assert "batch_size" not in space.starting_point(settings | {"batch_size": 200})  # off the step
    assert space.starting_point({"windows": (4,)}) == {"windows": 4}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[learning_rate]\nlow = 1e-4\nhigh = 1e-3\n", "unknown parameter learning_rate (searchable: "),
        ("[epochs]\nvalue = 3\n[seed]\nvalue = 1\n", "unknown parameters epochs, seed"),
        ("[lr]\nlow = 1e-2\nhigh = 1e-3\n", "lr: low must be below high, got low 0.01 and high 0.001"),
        ("[l2]\nlow = 0.0\nhigh = 1e-3\nlog = true\n", "l2: a log-scale range needs low > 0"),
        ("[dropout]\nlow = 0.1\nhigh = 1.0\n", "dropout: dropout must be in [0, 1), got 1.0"),
        ("[alpha]\nchoices = [0.5, 2.0]\n", "alpha: alpha must be in [0, 1], got 2.0"),
        ("[windows]\nlow = 1\nhigh = 2.5\n", "windows must be an integer, got 2.5"),
        ("[lr]\nlow = 1e-4\nhgh = 1e-3\n", "lr: unknown key hgh"),
        ("[lr]\nvalue = 1e-3\nlow = 1e-4\n", "lr: give exactly one of a range (low, high), choices or value"),
        ("[lr]\nlow = 1e-4\n", "lr: a range needs both low and high"),
        ("lr = 0.001\n", "lr: expected a table"),
        ("[linear_init]\nlow = 0\nhigh = 1\n", "linear_init: not a number: give choices or a value"),
        ('[linear_init]\nchoices = ["torch", "xavier"]\n', "linear_init must be one of 'torch', 'glorot'"),
        ("[hidden_size]\nchoices = []\n", "hidden_size: choices must be a non-empty list"),
    ],
)
def test_a_bad_space_file_is_a_config_error_naming_the_setting(tmp_path, text: str, message: str) -> None:
    path = write_space(tmp_path, text)
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        SearchSpace.from_file(path)
    assert str(info.value).startswith(f"{path}: ")


def test_a_bad_space_file_stops_the_command_in_one_line(synthetic_data, base_file, tmp_path, capsys) -> None:
    space = write_space(tmp_path, "[lr]\nlow = 1e-2\nhigh = 1e-3\n")
    out = tmp_path / "tune"
    assert main(tune_args(synthetic_data, out, base_file, "--space", str(space))) == 2
    assert capsys.readouterr().err.strip() == (
        f"mqsa: error: {space}: lr: low must be below high, got low 0.01 and high 0.001"
    )
    assert not out.exists()  # nothing started


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("trials", 0),
        ("epochs", 0),
        ("jobs", 0),
        ("timeout", -1.0),
        ("final_epochs", 0),
        ("sampler", "random"),
    ],
)
def test_bad_tune_settings_are_config_errors_naming_them(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=field):
        TuneConfig(**{field: value})


def test_fewer_threads_than_jobs_is_a_config_error_not_more_threads_than_asked() -> None:
    with pytest.raises(ConfigError, match=r"threads \(1\) must be 0 or at least jobs \(2\)"):
        TuneConfig(threads=1, jobs=2)
    assert TuneConfig(threads=0, jobs=2).threads_per_job(2) >= 1
    assert TuneConfig(threads=4, jobs=2).threads_per_job(2) == 2


def test_a_finished_final_run_is_recognised_by_its_resolved_lazy_setting() -> None:
    """The trainer records ``lazy_item_updates`` resolved (true for the sampled loss by
    default), so the tune's unset setting must match it, and only it, when rerun."""
    from dataclasses import asdict

    from mqsa.models.mqsa import MQSAConfig
    from mqsa.training.trainer import TrainConfig

    model_config = {"max_len": 10, "hidden_size": 16}
    recorded_model = MQSAConfig(num_items=50, **model_config).to_dict()
    for loss, lazy in (("sampled", True), ("exact", False)):
        config = TrainConfig(epochs=1, loss=loss)
        recorded = asdict(replace(config, lazy_item_updates=lazy))
        metrics = {"model_config": recorded_model, "train_config": recorded}
        assert tune_module.same_run(metrics, model_config, config)
        metrics["train_config"]["lazy_item_updates"] = not lazy
        assert not tune_module.same_run(metrics, model_config, config)


def test_a_grid_combination_refused_for_its_settings_counts_as_run_and_a_rerun_adds_none(
    synthetic_data, base_file, tmp_path
) -> None:
    """Optuna's grid counts a failed combination as visited: so must ``--trials``, or every
    rerun would draw a combination at random and run it again."""
    space = write_space(tmp_path, "[num_heads]\nchoices = [1, 3]\n")  # 16 / 3 is not whole
    out = tmp_path / "tune"
    grid = ["--sampler", "grid", "--space", str(space), "--pruner", "none", "--trials", "10"]
    assert main(tune_args(synthetic_data, out, base_file, *grid)) == 0
    states = sorted((t.params["num_heads"], t.state.name) for t in load(out).trials)
    assert states == [(1, "COMPLETE"), (3, "FAIL")]
    assert main(tune_args(synthetic_data, out, base_file, *grid)) == 0
    assert len(load(out).trials) == 2  # nothing run again
    assert "refused" in next(t for t in load(out).trials if t.state == TrialState.FAIL).user_attrs


def test_best_file_holds_the_settings_the_best_trial_ran_with_not_a_later_space_files(
    synthetic_data, base_file, tmp_path
) -> None:
    out = tmp_path / "tune"
    first = write_space(tmp_path, "[dropout]\nvalue = 0.3\n[lr]\nlow = 1e-3\nhigh = 2e-3\n")
    assert main(tune_args(synthetic_data, out, base_file, "--trials", "1", "--space", str(first))) == 0
    later = tmp_path / "later"
    later.mkdir()
    changed = write_space(later, "[dropout]\nvalue = 0.6\n")
    assert main(tune_args(synthetic_data, out, base_file, "--trials", "1", "--space", str(changed))) == 0
    assert len(load(out).trials) == 1  # the study was done: only best.toml was written again
    best = read_settings_file(out / "best.toml")
    assert best["dropout"] == 0.3 and best["lr"] == load(out).trials[0].params["lr"]
    assert best["hidden_size"] == TINY["hidden_size"]  # the base it ran with
