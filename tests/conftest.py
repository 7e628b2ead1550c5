"""Shared fixtures: the benchmark data location and one tiny trained model per session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__import__("os").environ.get("MQSA_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or skip the test when it is absent."""
    if not (SHARED_DATA / "beauty.txt").is_file():
        pytest.skip(f"benchmark data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small seeded synthetic data set (sequences.txt + items.json): bundles, tastes."""
    from mqsa.training.synth import SynthConfig, write_synthetic

    out = tmp_path_factory.mktemp("synth")
    return write_synthetic(out, SynthConfig(users=800, items=200, tastes=8, bundles=100, mean_length=10))


@pytest.fixture(scope="session")
def trained_run(synthetic_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two epochs of MQSA-TED on the synthetic data: the run directory and its metrics."""
    from mqsa.training.trainer import TrainConfig, train

    out = tmp_path_factory.mktemp("run")
    model_config = {"max_len": 20, "hidden_size": 32}
    config = TrainConfig(epochs=2, batch_size=128, seed=7)
    metrics = train(synthetic_data, out, model_config, config, progress=False)
    return {"dir": out, "metrics": metrics, "data": synthetic_data}


@pytest.fixture(scope="session")
def bundle_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory the session's bundles live in (the service's default reload root)."""
    return tmp_path_factory.mktemp("bundles")


@pytest.fixture(scope="session")
def bundle_dir(trained_run: dict[str, Any], bundle_root: Path) -> Path:
    """The tiny trained model exported as a serving bundle (exact index)."""
    from mqsa.training.export import export_bundle

    out = bundle_root / "current"
    export_bundle(trained_run["dir"] / "best.pt", out)
    return out


@pytest.fixture(scope="session")
def second_bundle_dir(trained_run: dict[str, Any], bundle_root: Path) -> Path:
    """The same model exported with an HNSW index, beside the first: another version to reload to."""
    from mqsa.training.export import ExportConfig, export_bundle

    out = bundle_root / "next"
    export_bundle(trained_run["dir"] / "best.pt", out, ExportConfig(index="hnsw"))
    return out


HOLDOUT_CUT = 1_700_000_000  # each user's last event of `holdout_log` is at this second


@pytest.fixture(scope="session")
def holdout_log(synthetic_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The synthetic data as a raw log whose most recent window holds each user's last item (the
    leave-one-out test item, which training never saw): ``{"log": path, "since": str(cut)}``."""
    import pandas as pd

    from mqsa.training.sequences import read_sequences
    from mqsa.training.vocabulary import vocabulary_for

    data = read_sequences(synthetic_data)
    vocab = vocabulary_for(synthetic_data, data.num_items)
    rows = [
        (f"u{u}", vocab.item_ids[i], HOLDOUT_CUT + 60 * (j - len(seq) + 1))
        for u, seq in enumerate(data.sequences)
        for j, i in enumerate(seq)
    ]
    path = tmp_path_factory.mktemp("holdout") / "log.csv"
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(path, index=False)
    return {"log": path, "since": str(HOLDOUT_CUT)}
