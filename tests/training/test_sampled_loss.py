"""The sampled-softmax objective (training/sampled_loss.py) against the exact one."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mqsa import cli
from mqsa.errors import ConfigError
from mqsa.models.mqsa import MQSA, MQSAConfig
from mqsa.training.losses import LossSettings, TEDTeacher, l2_penalty, mqsa_loss
from mqsa.training.sampled_loss import (
    Candidates,
    NegativeSampler,
    _SampledLogPartition,
    accidental_hits,
    sampled_logsumexp,
    sampled_mqsa_loss,
)
from mqsa.training.sequences import left_pad
from mqsa.training.trainer import L2_VALUE_EVERY, Objective, TrainConfig
from mqsa.training.transitions import TransitionGraph

N = 11


def settings(lambda_kd: float = 0.1, tau: float = 0.1, l2: float = 1e-4) -> LossSettings:
    return LossSettings(lambda_kd=lambda_kd, tau=tau, l2=l2, chunk=256, dtype=torch.float32)


def tiny_setup() -> tuple[MQSA, torch.Tensor, torch.Tensor, TEDTeacher, list[int]]:
    """A tiny model in eval mode (no dropout), one batch, its TED teacher and item counts."""
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, N, size=rng.integers(2, 9)) for _ in range(12)]
    torch.manual_seed(0)
    model = MQSA(MQSAConfig(num_items=N, max_len=10, hidden_size=8, num_heads=2, windows=(2,), alpha=0.4))
    with torch.no_grad():
        model.item_emb.weight[:N].normal_(0.0, 0.3)
    pad = model.config.padding_idx
    inputs = torch.from_numpy(left_pad([s[:-1] for s in sequences], 10, pad))
    targets = torch.from_numpy(left_pad([s[1:] for s in sequences], 10, pad))
    teacher = TEDTeacher.from_graph(TransitionGraph.from_sequences(sequences, N, 1), 0.1)
    counts = np.bincount(np.concatenate(sequences), minlength=N).tolist()
    return model.eval(), inputs, targets, teacher, counts


def every_item_once() -> Candidates:
    """Each item a candidate exactly once (expected count 1, log 0): Z_hat is Z."""
    return Candidates(torch.arange(N), torch.zeros(N))


def loss_and_grad(fn) -> tuple[torch.Tensor, torch.Tensor, object]:
    model, inputs, targets, teacher, counts = tiny_setup()
    loss, values = fn(model, inputs, targets, teacher, counts)
    loss.backward()
    return loss.detach(), model.item_emb.weight.grad.clone(), values


@pytest.mark.parametrize("lambda_kd", [0.0, 0.1])
def test_every_item_once_without_correction_is_the_exact_loss(lambda_kd: float) -> None:
    s = settings(lambda_kd=lambda_kd)

    def exact(model, inputs, targets, teacher, counts):
        return mqsa_loss(model, inputs, targets, teacher, s)

    def sampled(model, inputs, targets, teacher, counts):
        sampler = NegativeSampler.from_counts(counts, negatives=N)
        return sampled_mqsa_loss(model, inputs, targets, teacher, s, sampler, candidates=every_item_once())

    loss_e, grad_e, values_e = loss_and_grad(exact)
    loss_s, grad_s, values_s = loss_and_grad(sampled)
    torch.testing.assert_close(loss_s, loss_e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_s, grad_e, atol=1e-5, rtol=1e-4)
    assert grad_e.abs().max() > 1e-3
    assert values_s.rec == pytest.approx(values_e.rec, abs=1e-5)
    assert values_s.kd == pytest.approx(values_e.kd, abs=1e-5)
    assert (values_s.kd > 0) == (lambda_kd > 0)


def test_many_uniform_negatives_approximate_the_exact_loss() -> None:
    """K >> N draws from a uniform Q: the estimate is within a percent of the exact loss."""
    s = settings()
    model, inputs, targets, teacher, _ = tiny_setup()
    exact, _ = mqsa_loss(model, inputs, targets, teacher, s)
    sampler = NegativeSampler.from_counts([5] * N, negatives=20_000)  # equal counts: Q uniform
    torch.manual_seed(1)
    with torch.no_grad():
        sampled, values = sampled_mqsa_loss(model, inputs, targets, teacher, s, sampler)
    assert sampled.item() == pytest.approx(exact.item(), rel=1e-2)
    assert math.isfinite(values.total) and values.kd > 0


def test_gradients_reach_every_part_of_the_network() -> None:
    model, inputs, targets, teacher, counts = tiny_setup()
    model.train()
    sampler = NegativeSampler.from_counts(counts, negatives=5, in_batch=True)
    loss, _ = sampled_mqsa_loss(model, inputs, targets, teacher, settings(l2=0.0), sampler)
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.item_emb.weight.grad[model.config.padding_idx].abs().sum() == 0  # padding never learns


def test_accidental_hits_are_masked() -> None:
    gen = torch.Generator().manual_seed(0)
    queries, table = torch.randn(3, 4, generator=gen), torch.randn(N, 4, generator=gen)
    positives = torch.tensor([2, 5, 7])
    candidates = Candidates(torch.tensor([2, 5, 2, 9]), torch.tensor([0.1, -0.2, 0.3, 0.0]))
    lse, pos = sampled_logsumexp(queries, table, positives, candidates)
    logits = queries @ table[candidates.items].T - candidates.log_expected  # (3, 4)
    for r, y in enumerate(positives.tolist()):
        keep = candidates.items != y
        want = torch.logsumexp(torch.cat([pos[r : r + 1], logits[r, keep]]), 0)
        torch.testing.assert_close(lse[r], want)
    # Every candidate is the positive: only the positive's own term is left.
    only_hits = Candidates(torch.tensor([5, 5]), torch.zeros(2))
    lse, pos = sampled_logsumexp(queries[1:2], table, positives[1:2], only_hits)
    torch.testing.assert_close(lse, pos)


def test_logq_correction_makes_the_partition_estimate_unbiased() -> None:
    """Monte Carlo: the mean of Z_hat over many draws from a skewed Q is Z; uncorrected it is not."""
    gen = torch.Generator().manual_seed(0)
    queries, table = torch.randn(4, 4, generator=gen), torch.randn(N, 4, generator=gen)
    positives = torch.tensor([0, 3, 6, 10])
    counts = [40] + [0] * (N - 1)  # item 0 is drawn ~ 60% of the time
    sampler = NegativeSampler.from_counts(counts, negatives=4)
    table[0] = -table[1:].mean(0)  # the popular item scores unlike the rest
    z = torch.logsumexp(queries @ table.T, 1).exp()  # (4,) exact
    torch.manual_seed(0)
    corrected, uniform = [], []
    for _ in range(3000):
        c = sampler.draw(positives)
        corrected.append(sampled_logsumexp(queries, table, positives, c)[0].exp())
        flat = Candidates(c.items, torch.full_like(c.log_expected, math.log(4 / N)))  # as if Q uniform
        uniform.append(sampled_logsumexp(queries, table, positives, flat)[0].exp())
    corrected, uniform = torch.stack(corrected), torch.stack(uniform)  # (draws, 4)
    error = (corrected.mean(0) - z).abs()
    assert (error < 4 * corrected.std(0) / math.sqrt(len(corrected))).all()  # within 4 standard errors
    assert (error / z).max() < 0.1
    assert ((uniform.mean(0) - z).abs() / z).max() > 0.2


def test_sampler_draws_k_shared_negatives_and_the_batch_targets() -> None:
    counts = [10, 0, 3, 1, 0, 0, 0, 0, 0, 0, 6]
    sampler = NegativeSampler.from_counts(counts, negatives=7, in_batch=True)
    q = (torch.tensor(counts, dtype=torch.float64) + 1) ** 0.75
    torch.testing.assert_close(sampler.log_q.exp(), (q / q.sum()).float())
    targets = torch.tensor([0, 0, 2, 10])
    c = sampler.draw(targets)
    assert c.items.shape == c.log_expected.shape == (7 + 4,)
    assert torch.equal(c.items[7:], targets)
    p = torch.tensor(counts, dtype=torch.float32) / sum(counts)
    want = (7 * sampler.log_q.exp()[c.items] + 4 * p[c.items]).log()
    torch.testing.assert_close(c.log_expected, want)
    assert NegativeSampler.from_counts(counts, negatives=7).draw(targets).items.shape == (7,)


def test_negatives_are_drawn_with_each_items_probability_q() -> None:
    """200,000 draws: every item's frequency within 5 standard errors of q(j), the first
    and the last item (the binary search's ends) included."""
    counts = [10, 0, 3, 1, 0, 0, 0, 0, 0, 0, 6]
    sampler = NegativeSampler.from_counts(counts, negatives=200_000)
    torch.manual_seed(0)
    drawn = sampler.draw(torch.tensor([], dtype=torch.long)).items
    q = sampler.log_q.double().exp()
    seen = torch.bincount(drawn, minlength=len(counts)).double() / len(drawn)
    assert drawn.min() >= 0 and drawn.max() < len(counts)
    assert torch.all((seen - q).abs() < 5 * (q * (1 - q) / len(drawn)).sqrt())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss": "full"}, "loss must be auto, exact or sampled, got 'full'"),
        ({"negatives": 0}, "negatives must be >= 1, got 0"),
    ],
)
def test_bad_sampled_settings_are_config_errors_naming_the_field(kwargs, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**kwargs)


def test_sampler_refuses_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="negatives"):
        NegativeSampler.from_counts([1, 2], negatives=0)
    with pytest.raises(ConfigError, match="counts"):
        NegativeSampler.from_counts([1, -2], negatives=3)


@pytest.mark.parametrize("plain", [False, True], ids=["ted-and-l2", "no-ted-no-l2-all-sparse-gradients"])
def test_two_epochs_with_the_sampled_loss_from_the_command_line(
    synthetic_data, tmp_path, plain: bool
) -> None:
    out = tmp_path / "run"
    argv = ["train", "--data", str(synthetic_data), "--out", str(out), "--quiet", "--device", "cpu"]
    argv += ["--epochs", "2", "--batch-size", "128", "--seed", "7", "--max-len", "20", "--hidden-size", "32"]
    argv += ["--loss", "sampled", "--negatives", "64", "--in-batch-negatives"]
    argv += ["--lambda-kd", "0", "--l2", "0"] if plain else []
    assert cli.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_config"]["loss"] == "sampled" and metrics["train_config"]["negatives"] == 64
    assert metrics["objective"] == "sampled"
    assert metrics["epochs_run"] == 2
    values = list(metrics["valid"].values()) + list(metrics["test"].values())
    assert values and all(math.isfinite(v) for v in values)
    popular = metrics["baselines"]["Popularity"]["test"]
    assert metrics["test"]["NDCG@10"] > popular["NDCG@10"]  # it learned something


@pytest.mark.parametrize("share", [0, 10**6], ids=["gathered-rows", "full-product"])
def test_expected_rows_are_the_teachers_full_product_at_the_batchs_items(share: int, monkeypatch) -> None:
    """TED's teacher-weighted means for a batch's items only (repeats, an item without
    transitions) equal the full N-row product's rows, values and gradients, whether the
    batch's rows are gathered or the full product is taken."""
    monkeypatch.setattr("mqsa.training.losses.ROWS_SHARE", share)
    model, _, _, teacher, _ = tiny_setup()
    items = torch.tensor([3, 0, 3, N - 1, 7, 0])
    weights = torch.randn(len(items), model.config.hidden_size)
    full = teacher.expected_embeddings(model.item_embeddings())[items]
    (full * weights).sum().backward()
    expected_grad = model.item_emb.weight.grad.clone()
    model.zero_grad()
    model.use_sparse_item_gradients()
    rows = teacher.expected_rows(items, model)
    (rows * weights).sum().backward()
    assert torch.allclose(rows, full, atol=1e-6)
    assert torch.allclose(model.item_emb.weight.grad.to_dense(), expected_grad, atol=1e-6)


def long_row_teacher() -> tuple[MQSA, TEDTeacher]:
    """The tiny model with a teacher whose rows have 1 to 10 entries of unequal weight."""
    model, *_ = tiny_setup()
    rng = np.random.default_rng(1)
    rows = [np.sort(rng.choice(N, size=min(N - 1, 1 + i), replace=False)) for i in range(N - 1)] + [[]]
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    counts = rng.integers(1, 6, indptr[-1]).astype(np.float32)
    graph = TransitionGraph(N, indptr, np.concatenate(rows).astype(np.int64), counts)
    return model, TEDTeacher.from_graph(graph, 0.5)  # tau 0.5: mass spread over the row


def test_ted_samples_at_least_every_rows_length_is_exact() -> None:
    """Rows no longer than ted_samples are summed, not drawn: the same means, no randomness."""
    model, teacher = long_row_teacher()
    items = torch.tensor([9, 0, 9, N - 1, 4])
    exact = teacher.expected_embeddings(model.item_embeddings())[items]
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    assert torch.allclose(teacher.expected_rows(items, model, samples=10), exact, atol=1e-6)
    assert torch.equal(torch.rand(1), before)  # nothing was drawn


def test_ted_samples_draw_each_entry_by_its_teacher_weight_and_are_unbiased() -> None:
    """Long rows drawn with replacement: each entry at delta / row mass (and only its own
    row's), and the mean of many estimates converges to the exact teacher means."""
    model, teacher = long_row_teacher()
    torch.manual_seed(0)
    rows = torch.tensor([9, 5, 0])  # 10 and 6 entries (drawn), 1 entry (exact)
    segment, entries, weights = teacher._row_entries(rows, samples=3)
    assert segment.tolist().count(2) == 1 and len(entries) == 1 + 2 * 3
    crow, val = teacher.delta.crow_indices(), teacher.delta.values()
    for position, row in enumerate(rows.tolist()):  # every term inside its own row
        mine = entries[segment == position]
        assert bool(((mine >= crow[row]) & (mine < crow[row + 1])).all())
    repeats = 40_000  # row 9 (10 entries) 40,000 times, 5 draws each
    segment, entries, weights = teacher._row_entries(torch.full((repeats,), 9), samples=5)
    frequency = torch.bincount(entries - crow[9], minlength=10).double() / (5 * repeats)
    share = val[crow[9] : crow[10]].double() / val[crow[9] : crow[10]].sum()
    assert torch.allclose(frequency, share, atol=4e-3)  # binomial sd <= 0.0012
    mass = weights[segment == 0].sum().item()  # S draws of weight m_i / S: the row's mass
    assert mass == pytest.approx(val[crow[9] : crow[10]].sum().item(), rel=1e-5)
    items = torch.tensor([9, 5, 3, 0])
    exact = teacher.expected_embeddings(model.item_embeddings())[items].detach()
    with torch.no_grad():
        estimates = torch.stack([teacher.expected_rows(items, model, samples=2) for _ in range(4000)])
    error = (estimates.mean(0) - exact).abs()
    standard_error = estimates.std(0) / math.sqrt(len(estimates))
    assert bool((error <= 5 * standard_error + 1e-6).all())
    assert estimates.std(0).max() > 1e-3  # they are estimates: one draw differs from another


@pytest.mark.parametrize(("u", "entry"), [(0.0, 0), (1.0 - 2**-52, -1)], ids=["u=0", "u->1"])
def test_ted_draws_at_the_ends_of_the_unit_interval_stay_in_their_row(
    u: float, entry: int, monkeypatch
) -> None:
    """u = 0 draws the row's first entry (not the previous row's last, whose key is exactly i),
    u just below 1 its last."""
    _, teacher = long_row_teacher()
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.full(shape, u, dtype=kw["dtype"]))
    crow = teacher.delta.crow_indices()
    _, entries, _ = teacher._row_entries(torch.tensor([9]), samples=2)
    first, last = int(crow[9]), int(crow[10]) - 1
    assert entries.tolist() == [first if entry == 0 else last] * 2


def test_ted_samples_cut_the_rows_a_step_reads() -> None:
    """With ted_samples, a step reads at most S rows of the table per distinct long item."""
    _, teacher = long_row_teacher()
    items = torch.arange(N)
    _, exact_entries, _ = teacher._row_entries(items, samples=0)
    _, drawn_entries, _ = teacher._row_entries(items, samples=2)
    assert len(exact_entries) == sum(min(N - 1, 1 + i) for i in range(N - 1)) and len(drawn_entries) <= 2 * N


@pytest.mark.parametrize(("lambda_kd", "l2"), [(0.1, 1e-4), (0.0, 0.0)])
def test_sparse_item_gradients_change_nothing_but_the_cost(lambda_kd: float, l2: float) -> None:
    """The sampled loss with the table's gradient kept to the rows a batch uses: the same loss
    and, made dense, the same gradient as with dense lookups (and sparse when nothing dense
    is added: no L2, no TED)."""
    s = settings(lambda_kd=lambda_kd, l2=l2)
    candidates = Candidates(torch.tensor([1, 4, 4, 9, 2]), torch.log(torch.tensor([0.5, 1.5, 1.5, 0.7, 1.0])))
    results = []
    for sparse in (False, True):
        model, inputs, targets, teacher, counts = tiny_setup()
        model.use_sparse_item_gradients(sparse)
        sampler = NegativeSampler.from_counts(counts, 5)
        loss, _ = sampled_mqsa_loss(model, inputs, targets, teacher, s, sampler, candidates)
        loss.backward()
        grad = model.item_emb.weight.grad
        assert grad.is_sparse == (sparse and l2 == 0 and lambda_kd == 0)
        results.append((loss.detach(), grad.to_dense()))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)


def test_l2_left_to_the_optimizer_is_the_same_loss_and_the_same_gradient() -> None:
    """With the penalty's gradient left to the optimizer (the trainer's Adam weight_decay for
    the sampled loss), the value is unchanged and gradient + l2 * w is the in-graph gradient."""
    candidates = Candidates(torch.tensor([1, 4, 9, 2]), torch.zeros(4))
    out = []
    for in_optimizer in (False, True):
        s = LossSettings(
            lambda_kd=0.1, tau=0.1, l2=1e-2, chunk=256, dtype=torch.float32, l2_in_optimizer=in_optimizer
        )
        model, inputs, targets, teacher, counts = tiny_setup()
        loss, values = sampled_mqsa_loss(
            model, inputs, targets, teacher, s, NegativeSampler.from_counts(counts, 4), candidates
        )
        loss.backward()
        grad = model.item_emb.weight.grad + (1e-2 * model.item_emb.weight.detach() if in_optimizer else 0.0)
        out.append((loss.item(), values.l2, grad))
    assert out[0][0] == pytest.approx(out[1][0]) and out[0][1] == pytest.approx(out[1][1]) and out[0][1] > 0
    assert torch.allclose(out[0][2], out[1][2], atol=1e-6)
    config = TrainConfig(loss="sampled", l2=3e-4)
    assert (
        config.loss_settings().l2_in_optimizer
        and not TrainConfig(loss="exact").loss_settings().l2_in_optimizer
    )


def test_the_objective_measures_the_l2_value_every_few_steps_and_reuses_it_in_between() -> None:
    """The sampled loss's L2 value is for the log only (Adam adds the gradient): one pass over
    every parameter every L2_VALUE_EVERY steps, the last value reused in between."""
    s = LossSettings(lambda_kd=0.1, tau=0.1, l2=1e-2, chunk=256, dtype=torch.float32, l2_in_optimizer=True)
    model, inputs, targets, teacher, counts = tiny_setup()
    objective = Objective(model, teacher, s, NegativeSampler.from_counts(counts, 4))
    measured, actual = [], []
    for _ in range(L2_VALUE_EVERY + 1):
        actual.append(float(l2_penalty(model, s)))
        measured.append(objective(inputs, targets)[1].l2)
        with torch.no_grad():
            model.item_emb.weight.mul_(1.1)  # the weights move: a new measurement differs
    assert measured[:L2_VALUE_EVERY] == [pytest.approx(actual[0])] * L2_VALUE_EVERY  # reused in between
    assert measured[L2_VALUE_EVERY] == pytest.approx(actual[L2_VALUE_EVERY])  # measured again
    assert actual[L2_VALUE_EVERY] > 1.5 * actual[0]


def test_loss_auto_is_exact_up_to_the_threshold_and_sampled_above() -> None:
    from mqsa.training.trainer import SAMPLED_ABOVE

    auto = TrainConfig()
    assert auto.loss == "auto"
    assert auto.objective(12_101) == "exact" and auto.objective(SAMPLED_ABOVE) == "exact"
    assert auto.objective(SAMPLED_ABOVE + 1) == "sampled"
    assert auto.loss_settings(SAMPLED_ABOVE + 1).l2_in_optimizer
    assert TrainConfig(loss="exact").objective(10**7) == "exact"
    assert TrainConfig(loss="sampled").objective(10) == "sampled"


def test_accidental_hits_are_every_candidate_equal_to_its_rows_positive() -> None:
    items = torch.tensor([4, 1, 4, 7, 1, 4])
    positives = torch.tensor([4, 2, 1, 7, 4])
    rows, cols = accidental_hits(positives, items)
    found = sorted(zip(rows.tolist(), cols.tolist(), strict=True))
    want = sorted((r, c) for r in range(5) for c in range(6) if items[c] == positives[r])
    assert found == want and len(found) == 9


def test_the_written_out_log_partition_is_the_composed_one_values_and_gradients() -> None:
    """_SampledLogPartition against mm, logQ, mask and logsumexp composed by autograd: the
    same values and gradients (float64), with repeated candidates, hits, and a row whose
    every candidate is its positive (its term is -inf and passes no gradient, not NaN)."""
    gen = torch.Generator().manual_seed(0)
    queries = torch.randn(5, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    table = torch.randn(N, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    items = torch.tensor([2, 5, 2, 9, 0])
    log_expected = torch.randn(5, dtype=torch.float64, generator=gen)
    positives = torch.tensor([2, 5, 7, 0, 3])
    composed = (queries @ table[items].T - log_expected).masked_fill(
        items[None, :] == positives[:, None], -math.inf
    )
    want = torch.logsumexp(composed, 1)
    rows, cols = accidental_hits(positives, items)
    got = _SampledLogPartition.apply(queries, table[items], log_expected, rows, cols, torch.float64)
    torch.testing.assert_close(got, want)
    weights = torch.randn(5, dtype=torch.float64, generator=gen)
    grads = [torch.autograd.grad((out * weights).sum(), (queries, table)) for out in (got, want)]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
    only = torch.tensor([5, 5])
    row_q = queries[1:2].detach().requires_grad_()
    r, c = accidental_hits(positives[1:2], only)
    lse = _SampledLogPartition.apply(
        row_q, table[only], torch.zeros(2, dtype=torch.float64), r, c, torch.float64
    )
    (grad,) = torch.autograd.grad(torch.logaddexp(torch.zeros(1, dtype=torch.float64), lse).sum(), row_q)
    assert lse.item() == -math.inf and torch.all(grad == 0)


def test_the_written_out_log_partition_in_bf16_is_the_composed_bf16_one() -> None:
    """Products in bfloat16 (``--precision bf16``), log-sum-exp in float32: the composed
    code's values and gradients, to bfloat16's precision."""
    gen = torch.Generator().manual_seed(1)
    queries = torch.randn(64, 8, generator=gen, requires_grad=True)
    table = torch.randn(N, 8, generator=gen, requires_grad=True)
    items, positives = torch.randint(N, (40,), generator=gen), torch.randint(N, (64,), generator=gen)
    log_expected = torch.randn(40, generator=gen)
    bf16 = torch.bfloat16
    logits = (queries.to(bf16) @ table[items].to(bf16).T).float() - log_expected
    want = torch.logsumexp(logits.masked_fill(items[None, :] == positives[:, None], -math.inf), 1)
    rows, cols = accidental_hits(positives, items)
    got = _SampledLogPartition.apply(queries, table[items], log_expected, rows, cols, bf16)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)
    grads = [torch.autograd.grad(out.sum(), (queries, table)) for out in (got, want)]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_the_sampled_loss_with_an_estimated_total_gives_the_table_a_sparse_gradient() -> None:
    """With TED and the uniform share estimated, nothing reads the whole table (what
    ``--lazy-item-updates`` needs)."""
    model, inputs, targets, teacher, counts = tiny_setup()
    model.use_sparse_item_gradients()
    s = LossSettings(0.1, 0.1, 1e-4, 256, torch.float32, l2_in_optimizer=True, ted_samples=2, total_samples=5)
    loss, _ = sampled_mqsa_loss(
        model, inputs, targets, teacher, s, NegativeSampler.from_counts(counts, 4), l2_value=None
    )
    loss.backward()
    assert model.item_table().grad.is_sparse
