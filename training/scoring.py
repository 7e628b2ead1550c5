"""Evaluate a saved checkpoint on its data: the model beside the two baselines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.mqsa import MQSA
from training.errors import DataError
from training.evaluation import baseline_metrics, evaluate_model, make_test_set, make_validation_set
from training.sequences import read_sequences, split_leave_one_out
from training.transitions import TransitionGraph


def evaluate_checkpoint(checkpoint: str | Path, data_path: str | Path) -> dict[str, Any]:
    """Full-ranking metrics of a checkpoint on the validation and test splits.

    Raises:
        DataError: the data does not fit the checkpoint (more items than its table).
    """
    if not Path(checkpoint).is_file():
        raise DataError("no such checkpoint", checkpoint)
    model, ckpt = MQSA.from_checkpoint(str(checkpoint))
    cfg = model.config
    data = read_sequences(data_path)
    if data.num_items > cfg.num_items:
        raise DataError(
            f"the data uses {data.num_items} items but the checkpoint knows {cfg.num_items}", data_path
        )
    split = split_leave_one_out(data.sequences, cfg.max_len)
    time_span = ckpt.get("train_config", {}).get("time_span", 1)
    graph = TransitionGraph.from_sequences(split.train, cfg.num_items, time_span)
    eval_sets = {"valid": make_validation_set(split, cfg.max_len), "test": make_test_set(split, cfg.max_len)}
    return {
        "checkpoint": str(checkpoint),
        "best_epoch": ckpt.get("epoch"),
        "valid": evaluate_model(model, eval_sets["valid"]),
        "test": evaluate_model(model, eval_sets["test"]),
        "baselines": baseline_metrics(split, graph, eval_sets),
    }
