"""The batcher: concurrent requests share encoder calls and searches, and each still gets
exactly its own answer (its rules, its exclusions), whatever the others do."""

from __future__ import annotations

import asyncio

import pytest

from mqsa.service.batching import Batcher, Job
from mqsa.service.bundle import Bundle, load_bundle
from mqsa.service.catalogue import ItemRecord
from mqsa.service.metrics import Metrics
from mqsa.service.recommender import Ask, recommend
from mqsa.service.rules import Rules


@pytest.fixture(scope="module")
def bundle(bundle_dir) -> Bundle:
    return load_bundle(bundle_dir)


def test_a_batch_answers_each_request_as_if_alone(bundle) -> None:
    batcher = Batcher(Metrics())
    jobs = [Job(list(range(1 + k, 6 + k)), bundle.alpha, 5 + k, {k, k + 1}, None, True) for k in range(6)]

    async def main() -> list[list[tuple[int, float]]]:
        return await asyncio.gather(*(batcher.run(bundle, job) for job in jobs))

    together = asyncio.run(main())
    assert batcher.batch_sizes == [6]
    for job, got in zip(jobs, together, strict=True):
        single = Job(job.history, job.alpha, job.n, job.banned, None, True)
        alone = asyncio.run(Batcher(Metrics()).run(bundle, single))
        assert [i for i, _ in got] == [i for i, _ in alone] and len(got) == job.n
        assert not set(i for i, _ in got) & job.banned


def test_a_cancelled_request_does_not_fail_the_rest_of_its_batch(bundle) -> None:
    batcher = Batcher(Metrics())

    async def main() -> list:
        tasks = [
            asyncio.ensure_future(batcher.run(bundle, Job([1, 2, 3], bundle.alpha, 5, set(), None, True)))
            for _ in range(3)
        ]
        await asyncio.sleep(0)  # every job is queued; the flush comes next
        tasks[0].cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    cancelled, *served = asyncio.run(main())
    assert isinstance(cancelled, asyncio.CancelledError)
    assert all(isinstance(s, list) and len(s) == 5 for s in served), served


def test_requests_under_different_rules_are_not_searched_together(bundle) -> None:
    """An item hidden between two requests of one batch must not reach the later one."""
    rules = Rules(bundle.item_ids, {}, bundle.item_index)
    batcher, metrics = Batcher(Metrics()), Metrics()
    history = bundle.item_ids[:5]

    async def ask() -> list[str]:
        answer = await recommend(bundle, rules, history, Ask(n=10), None, metrics, batcher)
        return [item_id for item_id, _, _ in answer.items]

    top = asyncio.run(ask())[0]

    async def hide() -> None:
        rules.apply({top: ItemRecord(available=False)})

    async def main() -> tuple[list[str], None, list[str]]:
        return await asyncio.gather(ask(), hide(), ask())

    before, _, after = asyncio.run(main())
    assert before[0] == top and top not in after
    assert batcher.batch_sizes[-1] == 2  # still one batch: one encoder call, two searches


def test_a_request_for_nothing_searches_nothing(bundle) -> None:
    assert asyncio.run(Batcher(Metrics()).run(bundle, Job([1, 2], bundle.alpha, 0, set(), None, True))) == []
