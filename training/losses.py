"""The training objective: recommendation cross-entropy and TED (spec sections 5-6).

Both losses need a log-sum-exp over all N items for many query vectors: the
model's blended vectors at real positions (recommendation) and the items'
own scaled embeddings (TED's student). They share one fused, chunked product
with the item table (:class:`LinearLogSumExp`) that never holds the whole
(rows x N) logit matrix and computes its gradients while the chunk is hot.

The TED teacher is kept sparse: a row's teacher distribution is fixed by its
non-zero transition counts plus one shared probability for every other item.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from mqsa.errors import ConfigError
from mqsa.models.mqsa import MQSA
from mqsa.training.transitions import TransitionGraph


class LinearLogSumExp(torch.autograd.Function):
    """sum_r w_r * logsumexp_j(q_r . E_j), with its gradients computed chunk by chunk.

    Forward computes the value and both gradients in one pass over row chunks:
    logits (c, N) -> softmax in place -> grad_q = S E and grad_E += S^T q.
    Backward only scales them by the upstream scalar gradient.
    """

    @staticmethod
    def forward(ctx, queries, table, weights, chunk, dtype):  # type: ignore[override]
        # queries (R, D), table (N, D), weights (R,) -> scalar, lse (R,)
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        R, device = queries.shape[0], queries.device
        lse = torch.empty(R, dtype=torch.float32, device=device)
        grad_q = torch.empty(queries.shape, dtype=torch.float32, device=device) if needs_grad else None
        grad_table = torch.zeros(table.shape, dtype=torch.float32, device=device) if needs_grad else None
        low = dtype != torch.float32  # bf16 products, fp32 softmax and accumulation
        q_all, t_low = queries.to(dtype), table.to(dtype)
        buf = torch.empty(min(chunk, R), table.shape[0], dtype=dtype, device=device)
        for start in range(0, R, chunk):
            q = q_all[start : start + chunk]  # (c, D)
            logits = buf[: q.shape[0]]  # (c, N)
            torch.mm(q, t_low.T, out=logits)
            probs = logits.float() if low else logits
            row_max = probs.amax(dim=1, keepdim=True)  # (c, 1)
            probs.sub_(row_max).exp_()
            row_sum = probs.sum(dim=1, keepdim=True)  # (c, 1)
            lse[start : start + chunk] = (row_max + row_sum.log()).squeeze(1)
            if needs_grad:
                probs.mul_(weights[start : start + chunk, None] / row_sum)  # weighted softmax
                p = probs.to(dtype) if low else probs
                if low:
                    grad_q[start : start + chunk] = (p @ t_low).float()
                    grad_table.add_((p.T @ q).float())
                else:
                    torch.mm(p, t_low, out=grad_q[start : start + chunk])
                    grad_table.addmm_(p.T, q)
        ctx.save_for_backward(grad_q, grad_table)
        ctx.mark_non_differentiable(lse)
        return (weights * lse).sum(), lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):  # type: ignore[override]
        grad_q, grad_table = ctx.saved_tensors
        return grad_q * grad_out, grad_table * grad_out, None, None, None


def linear_logsumexp(
    queries: torch.Tensor,
    table: torch.Tensor,
    weights: torch.Tensor,
    chunk: int = 256,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sum of row log-sum-exps of ``queries @ table.T``.

    Args:
        queries: (R, D).
        table: (N, D).
        weights: (R,) per-row weight of the sum (no gradient flows into it).
        chunk: rows per chunk of the (chunk, N) logit buffer.
        dtype: dtype of the products (float32, or bfloat16 where the hardware
            multiplies it fast); softmax and gradient sums stay float32.

    Returns:
        The scalar weighted sum (differentiable) and the (R,) log-sum-exps (not).
    """
    return LinearLogSumExp.apply(queries.float(), table.float(), weights.detach().float(), chunk, dtype)


class _SparseProduct(torch.autograd.Function):
    """``matrix @ dense``, differentiable in ``dense``, with the transpose given up front.

    ``torch.sparse.mm`` builds and sorts the transpose of a COO matrix in every
    backward pass (CUDA sort kernels, every step); the teacher is fixed, so its
    transpose is built once.
    """

    @staticmethod
    def forward(ctx, dense, matrix, matrix_t):  # type: ignore[override]
        # dense (N, D), matrix and matrix_t (N, N) sparse CSR -> (N, D)
        ctx.matrix_t = matrix_t
        return matrix @ dense

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return ctx.matrix_t @ grad.contiguous(), None, None


_CSR_BETA = "Sparse CSR tensor support is in beta"  # torch's warning on every CSR tensor made
# TEDTeacher.expected_rows gathers a batch's rows while they hold under 1/4 of the teacher's
# entries; past that the (E, D) gathered rows cost more than the whole sparse product.
# Measured on S2 (3.5M entries, a batch's rows 0.65M of them, one thread): 0.46 s gathered
# against 0.51 s for the product, forward and backward: about even near 1/4.
ROWS_SHARE = 4


def _csr(crow: np.ndarray, col: np.ndarray, values: np.ndarray, n: int) -> torch.Tensor:
    """An (n, n) CSR tensor; the invariants are checked once, here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_CSR_BETA)
        return torch.sparse_csr_tensor(
            torch.from_numpy(crow.astype(np.int64)),
            torch.from_numpy(col.astype(np.int64)),
            torch.from_numpy(values),
            (n, n),
            check_invariants=True,
        )


@dataclass
class TEDTeacher:
    """The sparse teacher of spec section 6.2, for every item.

    For item i with non-zero counts A[i, J]: a = A[i, J] / max A[i, :], the teacher
    is softmax(a / tau) over all N items, with logit 0 for every item outside J.
    Stored as ``shared[i]``, the teacher probability of any item outside J, and
    the sparse N x N matrix ``delta`` with delta[i, j] = t_i[j] - shared[i] on J.
    A row with no transitions has the uniform teacher (shared = 1/N).

    Attributes:
        delta: (N, N) sparse CSR float32, nnz = the graph's.
        delta_t: (N, N) sparse CSR, ``delta`` transposed (for the backward pass).
        shared: (N,) float32.
    """

    delta: torch.Tensor
    delta_t: torch.Tensor
    shared: torch.Tensor
    _keys: torch.Tensor | None = field(default=None, init=False, repr=False)  # _draw_keys, made once
    _mass: torch.Tensor | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_graph(cls, graph: TransitionGraph, tau: float) -> TEDTeacher:
        if tau <= 0:
            raise ConfigError(f"tau must be > 0, got {tau}")
        n = graph.num_items
        lengths = graph.row_lengths()
        rows = np.repeat(np.arange(n), lengths)
        row_max = np.zeros(n, dtype=np.float64)
        np.maximum.at(row_max, rows, graph.counts.astype(np.float64))
        a = graph.counts / row_max[rows]  # (nnz,) in (0, 1]
        # Stable softmax: subtract the row's largest logit, 1/tau where the row has entries.
        top = np.where(lengths > 0, 1.0 / tau, 0.0)  # (N,)
        nz = np.exp(a / tau - top[rows])  # (nnz,)
        zero = np.exp(-top)  # (N,) unnormalised probability of each zero entry
        norm = (n - lengths) * zero
        np.add.at(norm, rows, nz)
        shared = zero / norm
        delta = (nz / norm[rows] - shared[rows]).astype(np.float32)
        # The graph is row-major with sorted columns, so (rows, indices) is already CSR;
        # a stable sort by column gives the transpose's CSR, rows still sorted within.
        crow = np.concatenate([[0], np.cumsum(lengths)])
        by_col = np.argsort(graph.indices, kind="stable")
        crow_t = np.concatenate([[0], np.cumsum(np.bincount(graph.indices, minlength=n))])
        return cls(
            delta=_csr(crow, graph.indices, delta, n),
            delta_t=_csr(crow_t, rows[by_col], delta[by_col], n),
            shared=torch.from_numpy(shared.astype(np.float32)),
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TEDTeacher:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_CSR_BETA)
            parts = (self.delta, self.delta_t, self.shared)
            return TEDTeacher(*(t.to(device=device, dtype=dtype) for t in parts))

    def expected_embeddings(self, table: torch.Tensor, total: torch.Tensor | None = None) -> torch.Tensor:
        """(N, D) sum_j t_i[j] * table_j for every item i: the teacher-weighted item mean.

        Computed as shared_i * sum_j table_j + (delta @ table)_i: one sparse
        product, differentiable with respect to ``table``. ``total``: (D,) sum_j table_j,
        if the caller made it.
        """
        total = table.sum(0) if total is None else total
        return self.shared[:, None] * total + _SparseProduct.apply(table, self.delta, self.delta_t)

    def expected_rows(
        self, items: torch.Tensor, model: MQSA, total: torch.Tensor | None = None, samples: int = 0
    ) -> torch.Tensor:
        """(K,) item indices -> (K, D) their rows of :meth:`expected_embeddings`, at a cost that
        grows with those items' transitions rather than with the catalogue.

        shared_i * sum_j E_j + sum over row i of delta of delta[i, j] * E_j, the second
        gathered from the CSR rows of the batch's distinct items only; every table row is
        read through ``model.item_rows`` (a sparse gradient). ``total``: (D,) sum_j E_j, if
        the caller made it (its gradient is dense).

        ``samples`` 0: exact, equal to ``expected_embeddings(model.item_embeddings())[items]``
        up to float rounding; when the batch's rows hold more than 1/ROWS_SHARE of the
        teacher's entries (the long rows of popular items, in most batches of a Zipf log)
        the full sparse product is cheaper, and is used. ``samples`` S > 0: a row with more
        than S entries is estimated from S draws (:meth:`_row_entries`), unbiased, so the
        cost is at most S row reads per distinct item whatever the rows' lengths.
        """
        unique, inverse = torch.unique(items, return_inverse=True)  # (U,), (K,)
        if not samples:
            crow = self.delta.crow_indices()
            if int((crow[unique + 1] - crow[unique]).sum()) * ROWS_SHARE > self.delta.values().numel():
                return self.expected_embeddings(model.item_embeddings(), total)[items]  # cheaper
        segment, entries, weights = self._row_entries(unique, samples)  # (E,) each
        weighted = weights[:, None] * model.item_rows(self.delta.col_indices()[entries])  # (E, D)
        total = model.item_total() if total is None else total  # (D,)
        spread = torch.zeros(len(unique), total.shape[0], dtype=weighted.dtype, device=items.device)
        return (self.shared[unique, None] * total + spread.index_add(0, segment, weighted))[inverse]

    def _row_entries(
        self, rows: torch.Tensor, samples: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The terms of sum_j delta[i, j] * E_j for each row i of ``rows`` (U,): which of the
        U sums each term belongs to, its entry of ``delta`` and its weight, (E,) each.

        A row with at most ``samples`` entries (every row if 0) gives its entries, weighted
        by their delta. A longer row gives S = ``samples`` entries drawn with replacement
        with probability delta[i, j] / m_i, m_i = sum_j delta[i, j], each weighted m_i / S:
        an unbiased estimate of the row's sum (the teacher's mass sits on a row's strongest
        transitions, which the draws then hit most). Draws use torch's global generator.
        """
        crow, val = self.delta.crow_indices(), self.delta.values()
        starts, lengths = crow[rows], crow[rows + 1] - crow[rows]  # (U,) each
        exact = lengths if not samples else torch.where(lengths > samples, 0, lengths)  # (U,)
        segment = torch.repeat_interleave(torch.arange(len(rows), device=rows.device), exact)  # (E1,)
        first = torch.repeat_interleave(torch.cumsum(exact, 0) - exact, exact)  # (E1,)
        entries = starts[segment] + torch.arange(len(segment), device=rows.device) - first  # (E1,)
        long = (exact != lengths).nonzero().squeeze(1)  # (L,) positions in rows of the drawn ones
        if len(long) == 0:
            return segment, entries, val[entries]
        keys, mass = self._draw_keys()
        wanted = rows[long, None] + torch.rand(len(long), samples, dtype=keys.dtype, device=rows.device)
        # the first key above i + u: entry j where share_(j-1) <= u < share_j, never row i - 1's
        # last (key exactly i) when u is 0
        drawn = torch.searchsorted(keys, wanted.flatten(), side="right")  # (L * S,) entries of delta
        drawn = torch.minimum(drawn, (crow[rows[long] + 1] - 1).repeat_interleave(samples))  # rounding guard
        weights = (mass[rows[long]] / samples).repeat_interleave(samples).to(val.dtype)  # (L * S,)
        return (
            torch.cat([segment, long.repeat_interleave(samples)]),
            torch.cat([entries, drawn]),
            torch.cat([val[entries], weights]),
        )

    def _draw_keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(nnz,) float64 keys, row i's entries at i + (delta's cumulative share of its row),
        the last exactly i + 1, so ``searchsorted(keys, i + u, side="right")``, u uniform in
        [0, 1), draws an entry of row i with probability delta[i, j] / m_i; and (N,) the row
        masses m_i. Made once."""
        if self._keys is None:
            crow, val = self.delta.crow_indices(), self.delta.values().double()
            lengths = crow[1:] - crow[:-1]  # (N,)
            cumulative = torch.cat([val.new_zeros(1), val.cumsum(0)])  # (nnz + 1,)
            before, mass = cumulative[crow[:-1]], cumulative[crow[1:]] - cumulative[crow[:-1]]  # (N,)
            row = torch.repeat_interleave(torch.arange(len(lengths), device=val.device), lengths)  # (nnz,)
            share = (cumulative[1:] - before[row]) / mass[row]  # (nnz,) in (0, 1]
            share[crow[1:][lengths > 0] - 1] = 1.0  # a row's last key exactly i + 1: no draw past it
            self._keys, self._mass = row.double() + share, mass.float()
        return self._keys, self._mass


def ted_linear_term(
    student: torch.Tensor, items: torch.Tensor, table: torch.Tensor, teacher: TEDTeacher, tau: float
) -> torch.Tensor:
    """sum_j t_{items_k}[j] * logit_kj for each occurrence k, without a dense teacher.

    The TED cross-entropy of occurrence k is ``lse_k - this_k`` where
    logit_kj = student_k . table_j / tau; by linearity this is
    student_k . (teacher-weighted mean of the table rows) / tau.

    Args:
        student: (K, D) dropout(E_i * sqrt(d)) for each occurrence.
        items: (K,) the occurrence's item index.
        table: (N, D) the item embeddings.

    Returns:
        (K,) the teacher-weighted logit sums.
    """
    expected = teacher.expected_embeddings(table)  # (N, D)
    return (student * expected[items]).sum(-1) / tau


@dataclass(frozen=True)
class LossSettings:
    """The settings of the objective, one object (built by ``TrainConfig.loss_settings``).

    Attributes:
        lambda_kd: weight of the TED loss; 0 turns TED off.
        tau: TED temperature.
        l2: weight of the explicit penalty sum ||w||^2 / 2.
        chunk: rows per chunk of the fused softmax.
        dtype: dtype of the N-way products (float32, or bfloat16).
        l2_in_optimizer: the penalty's gradient, l2 * w, is the optimizer's to add (Adam's
            ``weight_decay``, the same gradient) rather than the graph's; the loss still
            reports the penalty's value (the sampled loss: one dense (N, D) term less in
            its backward pass).
        ted_samples: the sampled loss's TED: a teacher row with more entries than this is
            estimated from this many draws (``TEDTeacher.expected_rows``); 0: every entry.
        total_samples: the sampled loss's TED: the teacher's uniform share of the table,
            sum_j E_j, is estimated from this many uniformly drawn rows, unbiased, so only
            they get a gradient; 0: summed over every row (a dense gradient).
    """

    lambda_kd: float
    tau: float
    l2: float
    chunk: int
    dtype: torch.dtype
    l2_in_optimizer: bool = False
    ted_samples: int = 0
    total_samples: int = 0


@dataclass
class LossValues:
    """One batch's objective and its parts, for logging, left on the loss's device.

    Reading a part as a float (``.total`` ...) waits for the device; the trainer sums
    ``parts`` over an epoch instead and reads them once (on a GPU a read every step
    would stall the host at every step).

    Attributes:
        parts: (4,) float32, detached: total, rec, kd, l2.
    """

    parts: torch.Tensor

    @classmethod
    def of(
        cls, total: torch.Tensor, rec: torch.Tensor, kd: torch.Tensor | None, l2: torch.Tensor | None
    ) -> LossValues:
        """From the loss's 0-d tensors; None (TED or L2 off) is 0."""
        zero = total.new_zeros(())
        terms = [t.detach().float() if t is not None else zero for t in (total, rec, kd, l2)]
        return cls(torch.stack(terms))

    total = property(lambda self: float(self.parts[0]), doc="the total loss (waits for the device)")
    rec = property(lambda self: float(self.parts[1]), doc="the recommendation loss")
    kd = property(lambda self: float(self.parts[2]), doc="the TED loss (0 when off)")
    l2 = property(lambda self: float(self.parts[3]), doc="the L2 penalty (0 when off)")


def l2_penalty(model: MQSA, settings: LossSettings) -> torch.Tensor | None:
    """l2 * sum ||w||^2 / 2 over the trainable parameters (None when l2 is 0); with
    ``settings.l2_in_optimizer`` its value only, out of the graph, one read of each tensor
    (``pow(2)`` wrote an (N, D) temporary: 0.18 s a step at 10^6 items)."""
    if settings.l2 == 0:
        return None
    params = [p for p in model.parameters() if p.requires_grad]
    if settings.l2_in_optimizer:
        with torch.no_grad():
            return 0.5 * settings.l2 * sum(torch.dot(p.view(-1), p.view(-1)) for p in params)
    return 0.5 * settings.l2 * sum(p.pow(2).sum() for p in params)


def mqsa_loss(
    model: MQSA,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    teacher: TEDTeacher | None,
    settings: LossSettings,
) -> tuple[torch.Tensor, LossValues]:
    """L = L_rec + lambda_kd * L_kd + l2 * sum ||w||^2 / 2 for one batch (spec sections 5-6).

    Logits are computed only at real positions, from the blended vector (one
    N-way product), and the TED student rows join the same fused product.

    Args:
        model: the network; it gives the queries, the students and the item table.
        inputs: (B, T') left-padded input items (train[:-1]), untrimmed: the
            model trims each group of rows to its width.
        targets: (B, T') next items aligned with ``inputs``, padding where none.
        teacher: the sparse TED teacher; None (or lambda_kd 0) turns TED off.
        settings: the objective's weights and the fused product's chunk and dtype.

    Returns:
        The differentiable total loss and its parts as floats.
    """
    z, target_items = model.real_position_queries(inputs, targets)  # (P, D), (P,)
    table = model.item_embeddings()  # (N, D)
    P = z.shape[0]
    queries, weights = [z], [torch.full((P,), 1.0 / P, device=z.device)]
    use_kd = teacher is not None and settings.lambda_kd > 0
    if use_kd:
        items = inputs[inputs != model.config.padding_idx]  # (K,) every real item occurrence
        student = model.student_vectors(items)  # (K, D)
        K = items.shape[0]
        queries.append(student / settings.tau)
        weights.append(torch.full((K,), settings.lambda_kd / K, device=z.device))
    lse_sum, lse = linear_logsumexp(
        torch.cat(queries), table, torch.cat(weights), settings.chunk, settings.dtype
    )
    rec_linear = (z * table[target_items]).sum(-1)  # (P,) target logits
    loss = lse_sum - rec_linear.mean()
    rec_value = (lse[:P] - rec_linear.detach()).mean()
    kd_value = None
    if use_kd:
        kd_linear = ted_linear_term(student, items, table, teacher, settings.tau)  # (K,)
        loss = loss - settings.lambda_kd * kd_linear.mean()
        kd_value = (lse[P:] - kd_linear.detach()).mean()
    penalty = l2_penalty(model, settings)
    if penalty is not None:
        loss = loss + penalty
    return loss, LossValues.of(loss, rec_value, kd_value, penalty)
