from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mqsa.models.mqsa import MQSA, MQSAConfig
from mqsa.training.losses import LossSettings, TEDTeacher, linear_logsumexp, mqsa_loss, ted_linear_term
from mqsa.training.sequences import left_pad
from mqsa.training.transitions import TransitionGraph

N = 11  # items; item N - 1 never has a successor


def settings(lambda_kd: float = 0.1, tau: float = 0.1, l2: float = 1e-4, chunk: int = 256) -> LossSettings:
    """The objective's settings; the paper's weights unless a test says otherwise."""
    return LossSettings(lambda_kd=lambda_kd, tau=tau, l2=l2, chunk=chunk, dtype=torch.float32)


def dense_counts(graph: TransitionGraph) -> torch.Tensor:
    """(N, N) float32 transition counts: the graph written out, for the dense references."""
    out = torch.zeros(graph.num_items, graph.num_items)
    rows = np.repeat(np.arange(graph.num_items), graph.row_lengths())
    out[torch.from_numpy(rows), torch.from_numpy(graph.indices)] = torch.from_numpy(graph.counts)
    return out


def ted_loss_dense(
    student: torch.Tensor, items: torch.Tensor, table: torch.Tensor, counts: torch.Tensor, tau: float
) -> torch.Tensor:
    """The TED loss as spec section 6 writes it, with a dense (N x N) teacher: the reference.

    Args:
        student: (K, D); items: (K,); table: (N, D); counts: (N, N) transition counts.

    Returns:
        Scalar mean cross-entropy(teacher_i, student_i) over the K occurrences.
    """
    row_max = counts.amax(dim=1, keepdim=True)
    a_bar = torch.where(row_max > 0, counts / row_max.clamp_min(1e-12), torch.zeros_like(counts))
    teacher = torch.softmax(a_bar / tau, dim=1)[items]  # (K, N)
    log_student = torch.log_softmax(student @ table.T / tau, dim=1)  # (K, N)
    return -(teacher * log_student).sum(1).mean()


def random_graph(time_span: int, seed: int = 0) -> tuple[TransitionGraph, list[np.ndarray]]:
    """Random sequences over items 0..N-2, with item N-1 only ever last (no outgoing transitions)."""
    rng = np.random.default_rng(seed)
    sequences = [rng.integers(0, N - 1, size=rng.integers(2, 8)) for _ in range(12)]
    sequences[0] = np.append(sequences[0], N - 1)
    graph = TransitionGraph.from_sequences(sequences, N, time_span)
    assert graph.row(N - 1)[0].size == 0
    followed = {int(s[k]) for s in sequences for k in range(len(s) - 1)}  # items some item follows
    assert set(np.flatnonzero(graph.row_lengths()).tolist()) == followed and graph.nnz > N
    return graph, sequences


def double(teacher: TEDTeacher) -> TEDTeacher:
    return teacher.to(dtype=torch.float64)


# ---------------------------------------------------------------- TED teacher and sparse loss


@pytest.mark.parametrize("tau", [0.1, 0.05])
@pytest.mark.parametrize("time_span", [1, 2])
def test_teacher_rows_equal_dense_softmax(time_span: int, tau: float) -> None:
    graph, _ = random_graph(time_span)
    teacher = TEDTeacher.from_graph(graph, tau)
    dense = teacher.delta.to_dense().double() + teacher.shared.double()[:, None]  # (N, N)
    counts = dense_counts(graph).double()
    row_max = counts.amax(1, keepdim=True)
    a_bar = torch.where(row_max > 0, counts / row_max.clamp_min(1), 0.0)
    torch.testing.assert_close(dense, torch.softmax(a_bar / tau, 1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dense.sum(1), torch.ones(N, dtype=torch.float64), atol=1e-6, rtol=0)
    assert teacher.shared[N - 1].item() == pytest.approx(1 / N)
    assert teacher.delta._nnz() == graph.nnz


@pytest.mark.parametrize("time_span", [1, 2])
def test_teacher_transpose_is_the_transpose(time_span: int) -> None:
    """The backward pass multiplies by delta_t: it must be delta transposed, entry for entry."""
    graph, _ = random_graph(time_span, seed=time_span)
    teacher = TEDTeacher.from_graph(graph, 0.1)
    assert teacher.delta.layout == teacher.delta_t.layout == torch.sparse_csr
    torch.testing.assert_close(teacher.delta_t.to_dense(), teacher.delta.to_dense().T, atol=0, rtol=0)
    assert teacher.delta_t._nnz() == graph.nnz


def test_teacher_rejects_bad_tau() -> None:
    graph, _ = random_graph(1)
    with pytest.raises(ValueError, match="tau"):
        TEDTeacher.from_graph(graph, 0.0)


@pytest.mark.parametrize("tau", [0.1, 0.05])
@pytest.mark.parametrize("time_span", [1, 2])
def test_sparse_ted_equals_dense_reference(time_span: int, tau: float) -> None:
    graph, _ = random_graph(time_span, seed=time_span)
    teacher = double(TEDTeacher.from_graph(graph, tau))
    counts = dense_counts(graph).double()
    gen = torch.Generator().manual_seed(3)
    items = torch.cat([torch.randint(0, N, (25,), generator=gen), torch.tensor([N - 1, N - 1])])

    def loss_and_grad(sparse: bool) -> tuple[float, torch.Tensor]:
        table = 0.3 * torch.randn(N, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        table.requires_grad_(True)
        student = table[items] * math.sqrt(6)  # depends on the table, as in training
        if sparse:
            logits = student @ table.T / tau
            loss = (torch.logsumexp(logits, 1) - ted_linear_term(student, items, table, teacher, tau)).mean()
        else:
            loss = ted_loss_dense(student, items, table, counts, tau)
        loss.backward()
        return loss.item(), table.grad

    sparse, g_sparse = loss_and_grad(sparse=True)
    dense, g_dense = loss_and_grad(sparse=False)
    assert sparse == pytest.approx(dense, abs=1e-5)
    torch.testing.assert_close(g_sparse, g_dense, atol=1e-5, rtol=1e-5)
    assert g_dense.abs().max() > 1e-2  # the gradient comparison is not between zeros
    assert dense > 0.1


def test_ted_linear_term_for_item_without_transitions_is_mean_logit() -> None:
    """A row with no transitions has the uniform teacher: the linear term is the mean logit."""
    graph, _ = random_graph(1)
    teacher = TEDTeacher.from_graph(graph, 0.1)
    torch.manual_seed(0)
    table, student = torch.randn(N, 4), torch.randn(1, 4)
    term = ted_linear_term(student, torch.tensor([N - 1]), table, teacher, 0.1)
    assert term.item() == pytest.approx((student @ table.T / 0.1).mean().item(), rel=1e-5)


# ---------------------------------------------------------------- fused log-sum-exp


def lse_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(7, 5, generator=g)
    table = torch.randn(9, 5, generator=g)
    w = torch.rand(7, generator=g) + 0.1
    return q, table, w


@pytest.mark.parametrize("chunk", [1, 3, 7, 10])
def test_linear_logsumexp_matches_autograd(chunk: int) -> None:
    q, table, w = lse_inputs()
    q1, t1 = q.clone().requires_grad_(True), table.clone().requires_grad_(True)
    value, lse = linear_logsumexp(q1, t1, w, chunk=chunk)
    (3.0 * value).backward()  # a non-unit upstream gradient
    q2, t2 = q.clone().requires_grad_(True), table.clone().requires_grad_(True)
    ref = (w * torch.logsumexp(q2 @ t2.T, 1)).sum()
    (3.0 * ref).backward()
    assert value.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(lse, torch.logsumexp(q @ table.T, 1))
    assert not lse.requires_grad
    torch.testing.assert_close(q1.grad, q2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t1.grad, t2.grad, atol=1e-5, rtol=1e-5)


def test_linear_logsumexp_large_logits_are_stable() -> None:
    q, table, w = lse_inputs(1)
    value, lse = linear_logsumexp(50 * q, table, w, chunk=4)
    torch.testing.assert_close(lse, torch.logsumexp(50 * q @ table.T, 1))
    assert math.isfinite(value.item())


def test_linear_logsumexp_without_grad() -> None:
    q, table, w = lse_inputs(2)
    with torch.no_grad():
        value, lse = linear_logsumexp(q, table, w, chunk=2)
    assert value.item() == pytest.approx((w * torch.logsumexp(q @ table.T, 1)).sum().item(), rel=1e-6)
    torch.testing.assert_close(lse, torch.logsumexp(q @ table.T, 1))


def test_linear_logsumexp_bf16_is_close() -> None:
    q, table, w = lse_inputs(3)
    q1, t1 = q.clone().requires_grad_(True), table.clone().requires_grad_(True)
    value, lse = linear_logsumexp(q1, t1, w, chunk=3, dtype=torch.bfloat16)
    value.backward()
    q2, t2 = q.clone().requires_grad_(True), table.clone().requires_grad_(True)
    (w * torch.logsumexp(q2 @ t2.T, 1)).sum().backward()
    assert value.dtype == torch.float32 and q1.grad.dtype == torch.float32
    ref_lse = torch.logsumexp(q @ table.T, 1)
    torch.testing.assert_close(lse, ref_lse, atol=0.1, rtol=0.02)
    torch.testing.assert_close(q1.grad, q2.grad, atol=0.05, rtol=0.05)
    torch.testing.assert_close(t1.grad, t2.grad, atol=0.05, rtol=0.05)


# ---------------------------------------------------------------- the full objective


def batch_from(sequences: list[np.ndarray], width: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training examples: input = seq[:-1], targets = seq[1:], left-padded to ``width``."""
    inputs = torch.from_numpy(left_pad([s[:-1] for s in sequences], width, pad))
    targets = torch.from_numpy(left_pad([s[1:] for s in sequences], width, pad))
    return inputs, targets


def tiny_model(**overrides) -> MQSA:
    torch.manual_seed(0)
    cfg = {"num_items": N, "max_len": 10, "hidden_size": 8, "num_heads": 2, "windows": (2,), "alpha": 0.4}
    cfg.update(overrides)
    model = MQSA(MQSAConfig(**cfg))
    with torch.no_grad():
        model.item_emb.weight[:N].normal_(0.0, 0.3)
    return model.eval()


def naive_rec(model: MQSA, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Logits at every slot, padding targets ignored by cross-entropy."""
    short, long = model(inputs)
    logits = model.blend(short, long) @ model.item_embeddings().T  # (B, T, N)
    pad = model.config.padding_idx
    return F.cross_entropy(logits.reshape(-1, N), targets.reshape(-1), ignore_index=pad)


def grads(model: MQSA, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=2e-5, rtol=1e-4, msg=name)


def test_mqsa_loss_without_ted_equals_naive_cross_entropy() -> None:
    _, sequences = random_graph(1)
    model = tiny_model()
    inputs, targets = batch_from(sequences, 10, N)
    loss, values = mqsa_loss(model, inputs, targets, None, settings(lambda_kd=0.0, l2=0.0, chunk=4))
    ref = naive_rec(model, inputs, targets)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5)
    assert values.rec == pytest.approx(ref.item(), abs=1e-5)
    assert values.total == pytest.approx(ref.item(), abs=1e-5)
    assert values.kd == 0.0 and values.l2 == 0.0
    assert_same_grads(grads(model, loss), grads(model, naive_rec(model, inputs, targets)))


@pytest.mark.parametrize("tau", [0.1, 0.05])
def test_mqsa_loss_with_ted_equals_naive_reference(tau: float) -> None:
    graph, sequences = random_graph(1)
    teacher = TEDTeacher.from_graph(graph, tau)
    counts = dense_counts(graph)
    model = tiny_model()
    inputs, targets = batch_from(sequences, 10, N)

    def reference() -> tuple[torch.Tensor, torch.Tensor]:
        items = inputs[inputs != N]
        student = model.item_emb(items) * math.sqrt(8)  # dropout is off: the model is in eval mode
        kd = ted_loss_dense(student, items, model.item_embeddings(), counts, tau)
        return naive_rec(model, inputs, targets), kd

    loss, values = mqsa_loss(model, inputs, targets, teacher, settings(tau=tau, l2=0.0, chunk=5))
    rec, kd = reference()
    assert loss.item() == pytest.approx(rec.item() + 0.1 * kd.item(), abs=1e-5)
    assert values.rec == pytest.approx(rec.item(), abs=1e-5)
    assert values.kd == pytest.approx(kd.item(), abs=1e-4)
    assert kd.item() > 0.1  # TED really contributes
    rec, kd = reference()
    assert_same_grads(grads(model, loss), grads(model, rec + 0.1 * kd))


def test_mqsa_loss_l2_penalty() -> None:
    _, sequences = random_graph(1)
    model = tiny_model()
    inputs, targets = batch_from(sequences, 10, N)
    base, _ = mqsa_loss(model, inputs, targets, None, settings(lambda_kd=0.0, l2=0.0))
    loss, values = mqsa_loss(model, inputs, targets, None, settings(lambda_kd=0.0, l2=1e-2))
    penalty = 0.5 * 1e-2 * sum(p.detach().pow(2).sum().item() for p in model.parameters())
    assert values.l2 == pytest.approx(penalty, rel=1e-5)
    assert loss.item() == pytest.approx(base.item() + penalty, rel=1e-5)


def test_padding_row_gets_no_gradient_from_the_loss() -> None:
    graph, sequences = random_graph(1)
    model = tiny_model(dropout=0.5).train()
    inputs, targets = batch_from(sequences, 10, N)
    loss, _ = mqsa_loss(model, inputs, targets, TEDTeacher.from_graph(graph, 0.1), settings())
    loss.backward()
    grad = model.item_emb.weight.grad
    assert grad[N].abs().max() == 0
    assert grad[:N].abs().max() > 0


def test_padding_contributes_nothing() -> None:
    graph, sequences = random_graph(1)
    teacher = TEDTeacher.from_graph(graph, 0.1)
    model = tiny_model()
    short = [s[-6:] for s in sequences]  # every row fits in width 6 with room to spare
    inputs, targets = batch_from(short, 6, N)

    def run(inp: torch.Tensor, tgt: torch.Tensor, lambda_kd: float) -> tuple[float, float, float]:
        loss, values = mqsa_loss(model, inp, tgt, teacher, settings(lambda_kd=lambda_kd, l2=0.0))
        return loss.item(), values.rec, values.kd

    ref = run(inputs, targets, 0.1)
    # Extra left padding (width 6 -> 10).
    wide_in, wide_tgt = batch_from(short, 10, N)
    assert run(wide_in, wide_tgt, 0.1) == pytest.approx(ref, abs=1e-5)
    # A user with no real position at all.
    none = torch.full((1, 6), N)
    assert run(torch.cat([inputs, none]), torch.cat([targets, none]), 0.1) == pytest.approx(ref, abs=1e-5)
    # Without TED: the real input at a slot whose target is padding (the last slot) does not matter.
    tgt = targets.clone()
    tgt[:, -1] = N
    ref_rec = run(inputs, tgt, 0.0)
    other = inputs.clone()
    other[:, -1] = (inputs[:, -1] + 1) % N
    assert run(other, tgt, 0.0) == pytest.approx(ref_rec, abs=1e-6)
    assert ref_rec[0] != pytest.approx(ref[1], abs=1e-3)  # dropping the last targets did change the loss
