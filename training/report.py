"""What the trainer shows and writes: progress bars, per-epoch CSV, curves, results table."""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mqsa.training.checkpoint import SELECT_METRIC

METRIC_COLUMNS = ("HR@5", "NDCG@5", "HR@10", "NDCG@10", "HR@20", "NDCG@20")
SELECTED = f"valid_{SELECT_METRIC}"  # the history column the epoch is chosen by


def progress_bar(items: Iterable, desc: str, enabled: bool) -> tqdm:
    """A per-epoch bar on stderr that disappears when the epoch ends."""
    return tqdm(items, desc=desc, disable=not enabled, leave=False, file=sys.stderr, dynamic_ncols=True)


def epoch_line(row: dict[str, float], is_best: bool, enabled: bool) -> None:
    """One line per epoch: losses, time, validation NDCG@20 when evaluated."""
    if not enabled:
        return
    line = (
        f"epoch {row['epoch']:>4}  loss {row['loss']:.4f}  rec {row['rec']:.4f}  "
        f"kd {row['kd']:.4f}  {row['seconds']:.1f}s"
    )
    if SELECTED in row:
        line += f"  valid {SELECT_METRIC} {row[SELECTED]:.4f}" + ("  *best" if is_best else "")
    print(line, flush=True)


def write_history(history: list[dict[str, float]], path: Path) -> None:
    """Per-epoch CSV; epochs without evaluation leave the metric columns empty."""
    columns: list[str] = []
    for row in history:
        columns += [c for c in row if c not in columns]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)


def plot_curves(history: list[dict[str, float]], path: Path) -> None:
    """PNG: training losses by epoch (left), validation NDCG@20 by epoch (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("loss", "rec", "kd"):
        left.plot(epochs, [r[key] for r in history], label=key)
    left.set(xlabel="epoch", ylabel="training loss", title="Losses")
    left.legend()
    evaluated = [r for r in history if SELECTED in r]
    right.plot([r["epoch"] for r in evaluated], [r[SELECTED] for r in evaluated], marker=".")
    right.set(xlabel="epoch", ylabel=SELECT_METRIC, title=f"Validation {SELECT_METRIC}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown_table(rows: list[tuple[str, dict[str, float]]]) -> str:
    """A markdown table of named metric rows."""
    lines = ["| model | " + " | ".join(METRIC_COLUMNS) + " |", "|---" * (len(METRIC_COLUMNS) + 1) + "|"]
    for name, metrics in rows:
        lines.append(
            f"| {name} | " + " | ".join(f"{metrics.get(c, float('nan')):.4f}" for c in METRIC_COLUMNS) + " |"
        )
    return "\n".join(lines)


def results_table(metrics: dict[str, Any], split: str = "test") -> str:
    """The final table: the model's best epoch beside the baselines."""
    rows = [(f"MQSA (epoch {metrics['best_epoch']})", metrics[split])]
    rows += [(name, by_split[split]) for name, by_split in metrics["baselines"].items()]
    return f"\n{split} metrics (full ranking)\n" + markdown_table(rows) + "\n"
