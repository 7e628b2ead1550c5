"""``report.md`` of a tune: what was searched, how the search went, what it found, the final runs.

Beside it: ``history.png`` (each trial's validation NDCG@20 and the best so far) and
``importances.png`` (Optuna's parameter importances, from two complete trials on).
Every number that chose something is a validation number; test numbers appear
only in the final runs' section, after the choice was made.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from mqsa.training.artifacts import write_text_atomic
from mqsa.training.checkpoint import SELECT_METRIC

if TYPE_CHECKING:
    from mqsa.training.tune import TuneJob

SHOWN_METRICS = ("HR@10", "NDCG@10", "NDCG@20")  # the goal metrics of docs/reproduction.md
BASELINE_NAMES = {"Popularity": "Popularity", "ItemTransition": "Item Transition"}


def write_report(job: TuneJob, study: optuna.Study, summary: dict[str, Any], wall_seconds: float) -> Path:
    """Write ``report.md``, ``history.png`` and ``importances.png`` under the tune's folder.

    Args:
        job: the tune.
        study: its study, with every trial.
        summary: what ``tune`` found: ``best`` and ``final`` (either may be None).
        wall_seconds: how long this run of the command took.

    Returns:
        The report's path.
    """
    out = job.out_dir
    trials = study.get_trials(deepcopy=False)
    plot_history(trials, out / "history.png")
    importances, why_not = param_importances(study)
    if importances:
        plot_importances(importances, out / "importances.png")
    else:
        (out / "importances.png").unlink(missing_ok=True)  # an earlier run's: not this study's state
    sections = [
        overview(job, trials, wall_seconds),
        space_table(job, summary["best"]),
        "![Optimisation history](history.png)\n",
        "![Parameter importances](importances.png)\n"
        if importances
        else f"Parameter importances: {why_not}.\n",
        final_section(job, summary["final"]) if summary["final"] else "",
        trials_table(job, trials),
    ]
    path = out / "report.md"
    write_text_atomic(path, "\n".join(s for s in sections if s))
    return path


def overview(job: TuneJob, trials: list[FrozenTrial], wall_seconds: float) -> str:
    """The report's head: data, storage, how many trials of each kind, the budget, the best."""
    from mqsa.training.tune import shown_url

    config = job.config
    counts = {s: sum(t.state == s for t in trials) for s in TrialState}
    finished = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]
    others = ", ".join(
        f"{n} {s.name.lower()}"
        for s, n in counts.items()
        if n and s not in (TrialState.COMPLETE, TrialState.PRUNED)
    )
    trial_seconds = sum(t.user_attrs.get("seconds", 0.0) for t in trials)
    pruner = (
        f"`{config.pruner}` pruner from epoch {config.warmup_epochs}"
        if config.pruner != "none"
        else "no pruner"
    )
    lines = [
        f"# Tuning report: study `{config.study_name}`",
        "",
        f"- data: `{job.data_path}` (sha256 `{job.data_sha256[:12]}`)",
        f"- storage: `{shown_url(job.storage_url)}`",
        f"- trials: {finished} finished ({counts[TrialState.COMPLETE]} complete, "
        f"{counts[TrialState.PRUNED]} pruned)"
        + (f"; {others}" if others else "")
        + f"; {duration(trial_seconds)} of trial time in all; this run took {duration(wall_seconds)}",
        f"- each trial: at most {config.epochs} epochs (patience {config.patience}), seed {config.seed}, "
        f"{pruner}; {sampler_text(job)}; {config.jobs} job(s)",
        f"- a trial's value is its best validation {SELECT_METRIC}; trials never rank the test split",
    ]
    if job.base:
        lines.append("- base settings: " + ", ".join(f"`{k} = {_cell(v)}`" for k, v in job.base.items()))
    return "\n".join(lines) + "\n"


def sampler_text(job: TuneJob) -> str:
    """How the trials' settings were chosen: TPE after random trials, or a grid of N combinations."""
    if job.config.sampler == "grid":
        return f"a grid of {job.space.grid_size()} combinations, each run once"
    return f"TPE after {job.config.startup_trials} random trials"


def space_table(job: TuneJob, best: dict[str, Any] | None) -> str:
    """The searched and fixed settings, with the best trial's values (``best.toml``)."""
    if best is None:
        head = "## Search space\n\nNo trial has completed yet: no best settings, no `best.toml`.\n"
        rows = [(p.name, p.describe(), "") for p in job.space.params]
    else:
        head = (
            f"## Best trial: #{best['trial']}, validation {SELECT_METRIC} {best['value']:.4f}\n\n"
            "Its settings are in `best.toml` (`mqsa train --config best.toml`).\n"
        )
        rows = [(p.name, p.describe(), _cell(best["settings"].get(p.name))) for p in job.space.params]
    table = ["| setting | searched over | best |", "|---|---|---|"]
    table += [f"| `{name}` | {where} | {value} |" for name, where, value in rows]
    return head + "\n" + "\n".join(table) + "\n"


def trials_table(job: TuneJob, trials: list[FrozenTrial]) -> str:
    """One row per trial, in order: state, value, epochs, time, settings, what became of it."""
    names = [p.name for p in job.space.searched()]
    head = (
        f"| # | state | valid {SELECT_METRIC} | best epoch | epochs | seconds | "
        + " | ".join(names)
        + " | note |"
    )
    lines = ["## Trials", "", head, "|---" * (len(names) + 7) + "|"]
    for t in trials:
        value = f"{t.value:.4f}" if t.value is not None else ""
        attrs = t.user_attrs
        cells = [_cell(t.params.get(n, "")) for n in names]
        lines.append(
            f"| {t.number} | {t.state.name.lower()} | {value} | {attrs.get('best_epoch', '')} | "
            f"{attrs.get('epochs_run', '')} | {attrs.get('seconds', '')} | "
            + " | ".join(cells)
            + f" | {note(t)} |"
        )
    return "\n".join(lines) + "\n"


def note(trial: FrozenTrial) -> str:
    """What the trials table says of a trial beside its numbers."""
    parts = ["the base settings"] if trial.user_attrs.get("base_trial") else []
    if "failed_trial" in trial.system_attrs:
        parts.append(f"repeats #{trial.system_attrs['retry_history'][-1]}")
    if trial.state == TrialState.PRUNED and trial.user_attrs.get("stopped"):
        parts.append(trial.user_attrs["stopped"])
    if trial.user_attrs.get("interrupted"):
        parts.append("interrupted")
    return "; ".join(parts)


def final_section(job: TuneJob, final: dict[str, Any]) -> str:
    """The final runs' test metrics (mean ± sd over the seeds) beside the baselines, then per seed."""
    runs = final["runs"]
    length = ", ".join(f"{r['best_epoch']}/{r['epochs_run']}" for r in runs)
    lines = [
        f"## Final runs: the best settings with {len(runs)} seed(s), test split",
        "",
        f"Seeds {', '.join(map(str, final['seeds']))}; best epoch / epochs run: {length}. Each run's test "
        f"metrics are those of its epoch with the best validation {SELECT_METRIC} (spec section 7); the "
        "baselines are computed on the same split.",
        "",
        "| model | " + " | ".join(f"test {m}" for m in SHOWN_METRICS) + " |",
        "|---" * (len(SHOWN_METRICS) + 1) + "|",
        f"| MQSA-TED, best settings (mean ± sd of {len(runs)}) | "
        + " | ".join(f"{final['test'][m]['mean']:.4f} ± {final['test'][m]['sd']:.4f}" for m in SHOWN_METRICS)
        + " |",
    ]
    for key, name in BASELINE_NAMES.items():
        test = final["baselines"][key]["test"]
        lines.append(f"| {name} | " + " | ".join(f"{test[m]:.4f}" for m in SHOWN_METRICS) + " |")
    lines += [
        "",
        "| seed | best epoch | valid NDCG@20 | " + " | ".join(f"test {m}" for m in SHOWN_METRICS) + " |",
    ]
    lines.append("|---" * (len(SHOWN_METRICS) + 3) + "|")
    for r in runs:
        lines.append(
            f"| {r['seed']} | {r['best_epoch']}/{r['epochs_run']} | {r['valid']['NDCG@20']:.4f} | "
            + " | ".join(f"{r['test'][m]:.4f}" for m in SHOWN_METRICS)
            + " |"
        )
    return "\n".join(lines) + "\n"


def duration(seconds: float) -> str:
    """``41 s``, ``12 min``, ``3.4 h``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _cell(value: Any) -> str:
    if isinstance(value, tuple | list):
        return " ".join(map(str, value))
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def param_importances(study: optuna.Study) -> tuple[dict[str, float], str]:
    """Optuna's importance of each searched setting (its default evaluator), or why there is none yet."""
    if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < 2:
        return {}, "they need at least two complete trials"
    with warnings.catch_warnings():  # too few trials: Optuna warns, and gives equal importances
        warnings.simplefilter("ignore")
        try:
            importances = dict(optuna.importance.get_param_importances(study))
        except (RuntimeError, ValueError) as exc:
            return {}, f"not computed ({exc})"
    if len(set(importances.values())) <= 1:
        return {}, "too few complete trials to tell the settings apart yet"
    return importances, ""


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(trials: list[FrozenTrial], path: Path) -> None:
    """PNG: each finished trial's value by number (a pruned one's at its last report), the best so far."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    for state, style in (
        (TrialState.COMPLETE, {"marker": "o"}),
        (TrialState.PRUNED, {"marker": "x", "color": "grey"}),
    ):
        shown = [t for t in trials if t.state == state and t.value is not None]
        ax.scatter([t.number for t in shown], [t.value for t in shown], label=state.name.lower(), **style)
    best, xs, ys = None, [], []
    for t in trials:
        if t.state == TrialState.COMPLETE and t.value is not None and (best is None or t.value > best):
            best = t.value
        if best is not None:
            xs.append(t.number)
            ys.append(best)
    ax.step(xs, ys, where="post", color="tab:red", label="best so far")
    ax.set(xlabel="trial", ylabel=f"validation {SELECT_METRIC}", title="Optimisation history")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_importances(importances: dict[str, float], path: Path) -> None:
    """PNG: a horizontal bar per searched setting, the most important on top."""
    plt = _pyplot()
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.2))
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set(xlabel="importance (Optuna's default evaluator; they sum to 1)", title="Parameter importances")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
