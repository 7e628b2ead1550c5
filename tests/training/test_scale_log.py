"""The large synthetic logs of ``mqsa data synth-log`` (issue 20), on configs of a few thousand events."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from mqsa.errors import ConfigError, DataError
from mqsa.training.scale_log import PRESETS, ScaleLogConfig, chunks, write_scale_log

ROOT = Path(__file__).resolve().parents[2]
TINY = ScaleLogConfig(users=400, items=2000, mean_events=10.0, chunk_users=150)


def read(path: Path) -> pd.DataFrame:
    return pq.read_table(path).to_pandas()


def consecutive_steps(log: pd.DataFrame, items: int) -> np.ndarray:
    """(next - previous) mod N over each user's consecutive pairs of items."""
    number = log["item_id"].str[1:].astype(np.int64).to_numpy()
    same_user = (log["user_id"].to_numpy()[1:] == log["user_id"].to_numpy()[:-1]).astype(bool)
    return ((number[1:] - number[:-1]) % items)[same_user]


def test_the_same_seed_gives_the_same_file_and_another_seed_another(tmp_path) -> None:
    first = write_scale_log(tmp_path / "a.parquet", TINY)
    write_scale_log(tmp_path / "b.parquet", TINY)
    write_scale_log(tmp_path / "c.parquet", dataclasses.replace(TINY, seed=1))
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    assert not read(tmp_path / "a.parquet").equals(read(tmp_path / "c.parquet"))
    assert 2000 < first["rows"] < 10_000 and first["users"] == 400
    assert first["items"] == read(tmp_path / "a.parquet")["item_id"].nunique()
    assert not list(tmp_path.glob("*.partial"))  # written beside, then moved into place


def test_columns_ids_and_timestamps_increasing_within_each_user(tmp_path) -> None:
    write_scale_log(tmp_path / "log.parquet", TINY)
    table = pq.read_table(tmp_path / "log.parquet")
    assert [str(t) for t in table.schema.types] == ["string", "string", "int64"]
    assert table.schema.names == ["user_id", "item_id", "timestamp"]
    log = table.to_pandas()
    assert log["user_id"].str.fullmatch(r"u\d+").all() and log["item_id"].str.fullmatch(r"i\d+").all()
    assert log["user_id"].nunique() == TINY.users
    assert (log.groupby("user_id", sort=False)["timestamp"].diff().dropna() > 0).all()


def test_item_popularity_is_skewed() -> None:
    items = np.concatenate([c.items for c in chunks(TINY)])
    counts = np.sort(np.bincount(items, minlength=TINY.items))[::-1]
    top = counts[: TINY.items // 100].sum() / counts.sum()  # the top 1% of the items
    assert top > 0.08, top  # eight times their share, and more
    assert counts[0] > 20 * counts.mean()


def test_consecutive_items_are_often_neighbours_far_above_chance(tmp_path) -> None:
    write_scale_log(tmp_path / "log.parquet", TINY)
    steps = consecutive_steps(read(tmp_path / "log.parquet"), TINY.items)
    neighbours = ((steps >= 1) & (steps <= TINY.neighbours)).mean()
    assert neighbours > 0.4, neighbours  # neighbour_prob 0.5: about half, less the rare wraps
    write_scale_log(tmp_path / "none.parquet", dataclasses.replace(TINY, neighbour_prob=0.0))
    steps = consecutive_steps(read(tmp_path / "none.parquet"), TINY.items)
    assert ((steps >= 1) & (steps <= TINY.neighbours)).mean() < 0.05  # chance, with popular items


def test_written_in_row_groups_of_chunk_users(tmp_path) -> None:
    summary = write_scale_log(tmp_path / "log.parquet", TINY)
    metadata = pq.ParquetFile(tmp_path / "log.parquet").metadata
    assert metadata.num_row_groups == summary["row_groups"] == 3  # 150 + 150 + 100 users
    assert sum(metadata.row_group(g).num_rows for g in range(3)) == summary["rows"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("users", 0),
        ("items", 4),
        ("mean_events", 0.5),
        ("max_events", 5),
        ("item_exponent", -0.1),
        ("user_exponent", 1.0),
        ("neighbour_prob", 1.5),
        ("neighbours", 0),
        ("seed", -1),
        ("chunk_users", 0),
    ],
)
def test_a_bad_setting_is_a_config_error_naming_it(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"^{field} must"):
        dataclasses.replace(TINY, **{field: value})


def test_a_path_that_cannot_be_written_is_a_data_error(tmp_path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match="cannot write here"):
        write_scale_log(tmp_path / "file" / "log.parquet", TINY)


def mqsa(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mqsa.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_the_cli_writes_a_preset_with_overrides_that_data_prepare_reads(tmp_path) -> None:
    from mqsa.cli import build_parser

    log = tmp_path / "log.parquet"
    small = ["--users", "500", "--items", "400", "--chunk-users", "200"]
    result = mqsa("data", "synth-log", "--preset", "S2", *small, "--out", str(log))
    assert result.returncode == 0, result.stderr
    expected = dataclasses.replace(PRESETS["S2"], users=500, items=400, chunk_users=200)  # S2's other fields
    rows = sum(len(c.items) for c in chunks(expected))
    assert result.stdout.strip().startswith(f"wrote {log}: {rows} rows, 500 users,")
    prepared = mqsa("data", "prepare", str(log), "--out", str(tmp_path / "prep"))
    assert prepared.returncode == 0, prepared.stderr
    summary = json.loads(prepared.stdout[: prepared.stdout.rindex("}") + 1])
    assert summary["actions_before"] == rows and 0 < summary["actions_after"] <= rows
    assert (tmp_path / "prep" / "sequences.txt").is_file()
    parser = build_parser(["data", "synth-log"])
    args = parser.parse_args(["data", "synth-log", "--out", "x"])
    assert (
        ScaleLogConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ScaleLogConfig)})
        == (PRESETS[args.preset])
    )  # without --preset: S1, the dataclass's defaults


def test_the_cli_offers_every_preset_and_refuses_a_bad_setting(tmp_path) -> None:
    from mqsa.cli import build_parser

    parser = build_parser(["data", "synth-log"])
    for name in PRESETS:
        assert parser.parse_args(["data", "synth-log", "--preset", name, "--out", "x"]).preset == name
    bad = mqsa("data", "synth-log", "--out", str(tmp_path / "x.parquet"), "--neighbour-prob", "2")
    assert (
        bad.returncode == 2 and bad.stderr.strip() == "mqsa: error: neighbour_prob must be in [0, 1], got 2.0"
    )
