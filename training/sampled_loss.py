"""Sampled softmax for large catalogues: both losses over a sampled candidate set.

The exact objective (``training/losses.py``) costs O(rows x N x d) a batch: every
real position and every TED occurrence is scored against all N items. Here
each batch draws one shared candidate set instead and scores every row
against it, O(rows x C x d) with C = K (+ P in-batch) candidates.

Both losses have the form ``log Z_r - linear_r``, where Z_r = sum_j exp(logit_rj)
is the N-way partition function and ``linear_r`` the target's logit (the
recommendation loss) or the teacher-weighted logit sum (TED). Only log Z_r is
approximated; the linear terms stay exact (TED's through the sparse teacher).
For a row with positive y, Z_r = exp(logit_ry) + sum_{j != y} exp(logit_rj); the
first term is kept exactly and the sum is estimated by importance sampling
over the candidates c_1..c_C:

    Z_hat_r = exp(logit_ry) + sum_k [c_k != y] exp(logit_rc_k - log m(c_k))

where m(j) is the expected number of times item j appears among the candidates
(the logQ correction; m = K q(j) for K draws from q). E[Z_hat_r] = Z_r exactly, so
log Z_hat_r is a consistent estimate of log Z_r whose downward (Jensen) bias
shrinks like Var(Z_hat)/Z^2 as K grows. ``[c_k != y]`` removes accidental hits:
a candidate equal to the row's positive is masked (its term is already in the
first, exact one). With every item a candidate once and m = 1, Z_hat_r = Z_r: the
sampled loss is then the exact one (a test checks this).

Candidates (:class:`NegativeSampler`):

- K negatives per batch, shared by every row, drawn with replacement from
  q(j) proportional to (count_j + 1)^0.75, count_j the item's training
  popularity: the word2vec unigram^0.75, which samples popular items (the hard,
  high-logit negatives whose terms dominate Z) more than uniform sampling would,
  but less than plain popularity, so the tail is still visited; the + 1 gives
  every item q > 0, which unbiasedness needs (an item that can never be drawn is
  never pushed down).
- Optionally (``in_batch``) the batch's P target items as P more candidates,
  drawn in effect from the plain popularity p(j) = count_j / sum count. The two
  sets are combined with the balance heuristic of multiple importance sampling:
  every candidate, whichever set it came from, is corrected by
  m(j) = K q(j) + P p(j), which keeps E[Z_hat] = Z (up to the in-batch targets not
  being independent draws: they come from a few users' sequences).

TED's row for an occurrence of item i uses the same candidates with query
student_i / tau and, as its exactly-kept positive, the item that followed i in
that sequence (a transition the teacher always weighs, since the graph is built
from these training sequences; i itself where nothing follows: the estimate is
unbiased whichever item is kept exactly). So the sampled TED loss is

    L_kd_hat = mean_i [log Z_hat_i - sum_j t_i[j] . student_i . E_j / tau]

the exact cross-entropy(t_i, s_i) of spec section 6 with the student's N-way
log-partition log sum_j exp(student_i . E_j / tau) replaced by its estimate
above, at the same temperature tau; the teacher t_i is not truncated to the
candidates. Its term, student_i . sum_j t_i[j] E_j / tau, is linear in the teacher's
mean of the table, which is summed exactly over rows of at most ``ted_samples``
transitions and estimated from that many draws on longer ones (unbiased:
``TEDTeacher.expected_rows``), so a popular item's thousands of transitions cost
no more than a rare one's. The mean's uniform share, shared_i * sum_j E_j, reads
every row; with ``LossSettings.total_samples`` S the sum is estimated as N / S times
the sum of S uniformly drawn rows (unbiased), so that no term of the loss gives the
table a dense gradient (``training.item_updates``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mqsa.errors import ConfigError
from mqsa.models.mqsa import MQSA
from mqsa.training.losses import LossSettings, LossValues, TEDTeacher, l2_penalty

SAMPLER_POWER = 0.75  # q(j) proportional to (count_j + 1)^0.75


@dataclass
class Candidates:
    """One batch's candidate items and the log of each one's expected count in the draw.

    Attributes:
        items: (C,) item indices (repeats allowed: each occurrence is a term).
        log_expected: (C,) log m(items[k]), the logQ correction of each candidate.
    """

    items: torch.Tensor
    log_expected: torch.Tensor


@dataclass
class NegativeSampler:
    """Draws a batch's candidates: K shared negatives, plus the batch's targets if ``in_batch``.

    Attributes:
        negatives: K, negatives drawn per batch.
        in_batch: also use the batch's target items as candidates.
        log_q: (N,) log q(j) of the sampled negatives' distribution.
        log_p: (N,) log p(j), plain popularity, the in-batch targets' distribution
            (-inf for items never seen in training).
        cumulative_q: (N,) float64 running sum of q, derived: a draw is a binary search of
            a uniform number in it, O(K log N), where ``torch.multinomial`` over q (and
            exponentiating log q) made two passes over N every step, 4.5 ms at 10^6 items.
    """

    negatives: int
    in_batch: bool
    log_q: torch.Tensor
    log_p: torch.Tensor
    cumulative_q: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.cumulative_q = torch.cumsum(self.log_q.double().exp(), 0)  # (N,)

    @classmethod
    def from_counts(
        cls, counts: Sequence[int] | torch.Tensor, negatives: int, in_batch: bool = False
    ) -> NegativeSampler:
        """From the items' training popularity (``TrainingData.item_counts``)."""
        if negatives < 1:
            raise ConfigError(f"negatives must be >= 1, got {negatives}")
        counts = torch.as_tensor(counts, dtype=torch.float64)  # (N,)
        if counts.ndim != 1 or counts.numel() == 0 or bool((counts < 0).any()):
            raise ConfigError("item counts must be a non-empty vector of counts >= 0")
        weights = (counts + 1.0) ** SAMPLER_POWER
        log_q = (weights / weights.sum()).log()
        log_p = (counts / counts.sum().clamp_min(1.0)).log()
        return cls(negatives, in_batch, log_q.float(), log_p.float())

    def to(self, device: torch.device | str) -> NegativeSampler:
        return NegativeSampler(self.negatives, self.in_batch, self.log_q.to(device), self.log_p.to(device))

    def draw(self, targets: torch.Tensor) -> Candidates:
        """This batch's candidates; ``targets`` (P,) are the batch's target items.

        The K negatives come from torch's global generator (seeded by the trainer,
        saved and restored with a run's state).
        """
        cumulative = self.cumulative_q
        uniform = torch.rand(self.negatives, dtype=cumulative.dtype, device=cumulative.device)  # (K,)
        drawn = torch.searchsorted(
            cumulative, uniform * cumulative[-1], side="right"
        )  # (K,) with replacement
        drawn = drawn.clamp_max(len(cumulative) - 1)  # u * total rounding up to the total itself
        items = torch.cat([drawn, targets]) if self.in_batch else drawn  # (C,)
        expected = self.negatives * self.log_q[items].exp()  # (C,) K q(j)
        if self.in_batch:
            expected = expected + targets.numel() * self.log_p[items].exp()  # + P p(j)
        return Candidates(items, expected.log())


def accidental_hits(positives: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a candidate is its row's positive: (H,) rows and (H,) columns of the (R, C) logits.

    Args:
        positives: (R,) each row's positive item.
        items: (C,) the candidates (repeats allowed).

    Found by a binary search of each positive among the sorted candidates, O(R log C),
    instead of an (R, C) comparison: hits are rare (a handful per batch at 10^5 items and
    up), and the comparison and its mask were a sixth of a sampled step at 10^6 items.
    """
    sorted_items, order = items.sort()  # (C,) each
    low = torch.searchsorted(sorted_items, positives, side="left")  # (R,)
    counts = torch.searchsorted(sorted_items, positives, side="right") - low  # (R,) hits per row
    rows = torch.repeat_interleave(torch.arange(len(positives), device=positives.device), counts)  # (H,)
    first = torch.repeat_interleave(low - (torch.cumsum(counts, 0) - counts), counts)  # (H,)
    return rows, order[first + torch.arange(len(rows), device=positives.device)]


class _SampledLogPartition(torch.autograd.Function):
    """(R,) log sum_k exp(q_r . c_k - log m(c_k)) over the candidates, the hits left out.

    Written out rather than composed (mm, subtract, mask, logsumexp and their backward
    passes) because on a CPU the (R, C) matrix, not the product, is the cost: this makes
    about 4 passes over it forward and 1 backward instead of about 14 (it keeps the
    exponentials for the backward pass instead of the logits). Forward and backward
    products in ``dtype``; the log-sum-exp in float32 (float64 for float64 queries).

    Args of ``apply``: queries (R, D); cand (C, D), the candidates' rows; log_expected
    (C,) log m(c_k); hit_rows and hit_cols (H,) from :func:`accidental_hits`; dtype of
    the products. Returns (R,), -inf for a row whose every candidate is its positive.
    """

    @staticmethod
    def forward(
        ctx: Any,
        queries: torch.Tensor,
        cand: torch.Tensor,
        log_expected: torch.Tensor,
        hit_rows: torch.Tensor,
        hit_cols: torch.Tensor,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        wide = torch.promote_types(queries.dtype, torch.float32)  # float32 after a bf16 product
        logits = (queries.to(dtype) @ cand.to(dtype).T).to(wide).sub_(log_expected)  # (R, C)
        logits[hit_rows, hit_cols] = -math.inf
        top = logits.amax(1, keepdim=True)  # (R, 1)
        top = torch.where(torch.isfinite(top), top, 0.0)  # a row whose every candidate is a hit
        weights = logits.sub_(top).exp_()  # (R, C) exp(logit - top), 0 at the hits
        total = weights.sum(1, keepdim=True)  # (R, 1)
        ctx.save_for_backward(queries, cand, weights, total)
        ctx.dtype = dtype
        return (total.log() + top).squeeze(1)  # -inf where every candidate is a hit

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        queries, cand, weights, total = ctx.saved_tensors
        # d lse_r / d logit_rk = softmax_rk. A row's top candidate adds exp(0) = 1 to its total,
        # so the clamp changes nothing but an all-hits row's 0 / 0, which it makes 0.
        scaled = (weights * (grad[:, None] / total.clamp_min(1.0))).to(ctx.dtype)
        grad_queries = (scaled @ cand.to(ctx.dtype)).to(queries.dtype) if ctx.needs_input_grad[0] else None
        grad_cand = (scaled.T @ queries.to(ctx.dtype)).to(cand.dtype) if ctx.needs_input_grad[1] else None
        return grad_queries, grad_cand, None, None, None, None


def sampled_logsumexp(
    queries: torch.Tensor,
    table: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
    positives: torch.Tensor,
    candidates: Candidates,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log Z_hat for each row (see the module docstring) and each row's positive logit.

    Args:
        queries: (R, D) the rows' query vectors.
        table: (N, D) the item embeddings, or a function from item indices to their rows
            (``model.item_rows``: only the rows read get a gradient).
        positives: (R,) each row's positive item, kept exactly.
        candidates: the batch's C candidates with their logQ correction.
        dtype: dtype of the (R, C) product (float32 or bfloat16); the
            log-sum-exp stays float32.

    Returns:
        (R,) log Z_hat and (R,) positive logits, both differentiable.
    """
    rows = table.__getitem__ if isinstance(table, torch.Tensor) else table
    positive_logits = (queries * rows(positives)).sum(-1)  # (R,)
    cand = rows(candidates.items)  # (C, D)
    hit_rows, hit_cols = accidental_hits(positives, candidates.items)  # (H,) each
    log_z = _SampledLogPartition.apply(queries, cand, candidates.log_expected, hit_rows, hit_cols, dtype)
    return torch.logaddexp(positive_logits, log_z), positive_logits


def item_total(model: MQSA, samples: int, device: torch.device) -> torch.Tensor:
    """(D,) sum_j E_j over the real items: exact (``samples`` 0, a dense gradient), or
    N / S times the sum of S rows drawn uniformly with replacement (unbiased; only those S
    rows get a gradient, each N / S times the share it stands for). Draws use torch's
    global generator.

    Args:
        model: the network (its item rows, through ``item_rows``).
        samples: S, rows drawn; 0 sums every row.
        device: where to draw.
    """
    if not samples:
        return model.item_total()
    num_items = model.config.num_items
    drawn = torch.randint(num_items, (samples,), device=device)  # (S,)
    return model.item_rows(drawn).sum(0) * (num_items / samples)


def sampled_mqsa_loss(
    model: MQSA,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    teacher: TEDTeacher | None,
    settings: LossSettings,
    sampler: NegativeSampler,
    candidates: Candidates | None = None,
    l2_value: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LossValues]:
    """L = L_rec_hat + lambda_kd * L_kd_hat + l2 * sum ||w||^2 / 2, as ``mqsa_loss`` returns it
    (with ``settings.l2_in_optimizer`` the penalty is in L's value but not in its graph: the
    optimizer adds its gradient l2 * w, as Adam's ``weight_decay`` does).

    Args:
        model: the network (the same three methods ``mqsa_loss`` uses).
        inputs: (B, T') left-padded input items (train[:-1]).
        targets: (B, T') next items aligned with ``inputs``, padding where none.
        teacher: the sparse TED teacher; None (or lambda_kd 0) turns TED off.
        settings: the objective's weights (``chunk`` is unused here).
        sampler: draws the batch's candidates.
        candidates: use these instead of drawing (tests).
        l2_value: with ``settings.l2_in_optimizer``, the penalty's value as the caller
            last measured it (``Objective``: every L2_VALUE_EVERY steps); None: measured here.

    Returns:
        The differentiable total loss and its parts as floats (``rec`` and ``kd``
        are the sampled estimates, not the exact losses).
    """
    ted = teacher is not None and settings.lambda_kd > 0
    # Every item row is read through item_rows (with sparse item gradients on: the rows
    # used), so only two terms give the table a dense (N, D) gradient: the L2 penalty
    # (unless the optimizer adds it: settings.l2_in_optimizer) and TED's teacher means
    # (their uniform share, sum_j E_j, unless estimated: settings.total_samples). They are
    # made first, so autograd runs their backward last, after the sparse row gradients
    # were summed among themselves: the table's gradient is then made dense once (a dense
    # one first would be copied at every sparse one that follows: 0.5 s a step at 300,000
    # items).
    penalty = l2_value if settings.l2_in_optimizer and l2_value is not None else l2_penalty(model, settings)
    if ted:  # TED's teacher means come first too: their gradient may be dense (the full product)
        pad = model.config.padding_idx
        real = inputs != pad  # (B, T')
        items, followers = inputs[real], targets[real]  # (K,) occurrences and the item after each
        followers = torch.where(followers == pad, items, followers)  # none after: any item will do
        total = item_total(model, settings.total_samples, inputs.device)  # (D,)
        expected = teacher.expected_rows(items, model, total, settings.ted_samples)  # (K, D)
    z, target_items = model.real_position_queries(inputs, targets)  # (P, D), (P,)
    if candidates is None:
        candidates = sampler.draw(target_items)
    rows = model.item_rows
    lse, rec_linear = sampled_logsumexp(z, rows, target_items, candidates, settings.dtype)  # (P,) each
    rec = (lse - rec_linear).mean()
    loss = rec if penalty is None else rec + penalty  # a constant when the optimizer adds its gradient
    kd = None
    if ted:
        student = model.student_vectors(items) / settings.tau  # (K, D)
        kd_lse, _ = sampled_logsumexp(student, rows, followers, candidates, settings.dtype)  # (K,)
        kd = (kd_lse - (student * expected).sum(-1)).mean()  # ted_linear_term's linear part
        loss = loss + settings.lambda_kd * kd
    return loss, LossValues.of(loss, rec, kd, penalty)
