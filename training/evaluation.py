"""Full-ranking evaluation (spec section 7) and the two baselines.

Every user is ranked against all N items; the items of the user's (cut)
training sequence are removed from the ranking, and the validation item too
for the test ranking. With one relevant item, HR@K = [rank < K] and
NDCG@K = [rank < K] / log2(rank + 2), rank counted from 0 as the number of
items scored strictly higher than the target.

Ranking is chunked over items (:func:`chunked_target_ranks`): a batch of users is
scored against ``ITEM_CHUNK`` items at a time and only the count of items above
each target is kept, so memory is O(users per batch x ITEM_CHUNK) plus the item
table, whatever the catalogue size (docs/scaling.md, "Evaluation at scale").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mqsa.errors import DataError
from mqsa.models.mqsa import MQSA
from mqsa.training.checkpoint import Checkpoint
from mqsa.training.sequences import LeaveOneOut, left_pad, read_sequences, split_leave_one_out
from mqsa.training.transitions import TransitionGraph

KS = (5, 10, 20)
# Items scored per step of a ranking. With the default 1024 users per batch a chunk of fp32
# scores is 8 MiB, which stays in the CPU's cache: on 2 cores a validation pass over 200,000
# items took 1.5 s with 2,048, 3.1 s with 8,192 and 4.8 s unchunked (docs/scaling.md). On a
# GPU it is still a few hundred small products per batch, far from the launch overhead.
ITEM_CHUNK = 2048


@dataclass
class BatchScores:
    """A batch of users' scores, produced a chunk of items at a time.

    Attributes:
        num_items: N, the items ranked.
        items: ``items(lo, hi)`` -> (B, hi - lo) float scores of items lo..hi-1.
        at: ``at(targets)`` -> (B,) each row's score of its own item ``targets[b]``
            (the same value ``items`` gives it).
    """

    num_items: int
    items: Callable[[int, int], torch.Tensor]
    at: Callable[[torch.Tensor], torch.Tensor]

    @classmethod
    def dense(cls, scores: torch.Tensor) -> BatchScores:
        """From a full (B, N) score matrix (the plain scorers' output)."""
        return cls(
            num_items=scores.shape[1],
            items=lambda lo, hi: scores[:, lo:hi],
            at=lambda targets: scores.gather(1, targets.to(scores.device)[:, None])[:, 0],
        )


# A batch of input sequences -> its scores: a full (B, N) matrix or BatchScores.
Scorer = Callable[[list[np.ndarray]], "torch.Tensor | BatchScores"]


@dataclass
class EvalSet:
    """One ranking task per user.

    Attributes:
        inputs: per user, the input items (oldest first, at most T).
        targets: (U,) the item to find.
        history: per user, the items removed from the ranking.
    """

    inputs: list[np.ndarray]
    targets: np.ndarray
    history: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.targets)


def sample_eval_set(eval_set: EvalSet, size: int, seed: int) -> EvalSet:
    """``size`` users of ``eval_set`` drawn without replacement (in their order), or all of it
    when ``size`` is 0 or not smaller; the same seed gives the same users."""
    if size == 0 or size >= len(eval_set):
        return eval_set
    users = np.sort(np.random.default_rng(seed).choice(len(eval_set), size, replace=False))
    return EvalSet(
        inputs=[eval_set.inputs[u] for u in users],
        targets=eval_set.targets[users],
        history=[eval_set.history[u] for u in users],
    )


def make_validation_set(split: LeaveOneOut, max_len: int) -> EvalSet:
    """Input = train (last T), target = the validation item, train items removed."""
    return EvalSet(inputs=[t[-max_len:] for t in split.train], targets=split.valid, history=split.train)


def make_test_set(split: LeaveOneOut, max_len: int) -> EvalSet:
    """Input = train + validation item (last T), target = the test item."""
    seen = [np.append(t, v) for t, v in zip(split.train, split.valid, strict=True)]
    return EvalSet(inputs=[s[-max_len:] for s in seen], targets=split.test, history=seen)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, history: list[np.ndarray]) -> torch.Tensor:
    """Rank of each target after removing the history items.

    Args:
        scores: (B, N) float on any device, modified in place (history set to -inf).
        targets: (B,) item indices.
        history: B arrays of item indices to remove.

    Returns:
        (B,) int64 ranks from 0 (best).
    """
    rows = np.repeat(np.arange(len(history)), [len(h) for h in history])
    cols = np.concatenate(history) if len(history) else np.empty(0, dtype=np.int64)
    device = scores.device
    scores[torch.from_numpy(rows).to(device), torch.from_numpy(cols).to(device)] = -torch.inf
    target_scores = scores.gather(1, targets.to(device)[:, None])  # (B, 1)
    return (scores > target_scores).sum(1, dtype=torch.int32).long()  # int32 sums run ~2x faster


def chunked_target_ranks(
    scores: BatchScores, targets: torch.Tensor, history: list[np.ndarray], item_chunk: int = ITEM_CHUNK
) -> torch.Tensor:
    """:func:`target_ranks` over ``item_chunk`` items at a time: the same ranks, bounded memory.

    A target among its own history scores -inf (as there), and the target's own
    column is never counted, so each rank is the number of non-history items
    scored strictly higher than the target.

    Args:
        scores: a batch's scores, read ``item_chunk`` columns at a time (not modified).
        targets: (B,) item indices, on the CPU.
        history: B arrays of item indices to remove.
        item_chunk: items per step; memory is O(B x item_chunk).

    Returns:
        (B,) int64 ranks from 0 (best), on the scores' device.
    """
    b = len(history)
    rows = np.repeat(np.arange(b), [len(h) for h in history])
    cols = np.concatenate(history).astype(np.int64) if b else np.empty(0, dtype=np.int64)
    order = np.argsort(cols, kind="stable")
    rows, cols = rows[order], cols[order]  # sorted by item: one slice per chunk
    target_np = targets.numpy()
    in_history = np.zeros(b, dtype=bool)
    in_history[rows[cols == target_np[rows]]] = True
    target_scores = scores.at(targets).float()
    device = target_scores.device
    target_scores[torch.from_numpy(in_history).to(device)] = -torch.inf
    targets_d, users_d = targets.to(device), torch.arange(b, device=device)
    counts = torch.zeros(b, dtype=torch.int64, device=device)
    for lo in range(0, scores.num_items, item_chunk):
        hi = min(lo + item_chunk, scores.num_items)
        chunk = scores.items(lo, hi).float().clone()  # (B, hi - lo), modified below
        a, z = np.searchsorted(cols, [lo, hi])
        chunk[
            torch.from_numpy(rows[a:z]).to(device), torch.from_numpy(cols[a:z] - lo).to(device)
        ] = -torch.inf
        here = (targets_d >= lo) & (targets_d < hi)
        chunk[users_d[here], targets_d[here] - lo] = -torch.inf  # the target never outranks itself
        counts += (chunk > target_scores[:, None]).sum(1, dtype=torch.int32)  # int32 sums run ~2x faster
    return counts


def metrics_from_ranks(ranks: np.ndarray | torch.Tensor, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """HR@K and NDCG@K averaged over users, from 0-based ranks."""
    ranks = torch.as_tensor(ranks, dtype=torch.float64)
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks < k
        out[f"HR@{k}"] = hit.double().mean().item()
        out[f"NDCG@{k}"] = torch.where(hit, 1.0 / torch.log2(ranks + 2), 0.0).mean().item()
    return out


def evaluate_scores(
    score_fn: Scorer, eval_set: EvalSet, batch_size: int = 1024, item_chunk: int = ITEM_CHUNK
) -> dict[str, float]:
    """Full-ranking metrics for any scorer: a batch of input sequences -> (B, N) scores or
    :class:`BatchScores` (ranked ``item_chunk`` items at a time; :func:`chunked_target_ranks`).

    Users are batched in order of input length, so a batch of short sequences
    is not padded to a long one's width (most are short). Scorers must not
    depend on the amount of left padding; the model's positions are
    right-aligned, so it does not.
    """
    order = np.argsort([len(s) for s in eval_set.inputs], kind="stable")
    ranks = torch.empty(len(eval_set), dtype=torch.int64)
    for start in range(0, len(eval_set), batch_size):
        users = order[start : start + batch_size]
        scores = score_fn([eval_set.inputs[u] for u in users])
        if isinstance(scores, torch.Tensor):
            scores = BatchScores.dense(scores)
        targets = torch.from_numpy(eval_set.targets[users].astype(np.int64))
        history = [eval_set.history[u] for u in users]
        ranks[torch.from_numpy(users)] = chunked_target_ranks(scores, targets, history, item_chunk).cpu()
    return metrics_from_ranks(ranks)


def model_scorer(model: MQSA) -> Callable[[list[np.ndarray]], torch.Tensor]:
    """Scores every item by z . E_j with z the blended last-slot vector."""
    cfg = model.config
    device = model.item_embeddings().device

    @torch.no_grad()
    def score(inputs: list[np.ndarray]) -> torch.Tensor:
        width = max(len(s) for s in inputs)
        batch = torch.from_numpy(left_pad(inputs, width, cfg.padding_idx)).to(device)  # (B, T')
        short, long = model.encode(batch)  # (B, D) each
        return model.blend(short, long) @ model.item_embeddings().T  # (B, N)

    return score


def model_chunk_scorer(model: MQSA) -> Callable[[list[np.ndarray]], BatchScores]:
    """:func:`model_scorer` a chunk of items at a time: z . E[lo:hi]."""
    cfg = model.config

    @torch.no_grad()
    def score(inputs: list[np.ndarray]) -> BatchScores:
        table = model.item_embeddings().detach()  # (N, D)
        width = max(len(s) for s in inputs)
        batch = torch.from_numpy(left_pad(inputs, width, cfg.padding_idx)).to(table.device)  # (B, T')
        z = model.blend(*model.encode(batch)).detach()  # (B, D)

        def at(targets: torch.Tensor) -> torch.Tensor:
            # The diagonal of the same kind of product as the chunks', so the target's own
            # score is computed the way its chunk computes it.
            return (z @ table[targets.to(table.device)].T).diagonal()

        return BatchScores(len(table), lambda lo, hi: z @ table[lo:hi].T, at)

    return score


def evaluate_model(
    model: MQSA, eval_set: EvalSet, batch_size: int = 1024, item_chunk: int = ITEM_CHUNK
) -> dict[str, float]:
    """The spec's full-ranking metrics for a model (switched to eval mode and back)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return evaluate_scores(model_chunk_scorer(model), eval_set, batch_size, item_chunk)
    finally:
        model.train(was_training)


def popularity(train: list[np.ndarray], num_items: int) -> np.ndarray:
    """(N,) how often each item occurs in the training sequences."""
    return np.bincount(np.concatenate(train), minlength=num_items).astype(np.float64)


def popularity_scorer(counts: np.ndarray) -> Callable[[list[np.ndarray]], torch.Tensor]:
    """The popularity baseline: the same score vector for every user."""
    scores = torch.from_numpy(counts).float()

    def score(inputs: list[np.ndarray]) -> torch.Tensor:
        return scores.expand(len(inputs), -1).clone()

    return score


def transition_scorer(
    graph: TransitionGraph, counts: np.ndarray
) -> Callable[[list[np.ndarray]], torch.Tensor]:
    """The Item Transition baseline: A[last item, :], ties broken by popularity."""
    tiebreak = torch.from_numpy(counts / (counts.max() + 1.0)).float()  # in [0, 1)

    def score(inputs: list[np.ndarray]) -> torch.Tensor:
        scores = tiebreak.expand(len(inputs), -1).clone()
        for b, seq in enumerate(inputs):
            cols, row_counts = graph.row(int(seq[-1]))
            scores[b, torch.from_numpy(cols)] += torch.from_numpy(row_counts)
        return scores

    return score


def popularity_ranks(counts: np.ndarray, eval_set: EvalSet) -> np.ndarray:
    """The popularity baseline's ranks without scoring a user against the catalogue.

    Every user sees the same scores, so a target's rank is the number of items
    more popular than it, less those of its (distinct) history; a target in its
    own history scores -inf and is outranked by every item not in the history.
    The same ranks as ranking :func:`popularity_scorer`'s scores, in O(N log N + history).
    """
    return _ranks_without_scoring(counts.astype(np.float32), None, eval_set)  # the scorer's values


def transition_ranks(graph: TransitionGraph, counts: np.ndarray, eval_set: EvalSet) -> np.ndarray:
    """The Item Transition baseline's ranks without scoring a user against the catalogue.

    Its scores (:func:`transition_scorer`) are the popularity tie-break everywhere plus
    the transition counts on the last input item's row, a few entries. So a target's
    rank is counted as Popularity's is, with the row's entries at their real score.
    The same float32 sums and the same ranks as ranking the scorer's scores, in
    O(N log N) once and O(row + history) a user.
    """
    tiebreak = (counts / (counts.max() + 1.0)).astype(np.float32)  # the scorer's values
    return _ranks_without_scoring(tiebreak, graph, eval_set)


def _ranks_without_scoring(base: np.ndarray, graph: TransitionGraph | None, eval_set: EvalSet) -> np.ndarray:
    """Ranks under scores that are ``base`` (N,) float32 for every user, plus, with a graph,
    the transition counts on the row of the user's last input item.

    A target's rank is the number of items whose base score beats its score (one sorted
    vector), corrected on the row's entries (counted at their real score instead), less
    the (distinct) history items that beat it; a target in its own history scores -inf and
    is outranked by every item not in the history.
    """
    ordered = np.sort(base)
    no_row = (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32))
    ranks = np.empty(len(eval_set), dtype=np.int64)
    for u, (inputs, target, history) in enumerate(
        zip(eval_set.inputs, eval_set.targets, eval_set.history, strict=True)
    ):
        seen = np.unique(history)
        if np.any(seen == target):
            ranks[u] = len(base) - len(seen)
            continue
        cols, vals = no_row if graph is None else graph.row(int(inputs[-1]))  # columns sorted
        row_scores = base[cols] + vals  # (row,) float32
        where = np.searchsorted(cols, target)
        hit = where < len(cols) and cols[min(where, len(cols) - 1)] == target
        score = row_scores[where] if hit else base[target]
        above = len(ordered) - np.searchsorted(ordered, score, side="right")
        above += int(np.count_nonzero(row_scores > score)) - int(np.count_nonzero(base[cols] > score))
        at = np.minimum(np.searchsorted(cols, seen), max(len(cols) - 1, 0))
        seen_scores = base[seen]
        in_row = cols[at] == seen if len(cols) else np.zeros(len(seen), dtype=bool)
        seen_scores[in_row] = row_scores[at[in_row]]
        ranks[u] = above - int(np.count_nonzero(seen_scores > score))
    return ranks


def baseline_metrics(
    split: LeaveOneOut, graph: TransitionGraph, eval_sets: dict[str, EvalSet]
) -> dict[str, dict[str, dict[str, float]]]:
    """Popularity and Item Transition metrics on each evaluation set.

    Neither needs a scoring pass over the catalogue (:func:`popularity_ranks`,
    :func:`transition_ranks`): their cost grows with the users, not users x items.
    """
    counts = popularity(split.train, graph.num_items)
    return {
        "Popularity": {
            name: metrics_from_ranks(popularity_ranks(counts, es)) for name, es in eval_sets.items()
        },
        "ItemTransition": {
            name: metrics_from_ranks(transition_ranks(graph, counts, es)) for name, es in eval_sets.items()
        },
    }


def evaluate_checkpoint(checkpoint: str | Path, data_path: str | Path) -> dict[str, Any]:
    """Full-ranking metrics of a saved checkpoint on its data's validation and test splits.

    Returns:
        ``{"checkpoint", "best_epoch", "valid", "test", "baselines"}``.

    Raises:
        DataError: a bad checkpoint or data file, or data with more items than the checkpoint knows.
    """
    ckpt = Checkpoint.load(checkpoint)
    model = ckpt.build_model()
    cfg = model.config
    data = read_sequences(data_path)
    if data.num_items > cfg.num_items:
        raise DataError(
            f"the data uses {data.num_items} items but the checkpoint knows {cfg.num_items}", data_path
        )
    split = split_leave_one_out(data.sequences, cfg.max_len)
    graph = TransitionGraph.from_sequences(split.train, cfg.num_items, ckpt.train_config.get("time_span", 1))
    eval_sets = {"valid": make_validation_set(split, cfg.max_len), "test": make_test_set(split, cfg.max_len)}
    return {
        "checkpoint": str(checkpoint),
        "best_epoch": ckpt.best.epoch,
        "valid": evaluate_model(model, eval_sets["valid"]),
        "test": evaluate_model(model, eval_sets["test"]),
        "baselines": baseline_metrics(split, graph, eval_sets),
    }
