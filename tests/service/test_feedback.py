"""The feedback loop with the real service and Redis: recommendation ids, impressions, typed
events, and the online metrics per model version (docs/feedback.md)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as sync_redis
from fastapi.testclient import TestClient

from mqsa.demo import wait_ready
from mqsa.service.app import create_app
from mqsa.service.settings import Settings
from mqsa.service.store import HistoryStore, stream_keys

ROOT = Path(__file__).resolve().parents[2]
REC_ID = re.compile(r"^[0-9a-f]{16}-[0-9a-f]{12}-[0-9a-f]{8}$")


def settings(bundle_dir: Path, redis_url: str, prefix: str, **overrides: Any) -> Settings:
    return Settings(
        bundle_dir=bundle_dir, redis_url=redis_url, redis_prefix=prefix, stream_shards=2, **overrides
    )


@pytest.fixture
def pair(bundle_dir, second_bundle_dir, redis_url, key_prefix) -> Iterator[tuple[TestClient, TestClient]]:
    """Two replicas serving two model versions, sharing one Redis (one prefix)."""
    one = TestClient(create_app(settings(bundle_dir, redis_url, key_prefix)))
    two = TestClient(
        create_app(settings(second_bundle_dir, redis_url, key_prefix, bundle_root=bundle_dir.parent))
    )
    with one, two:
        yield one, two


@pytest.fixture(scope="module")
def vocab(bundle_dir) -> list[str]:
    return json.loads((bundle_dir / "items.json").read_text())["item_ids"]


def recommend(client: TestClient, user: str, **body: Any) -> dict:
    response = client.post("/recommend", json={"user_id": user, **body})
    assert response.status_code == 200, response.text
    return response.json()


def send(client: TestClient, *events: dict) -> dict:
    response = client.post("/events", json={"events": list(events)})
    assert response.status_code == 200, response.text
    return response.json()


def model_stats(client: TestClient, version: str, mode: str = "served") -> dict:
    body = client.get("/stats", params={"minutes": 5}).json()
    found = [m for m in body["models"] if m["model_version"] == version and m["mode"] == mode]
    return found[0] if found else {"impressions": 0, "clicks": 0, "hits": 0, "conversions": 0}


def stream_entries(redis_url: str, prefix: str, shards: int = 2) -> list[dict]:
    client = sync_redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return [fields for key in stream_keys(prefix, shards) for _, fields in client.xrange(key)]
    finally:
        client.close()


def test_answers_carry_a_recommendation_id_that_names_their_model_and_are_logged(
    pair, vocab, redis_url, key_prefix
) -> None:
    one, _ = pair
    answer = recommend(one, "alice", recent_items=vocab[:3])
    similar = one.get(f"/items/{vocab[0]}/similar", params={"n": 4, "user_id": "alice"}).json()
    for body in (answer, similar):
        assert REC_ID.match(body["recommendation_id"]) and body["recommendation_id"].startswith(
            body["model_version"]
        )
    assert answer["recommendation_id"] != similar["recommendation_id"]
    logged = {
        e["recommendation_id"]: e
        for e in stream_entries(redis_url, key_prefix)
        if e["event_type"] == "impression"
    }
    served = logged[answer["recommendation_id"]]
    assert json.loads(served["items"]) == [i["item_id"] for i in answer["items"]]
    assert (served["user_id"], served["model_version"], served["route"], served["mode"]) == (
        "alice",
        answer["model_version"],
        "recommend",
        "served",
    )
    assert json.loads(logged[similar["recommendation_id"]]["items"]) == [
        i["item_id"] for i in similar["items"]
    ]
    assert logged[similar["recommendation_id"]]["route"] == "similar"


def test_a_click_carrying_a_recommendation_id_raises_that_models_ctr_and_not_the_others(pair, vocab) -> None:
    one, two = pair
    first, second = recommend(one, "u1", recent_items=vocab[:2]), recommend(two, "u2", recent_items=vocab[:2])
    assert first["model_version"] != second["model_version"]
    item = first["items"][0]["item_id"]
    # sent to the other replica: attribution does not depend on which one takes the event
    send(
        two,
        {
            "user_id": "u1",
            "item_id": item,
            "event_type": "click",
            "recommendation_id": first["recommendation_id"],
        },
    )
    a, b = model_stats(one, first["model_version"]), model_stats(one, second["model_version"])
    assert (a["impressions"], a["clicks"], a["ctr"]) == (1, 1, 1.0)
    assert (b["impressions"], b["clicks"], b["ctr"]) == (1, 0, 0.0)


def test_a_hit_counts_an_event_on_a_served_item_within_the_window_and_not_after(
    bundle_dir, redis_url, key_prefix, vocab
) -> None:
    with TestClient(
        create_app(settings(bundle_dir, redis_url, key_prefix, attribution_window_seconds=1))
    ) as client:
        early = recommend(client, "early", recent_items=vocab[:2], n=5)
        late = recommend(client, "late", recent_items=vocab[:2], n=5)
        version = early["model_version"]
        items = [i["item_id"] for i in early["items"]]
        outside = next(i for i in vocab if i not in items)
        send(client, {"user_id": "early", "item_id": outside})  # not in the list: no hit
        assert model_stats(client, version)["hits"] == 0
        send(client, {"user_id": "early", "item_id": items[3]}, {"user_id": "early", "item_id": items[0]})
        assert model_stats(client, version)["hits"] == 1  # two of its items: the list counts once
        send(client, {"user_id": "other", "item_id": items[1]})  # another user's event: not a hit
        time.sleep(0.6)
        fresh = recommend(client, "late", recent_items=vocab[20:23], n=5)  # keeps "late"'s lists in Redis
        time.sleep(0.6)
        stale = next(
            i["item_id"] for i in late["items"] if i["item_id"] not in {j["item_id"] for j in fresh["items"]}
        )
        send(client, {"user_id": "late", "item_id": stale})  # on the first list only, 1.2 s after it
        stats = model_stats(client, version)
        assert (stats["impressions"], stats["hits"], stats["hit_rate"]) == (3, 1, 1 / 3)


def test_purchases_convert_the_named_list_or_the_newest_holding_the_item(pair, vocab) -> None:
    one, two = pair
    a1 = recommend(one, "buyer", recent_items=vocab[:2], n=5)
    b1 = recommend(two, "buyer", recent_items=vocab[:2], n=5)  # newer, of the other model
    named = a1["items"][0]["item_id"]
    send(
        one,
        {
            "user_id": "buyer",
            "item_id": named,
            "event_type": "purchase",
            "recommendation_id": a1["recommendation_id"],
        },
    )
    a, b = model_stats(one, a1["model_version"]), model_stats(one, b1["model_version"])
    assert (a["conversions"], b["conversions"]) == (1, 0)  # named: only its list converts
    plain = b1["items"][1]["item_id"]  # in the newest list (whether or not the older one has it too)
    send(one, {"user_id": "buyer", "item_id": plain, "event_type": "purchase"})
    a, b = model_stats(one, a1["model_version"]), model_stats(one, b1["model_version"])
    assert (a["conversions"], b["conversions"]) == (1, 1)
    assert (a["conversion_rate"], b["conversion_rate"]) == (1.0, 1.0)


def test_event_types_are_counted_and_only_history_types_reach_the_history(
    bundle_dir, redis_url, key_prefix
) -> None:
    config = settings(bundle_dir, redis_url, key_prefix, history_event_types=["view", "purchase"])
    with TestClient(create_app(config)) as client:
        send(
            client,
            {"user_id": "t", "item_id": "a"},  # an old client: no type, a view
            {"user_id": "t", "item_id": "b", "event_type": "click"},
            {"user_id": "t", "item_id": "c", "event_type": "purchase"},
            {"user_id": "t", "item_id": "c", "event_type": "add_to_cart", "event_id": "x"},
            {"user_id": "t", "item_id": "c", "event_type": "add_to_cart", "event_id": "x"},  # a resend
        )
        body = client.get("/stats").json()
        assert body["events"] == {"add_to_cart": 1, "click": 1, "purchase": 1, "view": 1}
    client = sync_redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        store = HistoryStore(client, prefix=key_prefix, stream_shards=2)  # type: ignore[arg-type]
        assert client.lrange(store.items_key("t"), 0, -1) == ["a", "c"]
        kinds = [e["event_type"] for e in stream_entries(redis_url, key_prefix)]
        assert sorted(kinds) == ["add_to_cart", "click", "purchase", "view"]  # every type is streamed
    finally:
        client.close()


@pytest.mark.parametrize(
    ("event", "field", "says"),
    [
        ({"event_type": "like"}, "events.0.event_type", "must be one of view, click, add_to_cart, purchase"),
        ({"event_type": "impression"}, "events.0.event_type", "must be one of"),
        ({"recommendation_id": "abc"}, "events.0.recommendation_id", "should match pattern"),
        (
            {"recommendation_id": "0123456789ABCDEF-019ad3f2a1c0-7c1e02ab"},
            "events.0.recommendation_id",
            "pattern",
        ),
        ({"event_type": 3}, "events.0.event_type", "string"),
    ],
)
def test_bad_event_type_or_recommendation_id_is_a_422_naming_the_field(
    client_one, event, field, says
) -> None:
    response = client_one.post("/events", json={"events": [{"user_id": "u", "item_id": "i", **event}]})
    assert response.status_code == 422
    body = response.json()
    assert body["error"] == "invalid_request"
    assert [f["field"] for f in body["fields"]] == [field] and says in body["fields"][0]["message"]


@pytest.fixture
def client_one(bundle_dir, redis_url, key_prefix) -> Iterator[TestClient]:
    with TestClient(create_app(settings(bundle_dir, redis_url, key_prefix))) as client:
        yield client


def test_stats_bounds_and_metrics_labels(client_one, vocab) -> None:
    answer = recommend(client_one, "m", recent_items=vocab[:2])
    assert client_one.get("/stats", params={"minutes": 0}).status_code == 422
    assert client_one.get("/stats", params={"minutes": 1441}).status_code == 422
    body = client_one.get("/stats", params={"minutes": 3}).json()
    (model,) = body["models"]
    assert model["role"] == "champion" and model["num_items"] == len(vocab)
    assert len(model["series"]) == 3 and sum(p["impressions"] for p in model["series"]) == 1
    assert model["distinct_items"] == len(answer["items"])
    assert model["coverage"] == pytest.approx(len(answer["items"]) / len(vocab))
    assert model["latency_ms"]["p99"] is not None and model["latency_ms"]["p99"] > 0
    text = client_one.get("/metrics").text
    line = f'mqsa_online_impressions_total{{mode="served",model_version="{answer["model_version"]}"}} 1.0'
    assert line in text


def test_impressions_off_means_no_recommendation_id_and_no_entry(
    bundle_dir, redis_url, key_prefix, vocab
) -> None:
    with TestClient(create_app(settings(bundle_dir, redis_url, key_prefix, log_impressions=False))) as client:
        assert recommend(client, "q", recent_items=vocab[:2])["recommendation_id"] is None
    assert stream_entries(redis_url, key_prefix) == []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(bundle: Path, redis_url: str, prefix: str, port: int) -> subprocess.Popen:
    env = {**os.environ, "MQSA_REDIS_URL": redis_url, "MQSA_REDIS_PREFIX": prefix, "MQSA_STREAM_SHARDS": "2"}
    cmd = [sys.executable, "-m", "mqsa.cli", "serve", "--bundle", str(bundle), "--port", str(port)]
    return subprocess.Popen([*cmd, "--log-level", "warning"], cwd=ROOT, env=env)


def test_two_service_processes_count_into_the_same_numbers(bundle_dir, redis_url, key_prefix, vocab) -> None:
    ports = [free_port(), free_port()]
    servers = [serve(bundle_dir, redis_url, key_prefix, port) for port in ports]
    try:
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        for url, server in zip(urls, servers, strict=True):
            wait_ready(url, server)
        with httpx.Client(timeout=10) as http:
            answers = []
            for n in range(20):
                url = urls[n % 2]
                body = {"user_id": f"p{n}", "recent_items": vocab[n % 7 : n % 7 + 2]}
                answers.append(http.post(f"{url}/recommend", json=body).json())
            for n, answer in enumerate(answers[:10]):
                event = {"user_id": f"p{n}", "item_id": answer["items"][0]["item_id"], "event_type": "click"}
                event["recommendation_id"] = answer["recommendation_id"]
                assert http.post(f"{urls[(n + 1) % 2]}/events", json={"events": [event]}).status_code == 200
            seen = [http.get(f"{url}/stats", params={"minutes": 5}).json() for url in urls]
            metrics = [http.get(f"{url}/metrics").text for url in urls]
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=30)
    (first,), (second,) = seen[0]["models"], seen[1]["models"]
    assert (first["impressions"], first["clicks"], first["hits"]) == (20, 10, 10)
    assert {k: v for k, v in first.items() if k != "series"} == {
        k: v for k, v in second.items() if k != "series"
    }
    online = [
        sorted(line for line in text.splitlines() if line.startswith("mqsa_online_")) for text in metrics
    ]
    assert online[0] == online[1] and any(
        "clicks_total" in line and line.endswith(" 10.0") for line in online[0]
    )


def test_shadow_lists_are_logged_and_hit_but_never_served(
    bundle_dir, second_bundle_dir, redis_url, key_prefix, vocab
) -> None:
    config = settings(bundle_dir, redis_url, key_prefix, challengers=f"{second_bundle_dir.name}=shadow")
    with TestClient(create_app(config)) as client:
        champion = client.get("/model").json()["model_version"]
        answers = [recommend(client, f"s{n}", recent_items=vocab[n : n + 2], n=5) for n in range(12)]
        assert {a["model_version"] for a in answers} == {champion}
        entries = stream_entries(redis_url, key_prefix)
        shadow = [e for e in entries if e["event_type"] == "impression" and e["mode"] == "shadow"]
        assert len(shadow) == 12 and {e["model_version"] for e in shadow} != {champion}
        served_ids = {a["recommendation_id"] for a in answers}
        assert not served_ids & {e["recommendation_id"] for e in shadow}  # its ids never reach a client
        first = next(e for e in shadow if e["user_id"] == "s0")
        send(client, {"user_id": "s0", "item_id": json.loads(first["items"])[0], "event_type": "purchase"})
        body = client.get("/stats", params={"minutes": 5}).json()
        (lists,) = [m for m in body["models"] if m["mode"] == "shadow"]
        assert (lists["impressions"], lists["hits"], lists["conversions"], lists["clicks"]) == (12, 1, 1, 0)
        assert lists["role"] == "challenger" and body["traffic"]["shadow"] == [lists["model_version"]]


def test_offline_replay_of_the_archive_agrees_with_the_online_numbers(
    bundle_dir, second_bundle_dir, redis_url, key_prefix, vocab, tmp_path
) -> None:
    """The same traffic, counted online by the service and replayed from the archive
    (`mqsa evaluate --online`), gives the same numbers per model version and mode."""
    from mqsa.training.replay import read_feedback, replay_metrics
    from tests.service.test_archive import archive_once

    config = settings(
        bundle_dir, redis_url, key_prefix, stream_archive=True, challengers=f"{second_bundle_dir.name}=shadow"
    )
    with TestClient(create_app(config)) as client:
        for n in range(30):
            user = f"r{n % 9}"
            answer = recommend(client, user, recent_items=vocab[n % 11 : n % 11 + 3], n=6)
            items = [i["item_id"] for i in answer["items"]]
            rec = answer["recommendation_id"]
            events = [{"user_id": user, "item_id": items[n % 6]}]  # a view of a listed item: a hit
            if n % 3 == 0:
                events.append(
                    {"user_id": user, "item_id": items[0], "event_type": "click", "recommendation_id": rec}
                )
            if n % 4 == 0:
                events.append({"user_id": user, "item_id": items[1], "event_type": "purchase"})
            if n % 5 == 0:
                events.append(
                    {
                        "user_id": user,
                        "item_id": vocab[-1],
                        "event_type": "purchase",
                        "recommendation_id": rec,
                    }
                )
            if n % 7 == 0:
                events.append({"user_id": user, "item_id": vocab[(n * 13) % len(vocab)]})  # maybe a hit
            send(client, *events)
        # the edges: a user past the 50 lists kept for attribution, an anonymous list, a resend, a made-up id
        heavy = [recommend(client, "heavy", recent_items=vocab[k : k + 2], n=4) for k in range(55)]
        for k in (0, 4, 5, 30):
            send(
                client, {"user_id": "heavy", "item_id": heavy[k]["items"][-1]["item_id"], "event_id": f"h{k}"}
            )
        send(client, {"user_id": "heavy", "item_id": heavy[5]["items"][-1]["item_id"], "event_id": "h5"})
        anonymous = client.get(f"/items/{vocab[3]}/similar", params={"n": 3}).json()
        click = {"user_id": "z", "item_id": anonymous["items"][0]["item_id"], "event_type": "click"}
        send(client, {**click, "recommendation_id": anonymous["recommendation_id"]})
        send(client, {**click, "recommendation_id": "00000000000000ff-019ad3f2a1c0-7c1e02ab"})
        totals = client.get("/stats", params={"minutes": 10}).json()
    archive_once(redis_url, key_prefix, str(tmp_path), shards=2)
    replayed = replay_metrics(read_feedback(str(tmp_path)), config.attribution_window_seconds)
    counted = ("impressions", "attributable", "clicks", "hits", "conversions", "hit_rate")

    def table(models: list[dict]) -> dict:
        return {(m["model_version"], m["mode"]): {c: m[c] for c in counted} for m in models}

    online = table(totals["models"])
    assert {mode for _, mode in online} == {"served", "shadow"}
    served = next(k for k in online if k[1] == "served" and k[0] != "unknown")
    assert online[served]["clicks"] == 11 and online[("unknown", "served")]["clicks"] == 1
    assert online[served]["impressions"] == online[served]["attributable"] + 1  # the anonymous list
    assert table(replayed["models"]) == online
    assert replayed["events"] == totals["events"]


def test_a_failing_stats_write_never_fails_the_request(client_one, redis_url, key_prefix, vocab) -> None:
    """The events are stored, and the list is computed, before their counts are written: a
    refused write (here WRONGTYPE) is counted as dropped, and the client gets its answer."""
    client = sync_redis.Redis.from_url(redis_url)
    try:
        client.set(f"{key_prefix}:{{stats}}:total", "not a hash")
    finally:
        client.close()
    answer = recommend(client_one, "w", recent_items=vocab[:2])
    event = {"user_id": "w", "item_id": answer["items"][0]["item_id"], "event_type": "click"}
    assert send(client_one, {**event, "recommendation_id": answer["recommendation_id"]})["accepted"] == 1
    text = client_one.get("/metrics").text
    assert 'mqsa_feedback_dropped_total{what="impressions"} 1.0' in text
    assert 'mqsa_feedback_dropped_total{what="event_counts"} 1.0' in text


def test_a_made_up_recommendation_id_counts_for_no_real_model(client_one, vocab) -> None:
    """A click whose id names a version that never served goes to `unknown`: made-up ids
    cannot add models (or Prometheus series) without bound."""
    answer = recommend(client_one, "f", recent_items=vocab[:2])
    made_up = "00000000000000ff-019ad3f2a1c0-7c1e02ab"
    send(client_one, {"user_id": "f", "item_id": "x", "event_type": "click", "recommendation_id": made_up})
    versions = {m["model_version"]: m for m in client_one.get("/stats").json()["models"]}
    assert set(versions) == {answer["model_version"], "unknown"}
    assert (versions["unknown"]["clicks"], versions[answer["model_version"]]["clicks"]) == (1, 0)


def test_attribution_matches_item_ids_with_any_characters(redis_url, key_prefix) -> None:
    """Item ids go to Lua as JSON and come back out of cjson; ids with non-ASCII characters,
    Lua pattern characters or the list's own separator `|` are still found."""
    import asyncio

    from mqsa.service.store import Event, Impression, connect

    items = ["é", "日本", "a|b", "%d.*[", "plain"]
    version = "0123456789abcdef"

    async def main() -> list[list[tuple[str, str, str]]]:
        client = connect(redis_url, timeout_seconds=3.0)
        try:
            store = HistoryStore(client, prefix=key_prefix, stream_shards=2)
            lists = [  # one list per id, so each id must be found on its own
                Impression(
                    "u", f"{version}-019ad3f2a1c0-{n:08x}", version, "served", "recommend", [item, "x"], 0.0
                )
                for n, item in enumerate(items)
            ]
            await store.log_impressions(lists, time.time())
            result = await store.append([Event("u", item) for item in [*items, "absent"]])
            return result.attributions
        finally:
            await client.aclose()

    assert asyncio.run(main()) == [[("h", version, "served")]] * len(items) + [[]]
