"""One recommendation: external ids in, scored external ids out.

Maps the history to item indices (unknown ids skipped), encodes and blends it
(``retrieval.encode_histories``), searches the index skipping the excluded
items (``retrieval.search_excluding``) and maps the result back to external
ids; with no usable history left, the bundle's popular items answer.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from mqsa.service.bundle import Bundle
from mqsa.service.metrics import Metrics
from mqsa.service.retrieval import encode_histories, search_excluding


@dataclass
class Recommendation:
    items: list[tuple[str, float]]
    source: str  # "model" or "popular"


def popular_items(bundle: Bundle, n: int, exclude: Collection[str]) -> list[tuple[str, float]]:
    """The n most popular items not excluded; the score is minus the popularity rank."""
    out: list[tuple[str, float]] = []
    for rank, item_id in enumerate(bundle.popular):
        if item_id not in exclude:
            out.append((item_id, float(-rank)))
            if len(out) == n:
                break
    return out


def recommend(
    bundle: Bundle,
    history: list[str],
    n: int,
    exclude: Collection[str],
    alpha: float | None,
    metrics: Metrics,
) -> Recommendation:
    """The top n items for a history of external item ids (oldest first)."""
    known = [bundle.item_index[i] for i in history if i in bundle.item_index]
    if not known:
        metrics.fallbacks.labels(reason="no_usable_history").inc()
        return Recommendation(popular_items(bundle, n, exclude), "popular")
    banned = {bundle.item_index[i] for i in exclude if i in bundle.item_index}
    with metrics.time_stage("encoder"):
        query = encode_histories(bundle, [known], alpha)  # (1, d)
    with metrics.time_stage("search"):
        picked = search_excluding(bundle, query, n, [banned])[0]
    return Recommendation([(bundle.item_ids[i], s) for i, s in picked], "model")
