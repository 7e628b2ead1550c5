from __future__ import annotations

import numpy as np
import pytest

from mqsa.training.transitions import TransitionGraph


def seqs(*rows: list[int]) -> list[np.ndarray]:
    return [np.array(r, dtype=np.int64) for r in rows]


def dense(g: TransitionGraph) -> np.ndarray:
    """(N, N) float32: the sparse graph written out."""
    out = np.zeros((g.num_items, g.num_items), dtype=np.float32)
    out[np.repeat(np.arange(g.num_items), g.row_lengths()), g.indices] = g.counts
    return out


def brute_force(sequences: list[np.ndarray], n: int, time_span: int) -> np.ndarray:
    """A[i, j] = number of (p, q) with p < q <= p + time_span, seq[p] = i, seq[q] = j."""
    out = np.zeros((n, n), dtype=np.float32)
    for s in sequences:
        for p in range(len(s)):
            for q in range(p + 1, min(p + time_span, len(s) - 1) + 1):
                out[s[p], s[q]] += 1
    return out


def test_time_span_one_counts_adjacent_pairs() -> None:
    g = TransitionGraph.from_sequences(seqs([0, 1, 2], [1, 2, 1, 2], [3]), num_items=5)
    expected = np.zeros((5, 5), dtype=np.float32)
    expected[0, 1] = 1
    expected[1, 2] = 3
    expected[2, 1] = 1
    np.testing.assert_array_equal(dense(g), expected)
    assert g.nnz == 3
    np.testing.assert_array_equal(g.indptr, [0, 1, 2, 3, 3, 3])
    np.testing.assert_array_equal(g.indices, [1, 2, 1])
    np.testing.assert_array_equal(g.counts, [1, 3, 1])
    assert g.counts.dtype == np.float32
    np.testing.assert_array_equal(g.row_lengths(), [1, 1, 1, 0, 0])


def test_time_span_two_adds_pairs_two_steps_apart() -> None:
    g = TransitionGraph.from_sequences(seqs([0, 1, 2], [1, 2, 1, 2], [3]), num_items=5, time_span=2)
    expected = np.zeros((5, 5), dtype=np.float32)
    expected[0, 1] = 1
    expected[0, 2] = 1  # 0 _ 2
    expected[1, 2] = 3
    expected[2, 1] = 1
    expected[1, 1] = 1  # 1 _ 1
    expected[2, 2] = 1  # 2 _ 2
    np.testing.assert_array_equal(dense(g), expected)


@pytest.mark.parametrize(("time_span", "count"), [(1, 3), (2, 5), (3, 6), (10, 6)])
def test_repeated_item_self_transitions(time_span: int, count: int) -> None:
    """[4, 4, 4, 4]: 3 adjacent pairs, 2 more two apart, 1 three apart."""
    g = TransitionGraph.from_sequences(seqs([4, 4, 4, 4]), num_items=5, time_span=time_span)
    cols, counts = g.row(4)
    np.testing.assert_array_equal(cols, [4])
    np.testing.assert_array_equal(counts, [count])
    assert g.nnz == 1


def test_row_returns_sorted_columns_and_counts() -> None:
    g = TransitionGraph.from_sequences(seqs([2, 5, 2, 0, 2, 5, 2, 3]), num_items=6)
    cols, counts = g.row(2)
    np.testing.assert_array_equal(cols, [0, 3, 5])
    np.testing.assert_array_equal(counts, [1, 1, 2])
    cols, counts = g.row(5)
    np.testing.assert_array_equal(cols, [2])
    np.testing.assert_array_equal(counts, [2])
    cols, counts = g.row(4)
    assert cols.size == 0 and counts.size == 0


@pytest.mark.parametrize("time_span", [1, 2, 3])
def test_random_sequences_match_brute_force(time_span: int) -> None:
    rng = np.random.default_rng(time_span)
    sequences = [rng.integers(0, 7, size=rng.integers(1, 9)) for _ in range(20)]
    g = TransitionGraph.from_sequences(sequences, num_items=8, time_span=time_span)
    np.testing.assert_array_equal(dense(g), brute_force(sequences, 8, time_span))
    for i in range(8):
        cols, counts = g.row(i)
        assert list(cols) == sorted(cols)
        assert (counts > 0).all()
        np.testing.assert_array_equal(dense(g)[i, cols], counts)


def test_no_transitions() -> None:
    for sequences in ([], seqs([1], [2])):
        g = TransitionGraph.from_sequences(sequences, num_items=3)
        assert g.nnz == 0
        np.testing.assert_array_equal(g.indptr, [0, 0, 0, 0])
        np.testing.assert_array_equal(dense(g), np.zeros((3, 3)))


def test_bad_time_span_is_rejected() -> None:
    with pytest.raises(ValueError, match="time_span"):
        TransitionGraph.from_sequences(seqs([0, 1]), num_items=2, time_span=0)
