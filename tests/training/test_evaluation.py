from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mqsa.training.evaluation import (
    BatchScores,
    EvalSet,
    chunked_target_ranks,
    evaluate_scores,
    make_test_set,
    make_validation_set,
    metrics_from_ranks,
    popularity,
    popularity_ranks,
    popularity_scorer,
    sample_eval_set,
    target_ranks,
    transition_ranks,
    transition_scorer,
)
from mqsa.training.sequences import split_leave_one_out
from mqsa.training.transitions import TransitionGraph


def arrays(*rows: list[int]) -> list[np.ndarray]:
    return [np.array(r, dtype=np.int64) for r in rows]


# ---------------------------------------------------------------- metrics


def test_metrics_from_hand_computed_ranks() -> None:
    m = metrics_from_ranks(np.array([0, 3, 7, 15, 30]))
    assert set(m) == {"HR@5", "NDCG@5", "HR@10", "NDCG@10", "HR@20", "NDCG@20"}
    assert m["HR@5"] == pytest.approx(2 / 5)
    assert m["NDCG@5"] == pytest.approx((1 + 1 / math.log2(5)) / 5)
    assert m["HR@10"] == pytest.approx(3 / 5)
    assert m["NDCG@10"] == pytest.approx((1 + 1 / math.log2(5) + 1 / math.log2(9)) / 5)
    assert m["HR@20"] == pytest.approx(4 / 5)
    assert m["NDCG@20"] == pytest.approx((1 + 1 / math.log2(5) + 1 / math.log2(9) + 1 / math.log2(17)) / 5)


def test_metrics_boundaries_and_custom_ks() -> None:
    """Rank K-1 is a hit at K, rank K is not."""
    m = metrics_from_ranks(torch.tensor([4, 5]), ks=(5, 6))
    assert m == pytest.approx(
        {
            "HR@5": 0.5,
            "NDCG@5": 0.5 / math.log2(6),
            "HR@6": 1.0,
            "NDCG@6": (1 / math.log2(6) + 1 / math.log2(7)) / 2,
        }
    )
    assert metrics_from_ranks(np.zeros(3, dtype=np.int64))["NDCG@20"] == pytest.approx(1.0)


# ---------------------------------------------------------------- ranks


def test_target_ranks_remove_history() -> None:
    scores = torch.tensor(
        [
            [5.0, 4.0, 3.0, 2.0, 1.0, 0.0],  # target 3; items 0, 1, 2 above it, 0 is history
            [1.0, 1.0, 1.0, 0.0, 2.0, 2.0],  # target 0; ties do not count; 4 is history, 5 is not
            [0.0, 9.0, 8.0, 7.0, 6.0, 5.0],  # target 0 is last, all others are history
        ]
    )
    targets = torch.tensor([3, 0, 0])
    history = arrays([0], [4], [1, 2, 3, 4, 5])
    ranks = target_ranks(scores.clone(), targets, history)
    assert ranks.tolist() == [2, 1, 0]
    assert target_ranks(scores.clone(), targets, arrays([], [], [])).tolist() == [3, 2, 5]


def test_target_ranks_match_brute_force() -> None:
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (20, 15), generator=gen).float()  # many ties
    targets = torch.randint(0, 15, (20,), generator=gen)
    rng = np.random.default_rng(0)
    history = []
    for t in targets.tolist():
        others = np.setdiff1d(np.arange(15), [t])
        history.append(rng.choice(others, size=rng.integers(0, 8), replace=False))
    expected = [
        sum(1 for j in range(15) if j not in set(h.tolist()) and scores[b, j] > scores[b, t])
        for b, (t, h) in enumerate(zip(targets.tolist(), history, strict=True))
    ]
    assert target_ranks(scores.clone(), targets, history).tolist() == expected


# ---------------------------------------------------------------- evaluation sets


def tiny_split(max_len: int):
    sequences = arrays([0, 1, 2, 3, 4, 5, 6], [7, 8, 9])
    return split_leave_one_out(sequences, max_len)


def test_validation_set() -> None:
    es = make_validation_set(tiny_split(max_len=3), max_len=3)
    assert len(es) == 2
    assert [s.tolist() for s in es.inputs] == [[2, 3, 4], [7]]
    assert es.targets.tolist() == [5, 8]
    assert [h.tolist() for h in es.history] == [[2, 3, 4], [7]]  # the cut training sequence


def test_test_set_includes_validation_item() -> None:
    es = make_test_set(tiny_split(max_len=3), max_len=3)
    assert [s.tolist() for s in es.inputs] == [[3, 4, 5], [7, 8]]  # cut to max_len
    assert es.targets.tolist() == [6, 9]
    assert [h.tolist() for h in es.history] == [[2, 3, 4, 5], [7, 8]]  # cut train + validation item


@pytest.mark.parametrize("item_chunk", [1, 3, 7, 40, 1000])
def test_chunked_ranks_equal_the_dense_ranks_with_ties(item_chunk: int) -> None:
    """Random integer scores (many ties), histories with repeats and targets among them."""
    gen = np.random.default_rng(0)
    b, n = 50, 40
    scores = torch.from_numpy(gen.integers(0, 6, size=(b, n)).astype(np.float32))
    targets = torch.from_numpy(gen.integers(0, n, size=b))
    history = [gen.integers(0, n, size=gen.integers(0, 12)) for _ in range(b)]
    history[0] = np.append(history[0], targets[0].item())  # a target in its own history
    expected = target_ranks(scores.clone(), targets, history)
    chunked = chunked_target_ranks(BatchScores.dense(scores.clone()), targets, history, item_chunk)
    assert chunked.tolist() == expected.tolist()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_baselines_rank_without_scoring_like_the_dense_scorers(seed: int) -> None:
    """Item Transition and Popularity without a scoring pass: the dense scorers' ranks, ties,
    targets in their own history and last items with no successor included."""
    gen = np.random.default_rng(seed)
    n = 30
    train = [gen.integers(0, n, size=gen.integers(2, 15)) for _ in range(80)]
    train = [np.where(t == n - 1, 0, t) for t in train]
    train[0] = np.append(train[0], n - 1)  # n - 1 occurs once, last: no successor
    graph = TransitionGraph.from_sequences(train, n)
    counts = popularity(train, n)
    es = EvalSet(inputs=train, targets=gen.integers(0, n, size=80), history=train)
    targets = torch.from_numpy(es.targets)
    dense = transition_scorer(graph, counts)(es.inputs)
    expected = target_ranks(dense, targets, es.history)
    assert graph.row(n - 1)[0].size == 0  # user 0's last item has no successor
    assert any(t in h for t, h in zip(es.targets, es.history, strict=True))
    assert transition_ranks(graph, counts, es).tolist() == expected.tolist()
    expected = target_ranks(popularity_scorer(counts)(es.inputs), targets, es.history)
    assert popularity_ranks(counts, es).tolist() == expected.tolist()


def test_validation_sample_is_fixed_by_the_seed() -> None:
    es = EvalSet(inputs=arrays(*[[i] for i in range(20)]), targets=np.arange(20), history=arrays(*[[]] * 20))
    a, b = sample_eval_set(es, 5, seed=3), sample_eval_set(es, 5, seed=3)
    assert len(a) == 5 and a.targets.tolist() == b.targets.tolist() == sorted(set(a.targets.tolist()))
    assert [s.tolist() for s in a.inputs] == [[t] for t in a.targets.tolist()]  # rows stay together
    assert sample_eval_set(es, 0, seed=3) is es and sample_eval_set(es, 20, seed=3) is es


# ---------------------------------------------------------------- baselines


def test_transition_scorer_ranks_most_frequent_successor_first() -> None:
    train = arrays([0, 1, 0, 1, 0, 2], [3, 3, 3, 3, 2])
    graph = TransitionGraph.from_sequences(train, 5)
    counts = popularity(train, 5)
    assert counts.tolist() == [3, 2, 2, 4, 0]
    score = transition_scorer(graph, counts)
    scores = score(arrays([4, 0], [1], [3, 4]))
    assert scores.shape == (3, 5)
    assert scores[0].argmax().item() == 1  # 0 -> 1 twice, 0 -> 2 once
    assert scores[0, 2] > scores[0, 3]  # a transition beats any popularity
    assert scores[1].argmax().item() == 0  # 1 -> 0 only
    assert scores[2].argmax().item() == 3  # 4 has no successor: popularity decides
    assert scores[2, 3] > scores[2, 0] > scores[2, 1] == scores[2, 2] > scores[2, 4]


def test_popularity_scorer_ranks_most_popular_first() -> None:
    train = arrays([0, 1, 2, 2], [2, 3, 1])
    counts = popularity(train, 5)
    assert counts.tolist() == [1, 2, 3, 1, 0]
    scores = popularity_scorer(counts)(arrays([0], [1, 3]))
    assert scores.shape == (2, 5)
    assert scores.argmax(1).tolist() == [2, 2]
    es = EvalSet(inputs=arrays([0], [0]), targets=np.array([1, 4]), history=arrays([2], [0]))
    m = evaluate_scores(popularity_scorer(counts), es, batch_size=1)
    # user 0: item 2 removed, item 1 is first (rank 0); user 1: 2, 1, 3 above item 4 (rank 3).
    assert m["HR@5"] == pytest.approx(1.0)
    assert m["NDCG@5"] == pytest.approx((1 + 1 / math.log2(5)) / 2)


def test_length_sorted_batches_keep_each_users_rank() -> None:
    """A scorer that only sees one user's input decides that user's rank, whatever the batching."""

    def echo_scorer(inputs: list[np.ndarray]) -> torch.Tensor:
        # Scores item j by -|j - last item|: the target's rank is its distance from the last item.
        items = torch.arange(10.0)
        return torch.stack([-(items - float(s[-1])).abs() for s in inputs])

    inputs = arrays([1, 2, 3, 4, 5], [9], [2, 6], [0, 1, 2, 3, 4, 5, 6, 7], [4])
    es = EvalSet(inputs=inputs, targets=np.array([5, 0, 6, 0, 4]), history=arrays([], [], [], [], []))
    # Ranks 0, 9, 0, 9, 0: a target equal to the last item is first; item 0 after 9 or 7 is last.
    one_by_one = evaluate_scores(echo_scorer, es, batch_size=1)
    assert one_by_one["HR@5"] == pytest.approx(3 / 5)
    assert one_by_one["HR@10"] == pytest.approx(1.0)
    assert one_by_one["NDCG@10"] == pytest.approx((3 + 2 / math.log2(11)) / 5)
    for batch_size in (2, 3, 5):
        assert evaluate_scores(echo_scorer, es, batch_size=batch_size) == one_by_one


def test_model_metrics_do_not_depend_on_batching(trained_run) -> None:
    from mqsa.training.checkpoint import Checkpoint
    from mqsa.training.evaluation import evaluate_model
    from mqsa.training.sequences import read_sequences

    model = Checkpoint.load(trained_run["dir"] / "best.pt").build_model()
    data = read_sequences(trained_run["data"])
    es = make_test_set(split_leave_one_out(data.sequences, model.config.max_len), model.config.max_len)
    es = EvalSet(inputs=es.inputs[:60], targets=es.targets[:60], history=es.history[:60])
    one_by_one = evaluate_model(model, es, batch_size=1)
    batched = evaluate_model(model, es, batch_size=16)
    assert batched == pytest.approx(one_by_one, abs=1e-12)
    assert evaluate_model(model, es, batch_size=16, item_chunk=7) == batched  # item chunks: same ranks


def test_model_ranks_chunked_equal_the_dense_ranks(trained_run) -> None:
    """The model scored a chunk of items at a time ranks every user as the full (B, N) product."""
    from mqsa.training.checkpoint import Checkpoint
    from mqsa.training.evaluation import model_chunk_scorer, model_scorer
    from mqsa.training.sequences import read_sequences

    model = Checkpoint.load(trained_run["dir"] / "best.pt").build_model().eval()
    data = read_sequences(trained_run["data"])
    es = make_test_set(split_leave_one_out(data.sequences, model.config.max_len), model.config.max_len)
    targets = torch.from_numpy(es.targets)
    expected = target_ranks(model_scorer(model)(es.inputs), targets, es.history)
    with torch.no_grad():
        chunks = model_chunk_scorer(model)(es.inputs)
        for item_chunk in (13, 64, 10_000):
            assert chunked_target_ranks(chunks, targets, es.history, item_chunk).tolist() == expected.tolist()
