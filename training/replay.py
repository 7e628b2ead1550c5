"""Offline replay: the online metrics of docs/feedback.md, recomputed from the event archive.

``mqsa evaluate --online --archive URL --since T --until T`` reads the archive's entries
(events and impressions; ``mqsa events archive`` writes them) and counts, per model
version and mode, what ``/stats`` counts online for the same traffic: impressions,
clicks, hits, conversions, their rates, and coverage. Each number follows
docs/feedback.md ("The online metrics"); the time of an entry is its stream id's
milliseconds. Which entries of the window ``[since, until)`` count:

* **impressions**, **distinct items**: the lists inside the window;
* **clicks**, **conversions**, **hits**: counted when the event is inside the window, as
  ``/stats`` counts them (a hit when the list's first hitting event is). The lists they
  are attributed to may be up to T before the window (they are read too).
  ``replay_metrics(..., hits_at="list")`` counts instead the hits of the lists inside
  the window, whenever (within T) they were hit.

A list can be hit only while it is among its user's :data:`SERVED_CAP` newest lists, as
the service keeps no more per user.

With bundles (``--bundle``), the **counterfactual** (:func:`replay_bundles`): every
``/recommend`` list served in the window is made again by each bundle from the user's
history at that moment (the archived events of the history types before it, the newest
``history_cap``) with the service's own code (``mqsa.service.retrieval``: the encoder,
the blend, a FAISS search excluding the history; popular items when the bundle knows
none of the history), as long as the served list; each list's hits and conversions are
counted against the user's archived events after it, beside the served lists' own by the
same rule. Clicks (CTR) cannot be replayed: a click needs the list to have been shown.

Pure pandas, pyarrow and numpy; the bundles are loaded only for the counterfactual.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from mqsa.errors import ConfigError, DataError
from mqsa.training.prepare import IMPRESSION, UNTYPED, archive_errors, open_archive, parse_time

SERVED = "served"
RECOMMEND = "recommend"
SERVED_CAP = 50  # lists a user can have hit at once: a copy of service/store.py's SERVED_CAP
NEW_COLUMNS = ("event_type", "recommendation_id", "items", "model_version", "route", "mode")
TEXT_COLUMNS = (
    "user_id",
    "item_id",
    "event_type",
    "recommendation_id",
    "model_version",
    "route",
    "mode",
    "stream",
    "stream_id",
)
BATCH = 256  # histories encoded together in the counterfactual


@dataclass
class ReplayConfig:
    """How ``mqsa evaluate --online`` replays the archive.

    Attributes:
        attribution_window: T, seconds: an event hits (or converts) a list of its user
            served at most this long before it (the service's MQSA_ATTRIBUTION_WINDOW_SECONDS).
        click_event_type: the event type counted as a click (the service's MQSA_CLICK_EVENT_TYPE).
        conversion_event_type: the event type counted as a conversion (MQSA_CONVERSION_EVENT_TYPE).
        context_since: with --bundle: users' histories are read from this time on (unix
            seconds, an ISO date, or a span before now: 90d); bounds the memory (none: all).
        history_event_types: with --bundle: the event types that enter the histories the
            bundles read, comma-separated (the service's MQSA_HISTORY_EVENT_TYPES; none: every type).
        history_cap: with --bundle: a history keeps its newest this many items (MQSA_HISTORY_CAP).
    """

    attribution_window: int = 1800
    click_event_type: str = "click"
    conversion_event_type: str = "purchase"
    context_since: str | None = None
    history_event_types: str | None = None
    history_cap: int = 200

    def check(self) -> None:
        """Raises ConfigError naming the flag of a setting out of range."""
        if not (math.isfinite(self.attribution_window) and self.attribution_window > 0):
            raise ConfigError(f"--attribution-window must be positive seconds, got {self.attribution_window}")
        if self.history_cap < 1:
            raise ConfigError(f"--history-cap must be at least 1, got {self.history_cap}")

    def history_types(self) -> frozenset[str] | None:
        """The history types, or None for every type."""
        if not self.history_event_types:
            return None
        types = frozenset(t.strip() for t in self.history_event_types.split(",") if t.strip())
        return types or None


def utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


def _day(ms: float) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d")


def read_feedback(url: str, since: float | None = None, until: float | None = None) -> pd.DataFrame:
    """The archive's entries (events and impressions) with ``since <= time < until`` (seconds;
    None: unbounded), the time being the stream id's milliseconds.

    Files written before the feedback columns existed are read too: their entries are
    events of type ``view`` (or what their ``extra`` JSON says, for entries an older
    archiver stored there). An entry stored twice is read once (by ``(stream, stream_id)``).

    Returns:
        One row per entry, in stream-id time order (then stream id), index 0..n-1, columns
        ``user_id, item_id, event_type, recommendation_id, model_version, route, mode,
        stream, stream_id`` (str, "" when absent), ``items`` (a list of item ids, or None),
        ``ms`` (int64, the stream id's milliseconds) and ``order`` (int64, the row's place).

    Raises:
        DataError: no such archive, no Parquet file in it, or a file it cannot read.
    """
    return _read(url, since, until)[0]


def _read(url: str, since: float | None, until: float | None) -> tuple[pd.DataFrame, bool]:
    """:func:`read_feedback`'s frame, and whether the archive holds an entry at or after ``until``."""
    import pyarrow.dataset as ds

    lo_ms = -math.inf if since is None else since * 1000
    hi_ms = math.inf if until is None else until * 1000
    dataset = open_archive(url)
    days = {p.split("date=", 1)[1].split("/", 1)[0] for p in dataset.files if "date=" in p}
    where = None
    if math.isfinite(lo_ms):
        where = ds.field("date") >= _day(lo_ms)
    if math.isfinite(hi_ms):
        upper = ds.field("date") <= _day(hi_ms)
        where = upper if where is None else where & upper
    if where is not None:
        where = where | ds.field("date").is_null()  # files outside date= folders
    with archive_errors(url):
        table = dataset.to_table(columns=[*TEXT_COLUMNS, "items", "extra"], filter=where)
    frame = table.to_pandas()
    frame = frame[~frame.duplicated(["stream", "stream_id"])]
    ms, seq = _stream_ids(frame["stream_id"], url)
    reaches = bool((ms >= hi_ms).any()) or (math.isfinite(hi_ms) and any(d > _day(hi_ms) for d in days))
    keep = (ms >= lo_ms) & (ms < hi_ms)
    frame = _normalised(frame[keep], ms[keep], seq[keep])
    return frame, reaches


def _stream_ids(ids: pd.Series, url: str) -> tuple[np.ndarray, np.ndarray]:
    """``"1764480000000-5"`` -> (ms, seq) int64 arrays."""
    if len(ids) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    parts = ids.fillna("").astype(str).str.partition("-")
    ms = pd.to_numeric(parts[0], errors="coerce")
    seq = pd.to_numeric(parts[2].where(parts[2] != "", "0"), errors="coerce")
    bad = ms.isna() | seq.isna()
    if bad.any():
        raise DataError(f"a stream id is not <ms>-<seq>: {ids[bad].iloc[0]!r}", url)
    return ms.to_numpy(dtype=np.int64), seq.to_numpy(dtype=np.int64)


def _normalised(frame: pd.DataFrame, ms: np.ndarray, seq: np.ndarray) -> pd.DataFrame:
    """Text columns as str ("" for null), the fields an older archiver kept in ``extra`` taken
    from there, a missing type as ``view``; sorted by (ms, seq, stream) with ``ms`` and ``order``."""
    frame = frame.reset_index(drop=True)
    out = pd.DataFrame(index=frame.index)
    for name in TEXT_COLUMNS:
        out[name] = frame[name].astype(object).where(frame[name].notna(), None)
    out["items"] = frame["items"].astype(object).where(frame["items"].notna(), None)
    untyped = np.flatnonzero((out["event_type"].isna() & frame["extra"].notna()).to_numpy())
    for row in untyped:  # entries of the feedback era stored by an archiver that predates it
        try:
            extra = json.loads(frame["extra"].iat[row])
        except (TypeError, ValueError):
            continue
        if not isinstance(extra, dict):
            continue
        for name in NEW_COLUMNS:
            value = extra.get(name)
            if name == "items" and isinstance(value, str):
                try:
                    value = json.loads(value)
                except ValueError:
                    value = None
            if value is not None:
                out.at[row, name] = value
    for name in TEXT_COLUMNS:
        out[name] = out[name].fillna("").astype(str)
    out["event_type"] = out["event_type"].where(out["event_type"] != "", UNTYPED)
    out["ms"] = ms
    out["_seq"] = seq
    out = out.sort_values(["ms", "_seq", "stream"], kind="stable").drop(columns="_seq")
    out = out.reset_index(drop=True)
    out["order"] = np.arange(len(out), dtype=np.int64)
    return out


UNKNOWN = "unknown"  # an intentional copy of service/stats.py's (the trainer image has no redis)


def model_of(recommendation_id: str) -> str:
    """The model version a recommendation id names (its first part); an intentional copy of
    service/feedback.py's (checked by tests/training/test_replay.py)."""
    return recommendation_id.partition("-")[0]


def _in(ms: pd.Series, since: float | None, until: float | None) -> pd.Series:
    keep = pd.Series(True, index=ms.index)
    if since is not None:
        keep &= ms >= since * 1000
    if until is not None:
        keep &= ms < until * 1000
    return keep


def _length(items: Any) -> int:
    return 0 if items is None else len(items)


def _pairs(lists: pd.DataFrame, events: pd.DataFrame, window_ms: float, cap: int | None) -> pd.DataFrame:
    """(list, event) pairs where the event hits the list: same user, an item of the list, later in
    the stream, at most ``window_ms`` after it, and (``cap``) while the list is among its user's
    ``cap`` newest.

    Args:
        lists: ``lid``, ``user_id``, ``order``, ``ms``, ``items`` (and ``rank``: the list's place
            among its user's lists, with ``cap``); other columns are kept (suffix ``_l``).
        events: ``order``, ``ms``, ``user_id``, ``item_id`` (and ``before``: the user's lists up
            to the event, with ``cap``); other columns are kept.
    """
    cols = [c for c in lists.columns if c != "items"]
    exploded = lists[[*cols, "items"]].explode("items").rename(columns={"items": "item_id"})
    exploded = exploded[exploded["item_id"].notna()].drop_duplicates(["lid", "item_id"])
    exploded["item_id"] = exploded["item_id"].astype(str)
    pairs = exploded.merge(events, on=["user_id", "item_id"], suffixes=("_l", "_e"))
    keep = (pairs["order_e"] > pairs["order_l"]) & (pairs["ms_e"] - pairs["ms_l"] <= window_ms)
    if cap is not None:
        keep &= pairs["before"] - pairs["rank"] <= cap
    return pairs[keep]


def replay_metrics(
    frame: pd.DataFrame,
    attribution_window_seconds: float = 1800.0,
    since: float | None = None,
    until: float | None = None,
    num_items: dict[str, int] | None = None,
    *,
    hits_at: Literal["event", "list"] = "event",
    click_type: str = "click",
    conversion_type: str = "purchase",
    served_cap: int | None = SERVED_CAP,
) -> dict[str, Any]:
    """The online metrics of the entries of ``frame`` (:func:`read_feedback`'s) in ``[since, until)``.

    Args:
        frame: the archive's entries; to attribute events to lists served before the window,
            it must hold the lists from T before ``since``; with ``hits_at="list"``, the events
            up to T after ``until``.
        attribution_window_seconds: T.
        since, until: the window (seconds; None: unbounded).
        num_items: model version -> its item count, for coverage (None where unknown).
        hits_at: ``event``: a hit counts when the list's first hitting event is in the window
            (as ``/stats``); ``list``: when the list is.
        click_type, conversion_type: the event types counted as clicks and conversions.
        served_cap: a list can be hit while it is among its user's this many newest (None: always).

    Returns:
        ``{"attribution_window_seconds", "hits_at", "models": [{model_version, mode, impressions,
        attributable, clicks, hits, conversions, ctr, hit_rate, conversion_rate, distinct_items,
        num_items, coverage}], "events": {event_type: count}}``; models in /stats's order. A
        click or purchase whose recommendation id names a version with no list in ``frame``
        counts for the version ``unknown``, as the service counts it.
    """
    is_imp = frame["event_type"] == IMPRESSION
    in_window = _in(frame["ms"], since, until)
    counts: Counter[tuple[str, str, str]] = Counter()
    shown = frame[is_imp & in_window]
    for (version, mode), n in shown.groupby(["model_version", "mode"]).size().items():
        counts[(version, mode, "impressions")] += int(n)
    with_user = shown[(shown["user_id"] != "") & (shown["items"].map(_length) > 0)]
    counts += _per_model(with_user, "attributable")
    served_ever = set(frame.loc[is_imp, "model_version"])  # the service's versions hash: all time
    distinct = {
        key: int(group["items"].explode().dropna().astype(str).nunique())
        for key, group in shown.groupby(["model_version", "mode"])
    }
    events = frame[~is_imp & in_window]
    with_id = events[events["recommendation_id"] != ""]
    for kind, name in ((click_type, "clicks"), (conversion_type, "conversions")):
        for version in with_id.loc[with_id["event_type"] == kind, "recommendation_id"].map(model_of):
            counts[(version if version in served_ever else UNKNOWN, SERVED, name)] += 1
    pairs = _hits(frame, attribution_window_seconds * 1000, served_cap)
    counts += _attributed(pairs, since, until, hits_at, conversion_type)
    types = events["event_type"].value_counts()
    return {
        "attribution_window_seconds": attribution_window_seconds,
        "hits_at": hits_at,
        "models": _model_rows(counts, distinct, num_items or {}),
        "events": {str(k): int(v) for k, v in sorted(types.items())},
    }


def _per_model(lists: pd.DataFrame, name: str) -> Counter[tuple[str, str, str]]:
    """The number of ``lists`` per (version, mode), as ``name``."""
    sizes = lists.groupby(["model_version", "mode"]).size()
    return Counter({(version, mode, name): int(n) for (version, mode), n in sizes.items()})


def _hits(frame: pd.DataFrame, window_ms: float, cap: int | None) -> pd.DataFrame:
    """Every (list, event) pair where the event hits the list, as the service finds them: the
    lists of a user with items (it remembers only those), its ``cap`` newest."""
    is_imp = frame["event_type"] == IMPRESSION
    has_user = frame["user_id"] != ""
    remembered = is_imp & has_user & frame["items"].map(_length).gt(0)
    seen_lists = remembered.astype(np.int64).groupby(frame["user_id"]).cumsum()  # up to each entry
    lists = frame[remembered].assign(lid=frame.index[remembered], rank=seen_lists[remembered] - 1)
    lists = lists[["lid", "user_id", "order", "ms", "items", "model_version", "mode", "rank"]]
    events = frame[~is_imp & has_user].assign(before=seen_lists[~is_imp & has_user])
    events = events[["order", "ms", "user_id", "item_id", "event_type", "recommendation_id", "before"]]
    return _pairs(lists, events, window_ms, cap)


def _attributed(
    pairs: pd.DataFrame, since: float | None, until: float | None, hits_at: str, conversion_type: str
) -> Counter[tuple[str, str, str]]:
    """The hits and the list-attributed conversions of the window, per (version, mode)."""
    counts: Counter[tuple[str, str, str]] = Counter()
    first = pairs.sort_values("order_e", kind="stable").drop_duplicates("lid")  # each list's first hit
    counted = _in(first["ms_l"] if hits_at == "list" else first["ms_e"], since, until)
    for (version, mode), n in first[counted].groupby(["model_version", "mode"]).size().items():
        counts[(version, mode, "hits")] += int(n)
    bought = pairs[(pairs["event_type"] == conversion_type) & _in(pairs["ms_e"], since, until)]
    served = bought[(bought["mode"] == SERVED) & (bought["recommendation_id"] == "")]
    newest = served.sort_values("order_l", kind="stable").drop_duplicates("order_e", keep="last")
    for version in newest["model_version"]:
        counts[(version, SERVED, "conversions")] += 1
    other = bought[bought["mode"] != SERVED].drop_duplicates(["order_e", "model_version", "mode"])
    for version, mode in zip(other["model_version"], other["mode"], strict=True):
        counts[(version, mode, "conversions")] += 1
    return counts


def _model_rows(
    counts: Counter[tuple[str, str, str]], distinct: dict[Any, int], num_items: dict[str, int]
) -> list[dict[str, Any]]:
    """One row per (version, mode) with a count, in /stats's order, with the rates and coverage."""
    keys = sorted({(v, m) for v, m, _ in counts}, key=lambda k: (k[1], -counts[(*k, "impressions")], k[0]))
    rows = []
    for version, mode in keys:
        names = ("impressions", "attributable", "clicks", "hits", "conversions")
        n = {name: counts[(version, mode, name)] for name in names}
        items = distinct.get((version, mode), 0)
        size = num_items.get(version)
        rows.append(
            {
                "model_version": version,
                "mode": mode,
                **n,
                "ctr": _rate(n["clicks"], n["impressions"]),
                "hit_rate": _rate(n["hits"], n["attributable"]),
                "conversion_rate": _rate(n["conversions"], n["impressions"]),
                "distinct_items": items,
                "num_items": size,
                "coverage": _rate(items, size),
            }
        )
    return rows


def _rate(part: int, whole: int | None) -> float | None:
    return part / whole if whole else None


def replay_bundles(
    frame: pd.DataFrame,
    bundles: Sequence[tuple[str, Any]],
    since: float | None = None,
    until: float | None = None,
    attribution_window_seconds: float = 1800.0,
    history_types: frozenset[str] | None = None,
    history_cap: int = 200,
    conversion_type: str = "purchase",
    context_since: float | None = None,
) -> dict[str, Any]:
    """The counterfactual: each bundle makes the window's served ``/recommend`` lists again.

    For each served list of a user in ``[since, until)`` (route ``recommend``), the user's
    history then is their events of ``history_types`` (None: every type) before it and at or
    after ``context_since``, the newest ``history_cap``. Each bundle ranks as the service would
    for that history (unknown items dropped, the last T encoded, the history's items
    excluded; its popular items when it knows none) and keeps as many items as were served.

    Every list, served or made again, is then judged by the same rule: a **hit** when an event
    of its user (any type but impressions) on one of its items follows it within T; a
    **conversion** per ``conversion_type`` event within T after lists holding its item (one per
    event and model, whatever its recommendation id: a replayed list has none). Lists and
    their outcomes count whenever the outcome comes (within T), so ``frame`` should hold the
    events up to T after ``until``.

    Args:
        bundles: (label, loaded ``mqsa.service.bundle.Bundle``) pairs.

    Returns:
        ``{"lists", "served_versions": {version: lists}, "models": {"served": {...},
        label: {...}}}``; each model: ``lists, hits, hit_rate, conversions, conversion_rate,
        distinct_items``; a bundle's also ``model_version``, ``fallbacks`` (lists of its popular
        items) and ``overlap`` (the mean share of the served list it holds).
    """
    is_imp = frame["event_type"] == IMPRESSION
    has_user = frame["user_id"] != ""
    kind = (frame["mode"] == SERVED) & (frame["route"] == RECOMMEND) & frame["items"].map(_length).gt(0)
    lists = frame[is_imp & has_user & kind & _in(frame["ms"], since, until)]
    served_items = [[str(i) for i in items] for items in lists["items"]]
    events = frame[~is_imp & has_user][["order", "ms", "user_id", "item_id", "event_type"]]
    histories = _histories(events, lists, history_types, history_cap, context_since)
    made, info = _remade(bundles, histories, served_items)
    base = lists[["user_id", "order", "ms"]].reset_index(drop=True)
    window_ms = attribution_window_seconds * 1000
    models = {
        label: {**_judged(base, items, events, window_ms, conversion_type), **info[label]}
        for label, items in made.items()
    }
    versions = lists["model_version"].value_counts()
    return {
        "lists": len(base),
        "served_versions": {str(k): int(v) for k, v in versions.items()},
        "models": models,
    }


def _remade(
    bundles: Sequence[tuple[str, Any]], histories: list[list[str]], served: list[list[str]]
) -> tuple[dict[str, list[list[str]]], dict[str, dict[str, Any]]]:
    """Per model (``served``, then each bundle's label) its lists, and what is known of it."""
    made = {"served": served}
    info: dict[str, dict[str, Any]] = {"served": {}}
    for label, bundle in bundles:
        made[label], fallbacks = bundle_lists(bundle, histories, [len(s) for s in served])
        overlap = [len(set(m) & set(s)) / len(s) for m, s in zip(made[label], served, strict=True)]
        info[label] = {
            "model_version": bundle.model_version,
            "fallbacks": fallbacks,
            "overlap": float(np.mean(overlap)) if overlap else None,
        }
    return made, info


def _judged(
    base: pd.DataFrame, items: list[list[str]], events: pd.DataFrame, window_ms: float, conversion_type: str
) -> dict[str, Any]:
    """One model's lists (``base``'s users and times, ``items``) judged against the events."""
    these = base.assign(lid=np.arange(len(base)), items=pd.Series(items, dtype=object))
    pairs = _pairs(these, events, window_ms, None)
    hits = int(pairs["lid"].nunique())
    conversions = int(pairs.loc[pairs["event_type"] == conversion_type, "order_e"].nunique())
    return {
        "lists": len(base),
        "hits": hits,
        "hit_rate": _rate(hits, len(base)),
        "conversions": conversions,
        "conversion_rate": _rate(conversions, len(base)),
        "distinct_items": len({i for m in items for i in m}),
    }


def _histories(
    events: pd.DataFrame,
    lists: pd.DataFrame,
    types: frozenset[str] | None,
    cap: int,
    context_since: float | None,
) -> list[list[str]]:
    """Per list, its user's items of the history types before it (oldest first, the newest ``cap``)."""
    keep = _in(events["ms"], context_since, None)
    if types is not None:
        keep &= events["event_type"].isin(types)
    kept = events[keep]
    by_user = {
        user: (group["order"].to_numpy(), group["item_id"].to_numpy(dtype=object))
        for user, group in kept.groupby("user_id", sort=False)
    }
    out = []
    empty = (np.empty(0, np.int64), np.empty(0, object))
    for user, order in zip(lists["user_id"], lists["order"], strict=True):
        orders, items = by_user.get(user, empty)
        end = int(np.searchsorted(orders, order))
        out.append(items[max(0, end - cap) : end].tolist())
    return out


def bundle_lists(bundle: Any, histories: list[list[str]], lengths: list[int]) -> tuple[list[list[str]], int]:
    """Each history's top items by ``bundle``, as ``/recommend`` ranks them (no rules, no filter,
    no exploration): (the lists, how many were its popular items for lack of a known item)."""
    from mqsa.service.retrieval import encode_histories, search

    known = [[bundle.item_index[i] for i in h if i in bundle.item_index] for h in histories]
    out: list[list[str]] = [[] for _ in histories]
    ranked = [b for b, k in enumerate(known) if k]
    for lo in range(0, len(ranked), BATCH):
        batch = ranked[lo : lo + BATCH]
        queries = encode_histories(bundle, [known[b][-bundle.max_len :] for b in batch])
        for j, b in enumerate(batch):
            found = search(bundle, queries[j : j + 1], lengths[b], None, set(known[b]))
            out[b] = [bundle.item_ids[i] for i, _ in found]
    fallbacks = 0
    for b, k in enumerate(known):
        if not k:
            seen = set(histories[b])
            out[b] = [i for i in bundle.popular if i not in seen][: lengths[b]]
            fallbacks += 1
    return out, fallbacks


def load_bundles(paths: Sequence[str | Path]) -> list[tuple[str, Any]]:
    """(label, bundle) per path, verified and loaded as the service does.

    Raises:
        ConfigError: a path named twice; BundleError: not a usable bundle.
    """
    from mqsa.service.bundle import load_bundle

    labels = [str(p) for p in paths]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"each --bundle once, got {labels}")
    key = os.environ.get("MQSA_BUNDLE_HMAC_KEY") or None
    threads = min(4, os.cpu_count() or 1)
    return [
        (str(p), load_bundle(p, onnx_threads=threads, faiss_threads=threads, hmac_key=key)) for p in paths
    ]


def replay(
    archive: str,
    since: str,
    until: str | None = None,
    config: ReplayConfig | None = None,
    bundles: Sequence[str | Path] = (),
) -> dict[str, Any]:
    """``mqsa evaluate --online``: the online metrics of ``[since, until)`` from the archive, and
    with ``bundles`` the counterfactual.

    Args:
        since, until: unix seconds, ISO-8601 dates or times, or spans before now (``7d``);
            ``until`` None: now.

    Raises:
        ConfigError: a bad time or setting; DataError: a bad archive or none of its entries in
            the window; BundleError: a bundle that is not usable.
    """
    config = config or ReplayConfig()
    config.check()
    lo, hi, context = _times(since, until, config.context_since)
    loaded = load_bundles(bundles) if bundles else []  # fail fast, before reading the archive
    t = config.attribution_window
    first = lo - t  # the lists the window's events may be attributed to; the bundles: histories
    first = (None if context is None else min(first, context)) if loaded else first
    frame, complete = _read(archive, first, hi + t if loaded else hi)
    if not _in(frame["ms"], lo, hi).any():
        raise DataError(f"the archive holds no entry from {utc(lo)} to {utc(hi)}", archive)
    result = {
        "archive": str(archive),
        "window": {"since": lo, "until": hi, "since_utc": utc(lo), "until_utc": utc(hi)},
        **replay_metrics(
            frame,
            t,
            lo,
            hi,
            {b.model_version: b.num_items for _, b in loaded},
            click_type=config.click_event_type,
            conversion_type=config.conversion_event_type,
        ),
    }
    if loaded:
        history = (config.history_types(), config.history_cap, config.conversion_event_type, context)
        result["counterfactual"] = {
            **replay_bundles(frame, loaded, lo, hi, t, *history),
            "attribution_complete": complete,
            "context_since": context,
        }
    return result


def _times(since: str, until: str | None, context: str | None) -> tuple[float, float, float | None]:
    """The window's bounds and the histories' start, in seconds (``until`` None: now).

    Raises:
        ConfigError: a time that is none, or ``since`` not before ``until``.
    """
    lo = parse_time(since, name="--since")
    hi = time.time() if until is None else parse_time(until, name="--until")
    if lo >= hi:
        raise ConfigError(f"--since ({utc(lo)}) must be before --until ({utc(hi)})")
    return lo, hi, None if context is None else parse_time(context, name="--context-since")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _table(columns: Sequence[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


MODEL_COLUMNS = (
    "model_version",
    "mode",
    "impressions",
    "clicks",
    "hits",
    "conversions",
    "ctr",
    "hit_rate",
    "conversion_rate",
    "distinct_items",
    "coverage",
)
COUNTERFACTUAL_COLUMNS = (
    "lists",
    "hits",
    "hit_rate",
    "conversions",
    "conversion_rate",
    "distinct_items",
    "overlap",
    "fallbacks",
)


def replay_table(result: dict[str, Any]) -> str:
    """:func:`replay`'s result as markdown tables, with the window and the events per type."""
    w = result["window"]
    events = ", ".join(f"{k} {v}" for k, v in result["events"].items()) or "none"
    out = [
        f"\nonline metrics replayed from {result['archive']}, {w['since_utc']} to {w['until_utc']} "
        f"(attribution window {result['attribution_window_seconds']:g} s); events: {events}\n",
        _table(MODEL_COLUMNS, [[m[c] for c in MODEL_COLUMNS] for m in result["models"]]),
    ]
    cf = result.get("counterfactual")
    if cf:
        served = ", ".join(f"{v} {n}" for v, n in cf["served_versions"].items()) or "none"
        out.append(
            f"\ncounterfactual: the window's {cf['lists']} served /recommend lists (served by {served}) "
            "made again by each bundle from the same histories; hits and conversions within T of "
            "each list, by the same rule for all (CTR cannot be replayed)\n"
        )
        rows = [[label, *(m.get(c) for c in COUNTERFACTUAL_COLUMNS)] for label, m in cf["models"].items()]
        out.append(_table(("model", *COUNTERFACTUAL_COLUMNS), rows))
        if not cf["attribution_complete"]:
            out.append(
                "\nwarning: the archive ends before until + T: the last lists' hits and conversions "
                "may be undercounted"
            )
    return "\n".join(out) + "\n"
