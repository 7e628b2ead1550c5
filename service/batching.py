"""The encoder calls and searches of concurrent requests, done together (dynamic batching, no wait).

A request that reaches the model hands its history to :meth:`Batcher.run` and awaits.
The batcher does the work once the event loop has run every other task that is ready
now (``loop.call_soon``), so requests that arrive together (a gateway's connections
often tick in step) share one encoder call and one search, and a lone request waits
for nothing but its own turn. Triton's dynamic batching, without a batching delay.

In one batch: one ONNX call for all histories (left-padded to the longest); then one
FAISS search per group of queries under the same rules (the same global bitmap
object, or none: a catalogue change between two requests makes two groups),
``k = max(n + |excluded|)`` deep, each query's own exclusions taken
out after: at most |excluded| of its results can be excluded, so it keeps its n.
A query with its own filter gets its own search with its own selector.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mqsa.service.bundle import Bundle
from mqsa.service.metrics import Metrics
from mqsa.service.retrieval import blend, left_pad, search

MAX_BATCH = 64


@dataclass
class Job:
    """One request's share of a batch.

    Attributes:
        history: item indices, oldest first (non-empty).
        alpha: the short-branch weight.
        n: results wanted.
        banned: item indices never to return.
        allowed: the packed bitmap of what may be returned (None: everything).
        shared: ``allowed`` is the catalogue's global bitmap (or None), the same object for
            every request, so its search can be shared.
    """

    history: list[int]
    alpha: float
    n: int
    banned: set[int]
    allowed: np.ndarray | None
    shared: bool
    future: asyncio.Future = field(default=None, repr=False)  # type: ignore[assignment]


class Batcher:
    """Batches the model work of the requests that are ready at the same time."""

    def __init__(self, metrics: Metrics, max_batch: int = MAX_BATCH) -> None:
        self.metrics = metrics
        self.max_batch = max_batch
        self.pending: dict[int, tuple[Bundle, list[Job]]] = {}  # by bundle: a reload may be under way
        self.scheduled = False
        self.batch_sizes: list[int] = []  # for tests and the bench: how large the batches were

    async def run(self, bundle: Bundle, job: Job) -> list[tuple[int, float]]:
        """The n best (item_idx, score) for the job, best first."""
        if job.n <= 0:
            return []
        loop = asyncio.get_running_loop()
        job.future = loop.create_future()
        self.pending.setdefault(id(bundle), (bundle, []))[1].append(job)
        if not self.scheduled:
            self.scheduled = True
            loop.call_soon(self._flush)
        return await job.future

    def _flush(self) -> None:
        self.scheduled = False
        pending, self.pending = self.pending, {}
        for bundle, jobs in pending.values():
            for start in range(0, len(jobs), self.max_batch):
                batch = jobs[start : start + self.max_batch]
                try:
                    self._run_batch(bundle, batch)
                except Exception as exc:  # every request of the batch gets the error (e.g. InferenceError)
                    for job in batch:
                        if not job.future.done():
                            job.future.set_exception(exc)

    def _run_batch(self, bundle: Bundle, jobs: list[Job]) -> None:
        self.batch_sizes.append(len(jobs))
        with self.metrics.time_stage("encoder"):
            short, long = bundle.encode(
                left_pad([j.history for j in jobs], bundle.max_len, bundle.padding_idx)
            )
        alphas = np.array([[j.alpha] for j in jobs], dtype=np.float32)
        queries = blend(short, long, alphas)  # (B, d): alpha per row
        with self.metrics.time_stage("search"):
            groups: dict[int, list[int]] = {}  # by the rules' bitmap object: the same rules
            for i, job in enumerate(jobs):
                if job.shared:
                    groups.setdefault(id(job.allowed), []).append(i)
                else:
                    _answer(job, search(bundle, queries[i : i + 1], job.n, job.allowed, job.banned))
            for rows in groups.values():
                self._shared_search(bundle, [jobs[i] for i in rows], queries[rows])

    @staticmethod
    def _shared_search(bundle: Bundle, jobs: list[Job], queries: np.ndarray) -> None:
        """One search for queries under the same rules; each query's exclusions taken out after."""
        k = min(bundle.num_items, max(j.n + len(j.banned) for j in jobs))
        params = _shared_params(bundle, jobs[0].allowed)
        scores, idx = bundle.search(queries, k, params)
        for row, job in enumerate(jobs):
            picked = [
                (int(i), float(s))
                for i, s in zip(idx[row], scores[row], strict=True)
                if i >= 0 and int(i) not in job.banned
            ]
            _answer(job, picked[: job.n])


def _answer(job: Job, found: list[tuple[int, float]]) -> None:
    if not job.future.done():  # its request may have been cancelled meanwhile
        job.future.set_result(found)


def _shared_params(bundle: Bundle, allowed: np.ndarray | None) -> Any:
    """The global bitmap as a selector (one for the whole batch), or nothing."""
    if allowed is None:
        return None
    import faiss

    from mqsa.service.rules import count_bits

    selector = faiss.IDSelectorBitmap(bundle.num_items, faiss.swig_ptr(allowed))
    params = bundle.search_parameters(selector, count_bits(allowed) / max(1, bundle.num_items))
    params._keep = (selector, allowed)  # the SWIG objects must outlive the search
    return params
