"""The trainer: data -> split -> TED teacher -> epochs -> best checkpoint and reports.

``train`` is the whole job behind ``mqsa train``. It selects the epoch with the
best validation NDCG@20 and reports that epoch's test metrics (spec section 7);
the test split is never used for any decision.
"""

from __future__ import annotations

import copy
import hashlib
import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.mqsa import MQSA, MQSAConfig
from training import report
from training.distributed import World
from training.errors import DataError
from training.evaluation import (
    baseline_metrics,
    evaluate_model,
    make_test_set,
    make_validation_set,
    popularity,
)
from training.losses import TEDTeacher, mqsa_loss
from training.run_state import ResumeError, RunState, capture_rng, load_run_state, restore_rng, save_run_state
from training.sequences import LeaveOneOut, left_pad, read_sequences, split_leave_one_out
from training.transitions import TransitionGraph
from training.vocabulary import vocabulary_for

CHECKPOINT_FORMAT = 1
SELECT_METRIC = "NDCG@20"


@dataclass
class TrainConfig:
    """Optimisation and protocol settings; the defaults are the paper's (spec section 7).

    Attributes:
        epochs: the most epochs to run.
        batch_size: users per batch.
        lr: Adam learning rate.
        adam_beta2: Adam's second-moment decay; the spec leaves it open (PyTorch's
            default 0.999; the TF SASRec code uses 0.98).
        l2: weight of the explicit penalty sum ||w||^2 / 2.
        lambda_kd: weight of the TED loss (0 turns TED off).
        tau: TED temperature.
        time_span: transition window of the TED graph.
        seed: seeds initialisation, dropout and batch order.
        eval_every: evaluate on the validation split every this many epochs.
        patience: stop after this many evaluations without a better validation
            NDCG@20 (0 = never stop early).
        device: "auto" (CUDA when present), "cpu" or "cuda".
        precision: "fp32" or "bf16" for the N-way products.
        threads: CPU threads for torch (0 = torch's default).
        chunk: rows per chunk of the fused softmax.
    """

    epochs: int = 200
    batch_size: int = 256
    lr: float = 1e-3
    adam_beta2: float = 0.999
    l2: float = 1e-4
    lambda_kd: float = 0.1
    tau: float = 0.1
    time_span: int = 1
    seed: int = 42
    eval_every: int = 1
    patience: int = 0
    device: str = "auto"
    precision: str = "fp32"
    threads: int = 0
    chunk: int = 256

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_every", "time_span", "chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.tau <= 0:
            raise ValueError("lr and tau must be > 0")
        if not 0.0 < self.adam_beta2 < 1.0:
            raise ValueError(f"adam_beta2 must be in (0, 1), got {self.adam_beta2}")
        if self.l2 < 0 or self.lambda_kd < 0 or self.patience < 0:
            raise ValueError("l2, lambda_kd and patience must be >= 0")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")


@dataclass
class TrainingExamples:
    """One example per user with at least two training items (spec section 7).

    Attributes:
        inputs: (U', T) left-padded train[:-1].
        targets: (U', T) left-padded train[1:].
        lengths: (U',) real items per row.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    lengths: np.ndarray

    @classmethod
    def from_split(cls, split: LeaveOneOut, max_len: int, padding_idx: int) -> TrainingExamples:
        train = [t for t in split.train if len(t) >= 2]
        return cls(
            inputs=torch.from_numpy(left_pad([t[:-1] for t in train], max_len, padding_idx)),
            targets=torch.from_numpy(left_pad([t[1:] for t in train], max_len, padding_idx)),
            lengths=np.array([min(len(t) - 1, max_len) for t in train]),
        )

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, idx: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``idx``, trimmed to the longest of them (positions stay right-aligned)."""
        width = int(self.lengths[idx].max())
        rows = torch.from_numpy(idx)
        return self.inputs[rows, -width:].to(device), self.targets[rows, -width:].to(device)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    """The hardware behind ``device``: the GPU's name, or the CPU model from /proc/cpuinfo.

    Timings from different CPUs differ by 2x on these machines, so the records name it.
    """
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or device.type


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def train(
    data_path: str | Path,
    out_dir: str | Path,
    model_config: dict[str, Any] | None = None,
    config: TrainConfig | None = None,
    progress: bool = True,
    resume: bool = False,
) -> dict[str, Any]:
    """Train MQSA-TED on a sequence file and write the best checkpoint and reports.

    Args:
        data_path: sequences in the text format (an ``items.json`` beside it, if
            any, gives the item count and the external ids).
        out_dir: receives ``best.pt``, ``metrics.json``, ``history.csv``, ``curves.png``.
        model_config: MQSAConfig fields other than num_items.
        config: optimisation settings.
        progress: show a progress bar per epoch and print the final table.
        resume: go on from ``out_dir/last.pt`` (written after every epoch) instead
            of starting afresh; see ``training.run_state``.

    Returns:
        The content of ``metrics.json``.

    Raises:
        ResumeError: ``resume`` without a usable ``last.pt`` for these settings and data.
    """
    config = config or TrainConfig()
    model_config = dict(model_config or {})
    if "num_items" in model_config:
        raise ValueError("num_items comes from the data, not the model config")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    world = World.from_env(device.type)
    if world.distributed and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    progress = progress and world.is_main
    dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)

    data = read_sequences(data_path)
    vocab = vocabulary_for(data_path, data.num_items)
    if len(vocab) < data.num_items:
        raise DataError(f"items.json lists {len(vocab)} items but the data uses {data.num_items}", data_path)
    cfg = MQSAConfig(num_items=len(vocab), **model_config)
    split = split_leave_one_out(data.sequences, cfg.max_len)
    graph = TransitionGraph.from_sequences(split.train, cfg.num_items, config.time_span)
    teacher = TEDTeacher.from_graph(graph, config.tau).to(device) if config.lambda_kd > 0 else None
    examples = TrainingExamples.from_split(split, cfg.max_len, cfg.padding_idx)
    if len(examples) == 0:
        raise DataError("no user has two training items; nothing to train on", data_path)
    eval_sets = {"valid": make_validation_set(split, cfg.max_len), "test": make_test_set(split, cfg.max_len)}
    baselines = baseline_metrics(split, graph, eval_sets)

    data_info = {"path": str(data_path), "sha256": file_sha256(data_path), "users": data.num_users}
    item_counts = popularity(split.train, cfg.num_items).astype(np.int64).tolist()

    def checkpoint(state: dict[str, torch.Tensor], best: dict[str, Any]) -> dict[str, Any]:
        """Everything needed to rebuild, evaluate and export the model: config, weights, vocabulary."""
        return {
            "format": CHECKPOINT_FORMAT,
            "model_config": cfg.to_dict(),
            "state_dict": {k: v.cpu() for k, v in state.items()},
            "train_config": asdict(config),
            "epoch": best["epoch"],
            "metrics": {"valid": best["valid"], "test": best["test"]},
            "item_ids": vocab.item_ids,
            "item_counts": item_counts,
            "data": data_info,
        }

    model = MQSA(cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=(0.9, config.adam_beta2))
    history: list[dict[str, float]] = []
    best: dict[str, Any] = {"epoch": 0, "valid": {SELECT_METRIC: -1.0}, "test": {}}
    best_state = copy.deepcopy(model.state_dict())
    stale, started = 0, time.perf_counter()
    train_seconds = 0.0
    first_epoch, resumed_at, earlier_wall = 1, [], 0.0
    fingerprint = {
        "train_config": asdict(config),
        "model_config": cfg.to_dict(),
        "data": {"sha256": data_info["sha256"]},
    }
    if resume:
        if world.distributed:
            raise ResumeError("resume runs on one process only: each rank's dropout generator differs")
        state = load_run_state(out_dir / "last.pt", fingerprint)
        model.load_state_dict(state.model)
        optimizer.load_state_dict(state.optimizer)
        restore_rng(state, rng)
        history, best, best_state, stale = state.history, state.best, state.best_state, state.stale
        train_seconds, earlier_wall, first_epoch = state.train_seconds, state.wall_seconds, state.epoch + 1
        resumed_at = [*state.resumed_at, state.epoch]
    stopped = bool(config.patience and stale >= config.patience)  # a resumed run that had stopped
    last_epoch = first_epoch - 1 if stopped else config.epochs

    for epoch in range(first_epoch, last_epoch + 1):
        model.train()
        epoch_start = time.perf_counter()
        order = rng.permutation(len(examples))
        sums = np.zeros(4)
        batches = report.progress_bar(
            range(0, len(order), config.batch_size), f"epoch {epoch}/{config.epochs}", progress
        )
        for n, start in enumerate(batches, start=1):
            rows = order[start : start + config.batch_size]
            if len(rows) < world.size:  # a last batch too small to give every process a row
                continue
            inputs, targets = examples.batch(world.shard(rows), device)
            loss, values = mqsa_loss(
                model, inputs, targets, teacher, config.lambda_kd, config.tau, config.l2, config.chunk, dtype
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            world.average_gradients(model)
            optimizer.step()
            sums += (values.total, values.rec, values.kd, values.l2)
            if progress:
                batches.set_postfix(
                    loss=f"{sums[0] / n:.4f}", rec=f"{sums[1] / n:.4f}", kd=f"{sums[2] / n:.4f}"
                )
        seconds = time.perf_counter() - epoch_start
        train_seconds += seconds
        mean = sums / max(1, n)
        row = {
            "epoch": epoch,
            "seconds": seconds,
            "loss": mean[0],
            "rec": mean[1],
            "kd": mean[2],
            "l2": mean[3],
        }
        if epoch % config.eval_every == 0 or epoch == config.epochs:
            valid = evaluate_model(model, eval_sets["valid"])
            row.update({f"valid_{k}": v for k, v in valid.items()})
            if valid[SELECT_METRIC] > best["valid"][SELECT_METRIC]:
                best = {"epoch": epoch, "valid": valid, "test": evaluate_model(model, eval_sets["test"])}
                best_state = copy.deepcopy(model.state_dict())
                stale = 0
                if world.is_main:
                    torch.save(
                        checkpoint(best_state, best), out_dir / "best.pt"
                    )  # a crash keeps the best so far
            else:
                stale += 1
        history.append(row)
        report.epoch_line(row, best["epoch"] == epoch, progress)
        if world.is_main:
            report.write_history(history, out_dir / "history.csv")  # watchable while a long run goes on
            state = RunState(
                epoch=epoch,
                model=model.state_dict(),
                optimizer=optimizer.state_dict(),
                best=best,
                best_state=best_state,
                history=history,
                stale=stale,
                train_seconds=train_seconds,
                wall_seconds=earlier_wall + time.perf_counter() - started,
                resumed_at=resumed_at,
                **capture_rng(rng),
            )
            save_run_state(out_dir / "last.pt", state, fingerprint)
        if config.patience and stale >= config.patience:
            break

    replica_checksums = world.checksums(model)  # the final weights of every process, before loading the best
    model.load_state_dict(best_state)
    world.close()
    metrics = {
        "data": data_info,
        "model_config": cfg.to_dict(),
        "train_config": asdict(config),
        "device": str(device),
        "device_name": device_name(device),
        "epochs_run": len(history),
        "best_epoch": best["epoch"],
        "valid": best["valid"],
        "test": best["test"],
        "baselines": baselines,
        "seconds_per_epoch": train_seconds / max(1, len(history)),
        "train_seconds": train_seconds,
        "wall_seconds": earlier_wall + time.perf_counter() - started,
        "resumed_at": resumed_at,
        "distributed": {"world_size": world.size, "replica_checksums": replica_checksums},
    }
    if not world.is_main:
        return metrics
    torch.save(checkpoint(best_state, best), out_dir / "best.pt")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    report.plot_curves(history, out_dir / "curves.png")
    if progress:
        print(report.results_table(metrics))
    return metrics
