"""Large synthetic interaction logs (S1, S2, S3 of issue 20), written in bounded memory.

``mqsa data synth-log --preset S1 --out s1.parquet`` writes a raw log (``user_id``,
``item_id``, ``timestamp``) for ``mqsa data prepare``, to measure the cost of
training at scale. The model of the data:

* Items ``0..N-1`` are numbered by popularity rank. A *fresh* pick is item ``r`` with
  probability proportional to ``(r + 1) ** -item_exponent`` (Zipf), drawn by inverse CDF.
* Users are independent. A user's number of events is ``ceil(x_m * v ** -user_exponent)``
  with ``v`` uniform in (0, 1], capped at ``max_events``: the r-th most active of U users
  has about ``x_m * (U / r) ** user_exponent`` events (Zipf in rank; a Pareto tail of index
  ``1 / user_exponent``), and ``x_m = mean_events * (1 - user_exponent)`` makes the mean
  about ``mean_events`` (before the rounding and the cap).
* The sequential signal: a user's first event is a fresh pick; each next one is, with
  probability ``neighbour_prob``, a *neighbour* of the previous item, ``(prev + d) mod N``
  with ``d`` uniform in ``1..neighbours``, and otherwise a fresh pick. The item after
  ``x`` is one of ``x+1..x+neighbours`` far more often than chance, which a sequential
  model can learn and a popularity ranking cannot; as neighbours are close in rank,
  popularity stays Zipf-like (smoothed over ``neighbours`` ranks).
* Timestamps (int64 seconds): each user starts at a uniform time in the year after
  ``START_TIME``; the gaps are ``1 + floor(exponential(MEAN_GAP))``, so a user's
  timestamps strictly increase. Rows are grouped by user, in user order.

Ids are ``"u<user>"`` and ``"i<item>"``. Users are generated ``chunk_users`` at a time,
vectorised (no Python loop per event), from a generator seeded by ``(seed, chunk
index)``: the same config, chunk size included, gives the same file. Each chunk is one
Parquet row group, so memory is O(``chunk_users * mean_events + items``) whatever the
number of users. ``PRESETS`` are sized so that the 5-core filter of ``mqsa data
prepare`` leaves about the users, items and actions of issue 20's table (docs/scaling.md,
"Synthetic logs S1-S3").
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mqsa.errors import ConfigError
from mqsa.training.artifacts import writing

START_TIME = 1_600_000_000  # seconds: the earliest first event of a user
START_SPAN = 365 * 86_400  # users start uniformly within a year
MEAN_GAP = 3_600.0  # seconds between two events of a user, on average
SCHEMA = pa.schema([("user_id", pa.string()), ("item_id", pa.string()), ("timestamp", pa.int64())])


@dataclass
class ScaleLogConfig:
    """A synthetic log of ``mqsa data synth-log``; the defaults are preset S1's.

    Attributes:
        users: U, the users generated (fewer are left after the 5-core filter).
        items: N, the catalogue; items are 0..N-1 by popularity rank, named i0..i<N-1>.
        mean_events: about the mean number of events per user (before the rounding and the cap).
        max_events: the most events one user has (the cap of the heavy tail).
        item_exponent: the Zipf exponent of item popularity (0: uniform).
        user_exponent: the Zipf exponent of user activity, in [0, 1) (0: every user has
            mean_events events).
        neighbour_prob: the sequential signal: the chance that the next item is a neighbour
            of the previous one, (prev + d) mod N with d in 1..neighbours.
        neighbours: how many items follow an item as its neighbours.
        seed: the seed of the generator; the same settings give the same file.
        chunk_users: users generated per batch, one Parquet row group each (part of the
            data's identity: another chunk size draws other data).
    """

    users: int = 101_000
    items: int = 60_000
    mean_events: float = 9.7
    max_events: int = 2000
    item_exponent: float = 0.8
    user_exponent: float = 0.5
    neighbour_prob: float = 0.5
    neighbours: int = 4
    seed: int = 0
    chunk_users: int = 100_000

    def __post_init__(self) -> None:
        for name in ("users", "chunk_users", "neighbours"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.items <= self.neighbours:
            raise ConfigError(f"items must exceed neighbours ({self.neighbours}), got {self.items}")
        if not self.mean_events >= 1:
            raise ConfigError(f"mean_events must be >= 1, got {self.mean_events}")
        if self.max_events < self.mean_events:
            raise ConfigError(
                f"max_events must be >= mean_events ({self.mean_events}), got {self.max_events}"
            )
        if not self.item_exponent >= 0:
            raise ConfigError(f"item_exponent must be >= 0, got {self.item_exponent}")
        if not 0 <= self.user_exponent < 1:
            raise ConfigError(f"user_exponent must be in [0, 1), got {self.user_exponent}")
        if not 0 <= self.neighbour_prob <= 1:
            raise ConfigError(f"neighbour_prob must be in [0, 1], got {self.neighbour_prob}")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")


PRESETS: dict[str, ScaleLogConfig] = {
    "S1": ScaleLogConfig(),
    "S2": ScaleLogConfig(users=1_045_000, items=600_000, mean_events=9.95, item_exponent=0.9),
    "S3": ScaleLogConfig(users=3_000_000, items=2_000_000, mean_events=17.0, item_exponent=0.97),
}


@dataclass
class Chunk:
    """The events of one batch of users, grouped by user, each user's oldest first.

    Attributes:
        users: (events,) user numbers.
        items: (events,) item numbers (popularity ranks).
        timestamps: (events,) int64 seconds, increasing within each user.
    """

    users: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray


def item_cdf(config: ScaleLogConfig) -> np.ndarray:
    """The cumulative Zipf popularity of the fresh picks, ending at 1."""
    weights = np.arange(1, config.items + 1, dtype=np.float64) ** -config.item_exponent
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


def user_lengths(rng: np.random.Generator, config: ScaleLogConfig, n: int) -> np.ndarray:
    """``n`` users' numbers of events: Zipf in rank, about ``mean_events`` on average."""
    scale = config.mean_events * (1.0 - config.user_exponent)
    v = 1.0 - rng.random(n)  # (0, 1]
    lengths = np.ceil(scale * v**-config.user_exponent)
    return np.clip(lengths, 1, config.max_events).astype(np.int64)


def _items(
    rng: np.random.Generator, config: ScaleLogConfig, cdf: np.ndarray, starts: np.ndarray, total: int
) -> np.ndarray:
    """The item chain: fresh Zipf picks, and neighbours of the previous item in between.

    Each event carries a value: a fresh pick's item, or a neighbour's step d. An item is
    then the sum of the values since (and including) the last fresh pick, mod N: one
    cumulative sum for the whole chunk, no loop over events.
    """
    fresh = rng.random(total) >= config.neighbour_prob
    fresh[starts] = True  # a user's first event
    values = rng.integers(1, config.neighbours + 1, size=total, dtype=np.int64)
    picks = np.searchsorted(cdf, rng.random(int(fresh.sum())), side="right")
    values[fresh] = np.minimum(picks, config.items - 1)  # guards against rounding at the top of the CDF
    sums = np.cumsum(values)
    last_fresh = np.maximum.accumulate(np.where(fresh, np.arange(total), 0))
    return (sums - sums[last_fresh] + values[last_fresh]) % config.items


def make_chunk(config: ScaleLogConfig, cdf: np.ndarray, index: int) -> Chunk:
    """The events of users ``index * chunk_users`` onwards (at most ``chunk_users`` of them)."""
    rng = np.random.default_rng([config.seed, index])
    first = index * config.chunk_users
    n = min(config.chunk_users, config.users - first)
    lengths = user_lengths(rng, config, n)
    total = int(lengths.sum())
    starts = np.cumsum(lengths) - lengths  # each user's first event
    items = _items(rng, config, cdf, starts, total)
    gaps = 1 + np.floor(rng.exponential(MEAN_GAP, total)).astype(np.int64)
    gaps[starts] = 0
    elapsed = np.cumsum(gaps)
    begin = START_TIME + rng.integers(0, START_SPAN, n, dtype=np.int64)
    timestamps = np.repeat(begin - elapsed[starts], lengths) + elapsed
    users = np.repeat(np.arange(first, first + n, dtype=np.int64), lengths)
    return Chunk(users=users, items=items, timestamps=timestamps)


def chunks(config: ScaleLogConfig) -> Iterator[Chunk]:
    """Every chunk of the log, in user order."""
    cdf = item_cdf(config)
    for index in range(math.ceil(config.users / config.chunk_users)):
        yield make_chunk(config, cdf, index)


def _table(chunk: Chunk) -> pa.Table:
    """A chunk with its ids as text: ``u<user>``, ``i<item>``."""
    users = pc.binary_join_element_wise("u", pc.cast(pa.array(chunk.users), pa.string()), "")
    items = pc.binary_join_element_wise("i", pc.cast(pa.array(chunk.items), pa.string()), "")
    return pa.Table.from_arrays([users, items, pa.array(chunk.timestamps)], schema=SCHEMA)


def write_scale_log(path: str | Path, config: ScaleLogConfig) -> dict[str, int | float | str]:
    """Write the log of ``config`` to the Parquet file ``path``, one row group per chunk.

    Memory is that of one chunk (and the N-item popularity table), whatever the number
    of users. The file is written beside ``path`` and moved into place at the end.

    Returns:
        A summary: ``path``, ``rows``, ``users``, ``items`` (those used at least once),
        ``row_groups`` and ``seconds``.

    Raises:
        DataError: ``path`` cannot be written.
    """
    begin = time.perf_counter()
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    used = np.zeros(config.items, dtype=bool)
    rows = groups = 0
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with pq.ParquetWriter(partial, SCHEMA) as writer:
            for chunk in chunks(config):
                used[chunk.items] = True
                writer.write_table(_table(chunk), row_group_size=len(chunk.items))
                rows += len(chunk.items)
                groups += 1
        os.replace(partial, path)
    return {
        "path": str(path),
        "rows": rows,
        "users": config.users,
        "items": int(used.sum()),
        "row_groups": groups,
        "seconds": round(time.perf_counter() - begin, 2),
    }
