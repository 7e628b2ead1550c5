"""Hyperparameter search on the validation split: ``mqsa tune`` (Optuna).

    summary = tune(data_path, out_dir, TuneConfig(trials=60, jobs=2), base={"max_len": 50})

A *study* of *trials*. Each trial trains MQSA-TED (:class:`Trainer`) with settings a
seeded TPE sampler draws from the search space (``training.search_space``), or the
next combination of a grid's choices (``sampler="grid"``), on top of the base
settings, for at most ``epochs`` epochs, and reports every epoch's validation
NDCG@20 to a pruner (median or Hyperband) through the trainer's ``on_epoch``
callback; the pruner stops unpromising trials early. A trial's value
is its best validation NDCG@20. Trials never rank the test split
(``Trainer(..., evaluate_test=False)``), so nothing the search decides can depend on it.

The study lives in an RDB storage (SQLite ``OUT/study.db`` unless ``--storage``) and
is loaded when it exists, so the same command resumes an interrupted tune:
``trials`` is the number of trials that ran to their end the study should hold
(:func:`ran_to_an_end`: complete or pruned, and in a grid failed because their
settings do not go together), earlier runs' included. A trial that a stopped tune left behind is queued
again with the same settings (at most MAX_RETRIES times): one still RUNNING whose
process on this machine is gone, or one failed by a Ctrl-C; a trial of another
machine sharing the storage once its heartbeat is older than STALE_SECONDS.
``jobs`` trials run at once, each in its own process, with the CPU threads divided.

Files under OUT:

    study.db                 the study (the default storage)
    trials/<study>-NNNN/     each trial's metrics.json, history.csv, curves.png
    best.toml                the best trial's settings, for `mqsa train --config`
    report.md                history and importances (PNG), the trials, the final runs
    final/seedS/, final.json with --seeds K: the best settings trained with K seeds,
                             their test metrics (mean and sd) beside the baselines
"""

from __future__ import annotations

import csv
import inspect
import json
import os
import shutil
import socket
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Literal

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from mqsa.errors import ConfigError, ResumeError
from mqsa.models.mqsa import MQSAConfig
from mqsa.training.artifacts import file_sha256, write_json_atomic, writing
from mqsa.training.checkpoint import SELECT_METRIC
from mqsa.training.search_space import SearchSpace, as_setting
from mqsa.training.sequences import read_sequences
from mqsa.training.settings_file import split_settings, write_settings_file
from mqsa.training.trainer import StopTraining, TrainConfig, Trainer

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
REFUSED = "refused"  # user attr of a trial failed by settings that do not go together: it ran to its end
MAX_RETRIES = 2  # a trial whose process keeps dying is not queued again forever
HEARTBEAT_SECONDS = 30  # a running trial writes its heartbeat this often ...
STALE_SECONDS = 300  # ... and another machine's trial silent this long is taken as dead
SQLITE_TIMEOUT_SECONDS = 60  # several jobs write one SQLite file: wait for its lock this long
FINAL_METRICS = ("HR@5", "NDCG@5", "HR@10", "NDCG@10", "HR@20", "NDCG@20")


@dataclass
class TuneConfig:
    """Settings of ``mqsa tune``: the budget, the storage, the search, the final runs.

    ``mqsa tune`` makes one flag per field, with the text below as its help. The
    settings of the network and the training come from ``--config`` (the base) and
    the search space.

    Attributes:
        trials: finished (complete or pruned) trials the study should hold, and in a grid
            the combinations failed by settings that do not go together; those of an
            earlier run of the same study count, so the same command resumes it.
        epochs: the most epochs a trial trains.
        patience: a trial stops after this many epochs without a better validation
            NDCG@20 (0 = never early).
        timeout: start no trial after this many seconds (0 = no limit); the trials
            running then finish.
        jobs: trials at once, each in its own process; the CPU threads are divided among them.
        threads: CPU threads in all (0 = every core).
        storage: the study's database URL, e.g. postgresql://... for several machines
            (none: sqlite:///OUT/study.db).
        study_name: the study's name in the storage.
        space: a TOML or JSON file that narrows, widens or fixes the searched settings
            (docs/tuning.md; none: the default space).
        sampler: tpe (draws settings where the finished trials say good ones are) or grid
            (every combination of the space file's choices once, in at most --trials trials;
            the default ranges do not apply).
        pruner: median (a trial whose best score so far is below the median of the
            complete trials' at the same epoch stops), hyperband, or none.
        startup_trials: trials drawn at random before TPE takes over (and complete
            trials before the median pruner prunes).
        warmup_epochs: epochs a trial trains before it may be pruned.
        seed: seeds the sampler and every trial's training (the same seed for all
            trials, so they differ by their settings only).
        base_trial: a new TPE study's first trial trains the base settings (the searched ones
            the space can draw; the paper's unless --config), so the search starts from them.
        seeds: then train the best settings with this many seeds (seed, seed+1, ...)
            and report their test metrics beside the baselines (0 = no final runs).
        final_epochs: the most epochs of a final run (none: the base settings', 200
            unless --config says otherwise).
        final_patience: the patience of a final run (none: the base settings').
    """

    trials: int = 30
    epochs: int = 30
    patience: int = 5
    timeout: float = 0.0
    jobs: int = 1
    threads: int = 0
    storage: str | None = None
    study_name: str = "mqsa"
    space: str | None = None
    sampler: Literal["tpe", "grid"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = "median"
    startup_trials: int = 8
    warmup_epochs: int = 5
    seed: int = 42
    base_trial: bool = True
    seeds: int = 0
    final_epochs: int | None = None
    final_patience: int | None = None

    def __post_init__(self) -> None:
        for name in ("trials", "epochs", "jobs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("patience", "timeout", "threads", "startup_trials", "warmup_epochs", "seeds"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if 0 < self.threads < self.jobs:  # each process runs at least one thread: more than asked for
            raise ConfigError(f"threads ({self.threads}) must be 0 or at least jobs ({self.jobs})")
        if self.final_epochs is not None and self.final_epochs < 1:
            raise ConfigError(f"final_epochs must be >= 1, got {self.final_epochs}")
        if self.final_patience is not None and self.final_patience < 0:
            raise ConfigError(f"final_patience must be >= 0, got {self.final_patience}")
        if self.sampler not in ("tpe", "grid"):
            raise ConfigError(f"sampler must be tpe or grid, got {self.sampler!r}")
        if self.pruner not in ("median", "hyperband", "none"):
            raise ConfigError(f"pruner must be median, hyperband or none, got {self.pruner!r}")
        if not self.study_name:
            raise ConfigError("study_name must not be empty")

    def wanted_trials(self, space: SearchSpace) -> int:
        """The trials the study should hold (:func:`ran_to_an_end`): ``trials``, or a smaller grid's size."""
        return min(self.trials, space.grid_size()) if self.sampler == "grid" else self.trials

    def threads_per_job(self, jobs: int) -> int:
        """Each of ``jobs`` processes' share of the CPU threads (at least 1)."""
        return max(1, (self.threads or os.cpu_count() or 1) // jobs)


@dataclass
class TuneJob:
    """What one process of a tune needs (picklable: it crosses to the worker processes).

    Attributes:
        data_path: the sequence file.
        out_dir: the tune's folder.
        config: the tune's settings.
        base: the base settings (``--config``), under the searched ones.
        space: the search space.
        storage_url: the study's storage.
        data_sha256: the data's digest, which the study was made for.
        trials: trials this process runs at most.
        deadline: ``time.time()`` after which it starts none (None: no limit).
        worker: this process's index, from 0.
        threads: this process's CPU threads.
        progress: print a line per trial.
    """

    data_path: Path
    out_dir: Path
    config: TuneConfig
    base: dict[str, Any]
    space: SearchSpace
    storage_url: str
    data_sha256: str
    trials: int = 0
    deadline: float | None = None
    worker: int = 0
    threads: int = 1
    progress: bool = True


def tune(
    data_path: str | Path,
    out_dir: str | Path,
    config: TuneConfig | None = None,
    base: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run (or resume) a study, then write ``best.toml``, the final runs and ``report.md``.

    Args:
        data_path: sequences in the text format.
        out_dir: the tune's folder (see the module docstring).
        config: the tune's settings.
        base: base settings (MQSAConfig and TrainConfig fields, as ``read_settings_file``
            returns them); the searched ones are drawn per trial on top.
        progress: print a line per trial and a summary.

    Returns:
        The summary: trial counts by state, the best trial, the final runs' metrics.

    Raises:
        ConfigError: bad settings, a bad space file, or a study made for other data.
        DataError: bad data.
    """
    started = time.time()
    config = config or TuneConfig()
    space = SearchSpace.from_file(config.space, grid=config.sampler == "grid")
    check_base(data_path, dict(base or {}))
    job = TuneJob(
        data_path=Path(data_path),
        out_dir=Path(out_dir),
        config=config,
        base=dict(base or {}),
        space=space,
        storage_url=config.storage or f"sqlite:///{Path(out_dir).resolve() / 'study.db'}",
        data_sha256=file_sha256(data_path),
        progress=progress,
    )
    with writing(job.out_dir):
        job.out_dir.mkdir(parents=True, exist_ok=True)
    study = open_study(job)
    enqueue_base_trial(job, study)
    requeued = queue_again_what_was_left(study)
    if requeued and progress:
        print(f"queued again with the same settings: trials {', '.join(map(str, requeued))}", flush=True)
    run_jobs(job, study, started)
    return finish(job, open_study(job), started)


def enqueue_base_trial(job: TuneJob, study: optuna.Study) -> None:
    """Queue the base settings as a new TPE study's first trial (``TuneConfig.base_trial``).

    The settings every config field has under the base (``split_settings``), reduced to
    the searched entries the space can draw; a grid runs its own combinations instead.
    """
    if job.config.sampler != "tpe" or not job.config.base_trial or study.get_trials(deepcopy=False):
        return
    model, train = split_settings(job.base)
    settings = asdict(MQSAConfig(num_items=1, **model)) | asdict(TrainConfig(**train))
    point = job.space.starting_point(settings)
    if point:
        study.enqueue_trial(point, user_attrs={"base_trial": True})


def check_base(data_path: str | Path, base: dict[str, Any]) -> None:
    """Read the data and build the configs of the base settings, so either fails before the study starts.

    Raises:
        DataError: a missing or malformed sequence file. ConfigError: a bad base setting.
    """
    read_sequences(data_path)
    if "num_items" in base:
        raise ConfigError("num_items comes from the data, not the base settings")
    model, train = split_settings(base)
    MQSAConfig(num_items=1, **model)
    TrainConfig(**train)


def quiet_optuna() -> None:
    """Optuna's log lines and its experimental-feature warnings off: ``TrialRun`` prints its own."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def make_storage(url: str) -> optuna.storages.RDBStorage:
    """The RDB storage at ``url``, with heartbeats, a stale trial queued again, and SQLite's lock wait."""
    engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_SECONDS}} if url.startswith("sqlite") else {}
    stale = "heartbeat_stale_trial_callback"  # Optuna >= 4.9; earlier: failed_trial_callback
    if stale not in inspect.signature(optuna.storages.RDBStorage).parameters:
        stale = "failed_trial_callback"
    return optuna.storages.RDBStorage(
        url,
        engine_kwargs=engine_kwargs,
        heartbeat_interval=HEARTBEAT_SECONDS,
        grace_period=STALE_SECONDS,
        **{stale: queue_trial_again},
    )


def make_pruner(config: TuneConfig) -> optuna.pruners.BasePruner:
    """The pruner ``config.pruner`` names, fed each evaluated epoch's validation NDCG@20."""
    if config.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=config.startup_trials, n_warmup_steps=config.warmup_epochs
        )
    if config.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=max(1, config.warmup_epochs), max_resource=config.epochs
        )
    return optuna.pruners.NopPruner()


def make_sampler(config: TuneConfig, space: SearchSpace, seed: int) -> optuna.samplers.BaseSampler:
    """TPE, seeded, after ``startup_trials`` random trials; or the grid of ``space``'s choices."""
    if config.sampler == "grid":  # skips the combinations the study has run, earlier runs' included
        return optuna.samplers.GridSampler(space.grid(), seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=config.startup_trials)


def open_study(job: TuneJob) -> optuna.Study:
    """Create the study, or load it; refuse one made for other data or another grid.

    Raises:
        ConfigError: the study in the storage was made for a file with another sha256,
            or one of a grid and the other not, or of another grid.
    """
    quiet_optuna()
    config = job.config
    study = optuna.create_study(
        storage=make_storage(job.storage_url),
        study_name=config.study_name,
        direction="maximize",
        sampler=make_sampler(config, job.space, config.seed),
        pruner=make_pruner(config),
        load_if_exists=True,
    )
    made_for = study.user_attrs.get("data_sha256")
    if made_for is None:
        study.set_user_attr("data_sha256", job.data_sha256)
        study.set_user_attr("data_path", str(job.data_path))
    elif made_for != job.data_sha256:
        raise ConfigError(
            f"study {config.study_name!r} in {shown_url(job.storage_url)} was made for other data "
            f"({study.user_attrs.get('data_path')}, sha256 {made_for[:12]}); "
            f"give another --out, --storage or --study-name"
        )
    check_same_search(job, study)
    return study


def check_same_search(job: TuneJob, study: optuna.Study) -> None:
    """Refuse to mix a grid's trials with another search's: each counts its own combinations.

    A study remembers its grid (``user_attrs["grid"]``; None for TPE, and for studies
    made before grids existed). A TPE study may change its space file between runs.

    Raises:
        ConfigError: the study's grid and this run's differ, naming both.
    """
    mine = job.space.grid() if job.config.sampler == "grid" else None
    if "grid" not in study.user_attrs and not study.get_trials(deepcopy=False):
        study.set_user_attr("grid", mine)
        return
    made_with = study.user_attrs.get("grid")
    if made_with != mine:
        held, asked = (f"the grid {json.dumps(g)}" if g else "a TPE search" for g in (made_with, mine))
        raise ConfigError(
            f"study {job.config.study_name!r} in {shown_url(job.storage_url)} holds {held}, "
            f"this run asks for {asked}; give another --out, --storage or --study-name"
        )


def shown_url(url: str) -> str:
    """A storage URL as reports show it: without its password."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def queue_trial_again(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue a copy of a trial that did not finish (WAITING, same settings), unless retried enough.

    Also the storage's callback for trials whose heartbeat went stale. The copy records
    the trial it repeats (``system_attrs["failed_trial"]``, Optuna's convention) and, in
    a grid, its combination (``grid_id``), which the grid would otherwise count as run.
    """
    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    if len(history) > MAX_RETRIES:
        return
    grid = {k: trial.system_attrs[k] for k in ("grid_id", "search_space") if k in trial.system_attrs}
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.WAITING,
            params=trial.params,
            distributions=trial.distributions,
            system_attrs={"failed_trial": history[0], "retry_history": history, **grid},
            user_attrs={"repeats": trial.number},  # the repeat goes on from this one's last.pt
        )
    )


def queue_again_what_was_left(study: optuna.Study) -> list[int]:
    """Fail the trials a stopped tune left RUNNING on this machine and queue every interrupted one again.

    A RUNNING trial is left over when the process it names (``user_attrs["worker"]``)
    ran on this machine and is gone; a FAIL one when a Ctrl-C stopped it. Returns the
    numbers of the trials queued again.
    """
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    queued = []
    for trial in trials:
        if trial.number in retried:
            continue
        if trial.state == TrialState.RUNNING and left_running(trial):
            trial = study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        elif not (trial.state == TrialState.FAIL and trial.user_attrs.get("interrupted")):
            continue
        if trial.state == TrialState.FAIL:
            queue_trial_again(study, trial)
            queued.append(trial.number)
    return queued


def left_running(trial: FrozenTrial) -> bool:
    """Whether a RUNNING trial's process ran on this machine and is gone."""
    worker = trial.user_attrs.get("worker") or {}
    if worker.get("host") != socket.gethostname() or not isinstance(worker.get("pid"), int):
        return False
    try:
        os.kill(worker["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def run_jobs(job: TuneJob, study: optuna.Study, started: float) -> None:
    """Run the trials still missing: in this process (one job), or in ``jobs`` processes."""
    config = job.config
    missing = config.wanted_trials(job.space) - ran_to_an_end(study)
    if missing <= 0:
        return
    jobs = min(config.jobs, missing)
    deadline = started + config.timeout if config.timeout else None
    shares = [missing // jobs + (w < missing % jobs) for w in range(jobs)]
    threads = config.threads_per_job(jobs)
    workers = [
        TuneJob(**{**vars(job), "trials": share, "deadline": deadline, "worker": w, "threads": threads})
        for w, share in enumerate(shares)
    ]
    if jobs == 1:
        run_worker(workers[0])
        return
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        for done in [pool.submit(run_worker, w) for w in workers]:
            done.result()  # a worker's error is raised here


def run_worker(job: TuneJob) -> None:
    """One process of a tune: load the study and run up to ``job.trials`` trials."""
    study = open_study(job)
    # A resumed run must not draw its predecessor's random settings again: TPE's seed moves on.
    # A grid's does not: it orders the combinations, trial n taking the n-th, and every
    # process and every run must agree on that order.
    seed = job.config.seed
    if job.config.sampler == "tpe":
        seed += 1000 * job.worker + len(study.get_trials(deepcopy=False))
    study.sampler = make_sampler(job.config, job.space, seed)
    timeout = None
    if job.deadline is not None:
        timeout = job.deadline - time.time()
        if timeout <= 0:
            return
    study.optimize(
        TrialRun(job),
        n_trials=job.trials,
        timeout=timeout,
        catch=(ConfigError,),  # settings that do not go together (heads vs hidden size): FAIL, go on
        callbacks=[StopWhenDone(job.config.wanted_trials(job.space))],
        gc_after_trial=False,
    )


def ran_to_an_end(study: optuna.Study) -> int:
    """The study's trials that count towards ``--trials``: complete, pruned, and in a grid refused.

    Optuna's grid counts a failed combination as run, so a grid trial refused for
    settings that do not go together (a FAIL with ``user_attrs["refused"]``) counts: it
    would fail again. In a TPE study it does not: its space file, its base or the machine
    may change before the next run (a base naming a missing GPU refuses every trial).
    One failed by a Ctrl-C or a dead process never counts (it is queued again).
    """
    trials = study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.FAIL))
    grid = bool(study.user_attrs.get("grid"))
    return sum(t.state != TrialState.FAIL or (grid and REFUSED in t.user_attrs) for t in trials)


@dataclass
class StopWhenDone:
    """Optuna callback: stop the study once it holds ``wanted`` trials that ran to an end (all processes')."""

    wanted: int

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if ran_to_an_end(study) >= self.wanted:
            study.stop()


@dataclass
class PrunerFeed:
    """The trainer's ``on_epoch`` callback in a trial: report the validation score, stop if pruned.

    Attributes:
        trial: the running trial.
        earlier: the scores a repeated trial's predecessor reported, by epoch: reported
            first, up to the epoch the repeat resumed after.
    """

    trial: optuna.Trial
    earlier: dict[int, float] = field(default_factory=dict)

    def __call__(self, epoch: int, valid: dict[str, float]) -> None:
        self.report_earlier(before=epoch)
        self.trial.report(valid[SELECT_METRIC], step=epoch)
        if self.trial.should_prune():
            raise StopTraining(f"pruned after epoch {epoch}")

    def report_earlier(self, before: int | None = None) -> None:
        """Report the predecessor's scores (those before epoch ``before``; all if None), once.

        Called before the first epoch the repeat trains, and after its run: a predecessor
        stopped after its last epoch leaves the repeat no epoch to train.
        """
        for step in sorted(step for step in self.earlier if before is None or step < before):
            self.trial.report(self.earlier[step], step=step)
        self.earlier.clear()


@dataclass
class TrialRun:
    """The objective: train one trial's settings and return its best validation NDCG@20.

    Attributes:
        job: the tune (this process's part of it).
    """

    job: TuneJob

    def __call__(self, trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
        try:
            return self._run(trial)
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)  # the next run of the command queues it again
            raise
        except ConfigError as exc:  # settings that do not go together: this trial fails, the tune goes on
            trial.set_user_attr(REFUSED, str(exc))
            if self.job.progress:
                print(f"trial {trial.number:>4}  failed: {exc}", flush=True)
            raise

    def _run(self, trial: optuna.Trial) -> float:
        job = self.job
        drawn = job.space.suggest(trial)
        # What the trial ran with, base and fixed values included: best.toml is written from
        # this, not from a later run's base or space file (JSON: a tuple is kept as a list).
        trial.set_user_attr("settings", as_record(drawn))
        trial.set_user_attr("base", as_record(job.base))
        model_config, train = split_settings({**job.base, **drawn})
        budget = {"epochs": job.config.epochs, "patience": job.config.patience, "seed": job.config.seed}
        config = TrainConfig(**(train | budget | {"threads": job.threads}))
        out = trial_dir(job, trial.number)
        started = time.perf_counter()
        trainer, metrics = self._train(trial, out, model_config, config)
        for checkpoint in ("best.pt", "last.pt"):  # a trial's weights are not kept: the final runs retrain
            (out / checkpoint).unlink(missing_ok=True)
        seconds = time.perf_counter() - started
        for key, value in {
            "best_epoch": metrics["best_epoch"],
            "epochs_run": metrics["epochs_run"],
            "seconds": round(seconds, 1),
            "stopped": trainer.stopped,
        }.items():
            trial.set_user_attr(key, value)
        value = metrics["valid"][SELECT_METRIC]
        if job.progress:
            print(trial_line(trial.number, drawn, metrics, trainer.stopped, seconds, job), flush=True)
        if trainer.stopped:
            raise optuna.TrialPruned(trainer.stopped)
        return value

    def _train(
        self, trial: optuna.Trial, out: Path, model_config: dict[str, Any], config: TrainConfig
    ) -> tuple[Trainer, dict[str, Any]]:
        """Train the trial into ``out``, going on from its predecessor's ``last.pt`` if it repeats one."""
        job = self.job

        def trainer(feed: PrunerFeed) -> Trainer:
            return Trainer(job.data_path, out, model_config, config, False, feed, evaluate_test=False)

        earlier = take_over(job, trial, out)
        if earlier is not None:
            feed = PrunerFeed(trial, earlier)
            resumed = trainer(feed)
            try:
                metrics = resumed.fit(resume=True)
                feed.report_earlier()  # none left unless no epoch was trained
                return resumed, metrics
            except ResumeError:  # its last.pt does not fit (the base settings changed): start again
                pass
        fresh = trainer(PrunerFeed(trial))
        return fresh, fresh.fit()


def trial_dir(job: TuneJob, number: int) -> Path:
    """Trial ``number``'s folder: its metrics, history and curves (and last.pt while it runs)."""
    return job.out_dir / "trials" / f"{job.config.study_name}-{number:04d}"


def take_over(job: TuneJob, trial: optuna.Trial, out: Path) -> dict[int, float] | None:
    """Let a repeated trial go on from where its predecessor stopped.

    When the trial repeats one (``queue_trial_again``) that left a ``last.pt``, that
    folder is copied to ``out`` (its weights moved) and the predecessor's validation
    scores by epoch are returned, for the pruner to be given again: from its
    ``history.csv``, which also holds an epoch saved but not yet reported when the
    process died; None when there is nothing to go on from.
    """
    repeats = trial.user_attrs.get("repeats")
    if repeats is None:
        return None
    before = trial_dir(job, repeats)
    if not (before / "last.pt").is_file():
        return None
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(before, out)
    for weights in before.glob("*.pt"):  # they live on in the repeat's folder
        weights.unlink()
    column = f"valid_{SELECT_METRIC}"
    with (out / "history.csv").open(newline="") as f:
        return {int(row["epoch"]): float(row[column]) for row in csv.DictReader(f) if row.get(column)}


def trial_line(
    number: int,
    drawn: dict[str, Any],
    metrics: dict[str, Any],
    stopped: str | None,
    seconds: float,
    job: TuneJob,
) -> str:
    """One line per finished trial: its score, its length and its searched settings."""
    searched = {p.name for p in job.space.searched()}
    settings = " ".join(f"{k}={_short(v)}" for k, v in drawn.items() if k in searched)
    outcome = stopped or f"best epoch {metrics['best_epoch']}/{metrics['epochs_run']}"
    return (
        f"trial {number:>4}  valid {SELECT_METRIC} {metrics['valid'][SELECT_METRIC]:.4f}  "
        f"{outcome}  {seconds:.0f}s  {settings}"
    )


def _short(value: Any) -> str:
    if isinstance(value, tuple):
        return "+".join(map(str, value))
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def as_record(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as a trial's JSON user attribute holds them: a tuple (``windows``) as a list."""
    return {name: list(value) if isinstance(value, tuple) else value for name, value in settings.items()}


def from_record(settings: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`as_record`: no setting takes a list, so every list was a tuple."""
    return {name: tuple(value) if isinstance(value, list) else value for name, value in settings.items()}


def best_settings(job: TuneJob, best: FrozenTrial) -> dict[str, Any]:
    """The best trial's settings: its base with its drawn and fixed values on top.

    As the trial recorded them (``user_attrs``), so a later run's other base or space
    file does not change them; a trial recorded before that takes this run's.
    """
    if "settings" in best.user_attrs:
        recorded = {**best.user_attrs.get("base", {}), **best.user_attrs["settings"]}
        return {name: as_setting(name, value) for name, value in from_record(recorded).items()}
    drawn = {p.name: p.value for p in job.space.params if not p.searched} | best.params
    return {**job.base, **{name: as_setting(name, value) for name, value in drawn.items()}}


def write_best(job: TuneJob, study: optuna.Study, best: FrozenTrial) -> dict[str, Any]:
    """Write ``best.toml`` (the best trial's settings); returns them."""
    settings = best_settings(job, best)
    finished = len(study.get_trials(deepcopy=False, states=FINISHED))
    comments = [
        f"mqsa tune: the best of {finished} complete or pruned trials of study {job.config.study_name!r}",
        f"({shown_url(job.storage_url)}). Trial {best.number}: validation {SELECT_METRIC} {best.value:.4f}",
        f"at epoch {best.user_attrs.get('best_epoch')} of at most {job.config.epochs}, "
        f"seed {job.config.seed}.",
        f"Data: {job.data_path} (sha256 {job.data_sha256[:12]}). The test split was not used.",
        "Train with: mqsa train --data DATA --out DIR --config best.toml  (flags override it)",
        "",
    ]
    write_settings_file(job.out_dir / "best.toml", settings, comments)
    return settings


def final_runs(job: TuneJob, settings: dict[str, Any]) -> dict[str, Any]:
    """Train ``settings`` with ``config.seeds`` seeds (full length) and summarise their test metrics.

    A run already finished with these settings is read back, one stopped is resumed
    (``last.pt``), so the same command picks the final runs up where they stopped.
    """
    config = job.config
    seeds = [config.seed + k for k in range(config.seeds)]
    jobs = min(config.jobs, len(seeds))
    args = [(job, settings, seed, config.threads_per_job(jobs)) for seed in seeds]
    if jobs == 1:
        runs = [final_run(*a) for a in args]
    else:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            runs = [f.result() for f in [pool.submit(final_run, *a) for a in args]]
    summary = {
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()},
        "seeds": seeds,
        "runs": [
            {k: m[k] for k in ("best_epoch", "epochs_run", "valid", "test", "wall_seconds")}
            | {"seed": m["train_config"]["seed"]}
            for m in runs
        ],
        "valid": mean_sd([m["valid"] for m in runs]),
        "test": mean_sd([m["test"] for m in runs]),
        "baselines": runs[0]["baselines"],
    }
    write_json_atomic(job.out_dir / "final.json", summary, indent=2)
    return summary


def final_run(job: TuneJob, settings: dict[str, Any], seed: int, threads: int) -> dict[str, Any]:
    """One final run into ``OUT/final/seedS`` (read back or resumed when it is there); its metrics."""
    quiet_optuna()
    model_config, train = split_settings(settings)
    length = {"epochs": job.config.final_epochs, "patience": job.config.final_patience}
    config = TrainConfig(
        **(train | {k: v for k, v in length.items() if v is not None} | {"seed": seed, "threads": threads})
    )
    out = job.out_dir / "final" / f"seed{seed}"
    done = out / "metrics.json"
    if done.is_file():
        metrics = json.loads(done.read_text(encoding="utf-8"))
        if same_run(metrics, model_config, config):
            return metrics
    trainer = Trainer(job.data_path, out, model_config, config, progress=False)
    try:
        metrics = trainer.fit(resume=(out / "last.pt").is_file())
    except ResumeError:  # from other settings (a better trial was found since): start again
        metrics = Trainer(job.data_path, out, model_config, config, progress=False).fit()
    if job.progress:
        test = "  ".join(f"{k} {metrics['test'][k]:.4f}" for k in ("HR@10", "NDCG@10", "NDCG@20"))
        length = f"{metrics['best_epoch']}/{metrics['epochs_run']}"
        print(f"final run, seed {seed}: best epoch {length}  test {test}", flush=True)
    return metrics


def same_run(metrics: dict[str, Any], model_config: dict[str, Any], config: TrainConfig) -> bool:
    """Whether a finished run's ``metrics.json`` is of these settings (its thread count aside)."""
    model = metrics.get("model_config", {})
    resolved = config.resolved(model.get("num_items", 1))  # as the trainer records it
    train = {k: v for k, v in asdict(resolved).items() if k != "threads"}
    recorded = {k: v for k, v in metrics.get("train_config", {}).items() if k != "threads"}
    wanted = MQSAConfig(num_items=model.get("num_items", 1), **model_config).to_dict()
    return recorded == train and model == wanted


def mean_sd(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per metric, the mean and the sample standard deviation (0 for one row) over ``rows``."""
    out = {}
    for metric in FINAL_METRICS:
        values = np.array([r[metric] for r in rows], dtype=np.float64)
        out[metric] = {
            "mean": float(values.mean()),
            "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
        }
    return out


def finish(job: TuneJob, study: optuna.Study, started: float) -> dict[str, Any]:
    """After the trials: ``best.toml``, the final runs, ``report.md``; returns the summary."""
    from mqsa.training.tune_report import write_report

    trials = study.get_trials(deepcopy=False)
    states = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    summary: dict[str, Any] = {"trials": {k: v for k, v in states.items() if v}, "best": None, "final": None}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        settings = write_best(job, study, best)
        summary["best"] = {"trial": best.number, "value": best.value, "settings": settings}
        if job.config.seeds:
            summary["final"] = final_runs(job, settings)
    summary["report"] = str(write_report(job, study, summary, time.time() - started))
    return summary
