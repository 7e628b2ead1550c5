"""User sequences: the text format, the leave-one-out split, left padding, statistics.

The text format (the one of ``shared/data``): one user per line,
``<user> <item_idx_1> ... <item_idx_n>``, items in time order, separated by
whitespace; item indices are contiguous integers from 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mqsa.errors import DataError
from mqsa.training.artifacts import writing

MIN_LENGTH = 3  # one training item, one validation target, one test target


@dataclass
class SequenceData:
    """Every user's items in time order.

    Attributes:
        sequences: per user, an int64 array of item indices, oldest first.
        user_ids: the first token of each line (the user's id in this file).
        num_items: N; item indices are 0..N-1.
    """

    sequences: list[np.ndarray]
    user_ids: list[str]
    num_items: int

    @property
    def num_users(self) -> int:
        return len(self.sequences)


def read_sequences(
    path: str | Path, num_items: int | None = None, min_length: int = MIN_LENGTH
) -> SequenceData:
    """Read the sequence text format, checking every line.

    Args:
        path: the file.
        num_items: N if known (from a vocabulary); else 1 + the largest index seen.
        min_length: the fewest items a user may have.

    Raises:
        DataError: naming the file and line, for a missing or empty file, a line
            with no items, a token that is not a non-negative integer, an index
            >= num_items, or a user with fewer than ``min_length`` items.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("no such file", path)
    sequences: list[np.ndarray] = []
    user_ids: list[str] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            tokens = line.split()
            if not tokens:
                continue
            user, items = tokens[0], tokens[1:]
            if not items:
                raise DataError(f"user {user!r} has no items", path, lineno)
            try:
                seq = np.array([int(t) for t in items], dtype=np.int64)
            except ValueError:
                bad = next(t for t in items if not _is_int(t))
                raise DataError(
                    f"{bad!r} is not an integer item index (expected '<user> <item> <item> ...')",
                    path,
                    lineno,
                ) from None
            if seq.min() < 0:
                raise DataError(f"negative item index {int(seq.min())}", path, lineno)
            if num_items is not None and seq.max() >= num_items:
                raise DataError(
                    f"item index {int(seq.max())} is out of range for {num_items} items", path, lineno
                )
            if len(seq) < min_length:
                raise DataError(
                    f"user {user!r} has {len(seq)} items; "
                    f"the leave-one-out split needs at least {min_length}",
                    path,
                    lineno,
                )
            sequences.append(seq)
            user_ids.append(user)
    if not sequences:
        raise DataError("the file holds no sequences", path)
    if num_items is None:
        num_items = int(max(int(s.max()) for s in sequences)) + 1
    return SequenceData(sequences=sequences, user_ids=user_ids, num_items=num_items)


def _is_int(token: str) -> bool:
    try:
        int(token)
    except ValueError:
        return False
    return True


def write_sequences(path: str | Path, sequences: list[np.ndarray], user_ids: list[str] | None = None) -> None:
    """Write sequences in the text format; users are numbered from 0 unless ids are given."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as f:
            for u, seq in enumerate(sequences):
                user = user_ids[u] if user_ids is not None else str(u)
                f.write(user + " " + " ".join(map(str, seq.tolist())) + "\n")


@dataclass
class LeaveOneOut:
    """The paper's split. ``train`` is already cut to its last ``max_len`` items.

    Attributes:
        train: per user, the training items (oldest first, at most max_len).
        valid: (U,) the validation target (second last item).
        test: (U,) the test target (last item).
    """

    train: list[np.ndarray]
    valid: np.ndarray
    test: np.ndarray


def split_leave_one_out(sequences: list[np.ndarray], max_len: int) -> LeaveOneOut:
    """Last item = test, second last = validation, the rest (its last max_len) = train."""
    for u, seq in enumerate(sequences):
        if len(seq) < MIN_LENGTH:
            raise DataError(f"user #{u} has {len(seq)} items; the split needs at least {MIN_LENGTH}")
    return LeaveOneOut(
        train=[seq[:-2][-max_len:] for seq in sequences],
        valid=np.array([seq[-2] for seq in sequences], dtype=np.int64),
        test=np.array([seq[-1] for seq in sequences], dtype=np.int64),
    )


def left_pad(sequences: list[np.ndarray], length: int, padding_idx: int) -> np.ndarray:
    """Cut each sequence to its last ``length`` items and left-pad it.

    Returns:
        (U, length) int64, most recent item at the last column.
    """
    out = np.full((len(sequences), length), padding_idx, dtype=np.int64)
    for u, seq in enumerate(sequences):
        seq = seq[-length:]
        if len(seq):
            out[u, length - len(seq) :] = seq
    return out


def sequence_stats(data: SequenceData) -> dict[str, float]:
    """Users, items, actions, length distribution and density."""
    lengths = np.array([len(s) for s in data.sequences])
    actions = int(lengths.sum())
    used = np.unique(np.concatenate(data.sequences)).size
    return {
        "users": data.num_users,
        "items": data.num_items,
        "items_seen": int(used),
        "actions": actions,
        "avg_length": float(lengths.mean()),
        "median_length": float(np.median(lengths)),
        "min_length": int(lengths.min()),
        "max_length": int(lengths.max()),
        "density": actions / (data.num_users * data.num_items),
    }
