"""A time-based holdout that scores models as production would serve them.

Every event at or after the cut (``--holdout-since``) is a target. Its context is
what the service would hold for that user at that moment: all of the user's
earlier events (before the cut, and earlier holdout events), oldest first. Each
model drops the context items it does not know (as ``/recommend`` does), keeps the
last T, ranks all of its items, and removes the user's earlier items from the
ranking (``exclude_seen``, the service's default): so a repeated target is a miss.

Every model is scored on the same events, so two models (a candidate and the
serving model) can be compared:

* an event is **scored** when each model knows at least one item of its context
  (else the service would answer its popular fallback, not the model); the others
  are counted as ``skipped_no_context``;
* a scored event whose target a model does not know is a **miss** for that model
  (it could not have recommended it); how many is reported per model as
  ``unknown_targets``.

The baselines, Popularity and Item Transition, are fitted on the events before the
cut only and rank the first model's items. A bundle is scored by the service's own
code (``mqsa.service.retrieval``: the ONNX encoder, the alpha blend, a FAISS search
with the history excluded), so an approximate index is measured as it serves; a
checkpoint is scored with torch by full ranking (as ``mqsa evaluate --data``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mqsa.errors import ConfigError, DataError
from mqsa.training.evaluation import (
    KS,
    metrics_from_ranks,
    model_scorer,
    popularity,
    popularity_scorer,
    target_ranks,
    transition_scorer,
)
from mqsa.training.prepare import parse_time, read_log
from mqsa.training.transitions import TransitionGraph

DEPTH = max(KS)  # ranks at or past this count as misses for every metric
MISS = np.iinfo(np.int32).max
BATCH = 512
SKIPPABLE_ROWS = 0.01  # as `mqsa data prepare`: a few bad rows in a log do not stop the evaluation


@dataclass
class Holdout:
    """The log, users' events in time order, and which of them are targets.

    Attributes:
        cut: seconds; events at or after it are targets.
        item_ids: (I,) the log's external item ids; ``items`` holds codes into it.
        items: (M,) item codes, user by user, oldest first (ties keep the file's order).
        starts: (U + 1,) user u's events are ``items[starts[u]:starts[u + 1]]``.
        positions: (E,) where in ``items`` each target event is.
        users: (E,) the user of each target event.
    """

    cut: float
    item_ids: np.ndarray
    items: np.ndarray
    starts: np.ndarray
    positions: np.ndarray
    users: np.ndarray

    def before_cut(self) -> list[np.ndarray]:
        """Per user, the item codes of the events before the cut."""
        firsts = np.full(len(self.starts) - 1, -1, dtype=np.int64)
        firsts[self.users[::-1]] = self.positions[::-1]  # the first target of each user
        ends = np.where(firsts >= 0, firsts, self.starts[1:])
        return [self.items[s:e] for s, e in zip(self.starts[:-1], ends, strict=True)]


def utc(seconds: float) -> str:
    """Seconds since the epoch as an ISO-8601 UTC time (as given, when out of range)."""
    try:
        return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return f"{seconds:g} s"


def make_holdout(frame: pd.DataFrame, cut: float, where: str | Path = "the log") -> Holdout:
    """Order a log (``read_log``'s frame) user by user and in time, and mark the targets.

    Raises:
        DataError: no event at or after the cut, or none before it.
    """
    user_codes, _ = pd.factorize(frame["user_id"])
    item_codes, item_ids = pd.factorize(frame["item_id"])
    times = frame["timestamp"].to_numpy(dtype=float)
    order = np.lexsort((times, user_codes))  # stable: ties keep the file's order
    users = user_codes[order]
    targets = np.flatnonzero(times[order] >= cut)
    shown = utc(cut)
    if len(targets) == 0:
        newest = utc(times.max())
        raise DataError(f"no event at or after the holdout cut {shown} (the newest is {newest})", where)
    if len(targets) == len(times):
        raise DataError(f"no event before the holdout cut {shown}: nothing to fit the baselines on", where)
    counts = np.bincount(users, minlength=users.max() + 1)
    return Holdout(
        cut=cut,
        item_ids=np.asarray(item_ids, dtype=object),
        items=item_codes[order].astype(np.int64),
        starts=np.concatenate([[0], np.cumsum(counts)]),
        positions=targets,
        users=users[targets],
    )


def read_holdout(log: str | Path, since: str, context: str | None = None) -> Holdout:
    """A raw log (CSV, Parquet, or an event archive: what ``read_log`` reads) cut at ``since``:
    unix seconds, an ISO-8601 date or time, or a span before the newest event (``7d``, ``12h``).

    ``context`` (the same forms, a span counted back from now) drops the events before it:
    users' contexts and the baselines then come from that window only, and of an archive
    only its days are read, so memory stays bounded as the archive grows.
    """
    lower = None if context is None else parse_time(context, name="--holdout-context")
    frame = read_log(log, max_skipped_fraction=SKIPPABLE_ROWS, since=lower).frame
    cut = parse_time(since, relative_to=float(frame["timestamp"].max()), name="--holdout-since")
    return make_holdout(frame, cut, log)


Ranker = Callable[[list[np.ndarray], np.ndarray, list[np.ndarray]], np.ndarray]


@dataclass
class Scorer:
    """One model as the holdout sees it.

    Attributes:
        label: its column in the tables.
        item_ids: item_idx -> external item id.
        max_len: T, the most context items it reads.
        rank: (inputs: B arrays of item_idx, targets (B,), history: B arrays to remove)
            -> (B,) 0-based ranks of the targets (``MISS`` past the search depth).
        info: what it is (kind, path, model version), for the report.
    """

    label: str
    item_ids: Sequence[str]
    max_len: int
    rank: Ranker
    info: dict[str, Any]


def score_fn_ranker(score: Callable[[list[np.ndarray]], torch.Tensor]) -> Ranker:
    """Full ranking by a scorer that gives (B, N) scores (the model, the baselines)."""

    def rank(inputs: list[np.ndarray], targets: np.ndarray, history: list[np.ndarray]) -> np.ndarray:
        scores = score(inputs).float()
        return target_ranks(scores, torch.from_numpy(targets), history).cpu().numpy()

    return rank


def checkpoint_scorer(path: str | Path, label: str) -> Scorer:
    """A checkpoint, ranked by torch over all its items."""
    from mqsa.training.checkpoint import Checkpoint

    ckpt = Checkpoint.load(path)
    model = ckpt.build_model()
    if ckpt.item_ids is None or len(ckpt.item_ids) != model.config.num_items:
        raise DataError("the checkpoint has no item vocabulary of the right size", path)
    info = {"kind": "checkpoint", "path": str(path), "epoch": ckpt.best.epoch}
    return Scorer(label, ckpt.item_ids, model.config.max_len, score_fn_ranker(model_scorer(model)), info)


def bundle_scorer(path: str | Path, label: str) -> Scorer:
    """A serving bundle, loaded and searched by the service's own code."""
    from mqsa.service.bundle import load_bundle
    from mqsa.service.retrieval import encode_histories, search

    key = os.environ.get("MQSA_BUNDLE_HMAC_KEY") or None
    threads = min(4, os.cpu_count() or 1)
    bundle = load_bundle(path, onnx_threads=threads, faiss_threads=threads, hmac_key=key)

    def rank(inputs: list[np.ndarray], targets: np.ndarray, history: list[np.ndarray]) -> np.ndarray:
        queries = encode_histories(bundle, [i.tolist() for i in inputs])  # (B, d)
        out = np.full(len(targets), MISS, dtype=np.int64)
        for b, target in enumerate(targets.tolist()):
            found = [i for i, _ in search(bundle, queries[b : b + 1], DEPTH, None, history[b])]
            out[b] = found.index(target) if target in found else MISS
        return out

    info = {"kind": "bundle", "path": str(path), "model_version": bundle.model_version}
    return Scorer(label, bundle.item_ids, bundle.max_len, rank, info)


def load_scorer(path: str | Path, label: str | None = None) -> Scorer:
    """A bundle directory or a checkpoint file, by what ``path`` is.

    Raises:
        DataError: neither exists; BundleError: a directory that is not a usable bundle.
    """
    path = Path(path)
    label = label or str(path)
    if path.is_dir():
        return bundle_scorer(path, label)
    if path.is_file():
        return checkpoint_scorer(path, label)
    raise DataError("no such checkpoint file or bundle directory", path)


def codes_to_index(holdout: Holdout, item_ids: Sequence[str]) -> np.ndarray:
    """(I,) each log item's index in a model's vocabulary, -1 where the model does not know it."""
    index = {item_id: i for i, item_id in enumerate(item_ids)}
    return np.fromiter(
        (index.get(i, -1) for i in holdout.item_ids), dtype=np.int64, count=len(holdout.item_ids)
    )


def has_context(holdout: Holdout, known: np.ndarray) -> np.ndarray:
    """(E,) whether each target event has an earlier item of the same user the model knows."""
    seen = np.concatenate([[0], np.cumsum(known[holdout.items] >= 0)])
    return seen[holdout.positions] > seen[holdout.starts[holdout.users]]


def event_ranks(holdout: Holdout, events: np.ndarray, known: np.ndarray, scorer: Scorer) -> np.ndarray:
    """(len(events),) the rank of each event's target by one model (``MISS`` for an unknown target).

    Args:
        events: indices into ``holdout.positions`` (each with some context the model knows).
        known: ``codes_to_index`` for the model.
    """
    ranks = np.full(len(events), MISS, dtype=np.int64)
    positions = holdout.positions[events]
    starts = holdout.starts[holdout.users[events]]
    targets = known[holdout.items[positions]]
    rankable = np.flatnonzero(targets >= 0)
    rankable = rankable[np.argsort(positions[rankable] - starts[rankable], kind="stable")]  # short first
    for lo in range(0, len(rankable), BATCH):
        batch = rankable[lo : lo + BATCH]
        history = [known[holdout.items[starts[e] : positions[e]]] for e in batch]
        history = [h[h >= 0] for h in history]
        inputs = [h[-scorer.max_len :] for h in history]
        seen = [np.unique(h) for h in history]
        ranked = scorer.rank(inputs, targets[batch], seen)
        repeat = np.array([t in s for t, s in zip(targets[batch].tolist(), seen, strict=True)], dtype=bool)
        ranks[batch] = np.where(repeat, MISS, ranked)  # an item already seen is never recommended
    return ranks


def baseline_scorers(holdout: Holdout, reference: Scorer) -> list[Scorer]:
    """Popularity and Item Transition, fitted on the events before the cut, over ``reference``'s items."""
    known = codes_to_index(holdout, reference.item_ids)
    sequences = [s[s >= 0] for s in (known[seq] for seq in holdout.before_cut())]
    num_items = len(reference.item_ids)
    counts = popularity([np.empty(0, np.int64), *sequences], num_items)
    graph = TransitionGraph.from_sequences(sequences, num_items, 1)
    fitted = {"kind": "baseline", "fitted_on": "events before the cut", "items_of": reference.label}
    return [
        Scorer("Popularity", reference.item_ids, 1, score_fn_ranker(popularity_scorer(counts)), fitted),
        Scorer(
            "ItemTransition",
            reference.item_ids,
            1,
            score_fn_ranker(transition_scorer(graph, counts)),
            fitted,
        ),
    ]


def evaluate_holdout(holdout: Holdout, scorers: list[Scorer], baselines: bool = True) -> dict[str, Any]:
    """HR/NDCG@5/10/20 of every scorer (and the baselines) on the same holdout events.

    Returns:
        ``{"holdout": {cut, events, scored, skipped_no_context}, "models": {label: {...}},
        "baselines": {name: {...}}}``; each entry has ``metrics``, ``unknown_targets`` and ``info``.
    """
    maps = [codes_to_index(holdout, s.item_ids) for s in scorers]
    scored = np.ones(len(holdout.positions), dtype=bool)
    for known in maps:
        scored &= has_context(holdout, known)
    events = np.flatnonzero(scored)
    results: dict[str, Any] = {"models": {}, "baselines": {}}
    extra = baseline_scorers(holdout, scorers[0]) if baselines else []
    for group, scorer, known in [
        *(("models", s, k) for s, k in zip(scorers, maps, strict=True)),
        *(("baselines", b, maps[0]) for b in extra),
    ]:
        ranks = event_ranks(holdout, events, known, scorer) if len(events) else np.empty(0, np.int64)
        results[group][scorer.label] = {
            "metrics": metrics_from_ranks(ranks) if len(events) else {},
            "unknown_targets": int((known[holdout.items[holdout.positions[events]]] < 0).sum()),
            "info": scorer.info,
        }
    results["holdout"] = {
        "cut": holdout.cut,
        "cut_utc": utc(holdout.cut),
        "events": len(holdout.positions),
        "scored": len(events),
        "skipped_no_context": len(holdout.positions) - len(events),
    }
    return results


def evaluate_on_holdout(
    log: str | Path,
    since: str,
    models: Sequence[str | Path],
    labels: Sequence[str] | None = None,
    context: str | None = None,
) -> dict[str, Any]:
    """``mqsa evaluate --holdout LOG --holdout-since T A [B ...]``: models side by side on one holdout.

    Raises:
        DataError, BundleError, ConfigError: a bad log, model or cut (one line each).
    """
    if not models:
        raise ConfigError("name at least one checkpoint or bundle to evaluate on the holdout")
    labels = list(labels) if labels else [str(m) for m in models]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"each model needs its own label, got {labels}")
    scorers = [load_scorer(m, label) for m, label in zip(models, labels, strict=True)]  # fail fast
    holdout = read_holdout(log, since, context)
    result = evaluate_holdout(holdout, scorers)
    result["holdout"]["log"] = str(log)
    return result


def holdout_table(result: dict[str, Any]) -> str:
    """The models and the baselines side by side: a markdown table, with the event counts."""
    from mqsa.training.report import markdown_table

    h = result["holdout"]
    rows = [*result["models"].items(), *result["baselines"].items()]
    unknown = ", ".join(f"{name} {entry['unknown_targets']}" for name, entry in rows)
    head = (
        f"\nholdout since {h['cut_utc']}: {h['events']} events, {h['scored']} scored, "
        f"{h['skipped_no_context']} skipped (no known context); unknown targets (misses): {unknown}\n"
    )
    return head + markdown_table([(name, entry["metrics"]) for name, entry in rows]) + "\n"
