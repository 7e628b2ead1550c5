"""The item transition graph of spec section 6.1, stored sparse (CSR).

A[i, j] = how many times item j follows item i within ``time_span`` steps in
a user's training sequence. It feeds the TED teacher (``training/losses.py``)
and the Item Transition baseline (``training/evaluation.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class TransitionGraph:
    """A sparse N x N count matrix in CSR form.

    Attributes:
        num_items: N.
        indptr: (N + 1,) row i's entries are ``indptr[i]:indptr[i + 1]``.
        indices: (nnz,) column (next item) of each entry, sorted within a row.
        counts: (nnz,) float32 transition counts, all > 0.
    """

    num_items: int
    indptr: np.ndarray
    indices: np.ndarray
    counts: np.ndarray

    @classmethod
    def from_sequences(
        cls, sequences: list[np.ndarray], num_items: int, time_span: int = 1
    ) -> TransitionGraph:
        """Count transitions i -> j for j within ``time_span`` steps after i."""
        if time_span < 1:
            raise ValueError(f"time_span must be >= 1, got {time_span}")
        src, dst = [], []
        for seq in sequences:
            for step in range(1, min(time_span, len(seq) - 1) + 1):
                src.append(seq[:-step])
                dst.append(seq[step:])
        if src:
            keys = np.concatenate(src).astype(np.int64) * num_items + np.concatenate(dst)
        else:
            keys = np.empty(0, dtype=np.int64)
        keys, counts = np.unique(keys, return_counts=True)  # sorted by (row, col)
        rows, cols = np.divmod(keys, num_items)
        indptr = np.zeros(num_items + 1, dtype=np.int64)
        np.add.at(indptr, rows + 1, 1)
        return cls(
            num_items=num_items,
            indptr=np.cumsum(indptr),
            indices=cols.astype(np.int64),
            counts=counts.astype(np.float32),
        )

    @property
    def nnz(self) -> int:
        return int(self.indices.size)

    def row(self, item_idx: int) -> tuple[np.ndarray, np.ndarray]:
        """(columns, counts) of row ``item_idx``."""
        lo, hi = self.indptr[item_idx], self.indptr[item_idx + 1]
        return self.indices[lo:hi], self.counts[lo:hi]

    def row_lengths(self) -> np.ndarray:
        """(N,) number of non-zero entries per row."""
        return np.diff(self.indptr)
