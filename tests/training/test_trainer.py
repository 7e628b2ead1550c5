from __future__ import annotations

import csv
import itertools
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from mqsa.errors import ConfigError, DataError, ResumeError
from mqsa.training.checkpoint import Checkpoint
from mqsa.training.evaluation import evaluate_checkpoint
from mqsa.training.sequences import split_leave_one_out, write_sequences
from mqsa.training.trainer import StopTraining, TrainConfig, Trainer, TrainingExamples, train


def test_two_epochs_beat_popularity_clearly(trained_run) -> None:
    m = trained_run["metrics"]
    popular = m["baselines"]["Popularity"]["test"]
    assert m["test"]["NDCG@10"] > 3 * popular["NDCG@10"]
    assert m["test"]["HR@10"] > 2 * popular["HR@10"]
    assert m["best_epoch"] in (1, 2)
    assert m["epochs_run"] == 2


def test_run_writes_its_reports(trained_run) -> None:
    out = trained_run["dir"]
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["test"] == trained_run["metrics"]["test"]
    assert set(on_disk["test"]) == {f"{m}@{k}" for m in ("HR", "NDCG") for k in (5, 10, 20)}
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert float(rows[1]["loss"]) < float(rows[0]["loss"])
    assert all(float(r["kd"]) > 0 for r in rows)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_record_names_the_hardware(trained_run) -> None:
    metrics = trained_run["metrics"]
    assert metrics["device"] == "cpu"
    name = metrics["device_name"]
    assert name and "\n" not in name
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if "model name" in cpuinfo:  # x86 Linux, these machines: the CPU model itself
        assert f": {name}\n" in cpuinfo and name != "cpu"


def test_checkpoint_alone_rebuilds_the_model(trained_run) -> None:
    ckpt = Checkpoint.load(trained_run["dir"] / "best.pt")
    model = ckpt.build_model()
    assert model.config.hidden_size == 32 and model.config.max_len == 20
    assert len(ckpt.item_ids) == model.config.num_items
    assert sum(ckpt.item_counts) > 0
    assert ckpt.best.epoch == trained_run["metrics"]["best_epoch"]
    assert ckpt.best.test == trained_run["metrics"]["test"]
    again = Checkpoint.load(trained_run["dir"] / "best.pt").build_model()
    batch = torch.randint(0, model.config.num_items, (4, 20))
    torch.testing.assert_close(model.encode(batch), again.encode(batch), rtol=0, atol=0)


def test_evaluate_checkpoint_reproduces_the_training_metrics(trained_run) -> None:
    result = evaluate_checkpoint(trained_run["dir"] / "best.pt", trained_run["data"])
    for key, value in trained_run["metrics"]["test"].items():
        assert result["test"][key] == pytest.approx(value, abs=1e-6)
    assert result["valid"]["NDCG@20"] == pytest.approx(trained_run["metrics"]["valid"]["NDCG@20"], abs=1e-6)


def test_same_seed_same_result(synthetic_data, tmp_path) -> None:
    config = TrainConfig(epochs=1, batch_size=256, seed=3)
    small = {"max_len": 10, "hidden_size": 16}
    a = train(synthetic_data, tmp_path / "a", small, config, progress=False)
    b = train(synthetic_data, tmp_path / "b", small, config, progress=False)
    assert a["test"] == b["test"]


def test_patience_stops_after_that_many_evaluations_without_gain(synthetic_data, tmp_path) -> None:
    """lr 1e-12 leaves the weights as they are: epoch 1 is the best, epochs 2 and 3 are no
    better (a tie is not a gain), so patience 2 stops the run after epoch 3."""
    config = TrainConfig(epochs=50, batch_size=256, lr=1e-12, patience=2, seed=0)
    m = train(synthetic_data, tmp_path, {"max_len": 10, "hidden_size": 16}, config, progress=False)
    assert m["best_epoch"] == 1
    assert m["epochs_run"] == 3
    rows = list(csv.DictReader((tmp_path / "history.csv").open()))
    assert [r["valid_NDCG@20"] for r in rows] == [rows[0]["valid_NDCG@20"]] * 3


def test_on_epoch_sees_every_evaluation_and_may_stop_the_run(synthetic_data, tmp_path) -> None:
    """The callback `mqsa tune` feeds its pruner with: each evaluated epoch's validation metrics, and
    StopTraining ends the run there as patience would (reports written, the best epoch selected)."""
    seen: list[tuple[int, float]] = []

    def on_epoch(epoch: int, valid: dict[str, float]) -> None:
        seen.append((epoch, valid["NDCG@20"]))
        if epoch == 2:
            raise StopTraining("enough")

    config = TrainConfig(epochs=5, batch_size=256, seed=1, threads=1)
    small = {"max_len": 10, "hidden_size": 16}
    trainer = Trainer(synthetic_data, tmp_path, small, config, False, on_epoch, evaluate_test=False)
    metrics = trainer.fit()
    rows = list(csv.DictReader((tmp_path / "history.csv").open()))
    assert seen == [(int(r["epoch"]), float(r["valid_NDCG@20"])) for r in rows] and len(rows) == 2
    assert metrics["stopped"] == "enough" and metrics["epochs_run"] == 2 and metrics["best_epoch"] in (1, 2)
    assert metrics["test"] == {}  # evaluate_test=False: the test split is never ranked
    assert all(set(by_split) == {"valid"} for by_split in metrics["baselines"].values())
    assert json.loads((tmp_path / "metrics.json").read_text())["stopped"] == "enough"


def test_training_examples_are_shifted_and_left_padded() -> None:
    seqs = [np.array([5, 6, 7, 8, 9]), np.array([1, 2, 3])]
    split = split_leave_one_out(seqs, max_len=4)  # train: [5, 6, 7] and [1]
    ex = TrainingExamples.from_split(split, max_len=4, padding_idx=10)
    assert len(ex) == 1  # the user with one training item gives no example
    assert ex.inputs.tolist() == [[10, 10, 5, 6]]
    assert ex.targets.tolist() == [[10, 10, 6, 7]]
    inputs, targets = ex.batch(np.array([0]), torch.device("cpu"))
    assert inputs.tolist() == [[10, 10, 5, 6]] and targets.tolist() == [[10, 10, 6, 7]]  # the model trims


def test_nothing_to_train_on_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "short.txt"
    write_sequences(path, [np.array([1, 2, 3]), np.array([0, 2, 1])])
    with pytest.raises(DataError, match="no user has two training items"):
        train(path, tmp_path / "out", {"max_len": 5}, TrainConfig(epochs=1), progress=False)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epochs", 0),
        ("lr", 0.0),
        ("adam_beta2", 1.0),
        ("device", "tpu"),
        ("precision", "fp8"),
        ("patience", -1),
        ("threads", -2),
    ],
)
def test_bad_train_config_is_a_config_error_naming_the_field(field: str, value) -> None:
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value})


def test_num_items_in_the_model_config_is_refused(synthetic_data, tmp_path) -> None:
    with pytest.raises(ConfigError, match="num_items comes from the data"):
        train(synthetic_data, tmp_path, {"num_items": 5}, TrainConfig(epochs=1), progress=False)


def test_two_processes_end_with_identical_weights(synthetic_data, tmp_path) -> None:
    """torchrun with 2 CPU processes (gloo): gradients averaged, replicas identical at the end."""
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "mqsa.cli", "train", "--data", str(synthetic_data), "--out", str(out), "--epochs", "2"]
    cmd += ["--max-len", "10", "--hidden-size", "16", "--threads", "1", "--quiet"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    sums = metrics["distributed"]["replica_checksums"]
    assert metrics["distributed"]["world_size"] == 2 and len(sums) == 2 and sums[0] == sums[1]
    assert metrics["test"]["NDCG@10"] > 2 * metrics["baselines"]["Popularity"]["test"]["NDCG@10"]


def run_cli_train(data: Path, out: Path, flags: list[str], processes: int) -> dict:
    """``mqsa train`` in a subprocess, under torchrun with ``processes`` CPU processes if > 1."""
    import subprocess
    import sys

    cmd = [sys.executable]
    if processes > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    cmd += ["-m", "mqsa.cli", "train", "--data", str(data), "--out", str(out), "--threads", "1", "--quiet"]
    result = subprocess.run(cmd + flags, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize(
    "loss", [["--loss", "exact"], ["--loss", "sampled", "--negatives", "16"]], ids=["exact", "sampled"]
)
def test_two_processes_take_the_full_batch_step(loss: list[str], tmp_path) -> None:
    """DDP averages the gradient of every parameter: where the mean of the two shards' gradients
    is the full batch's (every row the same number of real positions and items, shards of equal
    size, no dropout), 2 processes end where 1 process does, to float rounding. The learned alpha
    is a parameter used outside the model's forward (the blend), TED uses the item table, and
    the L2 penalty every parameter."""
    rng = np.random.default_rng(3)
    data = tmp_path / "equal.txt"
    write_sequences(data, [rng.permutation(40)[:14] for _ in range(64)])  # 9 real positions a row
    flags = ["--epochs", "2", "--batch-size", "16", "--max-len", "10", "--hidden-size", "16"]
    flags += ["--dropout", "0", "--learn-alpha", "--lambda-kd", "0.5", *loss]
    # one process would update its item rows lazily by default; two (torchrun) resolve to dense
    one = run_cli_train(data, tmp_path / "one", [*flags, "--no-lazy-item-updates"], processes=1)
    two = run_cli_train(data, tmp_path / "two", flags, processes=2)
    assert two["train_config"]["lazy_item_updates"] is False
    sums = two["distributed"]["replica_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    assert one["distributed"]["world_size"] == 1
    single = torch.load(tmp_path / "one" / "last.pt", weights_only=False)["model"]
    parallel = torch.load(tmp_path / "two" / "last.pt", weights_only=False)["model"]
    assert list(parallel) == list(single)  # the model's own names, no DDP "module." prefix
    assert Checkpoint.load(tmp_path / "two" / "best.pt").state_dict.keys() == single.keys()
    for name, value in single.items():
        torch.testing.assert_close(parallel[name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_one_process_trains_the_objective_unwrapped() -> None:
    """Without torchrun the step calls its objective directly: no DistributedDataParallel."""
    from mqsa.training.distributed import World

    module = torch.nn.Linear(2, 2)
    assert World().wrap(module, torch.device("cpu")) is module


def spy_evaluations(monkeypatch) -> list[int]:
    """Record the number of users of every model evaluation the trainer runs."""
    from mqsa.training import trainer as trainer_module

    sizes: list[int] = []
    real = trainer_module.evaluate_model

    def spy(model, eval_set, *args, **kwargs):
        sizes.append(len(eval_set))
        return real(model, eval_set, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "evaluate_model", spy)
    return sizes


def test_validation_sample_is_fixed_and_the_final_pass_is_full(synthetic_data, tmp_path, monkeypatch) -> None:
    sizes = spy_evaluations(monkeypatch)
    config = TrainConfig(epochs=2, batch_size=256, seed=5, valid_sample=100, threads=1)
    trainer = Trainer(synthetic_data, tmp_path, {"max_len": 10, "hidden_size": 16}, config, progress=False)
    sample = trainer.valid_set
    users = len(trainer.data.eval_sets["valid"])
    metrics = trainer.fit()
    assert trainer.valid_set is sample and len(sample) == 100 < users  # drawn once, used every epoch
    again = Trainer(
        synthetic_data, tmp_path / "again", {"max_len": 10, "hidden_size": 16}, config, progress=False
    )
    assert again.valid_set.targets.tolist() == sample.targets.tolist()  # the seed fixes it
    assert sizes == [100, 100, users, users]  # two sampled epochs, then full valid and test
    full = evaluate_checkpoint(tmp_path / "best.pt", synthetic_data)
    assert metrics["valid"] == pytest.approx(full["valid"], abs=1e-6)
    assert metrics["test"] == pytest.approx(full["test"], abs=1e-6) and metrics["selection"] == "best_valid"
    rows = list(csv.DictReader((tmp_path / "history.csv").open()))
    best_row = rows[metrics["best_epoch"] - 1]
    assert float(best_row["valid_NDCG@20"]) != pytest.approx(metrics["valid"]["NDCG@20"], abs=1e-9)


def test_eval_every_beyond_the_epochs_runs_no_validation(synthetic_data, tmp_path, monkeypatch) -> None:
    """--epochs 1 --eval-every 2: no per-epoch validation; the last epoch's model is the result,
    evaluated once at the end on the validation and test splits."""
    sizes = spy_evaluations(monkeypatch)
    seen: list[int] = []
    config = TrainConfig(epochs=1, eval_every=2, batch_size=256, seed=2, threads=1)
    small = {"max_len": 10, "hidden_size": 16}
    trainer = Trainer(synthetic_data, tmp_path, small, config, False, lambda epoch, _: seen.append(epoch))
    metrics = trainer.fit()
    users = len(trainer.data.eval_sets["valid"])
    assert seen == [] and sizes == [users, users]  # no validation epoch; one final pass each
    assert metrics["best_epoch"] == 1 and metrics["selection"] == "last_epoch"
    rows = list(csv.DictReader((tmp_path / "history.csv").open()))
    assert len(rows) == 1 and "valid_NDCG@20" not in rows[0]
    last = torch.load(tmp_path / "last.pt", weights_only=False)["model"]
    best = Checkpoint.load(tmp_path / "best.pt").state_dict
    assert all(torch.equal(last[k], best[k]) for k in last)  # the last epoch's weights
    full = evaluate_checkpoint(tmp_path / "best.pt", synthetic_data)
    assert metrics["test"] == pytest.approx(full["test"], abs=1e-6) and metrics["test"]


def test_cosine_schedule_decays_from_lr_to_a_hundredth_then_stays() -> None:
    config = TrainConfig(lr=1e-3, lr_schedule="cosine", lr_decay_epochs=4, epochs=10)
    rates = [config.lr_at(e) for e in range(1, 8)]
    assert rates[0] == pytest.approx(1e-3) and rates[2] == pytest.approx((1e-3 + 1e-5) / 2)
    assert all(a > b for a, b in itertools.pairwise(rates[:5]))  # decreasing to epoch 5
    assert rates[4:] == pytest.approx([1e-5] * 3)
    assert TrainConfig(lr_schedule="cosine", epochs=3).lr_at(4) == pytest.approx(1e-5)  # 0: over epochs
    assert {TrainConfig(lr=2e-3).lr_at(e) for e in (1, 50, 200)} == {2e-3}  # constant, the default
    with pytest.raises(ConfigError, match="lr_schedule"):
        TrainConfig(lr_schedule="step")
    with pytest.raises(ConfigError, match="lr_decay_epochs"):
        TrainConfig(lr_decay_epochs=-1)


def test_cosine_schedule_sets_each_epochs_rate_and_a_resumed_run_keeps_it(synthetic_data, tmp_path) -> None:
    """The optimizer trains each epoch at lr_at(epoch) (history.csv's lr), and a run resumed
    mid-schedule carries on from the epoch's rate, not from the start."""
    small = {"max_len": 10, "hidden_size": 16}
    config = TrainConfig(epochs=3, seed=3, threads=1, lr_schedule="cosine", lr_decay_epochs=2)
    rates: list[float] = []

    def record(epoch: int, _valid: dict[str, float]) -> None:
        rates.append(trainer.optimizer.param_groups[0]["lr"])

    trainer = Trainer(synthetic_data, tmp_path / "a", small, config, progress=False, on_epoch=record)
    trainer.fit()
    assert rates == pytest.approx([1e-3, (1e-3 + 1e-5) / 2, 1e-5])
    rows = list(csv.DictReader((tmp_path / "a" / "history.csv").open()))
    assert [float(r["lr"]) for r in rows] == pytest.approx(rates)
    train(synthetic_data, tmp_path / "b", small, replace(config, epochs=2), progress=False)
    rates.clear()
    trainer = Trainer(synthetic_data, tmp_path / "b", small, config, progress=False, on_epoch=record)
    trainer.fit(resume=True)
    assert rates == pytest.approx([1e-5])
    over_epochs = replace(config, lr_decay_epochs=0)  # the schedule's length is --epochs then
    train(synthetic_data, tmp_path / "c", small, replace(over_epochs, epochs=2), progress=False)
    with pytest.raises(ResumeError, match=r"lr_decay_epochs: 2 -> 3"):  # it would reshape the rates
        train(
            synthetic_data, tmp_path / "c", small, replace(over_epochs, epochs=3), progress=False, resume=True
        )
