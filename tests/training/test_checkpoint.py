from __future__ import annotations

import pytest
import torch

from mqsa.errors import DataError
from mqsa.models.mqsa import MQSA, MQSAConfig
from mqsa.training.checkpoint import BestEpoch, Checkpoint


def small_model() -> MQSA:
    torch.manual_seed(0)
    return MQSA(MQSAConfig(num_items=9, max_len=6, hidden_size=8, windows=(2, 4), alpha=0.25)).eval()


def test_round_trip_rebuilds_the_same_model(tmp_path) -> None:
    model = small_model()
    best = BestEpoch(3, {"NDCG@20": 0.5}, {"NDCG@20": 0.4})
    ckpt = Checkpoint(
        model.config.to_dict(), model.state_dict(), {"lr": 1e-3}, best, list("abcdefghi"), [1] * 9
    )
    ckpt.save(tmp_path / "best.pt")
    assert not list(tmp_path.glob("*.partial"))  # written beside, then renamed into place
    loaded = Checkpoint.load(tmp_path / "best.pt")
    assert (
        loaded.best == best and loaded.item_ids == list("abcdefghi") and loaded.train_config == {"lr": 1e-3}
    )
    rebuilt = loaded.build_model()
    assert not rebuilt.training and rebuilt.config == model.config
    x = torch.tensor([[9, 9, 1, 2], [3, 4, 5, 6]])
    with torch.no_grad():
        for a, b in zip(rebuilt.encode(x), model.encode(x), strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_the_file_is_a_plain_dict_readable_without_this_module(tmp_path) -> None:
    model = small_model()
    Checkpoint(model.config.to_dict(), model.state_dict(), best=BestEpoch(2)).save(tmp_path / "best.pt")
    raw = torch.load(tmp_path / "best.pt", weights_only=True)  # only builtins and tensors inside
    assert raw["format"] == 1 and raw["epoch"] == 2 and raw["metrics"] == {"valid": {}, "test": {}}
    assert set(raw) == {"format", "model_config", "state_dict", "train_config", "epoch", "metrics",
                        "item_ids", "item_counts", "data"}  # fmt: skip


def test_missing_damaged_or_foreign_files_are_data_errors(tmp_path) -> None:
    with pytest.raises(DataError, match="no such checkpoint"):
        Checkpoint.load(tmp_path / "none.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(DataError, match=r"garbage\.pt: not a readable checkpoint"):
        Checkpoint.load(tmp_path / "garbage.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(DataError, match="not an MQSA checkpoint"):
        Checkpoint.load(tmp_path / "other.pt")


def test_best_epoch_is_beaten_only_by_a_strictly_better_score() -> None:
    none_yet = BestEpoch()
    assert none_yet.beaten_by({"NDCG@20": 0.0})
    best = BestEpoch(4, {"NDCG@20": 0.25})
    assert best.beaten_by({"NDCG@20": 0.2500001})
    assert not best.beaten_by({"NDCG@20": 0.25})  # a tie keeps the earlier epoch
