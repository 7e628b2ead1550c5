"""Warm start on Beauty: how many epochs a warm-started run needs to match a run from scratch.

Not a test (about an hour on a 2-core CPU). Three runs, seed 42, the paper's settings,
``--patience 20``, each trained into ``bench/results/warm-start/<name>/`` (not tracked):

    old      from scratch on "yesterday's" data (below): the model a service holds today
    scratch  from scratch on the full data
    warm     on the full data, warm-started from ``old/best.pt`` (``--init-from``)

"Yesterday's" data: every user's full sequence without its last 3 items, i.e. the
log as it stood 3 interactions per user ago. Under leave-one-out, the full data's
training part is ``seq[:-2]``; yesterday's training part is ``seq[:-5]``, the full
training part minus its last 3 items (yesterday's own validation and test targets,
``seq[-5]`` and ``seq[-4]``, are training items of the full data, so nothing of the
full data's validation or test targets is seen by the old model). Users whose
shortened sequence has fewer than 3 items (the split's minimum) are left out.
Yesterday's items are renumbered 0..N'-1 in order of first appearance, with
``items.json`` naming each by its full-data index as external id, so the warm start
must match rows by id, not by index; items that appear only in the last 3 events
of every user who has them are new to the old model.

Measured: the scratch run's best epoch (the first epoch at its best validation
NDCG@20), its score and training seconds up to it; the first warm epoch whose
validation NDCG@20 reaches that score, and its training seconds; the ratio of the
two epoch counts (goal: <= 0.25). Also, as a matched comparison, for several
fractions of the target score, the first epoch each run reaches it.

    python bench/warm_start.py --stage old --threads 1       # these two can run side by side
    python bench/warm_start.py --stage scratch --threads 1
    python bench/warm_start.py --stage warm --threads 1      # after `old` has finished
    python bench/warm_start.py --stage report                # JSON + markdown table

``--seed S`` (other than 42) trains the scratch and warm runs with seed S, into
``scratch-seedS`` and ``warm[-dropN]-seedS`` (the old model stays seed 42's: yesterday's
serving model is a given), and ``--stage report --seed S`` compares those two, writing
the record with ``-seedS`` in its name.

``--drop N`` (default 3) makes yesterday's data every sequence without its last N items:
``--drop 1`` is closer to a nightly run's change (and yesterday's test target is then
today's validation target: ranked once at the old run's end, never trained on nor used
to select its epoch). Its runs are ``old-drop1`` and
``warm-drop1`` and its record ``warm-start-beauty-drop1.json``; the scratch run (today's
data, which ``--drop`` does not change) is shared, and when its folder is gone (another
machine) the report takes its per-epoch curve from the ``--drop 3`` record.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import subprocess
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "beauty.txt"
RESULTS = ROOT / "bench" / "results" / "warm-start"
RECORD = ROOT / "docs" / "continuous-training" / "warm-start-beauty.json"
DROP = 3  # events per user that yesterday's data lacks
FRACTIONS = (0.9, 0.95, 0.98, 1.0)  # of the scratch run's best validation NDCG@20
METRIC = "valid_NDCG@20"


def make_old_data(full: Path, out_dir: Path, drop: int = DROP) -> Path:
    """Write yesterday's data (module docstring): ``sequences.txt`` and ``items.json``.

    Returns:
        The path of ``sequences.txt``.
    """
    from mqsa.training.sequences import MIN_LENGTH, read_sequences, write_sequences
    from mqsa.training.vocabulary import Vocabulary

    data = read_sequences(full)
    kept = [
        (u, s[:-drop])
        for u, s in zip(data.user_ids, data.sequences, strict=True)
        if len(s) - drop >= MIN_LENGTH
    ]
    order: dict[int, int] = {}
    for _, seq in kept:
        for item in seq.tolist():
            order.setdefault(item, len(order))
    remap = np.full(data.num_items, -1, dtype=np.int64)
    remap[list(order)] = list(order.values())
    out_dir.mkdir(parents=True, exist_ok=True)
    write_sequences(out_dir / "sequences.txt", [remap[s] for _, s in kept], [u for u, _ in kept])
    Vocabulary(str(item) for item in order).save(out_dir / "items.json")
    return out_dir / "sequences.txt"


def train_run(
    name: str,
    data: Path,
    threads: int,
    patience: int,
    init_from: Path | None,
    lr: float | None = None,
    epochs: int | None = None,
    decay_epochs: int | None = None,
    seed: int = 42,
) -> None:
    """Train one run into ``RESULTS/name`` (resumes it if it was stopped); ``lr`` None: the default."""
    from mqsa.training.trainer import TrainConfig, train

    out = RESULTS / name
    extra: dict = {"init_from": str(init_from)} if init_from is not None else {}
    if lr is not None:
        extra["lr"] = lr
    if epochs is not None:
        extra["epochs"] = epochs
    if decay_epochs is not None:
        extra.update(lr_schedule="cosine", lr_decay_epochs=decay_epochs)
    config = TrainConfig(patience=patience, threads=threads, device="cpu", seed=seed, **extra)
    resume = (out / "last.pt").exists()
    metrics = train(data, out, None, config, progress=False, resume=resume)
    print(f"{name}: best epoch {metrics['best_epoch']}, valid NDCG@20 {metrics['valid']['NDCG@20']:.4f}")


def run_names(drop: int) -> tuple[str, str]:
    """The old and warm runs' folders for yesterday's data without each user's last ``drop`` items."""
    suffix = "" if drop == DROP else f"-drop{drop}"
    return f"old{suffix}", f"warm{suffix}"


def record_path(drop: int) -> Path:
    return RECORD if drop == DROP else RECORD.with_name(f"warm-start-beauty-drop{drop}.json")


def history(name: str) -> list[dict[str, float]]:
    if name == "scratch" and not (RESULTS / name).exists():  # run on another machine: its recorded curve
        curve = json.loads(RECORD.read_text())["curves"]["scratch"]
        return [{"epoch": e, "seconds": s, **({METRIC: v} if v is not None else {})} for e, s, v in curve]
    with open(RESULTS / name / "history.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def first_reaching(rows: list[dict[str, float]], target: float) -> dict[str, float] | None:
    """The first epoch whose validation NDCG@20 is >= ``target``, with training seconds up to it."""
    seconds = 0.0
    for row in rows:
        seconds += row["seconds"]
        if row.get(METRIC, -1.0) >= target:
            return {"epoch": int(row["epoch"]), "train_seconds": seconds, METRIC: row[METRIC]}
    return None


def machine() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")]
    return names[0] if names else platform.processor()


def run_record(name: str) -> dict:
    """``metrics.json`` of a finished run; of one stopped before its end, what ``last.pt`` holds."""
    path = RESULTS / name / "metrics.json"
    if path.exists():
        return {**json.loads(path.read_text()), "finished": True}
    if name == "scratch" and not (RESULTS / name).exists():  # run on another machine: its record
        record = json.loads(RECORD.read_text())
        return {
            **record["runs"]["scratch"],
            "train_config": {"threads": record["threads"]},
            "from_record": str(RECORD),
        }
    import torch

    state = torch.load(RESULTS / name / "last.pt", map_location="cpu", weights_only=False)
    best = state["best"]
    return {
        "finished": False,
        "data": {},
        "train_config": state["fingerprint"]["train_config"],
        "best_epoch": best["epoch"],
        "epochs_run": state["epoch"],
        "valid": best["valid"],
        "test": best["test"],
        "seconds_per_epoch": state["train_seconds"] / state["epoch"],
        "train_seconds": state["train_seconds"],
        "warm_start": state.get("warm_start"),
    }


def initial_valid(old_name: str) -> dict[str, float]:
    """Validation metrics of the warm-started network before its first step (epoch 0)."""
    import tempfile

    from mqsa.training.evaluation import evaluate_model
    from mqsa.training.trainer import TrainConfig, Trainer
    from mqsa.training.warm_start import load_warm_start_checkpoint, warm_start

    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(DATA, out, None, TrainConfig(threads=1, device="cpu", seed=42), progress=False)
        old = load_warm_start_checkpoint(RESULTS / old_name / "best.pt")
        warm_start(trainer.model, old, trainer.data.vocab.item_ids, trainer.data.graph)
        return evaluate_model(trainer.model, trainer.data.eval_sets["valid"])


def report(drop: int = DROP, warm_name: str | None = None, seed_suffix: str = "") -> dict:
    """Compare the three runs; write the record of ``drop`` and print a markdown table."""
    old_name, default_warm = run_names(drop)
    names = {
        "old": old_name,
        "scratch": f"scratch{seed_suffix}",
        "warm": warm_name or default_warm + seed_suffix,
    }
    metrics = {role: run_record(name) for role, name in names.items()}
    rows = {role: history(name) for role, name in names.items()}
    target = metrics["scratch"]["valid"]["NDCG@20"]
    scratch_at = first_reaching(rows["scratch"], target)
    warm_at = first_reaching(rows["warm"], target)
    both = warm_at is not None and scratch_at is not None
    keys = (
        "finished",
        "data",
        "best_epoch",
        "epochs_run",
        "valid",
        "test",
        "seconds_per_epoch",
        "train_seconds",
    )
    result = {
        "data": str(DATA),
        "drop_last_events": drop,
        "run_folders": names,
        "machine": machine(),
        "threads": metrics["scratch"]["train_config"]["threads"],
        "target_valid_NDCG@20": target,
        "scratch": scratch_at,
        "warm": warm_at,
        "ratio_epochs": warm_at["epoch"] / scratch_at["epoch"] if both else None,
        "ratio_seconds": warm_at["train_seconds"] / scratch_at["train_seconds"] if both else None,
        "matched": {
            str(fr): {n: first_reaching(rows[n], fr * target) for n in ("scratch", "warm")}
            for fr in FRACTIONS
        },
        "old_train_seconds_to_best": first_reaching(rows["old"], metrics["old"]["valid"]["NDCG@20"]),
        "warm_start": metrics["warm"].get("warm_start"),
        "warm_epoch0_valid": initial_valid(old_name),
        "runs": {n: {k: m.get(k) for k in keys} for n, m in metrics.items()},
        "curves": {n: [(int(r["epoch"]), r["seconds"], r.get(METRIC)) for r in rows[n]] for n in rows},
    }
    record = record_path(drop)
    record = record.with_name(record.stem + seed_suffix + record.suffix)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    lines = [
        "| fraction of the scratch best valid NDCG@20 | target | scratch epoch (s) | warm epoch (s) | ratio |",
        "|---|---|---|---|---|",
    ]
    target = result["target_valid_NDCG@20"]
    for fr, runs in result["matched"].items():
        s, w = runs["scratch"], runs["warm"]
        shown = [f"{r['epoch']} ({r['train_seconds']:.0f})" if r else "never" for r in (s, w)]
        ratio = f"{w['epoch'] / s['epoch']:.3f}" if s and w else "-"
        lines.append(f"| {float(fr):.2f} | {float(fr) * target:.4f} | {shown[0]} | {shown[1]} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("old", "scratch", "warm", "report"), required=True)
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads per run (1: two runs side by side)"
    )
    parser.add_argument("--patience", type=int, default=20)
    parser.add_argument(
        "--lr", type=float, default=None, help="warm stage: its learning rate (default: TrainConfig's)"
    )
    parser.add_argument("--epochs", type=int, default=None, help="warm stage: stop after this many epochs")
    parser.add_argument(
        "--decay-epochs", type=int, default=None, help="warm stage: a cosine schedule over this many epochs"
    )
    parser.add_argument(
        "--name", default=None, help="warm stage and report: the warm run's folder (default warm[-dropN])"
    )
    parser.add_argument(
        "--drop",
        type=int,
        default=DROP,
        help=f"yesterday's data lacks each user's last N items (default {DROP})",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=42,
        help="scratch and warm stages: the run's seed; other than 42 adds -seedS to its folder "
        "(the old model stays seed 42's: yesterday's serving model is a given)",
    )
    args = parser.parse_args()
    old_name, warm_name = run_names(args.drop)
    suffix = "" if args.seed == 42 else f"-seed{args.seed}"
    if args.stage == "report":
        report(args.drop, args.name, suffix)
    elif args.stage == "old":
        old_data = RESULTS / f"{old_name}-data"
        train_run(old_name, make_old_data(DATA, old_data, args.drop), args.threads, args.patience, None)
    elif args.stage == "scratch":
        train_run(f"scratch{suffix}", DATA, args.threads, args.patience, None, seed=args.seed)
    else:
        old_best = RESULTS / old_name / "best.pt"
        name = args.name or warm_name + suffix
        train_run(
            name,
            DATA,
            args.threads,
            args.patience,
            old_best,
            args.lr,
            args.epochs,
            args.decay_epochs,
            args.seed,
        )


if __name__ == "__main__":
    main()
