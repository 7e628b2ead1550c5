"""The catalogue and its rules through the real app and Redis: every route obeys them."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from mqsa.service.app import create_app
from mqsa.service.settings import Settings


def make(bundle_dir: Path, redis_url: str, prefix: str, **overrides: Any) -> TestClient:
    settings = Settings(
        bundle_dir=bundle_dir,
        redis_url=redis_url,
        redis_prefix=prefix,
        catalogue_poll_seconds=0.05,
        **overrides,
    )
    return TestClient(create_app(settings))


@pytest.fixture
def client(bundle_dir, redis_url, key_prefix) -> Iterator[TestClient]:
    with make(bundle_dir, redis_url, key_prefix) as c:
        yield c


@pytest.fixture(scope="module")
def vocab(bundle_dir) -> list[str]:
    return json.loads((bundle_dir / "items.json").read_text())["item_ids"]


def put(client: TestClient, items: list[dict]) -> int:
    """Write items and wait until this worker has applied them; returns the catalogue version."""
    r = client.put("/items", json={"items": items})
    assert r.status_code == 200, r.text
    version = r.json()["catalogue_version"]
    deadline = time.monotonic() + 5
    while client.get("/readyz").json().get("catalogue_version", -1) < version:
        assert time.monotonic() < deadline, "the worker never applied the change"
        time.sleep(0.02)
    return version


def ids(r: httpx.Response) -> list[str]:
    assert r.status_code == 200, r.text
    return [item["item_id"] for item in r.json()["items"]]


def test_put_get_delete_with_partial_updates(client, vocab) -> None:
    put(
        client,
        [{"item_id": vocab[0], "categories": ["shoes"], "labels": {"brand": "acme"}, "expires_at": 4e9}],
    )
    put(client, [{"item_id": vocab[0], "available": False}])  # categories and labels kept
    got = client.get(f"/items/{vocab[0]}").json()
    assert got["categories"] == ["shoes"] and got["labels"] == {"brand": "acme"} and got["available"] is False
    assert (
        got["expires_at"] == 4e9 and got["known_to_model"] is True and got["updated_at"] >= got["created_at"]
    )
    put(client, [{"item_id": vocab[0], "expires_at": None, "labels": None}])  # null: back to the default
    got = client.get(f"/items/{vocab[0]}").json()
    assert got["expires_at"] is None and got["labels"] == {} and got["categories"] == ["shoes"]
    put(client, [{"item_id": "brand-new", "categories": []}])
    assert client.get("/items/brand-new").json()["known_to_model"] is False
    assert client.delete(f"/items/{vocab[0]}").status_code == 204
    missing = client.get(f"/items/{vocab[0]}")
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    assert client.delete(f"/items/{vocab[0]}").status_code == 404


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"items": [{"item_id": "a", "colour": "red"}]}, "items.0.colour"),
        ({"items": [{"item_id": "a", "categories": "shoes"}]}, "items.0.categories"),
        ({"items": [{"item_id": "a"}] * 1001}, "items"),
        ({"items": [{"item_id": "a", "expires_at": "tomorrow"}]}, "items.0.expires_at"),
        ({"items": [{"item_id": "a", "available": "yes"}]}, "items.0.available"),
        ({"items": [{"item_id": " "}]}, "items.0.item_id"),
        ({"items": []}, "items"),
    ],
)
def test_bad_catalogue_input_is_a_422_naming_the_field(client, body, field) -> None:
    r = client.put("/items", json=body)
    assert r.status_code == 422 and field in [f["field"] for f in r.json()["fields"]]


def test_hidden_items_never_come_back_from_any_route(client, vocab) -> None:
    """Unavailable and expired items: not from the model, not from similar items, not from the
    popular fallback, not from the exploration slots."""
    popular = json.loads((client.app.state.registry.bundle.path / "popular.json").read_text())["item_ids"]
    first = ids(client.post("/recommend", json={"user_id": "h", "recent_items": vocab[:5], "n": 30}))
    hidden = set(first[::2]) | set(popular[:10:2])
    put(client, [{"item_id": i, "available": False} for i in sorted(hidden)[::2]])
    put(client, [{"item_id": i, "expires_at": time.time() - 1} for i in sorted(hidden)[1::2]])
    put(client, [{"item_id": "fresh-hidden", "available": False}, {"item_id": "fresh-ok"}])
    answers = [
        client.post("/recommend", json={"user_id": "h", "recent_items": vocab[:5], "n": 30}),
        client.post("/recommend", json={"user_id": "cold", "n": 30}),
        client.get(f"/items/{vocab[3]}/similar?n=50"),
        client.post(f"/items/{vocab[3]}/similar", json={"n": 50, "filter": {}}),
    ]
    for r in answers:
        got = ids(r)
        assert len(got) >= 30 and not set(got) & hidden and "fresh-hidden" not in got
    assert "fresh-ok" in ids(answers[0]) and "fresh-ok" in ids(answers[1])  # explored, in both


def test_filters_in_recommend_equal_the_brute_force(client, vocab) -> None:
    """The flat index is exact: a filtered answer must be the unfiltered ranking, filtered."""
    catalogue = {}
    for n, item_id in enumerate(vocab):
        categories = [c for c, k in (("shoes", 2), ("bags", 3), ("sale", 5)) if n % k == 0]
        catalogue[item_id] = {
            "categories": categories,
            "labels": {"brand": ("acme", "zenith", "orbit")[n % 3]},
        }
    put(client, [{"item_id": i, **doc} for i, doc in catalogue.items()])
    history = vocab[10:16]
    everything = ids(client.post("/recommend", json={"user_id": "f", "recent_items": history, "n": 200}))
    filters = [
        {"categories": ["shoes"]},
        {"categories": ["shoes", "bags"], "exclude_categories": ["sale"]},
        {"labels": {"brand": ["acme", "orbit"]}},
        {"categories": ["bags"], "labels": {"brand": ["zenith"]}},
        {"exclude_categories": ["shoes", "bags", "sale"]},
        {"categories": ["nowhere"]},
    ]
    for flt in filters:

        def passes(item_id: str, flt: dict = flt) -> bool:
            doc = catalogue[item_id]
            if flt.get("categories") and not set(doc["categories"]) & set(flt["categories"]):
                return False
            if set(doc["categories"]) & set(flt.get("exclude_categories", [])):
                return False
            return all(doc["labels"].get(k) in v for k, v in flt.get("labels", {}).items())

        body = {"user_id": "f", "recent_items": history, "n": 20, "filter": flt}
        assert ids(client.post("/recommend", json=body)) == [i for i in everything if passes(i)][:20], flt


def test_a_change_reaches_a_second_worker_within_a_second(bundle_dir, redis_url, key_prefix, vocab) -> None:
    with make(bundle_dir, redis_url, key_prefix) as one, make(bundle_dir, redis_url, key_prefix) as two:
        body = {"user_id": "w", "recent_items": vocab[:5], "n": 5}
        top = ids(two.post("/recommend", json=body))[0]
        sent = time.monotonic()
        assert one.put("/items", json={"items": [{"item_id": top, "available": False}]}).status_code == 200
        while top in ids(two.post("/recommend", json=body)):
            assert time.monotonic() - sent < 1.0, "the second worker still serves the hidden item"
            time.sleep(0.01)


def test_similar_items_are_the_nearest_embeddings_never_the_item_itself(client, vocab) -> None:
    bundle = client.app.state.registry.bundle
    target = bundle.item_index[vocab[7]]
    vectors = bundle.index.reconstruct_n(0, bundle.num_items)
    scores = vectors @ vectors[target]
    expected = [bundle.item_ids[i] for i in scores.argsort()[::-1] if i != target][:10]
    got = client.get(f"/items/{vocab[7]}/similar?n=10").json()
    assert got["item_id"] == vocab[7] and got["model_version"] == bundle.model_version
    assert [i["item_id"] for i in got["items"]] == expected
    put(client, [{"item_id": i, "categories": ["odd"]} for i in vocab[1::2]])
    odd = ids(client.post(f"/items/{vocab[7]}/similar", json={"n": 10, "filter": {"categories": ["odd"]}}))
    assert set(odd) <= set(vocab[1::2]) and vocab[7] not in odd and len(odd) == 10
    unknown = client.get("/items/not-an-item/similar")
    assert unknown.status_code == 404 and "does not know" in unknown.json()["detail"]


def test_new_items_take_their_exploration_slot_within_the_filter(client, vocab) -> None:
    put(client, [{"item_id": f"new-{k}", "categories": ["shoes" if k % 2 else "hats"]} for k in range(4)])
    r = client.post("/recommend", json={"user_id": "e", "recent_items": vocab[:5], "n": 10}).json()
    explored = [(p, i) for p, i in enumerate(r["items"]) if i.get("source") == "explore"]
    assert [(p, i["item_id"], i["score"]) for p, i in explored] == [(5, "new-3", None)]  # 1 in 10, the newest
    assert all(i["score"] is not None for i in r["items"] if "source" not in i)
    hats = {"user_id": "e", "recent_items": vocab[:5], "n": 20, "filter": {"categories": ["hats"]}}
    put(client, [{"item_id": i, "categories": ["hats"]} for i in vocab[:60]])
    r = client.post("/recommend", json=hats).json()
    assert [i["item_id"] for i in r["items"] if i.get("source") == "explore"] == ["new-2", "new-0"]
    quiet = client.post("/recommend", json={**hats, "explore": False}).json()
    assert not [i for i in quiet["items"] if i.get("source")]


def test_at_most_k_items_of_one_category(client, vocab) -> None:
    put(client, [{"item_id": i, "categories": [f"c{n % 4}"]} for n, i in enumerate(vocab)])
    r = client.post(
        "/recommend", json={"user_id": "d", "recent_items": vocab[:5], "n": 8, "max_per_category": 2}
    )
    got = ids(r)
    cats = [client.get(f"/items/{i}").json()["categories"][0] for i in got]
    assert len(got) == 8 and max(cats.count(c) for c in set(cats)) == 2


def test_explored_items_count_toward_the_category_cap(client, vocab) -> None:
    put(client, [{"item_id": i, "categories": ["shoes"]} for i in vocab])
    put(client, [{"item_id": "new-boot", "categories": ["shoes"]}])
    body = {"user_id": "d", "recent_items": vocab[:5], "n": 10, "max_per_category": 1}
    items = client.post("/recommend", json=body).json()["items"]
    assert [(i["item_id"], i.get("source")) for i in items] == [("new-boot", "explore")]  # one shoe in all


def test_a_category_named_twice_counts_once(client, vocab) -> None:
    put(client, [{"item_id": i, "categories": ["shoes", "shoes"]} for i in vocab])
    assert client.get(f"/items/{vocab[0]}").json()["categories"] == ["shoes"]
    body = {"user_id": "d", "recent_items": vocab[:5], "n": 5, "max_per_category": 2, "explore": False}
    assert len(ids(client.post("/recommend", json=body))) == 2


def test_an_empty_label_list_does_not_filter(client, vocab) -> None:
    body = {"user_id": "d", "recent_items": vocab[:5], "n": 5, "explore": False}
    plain = ids(client.post("/recommend", json=body))
    assert ids(client.post("/recommend", json={**body, "filter": {"labels": {"brand": []}}})) == plain


def test_a_list_of_explored_items_only_is_no_error(bundle_dir, redis_url, key_prefix, vocab) -> None:
    """MQSA_EXPLORE_SHARE=1 leaves the model no place: no search with k = 0, no 500."""
    with make(bundle_dir, redis_url, key_prefix, explore_share=1.0) as c:
        put(c, [{"item_id": f"new-{k}", "categories": ["shoes"]} for k in range(3)])
        for extra in ({}, {"filter": {"categories": ["shoes"]}}, {"exclude_seen": False}):
            body = {"user_id": "d", "recent_items": vocab[:5], "n": 2, **extra}
            r = c.post("/recommend", json=body)
            assert r.status_code == 200, r.text
            assert [i["source"] for i in r.json()["items"]] == ["explore", "explore"]
        assert c.post("/recommend", json={"user_id": "nobody", "n": 2}).status_code == 200


def test_the_catalogue_is_reloaded_when_redis_comes_back_empty(
    bundle_dir, redis_server_factory, vocab
) -> None:
    """A Redis that lost its data (restart without persistence, failover) gets a new epoch:
    the worker reloads, and goes on following the changes made after."""
    server = redis_server_factory()
    with make(bundle_dir, server.url, "t") as c:
        put(c, [{"item_id": vocab[0], "available": False}])
        server.stop()
        server.start()  # empty: vocab[0] is visible again, for Redis and so for the worker
        body = {"user_id": "u", "recent_items": vocab[:5], "n": 5, "explore": False}
        deadline = time.monotonic() + 5
        while c.get("/readyz").json().get("catalogue_version") != 0:
            assert time.monotonic() < deadline, "the worker never noticed that Redis lost the catalogue"
            time.sleep(0.05)
        top = ids(c.post("/recommend", json=body))[0]
        put(c, [{"item_id": top, "available": False}])  # version 1 again, in a new epoch
        assert top not in ids(c.post("/recommend", json=body))


def test_a_bundle_seeds_an_empty_catalogue(trained_run, bundle_root, redis_url, key_prefix, tmp_path) -> None:
    from mqsa.training.export import ExportConfig, export_bundle

    seed = tmp_path / "catalogue.csv"
    seed.write_text("item_id,categories,label.brand,available\ni1,shoes|sale,acme,true\ni2,,,false\n")
    out = bundle_root / "with-catalogue"
    export_bundle(trained_run["dir"] / "best.pt", out, ExportConfig(catalogue=seed), force=True)
    with make(out, redis_url, key_prefix) as c:
        got = c.get("/items/i1").json()
        assert got["categories"] == ["shoes", "sale"] and got["labels"] == {"brand": "acme"}
        assert c.get("/items/i2").json()["available"] is False
        assert "i2" not in ids(c.post("/recommend", json={"user_id": "s", "n": 50}))


def test_an_approximate_index_obeys_the_rules_too(second_bundle_dir, redis_url, key_prefix, vocab) -> None:
    """HNSW with the selector: hidden items never come back, in one search."""
    with make(second_bundle_dir, redis_url, key_prefix) as c:
        body = {"user_id": "a", "recent_items": vocab[:5], "n": 20}
        hidden = set(ids(c.post("/recommend", json=body))[:10])
        put(c, [{"item_id": i, "available": False} for i in hidden])
        got = ids(c.post("/recommend", json=body))
        assert len(got) == 20 and not set(got) & hidden
