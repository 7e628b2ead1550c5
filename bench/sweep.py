"""Validation sweeps over a grid of settings, run by ``mqsa tune``, and the table that compares them.

Not a test. A sweep is a grid study of the tuner (``mqsa tune --sampler grid``,
training/tune.py, docs/tuning.md): the product of the ``--grid`` values, one study per
seed, each combination one trial of MQSA-TED with the paper's settings otherwise,
trained for at most ``--epochs`` with ``--patience`` on the validation NDCG@20, in
``--jobs`` processes. Rerun, the same command goes on where it stopped: finished
combinations are not run again and a stopped one goes on from its ``last.pt``.

    python bench/sweep.py --data sports --grid tau=0.05,0.2 --threads 2 --jobs 2
    python bench/sweep.py --data sports --grid lr=5e-4,2e-3 l2=1e-5
    python bench/sweep.py --table-only
    python bench/sweep.py --records docs/reproduction/sweep-h100 --grid lr=5e-4,1e-3   # a sweep of its own

``--grid`` takes ``name=v1,v2`` per setting; names are MQSAConfig or TrainConfig fields
(``window`` sets one long branch's L). The study of a seed is
``bench/results/<records>/<data>-<grid>-seed<seed>/`` (study.db, trials/, report.md);
each finished trial's metrics.json and history.csv are copied to the records folder
(``docs/reproduction/sweep/`` unless ``--records``, tracked) as
``<data>-mqsa-ted-<settings>-seed<seed>.json``/``.csv`` and its table README.md is rebuilt
from every record there.

The table is sorted by the **validation** NDCG@20 of the selected epoch: that is the
only number a setting may be chosen by. Trials never rank the test split, so a row
made by this wrapper has no test numbers (shown as -). The rows recorded before the
sweep ran through the tuner (this script's own loop, up to commit 7da8d8b:
``git show 7da8d8b:bench/sweep.py``) carry the same epoch's test numbers, shown so a
reader can see what a choice gave, never to choose; their records are read as they are,
and a rerun of the same settings and seed leaves them in place (its record stays in
the study's folder).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parents[1]  # the `mqsa` package itself comes installed (make setup)

from reproduce import DATA_DIR, MODEL_FIELDS, SHORT, TRAIN_FIELDS, changed, shown  # noqa: E402

from mqsa.errors import MQSAError  # noqa: E402
from mqsa.training.search_space import as_setting  # noqa: E402
from mqsa.training.tune import TuneConfig, tune  # noqa: E402

RESULTS = ROOT / "bench" / "results"
RECORDS = ROOT / "docs" / "reproduction" / "sweep"
REFERENCE = ROOT / "docs" / "reproduction"  # the paper-settings runs of bench/reproduce.py
METRICS = ("HR@10", "NDCG@10", "NDCG@20")
TEXT_FIELDS = {"linear_init"}  # settings whose values are words, not numbers
STUDY = "sweep"


def parse_grid(specs: list[str]) -> dict[str, list[float | int | str]]:
    """``["tau=0.05,0.2", "window=2,4"]`` -> ``{"tau": [0.05, 0.2], "windows": [2, 4]}``: a grid's axes."""
    axes: dict[str, list[float | int | str]] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = "windows" if name == "window" else name
        if not sep or not values:
            raise SystemExit(f"--grid {spec!r}: expected name=v1,v2,...")
        if name not in MODEL_FIELDS | TRAIN_FIELDS:
            known = sorted((MODEL_FIELDS | TRAIN_FIELDS | {"window"}) - {"windows"})
            raise SystemExit(f"--grid {spec!r}: unknown setting {name!r}; known: {', '.join(known)}")
        if name in axes:
            raise SystemExit(f"--grid {spec!r}: {name} is given twice; put its values in one name=v1,v2")
        points: list[float | int | str] = []
        for raw in values.split(","):
            value = raw if name in TEXT_FIELDS else grid_number(spec, name, raw)
            if value in points:
                raise SystemExit(f"--grid {spec!r}: {raw!r} is given twice (the same run twice)")
            points.append(value)
        axes[name] = points
    return axes


def grid_number(spec: str, name: str, raw: str) -> float | int:
    """One value of a numeric setting in ``--grid spec``: finite, an int where ``name`` takes one."""
    try:
        value = float(raw)
    except ValueError as exc:
        raise SystemExit(f"--grid {spec!r}: {raw!r} is not a number") from exc
    if not math.isfinite(value):
        raise SystemExit(f"--grid {spec!r}: {raw!r} is not a finite number")
    if name in ("windows", "time_span", "batch_size", "hidden_size", "num_blocks", "num_heads"):
        if value != int(value):
            raise SystemExit(f"--grid {spec!r}: {name} takes integers, got {raw!r}")
        return int(value)
    return value


def tag(settings: dict) -> str:
    """A file-name tag for a settings dict: {"tau": 0.05, "windows": (2,)} -> "tau0.05-L2"."""
    return "-".join(f"{SHORT.get(name, name)}{shown(value)}" for name, value in settings.items())


def grid_name(axes: dict[str, list[float | int | str]]) -> str:
    """A folder-name tag for a whole grid: {"lr": [5e-4, 2e-3], "windows": [2]} -> "lr0.0005_0.002-L2"."""
    return "-".join(f"{SHORT.get(n, n)}{'_'.join(shown(v) for v in values)}" for n, values in axes.items())


def run_grid(data: str, axes: dict, seed: int, args: argparse.Namespace, records: Path) -> None:
    """One seed's grid study (run or resumed), then its finished trials copied to ``records``."""
    out = RESULTS / records.name / f"{data}-{grid_name(axes)}-seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    space = out / "space.json"
    space.write_text(json.dumps({name: {"choices": values} for name, values in axes.items()}, indent=2))
    size = math.prod(len(values) for values in axes.values())
    print(f"== MQSA-TED on {data}, seed {seed}: {size} combinations -> {out}", flush=True)
    config = TuneConfig(
        trials=size,
        epochs=args.epochs,
        patience=args.patience,
        jobs=args.jobs,
        threads=args.threads,
        study_name=STUDY,
        space=str(space),
        sampler="grid",
        pruner="none",
        seed=seed,
    )
    try:
        tune(DATA_DIR / f"{data}.txt", out, config, progress=not args.quiet)
    except MQSAError as exc:
        raise SystemExit(f"sweep: {exc}") from exc
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{out / 'study.db'}")
    records.mkdir(parents=True, exist_ok=True)
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        settings = {name: as_setting(name, value) for name, value in trial.params.items()}
        name = f"{data}-mqsa-ted-{tag(settings)}-seed{seed}"
        trial_dir = out / "trials" / f"{STUDY}-{trial.number:04d}"
        earlier = records / f"{name}.json"
        if earlier.exists() and json.loads(earlier.read_text()).get("test"):  # recorded before the tuner
            print(f"   kept {earlier.name} (an earlier record, with test numbers); this run's: {trial_dir}")
            continue
        shutil.copyfile(trial_dir / "metrics.json", records / f"{name}.json")
        shutil.copyfile(trial_dir / "history.csv", records / f"{name}.csv")


def build_table(records_dir: Path = RECORDS) -> str:
    lines = [
        "# Sweeps on the validation split",
        "",
        "Made by `python bench/sweep.py` (see its docstring). MQSA-TED with the paper's settings",
        "except the ones named, one seed per row; rows are sorted by the validation NDCG@20 of",
        "the selected epoch, **the only column a setting is chosen by**. Test columns are the",
        "same epoch's, shown to say what a choice gives, never to choose; rows run through",
        "`mqsa tune --sampler grid` have none (-): its trials never rank the test split.",
        "",
    ]
    records = [json.loads(p.read_text()) for p in sorted(records_dir.glob("*-seed*.json"))]
    by_key: dict[tuple[str, int], list[dict]] = {}
    for r in records:
        data = Path(r["data"]["path"]).stem
        by_key.setdefault((data, r["train_config"]["seed"]), []).append(r)
    for (data, seed), runs in sorted(by_key.items()):
        reference_path = REFERENCE / f"{data}-mqsa-ted-seed{seed}.json"
        seed_has_reference = reference_path.exists()
        if not seed_has_reference:
            # No paper-settings run of this seed: another seed's record names the settings (seed aside).
            others = sorted(REFERENCE.glob(f"{data}-mqsa-ted-seed*.json"))
            if not others:
                raise SystemExit(f"no paper-settings record of {data} in {REFERENCE} to name the settings by")
            reference_path = others[0]
        reference = json.loads(reference_path.read_text())
        own = [r for r in runs if changed(r, reference) == "paper settings"]
        if own:  # this sweep ran the paper settings itself: that run is its reference
            reference = own[0]
        elif seed_has_reference:
            runs = [reference, *runs]
        runs = sorted(runs, key=lambda r: -r["valid"]["NDCG@20"])
        lines += [
            f"## {data}, seed {seed}",
            "",
            "| settings | valid NDCG@20 | best epoch | "
            + " | ".join(f"test {m}" for m in METRICS)
            + " | s/epoch | threads | device |",
            "|---" * (len(METRICS) + 6) + "|",
        ]
        for r in runs:
            lines.append(
                f"| {changed(r, reference)} | {r['valid']['NDCG@20']:.4f} | "
                f"{r['best_epoch']}/{r['epochs_run']} | "
                + " | ".join(f"{r['test'][m]:.4f}" if r.get("test") else "-" for m in METRICS)
                + f" | {r['seconds_per_epoch']:.1f} | {r['train_config']['threads'] or 'all'} | {hardware(r)} |"
            )
        lines.append("")
    return "\n".join(lines + stopped_rows(records_dir))


def hardware(record: dict) -> str:
    """The device column: its type, and the CPU or GPU model where the record names it."""
    name = record.get("device_name")  # records from before session 6 lack it
    return f"{record['device']} ({name})" if name else record["device"]


def stopped_rows(records_dir: Path) -> list[str]:
    """A section for runs stopped before their patience ran out: only their history was kept.

    They have no selected epoch and so no test numbers; their best validation
    NDCG@20 so far says how far they got, not what they would have reached.
    """
    paths = sorted(records_dir.glob("*-stopped.csv"))
    if not paths:
        return []
    lines = [
        "## Stopped runs",
        "",
        "Stopped or crashed before the patience ran out, so no epoch was selected and there are",
        "no test numbers; the history up to the stop is the file named.",
        "",
        "| run | epochs run | best valid NDCG@20 so far (epoch) | epochs since | last valid NDCG@20 |",
        "|---|---|---|---|---|",
    ]
    for path in paths:
        with path.open(newline="") as f:
            valid = [float(row["valid_NDCG@20"]) for row in csv.DictReader(f) if row.get("valid_NDCG@20")]
        if not valid:
            continue
        best = max(range(len(valid)), key=valid.__getitem__)
        lines.append(
            f"| [{path.stem}]({path.name}) | {len(valid)} | {valid[best]:.4f} ({best + 1}) | "
            f"{len(valid) - best - 1} | {valid[-1]:.4f} |"
        )
    return [*lines, ""]


def write_table(records: Path) -> Path:
    """Rebuild ``records/README.md`` from the records in that folder; returns its path."""
    records.mkdir(parents=True, exist_ok=True)
    table = records / "README.md"
    table.write_text(build_table(records))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="sports", choices=["beauty", "sports"])
    parser.add_argument("--grid", nargs="+", default=[], help="name=v1,v2 ... (their product is run)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42], help="one grid study per seed")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--patience", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads in all (0 = every core)")
    parser.add_argument("--jobs", type=int, default=1, help="combinations at once, the threads divided")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="accepted so that the commands recorded in docs/ still run: a sweep always resumes",
    )
    parser.add_argument(
        "--records", type=Path, default=RECORDS, help=f"folder for the records and table (default {RECORDS})"
    )
    args = parser.parse_args()
    records = args.records.resolve()
    if not args.table_only:
        if not args.grid:
            parser.error("--grid is required unless --table-only")
        axes = parse_grid(args.grid)
        for seed in args.seeds:
            run_grid(args.data, axes, seed, args, records)
            write_table(records)
    print(write_table(records).read_text())


if __name__ == "__main__":
    main()
