"""The nightly CronJob's own script (deploy/base/train-cronjob.yaml), run for real on this
machine: archive -> prepare -> warm train -> export -> gated promotion, two nights in a row.
Here, not in tests/deploy, for the real Redis fixtures of tests/service/conftest.py."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mqsa.service.archive import Archiver, ArchiveSink
from mqsa.service.store import Event, HistoryStore, connect, stream_keys

ROOT = Path(__file__).resolve().parents[2]
CRONJOB = ROOT / "deploy" / "base" / "train-cronjob.yaml"


def night_script(bundles: Path) -> str:
    """The CronJob's script with its volume paths moved under ``bundles`` and 8 epochs a night."""
    job = yaml.safe_load(CRONJOB.read_text())
    (container,) = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    script = container["args"][0].replace("/bundles", str(bundles))
    return script.replace("--patience 20", "--patience 20 --epochs 8")


def archive_synthetic_events(redis_url: str, prefix: str, archive: Path, log: Path) -> int:
    """The synthetic log's events, spread over the last ten days, through the service's store
    (archive mode) and the archiver; returns how many."""
    import pandas as pd

    frame = pd.read_csv(log)
    first, last = frame["timestamp"].min(), frame["timestamp"].max()
    stamps = time.time() - 10 * 86400 + (frame["timestamp"] - first) / (last - first) * 10 * 86400

    async def main() -> int:
        client = connect(redis_url, timeout_seconds=5.0)
        try:
            store = HistoryStore(client, prefix=prefix, stream_shards=2, stream_archive=True)
            events = [
                Event(str(u), str(i), timestamp=float(t))
                for u, i, t in zip(frame.user_id, frame.item_id, stamps, strict=True)
            ]
            for start in range(0, len(events), 1000):
                await store.append(events[start : start + 1000])
            archiver = Archiver(client, stream_keys(prefix, 2), ArchiveSink(str(archive)))
            return (await archiver.run_once()).archived
        finally:
            await client.aclose()

    return asyncio.run(main())


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX shell")
def test_two_nights_of_the_cronjob_script(redis_url, key_prefix, tmp_path) -> None:
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "ARCHIVE_URL": str(tmp_path / "archive"),
        "TRAIN_WINDOW": "90d",
        "HOLDOUT_HOURS": "24",
        "PROMOTE_TOLERANCE": "0.01",
        "TRAIN_THREADS": "1",
    }
    synth = [str(bin_dir / "mqsa"), "data", "synth", "--out", str(tmp_path / "syn"), "--raw-log"]
    subprocess.run([*synth, "--users", "600", "--items", "150"], check=True, env=env, capture_output=True)
    assert archive_synthetic_events(
        redis_url, key_prefix, tmp_path / "archive", tmp_path / "syn" / "interactions.csv"
    )
    bundles = tmp_path / "bundles"
    (bundles / "work").mkdir(parents=True)
    script = night_script(bundles)

    first = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "promoted" in first.stdout and "(was nothing)" in first.stdout  # only the baselines to beat
    serving = (bundles / "current").resolve()
    assert serving.parent == bundles / "versions"
    checkpoint = bundles / "work" / "checkpoints" / f"{serving.name}.pt"
    assert checkpoint.is_file(), "the serving version's checkpoint, for tomorrow's warm start"

    time.sleep(1.1)  # the work folders are named by the second
    second = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=600)
    nights = sorted(p for p in (bundles / "work").iterdir() if p.name.startswith("2"))
    assert len(nights) == 2
    metrics = json.loads((nights[1] / "train" / "metrics.json").read_text())
    assert metrics["warm_start"]["source"] == str(checkpoint)
    assert metrics["warm_start"]["kept"] > 0
    assert "serving" in second.stdout, "the candidate is judged against the serving model"
    if second.returncode == 0:  # promoted: current moved on, the previous version is kept
        assert (bundles / "current").resolve() != serving and serving.is_dir()
        assert len(list((bundles / "work" / "checkpoints").glob("*.pt"))) == 2
    else:  # refused: exit 3, the report beside the candidate, current untouched
        assert second.returncode == 3, second.stderr
        assert (nights[1] / "bundle.promotion.json").is_file()
        assert (bundles / "current").resolve() == serving
        assert [p.name for p in (bundles / "work" / "checkpoints").glob("*.pt")] == [checkpoint.name]
