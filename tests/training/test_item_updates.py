"""Lazy item updates (training/item_updates.py, ``TrainConfig.lazy_item_updates``)."""

from __future__ import annotations

import json

import pytest
import torch

from mqsa import cli
from mqsa.errors import ConfigError
from mqsa.models.mqsa import MQSA, MQSAConfig
from mqsa.training.item_updates import LazyItemAdam
from mqsa.training.sampled_loss import item_total
from mqsa.training.trainer import TrainConfig, Trainer, build_optimizer, ready_gradients

N, D, L2 = 9, 4, 1e-2


def tiny_model() -> MQSA:
    torch.manual_seed(0)
    model = MQSA(MQSAConfig(num_items=N, max_len=6, hidden_size=D, num_heads=1, windows=(2,)))
    with torch.no_grad():
        model.item_table()[:N].normal_(0.0, 0.3)
    return model


def row_gradient(rows: list[int], values: torch.Tensor) -> torch.Tensor:
    """A sparse (N + 1, D) gradient with ``values`` (R, D) at ``rows`` (repeats allowed)."""
    return torch.sparse_coo_tensor(torch.tensor([rows]), values, (N + 1, D), check_invariants=True)


def test_only_the_rows_in_the_gradient_move_and_keep_their_moments() -> None:
    """A step on row 3, then one on rows 2 and 5: the second leaves row 3's weights and
    moments as the first left them (no decay), and moves rows 2 and 5 only."""
    model = tiny_model()
    optimizer = LazyItemAdam(model, lr=0.1, betas=(0.9, 0.999), l2=L2)
    model.item_table().grad = row_gradient([3], torch.ones(1, D))
    optimizer.step()
    state = optimizer.items.state[model.item_table()]
    before = model.item_table().detach().clone()
    moments = state["exp_avg"].clone(), state["exp_avg_sq"].clone()
    assert torch.all(moments[0][3] != 0)
    model.item_table().grad = row_gradient([2, 5, 2], torch.ones(3, D))
    optimizer.step()
    moved = (model.item_table().detach() != before).any(dim=1).nonzero().squeeze(1).tolist()
    assert moved == [2, 5] and state["step"] == 2
    untouched = [r for r in range(N + 1) if r not in (2, 5)]
    assert torch.equal(state["exp_avg"][untouched], moments[0][untouched])
    assert torch.equal(state["exp_avg_sq"][untouched], moments[1][untouched])


def test_ready_gradients_keeps_the_table_sparse_for_the_lazy_optimizer_only() -> None:
    """The trainer's and bench/sampled_step.py's one optimizer: lazy keeps the item rows'
    gradient sparse, Adam gets it dense (the same values)."""
    for lazy in (True, False):
        model = tiny_model()
        optimizer = build_optimizer(model, TrainConfig(loss="sampled", lazy_item_updates=lazy))
        assert isinstance(optimizer, LazyItemAdam) == lazy
        model.item_table().grad = row_gradient([3, 3], torch.ones(2, D))
        ready_gradients(model, optimizer)
        grad = model.item_table().grad
        assert grad.is_sparse == lazy
        assert torch.equal(grad.to_dense()[3], torch.full((D,), 2.0))
    with pytest.raises(ConfigError, match="needs the sampled loss"):
        build_optimizer(tiny_model(), TrainConfig(lazy_item_updates=True))  # auto: exact for 9 items


def test_a_learning_rate_set_on_the_groups_reaches_both_optimizers() -> None:
    optimizer = LazyItemAdam(tiny_model(), lr=0.1, betas=(0.9, 0.999), l2=L2)
    assert len(optimizer.param_groups) == 2
    for group in optimizer.param_groups:
        group["lr"] = 0.005
    assert optimizer.network.param_groups[0]["lr"] == optimizer.items.param_groups[0]["lr"] == 0.005


def test_with_every_row_in_the_gradient_it_is_adam_with_weight_decay() -> None:
    """All rows touched every step: the lazy step is Adam's, the L2 gradient l2 * w included."""
    lazy_model, dense_model = tiny_model(), tiny_model()
    lazy = LazyItemAdam(lazy_model, lr=0.05, betas=(0.9, 0.98), l2=L2)
    dense = torch.optim.Adam([dense_model.item_table()], lr=0.05, betas=(0.9, 0.98), weight_decay=L2)
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        grad = torch.randn(N + 1, D, generator=generator)
        lazy_model.item_table().grad = row_gradient(list(range(N + 1)), grad)
        dense_model.item_table().grad = grad.clone()
        lazy.step()
        dense.step()
    assert torch.allclose(lazy_model.item_table(), dense_model.item_table(), atol=1e-6)
    assert not torch.equal(lazy_model.item_table(), tiny_model().item_table())


def test_a_dense_item_gradient_is_refused() -> None:
    model = tiny_model()
    optimizer = LazyItemAdam(model, lr=0.1, betas=(0.9, 0.999), l2=0.0)
    model.item_table().grad = torch.ones(N + 1, D)
    with pytest.raises(RuntimeError, match="sparse item-table gradient"):
        optimizer.step()


def test_the_estimated_item_total_is_unbiased_and_touches_only_its_rows() -> None:
    model = tiny_model()
    exact = model.item_total().detach()
    torch.manual_seed(3)
    estimates = torch.stack([item_total(model, 4, torch.device("cpu")).detach() for _ in range(4000)])
    assert torch.allclose(estimates.mean(0), exact, atol=0.05 * exact.abs().max().item() + 0.02)
    model.use_sparse_item_gradients()
    item_total(model, 3, torch.device("cpu")).sum().backward()
    grad = model.item_table().grad.coalesce()
    assert grad.is_sparse and 1 <= grad.indices().shape[1] <= 3
    assert grad.indices().max() < N  # never the padding row


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss": "exact"}, "lazy_item_updates needs the sampled loss"),
        ({"loss": "sampled", "ted_samples": 0}, "lazy_item_updates needs ted_samples >= 1"),
    ],
)
def test_lazy_updates_without_what_they_need_are_refused_before_the_data_is_read(kwargs, message) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(lazy_item_updates=True, **kwargs)


def test_lazy_updates_where_auto_resolves_to_the_exact_loss_are_a_config_error(
    synthetic_data, tmp_path
) -> None:
    config = TrainConfig(epochs=1, lazy_item_updates=True)  # --loss auto: exact for 200 items
    with pytest.raises(ConfigError, match="lazy_item_updates needs the sampled loss"):
        Trainer(synthetic_data, tmp_path, {"max_len": 10, "hidden_size": 16}, config, progress=False)


def lazy_argv(data, out) -> list[str]:
    argv = ["train", "--data", str(data), "--out", str(out), "--quiet", "--device", "cpu", "--threads", "1"]
    argv += ["--batch-size", "128", "--seed", "7", "--max-len", "20", "--hidden-size", "32"]
    return [*argv, "--loss", "sampled", "--negatives", "64", "--lazy-item-updates"]


def test_a_lazy_run_learns_and_resumes_to_the_same_weights(synthetic_data, tmp_path) -> None:
    """Three epochs in one go, and two then a resumed third (the two optimizers' states
    saved and loaded): the same weights and metrics; and better than popularity."""
    assert cli.main([*lazy_argv(synthetic_data, tmp_path / "once"), "--epochs", "3"]) == 0
    assert cli.main([*lazy_argv(synthetic_data, tmp_path / "split"), "--epochs", "2"]) == 0
    assert cli.main([*lazy_argv(synthetic_data, tmp_path / "split"), "--epochs", "3", "--resume"]) == 0
    once, split = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("once", "split"))
    assert once["train_config"]["lazy_item_updates"] and once["epochs_run"] == split["epochs_run"] == 3
    assert once["valid"] == split["valid"] and once["test"] == split["test"]
    weights = [torch.load(tmp_path / d / "best.pt", weights_only=False) for d in ("once", "split")]
    assert all(torch.equal(a, b) for a, b in zip(*(w["state_dict"].values() for w in weights), strict=True))
    assert once["test"]["NDCG@10"] > once["baselines"]["Popularity"]["test"]["NDCG@10"]


def test_unset_lazy_updates_resolve_to_lazy_for_the_sampled_loss_on_one_process_only() -> None:
    sampled = TrainConfig(loss="sampled")
    assert sampled.lazy_item_updates is None and sampled.lazy_updates(N)
    assert not sampled.lazy_updates(N, distributed=True)  # the lazy optimizer is one process's
    assert not TrainConfig().lazy_updates(N)  # --loss auto: exact for 9 items
    assert TrainConfig().lazy_updates(200_000)  # ... and sampled above 10^5
    assert not TrainConfig(loss="sampled", ted_samples=0).lazy_updates(N)  # TED would read every row
    assert TrainConfig(loss="sampled", ted_samples=0, lambda_kd=0.0).lazy_updates(N)  # no TED
    assert not TrainConfig(loss="sampled", lazy_item_updates=False).lazy_updates(N)
    assert TrainConfig(loss="sampled").loss_settings(N).total_samples == 1024  # TED's share estimated
    assert TrainConfig(loss="sampled", lazy_item_updates=False).loss_settings(N).total_samples == 0


def test_a_sampled_run_is_lazy_unless_told_otherwise_and_resumes_only_as_it_ran(
    synthetic_data, tmp_path, capsys
) -> None:
    """No flag: lazy (its records say so); ``--no-lazy-item-updates``: dense; a dense run's
    state resumed without the flag is refused, naming the setting."""
    default = lazy_argv(synthetic_data, tmp_path / "default")[:-1]  # without --lazy-item-updates
    dense = [*lazy_argv(synthetic_data, tmp_path / "dense")[:-1], "--no-lazy-item-updates"]
    assert cli.main([*default, "--epochs", "1", "--eval-every", "2"]) == 0
    assert cli.main([*dense, "--epochs", "1", "--eval-every", "2"]) == 0
    records = {d: json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("default", "dense")}
    assert records["default"]["train_config"]["lazy_item_updates"] is True
    assert records["dense"]["train_config"]["lazy_item_updates"] is False
    optimizers = {d: torch.load(tmp_path / d / "last.pt", weights_only=False)["optimizer"] for d in records}
    assert "items" in optimizers["default"] and "items" not in optimizers["dense"]  # LazyItemAdam's rows
    capsys.readouterr()
    resumed = lazy_argv(synthetic_data, tmp_path / "dense")[:-1]
    assert cli.main([*resumed, "--epochs", "2", "--resume"]) != 0
    assert "train_config.lazy_item_updates: False -> True" in capsys.readouterr().err


def test_a_sampled_state_from_before_lazy_updates_existed_resumes_as_the_dense_run_it_was(
    synthetic_data, tmp_path, capsys
) -> None:
    """A sampled run stopped by a version without ``lazy_item_updates`` trained densely: its
    state (no such key) resumes with ``--no-lazy-item-updates`` and is refused, by name,
    under the new lazy default."""
    dense = [*lazy_argv(synthetic_data, tmp_path)[:-1], "--no-lazy-item-updates"]
    assert cli.main([*dense, "--epochs", "1"]) == 0
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    del state["fingerprint"]["train_config"]["lazy_item_updates"]
    torch.save(state, tmp_path / "last.pt")
    capsys.readouterr()
    assert cli.main([*lazy_argv(synthetic_data, tmp_path)[:-1], "--epochs", "2", "--resume"]) != 0
    assert "train_config.lazy_item_updates: False -> True" in capsys.readouterr().err
    assert cli.main([*dense, "--epochs", "2", "--resume"]) == 0
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["epochs_run"] == 2 and record["resumed_at"] == [1]
    assert record["train_config"]["lazy_item_updates"] is False
