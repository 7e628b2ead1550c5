"""The quality gate end to end: `mqsa promote` refuses a worse candidate and promotes a better one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mqsa.cli import main
from mqsa.errors import ConfigError
from mqsa.service import versions
from mqsa.training.promote import Gate, decide

GATE = ["--metric", "ndcg@5"]  # the 2-epoch model's clearest lead over Item Transition here


@pytest.fixture(scope="module")
def shuffled_bundle(synthetic_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's model, trained the same way on sequences whose order was shuffled."""
    from mqsa.training.export import export_bundle
    from mqsa.training.sequences import read_sequences, write_sequences
    from mqsa.training.trainer import TrainConfig, train

    out = tmp_path_factory.mktemp("shuffled")
    rng = np.random.default_rng(0)
    write_sequences(
        out / "sequences.txt", [rng.permutation(s) for s in read_sequences(synthetic_data).sequences]
    )
    shutil.copy(synthetic_data.with_name("items.json"), out / "items.json")
    train(
        out / "sequences.txt",
        out / "run",
        {"max_len": 20, "hidden_size": 32},
        TrainConfig(epochs=2, batch_size=128, seed=7),
        progress=False,
    )
    export_bundle(out / "run" / "best.pt", out / "bundle")
    return out / "bundle"


def version_of(bundle: Path) -> str:
    return json.loads((bundle / "manifest.json").read_text())["model_version"]


def promote_args(candidate: Path, root: Path, holdout_log: dict[str, Any]) -> list[str]:
    return [
        "promote",
        str(candidate),
        "--bundles",
        str(root),
        "--holdout",
        str(holdout_log["log"]),
        "--holdout-since",
        holdout_log["since"],
        *GATE,
    ]


def test_a_candidate_trained_on_shuffled_sequences_is_refused(
    tmp_path, bundle_dir, shuffled_bundle, holdout_log, capsys
) -> None:
    root = tmp_path / "bundles"
    root.mkdir()
    candidate = Path(shutil.copytree(bundle_dir, tmp_path / "good"))
    assert main(promote_args(candidate, root, holdout_log)) == 0  # the first one: baselines only
    serving = version_of(bundle_dir)
    assert f"current -> versions/{serving} (was nothing)" in capsys.readouterr().out
    worse = Path(shutil.copytree(shuffled_bundle, tmp_path / "candidate"))
    assert main(promote_args(worse, root, holdout_log)) == 3
    out, err = capsys.readouterr()
    assert "| candidate |" in out and "| serving |" in out and "| ItemTransition |" in out
    line = err.strip()
    assert "\n" not in line and line.startswith(f"mqsa: error: refused {version_of(worse)}: candidate NDCG@5")
    assert f"still serving {serving}" in line and "does not beat ItemTransition" in line
    assert versions.current_version(root) == serving
    assert sorted(p.name for p in (root / "versions").iterdir()) == [serving]  # never copied
    report = json.loads((tmp_path / "candidate.promotion.json").read_text())
    assert report["decision"]["promoted"] is False and report["decision"]["serving"] == serving
    assert (
        report["models"]["candidate"]["metrics"]["NDCG@5"] < report["models"]["serving"]["metrics"]["NDCG@5"]
    )
    assert report["gate"] == {"metric": "NDCG@5", "tolerance": 0.01, "keep": 5}
    assert versions.read_history(root)[-1]["action"] == "refuse"


def test_a_better_candidate_is_promoted_and_rollback_restores_the_previous(
    tmp_path, bundle_dir, shuffled_bundle, holdout_log, capsys
) -> None:
    root = versions.open_root(tmp_path)
    worse = versions.add_version(root, shuffled_bundle)  # put in place by hand: it fails the gate
    versions.switch(root, worse)
    versions.record(root, "promote", worse, **{"from": None})
    candidate = Path(shutil.copytree(bundle_dir, tmp_path / "candidate"))
    assert main(promote_args(candidate, root, holdout_log)) == 0
    better = version_of(bundle_dir)
    assert versions.current_version(root) == better
    assert json.loads((tmp_path / "candidate.promotion.json").read_text())["decision"]["promoted"]
    capsys.readouterr()
    assert main(["versions", "--bundles", str(root)]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[0].split()[:2] == [better, "current"] and listed[1].split()[:2] == [worse, "previous"]
    assert main(["rollback", "--bundles", str(root)]) == 0
    assert f"current -> versions/{worse} (was {better})" in capsys.readouterr().out
    assert versions.current_version(root) == worse
    assert json.loads((root / "current" / "manifest.json").read_text())["model_version"] == worse


def test_bad_input_is_one_clear_line(tmp_path, bundle_dir, holdout_log, capsys) -> None:
    root = tmp_path / "bundles"
    root.mkdir()
    cases = [
        (promote_args(bundle_dir, tmp_path / "missing", holdout_log), "no such bundle root"),
        (promote_args(tmp_path, root, holdout_log), "manifest.json is missing"),
        ([*promote_args(bundle_dir, root, holdout_log), "--holdout-since", "soon"], "'soon' is neither"),
        ([*promote_args(bundle_dir, root, holdout_log), "--tolerance", "1.5"], "tolerance must be in [0, 1)"),
        (["rollback", "--bundles", str(root)], "nothing is current yet"),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mqsa: error:") and message in lines[0], lines
    assert not (root / "current").exists()


def result(candidate: float, serving: float | None, popularity: float = 0.1, transition: float = 0.2) -> dict:
    models = {"candidate": {"metrics": {"NDCG@10": candidate}}}
    if serving is not None:
        models["serving"] = {"metrics": {"NDCG@10": serving}}
    baselines = {
        "Popularity": {"metrics": {"NDCG@10": popularity}},
        "ItemTransition": {"metrics": {"NDCG@10": transition}},
    }
    return {"holdout": {"scored": 10}, "models": models, "baselines": baselines}


def test_the_gate_rule() -> None:
    gate = Gate(metric="ndcg@10", tolerance=0.01)
    assert gate.metric == "NDCG@10"
    assert decide(result(0.297, 0.3), gate, True) == []  # within 1% below
    assert decide(result(0.296, 0.3), gate, True) == [
        "candidate NDCG@10 0.2960 < serving 0.3000 x (1 - 0.01) = 0.2970"
    ]
    assert decide(result(0.2, None), gate, False) == [
        "candidate NDCG@10 0.2000 does not beat ItemTransition 0.2000"
    ]
    assert decide(result(0.5, None), Gate(tolerance=0.0), False) == []
    assert (
        "no holdout event could be scored"
        in decide({**result(0.5, 0.4), "holdout": {"scored": 0}}, gate, True)[0]
    )
    for bad in ({"metric": "MRR"}, {"tolerance": -0.1}, {"keep": 1}):
        with pytest.raises(ConfigError):
            Gate(**bad)
