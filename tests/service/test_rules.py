"""The catalogue's rules as bitmaps, against a brute force over a hand-made catalogue."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from mqsa.service.catalogue import ItemRecord
from mqsa.service.rules import NO_FILTER, Filter, Rules, count_bits

ITEMS = [f"i{n}" for n in range(21)]  # 21: the last byte of a bitmap is partly past the items
NOW = 1_800_000_000.0


def catalogue() -> dict[str, ItemRecord]:
    rng = random.Random(4)
    records = {}
    for n, item_id in enumerate(ITEMS):
        if n % 7 == 6:
            continue  # some items have no record: available, no category
        categories = tuple(rng.sample(["shoes", "bags", "hats", "sale"], rng.randint(0, 2)))
        labels = {"brand": rng.choice(["acme", "zenith", "orbit"])} if n % 3 else {}
        if n % 5 == 0:
            labels["colour"] = rng.choice(["red", "blue"])
        records[item_id] = ItemRecord(
            categories=categories,
            labels=labels,
            available=n % 4 != 3,
            expires_at=NOW + 100 if n == 8 else NOW - 1 if n == 9 else None,
        )
    return records


def brute_force(records: dict[str, ItemRecord], flt: Filter, now: float) -> set[str]:
    """Written from the API's words, not from the code: include-any within a part, every part must hold."""
    out = set()
    for item_id in ITEMS:
        r = records.get(item_id, ItemRecord())
        if not r.available or (r.expires_at is not None and r.expires_at <= now):
            continue
        if flt.categories and not any(c in r.categories for c in flt.categories):
            continue
        if any(c in r.categories for c in flt.exclude_categories):
            continue
        if all(r.labels.get(name) in values for name, values in flt.labels):
            out.add(item_id)
    return out


def allowed_ids(rules: Rules, flt: Filter, now: float) -> set[str]:
    bits = np.unpackbits(rules.allowed(flt, now), bitorder="little")[: rules.n]
    return {rules.item_ids[i] for i in np.flatnonzero(bits)}


FILTERS = [
    Filter(categories=cats, exclude_categories=excl, labels=labels)
    for cats in ((), ("shoes",), ("shoes", "hats"), ("nowhere",))
    for excl in ((), ("sale",), ("bags", "sale"))
    for labels in ((), (("brand", ("acme",)),), (("brand", ("acme", "orbit")), ("colour", ("red",))))
]


@pytest.mark.parametrize("flt", FILTERS, ids=str)
def test_every_filter_combination_equals_the_brute_force(flt: Filter) -> None:
    records = catalogue()
    rules = Rules(ITEMS, records)
    assert allowed_ids(rules, flt, NOW) == brute_force(records, flt, NOW)
    assert {i for i in ITEMS if rules.passes(i, flt, NOW)} == brute_force(records, flt, NOW)


def test_the_bitmap_never_allows_an_item_past_the_last() -> None:
    rules = Rules(ITEMS)
    assert count_bits(rules.allowed(NO_FILTER, NOW)) == 21 and rules.hides_nothing


def test_an_item_is_hidden_when_it_expires_and_changes_apply_item_by_item() -> None:
    records = catalogue()
    rules = Rules(ITEMS, records)
    assert "i8" in allowed_ids(rules, NO_FILTER, NOW) and "i9" not in allowed_ids(rules, NO_FILTER, NOW)
    assert "i8" not in allowed_ids(rules, NO_FILTER, NOW + 101)  # its time came
    shoes = Filter(categories=("shoes",))
    rules.apply({"i0": ItemRecord(categories=("shoes",), available=True)}, NOW)
    records["i0"] = ItemRecord(categories=("shoes",))
    rules.apply({"i1": None}, NOW)  # deleted: back to no record
    records.pop("i1", None)
    for flt in [*FILTERS, shoes]:
        assert allowed_ids(rules, flt, NOW + 200) == brute_force(records, flt, NOW + 200), flt
    assert not rules.hides_nothing


def test_fresh_items_are_explored_newest_first_within_the_filter() -> None:
    rules = Rules(ITEMS, catalogue())
    rules.apply(
        {
            "new-a": ItemRecord(categories=("shoes",), created_at=10),
            "new-b": ItemRecord(categories=("shoes",), created_at=30),
            "new-c": ItemRecord(categories=("hats",), created_at=20),
            "new-d": ItemRecord(categories=("shoes",), created_at=40, available=False),
        },
        NOW,
    )
    assert rules.explore(2, NO_FILTER, set()) == ["new-b", "new-c"]
    assert rules.explore(5, Filter(categories=("shoes",)), set()) == ["new-b", "new-a"]  # never the hidden d
    assert rules.explore(5, NO_FILTER, {"new-b"}) == ["new-c", "new-a"]
    random_pick = rules.explore(3, NO_FILTER, set(), pick="random", rng=random.Random(0))
    assert sorted(random_pick) == ["new-a", "new-b", "new-c"]
    assert rules.passes("new-a", Filter(categories=("shoes",))) and not rules.passes("new-d")


def test_rules_for_another_bundle_keep_every_record() -> None:
    rules = Rules(ITEMS, catalogue())
    rules.apply({"new-a": ItemRecord(categories=("shoes",))}, NOW)
    bigger = Rules([*ITEMS, "new-a"], rules.all_records())
    assert "new-a" not in bigger.fresh and bigger.record("new-a").categories == ("shoes",)
    for flt in FILTERS:
        assert allowed_ids(bigger, flt, NOW) == brute_force(catalogue(), flt, NOW) | (
            {"new-a"} if Filter.matches(flt, bigger.record("new-a")) else set()
        )


def test_allowed_is_fast_enough_at_a_million_items() -> None:
    """The per-request cost of a filter: a few bitwise operations on N/8 bytes."""
    import time

    items = [f"x{n}" for n in range(1_000_000)]
    rng = np.random.default_rng(0)
    records = {
        items[i]: ItemRecord(categories=(f"c{i % 10}",)) for i in rng.choice(10**6, 50_000, replace=False)
    }
    rules = Rules(items, records)
    flt = Filter(categories=("c1", "c2"), exclude_categories=("c3",))
    started = time.perf_counter()
    for _ in range(20):
        bits = rules.allowed(flt)
    per_call = (time.perf_counter() - started) / 20
    assert count_bits(bits) == sum(1 for r in records.values() if r.categories[0] in ("c1", "c2"))
    assert per_call < 0.005, per_call
    assert list(itertools.islice(iter(rules.index), 2)) == ["x0", "x1"]
