"""Versions under a bundle root: the atomic switch, rollback, pruning, and a service that follows."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from mqsa.errors import BundleError, ConfigError, DataError
from mqsa.service import versions
from mqsa.service.app import create_app
from mqsa.service.bundle import load_bundle
from mqsa.service.settings import Settings


def version_of(bundle: Path) -> str:
    return json.loads((bundle / "manifest.json").read_text())["model_version"]


def install(root: Path, bundle: Path) -> str:
    """Put a bundle in place as `promote` does once the gate passes (no evaluation here)."""
    before = versions.current_version(root)
    version = versions.add_version(root, bundle)
    versions.switch(root, version)
    versions.record(root, "promote", version, **{"from": before})
    return version


def fake_versions(root: Path, names: list[str]) -> None:
    """Promote empty version folders in order (pruning and rollback never read them)."""
    for name in names:
        (root / "versions" / name).mkdir()
        before = versions.current_version(root)
        versions.switch(root, name)
        versions.record(root, "promote", name, **{"from": before})


def test_current_is_a_relative_link_that_is_never_missing(tmp_path, bundle_dir, second_bundle_dir) -> None:
    """A reader that keeps opening current/manifest.json while current switches 200 times
    always finds one of the two versions; the link is relative, so the root can move."""
    (tmp_path / "root").mkdir()
    root = versions.open_root(tmp_path / "root")
    one, two = install(root, bundle_dir), install(root, second_bundle_dir)
    assert os.readlink(root / "current") == f"versions/{two}"
    seen: set[str] = set()
    errors: list[Exception] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            try:
                seen.add(version_of(root / "current"))
            except (OSError, ValueError) as exc:
                errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(200):
        versions.switch(root, (one, two)[i % 2])
    done.set()
    reader.join()
    assert errors == [] and seen == {one, two}
    moved = Path(shutil.move(root, tmp_path / "moved"))
    assert version_of(moved / "current") == two  # the last switch named `two`


def test_rollback_walks_back_one_promotion_at_a_time(tmp_path) -> None:
    """a -> b -> c promoted: rollbacks return to b, then a; a version that fails verification
    is never switched to."""
    root = versions.open_root(tmp_path)
    fake_versions(root, ["a", "b", "c"])
    assert versions.previous_version(root) == "b"
    with pytest.raises(BundleError, match=r"manifest\.json is missing"):  # the target is verified first
        versions.rollback(root)
    assert versions.current_version(root) == "c"  # left as it was
    versions.switch(root, "b")  # what a rollback does once b verifies
    versions.record(root, "rollback", "b", **{"from": "c"})
    assert versions.previous_version(root) == "a"  # b's promotion came from a: not back to c
    assert versions.previous_version(root, "a") is None


def test_rollback_restores_the_previous_version(tmp_path, bundle_dir, second_bundle_dir) -> None:
    root = versions.open_root(tmp_path)
    with pytest.raises(DataError, match="nothing is current yet"):
        versions.rollback(root)
    one = install(root, bundle_dir)
    with pytest.raises(DataError, match=f"no version before {one} in the history"):
        versions.rollback(root)
    two = install(root, second_bundle_dir)
    assert versions.rollback(root) == (two, one)
    assert versions.current_version(root) == one and version_of(root / "current") == one
    assert [e["action"] for e in versions.read_history(root)] == ["promote", "promote", "rollback"]
    rows = {r["version"]: r["role"] for r in versions.list_versions(root)}
    assert rows == {one: "current", two: ""}


def test_pruning_keeps_the_last_k_and_never_current_or_previous(tmp_path) -> None:
    root = versions.open_root(tmp_path)
    fake_versions(root, ["v1", "v2", "v3", "v4", "v5", "v6"])
    for name in ("v5", "v4"):  # two rollbacks by hand (fake versions are not bundles)
        was = versions.current_version(root)
        versions.switch(root, name)
        versions.record(root, "rollback", name, **{"from": was})
    assert versions.previous_version(root) == "v3"
    with pytest.raises(ConfigError, match="--keep must be at least 2"):
        versions.prune(root, 1)
    removed = versions.prune(root, 2)  # the 2 served last: v4 and v5; v3 is the way back
    assert sorted(removed) == ["v1", "v2", "v6"]
    assert sorted(p.name for p in (root / "versions").iterdir()) == ["v3", "v4", "v5"]
    assert versions.current_version(root) == "v4"


def test_a_plain_current_directory_is_adopted(tmp_path, bundle_dir) -> None:
    """What `mqsa export --out ROOT/current` wrote before versions becomes the first version."""
    shutil.copytree(bundle_dir, tmp_path / "current")
    root = versions.open_root(tmp_path)
    with pytest.raises(DataError, match="not a link to versions/<model_version>"):
        versions.current_version(root)
    with versions.locked(root):  # what promote and rollback hold: the adoption happens under it
        pass
    version = version_of(bundle_dir)
    assert (root / "current").is_symlink() and versions.current_version(root) == version
    assert versions.read_history(root)[-1]["action"] == "adopt"


def test_bad_roots_and_a_second_writer_are_one_clear_error(tmp_path, bundle_dir) -> None:
    with pytest.raises(DataError, match="no such bundle root"):
        versions.open_root(tmp_path / "missing")
    (tmp_path / "current").symlink_to("elsewhere")
    with pytest.raises(DataError, match="not to an existing versions/<model_version>"):
        versions.current_version(versions.open_root(tmp_path))
    with versions.locked(tmp_path), pytest.raises(DataError, match="another promote or rollback is running"):
        versions.rollback(tmp_path)


def test_a_switch_during_a_load_cannot_mix_two_versions(tmp_path, bundle_dir, second_bundle_dir, monkeypatch):
    """The loader follows the link once: a switch after the encoder is read does not hand it the
    next version's index (flat here, HNSW there)."""
    from mqsa.service import bundle as bundle_module

    root = versions.open_root(tmp_path)
    one, two = install(root, bundle_dir), install(root, second_bundle_dir)
    versions.switch(root, one)
    opened = bundle_module._open_encoder

    def open_then_switch(path: Path, threads: int) -> Any:
        encoder = opened(path, threads)
        versions.switch(root, two)
        return encoder

    monkeypatch.setattr(bundle_module, "_open_encoder", open_then_switch)
    loaded = load_bundle(root / "current")
    assert loaded.model_version == one and loaded.path == (root / "versions" / one).resolve()
    assert type(loaded.index).__name__ == "IndexFlatIP"


def test_the_service_follows_promote_and_rollback_under_traffic(
    tmp_path, bundle_dir, second_bundle_dir, holdout_log, redis_url, key_prefix
) -> None:
    """MQSA_BUNDLE_DIR=ROOT/current with the watch on: `promote` (the real gate) and `rollback`
    switch the link while four clients keep asking; no request fails, the served version follows."""
    from mqsa.training.promote import Gate, promote

    root = versions.open_root(tmp_path)
    one = install(root, bundle_dir)
    settings = Settings(
        bundle_dir=root / "current",
        redis_url=redis_url,
        redis_prefix=key_prefix,
        watch_bundle=True,
        watch_interval_seconds=0.05,
    )
    with TestClient(create_app(settings)) as client:
        items = json.loads((bundle_dir / "items.json").read_text())["item_ids"][:6]
        failures: list[int] = []
        served: list[str] = []
        stop = threading.Event()

        def traffic() -> None:
            while not stop.is_set():
                r = client.post("/recommend", json={"user_id": "t", "n": 5, "recent_items": items})
                if r.status_code != 200 or len(r.json()["items"]) != 5:
                    failures.append(r.status_code)
                else:
                    served.append(r.json()["model_version"])

        def served_now(version: str) -> bool:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not (served and served[-1] == version):
                time.sleep(0.02)
            return bool(served) and served[-1] == version

        workers = [threading.Thread(target=traffic) for _ in range(4)]
        for w in workers:
            w.start()
        try:
            assert served_now(one)
            outcome = promote(
                second_bundle_dir, root, holdout_log["log"], holdout_log["since"], Gate(metric="NDCG@5")
            )
            assert outcome.promoted, outcome.reasons
            two = outcome.candidate
            assert served_now(two)
            assert versions.rollback(root) == (two, one)
            assert served_now(one)
        finally:
            stop.set()
            for w in workers:
                w.join()
    assert failures == []
    assert set(served) == {one, two}
