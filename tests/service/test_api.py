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
        # blank and control-character ids: they broke `mqsa data prepare` (issue 22, 5)
        ("/events", {"events": [{"user_id": " ", "item_id": "i"}]}, "events.0.user_id"),
        ("/events", {"events": [{"user_id": "u\x00v", "item_id": "i"}]}, "events.0.user_id"),
        ("/events", {"events": [{"user_id": "u", "item_id": "\t"}]}, "events.0.item_id"),
        ("/events", {"events": [{"user_id": "u", "item_id": "i", "event_id": "e\n1"}]}, "events.0.event_id"),
        # strict types: no coercion a client would not expect (issue 22, 11)
        (
            "/events",
            {"events": [{"user_id": "u", "item_id": "i", "timestamp": "1700000000"}]},
            "events.0.timestamp",
        ),
        ("/events", {"events": [{"user_id": "u", "item_id": "i", "timestamp": 1e13}]}, "events.0.timestamp"),
        ("/recommend", {"user_id": "u", "n": 0}, "n"),
        ("/recommend", {"user_id": "u", "n": 201}, "n"),
        ("/recommend", {"user_id": "u", "n": "ten"}, "n"),
        ("/recommend", {"user_id": "u", "n": "10"}, "n"),
        ("/recommend", {"user_id": "u", "n": True}, "n"),
        ("/recommend", {"user_id": "u", "exclude_seen": "yes"}, "exclude_seen"),
        ("/recommend", {"user_id": ""}, "user_id"),
        ("/recommend", {"user_id": "u", "alpha": 1.5}, "alpha"),
        ("/recommend", {"user_id": "u", "exclude_items": "abc"}, "exclude_items"),
        ("/recommend", {"user_id": "u", "mode": "fast"}, "mode"),
        ("/admin/reload", {"bundle_dir": "0" * 4100}, "bundle_dir"),
    ],
)
def test_bad_input_is_a_4xx_naming_the_field(client, path: str, body: dict, field: str) -> None:
    r = client.post(path, json=body)
    assert r.status_code == 422
    assert set(r.json()) == {"error", "detail", "fields"} and r.json()["error"] == "invalid_request"
    assert field in [f["field"] for f in r.json()["fields"]]
    assert all(f["message"] for f in r.json()["fields"])


@pytest.mark.parametrize("number", [b"Infinity", b"-Infinity", b"NaN", b"1e400"])
def test_a_timestamp_that_is_not_finite_is_a_422_not_a_500(client, number: bytes) -> None:
    """Python's JSON reader turns these into inf or nan; they used to reach the store and 500."""
    body = b'{"events": [{"user_id": "u", "item_id": "i", "timestamp": ' + number + b"}]}"
    r = client.post("/events", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["fields"][0]["field"] == "events.0.timestamp"
    again = client.post("/events", json={"events": [{"user_id": "u", "item_id": "i"}]})
    assert again.status_code == 200  # and the connection still serves


def test_every_error_has_one_shape(bundle_dir, redis_url, key_prefix) -> None:
    with TestClient(create_app(make_settings(bundle_dir, redis_url, key_prefix, max_body_bytes=2048))) as c:
        broken = c.post("/events", content=b'{"events": [', headers={"content-type": "application/json"})
        assert broken.status_code == 400
        assert broken.json() == {
            "error": "malformed_json",
            "detail": "the body is not valid JSON",
            "fields": [],
        }
        big = {"events": [{"user_id": "u", "item_id": "i" * 200}] * 20}
        too_big = c.post("/events", json=big)
        assert too_big.status_code == 413 and too_big.json()["error"] == "body_too_large"
        assert "exceeds 2048 bytes" in too_big.json()["detail"] and too_big.json()["fields"] == []
        streamed = c.post("/events", content=iter([b"x" * 1500, b"x" * 1500]))  # no content-length
        assert streamed.status_code == 413 and streamed.json()["error"] == "body_too_large"
        unknown = c.get("/nowhere")
        assert unknown.status_code == 404 and unknown.json() == {
            "error": "not_found",
            "detail": "Not Found",
            "fields": [],
        }
        wrong_method = c.delete("/events")
        assert wrong_method.status_code == 405 and wrong_method.json()["error"] == "method_not_allowed"
        assert wrong_method.headers["allow"] == "POST"


def keyed(scopes: str) -> tuple[str, str]:
    """A fresh key and its MQSA_API_KEYS entry."""
    from mqsa.service.keys import entry, new_key

    key = new_key()
    return key, entry(key, scopes.split("+"))


def test_scoped_keys_guard_every_route_but_health(bundle_dir, redis_url, key_prefix, vocab) -> None:
    """With keys configured, a read key recommends, a write key sends events, an admin key reloads;
    nothing else opens a route, and nothing opens one without a key (issue 22, 1)."""
    (read, read_entry), (write, write_entry), (admin, admin_entry) = (
        keyed("read"),
        keyed("write"),
        keyed("admin"),
    )
    keys = ",".join((read_entry, write_entry, admin_entry))
    settings = make_settings(bundle_dir, redis_url, key_prefix, api_keys=keys)
    events = {"events": [{"user_id": "h", "item_id": vocab[0]}]}
    with TestClient(create_app(settings)) as c:
        routes = [
            ("POST", "/events", events, write),
            ("POST", "/recommend", {"user_id": "h"}, read),
            ("GET", "/model", None, read),
            ("GET", "/openapi.json", None, read),
            ("GET", "/docs", None, read),
            ("GET", "/metrics", None, admin),
            ("POST", "/admin/reload", None, admin),
        ]
        for method, path, body, right in routes:
            missing = c.request(method, path, json=body)
            assert missing.status_code == 401 and missing.json()["error"] == "unauthorized", path
            wrong = c.request(method, path, json=body, headers={"X-API-Key": "not-a-key"})
            assert wrong.status_code == 401 and "not valid" in wrong.json()["detail"], path
            for other in {read, write, admin} - {right}:
                refused = c.request(method, path, json=body, headers={"X-API-Key": other})
                assert refused.status_code == 403 and refused.json()["error"] == "forbidden", path
            ok = c.request(method, path, json=body, headers={"Authorization": f"Bearer {right}"})
            assert ok.status_code == 200, (path, ok.text)
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200


def test_exclude_seen_cannot_be_used_to_read_a_history_without_a_key(
    bundle_dir, redis_url, key_prefix, vocab
) -> None:
    """The hole the hardening pass found: comparing exclude_seen false and true at n 200 gave away
    a user's history to anyone. With keys configured, /recommend needs a read key."""
    _, write_entry = keyed("write")
    settings = make_settings(bundle_dir, redis_url, key_prefix, api_keys=write_entry)
    with TestClient(create_app(settings)) as c:
        for flag in (False, True):
            r = c.post("/recommend", json={"user_id": "victim", "n": 200, "exclude_seen": flag})
            assert r.status_code == 401 and "items" not in r.json()


def test_docs_and_metrics_can_be_opened_on_purpose(bundle_dir, redis_url, key_prefix) -> None:
    _, entry_ = keyed("read+write")
    settings = make_settings(
        bundle_dir, redis_url, key_prefix, api_keys=entry_, public_docs=True, public_metrics=True
    )
    with TestClient(create_app(settings)) as c:
        assert c.get("/openapi.json").status_code == 200 and c.get("/docs").status_code == 200
        assert c.get("/metrics").status_code == 200
        assert c.get("/model").status_code == 401  # only those two


def test_keys_are_stored_hashed_and_never_printed(bundle_dir) -> None:
    from mqsa.errors import ConfigError
    from mqsa.service.settings import load_settings

    key, entry_ = keyed("read+write")
    settings = Settings(bundle_dir=bundle_dir, api_keys=entry_)
    assert key not in repr(settings) and key not in str(settings.api_keys)
    assert settings.api_keys[0].sha256 not in repr(settings)
    with pytest.raises(ConfigError) as plain:  # the key itself pasted where its entry belongs
        load_settings(bundle_dir=bundle_dir, api_keys=key)
    assert key not in str(plain.value) and "entry 1 is not SCOPES:SHA256" in str(plain.value)


def test_production_refuses_to_start_without_keys_and_prints_no_secret(bundle_dir) -> None:
    """A start-up error names the setting and the reason, never its value: neither the Redis
    password nor a key pasted in the wrong place appears (issue 22, 8)."""
    from mqsa.errors import ConfigError
    from mqsa.service.settings import load_settings

    with pytest.raises(ConfigError, match="MQSA_API_KEYS must be set in production"):
        load_settings(bundle_dir=bundle_dir, environment="production")
    secret_url = "redis://:hunter2-secret@redis.internal:6379/0"
    with pytest.raises(ConfigError) as bad:
        load_settings(
            bundle_dir=bundle_dir, environment="production", redis_url=secret_url, api_keys="short-key-123"
        )
    assert "hunter2" not in str(bad.value) and "short-key-123" not in str(bad.value)
    assert "MQSA_API_KEYS" in str(bad.value)
    _, entry_ = keyed("read")
    ok = load_settings(bundle_dir=bundle_dir, environment="production", redis_url=secret_url, api_keys=entry_)
    assert "hunter2" not in repr(ok) and ok.redis_url_masked() == "redis://:***@redis.internal:6379/0"


def test_health_ready_model_and_metrics(client, manifest, vocab) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["checks"] == {"bundle": True, "redis": True, "catalogue": True}
    assert ready["redis_memory"]["used_bytes"] > 0 and ready["redis_memory"]["used_ratio"] >= 0
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
    assert "mqsa_redis_memory_used_ratio" in text


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
    while the (slow, 0.6 s) load runs are answered during it by the old model (the event loop
    keeps serving), and every request that starts after the swap gets the new model. (Were the
    load to block the event loop, no request sent during it would be answered before it ends.)"""
    from mqsa.service import registry

    def slow_load(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.6)
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
    swapped = client.post("/admin/reload", json={"bundle_dir": second_bundle_dir.name})  # under the root
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
    assert len(inside) >= 3 and set(inside) == {before}, f"{len(inside)} answered while the bundle loaded"
    started_after = [version for sent, _, version in served if sent > swap_done]
    assert started_after and set(started_after) == {after}

    assert client.get("/model").json()["model_version"] == after


def test_reload_refuses_in_one_message_whatever_is_wrong(
    client, bundle_dir, bundle_root, tmp_path, caplog
) -> None:
    """Outside the bundle root, missing, a file, corrupted, or a name too long for the file system:
    the same 409, so a caller learns nothing about the disk; the reason is in the log (issue 22, 3-4)."""
    before = client.get("/model").json()["model_version"]
    corrupted = Path(shutil.copytree(bundle_dir, bundle_root / "corrupted-for-reload"))
    (corrupted / "items.faiss").write_bytes(b"garbage")
    outside = Path(shutil.copytree(bundle_dir, tmp_path / "outside"))  # a good bundle, elsewhere
    for name in (
        str(outside),
        "../" + outside.name,
        "no-such-bundle",
        "current/manifest.json",
        corrupted.name,
        "x" * 255,
    ):
        refused = client.post("/admin/reload", json={"bundle_dir": name})
        assert refused.status_code == 409, name
        assert refused.json() == {"error": "bundle_refused", "detail": "not a usable bundle", "fields": []}, (
            name
        )
    assert "items.faiss does not match its sha256" in caplog.text and "outside the bundle root" in caplog.text
    assert client.get("/model").json()["model_version"] == before  # the old model keeps serving


def test_model_info_does_not_show_where_the_bundle_is(client, bundle_dir) -> None:
    info = client.get("/model").json()
    assert "bundle_dir" not in info and str(bundle_dir) not in json.dumps(info)


def test_a_bad_bundle_stops_the_start(tmp_path, redis_url, key_prefix) -> None:
    from mqsa.errors import BundleError

    with (
        pytest.raises(BundleError, match="no such bundle directory"),
        TestClient(create_app(make_settings(tmp_path / "none", redis_url, key_prefix))),
    ):
        pass


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


def test_shutdown_goes_on_when_closing_the_pool_hangs(caplog):
    """redis-py's close can wait forever on a socket (redis/redis-py#3941): a worker must still stop."""
    from mqsa.service.app import _shut_down

    class HangingPool:
        async def aclose(self) -> None:
            await asyncio.sleep(3600)

    class Store:
        closed = False

        async def close(self) -> None:
            Store.closed = True

    async def main() -> float:
        background = asyncio.create_task(asyncio.sleep(3600))
        started = time.monotonic()
        await _shut_down([background], Store(), HangingPool(), timeout=0.2)  # type: ignore[arg-type]
        assert background.cancelled()
        return time.monotonic() - started

    with caplog.at_level("WARNING", logger="mqsa.service.app"):
        elapsed = asyncio.run(main())
    assert elapsed < 1.0 and Store.closed
    assert "redis pool did not stop within 0.2 s" in caplog.text
