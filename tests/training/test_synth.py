from __future__ import annotations

import numpy as np
import pytest

from training.prepare import prepare
from training.sequences import read_sequences
from training.synth import generate, planted_structure, write_synthetic
from training.vocabulary import Vocabulary, vocabulary_for

SMALL = {"num_users": 300, "num_items": 120, "num_clusters": 6, "mean_length": 10}


def planted_fraction(sequences: list[np.ndarray], successors: np.ndarray) -> float:
    """The fraction of consecutive pairs (a, b) where b is a planted successor of a."""
    prev = np.concatenate([s[:-1] for s in sequences])
    nxt = np.concatenate([s[1:] for s in sequences])
    return float((successors[prev] == nxt[:, None]).any(axis=1).mean())


def test_same_seed_same_output_other_seed_differs() -> None:
    a, b, c = generate(**SMALL, seed=3), generate(**SMALL, seed=3), generate(**SMALL, seed=4)
    assert len(a) == len(b) == 300
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(len(x) == len(y) and np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_lengths_and_range() -> None:
    sequences = generate(**SMALL)
    lengths = np.array([len(s) for s in sequences])
    assert lengths.min() >= 5
    assert lengths.max() <= 40
    assert 8 < lengths.mean() < 12
    items = np.concatenate(sequences)
    assert items.dtype == np.int64
    assert items.min() >= 0 and items.max() < 120


def test_planted_transitions_well_above_chance() -> None:
    clusters, successors = planted_structure(120, 6, seed=0)
    assert successors.shape == (120, 2)
    assert sorted(np.concatenate(clusters).tolist()) == list(range(120))
    planted = planted_fraction(generate(**SMALL, transition_prob=0.6), successors)
    chance = planted_fraction(generate(**SMALL, transition_prob=0.0), successors)
    assert planted > 0.5
    assert chance < 0.15


def test_users_stay_in_their_cluster() -> None:
    clusters, _ = planted_structure(120, 6, seed=0)
    cluster_of = np.empty(120, dtype=np.int64)
    for c, members in enumerate(clusters):
        cluster_of[members] = c
    sequences = generate(**SMALL, transition_prob=0.0)
    # each user's most common cluster holds most of its items
    share = [np.bincount(cluster_of[s]).max() / len(s) for s in sequences]
    assert np.mean(share) > 0.8


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mean_length"):
        generate(mean_length=3)
    with pytest.raises(ValueError, match="num_clusters"):
        generate(num_items=10, num_clusters=5)


def test_write_synthetic_files(tmp_path) -> None:
    path = write_synthetic(tmp_path, **SMALL, seed=1)
    assert path == tmp_path / "sequences.txt"
    vocab = vocabulary_for(path, 120)
    assert vocab.item_ids[17] == "i17"
    data = read_sequences(path, num_items=len(vocab))
    assert data.user_ids == [str(u) for u in range(300)]
    expected = generate(**SMALL, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(data.sequences, expected, strict=True))
    assert not (tmp_path / "interactions.csv").exists()


def test_raw_log_round_trips_through_prepare(tmp_path) -> None:
    write_synthetic(tmp_path / "synth", **SMALL, seed=2, raw_log=True)
    summary = prepare(tmp_path / "synth" / "interactions.csv", tmp_path / "prepared", k=1)
    synth_vocab = Vocabulary.load(tmp_path / "synth" / "items.json")
    synth = read_sequences(tmp_path / "synth" / "sequences.txt")
    prepared_vocab = Vocabulary.load(tmp_path / "prepared" / "items.json")
    prepared = read_sequences(tmp_path / "prepared" / "sequences.txt", num_items=len(prepared_vocab))
    assert summary["actions_after"] == summary["raw_rows"] == sum(len(s) for s in synth.sequences)
    assert summary["users_after"] == 300
    for a, b in zip(synth.sequences, prepared.sequences, strict=True):
        assert synth_vocab.to_ids(a) == prepared_vocab.to_ids(b)
