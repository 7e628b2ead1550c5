"""Answers: external ids in, scored external ids out, within the catalogue's rules.

:func:`recommend` maps the history to item indices (unknown ids skipped), encodes and
blends it (``retrieval.encode_histories``) and searches the index once, with the
rules, the request's filter and its exclusions inside the search
(``retrieval.search``); with no usable history left the bundle's popular items answer,
under the same rules. Items of the catalogue the model does not know yet may take a
share of the list (``source: explore``), and a list may hold at most k items of one
category. :func:`similar` answers the items nearest to one item.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from mqsa.errors import NotFound
from mqsa.service.batching import Batcher, Job
from mqsa.service.bundle import Bundle
from mqsa.service.metrics import Metrics
from mqsa.service.retrieval import search
from mqsa.service.rules import NO_FILTER, Filter, Rules

DIVERSITY_DEPTH = 5  # with a per-category cap, the search looks this many times deeper
Entry = tuple[str, float | None, str | None]  # item_id, score (None when explored), "explore" or None


@dataclass
class Ask:
    """What the caller asks for, beside the history.

    Attributes:
        n: items wanted.
        exclude: item ids never to return (the history, when exclude_seen; the request's).
        flt: the request's filter.
        max_per_category: at most this many items of one category (None: no cap).
        explore_share: the share of the list for items the model does not know (0: none).
        explore_pick: "newest" or "random".
    """

    n: int
    exclude: set[str] = field(default_factory=set)
    flt: Filter = NO_FILTER
    max_per_category: int | None = None
    explore_share: float = 0.0
    explore_pick: str = "newest"


@dataclass
class Recommendation:
    """The answer: its entries, and whether the model (or the popular items) made it."""

    items: list[Entry]
    source: str  # "model" or "popular"


async def recommend(
    bundle: Bundle,
    rules: Rules,
    history: list[str],
    ask: Ask,
    alpha: float | None,
    metrics: Metrics,
    batcher: Batcher,
) -> Recommendation:
    """The top ``ask.n`` items for a history of external item ids (oldest first).

    The encoder call and the search go through ``batcher``, with those of the requests
    that are ready at the same time (``service/batching.py``).
    """
    explored, counts = _explore(rules, ask)
    wanted = ask.n - len(explored)
    known = [bundle.item_index[i] for i in history if i in bundle.item_index]
    if not known:
        metrics.fallbacks.labels(reason="no_usable_history").inc()
        popular = popular_items(bundle, rules, wanted, ask, counts)
        return Recommendation(_interleave(popular, explored), "popular")
    allowed = None if ask.flt.empty and rules.hides_nothing else rules.allowed(ask.flt)
    banned = {bundle.item_index[i] for i in ask.exclude if i in bundle.item_index}
    depth = wanted if ask.max_per_category is None else min(bundle.num_items, wanted * DIVERSITY_DEPTH)
    job = Job(known, bundle.alpha if alpha is None else alpha, depth, banned, allowed, shared=ask.flt.empty)
    found = await batcher.run(bundle, job)
    ranked = [(bundle.item_ids[i], s, None) for i, s in found]
    picked = _diversify(ranked, wanted, ask.max_per_category, rules.categories_of, counts)
    return Recommendation(_interleave(picked, explored), "model")


def _explore(rules: Rules, ask: Ask) -> tuple[list[str], Counter[str]]:
    """The explored items (within the category cap), and the categories they take."""
    explored = rules.explore(int(ask.n * ask.explore_share), ask.flt, ask.exclude, ask.explore_pick)
    counts: Counter[str] = Counter()
    entries: list[Entry] = [(item_id, None, "explore") for item_id in explored]
    kept = _diversify(entries, len(entries), ask.max_per_category, rules.categories_of, counts)
    return [item_id for item_id, _, _ in kept], counts


def similar(
    bundle: Bundle, rules: Rules, item_id: str, ask: Ask, metrics: Metrics
) -> list[tuple[str, float]]:
    """The items nearest to ``item_id`` by inner product of the item embeddings, never itself.

    Raises:
        NotFound: the model does not know the item.
    """
    if item_id not in bundle.item_index:
        raise NotFound(f"the model does not know item {item_id!r} (it may be new since the last training)")
    query = bundle.item_vector(bundle.item_index[item_id])  # (1, d)
    ask.exclude.add(item_id)
    return [(i, s) for i, s, _ in _search(bundle, rules, query, ask.n, ask, metrics)]


def _search(bundle: Bundle, rules: Rules, query, n: int, ask: Ask, metrics: Metrics) -> list[Entry]:
    allowed = None if ask.flt.empty and rules.hides_nothing else rules.allowed(ask.flt)
    banned = [bundle.item_index[i] for i in ask.exclude if i in bundle.item_index]
    depth = n if ask.max_per_category is None else min(bundle.num_items, n * DIVERSITY_DEPTH)
    with metrics.time_stage("search"):
        found = search(bundle, query, depth, allowed, banned)
    ranked = [(bundle.item_ids[i], s, None) for i, s in found]
    return _diversify(ranked, n, ask.max_per_category, rules.categories_of)


def popular_items(
    bundle: Bundle, rules: Rules, n: int, ask: Ask, counts: Counter[str] | None = None
) -> list[Entry]:
    """The n most popular items that pass the rules and the filter; the score is minus the rank."""
    out: list[Entry] = []
    if n <= 0:
        return out
    limit = n if ask.max_per_category is None else n * DIVERSITY_DEPTH
    for rank, item_id in enumerate(bundle.popular):
        if item_id not in ask.exclude and rules.passes(item_id, ask.flt):
            out.append((item_id, float(-rank), None))
            if len(out) == limit:
                break
    return _diversify(out, n, ask.max_per_category, rules.categories_of, counts)


def _diversify(
    ranked: list[Entry],
    n: int,
    cap: int | None,
    categories_of: Callable[[str], tuple[str, ...]],
    counts: Counter[str] | None = None,
) -> list[Entry]:
    """The first n of ``ranked`` with at most ``cap`` items of any one category (items in
    several categories count in each), counting on from ``counts`` (updated in place). May
    return fewer than n: the cap is kept strictly."""
    if cap is None:
        return ranked[:n]
    counts = Counter() if counts is None else counts
    out = []
    for entry in ranked:
        categories = set(categories_of(entry[0]))
        if all(counts[c] < cap for c in categories):
            counts.update(categories)
            out.append(entry)
            if len(out) == n:
                break
    return out


def _interleave(picked: list[Entry], explored: list[str]) -> list[Entry]:
    """Spread the explored items evenly through the list (1 in 10: the 6th place of 10)."""
    out = list(picked)
    total = len(picked) + len(explored)
    for j, item_id in enumerate(explored):
        out.insert(min(len(out), int((j + 0.5) * total / len(explored))), (item_id, None, "explore"))
    return out
