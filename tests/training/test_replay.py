"""Offline replay (training/replay.py): the online metrics of docs/feedback.md from the archive,
checked on hand-computed cases, and the counterfactual of a bundle on the same traffic."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mqsa.cli import main as cli_main
from mqsa.errors import ConfigError, DataError
from mqsa.training.prepare import archive_schema
from mqsa.training.replay import (
    ReplayConfig,
    bundle_lists,
    read_feedback,
    replay,
    replay_bundles,
    replay_metrics,
)

DAY = 1_764_460_800  # 2025-11-30T00:00:00Z
SINCE = DAY + 3600  # the window: one hour from 01:00
UNTIL = SINCE + 3600
T = 600  # the attribution window of these tests
A, B, S = "a" * 16, "b" * 16, "c" * 16  # two served models (A/B) and a shadow one
STREAM = "p:{b0}:events"

NEW_SCHEMA = pa.schema([f for f in archive_schema() if f.name != "date"])  # what the archiver writes
OLD_SCHEMA = pa.schema(  # the archive's files before the feedback columns
    [
        f
        for f in NEW_SCHEMA
        if f.name in ("user_id", "item_id", "timestamp", "event_id", "stream", "stream_id", "extra")
    ]
)


def rid(model: str, n: int) -> str:
    return f"{model}-{n:012x}-0000abcd"


def shown(
    t: float, user: str, model: str, items: list[str], mode: str = "served", route: str = "recommend"
) -> dict:
    """An impression ``t`` seconds after the window's start."""
    return {
        "user_id": user, "item_id": "", "event_type": "impression", "recommendation_id": rid(model, 7),
        "items": items, "model_version": model, "route": route, "mode": mode, "t": t,
    }  # fmt: skip


def event(t: float, user: str, item: str, kind: str = "view", rec: str = "") -> dict:
    return {"user_id": user, "item_id": item, "event_type": kind, "recommendation_id": rec, "t": t}


def write(root: Path, rows: list[dict], name: str = "f", old: bool = False, stream: str = STREAM) -> None:
    """Rows as archive files, one per day: ``date=YYYY-MM-DD/<name>.parquet`` (the old schema
    without the feedback columns with ``old``); stream ids from ``t`` (seconds after SINCE), the
    sequence numbering the rows of one millisecond in order."""
    by_day: dict[str, list[dict]] = {}
    seqs: dict[int, int] = {}
    for r in rows:
        ms = round((SINCE + r["t"]) * 1000)
        seqs[ms] = seq = seqs.get(ms, -1) + 1
        day = datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d")
        row = {k: v for k, v in r.items() if k != "t"}
        row |= {"timestamp": ms / 1000, "stream": stream, "stream_id": f"{ms}-{seq}"}
        by_day.setdefault(day, []).append(row)
    schema = OLD_SCHEMA if old else NEW_SCHEMA
    for day, day_rows in by_day.items():
        folder = root / f"date={day}"
        folder.mkdir(parents=True, exist_ok=True)
        columns = {f.name: [r.get(f.name) for r in day_rows] for f in schema}
        pq.write_table(pa.table(columns, schema=schema), folder / f"{name}.parquet")


# The traffic (t: seconds after SINCE; T = 600 s):
TRAFFIC = [
    # before the window: a list of A whose hit (at 50) is inside it
    shown(-100, "u5", A, ["z1"]),
    event(50, "u5", "z1"),
    # u1: A served with S in shadow; a click with A's id, then S's item viewed, then A's again
    shown(100, "u1", A, ["i1", "i2", "i3"]),
    shown(100, "u1", S, ["i3", "i4"], mode="shadow"),
    event(200, "u1", "i2", "click", rid(A, 1)),
    event(300, "u1", "i3"),  # hits S's list (A's was hit already: a list counts once)
    event(400, "u1", "i1"),
    shown(450, "u6", A, ["n1"]),  # hit by u6's event in the old-schema file
    shown(600, "", A, ["i1"], route="similar"),  # no user: never hit
    # u2: a view just after T misses, one exactly at T hits
    shown(1000, "u2", B, ["j1", "j2"]),
    event(1601, "u2", "j1"),
    shown(1700, "u2", B, ["j3"]),
    event(2300, "u2", "j3"),
    # u3: a purchase with A's id converts A's list, not B's newer one holding the item
    shown(2000, "u3", A, ["k1"]),
    shown(2050, "u3", B, ["k1"]),
    event(2100, "u3", "k1", "purchase", rid(A, 2)),
    # u4: a purchase without an id converts the newest served list holding it (B's), and S's
    shown(2200, "u4", A, ["m1", "m2"]),
    shown(2300, "u4", B, ["m1"]),
    shown(2300, "u4", S, ["m1"], mode="shadow"),
    event(2400, "u4", "m1", "purchase"),
    # the window's end is excluded
    shown(3600, "u1", A, ["i9"]),
    event(3600, "u1", "i1", "click", rid(A, 3)),
]
OLD = [event(500, "u6", "n1")]  # no event_type column: a view


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    root = tmp_path / "archive"
    write(root, TRAFFIC, "new")
    write(root, OLD, "old", old=True)
    write(root, [TRAFFIC[4], TRAFFIC[5]], "copy")  # a Redis that delivered two entries again
    return root


def by_model(result: dict) -> dict:
    return {(m["model_version"], m["mode"]): m for m in result["models"]}


def test_read_feedback_reads_every_entry_once_old_files_as_views(archive: Path) -> None:
    frame = read_feedback(str(archive))
    assert len(frame) == len(TRAFFIC) + len(OLD)  # the copies read once
    old = frame[frame["user_id"] == "u6"].set_index("event_type")
    assert old.loc["view", "item_id"] == "n1" and old.loc["view", "recommendation_id"] == ""
    assert frame["ms"].is_monotonic_increasing and list(frame["order"]) == list(range(len(frame)))
    assert list(frame.loc[frame["user_id"] == "u1", "items"].iloc[0]) == ["i1", "i2", "i3"]
    window = read_feedback(str(archive), SINCE, UNTIL)
    assert window["ms"].min() >= SINCE * 1000 and window["ms"].max() < UNTIL * 1000
    assert len(window) == len(frame) - 3  # the list before the window, the two entries at its end
    nothing = read_feedback(str(archive), 0, 1)  # no day of the archive
    assert len(nothing) == 0 and replay_metrics(nothing, T)["models"] == []


def test_each_metric_matches_the_hand_computed_case(archive: Path) -> None:
    frame = read_feedback(str(archive), SINCE - T, UNTIL)
    result = replay_metrics(frame, T, SINCE, UNTIL, {A: 70})
    models = by_model(result)
    assert list(models) == [(A, "served"), (B, "served"), (S, "shadow")]
    a, b, s = models[(A, "served")], models[(B, "served")], models[(S, "shadow")]
    # A: lists of u1, u6, the similar one, u3, u4 (u5's is before the window, the last at its end)
    assert (a["impressions"], a["clicks"], a["hits"], a["conversions"]) == (5, 1, 5, 1)
    # hits of A: u1 (its click), u6 (the old-schema view), u3 and u4 (the purchases), u5 (before)
    # the hit rate is over the lists with a user (4: not the similar one), and the hits of the
    # window include u5's list from before it: over a window shorter than T it can pass 1
    assert (
        a["attributable"] == 4
        and a["ctr"] == 1 / 5
        and a["hit_rate"] == 5 / 4
        and a["conversion_rate"] == 1 / 5
    )
    assert (a["distinct_items"], a["num_items"], a["coverage"]) == (7, 70, 0.1)
    # B: u2's first list missed (just after T), its second hit (at T), u3's hit, u4's hit and converted
    assert (b["impressions"], b["clicks"], b["hits"], b["conversions"]) == (4, 0, 3, 1)
    assert (b["distinct_items"], b["num_items"], b["coverage"]) == (5, None, None)
    # the shadow model: hits and a conversion, never a click
    assert (s["impressions"], s["clicks"], s["hits"], s["conversions"]) == (2, 0, 2, 1)
    assert result["events"] == {"click": 1, "purchase": 2, "view": 6}


def test_a_hit_counts_when_its_event_is_in_the_window_or_with_hits_at_list_its_list(archive: Path) -> None:
    frame = read_feedback(str(archive))
    hits = {
        at: by_model(replay_metrics(frame, T, SINCE, UNTIL, hits_at=at))[(A, "served")]["hits"]
        for at in ("event", "list")
    }
    assert hits == {"event": 5, "list": 4}  # u5's list was served before the window
    everything = by_model(replay_metrics(frame, T))  # no window: every entry
    assert everything[(A, "served")]["impressions"] == 7 and everything[(A, "served")]["clicks"] == 2


def test_a_longer_window_attributes_more_and_a_list_is_hit_only_among_its_users_newest(archive: Path) -> None:
    frame = read_feedback(str(archive))
    assert by_model(replay_metrics(frame, 601, SINCE, UNTIL))[(B, "served")]["hits"] == 4  # u2's first
    # with one list kept per user, a list is no longer hittable once its user has a newer one:
    # u1's A list (S's came after it), u3's A list (B's) and u4's A and B lists
    capped = by_model(replay_metrics(frame, T, SINCE, UNTIL, served_cap=1))
    assert capped[(A, "served")]["hits"] == 2 and capped[(B, "served")]["conversions"] == 0
    assert capped[(S, "shadow")]["conversions"] == 1


def test_fields_an_older_archiver_kept_in_extra_are_read(tmp_path: Path) -> None:
    rows = [
        {"user_id": "u", "item_id": "", "t": 10, "extra": json.dumps(
            {"event_type": "impression", "items": '["x","y"]', "model_version": A, "mode": "served",
             "route": "recommend", "recommendation_id": rid(A, 1)})},
        {"user_id": "u", "item_id": "y", "t": 20, "extra": json.dumps({"event_type": "purchase"})},
    ]  # fmt: skip
    write(tmp_path / "arch", rows, old=True)
    frame = read_feedback(str(tmp_path / "arch"))
    assert list(frame["event_type"]) == ["impression", "purchase"] and list(frame["items"][0]) == ["x", "y"]
    a = by_model(replay_metrics(frame, T))[(A, "served")]
    assert (a["impressions"], a["hits"], a["conversions"]) == (1, 1, 1)


def test_replay_reads_the_window_and_what_it_needs_before_it(archive: Path) -> None:
    result = replay(str(archive), str(SINCE), str(UNTIL), ReplayConfig(attribution_window=T))
    assert by_model(result) == by_model(replay_metrics(read_feedback(str(archive)), T, SINCE, UNTIL))
    assert result["window"]["since_utc"] == "2025-11-30T01:00:00+00:00" and "counterfactual" not in result
    with pytest.raises(DataError, match="no entry"):
        replay(str(archive), str(UNTIL + 7200), str(UNTIL + 9000))
    with pytest.raises(ConfigError, match="--since"):
        replay(str(archive), str(UNTIL), str(SINCE))
    with pytest.raises(ConfigError, match="--attribution-window"):
        replay(str(archive), str(SINCE), str(UNTIL), ReplayConfig(attribution_window=0))
    with pytest.raises(DataError, match="no such archive"):
        replay(str(archive / "nothing"), str(SINCE), str(UNTIL))


def test_cli_prints_the_table_writes_json_and_refuses_in_one_line(
    archive: Path, tmp_path: Path, capsys
) -> None:
    window = ["--archive", str(archive), "--since", "2025-11-30T01:00:00Z", "--until", str(UNTIL)]
    report = tmp_path / "report.json"
    code = cli_main(
        ["evaluate", "--online", *window, "--attribution-window", str(T), "--report", str(report)]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "| model_version | mode | impressions |" in out
    assert f"| {A} | served | 5 | 1 | 5 | 1 | 0.2000 | 1.2500 | 0.2000 | 7 | - |" in out
    saved = json.loads(report.read_text())
    assert saved["attribution_window_seconds"] == T and by_model(saved)[(B, "served")]["hits"] == 3
    assert cli_main(["evaluate", "--online", *window, "--json"]) == 0  # T = 1800: u2's first list hit too
    assert by_model(json.loads(capsys.readouterr().out))[(B, "served")]["hits"] == 4
    assert cli_main(["evaluate", "--online", "--archive", str(archive)]) == 2
    assert capsys.readouterr().err.strip() == "mqsa: error: an online replay needs --archive and --since"
    assert cli_main(["evaluate", "--online", *window, "--history-cap", "0"]) == 2
    assert "--history-cap" in capsys.readouterr().err
    assert cli_main(["evaluate", "--since", "7d", "--holdout", "x"]) == 2
    assert "go with --online" in capsys.readouterr().err


def test_the_counterfactual_remakes_the_served_lists_and_judges_them_alike(
    bundle_dir: Path, tmp_path: Path
) -> None:
    from mqsa.training.replay import load_bundles

    [(label, bundle)] = load_bundles([bundle_dir])
    ids = bundle.item_ids
    histories = [[ids[1], ids[2], ids[3]], [ids[4], ids[5]], [ids[6], ids[7], ids[8]], ["unknown"]]
    own, fallbacks = bundle_lists(bundle, histories, [5, 5, 5, 5])
    assert fallbacks == 1 and all(len(m) == 5 for m in own)
    assert all(not set(m) & set(h) for m, h in zip(own, histories, strict=True))  # history excluded
    other = [i for i in ids if i not in own[2] and i not in histories[2]][:5]
    served = [own[0], own[1], other, own[3]]  # u2 was served other items than the bundle makes
    rows = []
    for u, (history, items) in enumerate(zip(histories, served, strict=True)):
        rows += [event(10 + j, f"u{u}", item) for j, item in enumerate(history)]
        rows.append(shown(100, f"u{u}", bundle.model_version, items))
    rows += [
        event(150, "u0", own[0][0]),  # a hit for both
        event(160, "u0", own[0][1], "purchase"),  # a conversion for both
        event(170, "u2", own[2][1]),  # a hit for the bundle only
        event(100 + T + 10, "u1", own[1][0]),  # after T: nothing
        event(400, "u9", ids[9], "add_to_cart"),  # someone else's
    ]
    write(tmp_path / "arch", rows)
    frame = read_feedback(str(tmp_path / "arch"))
    result = replay_bundles(frame, [(label, bundle)], SINCE, UNTIL, T)
    models = result["models"]
    assert result["lists"] == 4 and result["served_versions"] == {bundle.model_version: 4}
    assert (models["served"]["hits"], models["served"]["conversions"]) == (1, 1)
    mine = models[label]
    assert (mine["lists"], mine["hits"], mine["conversions"], mine["fallbacks"]) == (4, 2, 1, 1)
    assert mine["hit_rate"] == 0.5 and mine["overlap"] == pytest.approx(3 / 4)
    # only views in the histories: the same here; a context from after the histories: all fall back
    only_views = replay_bundles(frame, [(label, bundle)], SINCE, UNTIL, T, frozenset({"view"}))
    assert only_views["models"][label]["overlap"] == pytest.approx(3 / 4)
    late = replay_bundles(frame, [(label, bundle)], SINCE, UNTIL, T, context_since=SINCE + 50)
    assert late["models"][label]["fallbacks"] == 4
    # through replay(): the coverage from the bundle's item count, the counterfactual beside it
    full = replay(
        str(tmp_path / "arch"), str(SINCE), str(UNTIL), ReplayConfig(attribution_window=T), [bundle_dir]
    )
    row = by_model(full)[(bundle.model_version, "served")]
    assert (
        row["num_items"] == bundle.num_items and row["coverage"] == row["distinct_items"] / bundle.num_items
    )
    assert full["counterfactual"]["models"][label]["hits"] == 2
    assert full["counterfactual"]["attribution_complete"] is False
    assert np.isclose(full["counterfactual"]["models"]["served"]["hit_rate"], 0.25)


def test_the_served_cap_is_the_services() -> None:
    pytest.importorskip("redis")
    from mqsa.service.store import SERVED_CAP
    from mqsa.training.replay import SERVED_CAP as copied

    assert copied == SERVED_CAP  # an intentional copy: the trainer's image has no redis
    from mqsa.service.stats import UNKNOWN
    from mqsa.training.replay import UNKNOWN as unknown_copy

    assert unknown_copy == UNKNOWN
    from mqsa.service.feedback import model_of as served_model_of
    from mqsa.service.feedback import new_recommendation_id
    from mqsa.training.replay import model_of

    made = new_recommendation_id("0123456789abcdef")
    assert model_of(made) == served_model_of(made) == "0123456789abcdef"
