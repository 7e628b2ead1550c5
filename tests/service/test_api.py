"""The HTTP API end to end: a tiny trained bundle, a real Redis, FastAPI's test client."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from mqsa.service.app import create_app
from mqsa.service.bundle import load_bundle
from mqsa.service.settings import Settings

KEY = "k" * 20


def make_settings(bundle_dir: Path, redis_url: str, prefix: str, **overrides: Any) -> Settings:
    return Settings(bundle_dir=bundle_dir, redis_url=redis_url, redis_prefix=prefix, **overrides)


@pytest.fixture
def client(bundle_dir, redis_url, key_prefix) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(bundle_dir, redis_url, key_prefix))) as c:
        yield c


@pytest.fixture(scope="module")
def vocab(bundle_dir) -> list[str]:
    return json.loads((bundle_dir / "items.json").read_text())["item_ids"]


@pytest.fixture(scope="module")
def manifest(bundle_dir) -> dict:
    return json.loads((bundle_dir / "manifest.json").read_text())


def post_events(client: TestClient, user: str, items: list[str], **extra: Any) -> httpx.Response:
    return client.post("/events", json={"events": [{"user_id": user, "item_id": i, **extra} for i in items]})


def ids(response: httpx.Response) -> list[str]:
    return [item["item_id"] for item in response.json()["items"]]


def test_events_then_recommend(client, vocab, manifest) -> None:
    history = vocab[:5]
    stored = post_events(client, "alice", history)
    assert stored.status_code == 200
    assert stored.json() == {"accepted": 5, "duplicates": 0, "unknown_items": 0}
    r = client.post("/recommend", json={"user_id": "alice", "n": 10})
    assert r.status_code == 200
    body = r.json()
    assert body["user_id"] == "alice" and body["source"] == "model" and body["degraded"] is False
    assert body["model_version"] == manifest["model_version"]
    assert len(body["items"]) == 10 and not set(ids(r)) & set(history)
    scores = [item["score"] for item in body["items"]]
    assert scores == sorted(scores, reverse=True)
    # the same history given as recent_items gives the same answer
    same = client.post("/recommend", json={"user_id": "bob", "n": 10, "recent_items": history})
    assert ids(same) == ids(r)


def test_seen_and_excluded_items_never_come_back(client, vocab) -> None:
    post_events(client, "carol", vocab[10:30])
    first = ids(client.post("/recommend", json={"user_id": "carol", "n": 20}))
    excluded = first[:10]
    r = client.post("/recommend", json={"user_id": "carol", "n": 50, "exclude_items": excluded})
    got = set(ids(r))
    assert len(got) == 50 and not got & set(vocab[10:30]) and not got & set(excluded)
    kept = client.post("/recommend", json={"user_id": "carol", "n": 50, "exclude_seen": False})
    assert set(ids(kept)) & set(vocab[10:30])  # seen items may come back only when asked


def test_exactly_n_when_the_catalogue_allows(client, vocab) -> None:
    post_events(client, "dan", vocab[:150])
    assert len(ids(client.post("/recommend", json={"user_id": "dan", "n": 50}))) == 50
    everything_left = client.post("/recommend", json={"user_id": "dan", "n": 200})
    assert len(ids(everything_left)) == 50  # 200 items, 150 seen


def test_event_ids_are_idempotent(client, vocab) -> None:
    events = [{"user_id": "erin", "item_id": vocab[1], "event_id": "e1"}]
    assert client.post("/events", json={"events": events}).json()["accepted"] == 1
    again = client.post("/events", json={"events": [*events, {"user_id": "erin", "item_id": vocab[2]}]})
    assert again.json() == {"accepted": 1, "duplicates": 1, "unknown_items": 0}


def test_unknown_items_are_stored_and_counted(client, vocab) -> None:
    r = post_events(client, "fay", ["not-in-catalogue", vocab[3]])
    assert r.json() == {"accepted": 2, "duplicates": 0, "unknown_items": 1}
    rec = client.post("/recommend", json={"user_id": "fay", "n": 5})
    assert rec.json()["source"] == "model" and vocab[3] not in ids(rec)


def test_cold_start_gets_popular_items(client, manifest, bundle_dir) -> None:
    popular = json.loads((bundle_dir / "popular.json").read_text())["item_ids"]
    r = client.post("/recommend", json={"user_id": "nobody", "n": 7})
    assert r.json()["source"] == "popular" and ids(r) == popular[:7]
    only_unknown = client.post("/recommend", json={"user_id": "x", "n": 3, "recent_items": ["nope"]})
    assert only_unknown.json()["source"] == "popular"
    skip = client.post("/recommend", json={"user_id": "nobody", "n": 3, "exclude_items": popular[:2]})
    assert ids(skip) == popular[2:5]


def test_concurrent_events_for_one_user_lose_nothing(bundle_dir, redis_url, key_prefix, vocab) -> None:
    """200 concurrent /events calls for one user: every event stored, each request's events in order."""
    app = create_app(make_settings(bundle_dir, redis_url, key_prefix, history_cap=1000))

    async def main() -> list[str]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:

                async def send(r: int) -> int:
                    events = [{"user_id": "zed", "item_id": f"r{r}-{k}"} for k in range(3)]
                    return (await http.post("/events", json={"events": events})).status_code

                statuses = await asyncio.gather(*(send(r) for r in range(200)))
                assert set(statuses) == {200}
            return await app.state.store.history("zed", 1000)

    history = asyncio.run(main())
    assert len(history) == 600
    for r in range(200):
        positions = [history.index(f"r{r}-{k}") for k in range(3)]
        assert positions == list(range(positions[0], positions[0] + 3))


def test_redis_down_then_back(bundle_dir, key_prefix, vocab, redis_server_factory) -> None:
    server = redis_server_factory()
    with TestClient(create_app(make_settings(bundle_dir, server.url, key_prefix))) as c:
        assert post_events(c, "gus", vocab[:4]).status_code == 200
        server.stop()
        down = post_events(c, "gus", vocab[4:6])
        assert down.status_code == 503 and down.headers["retry-after"] == "1"
        assert "redis unavailable" in down.json()["detail"]
        degraded = c.post("/recommend", json={"user_id": "gus", "n": 5})
        assert degraded.status_code == 200
        assert degraded.json()["degraded"] is True and degraded.json()["source"] == "popular"
        session = c.post("/recommend", json={"user_id": "gus", "n": 5, "recent_items": vocab[:4]})
        assert session.json()["degraded"] is True and session.json()["source"] == "model"
        assert c.get("/readyz").status_code == 503
        server.start()
        assert post_events(c, "gus", vocab[4:6]).status_code == 200
        back = c.post("/recommend", json={"user_id": "gus", "n": 5})
        assert back.json()["degraded"] is False and back.json()["source"] == "model"
        assert c.get("/readyz").status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/events", {"events": []}, "events"),
        ("/events", {"events": [{"user_id": "u", "item_id": ""}]}, "events.0.item_id"),
        ("/events", {"events": [{"user_id": "u" * 300, "item_id": "i"}]}, "events.0.user_id"),
        ("/events", {"events": [{"user_id": 5, "item_id": "i"}]}, "events.0.user_id"),
        ("/events", {"events": [{"user_id": "u", "item_id": "i", "colour": "red"}]}, "events.0.colour"),
        ("/events", {"events": [{"user_id": "u", "item_id": "i"}] * 1001}, "events"),
        (
            "/events",
            {"events": [{"user_id": "u", "item_id": "i", "timestamp": "soon"}]},
            "events.0.timestamp",
        ),
        ("/events", {"evnts": []}, "events"),
        ("/recommend", {"user_id": "u", "n": 0}, "n"),
        ("/recommend", {"user_id": "u", "n": 201}, "n"),
        ("/recommend", {"user_id": "u", "n": "ten"}, "n"),
        ("/recommend", {"user_id": ""}, "user_id"),
        ("/recommend", {"user_id": "u", "alpha": 1.5}, "alpha"),
        ("/recommend", {"user_id": "u", "exclude_items": "abc"}, "exclude_items"),
        ("/recommend", {"user_id": "u", "mode": "fast"}, "mode"),
    ],
)
def test_bad_input_is_a_4xx_naming_the_field(client, path: str, body: dict, field: str) -> None:
    r = client.post(path, json=body)
    assert r.status_code == 422
    assert r.json()["error"] == "invalid_request"
    assert field in [d["field"] for d in r.json()["detail"]]
    assert all(d["message"] for d in r.json()["detail"])


def test_malformed_json_and_oversize_body(bundle_dir, redis_url, key_prefix) -> None:
    with TestClient(create_app(make_settings(bundle_dir, redis_url, key_prefix, max_body_bytes=2048))) as c:
        broken = c.post("/events", content=b'{"events": [', headers={"content-type": "application/json"})
        assert broken.status_code == 422 and broken.json()["error"] == "invalid_request"
        big = {"events": [{"user_id": "u", "item_id": "i" * 200}] * 20}
        too_big = c.post("/events", json=big)
        assert too_big.status_code == 413 and "exceeds 2048 bytes" in too_big.json()["detail"]
        streamed = c.post("/events", content=iter([b"x" * 1500, b"x" * 1500]))  # no content-length
        assert streamed.status_code == 413


def test_api_keys_guard_events_and_admin_only(bundle_dir, redis_url, key_prefix, vocab) -> None:
    settings = make_settings(bundle_dir, redis_url, key_prefix, api_keys=[KEY])
    with TestClient(create_app(settings)) as c:
        missing = post_events(c, "h", vocab[:1])
        assert missing.status_code == 401 and "API key is required" in missing.json()["detail"]
        wrong = c.post(
            "/events", json={"events": [{"user_id": "h", "item_id": vocab[0]}]}, headers={"X-API-Key": "x"}
        )
        assert wrong.status_code == 401 and "not valid" in wrong.json()["detail"]
        ok = c.post(
            "/events", json={"events": [{"user_id": "h", "item_id": vocab[0]}]}, headers={"X-API-Key": KEY}
        )
        assert ok.status_code == 200
        assert c.post("/admin/reload").status_code == 401
        bearer = c.post("/admin/reload", headers={"Authorization": f"Bearer {KEY}"})
        assert bearer.status_code == 200
        assert c.post("/recommend", json={"user_id": "h"}).status_code == 200  # reads need no key


def test_health_ready_model_and_metrics(client, manifest, vocab) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["checks"] == {"bundle": True, "redis": True}
    model = client.get("/model").json()
    assert model["model_version"] == manifest["model_version"] and model["num_items"] == 200
    post_events(client, "m", vocab[:3])
    client.post("/recommend", json={"user_id": "m"})
    client.post("/recommend", json={"user_id": "m", "n": 0})
    text = client.get("/metrics").text
    assert 'mqsa_request_seconds_count{method="POST",route="/recommend",status="200"} 1.0' in text
    assert 'mqsa_request_seconds_count{method="POST",route="/recommend",status="422"} 1.0' in text
    for stage in ("redis", "encoder", "search"):
        assert f'mqsa_stage_seconds_count{{stage="{stage}"}}' in text
    assert f'mqsa_model_info{{version="{manifest["model_version"]}"}} 1.0' in text
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/events", "/recommend", "/admin/reload"}


def test_two_app_instances_share_all_state(bundle_dir, redis_url, key_prefix, vocab) -> None:
    """Workers behave like one: events sent to one instance shape the other's answers."""
    settings = make_settings(bundle_dir, redis_url, key_prefix)
    with TestClient(create_app(settings)) as one, TestClient(create_app(settings)) as two:
        post_events(one, "ivy", vocab[40:45])
        a = two.post("/recommend", json={"user_id": "ivy", "n": 10})
        b = one.post("/recommend", json={"user_id": "ivy", "n": 10})
        assert a.json()["source"] == "model" and ids(a) == ids(b)
        assert not set(ids(a)) & set(vocab[40:45])


def test_reload_under_traffic_swaps_models_without_a_failed_request(
    client, bundle_dir, second_bundle_dir, tmp_path, vocab, monkeypatch
) -> None:
    """Four clients keep asking while the bundle is swapped: every answer is whole, requests sent
    while the (slow, 0.4 s) load runs are answered during it by the old model (the event loop
    keeps serving), and every request that starts after the swap gets the new model."""
    from mqsa.service import registry

    def slow_load(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.4)
        return load_bundle(*args, **kwargs)

    monkeypatch.setattr(registry, "load_bundle", slow_load)
    before = client.get("/model").json()["model_version"]
    after = json.loads((second_bundle_dir / "manifest.json").read_text())["model_version"]
    assert before != after
    post_events(client, "jo", vocab[:6])
    failures: list[int] = []
    served: list[tuple[float, float, str]] = []  # (sent, answered, model version)
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            sent = time.perf_counter()
            r = client.post("/recommend", json={"user_id": "jo", "n": 5})
            if r.status_code != 200 or len(r.json()["items"]) != 5:
                failures.append(r.status_code)
            else:
                served.append((sent, time.perf_counter(), r.json()["model_version"]))

    def wait_for(count: int) -> None:
        deadline = time.perf_counter() + 30
        while len(served) < count and time.perf_counter() < deadline:
            time.sleep(0.005)

    workers = [threading.Thread(target=traffic) for _ in range(4)]
    for w in workers:
        w.start()
    wait_for(20)  # traffic is flowing before the swap
    swap_sent = time.perf_counter()
    swapped = client.post("/admin/reload", json={"bundle_dir": str(second_bundle_dir)})
    swap_done = time.perf_counter()
    wait_for(len(served) + 20)  # and after it
    stop.set()
    for w in workers:
        w.join()
    assert swapped.status_code == 200
    assert swapped.json() == {"reloaded": True, "model_version": after, "previous_version": before}
    assert failures == []
    assert {version for *_, version in served} == {before, after}
    inside = [version for sent, answered, version in served if swap_sent < sent and answered < swap_done]
    assert len(inside) >= 10 and set(inside) == {before}, f"{len(inside)} answered while the bundle loaded"
    started_after = [version for sent, _, version in served if sent > swap_done]
    assert started_after and set(started_after) == {after}

    corrupted = Path(shutil.copytree(bundle_dir, tmp_path / "corrupted"))
    (corrupted / "items.faiss").write_bytes(b"garbage")
    refused = client.post("/admin/reload", json={"bundle_dir": str(corrupted)})
    assert refused.status_code == 409 and refused.json()["error"] == "bundle_refused"
    assert "items.faiss does not match its sha256" in refused.json()["detail"]
    assert client.get("/model").json()["model_version"] == after  # the old model keeps serving


def test_a_bad_bundle_stops_the_start(tmp_path, redis_url, key_prefix) -> None:
    from mqsa.errors import BundleError

    with (
        pytest.raises(BundleError, match="no such bundle directory"),
        TestClient(create_app(make_settings(tmp_path / "none", redis_url, key_prefix))),
    ):
        pass


def test_production_refuses_unsafe_settings(bundle_dir) -> None:
    with pytest.raises(ValueError, match="MQSA_API_KEYS must be set in production"):
        Settings(bundle_dir=bundle_dir, environment="production")
    with pytest.raises(ValueError, match="at least 16 characters"):
        Settings(bundle_dir=bundle_dir, environment="production", api_keys="short")
    ok = Settings(bundle_dir=bundle_dir, environment="production", api_keys=f"{KEY},{KEY}x")
    assert len(ok.api_keys) == 2


def test_watch_reloads_a_bundle_renamed_into_place(
    bundle_dir, second_bundle_dir, redis_url, key_prefix, tmp_path
) -> None:
    import time

    current = Path(shutil.copytree(bundle_dir, tmp_path / "current"))
    new_version = json.loads((second_bundle_dir / "manifest.json").read_text())["model_version"]
    settings = make_settings(current, redis_url, key_prefix, watch_bundle=True, watch_interval_seconds=0.1)
    with TestClient(create_app(settings)) as c:
        old_version = c.get("/model").json()["model_version"]
        staged = Path(shutil.copytree(second_bundle_dir, tmp_path / ".staged"))
        current.rename(tmp_path / "old")
        staged.rename(current)  # how `mqsa export` puts a bundle in place
        deadline = time.time() + 10
        while time.time() < deadline and c.get("/model").json()["model_version"] == old_version:
            time.sleep(0.1)
        assert c.get("/model").json()["model_version"] == new_version
        assert c.post("/recommend", json={"user_id": "w", "n": 3}).status_code == 200
