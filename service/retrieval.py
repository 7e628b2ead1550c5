"""From item histories to top-N items: pad, encode, blend, search, filter.

Plain numpy around the bundle's encoder and index; ``service/recommender.py``
maps external ids to indices before and back after.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from mqsa.service.bundle import Bundle
from mqsa.service.rules import count_bits


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


def search(
    bundle: Bundle, query: np.ndarray, n: int, allowed: np.ndarray | None = None, banned: Iterable[int] = ()
) -> list[tuple[int, float]]:
    """The n best items for one query, in one search, among the allowed ones.

    The rules go into the search as a FAISS ID selector (``IDSelectorBitmap`` for the
    catalogue's rules and the request's filter, ``IDSelectorNot(IDSelectorBatch)`` for
    the request's exclusions, ``IDSelectorAnd`` of both), so one search answers
    whatever is excluded. An approximate index searches wider when the rules leave few
    items (IVF ``nprobe`` and HNSW ``efSearch`` divided by the share allowed), and may
    still return fewer than n when they leave very few.

    Args:
        query: (1, d) the blended vector (or an item's embedding, for similar items).
        n: items wanted.
        allowed: packed bitmap (``np.packbits`` little order) of the items that may be
            returned; None: every item.
        banned: item indices never to return (the history, the request's exclusions).

    Returns:
        Up to n (item_idx, score) pairs, best first.
    """
    import faiss

    banned = np.fromiter(set(banned), dtype=np.int64)
    share = 1.0 if allowed is None else count_bits(allowed) / max(1, bundle.num_items)
    k = min(n, bundle.num_items)
    selectors = []
    if allowed is not None:
        selectors.append(faiss.IDSelectorBitmap(bundle.num_items, faiss.swig_ptr(allowed)))
    if len(banned):
        selectors.append(faiss.IDSelectorNot(faiss.IDSelectorBatch(len(banned), faiss.swig_ptr(banned))))
    selector = selectors[0] if len(selectors) == 1 else faiss.IDSelectorAnd(*selectors) if selectors else None
    params = bundle.search_parameters(selector, share) if selector is not None else None
    scores, idx = bundle.search(query, k, params)
    keep = idx[0] >= 0
    return list(zip(idx[0][keep].tolist(), scores[0][keep].tolist(), strict=True))
