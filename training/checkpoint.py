"""The trainer's two records: the best epoch so far, and the checkpoint that carries it.

``best.pt`` is a plain dict written with ``torch.save``, readable without this
module (format 1):

    format        1
    model_config  MQSAConfig fields (rebuilds the network)
    state_dict    the weights, on the CPU
    train_config  TrainConfig fields
    epoch         the selected epoch
    metrics       {"valid": {...}, "test": {...}} of that epoch
    item_ids      item_idx -> external item_id (the vocabulary)
    item_counts   training popularity per item_idx
    data          {"path", "sha256", "users"} of the sequence file
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mqsa.errors import ConfigError, DataError
from mqsa.models.mqsa import MQSA, MQSAConfig
from mqsa.training.artifacts import save_torch_atomic

CHECKPOINT_FORMAT = 1
SELECT_METRIC = "NDCG@20"  # the validation metric that selects the epoch (spec section 7)


@dataclass
class BestEpoch:
    """The epoch with the best validation score so far; epoch 0 means none yet.

    Attributes:
        epoch: the epoch, from 1.
        valid: its validation metrics (HR@K, NDCG@K).
        test: its test metrics, computed once, when it became the best (at the end of
            the run when the per-epoch validation used a sample, or none ran).
    """

    epoch: int = 0
    valid: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)

    def beaten_by(self, valid: dict[str, float]) -> bool:
        """Whether validation metrics ``valid`` are strictly better on ``SELECT_METRIC``."""
        return valid[SELECT_METRIC] > self.valid.get(SELECT_METRIC, -1.0)


@dataclass
class Checkpoint:
    """Everything needed to rebuild, evaluate and export a model.

    Attributes:
        model_config: ``MQSAConfig.to_dict()``.
        state_dict: the weights.
        train_config: the ``TrainConfig`` fields the run used.
        best: the selected epoch and its metrics.
        item_ids: item_idx -> external id; None in a checkpoint that lacks it.
        item_counts: training popularity per item_idx.
        data: the sequence file's path, sha256 and user count.
        path: the file it was loaded from (None for one made in memory), for error messages.
    """

    model_config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    train_config: dict[str, Any] = field(default_factory=dict)
    best: BestEpoch = field(default_factory=BestEpoch)
    item_ids: list[str] | None = None
    item_counts: list[int] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    path: Path | None = field(default=None, compare=False)  # where it was loaded from, for errors

    def to_dict(self) -> dict[str, Any]:
        """The on-disk form (see the module docstring), tensors moved to the CPU."""
        return {
            "format": CHECKPOINT_FORMAT,
            "model_config": self.model_config,
            "state_dict": {k: v.cpu() for k, v in self.state_dict.items()},
            "train_config": self.train_config,
            "epoch": self.best.epoch,
            "metrics": {"valid": self.best.valid, "test": self.best.test},
            "item_ids": self.item_ids,
            "item_counts": self.item_counts,
            "data": self.data,
        }

    def save(self, path: str | Path) -> None:
        """Write atomically: a crash mid-write keeps the previous checkpoint whole."""
        save_torch_atomic(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | Path) -> Checkpoint:
        """Read a checkpoint written by :meth:`save`.

        Raises:
            DataError: no such file, not readable by torch, or not an MQSA checkpoint.
        """
        path = Path(path)
        if not path.is_file():
            raise DataError("no such checkpoint", path)
        try:
            raw = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # torch raises many kinds (pickle, zip, EOF) for a damaged file
            raise DataError(f"not a readable checkpoint ({type(exc).__name__}: {exc})", path) from exc
        if not isinstance(raw, dict) or "model_config" not in raw or "state_dict" not in raw:
            raise DataError("not an MQSA checkpoint (no model_config/state_dict)", path)
        metrics = raw.get("metrics") or {}
        return cls(
            model_config=raw["model_config"],
            state_dict=raw["state_dict"],
            train_config=raw.get("train_config") or {},
            best=BestEpoch(raw.get("epoch") or 0, metrics.get("valid", {}), metrics.get("test", {})),
            item_ids=raw.get("item_ids"),
            item_counts=raw.get("item_counts") or [],
            data=raw.get("data") or {},
            path=path,
        )

    def build_model(self) -> MQSA:
        """The network with these weights, in eval mode, on the CPU.

        Raises:
            DataError: the config or the weights do not make an MQSA network (naming the file).
        """
        try:
            model = MQSA(MQSAConfig.from_dict(self.model_config))
            model.load_state_dict(self.state_dict)
        except (ConfigError, TypeError, RuntimeError) as exc:  # a bad config; weights of other shapes
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            more = f" (and {len(lines) - 2} more)" if len(lines) > 2 else ""
            reason = " ".join(lines[:2]) + more  # torch lists every mismatched tensor: one line is enough
            raise DataError(f"the checkpoint does not make an MQSA network: {reason}", self.path) from exc
        return model.eval()
