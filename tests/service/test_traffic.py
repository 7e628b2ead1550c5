"""Several models at once: challengers beside the champion, the A/B split, shadows, the plan
in Redis shared by every replica, and PUT /admin/traffic; a real Redis and the real service."""

from __future__ import annotations

import json
import math
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from mqsa.service.app import create_app
from mqsa.service.keys import entry, new_key
from mqsa.service.settings import Settings
from mqsa.service.traffic import split_point

USERS = [f"user-{i}" for i in range(10_000)]
ADMIN, READ = new_key(), new_key()
KEYS = ",".join((entry(ADMIN, ["admin"]), entry(READ, ["read"])))
AS_ADMIN = {"X-API-Key": ADMIN}


def make_settings(bundle_dir: Path, redis_url: str, prefix: str, **overrides: Any) -> Settings:
    overrides.setdefault("traffic_poll_seconds", 0.05)
    return Settings(bundle_dir=bundle_dir, redis_url=redis_url, redis_prefix=prefix, **overrides)


def version_of(bundle_dir: Path) -> str:
    return json.loads((bundle_dir / "manifest.json").read_text())["model_version"]


@pytest.fixture(scope="module")
def third_bundle_dir(trained_run: dict[str, Any], bundle_root: Path) -> Path:
    """A third version beside `current` and `next`: the same model with a shorter popular list."""
    from mqsa.training.export import ExportConfig, export_bundle

    out = bundle_root / "traffic-third"
    if not out.exists():
        export_bundle(trained_run["dir"] / "best.pt", out, ExportConfig(popular_top=100))
    return out


def served_versions(client: TestClient, users: list[str] = USERS) -> list[str]:
    """The model each user is served by this app (the registry's pick: no Redis, no request)."""
    registry = client.app.state.registry
    return [registry.pick(user).served.bundle.model_version for user in users]


def within_binomial(count: int, n: int, p: float) -> bool:
    """|observed - p n| <= 4 standard deviations of Binomial(n, p)."""
    return abs(count - p * n) <= 4 * math.sqrt(n * p * (1 - p))


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_the_split_is_stable_per_user_and_matches_the_shares(
    bundle_dir, second_bundle_dir, third_bundle_dir, redis_url, key_prefix
) -> None:
    """10,000 users over a champion (0.7) and two challengers (0.2, 0.1): each arm within a binomial
    bound of its share; every user gets the same arm again, and from another replica; every
    answer names the model that served it."""
    plan = f"{second_bundle_dir.name}=0.2,{third_bundle_dir.name}=0.1"
    settings = make_settings(bundle_dir, redis_url, key_prefix, challengers=plan)
    champion, second, third = (version_of(d) for d in (bundle_dir, second_bundle_dir, third_bundle_dir))
    with TestClient(create_app(settings)) as one, TestClient(create_app(settings)) as two:
        first = served_versions(one)
        assert served_versions(one) == first  # stable across calls
        assert served_versions(two) == first  # and across replicas sharing one Redis
        counts = Counter(first)
        assert set(counts) == {champion, second, third}
        for version, share in ((champion, 0.7), (second, 0.2), (third, 0.1)):
            assert within_binomial(counts[version], len(USERS), share), (version, counts)
        registry = one.app.state.registry
        assert registry.traffic() == {
            "champion": champion,
            "shares": {champion: 0.7, second: 0.2, third: 0.1},
            "shadow": [],
        }
        assert [(s.bundle.model_version, role) for s, role in registry.models()] == [
            (champion, "champion"),
            (second, "challenger"),
            (third, "challenger"),
        ]
        for user, version in zip(USERS[:40], first[:40], strict=True):
            pick = registry.pick(user)
            assert pick.role == ("champion" if version == champion else "challenger") and not pick.shadows
            answer = one.post("/recommend", json={"user_id": user, "n": 5})
            assert answer.status_code == 200 and answer.json()["model_version"] == version, user
        assert registry.pick(None).role == "champion"  # no user: the champion


def test_the_split_follows_the_documented_hash() -> None:
    """A user's point is blake2b("<salt>:<user_id>", 8 bytes) / 2**64, so an analyst can recompute it."""
    import hashlib

    digest = hashlib.blake2b(b"mqsa:alice", digest_size=8).digest()
    assert split_point("mqsa", "alice") == int.from_bytes(digest, "big") / 2**64
    points = [split_point("mqsa", u) for u in USERS[:1000]]
    assert all(0 <= p < 1 for p in points) and points != [split_point("other", u) for u in USERS[:1000]]


def test_shadow_mode_never_serves_the_challengers_list(
    bundle_dir, second_bundle_dir, redis_url, key_prefix
) -> None:
    """In shadow the challenger scores every request (the pick hands it over), and the champion
    serves every user, with or without a user id."""
    settings = make_settings(
        bundle_dir, redis_url, key_prefix, challengers=f"{second_bundle_dir.name}=shadow"
    )
    champion, second = version_of(bundle_dir), version_of(second_bundle_dir)
    with TestClient(create_app(settings)) as c:
        registry = c.app.state.registry
        for user in [*USERS[:2000], None]:
            pick = registry.pick(user)
            assert pick.role == "champion" and pick.served.bundle.model_version == champion
            assert [s.bundle.model_version for s in pick.shadows] == [second]
        assert registry.traffic() == {"champion": champion, "shares": {champion: 1.0}, "shadow": [second]}
        for user in USERS[:20]:
            assert c.post("/recommend", json={"user_id": user, "n": 5}).json()["model_version"] == champion
        shown = c.get("/admin/traffic").json()
        assert shown["challengers"] == [
            {"bundle_dir": second_bundle_dir.name, "share": 0.0, "shadow": True, "model_version": second}
        ]


def test_a_plan_put_on_one_replica_is_followed_by_the_others(
    bundle_dir, second_bundle_dir, third_bundle_dir, redis_url, key_prefix
) -> None:
    """PUT /admin/traffic on one app: the other (same Redis, same prefix) follows within its poll,
    and so does one started later (the plan in Redis wins over MQSA_CHALLENGERS). Raising a share
    keeps the arm's users; a new salt reshuffles them; [] ends the test."""
    settings = make_settings(bundle_dir, redis_url, key_prefix, api_keys=KEYS)
    champion, second, third = (version_of(d) for d in (bundle_dir, second_bundle_dir, third_bundle_dir))
    users = USERS[:3000]

    def put(client: TestClient, body: dict) -> dict:
        answer = client.put("/admin/traffic", json=body, headers=AS_ADMIN)
        assert answer.status_code == 200, answer.text
        return answer.json()

    def follows(client: TestClient, version: int) -> bool:
        return client.get("/admin/traffic", headers=AS_ADMIN).json()["version"] == version

    with TestClient(create_app(settings)) as one, TestClient(create_app(settings)) as two:
        before = two.get("/admin/traffic", headers=AS_ADMIN).json()
        assert before["version"] == 0 and before["challengers"] == [] and before["shares"] == {champion: 1.0}
        plan = put(one, {"challengers": [{"bundle_dir": second_bundle_dir.name, "share": 0.25}]})
        assert plan["version"] == 1 and plan["shares"] == {champion: 0.75, second: 0.25}
        assert plan["challengers"] == [
            {"bundle_dir": second_bundle_dir.name, "share": 0.25, "shadow": False, "model_version": second}
        ]
        assert wait_for(lambda: follows(two, 1))
        assert two.get("/admin/traffic", headers=AS_ADMIN).json() == plan
        arms = served_versions(one, users)
        assert served_versions(two, users) == arms and within_binomial(arms.count(second), len(users), 0.25)

        wider = [{"bundle_dir": second_bundle_dir.name, "share": 0.5}]
        put(one, {"challengers": [*wider, {"bundle_dir": third_bundle_dir.name, "shadow": True}]})
        assert wait_for(lambda: follows(two, 2))
        widened = served_versions(two, users)
        assert all(w == second for a, w in zip(arms, widened, strict=True) if a == second)
        assert within_binomial(widened.count(second), len(users), 0.5)
        assert [s.bundle.model_version for s in two.app.state.registry.pick("x").shadows] == [third]

        put(two, {"challengers": wider, "salt": "experiment-2"})
        assert wait_for(lambda: follows(one, 3))
        reshuffled = served_versions(one, users)
        assert reshuffled == served_versions(two, users)
        moved = sum(a != b for a, b in zip(widened, reshuffled, strict=True))
        assert within_binomial(moved, len(users), 0.5)  # each user's arm drawn afresh: half move

        later = make_settings(
            bundle_dir, redis_url, key_prefix, api_keys=KEYS, challengers="traffic-third=0.9"
        )
        with TestClient(create_app(later)) as three:
            assert three.get("/admin/traffic", headers=AS_ADMIN).json()["version"] == 3
            assert served_versions(three, users) == reshuffled

        put(one, {"challengers": []})
        assert wait_for(lambda: follows(two, 4))
        assert set(served_versions(two, users)) == {champion}
        assert two.app.state.registry.models() == [(two.app.state.registry.served, "champion")]


def test_a_bad_plan_is_refused_naming_the_field(
    bundle_dir, second_bundle_dir, third_bundle_dir, redis_url, key_prefix, tmp_path
) -> None:
    """Shares out of range or adding up past 1, a share in shadow, a bundle named twice, the
    champion's own model, a bad salt: 422; a bundle outside the root or unusable: 409
    bundle_refused. Each names the field, and the plan in force stays (nothing stored)."""
    second, third = second_bundle_dir.name, third_bundle_dir.name
    outside = Path(shutil.copytree(second_bundle_dir, tmp_path / "outside"))  # a good bundle, elsewhere
    cases = [
        ({"challengers": [{"bundle_dir": second, "share": 1.5}]}, 422, "challengers.0.share"),
        ({"challengers": [{"bundle_dir": second, "share": -0.1}]}, 422, "challengers.0.share"),
        ({"challengers": [{"bundle_dir": second, "share": "0.1"}]}, 422, "challengers.0.share"),
        (
            {"challengers": [{"bundle_dir": second, "share": 0.6}, {"bundle_dir": third, "share": 0.5}]},
            422,
            "challengers",
        ),
        ({"challengers": [{"bundle_dir": second}, {"bundle_dir": second}]}, 422, "challengers"),
        (
            {"challengers": [{"bundle_dir": second, "share": 0.1, "shadow": True}]},
            422,
            "challengers.0.shadow",
        ),
        ({"challengers": [{"bundle_dir": second, "weight": 1}]}, 422, "challengers.0.weight"),
        ({"challengers": [{"bundle_dir": second}], "salt": "with space"}, 422, "salt"),
        ({}, 422, "challengers"),
        (
            {"challengers": [{"bundle_dir": third}, {"bundle_dir": bundle_dir.name}]},
            422,
            "challengers.1.bundle_dir",
        ),
        ({"challengers": [{"bundle_dir": "no-such-bundle"}]}, 409, "challengers.0.bundle_dir"),
        (
            {"challengers": [{"bundle_dir": second}, {"bundle_dir": str(outside)}]},
            409,
            "challengers.1.bundle_dir",
        ),
        ({"challengers": [{"bundle_dir": "../" + outside.name}]}, 409, "challengers.0.bundle_dir"),
        ({"challengers": [{"bundle_dir": "current/manifest.json"}]}, 409, "challengers.0.bundle_dir"),
    ]
    settings = make_settings(bundle_dir, redis_url, key_prefix)
    with TestClient(create_app(settings)) as c:
        before = c.get("/admin/traffic").json()
        for body, status, field in cases:
            refused = c.put("/admin/traffic", json=body)
            assert refused.status_code == status, (body, refused.text)
            shape = refused.json()
            assert set(shape) == {"error", "detail", "fields"}
            assert field in [f["field"] for f in shape["fields"]], (body, shape)
            if status == 409:
                assert shape["error"] == "bundle_refused" and shape["detail"] == "not a usable bundle"
        assert c.get("/admin/traffic").json() == before
        assert c.app.state.registry.models() == [(c.app.state.registry.served, "champion")]
        assert c.app.state.registry._staged == {}  # nothing loaded for a refused plan stays
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.get(f"{key_prefix}:traffic") is None
    finally:
        client.close()


def test_only_an_admin_key_sees_or_sets_the_plan(
    bundle_dir, second_bundle_dir, redis_url, key_prefix
) -> None:
    settings = make_settings(bundle_dir, redis_url, key_prefix, api_keys=KEYS)
    body = {"challengers": [{"bundle_dir": second_bundle_dir.name, "share": 0.5}]}
    with TestClient(create_app(settings)) as c:
        for method in ("GET", "PUT"):
            read = c.request(method, "/admin/traffic", json=body, headers={"X-API-Key": READ})
            assert read.status_code == 403 and read.json()["error"] == "forbidden"
            missing = c.request(method, "/admin/traffic", json=body)
            assert missing.status_code == 401 and missing.json()["error"] == "unauthorized"
        assert c.get("/admin/traffic", headers=AS_ADMIN).json()["version"] == 0  # nothing was stored


def test_an_unusable_challenger_never_breaks_serving(bundle_dir, redis_url, key_prefix) -> None:
    """A challenger that cannot be loaded (here: from MQSA_CHALLENGERS) is left out: its share goes to
    the champion, the service starts and serves; a stored plan that is not one is ignored."""
    settings = make_settings(bundle_dir, redis_url, key_prefix, challengers="no-such-bundle=0.5")
    champion = version_of(bundle_dir)
    with TestClient(create_app(settings)) as c:
        shown = c.get("/admin/traffic").json()
        assert shown["challengers"] == [
            {"bundle_dir": "no-such-bundle", "share": 0.5, "shadow": False, "model_version": None}
        ]
        assert shown["shares"] == {champion: 1.0} and set(served_versions(c, USERS[:1000])) == {champion}
        assert c.post("/recommend", json={"user_id": "u", "n": 3}).status_code == 200
        client = redis.Redis.from_url(redis_url)
        try:
            client.set(f"{key_prefix}:traffic", "not a plan")
        finally:
            client.close()
        time.sleep(0.3)  # several polls
        assert c.get("/admin/traffic").json() == shown and c.get("/readyz").status_code == 200
        fixed = c.put("/admin/traffic", json={"challengers": []})  # overwrites it
        assert fixed.status_code == 200 and fixed.json()["version"] == 1


def test_catalogue_changes_reach_every_loaded_model(
    bundle_dir, second_bundle_dir, third_bundle_dir, redis_url, key_prefix
) -> None:
    """Hiding an item hides it in the champion's and every challenger's rules, and in those of a
    challenger loaded after the change."""
    item = json.loads((bundle_dir / "items.json").read_text())["item_ids"][0]
    settings = make_settings(
        bundle_dir, redis_url, key_prefix, challengers=f"{second_bundle_dir.name}=shadow"
    )
    with TestClient(create_app(settings)) as c:
        registry = c.app.state.registry

        def hidden_everywhere(expected: int) -> bool:
            models = registry.models()
            return len(models) == expected and not any(s.rules.passes(item) for s, _ in models)

        assert all(s.rules.passes(item) for s, _ in registry.models())
        assert c.put("/items", json={"items": [{"item_id": item, "available": False}]}).status_code == 200
        assert wait_for(lambda: hidden_everywhere(2))
        body = {
            "challengers": [
                {"bundle_dir": second_bundle_dir.name, "shadow": True},
                {"bundle_dir": third_bundle_dir.name, "share": 0.5},
            ]
        }
        assert c.put("/admin/traffic", json=body).status_code == 200
        assert hidden_everywhere(3)
        assert c.put("/items", json={"items": [{"item_id": item, "available": True}]}).status_code == 200
        assert wait_for(lambda: all(s.rules.passes(item) for s, _ in registry.models()))
