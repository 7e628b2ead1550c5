"""Seeded synthetic sequences whose structure needs what MQSA-TED brings.

The catalogue is covered by *bundles*: sets of ``bundle_size`` distinct items
bought together. Every item is in at least one bundle (when ``bundles *
bundle_size >= items``), and on average in ``bundles * bundle_size / items`` of
them (2.5 by default: 208 bundles of 6 among 500 items). Every bundle belongs to
one of ``tastes`` taste groups, and every user to one taste. A user's sequence is
a run of bundles drawn from their taste (Zipf-weighted, so each taste has popular
bundles), each bundle's items in a random order; with probability ``noise`` an
item is replaced by a uniformly random one.

What each recommender can see:

* Popularity: the overall most popular items. Weak: tastes differ.
* Item Transition (the last item only): the item after x is any bundle-mate of x
  in any of x's bundles, in any order: a dozen candidates it cannot tell apart.
* A sequential model: the last two or three items together (MQSA's long query is
  their mean) usually pin one bundle down, whose unseen items come next; and the
  user's earlier bundles tell their taste, which ranks the bundle that comes next.

The baselines and the model are trained and evaluated on the same data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mqsa.errors import ConfigError
from mqsa.training.artifacts import write_json_atomic, writing
from mqsa.training.sequences import write_sequences
from mqsa.training.vocabulary import Vocabulary

ZIPF_EXPONENT = 1.0  # bundle popularity within a taste
START_TIME = 1_600_000_000  # timestamps of the raw log, in seconds
SHORTEST = 5  # the shortest sequence generated (room for a split and some history)


@dataclass
class SynthConfig:
    """The synthetic data set of ``mqsa data synth`` and ``mqsa demo``.

    Attributes:
        users: U, one sequence each.
        items: N; items are 0..N-1, named i0..i<N-1>.
        tastes: taste groups; each user has one, each bundle belongs to one.
        bundles: sets of items bought together.
        bundle_size: items per bundle.
        mean_length: the mean sequence length (at least 5).
        noise: chance that an item is replaced by a uniformly random one.
        seed: the seed of the generator; the same settings give the same data.
    """

    users: int = 2000
    items: int = 500
    tastes: int = 25
    bundles: int = 208
    bundle_size: int = 6
    mean_length: float = 12.0
    noise: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("users", "tastes", "bundles"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 2 <= self.bundle_size <= self.items:
            raise ConfigError(f"bundle_size must be in [2, items={self.items}], got {self.bundle_size}")
        if self.tastes > self.bundles:
            raise ConfigError(f"tastes ({self.tastes}) must not exceed bundles ({self.bundles})")
        if self.mean_length < SHORTEST:
            raise ConfigError(f"mean_length must be at least {SHORTEST}, got {self.mean_length}")
        if not 0.0 <= self.noise <= 1.0:
            raise ConfigError(f"noise must be in [0, 1], got {self.noise}")


@dataclass
class Plan:
    """The structure :func:`generate` plants for a config.

    Attributes:
        members: (bundles, bundle_size) the items of each bundle.
        taste_of: (bundles,) the taste of each bundle.
        user_tastes: (users,) the taste of each user.
    """

    members: np.ndarray
    taste_of: np.ndarray
    user_tastes: np.ndarray


def plant(config: SynthConfig) -> Plan:
    """The bundles, their tastes and the users' tastes that :func:`generate` uses for ``config``."""
    return _plant(np.random.default_rng(config.seed), config)


def _plant(rng: np.random.Generator, config: SynthConfig) -> Plan:
    slots = config.bundles * config.bundle_size
    rounds = -(-slots // config.items)  # every item once before any item twice: the bundles cover all
    order = np.concatenate([rng.permutation(config.items) for _ in range(rounds)])[:slots]
    members = order.reshape(config.bundles, config.bundle_size)
    for row in members:  # a bundle that straddles two rounds may hold an item twice: swap the copy
        seen: set[int] = set()
        for j, item in enumerate(row):
            if int(item) in seen:
                row[j] = rng.choice(np.setdiff1d(np.arange(config.items), row))
            seen.add(int(row[j]))
    taste_of = rng.permutation(np.arange(config.bundles) % config.tastes)
    user_tastes = rng.integers(config.tastes, size=config.users)
    return Plan(members=members.astype(np.int64), taste_of=taste_of, user_tastes=user_tastes)


def generate(config: SynthConfig | None = None) -> list[np.ndarray]:
    """One item sequence per user, oldest first; the same config gives the same output.

    Lengths are 4 + a geometric draw (at least 5, mean ``mean_length``), capped at
    ``4 * mean_length``.
    """
    config = config or SynthConfig()
    rng = np.random.default_rng(config.seed)
    plan = _plant(rng, config)
    by_taste = [np.flatnonzero(plan.taste_of == t) for t in range(config.tastes)]
    weights = [1.0 / np.arange(1, len(b) + 1) ** ZIPF_EXPONENT for b in by_taste]
    weights = [w / w.sum() for w in weights]
    extra = rng.geometric(1 / (config.mean_length - SHORTEST + 1), config.users)
    lengths = np.minimum(SHORTEST - 1 + extra, int(4 * config.mean_length))
    sequences = []
    for taste, length in zip(plan.user_tastes, lengths, strict=True):
        items: list[np.ndarray] = []
        while sum(len(b) for b in items) < length:
            bundle = rng.choice(by_taste[taste], p=weights[taste])
            items.append(rng.permutation(plan.members[bundle]))
        seq = np.concatenate(items)[:length]
        noisy = rng.random(length) < config.noise
        seq[noisy] = rng.integers(config.items, size=int(noisy.sum()))
        sequences.append(seq)
    return sequences


def write_synthetic(out_dir: str | Path, config: SynthConfig | None = None, raw_log: bool = False) -> Path:
    """Write :func:`generate`'s output as ``sequences.txt`` (users 0..U-1) and ``items.json``.

    ``items.json`` names item index i ``f"i{i}"``; ``plan.json`` holds the planted
    structure (each bundle's items and taste, each user's taste), to look at. With ``raw_log``, also writes
    ``interactions.csv`` (``user_id,item_id,timestamp``; ids ``"u{u}"`` and ``"i{i}"``,
    timestamps increasing row by row) that :func:`mqsa.training.prepare.prepare` reads.

    Returns:
        The path of ``sequences.txt``.
    """
    config = config or SynthConfig()
    sequences = generate(config)
    out_dir = Path(out_dir)
    path = out_dir / "sequences.txt"
    write_sequences(path, sequences)
    Vocabulary(f"i{i}" for i in range(config.items)).save(out_dir / "items.json")
    plan = plant(config)
    bundles = [
        {"items": [f"i{i}" for i in row], "taste": int(t)}
        for row, t in zip(plan.members, plan.taste_of, strict=True)
    ]
    write_json_atomic(out_dir / "plan.json", {"bundles": bundles, "user_tastes": plan.user_tastes.tolist()})
    if raw_log:
        items = np.concatenate(sequences)
        users = np.repeat(np.arange(len(sequences)), [len(s) for s in sequences])
        log = pd.DataFrame(
            {
                "user_id": [f"u{u}" for u in users],
                "item_id": [f"i{i}" for i in items],
                "timestamp": START_TIME + 60 * np.arange(len(items)),
            }
        )
        with writing(out_dir / "interactions.csv"):
            log.to_csv(out_dir / "interactions.csv", index=False)
    return path
