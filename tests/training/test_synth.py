from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from mqsa.errors import ConfigError
from mqsa.training.prepare import PrepareConfig, prepare
from mqsa.training.sequences import read_sequences
from mqsa.training.synth import SynthConfig, generate, plant, write_synthetic
from mqsa.training.vocabulary import Vocabulary, vocabulary_for

SMALL = SynthConfig(users=300, items=120, tastes=6, bundles=60, bundle_size=4, mean_length=10)


def test_same_seed_same_output_other_seed_differs() -> None:
    a, b, c = generate(SMALL), generate(SMALL), generate(replace(SMALL, seed=4))
    assert len(a) == len(b) == 300
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(len(x) == len(y) and np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_lengths_and_range() -> None:
    sequences = generate(SMALL)
    lengths = np.array([len(s) for s in sequences])
    assert lengths.min() >= 5
    assert lengths.max() <= 40
    assert 8 < lengths.mean() < 12
    items = np.concatenate(sequences)
    assert items.dtype == np.int64
    assert items.min() >= 0 and items.max() < 120


def test_bundles_cover_the_catalogue_and_items_are_shared() -> None:
    plan = plant(SMALL)
    assert plan.members.shape == (60, 4)
    assert all(len(set(row)) == 4 for row in plan.members.tolist())  # distinct items within a bundle
    per_item = np.bincount(plan.members.ravel(), minlength=120)
    assert per_item.min() >= 1  # every item is in some bundle
    assert (per_item >= 2).sum() > 80  # most are in several: the last item alone is ambiguous
    default = np.bincount(plant(SynthConfig()).members.ravel(), minlength=500)
    assert default.min() >= 1 and 2.4 < default.mean() < 2.6
    assert sorted(np.bincount(plan.taste_of).tolist()) == [10] * 6


def pairs_in_one_bundle(sequences: list[np.ndarray], members: np.ndarray) -> float:
    """The fraction of consecutive pairs (a, b) that some bundle holds both of."""
    together = np.zeros((members.max() + 1,) * 2, dtype=bool)
    for row in members:
        together[np.ix_(row, row)] = True
    prev = np.concatenate([s[:-1] for s in sequences])
    nxt = np.concatenate([s[1:] for s in sequences])
    return float(together[prev, nxt].mean())


def test_consecutive_items_come_from_one_bundle_well_above_chance() -> None:
    """Without noise most consecutive pairs are bundle-mates; with all noise few are."""
    members = plant(SMALL).members
    planted = pairs_in_one_bundle(generate(replace(SMALL, noise=0.0)), members)
    noise = pairs_in_one_bundle(generate(replace(SMALL, noise=1.0)), members)
    assert planted > 0.6  # a pair across two bundles is the rest (one in 4 with bundles of 4)
    assert noise < 0.15


def test_users_keep_to_their_taste() -> None:
    """Without noise, every item a user has is in some bundle of the user's taste."""
    plan = plant(SMALL)
    in_taste = np.zeros((6, 120), dtype=bool)  # taste -> items of its bundles
    for bundle, row in enumerate(plan.members):
        in_taste[plan.taste_of[bundle], row] = True
    sequences = generate(replace(SMALL, noise=0.0))
    assert all(in_taste[taste, seq].all() for taste, seq in zip(plan.user_tastes, sequences, strict=True))
    assert len(set(plan.user_tastes.tolist())) == 6
    shuffled = np.roll(plan.user_tastes, 1)  # the check can fail: other users' tastes do not fit
    assert np.mean([in_taste[t, seq].all() for t, seq in zip(shuffled, sequences, strict=True)]) < 0.5


@pytest.mark.parametrize(
    ("field", "value"),
    [("mean_length", 3), ("bundle_size", 1), ("tastes", 100), ("noise", 1.5), ("users", 0)],
)
def test_bad_settings_are_config_errors_naming_the_field(field: str, value) -> None:
    with pytest.raises(ConfigError, match=field):
        replace(SMALL, **{field: value})


def test_write_synthetic_files(tmp_path) -> None:
    config = replace(SMALL, seed=1)
    path = write_synthetic(tmp_path, config)
    assert path == tmp_path / "sequences.txt"
    vocab = vocabulary_for(path, 120)
    assert vocab.item_ids[17] == "i17"
    data = read_sequences(path, num_items=len(vocab))
    assert data.user_ids == [str(u) for u in range(300)]
    expected = generate(config)
    assert all(np.array_equal(x, y) for x, y in zip(data.sequences, expected, strict=True))
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert len(plan["bundles"]) == 60 and plan["bundles"][0]["items"][0].startswith("i")
    assert plan["user_tastes"] == plant(config).user_tastes.tolist()
    assert not (tmp_path / "interactions.csv").exists()


def test_raw_log_round_trips_through_prepare(tmp_path) -> None:
    write_synthetic(tmp_path / "synth", replace(SMALL, seed=2), raw_log=True)
    summary = prepare(tmp_path / "synth" / "interactions.csv", tmp_path / "prepared", PrepareConfig(k=1))
    synth_vocab = Vocabulary.load(tmp_path / "synth" / "items.json")
    synth = read_sequences(tmp_path / "synth" / "sequences.txt")
    prepared_vocab = Vocabulary.load(tmp_path / "prepared" / "items.json")
    prepared = read_sequences(tmp_path / "prepared" / "sequences.txt", num_items=len(prepared_vocab))
    assert summary["actions_after"] == summary["raw_rows"] == sum(len(s) for s in synth.sequences)
    assert summary["users_after"] == 300
    for a, b in zip(synth.sequences, prepared.sequences, strict=True):
        assert [synth_vocab.item_ids[i] for i in a] == [prepared_vocab.item_ids[i] for i in b]
