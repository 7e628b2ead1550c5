"""The time-based holdout: definitions checked by hand, and a bundle scored as the service serves it."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from mqsa.errors import ConfigError, DataError
from mqsa.training.holdout import (
    Scorer,
    evaluate_holdout,
    evaluate_on_holdout,
    make_holdout,
    read_holdout,
    score_fn_ranker,
)

# (user, item, time); the cut is 100. The fake model knows a-d (not e) and always scores
# c > d > b > a; it reads at most 2 context items.
TINY_LOG = [
    ("u1", "a", 10), ("u1", "b", 20), ("u1", "c", 100), ("u1", "d", 110),
    ("u2", "b", 50), ("u2", "d", 115), ("u2", "e", 120),
    ("u3", "a", 30), ("u3", "a", 130),
    ("u4", "c", 140),
    ("u5", "e", 40), ("u5", "d", 150),
    ("u6", "d", 60),
]  # fmt: skip
D = 1 / math.log2(3)  # NDCG of rank 1


def tiny_scorer(seen_inputs: list[list[str]]) -> Scorer:
    item_ids = ["a", "b", "c", "d"]
    fixed = torch.tensor([1.0, 2.0, 4.0, 3.0])

    def score(inputs: list[np.ndarray]) -> torch.Tensor:
        seen_inputs.extend([item_ids[i] for i in s] for s in inputs)
        return fixed.expand(len(inputs), -1).clone()

    return Scorer("fake", item_ids, 2, score_fn_ranker(score), {"kind": "test"})


def test_holdout_metrics_match_a_hand_computed_case() -> None:
    """Targets: u1 c (rank 0: a, b seen), u1 d (rank 0: c, an earlier holdout event, is seen too),
    u2 d (rank 1: c), u2 e (unknown to the model: a miss), u3 a (seen before: a miss, as the service
    never recommends a seen item); u4 c (no earlier event) and u5 d (only an unknown one) are skipped."""
    holdout = make_holdout(pd.DataFrame(TINY_LOG, columns=["user_id", "item_id", "timestamp"]), 100)
    inputs: list[list[str]] = []
    result = evaluate_holdout(holdout, [tiny_scorer(inputs)])
    assert {k: v for k, v in result["holdout"].items() if k != "cut_utc"} == {
        "cut": 100,
        "events": 7,
        "scored": 5,
        "skipped_no_context": 2,
    }
    model = result["models"]["fake"]
    assert model["unknown_targets"] == 1
    assert model["metrics"]["HR@5"] == pytest.approx(3 / 5)
    assert model["metrics"]["NDCG@5"] == pytest.approx((1 + 1 + D) / 5)
    assert model["metrics"]["NDCG@20"] == model["metrics"]["NDCG@5"]  # 4 items: every rank is < 5
    assert sorted(inputs) == sorted([["a", "b"], ["b", "c"], ["b"], ["a"]])  # the last 2 known items
    # Fitted on the events before the cut only: a 2, b 2, c 0, d 1 (on every event d would tie a).
    popularity = result["baselines"]["Popularity"]
    assert popularity["metrics"]["NDCG@5"] == pytest.approx((D + 1 + D) / 5)
    assert popularity["unknown_targets"] == 1
    transition = result["baselines"]["ItemTransition"]["metrics"]  # a -> b only: popularity decides
    assert transition["NDCG@5"] == pytest.approx((D + 1 + D) / 5)


def test_holdout_edges_are_one_clear_error(tmp_path) -> None:
    log = tmp_path / "log.csv"
    rows = [(u, i, 1_700_000_000 + t) for u, i, t in TINY_LOG]
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(log, index=False)
    assert read_holdout(log, "1700000100").positions.size == 7
    assert read_holdout(log, "50s").cut == 1_700_000_100  # before the newest event (150)
    assert read_holdout(log, "2023-11-14T22:15:00Z").cut == 1_700_000_100
    with pytest.raises(DataError, match="no event at or after the holdout cut"):
        read_holdout(log, "2030-01-01")
    with pytest.raises(DataError, match="no event before the holdout cut"):
        read_holdout(log, "1d")
    with pytest.raises(ConfigError, match="--holdout-since 'last week' is neither"):
        read_holdout(log, "last week")
    with pytest.raises(DataError, match="no such checkpoint file or bundle directory"):
        evaluate_on_holdout(log, "1700000100", [tmp_path / "missing"])


def test_a_bundle_scores_as_its_checkpoint(trained_run, bundle_dir, holdout_log) -> None:
    """The bundle (ONNX encoder, FAISS search with the history excluded, as the service runs them)
    and the checkpoint it was exported from (torch, full ranking) agree on the holdout; the
    holdout's targets here are the leave-one-out test items, so both beat the baselines."""
    checkpoint = trained_run["dir"] / "best.pt"
    result = evaluate_on_holdout(
        holdout_log["log"], holdout_log["since"], [checkpoint, bundle_dir], ["checkpoint", "bundle"]
    )
    assert result["holdout"]["events"] == result["holdout"]["scored"] == 800  # one per user
    ckpt, bundle = (result["models"][k]["metrics"] for k in ("checkpoint", "bundle"))
    for name in ckpt:
        assert bundle[name] == pytest.approx(ckpt[name], abs=2e-3), name
    assert result["models"]["bundle"]["info"]["model_version"]
    for baseline in ("Popularity", "ItemTransition"):
        assert ckpt["NDCG@5"] > result["baselines"][baseline]["metrics"]["NDCG@5"]


def test_evaluate_prints_models_side_by_side(trained_run, bundle_dir, holdout_log, capsys) -> None:
    from mqsa.cli import main

    args = ["evaluate", "--holdout", str(holdout_log["log"]), "--holdout-since", holdout_log["since"]]
    assert main([*args, str(bundle_dir), str(trained_run["dir"] / "best.pt")]) == 0
    table = capsys.readouterr().out
    for row in (str(bundle_dir), "best.pt", "Popularity", "ItemTransition"):
        assert f"| {row}" in table or row in table
    assert "800 events, 800 scored, 0 skipped" in table
    assert main([*args, "--json", str(bundle_dir)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"holdout", "models", "baselines"}
    assert main(["evaluate", "--holdout", str(holdout_log["log"]), str(bundle_dir)]) == 2
    assert "needs --holdout, --holdout-since" in capsys.readouterr().err


def test_a_context_window_drops_the_events_before_it(tmp_path) -> None:
    """--holdout-context reads only the events from then on: fewer contexts and baseline counts,
    the same targets."""
    log = tmp_path / "log.csv"
    rows = [(u, i, 1_700_000_000 + t) for u, i, t in TINY_LOG]
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(log, index=False)
    whole = read_holdout(log, "1700000100")
    window = read_holdout(log, "1700000100", context="1700000045")  # drops the events at 10-40
    assert window.positions.size == whole.positions.size == 7
    assert window.items.size == whole.items.size - 4
    with pytest.raises(ConfigError, match="--holdout-context 'lately' is neither"):
        read_holdout(log, "1700000100", context="lately")
