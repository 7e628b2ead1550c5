"""Warm start (``--init-from``): rows matched by external id, new rows from neighbours or the mean."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mqsa import cli
from mqsa.errors import ConfigError, DataError, ResumeError
from mqsa.models.mqsa import MQSA, MQSAConfig
from mqsa.training.checkpoint import Checkpoint
from mqsa.training.losses import LossValues
from mqsa.training.sequences import read_sequences, write_sequences
from mqsa.training.trainer import TrainConfig, Trainer, train
from mqsa.training.transitions import TransitionGraph
from mqsa.training.vocabulary import Vocabulary
from mqsa.training.warm_start import load_warm_start_checkpoint, warm_start

SMALL = {"max_len": 8, "hidden_size": 8}


def old_checkpoint(item_ids: list[str], path: Path | None = None, **config: int) -> Checkpoint:
    """A checkpoint of a randomly initialised network whose item rows are all distinct."""
    torch.manual_seed(0)
    model = MQSA(MQSAConfig(num_items=len(item_ids), **{**SMALL, **config}))
    with torch.no_grad():
        model.item_emb.weight[: len(item_ids)].normal_()
    ckpt = Checkpoint(model.config.to_dict(), model.state_dict(), item_ids=item_ids)
    if path is not None:
        ckpt.save(path)
        ckpt.path = path
    return ckpt


def new_model(num_items: int, **config: int) -> MQSA:
    torch.manual_seed(1)
    return MQSA(MQSAConfig(num_items=num_items, **{**SMALL, **config}))


def graph(sequences: list[list[int]], num_items: int) -> TransitionGraph:
    return TransitionGraph.from_sequences([np.array(s) for s in sequences], num_items)


def test_new_item_gets_the_count_weighted_mean_of_its_known_neighbours() -> None:
    old = old_checkpoint(["a", "b", "c", "d"])
    rows = old.state_dict["item_emb.weight"]
    new_ids = ["x", "c", "a", "y", "b", "z"]  # x, y, z new; d dropped; a, b, c at new indices
    x, c, a, y, b, z = range(6)
    # a -> x twice, x -> b once, c -> x once (x is a neighbour either way); y <-> z only: both new
    sequences = [[a, x, b], [a, x], [c, x], [y, z, y]]
    model = new_model(len(new_ids))
    report = warm_start(model, old, new_ids, graph(sequences, len(new_ids)))
    table = model.item_emb.weight.detach()
    expected_x = (2 * rows[0] + rows[1] + rows[2]) / 4  # old a (x2), old b, old c
    torch.testing.assert_close(table[x], expected_x, rtol=1e-6, atol=1e-7)
    assert (report.kept, report.new_from_neighbours, report.new_from_mean, report.dropped) == (3, 1, 2, 1)


def test_item_without_a_known_neighbour_gets_the_mean_row() -> None:
    old = old_checkpoint(["a", "b", "c"])
    mean = old.state_dict["item_emb.weight"][:3].mean(0)
    new_ids = ["a", "y", "z", "w"]  # y <-> z (both new); w appears nowhere
    model = new_model(len(new_ids))
    warm_start(model, old, new_ids, graph([[1, 2, 1]], len(new_ids)))
    table = model.item_emb.weight.detach()
    for item in (1, 2, 3):
        assert torch.equal(table[item], mean)
    assert torch.count_nonzero(table[len(new_ids)]) == 0  # the padding row stays zero


def larger_shuffled_catalogue(old_data: Path, out_dir: Path, extra: int = 30) -> list[str]:
    """The old data's users with 3 of ``extra`` new items appended, every item renumbered at random."""
    old_ids = Vocabulary.load(old_data.with_name("items.json")).item_ids
    ids = old_ids + [f"new{k}" for k in range(extra)]
    order = np.random.default_rng(5).permutation(len(ids))  # new index -> position in ``ids``
    new_index = np.argsort(order)  # position in ``ids`` -> new index
    rng = np.random.default_rng(6)
    sequences = [
        new_index[np.concatenate([s, rng.integers(len(old_ids), len(ids), 3)])]
        for s in read_sequences(old_data).sequences
    ]
    out_dir.mkdir()
    write_sequences(out_dir / "sequences.txt", sequences)
    Vocabulary(ids[i] for i in order).save(out_dir / "items.json")
    return [ids[i] for i in order]


def test_old_rows_are_bit_identical_before_the_first_step(trained_run, tmp_path, monkeypatch) -> None:
    """Onto a larger catalogue with shuffled indices, through the trainer's own path."""
    old = Checkpoint.load(trained_run["dir"] / "best.pt")
    new_ids = larger_shuffled_catalogue(trained_run["data"], tmp_path / "new")
    seen: list[torch.Tensor] = []
    first_step = Trainer._train_step

    def record_then_step(self: Trainer, rows: np.ndarray) -> LossValues:
        if not seen:
            seen.append(self.model.item_emb.weight.detach().clone())
        return first_step(self, rows)

    monkeypatch.setattr(Trainer, "_train_step", record_then_step)
    config = TrainConfig(epochs=1, batch_size=256, init_from=str(old.path))
    model_config = {k: v for k, v in old.model_config.items() if k != "num_items"}
    metrics = train(tmp_path / "new" / "sequences.txt", tmp_path / "run", model_config, config, False)
    table, old_rows = seen[0], old.state_dict["item_emb.weight"]
    position = {item_id: i for i, item_id in enumerate(old.item_ids)}
    for new_idx, item_id in enumerate(new_ids):
        if item_id in position:
            assert torch.equal(table[new_idx], old_rows[position[item_id]]), item_id
    assert metrics["warm_start"]["kept"] == len(old.item_ids)
    assert metrics["warm_start"]["new_from_neighbours"] + metrics["warm_start"]["new_from_mean"] == 30
    assert metrics["warm_start"]["dropped"] == 0


def test_other_weights_are_copied() -> None:
    old = old_checkpoint(["a", "b"])
    model = new_model(3)
    warm_start(model, old, ["b", "a", "c"], graph([[0, 1, 2]], 3))
    for name, tensor in model.state_dict().items():
        if name != "item_emb.weight":
            assert torch.equal(tensor, old.state_dict[name]), name


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"hidden_size": 16}, "item_emb.weight"),
        ({"max_len": 12}, "pos_emb.weight"),
        ({"num_blocks": 2}, "blocks.1.*num_blocks 1 -> 2"),
        ({"windows": (2, 3)}, "longs.1"),
    ],
)
def test_another_architecture_is_refused_naming_the_parameter(tmp_path, change, named) -> None:
    old = old_checkpoint(["a", "b"], tmp_path / "old.pt")
    model = new_model(2, **change)
    with pytest.raises(ConfigError, match=f"--init-from {tmp_path / 'old.pt'}.*{named}"):
        warm_start(model, old, ["a", "b"], graph([[0, 1]], 2))


def test_missing_unreadable_or_idless_checkpoints_are_clear_errors(tmp_path) -> None:
    with pytest.raises(DataError, match="no such checkpoint"):
        load_warm_start_checkpoint(tmp_path / "nothing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="not a readable checkpoint"):
        load_warm_start_checkpoint(tmp_path / "garbage.pt")
    old = old_checkpoint(["a", "b"])
    Checkpoint(old.model_config, old.state_dict, item_ids=None).save(tmp_path / "noids.pt")
    with pytest.raises(DataError, match="no item ids"):
        load_warm_start_checkpoint(tmp_path / "noids.pt")


def synth(tmp_path: Path, name: str, items: int, seed: int) -> Path:
    out = tmp_path / name
    args = ["--users", "300", "--items", str(items), "--tastes", "4", "--bundles", "20", "--seed", str(seed)]
    assert cli.main(["data", "synth", "--out", str(out), *args]) == 0
    return out / "sequences.txt"


def test_cli_init_from_end_to_end(tmp_path, capsys) -> None:
    small = ["--max-len", "10", "--hidden-size", "16", "--epochs", "1", "--quiet"]
    old_data, new_data = synth(tmp_path, "old", 60, 0), synth(tmp_path, "new", 80, 1)
    assert cli.main(["train", "--data", str(old_data), "--out", str(tmp_path / "r1"), *small]) == 0
    warm = ["train", "--data", str(new_data), "--out", str(tmp_path / "r2"), *small]
    assert cli.main([*warm, "--init-from", str(tmp_path / "r1" / "best.pt")]) == 0
    record = json.loads((tmp_path / "r2" / "metrics.json").read_text())["warm_start"]
    assert record["kept"] == 60 and record["dropped"] == 0
    assert record["new_from_neighbours"] + record["new_from_mean"] == 20
    assert record["new_from_neighbours"] > 0
    capsys.readouterr()
    assert cli.main([*warm, "--init-from", str(tmp_path / "none.pt")]) == 2
    assert "none.pt: no such checkpoint" in capsys.readouterr().err
    assert cli.main([*warm, "--hidden-size", "32", "--init-from", str(tmp_path / "r1" / "best.pt")]) == 2
    assert "item_emb.weight" in capsys.readouterr().err


def test_a_resumed_run_does_not_reinitialise(trained_run, tmp_path) -> None:
    """The old checkpoint is read once, by the first start: a resume needs only ``last.pt``."""
    old = tmp_path / "old.pt"
    old.write_bytes((trained_run["dir"] / "best.pt").read_bytes())
    model_config = Checkpoint.load(old).model_config
    model_config.pop("num_items")
    config = TrainConfig(epochs=1, batch_size=256, init_from=str(old))
    first = train(trained_run["data"], tmp_path / "run", model_config, config, progress=False)
    old.unlink()  # a re-initialisation would fail now
    config = TrainConfig(epochs=2, batch_size=256, init_from=str(old))
    second = train(trained_run["data"], tmp_path / "run", model_config, config, progress=False, resume=True)
    assert second["epochs_run"] == 2 and second["resumed_at"] == [1]
    assert second["warm_start"] == first["warm_start"]
    with pytest.raises(ResumeError, match="init_from"):
        train(
            trained_run["data"],
            tmp_path / "run",
            model_config,
            TrainConfig(epochs=3),
            progress=False,
            resume=True,
        )
