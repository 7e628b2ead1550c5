from __future__ import annotations

import csv
from dataclasses import replace

import pytest
import torch

from mqsa.errors import ResumeError
from mqsa.training.trainer import TrainConfig, Trainer, train

SMALL = {"max_len": 10, "hidden_size": 16}
CONFIG = TrainConfig(epochs=4, batch_size=256, seed=5, threads=1)


def history(out) -> list[dict[str, str]]:
    with (out / "history.csv").open(newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def straight(synthetic_data, tmp_path_factory):
    """Four epochs in one go: what a resumed run must reproduce exactly."""
    out = tmp_path_factory.mktemp("straight")
    return out, train(synthetic_data, out, SMALL, CONFIG, progress=False)


def test_a_resumed_run_is_bit_identical_to_one_never_stopped(synthetic_data, straight, tmp_path) -> None:
    reference_dir, reference = straight
    first = train(synthetic_data, tmp_path, SMALL, replace(CONFIG, epochs=2), progress=False)
    assert first["epochs_run"] == 2 and (tmp_path / "last.pt").exists()
    # another thread count may change; the result does not depend on it here (one thread both times)
    resumed = train(synthetic_data, tmp_path, SMALL, CONFIG, progress=False, resume=True)
    assert resumed["epochs_run"] == 4 and resumed["resumed_at"] == [2]
    assert reference["resumed_at"] == []
    assert (resumed["best_epoch"], resumed["valid"], resumed["test"]) == (
        reference["best_epoch"],
        reference["valid"],
        reference["test"],
    )
    assert history(tmp_path) == history(reference_dir)
    ours = torch.load(tmp_path / "best.pt", weights_only=False)["state_dict"]
    theirs = torch.load(reference_dir / "best.pt", weights_only=False)["state_dict"]
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    assert resumed["train_seconds"] > first["train_seconds"]


def test_resuming_a_finished_run_only_rewrites_its_reports(synthetic_data, straight) -> None:
    out, reference = straight
    again = train(synthetic_data, out, SMALL, CONFIG, progress=False, resume=True)
    assert again["epochs_run"] == 4 and again["test"] == reference["test"]
    assert again["resumed_at"] == [4]


def test_resume_refuses_other_settings_and_names_them(synthetic_data, straight) -> None:
    out, _ = straight
    with pytest.raises(ResumeError, match=r"train_config\.lr: 0\.001 -> 0\.002.*train_config\.seed: 5 -> 6"):
        train(synthetic_data, out, SMALL, replace(CONFIG, lr=2e-3, seed=6), progress=False, resume=True)
    with pytest.raises(ResumeError, match=r"model_config\.hidden_size: 16 -> 8"):
        train(synthetic_data, out, {**SMALL, "hidden_size": 8}, CONFIG, progress=False, resume=True)


def test_resume_without_a_run_state_is_a_clear_error(synthetic_data, tmp_path) -> None:
    with pytest.raises(ResumeError, match="nothing to resume"):
        train(synthetic_data, tmp_path, SMALL, CONFIG, progress=False, resume=True)
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ResumeError, match="not a readable run state"):
        train(synthetic_data, tmp_path, SMALL, CONFIG, progress=False, resume=True)


def test_a_run_state_from_before_a_setting_existed_resumes_with_its_default(synthetic_data, tmp_path) -> None:
    """A run stopped by an older version has no `loss` (or any setting added since) in its
    state: it ran with the default, so resuming with the default goes on, and another value
    is refused by name."""
    train(synthetic_data, tmp_path, SMALL, replace(CONFIG, epochs=1), progress=False)
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    for key in ("loss", "negatives", "in_batch_negatives", "ted_samples"):
        del state["fingerprint"]["train_config"][key]
    torch.save(state, tmp_path / "last.pt")
    with pytest.raises(ResumeError, match=r"train_config\.loss: 'exact' -> 'sampled'"):
        train(
            synthetic_data,
            tmp_path,
            SMALL,
            replace(CONFIG, epochs=2, loss="sampled"),
            progress=False,
            resume=True,
        )
    resumed = train(synthetic_data, tmp_path, SMALL, replace(CONFIG, epochs=2), progress=False, resume=True)
    assert resumed["epochs_run"] == 2 and resumed["resumed_at"] == [1]


def test_a_run_state_saved_before_fused_adam_resumes_fused(synthetic_data, tmp_path) -> None:
    """The saved optimizer groups carry `fused`; one saved before Adam ran fused must not turn it off."""
    train(synthetic_data, tmp_path, SMALL, replace(CONFIG, epochs=1), progress=False)
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    for group in state["optimizer"]["param_groups"]:
        group["fused"] = None  # what torch saved for an Adam made without fused=True
    torch.save(state, tmp_path / "last.pt")
    trainer = Trainer(synthetic_data, tmp_path, SMALL, replace(CONFIG, epochs=2), progress=False)
    assert trainer.fit(resume=True)["resumed_at"] == [1]
    assert all(group["fused"] is True for group in trainer.optimizer.param_groups)
