"""From item histories to top-N items: pad, encode, blend, search, filter.

Plain numpy around the bundle's encoder and index; ``service/recommender.py``
maps external ids to indices before and back after.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np

from mqsa.service.bundle import Bundle


def left_pad(histories: list[list[int]], max_len: int, padding_idx: int) -> np.ndarray:
    """Cut each history to its last ``max_len`` items and left-pad to the longest.

    An intentional copy of ``mqsa.training.sequences.left_pad`` (the service never
    imports the trainer); ``tests/service/test_boundary_copies.py`` checks they agree.

    Returns:
        (B, width) int64, width = min(max_len, longest history), at least 1.
    """
    width = max(1, min(max_len, max((len(h) for h in histories), default=1)))
    out = np.full((len(histories), width), padding_idx, dtype=np.int64)
    for b, history in enumerate(histories):
        tail = history[-width:]
        if tail:
            out[b, width - len(tail) :] = tail
    return out


def blend(short: np.ndarray, long: np.ndarray, alpha: float) -> np.ndarray:
    """z = alpha * short + (1 - alpha) * long, (B, d).

    An intentional copy of ``MQSA.blend`` in numpy (the service never imports torch);
    ``tests/service/test_boundary_copies.py`` checks they agree.
    """
    return alpha * short + (1.0 - alpha) * long


def encode_histories(bundle: Bundle, histories: list[list[int]], alpha: float | None = None) -> np.ndarray:
    """Blended query vectors for non-empty histories of item indices: (B, d)."""
    short, long = bundle.encode(left_pad(histories, bundle.max_len, bundle.padding_idx))
    return blend(short, long, bundle.alpha if alpha is None else alpha)


def search_excluding(
    bundle: Bundle, queries: np.ndarray, n: int, exclude: list[Collection[int]]
) -> list[list[tuple[int, float]]]:
    """The n best items per query, skipping excluded ones.

    Searches n + |exclude| deep, and deeper when an approximate index returns
    fewer usable items, so n items come back whenever the catalogue allows.

    Args:
        queries: (B, d) blended vectors.
        exclude: per query, item indices never to return.

    Returns:
        Per query, up to n (item_idx, score) pairs, best first.
    """
    results: list[list[tuple[int, float]]] = []
    for b in range(len(queries)):
        banned = set(exclude[b])
        depth = min(bundle.num_items, n + len(banned))
        while True:
            scores, idx = bundle.search(queries[b : b + 1], depth)
            picked = [
                (int(i), float(s))
                for i, s in zip(idx[0], scores[0], strict=True)
                if i >= 0 and int(i) not in banned
            ][:n]
            if len(picked) == n or depth >= bundle.num_items:
                break
            depth = min(bundle.num_items, depth * 2)
        results.append(picked)
    return results
