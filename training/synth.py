"""Seeded synthetic sequences with planted structure a model can visibly learn.

Items are split among taste clusters and each user belongs to one. Every item has
``NUM_SUCCESSORS`` planted successors, mostly in its own cluster. A sequence starts at
a popular (Zipf-weighted) item of the user's cluster; each next item is, with
probability ``transition_prob``, a planted successor of the current item, else a
Zipf-weighted draw from the user's cluster (or, rarely, any item).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from training.sequences import write_sequences
from training.vocabulary import Vocabulary

NUM_SUCCESSORS = 2
SUCCESSOR_IN_CLUSTER_PROB = 0.9  # a planted successor is in the item's cluster
RANDOM_ITEM_PROB = 0.05  # a non-successor step picks any item, uniformly
ZIPF_EXPONENT = 1.0
MIN_LENGTH = 5
START_TIME = 1_600_000_000  # timestamps of the raw log, in seconds


def planted_structure(
    num_items: int, num_clusters: int, seed: int = 0
) -> tuple[list[np.ndarray], np.ndarray]:
    """The clusters and successors :func:`generate` plants for the same arguments and seed.

    Returns:
        (clusters, successors): per cluster, its items, most popular first; and
        (num_items, NUM_SUCCESSORS) int64, each item's planted successors.
    """
    return _plant(np.random.default_rng(seed), num_items, num_clusters)


def _plant(
    rng: np.random.Generator, num_items: int, num_clusters: int
) -> tuple[list[np.ndarray], np.ndarray]:
    if not 1 <= num_clusters <= num_items // (NUM_SUCCESSORS + 1):
        raise ValueError(
            f"need 1 <= num_clusters <= num_items / {NUM_SUCCESSORS + 1}, "
            f"got {num_clusters} clusters of {num_items} items"
        )
    clusters = np.array_split(rng.permutation(num_items), num_clusters)
    successors = np.empty((num_items, NUM_SUCCESSORS), dtype=np.int64)
    for members in clusters:
        for item in members:
            pool = members if rng.random() < SUCCESSOR_IN_CLUSTER_PROB else np.arange(num_items)
            successors[item] = rng.choice(pool[pool != item], size=NUM_SUCCESSORS, replace=False)
    return clusters, successors


def generate(
    num_users: int = 2000,
    num_items: int = 500,
    num_clusters: int = 10,
    mean_length: float = 12,
    transition_prob: float = 0.6,
    seed: int = 0,
) -> list[np.ndarray]:
    """Generate one item sequence per user; the same arguments give the same output.

    Lengths are 4 + a geometric draw (so at least 5, mean ``mean_length``), capped at
    ``4 * mean_length``.

    Args:
        num_users: U.
        num_items: N; items are 0..N-1.
        num_clusters: the taste clusters (at most N / 3).
        mean_length: the mean sequence length (at least 5).
        transition_prob: the chance each step follows a planted successor.
        seed: the seed of the numpy Generator.

    Returns:
        Per user, an int64 array of item indices, oldest first.
    """
    if mean_length < MIN_LENGTH:
        raise ValueError(f"mean_length must be at least {MIN_LENGTH}, got {mean_length}")
    rng = np.random.default_rng(seed)
    clusters, successors = _plant(rng, num_items, num_clusters)
    zipf = [1.0 / np.arange(1, len(m) + 1) ** ZIPF_EXPONENT for m in clusters]
    zipf = [w / w.sum() for w in zipf]
    user_clusters = rng.integers(num_clusters, size=num_users)
    lengths = np.minimum(
        MIN_LENGTH - 1 + rng.geometric(1 / (mean_length - MIN_LENGTH + 1), num_users), int(4 * mean_length)
    )
    sequences = []
    for c, length in zip(user_clusters, lengths, strict=True):
        members, weights = clusters[c], zipf[c]
        seq = np.empty(length, dtype=np.int64)
        seq[0] = rng.choice(members, p=weights)
        for t in range(1, length):
            r = rng.random()
            if r < transition_prob:
                seq[t] = rng.choice(successors[seq[t - 1]])
            elif r < transition_prob + (1 - transition_prob) * RANDOM_ITEM_PROB:
                seq[t] = rng.integers(num_items)
            else:
                seq[t] = rng.choice(members, p=weights)
        sequences.append(seq)
    return sequences


def write_synthetic(
    out_dir: str | Path,
    num_users: int = 2000,
    num_items: int = 500,
    num_clusters: int = 10,
    mean_length: float = 12,
    transition_prob: float = 0.6,
    seed: int = 0,
    raw_log: bool = False,
) -> Path:
    """Write :func:`generate`'s output as ``sequences.txt`` (users 0..U-1) and ``items.json``.

    ``items.json`` names item index i ``f"i{i}"``. With ``raw_log``, also writes
    ``interactions.csv`` (``user_id,item_id,timestamp``; ids ``"u{u}"`` and ``"i{i}"``,
    timestamps increasing row by row) that :func:`training.prepare.prepare` reads.

    Returns:
        The path of ``sequences.txt``.
    """
    sequences = generate(num_users, num_items, num_clusters, mean_length, transition_prob, seed)
    out_dir = Path(out_dir)
    path = out_dir / "sequences.txt"
    write_sequences(path, sequences)
    Vocabulary(f"i{i}" for i in range(num_items)).save(out_dir / "items.json")
    if raw_log:
        items = np.concatenate(sequences)
        users = np.repeat(np.arange(len(sequences)), [len(s) for s in sequences])
        log = pd.DataFrame(
            {
                "user_id": [f"u{u}" for u in users],
                "item_id": [f"i{i}" for i in items],
                "timestamp": START_TIME + 60 * np.arange(len(items)),
            }
        )
        log.to_csv(out_dir / "interactions.csv", index=False)
    return path
