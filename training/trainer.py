"""The trainer: data -> split -> TED teacher -> epochs -> best checkpoint and reports.

    trainer = Trainer(data_path, out_dir, model_config, config)  # setup: data, model, optimiser
    metrics = trainer.fit(resume=False)                           # the epochs, then the reports

``fit`` runs plain parts in order (RecBole's shape): ``_resume`` (optional), then
per epoch ``_train_epoch``, ``_valid_epoch`` (evaluate, keep the best) and
``_save_state`` (``last.pt``, ``history.csv``); at the end ``_finish`` writes
``best.pt``, ``metrics.json`` and ``curves.png``. The epoch with the best
validation NDCG@20 is selected and its test metrics reported (spec section 7);
the test split is never used for any decision. With ``valid_sample`` the per-epoch
validation ranks a fixed sample of users and the selected epoch is evaluated on all
of them, and tested, at the end; with ``eval_every`` > ``epochs`` no validation runs
and the last epoch's model is the result (``TrainConfig``). ``train`` is the one-call form
behind ``mqsa train``.

An ``on_epoch(epoch, valid_metrics)`` callback, if given, sees every evaluation's
validation metrics and may end the run by raising :class:`StopTraining` (``mqsa
tune`` reports them to its pruner); ``evaluate_test=False`` leaves the test split
unranked altogether (tuning trials).
"""

from __future__ import annotations

import copy
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from mqsa.errors import ConfigError, DataError, ResumeError
from mqsa.models.mqsa import MQSA, MQSAConfig
from mqsa.training import report
from mqsa.training.artifacts import file_sha256, write_json_atomic, writing
from mqsa.training.checkpoint import BestEpoch, Checkpoint
from mqsa.training.distributed import World
from mqsa.training.evaluation import (
    EvalSet,
    baseline_metrics,
    evaluate_model,
    make_test_set,
    make_validation_set,
    popularity,
    sample_eval_set,
)
from mqsa.training.host_memory import keep_freed_memory
from mqsa.training.item_updates import LazyItemAdam
from mqsa.training.losses import LossSettings, LossValues, TEDTeacher, l2_penalty, mqsa_loss
from mqsa.training.run_state import RunState, capture_rng, load_run_state, restore_rng, save_run_state
from mqsa.training.sampled_loss import NegativeSampler, sampled_mqsa_loss
from mqsa.training.sequences import (
    LeaveOneOut,
    SequenceData,
    left_pad,
    read_sequences,
    split_leave_one_out,
)
from mqsa.training.transitions import TransitionGraph
from mqsa.training.vocabulary import Vocabulary, vocabulary_for
from mqsa.training.warm_start import load_warm_start_checkpoint, warm_start

# `--loss auto` trains with the sampled loss above this many items. Measured on one thread
# of the 2-core Intel Xeon (bench/sampled_step.py, docs/scaling.md "Sampled softmax"): an
# exact step grows as N (0.34 s at 12,101 items, 1.9 s at 50,000, ~4 s at 100,000) while
# a sampled one stays near 0.2 s to 10^5 items; on Beauty the sampled loss cost 4.5% of the
# test NDCG@10 (3 seeds). Past 10^5 items an exact epoch of 10^5 users takes ~25 minutes and a run
# days, which no accuracy gain pays for on a CPU; below it the paper's loss is affordable.
SAMPLED_ABOVE = 100_000
LR_MIN_SHARE = 0.01  # the cosine schedule ends at lr / 100 (TrainConfig.lr_schedule)
# The progress bar shows the epoch's running loss every this many steps: each look waits
# for the device (on a GPU the host would otherwise queue steps ahead of it).
PROGRESS_EVERY = 10
# With the optimizer adding the L2 gradient (the sampled loss), the penalty's value is for
# the log only, and reading it is a pass over every parameter: 3.5% of an S2 step (py-spy,
# 307,288 items). It is measured every this many steps and reused in between; the weights
# move little in that many steps.
L2_VALUE_EVERY = 16


@dataclass
class TrainConfig:
    """Optimisation and protocol settings; the defaults are the paper's (spec section 7).

    ``mqsa train`` makes one flag per field, with the text below as its help,
    and the README's settings table is checked against it.

    Attributes:
        epochs: the most epochs to run.
        batch_size: users per batch.
        lr: Adam's learning rate.
        adam_beta2: Adam's second-moment decay, which the spec leaves open (the TF
            SASRec code uses 0.98).
        l2: weight of the explicit penalty sum ||w||^2 / 2.
        lambda_kd: weight of the TED loss (0 turns TED off).
        tau: TED temperature.
        time_span: transition window of the TED graph, in steps.
        seed: seeds initialisation, dropout and batch order.
        eval_every: evaluate on the validation split at epochs eval_every, 2 x eval_every, ...
            only (the last epoch too only if it is one of them). With eval_every > epochs no
            validation runs: the last epoch's model is the result, evaluated once at the end
            on the validation and test splits (metrics.json: "selection": "last_epoch").
        valid_sample: rank only this many users, a seeded sample drawn once and the same
            every epoch, in the per-epoch validation (0 = every user). Each evaluation then
            costs valid_sample / users of a full pass, but the epoch selection (and
            patience, and on_epoch) rests on a noisier estimate, so a close call may pick
            a slightly worse epoch; the selected epoch's reported validation and test
            metrics are from full passes at the end.
        patience: stop after this many evaluations without a better validation
            NDCG@20 (0 = never stop early).
        device: auto (CUDA when present), cpu or cuda.
        precision: fp32, or bf16 for the N-way products.
        threads: CPU threads for torch (0 = torch's default).
        chunk: rows per chunk of the fused softmax.
        loss: exact (both softmaxes over all N items, the paper's), sampled (over
            a positive plus sampled negatives with logQ correction, for large
            catalogues; docs/scaling.md), or auto: exact up to SAMPLED_ABOVE items
            (100,000), sampled above, where an exact step costs seconds on a CPU.
        negatives: K, negatives drawn per batch for the sampled loss, shared by its
            rows, from (training count + 1)^0.75. 1024 keeps the sampled product
            (rows x K) under a tenth of the exact one (rows x N) from N = 10^4 items up
            (Beauty: 12,101), while a thousand draws cover the popular head, whose
            high-scoring items dominate the softmax's normaliser.
        in_batch_negatives: sampled loss: also use the batch's targets as negatives
            (each with its own logQ correction).
        ted_samples: sampled loss: TED's teacher-weighted mean of an item's transitions is
            estimated from this many draws from its teacher row, unbiased, where the row has
            more entries (a popular item's row holds thousands; 0 = every entry, exact).
        lazy_item_updates: sampled loss, one process: update only the item rows a batch
            used (Adam on those rows, their L2 gradient included; the rest of the network
            as before; training/item_updates.py) and estimate TED's uniform share of the
            table from `negatives` uniformly drawn rows, so a step's cost stops growing
            with the catalogue. Rows a batch does not use keep their Adam moments and get
            no L2 decay that step (lazy Adam): another optimisation than the paper's, whose
            accuracy docs/scaling.md reports ("Lazy item updates"). Unset (none): on
            wherever the loss resolves to sampled on one process, unless ted_samples is 0 with
            TED on (it matched the dense update on Beauty, was within 1% on Sports and beat
            it by 18-20% on S2), off otherwise; false keeps the dense update.
        lr_schedule: constant (lr every epoch, the paper's) or cosine: epoch e trains at
            lr_min + (lr - lr_min) * (1 + cos(pi * (e - 1) / lr_decay_epochs)) / 2, lr_min =
            lr / 100, and at lr_min after lr_decay_epochs epochs (for runs that should settle
            rather than wander on their plateau).
        lr_decay_epochs: the cosine schedule's length in epochs (0 = epochs).
        init_from: a checkpoint (an older run's best.pt) to warm-start from: items it
            knows keep their rows (matched by external id), new items start from their
            transition neighbours' rows (else the mean row), the rest of the network is
            copied; a resumed run keeps its own weights (none or empty: from scratch).
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
    valid_sample: int = 0
    patience: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
    threads: int = 0
    chunk: int = 256
    loss: Literal["auto", "exact", "sampled"] = "auto"
    negatives: int = 1024
    in_batch_negatives: bool = False
    ted_samples: int = 32
    lazy_item_updates: bool | None = None
    lr_schedule: Literal["constant", "cosine"] = "constant"
    lr_decay_epochs: int = 0
    init_from: str | None = None

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_every", "time_span", "chunk", "negatives"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "tau"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 < self.adam_beta2 < 1.0:
            raise ConfigError(f"adam_beta2 must be in (0, 1), got {self.adam_beta2}")
        for name in (
            "l2",
            "lambda_kd",
            "valid_sample",
            "patience",
            "threads",
            "ted_samples",
            "lr_decay_epochs",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if self.loss not in ("auto", "exact", "sampled"):
            raise ConfigError(f"loss must be auto, exact or sampled, got {self.loss!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"lr_schedule must be constant or cosine, got {self.lr_schedule!r}")
        if self.lazy_item_updates and self.loss == "exact":
            raise ConfigError("lazy_item_updates needs the sampled loss (--loss sampled)")
        if self.lazy_item_updates and self.lambda_kd > 0 and not self.ted_samples:
            raise ConfigError("lazy_item_updates needs ted_samples >= 1 (0 reads the whole table)")

    def lr_decay_length(self) -> int:
        """The cosine schedule's length in epochs, resolved (0: a constant rate)."""
        return (self.lr_decay_epochs or self.epochs) if self.lr_schedule == "cosine" else 0

    def lr_at(self, epoch: int) -> float:
        """The learning rate of epoch ``epoch`` (1-based) under ``lr_schedule``."""
        length = self.lr_decay_length()
        if not length:
            return self.lr
        low = self.lr * LR_MIN_SHARE
        done = min(epoch - 1, length) / length  # 0 at the first epoch, 1 from epoch length + 1
        return low + (self.lr - low) * 0.5 * (1.0 + math.cos(math.pi * done))

    def objective(self, num_items: int) -> Literal["exact", "sampled"]:
        """The loss a run on ``num_items`` items trains with (``auto`` resolved)."""
        if self.loss != "auto":
            return self.loss
        return "sampled" if num_items > SAMPLED_ABOVE else "exact"

    def lazy_updates(self, num_items: int, distributed: bool = False) -> bool:
        """Whether the item rows get lazy updates on ``num_items`` items (``lazy_item_updates``,
        unset resolved: on for the sampled loss on one process, where TED can be estimated)."""
        if self.lazy_item_updates is not None:
            return self.lazy_item_updates
        estimable = self.lambda_kd == 0 or self.ted_samples > 0  # 0 reads the whole table
        return self.objective(num_items) == "sampled" and not distributed and estimable

    def resolved(self, num_items: int, distributed: bool = False) -> TrainConfig:
        """This config with ``lazy_item_updates`` resolved, as a run records it."""
        return replace(self, lazy_item_updates=self.lazy_updates(num_items, distributed))

    def loss_settings(self, num_items: int = 0) -> LossSettings:
        """The objective's settings, as the loss takes them, for a catalogue of ``num_items``."""
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        sampled = self.objective(num_items) == "sampled"
        return LossSettings(
            lambda_kd=self.lambda_kd,
            tau=self.tau,
            l2=self.l2,
            chunk=self.chunk,
            dtype=dtype,
            l2_in_optimizer=sampled,  # the sampled loss's dense terms kept few
            ted_samples=self.ted_samples if sampled else 0,
            total_samples=self.negatives if sampled and self.lazy_updates(num_items) else 0,
        )


@dataclass
class TrainingExamples:
    """One example per user with at least two training items (spec section 7).

    Attributes:
        inputs: (U', T) left-padded train[:-1].
        targets: (U', T) left-padded train[1:].
    """

    inputs: torch.Tensor
    targets: torch.Tensor

    @classmethod
    def from_split(cls, split: LeaveOneOut, max_len: int, padding_idx: int) -> TrainingExamples:
        train = [t for t in split.train if len(t) >= 2]
        return cls(
            inputs=torch.from_numpy(left_pad([t[:-1] for t in train], max_len, padding_idx)),
            targets=torch.from_numpy(left_pad([t[1:] for t in train], max_len, padding_idx)),
        )

    def __len__(self) -> int:
        return len(self.inputs)

    def to(self, device: torch.device) -> TrainingExamples:
        """The examples on ``device``, once: a batch is then gathered there, not copied over."""
        return TrainingExamples(self.inputs.to(device), self.targets.to(device))

    def batch(self, idx: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``idx``: inputs (b, T) and targets (b, T) on ``device``, untrimmed (the model trims)."""
        rows = torch.from_numpy(idx).to(self.inputs.device)
        return self.inputs[rows].to(device), self.targets[rows].to(device)


@dataclass
class TrainingData:
    """What setup derives from the sequence file, once per run.

    Attributes:
        info: the file's path, sha256 and user count (recorded in every report).
        vocab: the item vocabulary (``items.json`` beside the file, else the identity).
        split: the leave-one-out split, train cut to the last T items.
        graph: the transition graph of the training split.
        examples: the training examples.
        eval_sets: ``valid`` and ``test``.
        item_counts: training popularity per item index (the bundle's popular items).
    """

    info: dict[str, Any]
    vocab: Vocabulary
    split: LeaveOneOut
    graph: TransitionGraph
    examples: TrainingExamples
    eval_sets: dict[str, EvalSet]
    item_counts: list[int]

    @classmethod
    def build(
        cls, path: str | Path, data: SequenceData, vocab: Vocabulary, cfg: MQSAConfig, time_span: int
    ) -> TrainingData:
        """Split the sequences read from ``path`` for a model of config ``cfg``.

        Raises:
            DataError: no user has two training items.
        """
        split = split_leave_one_out(data.sequences, cfg.max_len)
        examples = TrainingExamples.from_split(split, cfg.max_len, cfg.padding_idx)
        if len(examples) == 0:
            raise DataError("no user has two training items; nothing to train on", path)
        return cls(
            info={"path": str(path), "sha256": file_sha256(path), "users": data.num_users},
            vocab=vocab,
            split=split,
            graph=TransitionGraph.from_sequences(split.train, cfg.num_items, time_span),
            examples=examples,
            eval_sets={
                "valid": make_validation_set(split, cfg.max_len),
                "test": make_test_set(split, cfg.max_len),
            },
            item_counts=popularity(split.train, cfg.num_items).astype(np.int64).tolist(),
        )


class Objective(nn.Module):
    """One batch's loss, ``mqsa_loss`` or ``sampled_mqsa_loss``, as a module around the model.

    The loss uses the model beyond its ``forward`` (one call per length group, the blend,
    the item table, the TED students, the L2 penalty over every parameter), so a
    distributed run wraps this module, not the model, in DistributedDataParallel: one
    ``forward`` per step covers all of it, and every parameter of the model gets a
    gradient in every step (``World.wrap``).
    """

    def __init__(
        self,
        model: MQSA,
        teacher: TEDTeacher | None,
        settings: LossSettings,
        sampler: NegativeSampler | None,
    ) -> None:
        super().__init__()
        self.model = model
        self.teacher, self.settings, self.sampler = teacher, settings, sampler
        self.steps = 0
        self.l2_value: torch.Tensor | None = None  # the last measured penalty (L2_VALUE_EVERY)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, LossValues]:
        """(B, T') inputs and targets -> the differentiable total loss and its parts."""
        if self.sampler is None:
            return mqsa_loss(self.model, inputs, targets, self.teacher, self.settings)
        if self.settings.l2_in_optimizer and self.steps % L2_VALUE_EVERY == 0:
            self.l2_value = l2_penalty(self.model, self.settings)
        self.steps += 1
        return sampled_mqsa_loss(
            self.model, inputs, targets, self.teacher, self.settings, self.sampler, l2_value=self.l2_value
        )


def build_optimizer(model: MQSA, config: TrainConfig) -> torch.optim.Adam | LazyItemAdam:
    """The training step's optimizer: Adam over every parameter, or with
    ``config.lazy_item_updates`` lazy Adam over the item rows (the trainer and
    bench/sampled_step.py build it here, so the bench times the trainer's step). Whether
    the loss is sampled, and so whether Adam adds the L2 gradient l2 * w, follows from
    ``config`` and the model's catalogue, as the loss's own settings do.

    Raises:
        ConfigError: lazy updates asked for where the loss resolves to exact.
    """
    settings = config.loss_settings(model.config.num_items)
    sampled = config.objective(model.config.num_items) == "sampled"
    decay = config.l2 if settings.l2_in_optimizer else 0.0  # the penalty's gradient
    betas = (0.9, config.adam_beta2)
    if config.lazy_updates(model.config.num_items):
        if not sampled:  # --loss auto, resolved to exact for this catalogue
            raise ConfigError("lazy_item_updates needs the sampled loss (--loss sampled)")
        return LazyItemAdam(model, config.lr, betas, decay)
    # fused: one kernel per parameter instead of a chain of foreach passes over it; the
    # same update, 12x faster on the CPU (0.17 -> 0.014 s a step for a 307,000 x 64 item
    # table on one thread, a third of a sampled S2 step), and torch's own CUDA kernel.
    return torch.optim.Adam(model.parameters(), lr=config.lr, betas=betas, weight_decay=decay, fused=True)


def ready_gradients(model: nn.Module, optimizer: torch.optim.Optimizer | LazyItemAdam) -> None:
    """Make the gradients what ``optimizer`` takes: Adam dense ones (sparse item lookups with
    nothing dense added give a sparse one); the lazy optimizer keeps the item rows sparse."""
    if isinstance(optimizer, LazyItemAdam):
        return
    for p in model.parameters():
        if p.grad is not None and p.grad.is_sparse:
            p.grad = p.grad.to_dense()


class StopTraining(Exception):
    """Raised by an ``on_epoch`` callback to end the run after the epoch it was called for.

    The run then ends as one out of patience: the best epoch so far is selected and
    the reports are written; ``metrics["stopped"]`` holds the message.
    """


EpochCallback = Callable[[int, dict[str, float]], None]  # (epoch, validation metrics) -> None


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else the CPU; ``cuda`` without CUDA is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but CUDA is not available")
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


class Trainer:
    """One training run: set up in the constructor, run with :meth:`fit`.

    Args:
        data_path: sequences in the text format (an ``items.json`` beside it, if
            any, gives the item count and the external ids).
        out_dir: receives ``best.pt``, ``last.pt``, ``metrics.json``, ``history.csv``
            and ``curves.png``.
        model_config: MQSAConfig fields other than ``num_items`` (from the data).
        config: optimisation and protocol settings.
        progress: show a progress bar per epoch and print the final table.
        on_epoch: called after each evaluation with the epoch and its validation
            metrics (HR@K, NDCG@K); raising :class:`StopTraining` ends the run there.
            Every process of a distributed run calls it and must decide alike.
        evaluate_test: rank the test split for the best epoch and the baselines;
            False leaves it unranked (``metrics["test"]`` empty, baselines on the
            validation split only).

    Raises:
        ConfigError: a bad setting. DataError: bad data.
    """

    def __init__(
        self,
        data_path: str | Path,
        out_dir: str | Path,
        model_config: dict[str, Any] | None = None,
        config: TrainConfig | None = None,
        progress: bool = True,
        on_epoch: EpochCallback | None = None,
        evaluate_test: bool = True,
    ) -> None:
        self.config = config = config or TrainConfig()
        model_config = dict(model_config or {})
        if "num_items" in model_config:
            raise ConfigError("num_items comes from the data, not the model config")
        MQSAConfig(num_items=1, **model_config)  # a bad setting fails now, before the data is read
        self.out_dir = Path(out_dir)
        with writing(self.out_dir):
            self.out_dir.mkdir(parents=True, exist_ok=True)
        if config.threads:
            torch.set_num_threads(config.threads)
        keep_freed_memory()  # 8-20% of an S2 step was the kernel mapping freed memory again
        self.device = resolve_device(config.device)
        self.world = World.from_env(self.device.type)
        if self.world.distributed and self.device.type == "cuda":
            self.device = torch.device("cuda", self.world.local_rank)
        self.progress = progress and self.world.is_main
        torch.manual_seed(config.seed)
        self.rng = np.random.default_rng(config.seed)  # the batch order
        sequences = read_sequences(data_path)
        vocab = vocabulary_for(data_path, sequences.num_items)
        self.model_config = MQSAConfig(num_items=len(vocab), **model_config)
        self.config = config = config.resolved(self.model_config.num_items, self.world.distributed)
        self.data = TrainingData.build(data_path, sequences, vocab, self.model_config, config.time_span)
        self.data.examples = self.data.examples.to(self.device)  # (on a GPU: copied once, not per batch)
        teacher = TEDTeacher.from_graph(self.data.graph, config.tau) if config.lambda_kd > 0 else None
        self.teacher = teacher.to(self.device) if teacher is not None else None
        self.on_epoch, self.evaluate_test = on_epoch, evaluate_test
        # Popularity and Item Transition are ranked at the end (_finish), for the report only:
        # a Python pass per user, about a minute a split at 10^6 users, before the first epoch.
        self.baselines: dict[str, dict[str, dict[str, float]]] = {}
        # The per-epoch validation users, drawn once from a stream of their own (batch order untouched).
        sample_seed = int(np.random.SeedSequence([config.seed, 1]).generate_state(1)[0])
        self.valid_set = sample_eval_set(self.data.eval_sets["valid"], config.valid_sample, sample_seed)
        self.selection = "best_valid"  # or "last_epoch" when no validation ran (``_final_evaluation``)
        self._build_model(config)
        self.best = BestEpoch()
        self.best_state = copy.deepcopy(self.model.state_dict())
        self.history: list[dict[str, float]] = []
        self.stale = 0  # evaluations since the best one
        self.stopped: str | None = None  # the message of an on_epoch callback's StopTraining
        self.train_seconds, self.earlier_wall_seconds = 0.0, 0.0
        self.resumed_at: list[int] = []
        self.warm_start: dict[str, Any] | None = None  # what --init-from did, when given
        self.started = time.perf_counter()

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Run the epochs (from ``last.pt`` when ``resume``), then write the reports.

        Returns:
            The content of ``metrics.json``.

        Raises:
            ResumeError: ``resume`` without a usable ``last.pt`` for these settings and data.
            DataError, ConfigError: ``init_from`` names no usable checkpoint, or another network.
        """
        if resume:
            first_epoch = self._resume() + 1
        else:
            self._warm_start()
            first_epoch = 1
        last_epoch = first_epoch - 1 if self._out_of_patience() else self.config.epochs
        for epoch in range(first_epoch, last_epoch + 1):
            row = self._train_epoch(epoch)
            valid = None
            if epoch % self.config.eval_every == 0:  # only then (TrainConfig.eval_every)
                valid = self._valid_epoch(epoch, row)
            self.history.append(row)
            report.epoch_line(row, self.best.epoch == epoch, self.progress)
            self._save_state(epoch)
            stop_asked = valid is not None and self._stop_asked(epoch, valid)  # told every evaluation
            if stop_asked or self._out_of_patience():
                break
        return self._finish()

    def _resume(self) -> int:
        """Load ``last.pt``: weights, optimiser, generators and the loop's records. Returns its epoch."""
        if self.world.distributed:
            raise ResumeError("resume runs on one process only: each rank's dropout generator differs")
        defaults = {
            # a state from before --loss trained with the exact loss; one from before
            # --ted-samples with every teacher entry; one from before --lazy-item-updates densely
            "train_config": {
                **asdict(TrainConfig()),
                "loss": "exact",
                "ted_samples": 0,
                "lazy_item_updates": False,
            },
            "model_config": MQSAConfig(num_items=1).to_dict(),
        }
        state = load_run_state(self.out_dir / "last.pt", self._fingerprint(), defaults)
        self.model.load_state_dict(state.model)
        # What this version decides, not the saved state: the L2 in Adam (a state saved before
        # the sampled loss's L2 moved into Adam) and the fused kernel (one saved before it).
        # Set in the saved groups before loading: the fused flag also says where Adam's step
        # counts go (on the parameters' device when fused).
        self.optimizer.load_state_dict(self._with_my_flags(state.optimizer))
        restore_rng(state, self.rng)
        self.history, self.best, self.best_state, self.stale = (
            state.history,
            state.best,
            state.best_state,
            state.stale,
        )
        self.train_seconds, self.earlier_wall_seconds = state.train_seconds, state.wall_seconds
        self.resumed_at = [*state.resumed_at, state.epoch]
        self.warm_start = state.warm_start
        return state.epoch

    def _with_my_flags(self, saved: dict[str, Any]) -> dict[str, Any]:
        """A saved optimizer state with this version's ``weight_decay`` and ``fused`` (see _resume)."""
        if isinstance(self.optimizer, LazyItemAdam):
            items = self.optimizer.items.param_groups[0]["weight_decay"]
            for group in saved["items"]["param_groups"]:
                group["weight_decay"] = items
            network, groups = self.optimizer.network, saved["network"]["param_groups"]
        else:
            network, groups = self.optimizer, saved["param_groups"]
        mine = {k: network.param_groups[0][k] for k in ("weight_decay", "fused")}
        for group in groups:
            group.update(mine)
        return saved

    def _warm_start(self) -> None:
        """Start from ``config.init_from``'s weights (``training.warm_start``), if given."""
        if not self.config.init_from:
            return
        old = load_warm_start_checkpoint(self.config.init_from)
        self.warm_start = warm_start(self.model, old, self.data.vocab.item_ids, self.data.graph).to_dict()
        self.best_state = copy.deepcopy(self.model.state_dict())
        if self.progress:
            counts = ", ".join(f"{k} {v}" for k, v in self.warm_start.items() if k != "source")
            print(f"warm start from {old.path}: {counts}", flush=True)

    def _out_of_patience(self) -> bool:
        return bool(self.config.patience and self.stale >= self.config.patience)

    def _stop_asked(self, epoch: int, valid: dict[str, float]) -> bool:
        """Give ``on_epoch`` this epoch's validation metrics; True when it raised StopTraining."""
        if self.on_epoch is None:
            return False
        try:
            self.on_epoch(epoch, dict(valid))
        except StopTraining as stop:
            self.stopped = str(stop) or f"stopped by on_epoch after epoch {epoch}"
            return True
        return False

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the examples in a fresh random order; returns the epoch's history row."""
        self.model.train()
        lr = self.config.lr_at(epoch)
        for group in self.optimizer.param_groups:  # a function of the epoch: a resumed run agrees
            group["lr"] = lr
        started = time.perf_counter()
        order = self.rng.permutation(len(self.data.examples))
        size = self.config.batch_size
        sums, n = torch.zeros(4, device=self.device), 0  # summed on the device, read at the end
        batches = report.progress_bar(
            range(0, len(order), size), f"epoch {epoch}/{self.config.epochs}", self.progress
        )
        for start in batches:
            rows = order[start : start + size]
            if len(rows) < self.world.size:  # a last batch too small to give every process a row
                continue
            sums += self._train_step(rows).parts
            n += 1
            if self.progress and n % PROGRESS_EVERY == 0:
                shown = (sums[:3] / n).tolist()
                batches.set_postfix(loss=f"{shown[0]:.4f}", rec=f"{shown[1]:.4f}", kd=f"{shown[2]:.4f}")
        mean = (sums / max(1, n)).tolist()  # waits for the epoch's last step
        seconds = time.perf_counter() - started
        self.train_seconds += seconds
        return {
            "epoch": epoch,
            "seconds": seconds,
            "lr": lr,
            "loss": mean[0],
            "rec": mean[1],
            "kd": mean[2],
            "l2": mean[3],
        }

    def _build_model(self, config: TrainConfig) -> None:
        """The loss's settings and sampler, the model, the step's objective and the optimizer."""
        self.loss_settings = config.loss_settings(self.model_config.num_items)
        self.sampler: NegativeSampler | None = None  # None: the exact loss
        if config.objective(self.model_config.num_items) == "sampled":
            counts, k = self.data.item_counts, config.negatives
            self.sampler = NegativeSampler.from_counts(counts, k, config.in_batch_negatives).to(self.device)
        self.model = MQSA(self.model_config).to(self.device)
        objective = Objective(self.model, self.teacher, self.loss_settings, self.sampler)
        if config.lazy_item_updates and self.world.distributed:  # before DDP is built
            raise ConfigError("lazy_item_updates runs on one process only, not under torchrun")
        self.objective = self.world.wrap(objective, self.device)  # the training step's one call
        if self.sampler is not None and (self.teacher is not None or not self.world.distributed):
            # Only the rows a batch uses get a gradient. Under DDP (which expects the dense
            # gradient the table had when wrapped) only with TED, whose uniform share keeps
            # the summed gradient dense.
            self.model.use_sparse_item_gradients()
        self.optimizer = build_optimizer(self.model, config)

    def _train_step(self, rows: np.ndarray) -> LossValues:
        """Forward, backward (gradients averaged over processes) and one Adam step on a batch."""
        inputs, targets = self.data.examples.batch(self.world.shard(rows), self.device)
        loss, values = self.objective(inputs, targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # distributed: DDP averages the gradients over the processes meanwhile
        ready_gradients(self.model, self.optimizer)
        self.optimizer.step()
        return values

    def _sampled(self) -> bool:
        return self.valid_set is not self.data.eval_sets["valid"]

    def _valid_epoch(self, epoch: int, row: dict[str, float]) -> dict[str, float]:
        """Evaluate on the validation split (or its sample); a new best is tested, kept and saved
        as ``best.pt``. With a sample, testing waits for the end (``_final_evaluation``).

        Returns:
            The validation metrics.
        """
        valid = evaluate_model(self.model, self.valid_set)
        row.update({f"valid_{k}": v for k, v in valid.items()})
        if not self.best.beaten_by(valid):
            self.stale += 1
            return valid
        tested = self.evaluate_test and not self._sampled()
        test = evaluate_model(self.model, self.data.eval_sets["test"]) if tested else {}
        self.best = BestEpoch(epoch, valid, test)
        self.best_state = copy.deepcopy(self.model.state_dict())
        self.stale = 0
        if self.world.is_main:
            self._checkpoint().save(self.out_dir / "best.pt")  # a crash keeps the best so far
        return valid

    def _save_state(self, epoch: int) -> None:
        """``history.csv`` (watchable during a long run) and ``last.pt`` (to resume from)."""
        if not self.world.is_main:
            return
        report.write_history(self.history, self.out_dir / "history.csv")
        state = RunState(
            epoch=epoch,
            model=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(),
            best=self.best,
            best_state=self.best_state,
            history=self.history,
            stale=self.stale,
            train_seconds=self.train_seconds,
            wall_seconds=self._wall_seconds(),
            resumed_at=self.resumed_at,
            warm_start=self.warm_start,
            **capture_rng(self.rng),
        )
        save_run_state(self.out_dir / "last.pt", state, self._fingerprint())

    def _finish(self) -> dict[str, Any]:
        """Load the best weights and write ``best.pt``, ``metrics.json`` and ``curves.png``."""
        replica_checksums = self.world.checksums(self.model)  # every process's final weights
        self._final_evaluation()
        self.model.load_state_dict(self.best_state)
        self.objective = self.objective.module if self.world.distributed else self.objective
        self.world.close()  # after the DDP wrapper is gone: it must not outlive its process group
        if not self.world.is_main:  # the other processes' results are not kept: no baselines
            return self._metrics(replica_checksums)
        ranked = self.data.eval_sets if self.evaluate_test else {"valid": self.data.eval_sets["valid"]}
        self.baselines = baseline_metrics(self.data.split, self.data.graph, ranked)
        metrics = self._metrics(replica_checksums)
        self._checkpoint().save(self.out_dir / "best.pt")
        write_json_atomic(self.out_dir / "metrics.json", metrics, indent=2)
        report.plot_curves(self.history, self.out_dir / "curves.png")
        if self.progress:
            print(report.results_table(metrics, "test" if self.evaluate_test else "valid"))
        return metrics

    def _final_evaluation(self) -> None:
        """Full-pass metrics for the result when the per-epoch ones are not: with no validation
        run at all, the last epoch's model is the result; with a sampled validation, the
        selected epoch is evaluated again on every validation user, and tested."""
        if self.best.epoch == 0 and self.history:
            self.selection = "last_epoch"
            self.best_state = copy.deepcopy(self.model.state_dict())
            epoch = int(self.history[-1]["epoch"])
        elif self.best.epoch and self._sampled():
            epoch = self.best.epoch
        else:
            return
        self.model.load_state_dict(self.best_state)
        valid = evaluate_model(self.model, self.data.eval_sets["valid"])
        test = evaluate_model(self.model, self.data.eval_sets["test"]) if self.evaluate_test else {}
        self.best = BestEpoch(epoch, valid, test)

    def _checkpoint(self) -> Checkpoint:
        return Checkpoint(
            model_config=self.model_config.to_dict(),
            state_dict=self.best_state,
            train_config=asdict(self.config),
            best=self.best,
            item_ids=self.data.vocab.item_ids,
            item_counts=self.data.item_counts,
            data=self.data.info,
        )

    def _fingerprint(self) -> dict[str, Any]:
        """What a resumed run must share with the stopped one (``training.run_state``)."""
        train_config = asdict(self.config)
        train_config["loss"] = self.config.objective(self.model_config.num_items)  # auto, resolved
        train_config["ted_samples"] = self.loss_settings.ted_samples  # the exact loss: 0, unused
        train_config["lr_decay_epochs"] = self.config.lr_decay_length()  # resolved: --epochs may change
        return {
            "train_config": train_config,
            "model_config": self.model_config.to_dict(),
            "data": {"sha256": self.data.info["sha256"]},
        }

    def _wall_seconds(self) -> float:
        return self.earlier_wall_seconds + time.perf_counter() - self.started

    def _metrics(self, replica_checksums: list[str]) -> dict[str, Any]:
        return {
            "data": self.data.info,
            "model_config": self.model_config.to_dict(),
            "train_config": asdict(self.config),
            "objective": self.config.objective(self.model_config.num_items),  # --loss auto resolved
            "device": str(self.device),
            "device_name": device_name(self.device),
            "epochs_run": len(self.history),
            "stopped": self.stopped,
            "best_epoch": self.best.epoch,
            "selection": self.selection,
            "valid": self.best.valid,
            "test": self.best.test,
            "baselines": self.baselines,
            "seconds_per_epoch": self.train_seconds / max(1, len(self.history)),
            "train_seconds": self.train_seconds,
            "wall_seconds": self._wall_seconds(),
            "resumed_at": self.resumed_at,
            "warm_start": self.warm_start,
            "distributed": {"world_size": self.world.size, "replica_checksums": replica_checksums},
        }


def train(
    data_path: str | Path,
    out_dir: str | Path,
    model_config: dict[str, Any] | None = None,
    config: TrainConfig | None = None,
    progress: bool = True,
    resume: bool = False,
) -> dict[str, Any]:
    """Train MQSA-TED on a sequence file: ``Trainer(...).fit(resume)``; see :class:`Trainer`.

    Returns:
        The content of ``metrics.json``.
    """
    return Trainer(data_path, out_dir, model_config, config, progress).fit(resume)
