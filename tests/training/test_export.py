from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import torch

from mqsa.errors import ConfigError, DataError
from mqsa.models.mqsa import MQSA
from mqsa.service.batching import Batcher
from mqsa.service.bundle import Bundle, load_bundle
from mqsa.service.metrics import Metrics
from mqsa.service.recommender import Ask, recommend
from mqsa.service.rules import Rules
from mqsa.training.checkpoint import Checkpoint
from mqsa.training.evaluation import make_test_set, model_scorer, target_ranks
from mqsa.training.export import ExportConfig, export_bundle, manifest_digest
from mqsa.training.sequences import read_sequences, split_leave_one_out


@pytest.fixture(scope="module")
def model(trained_run) -> MQSA:
    return Checkpoint.load(trained_run["dir"] / "best.pt").build_model()


def served(bundle: Bundle, history: list[int], n: int, exclude: set[int]) -> list[tuple[int, float]]:
    """What the service answers for a history of item indices, through its own recommend():
    (item_idx, score) pairs, best first."""
    ids = bundle.item_ids
    ask = Ask(n=n, exclude={ids[i] for i in exclude})
    metrics = Metrics()
    rules, history_ids = Rules(bundle.item_ids), [ids[i] for i in history]
    result = asyncio.run(recommend(bundle, rules, history_ids, ask, None, metrics, Batcher(metrics)))
    assert result.source == "model"
    return [(bundle.item_index[item_id], score) for item_id, score, _ in result.items]


@pytest.fixture(scope="module")
def bundle(bundle_dir):
    return load_bundle(bundle_dir)


@pytest.fixture(scope="module")
def users(trained_run, model):
    """Test-split inputs and histories of the synthetic users."""
    data = read_sequences(trained_run["data"])
    return make_test_set(split_leave_one_out(data.sequences, model.config.max_len), model.config.max_len)


def test_manifest_describes_the_bundle(bundle_dir, trained_run, model) -> None:
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    assert manifest["format_version"] == 2
    assert manifest["num_items"] == model.config.num_items == 200
    assert manifest["padding_idx"] == 200 and manifest["max_len"] == 20 and manifest["hidden_size"] == 32
    assert manifest["alpha"] == 0.5
    assert manifest["index"] == {"type": "flat", "metric": "inner_product"}
    assert manifest["metrics"]["test"] == trained_run["metrics"]["test"]
    assert set(manifest["files"]) == {"encoder.onnx", "items.faiss", "items.json", "popular.json"}
    assert len(manifest["model_version"]) == 16 and manifest_digest(manifest).startswith(
        manifest["model_version"]
    )
    assert "signature" not in manifest  # no key given
    popular = json.loads((bundle_dir / "popular.json").read_text())
    assert popular["counts"] == sorted(popular["counts"], reverse=True) and popular["counts"][0] > 0
    assert not list(bundle_dir.parent.glob(".*tmp*"))  # nothing half-written left behind


def test_onnx_matches_torch_for_every_length(bundle, model) -> None:
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    for length in range(1, cfg.max_len + 1):
        batch = torch.randint(0, cfg.num_items, (3, length), generator=gen)
        short, long = bundle.encode(batch.numpy())
        with torch.no_grad():
            ref_short, ref_long = model.encode(batch)
        np.testing.assert_allclose(short, ref_short.numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(long, ref_long.numpy(), atol=1e-5, rtol=0)


def test_onnx_matches_torch_on_a_batch_mixing_lengths(bundle, model) -> None:
    cfg = model.config
    batch = torch.randint(0, cfg.num_items, (8, cfg.max_len), generator=torch.Generator().manual_seed(1))
    for row, length in enumerate([1, 2, 3, 5, 8, 13, 19, 20]):
        batch[row, : cfg.max_len - length] = cfg.padding_idx
    short, long = bundle.encode(batch.numpy())
    with torch.no_grad():
        ref_short, ref_long = model.encode(batch)
    np.testing.assert_allclose(short, ref_short.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(long, ref_long.numpy(), atol=1e-5, rtol=0)


def test_faiss_top_n_equals_full_ranking_top_n(bundle, model, users) -> None:
    picked = range(0, len(users), 7)
    inputs = [users.inputs[u] for u in picked]
    history = [users.history[u] for u in picked]
    scores = model_scorer(model)(inputs)  # (B, N)
    for b, seen in enumerate(history):
        scores[b, torch.from_numpy(seen)] = -torch.inf
    expected = scores.topk(10, dim=1)
    got = [served(bundle, s.tolist(), 10, set(h.tolist())) for s, h in zip(inputs, history, strict=True)]
    assert [[i for i, _ in row] for row in got] == expected.indices.tolist()
    np.testing.assert_allclose([[s for _, s in row] for row in got], expected.values.numpy(), atol=1e-4)


def test_bundle_recommends_what_evaluation_ranks_first(bundle, model, users) -> None:
    """For every test user, the bundle's first item is the evaluation's first (up to float ties)."""
    first = [
        served(bundle, s.tolist(), 1, set(h.tolist()))
        for s, h in zip(users.inputs, users.history, strict=True)
    ]
    firsts = torch.tensor([row[0][0] for row in first])
    scores = model_scorer(model)(users.inputs)
    ranks = target_ranks(scores, firsts, users.history)  # history set to -inf in place
    best = scores.max(dim=1).values
    chosen = scores.gather(1, firsts[:, None]).squeeze(1)
    assert torch.all((ranks == 0) | (best - chosen < 1e-4))
    assert (ranks == 0).float().mean().item() > 0.95


def test_exact_n_items_and_no_excluded(bundle) -> None:
    banned = set(range(0, 200, 2))
    row = served(bundle, [1, 3, 5], 100, banned)
    assert len(row) == 100 and not {i for i, _ in row} & banned


def test_existing_bundle_needs_force(trained_run, bundle_dir, tmp_path) -> None:
    with pytest.raises(DataError, match="exists"):
        export_bundle(trained_run["dir"] / "best.pt", bundle_dir)


def test_failed_export_leaves_nothing(trained_run, tmp_path) -> None:
    with pytest.raises(ConfigError, match="nlist"):
        export_bundle(trained_run["dir"] / "best.pt", tmp_path / "b", ExportConfig(index="ivf", nlist=10_000))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kind", "params"), [("ivf", {"nlist": 8, "nprobe": 8}), ("hnsw", {"ef_search": 64})]
)
def test_approximate_indexes_record_their_parameters(trained_run, tmp_path, kind, params) -> None:
    out = tmp_path / kind
    manifest = export_bundle(trained_run["dir"] / "best.pt", out, ExportConfig(index=kind, **params))
    assert manifest["index"]["type"] == kind
    for key, value in params.items():
        assert manifest["index"][key] == value
    bundle = load_bundle(out)
    row = served(bundle, [1, 2, 3], 10, {1, 2, 3})
    assert len(row) == 10 and not {i for i, _ in row} & {1, 2, 3}
