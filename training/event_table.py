"""A log's usable events on disk: the k-core and the user sequences in bounded memory.

``mqsa data prepare`` streams a log in, chunk by chunk as it is validated
(:class:`mqsa.training.prepare.LogReader`), and this table does the rest in SQL:
drops the archive's copies of an entry, numbers the ids, filters to the k-core
and writes the sequences, user by user, out of a sorted scan. The table is a
DuckDB database file in a temporary folder; DuckDB keeps at most ``memory_gb``
in memory and spills sorts, joins and tables beyond it to that folder, so the
memory ``prepare`` needs no longer grows with the log (pandas needed about 180 B
per event: 20 GB at 10^8 events).

Why DuckDB: the k-core is a few grouped counts and anti-joins repeated to a
fixed point, and the sequences one large sort; an embedded engine that runs
them out of core is what this needs, and DuckDB is the one data teams already
use for it (no server, one wheel).

Row order is the log's: every event keeps its row number, so ties in time keep
their order in the file, and users are numbered by their first kept row.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pandas as pd

from mqsa.errors import DataError
from mqsa.training.artifacts import writing

COLUMNS = ("row", "user_id", "item_id", "timestamp", "stream", "stream_id")
SCAN_ROWS = 1 << 20  # rows per batch read back out of the table


@dataclass
class Counts:
    """Distinct users and items, and events, in the table now."""

    users: int
    items: int
    actions: int


class EventTable:
    """The events of one ``prepare`` run, in a DuckDB file under a temporary folder.

    Use as a context manager; the folder is removed on exit.

    Args:
        memory_gb: DuckDB's memory limit; beyond it, it spills to the folder.
        temp_dir: where the folder goes (default: the system's temporary folder).
            It needs about 40 B per event.
    """

    def __init__(self, memory_gb: float = 4.0, temp_dir: str | None = None) -> None:
        import duckdb

        with writing(temp_dir or tempfile.gettempdir()):  # no such folder, no permission: a DataError
            self.folder = Path(tempfile.mkdtemp(prefix="mqsa-prepare-", dir=temp_dir or None))
        self.db = duckdb.connect(str(self.folder / "events.duckdb"))
        self._run(f"SET memory_limit = '{int(memory_gb * 1024)}MB'")
        self._run(f"SET temp_directory = '{self.folder / 'spill'}'")
        self._run(
            "CREATE TABLE raw (row BIGINT, user_id VARCHAR, item_id VARCHAR, timestamp DOUBLE, "
            "stream VARCHAR, stream_id VARCHAR)"
        )
        self.rows = 0

    def _run(self, statement: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        """Run one statement to its end (DuckDB keeps a connection busy until its result is read)."""
        return self.db.execute(statement, params).fetchall()

    def __enter__(self) -> EventTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.db.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def append(self, frame: pd.DataFrame) -> None:
        """Add usable events: columns ``user_id``, ``item_id``, ``timestamp`` and, from an
        archive, ``stream`` and ``stream_id``; rows are numbered on from the last call."""
        rows = pd.DataFrame({name: frame.get(name) for name in COLUMNS[1:]}, index=frame.index)
        rows.insert(0, "row", np.arange(self.rows, self.rows + len(frame), dtype=np.int64))
        self.db.append("raw", rows)
        self.rows += len(frame)

    def number(self) -> int:
        """Drop the copies of an archive entry (the same stream and stream id; the first row
        stays), give users and items integer codes and keep ``events(row, u, i, timestamp)``.

        Returns:
            The copies dropped.
        """
        ((copies,),) = self._run(
            "DELETE FROM raw WHERE stream_id IS NOT NULL AND row NOT IN "
            "(SELECT min(row) FROM raw WHERE stream_id IS NOT NULL GROUP BY stream, stream_id)"
        )
        for name, column in (("users", "user_id"), ("items", "item_id")):
            self._run(
                f"CREATE TABLE {name} AS SELECT {column}, (row_number() OVER ()) - 1 AS code "
                f"FROM (SELECT DISTINCT {column} FROM raw)"
            )
        self._run(
            "CREATE TABLE events AS SELECT r.row, u.code AS u, i.code AS i, r.timestamp FROM raw r "
            "JOIN users u USING (user_id) JOIN items i USING (item_id)"
        )
        self._run("DROP TABLE raw")
        return int(copies)

    def counts(self) -> Counts:
        ((users, items, actions),) = self._run(
            "SELECT count(DISTINCT u), count(DISTINCT i), count(*) FROM events"
        )
        return Counts(int(users), int(items), int(actions))

    def kcore(self, k: int, user_k: int) -> None:
        """Keep only users with at least ``user_k`` events and items with at least ``k``,
        repeated to a fixed point (an event is a row: a repeated pair counts each time).

        Both counts are taken before each round's deletion, so a round removes what
        a pandas filter on the same counts would; the fixed point (the largest part
        of the log where every user and item has enough) does not depend on the order.
        """
        while True:
            ((deleted,),) = self._run(
                "DELETE FROM events WHERE u IN (SELECT u FROM events GROUP BY u HAVING count(*) < ?) "
                "OR i IN (SELECT i FROM events GROUP BY i HAVING count(*) < ?)",
                [user_k, k],
            )
            if deleted == 0:
                return

    def write(self, sequences_path: Path) -> tuple[list[str], list[str]]:
        """Write the sequences text format: users numbered 0..U-1 by their first row in the
        log, each user's items by time (ties in file order); item indices by first
        appearance, user by user.

        Returns:
            The user ids and the item ids, by their index.
        """
        self._run(
            "CREATE TABLE numbered AS SELECT u, (row_number() OVER (ORDER BY first)) - 1 AS user_idx "
            "FROM (SELECT u, min(row) AS first FROM events GROUP BY u)"
        )
        user_ids = self._column(
            "SELECT s.user_id FROM numbered n JOIN users s ON s.code = n.u ORDER BY n.user_idx"
        )
        item_id_of = self._item_ids()
        scan = self.db.sql(
            "SELECT n.user_idx, e.i FROM events e JOIN numbered n USING (u) "
            "ORDER BY n.user_idx, e.timestamp, e.row"
        ).to_arrow_reader(SCAN_ROWS)
        index_of = np.full(len(item_id_of), -1, dtype=np.int64)
        with writing(sequences_path):
            sequences_path.parent.mkdir(parents=True, exist_ok=True)
            with sequences_path.open("w", encoding="utf-8") as out:
                _write_lines(out, _batches(scan), index_of)
        order = np.argsort(np.where(index_of < 0, len(index_of), index_of), kind="stable")
        return user_ids, [str(item_id_of[i]) for i in order[: int((index_of >= 0).sum())]]

    def _column(self, query: str) -> list[str]:
        return [
            str(v) for batch in self.db.sql(query).to_arrow_reader(SCAN_ROWS) for v in batch[0].to_pylist()
        ]

    def _item_ids(self) -> np.ndarray:
        """(codes,) the item id of each item code."""
        ((count,),) = self._run("SELECT count(*) FROM items")
        ids = np.empty(int(count), dtype=object)
        for batch in self.db.sql("SELECT code, item_id FROM items").to_arrow_reader(SCAN_ROWS):
            ids[batch[0].to_numpy()] = batch[1].to_pylist()
        return ids


def _batches(reader: Any) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(user_idx, item code) arrays, batch by batch, of a sorted scan."""
    for batch in reader:
        if batch.num_rows:
            yield batch[0].to_numpy(), batch[1].to_numpy()


def _write_lines(out: TextIO, batches: Iterator[tuple[np.ndarray, np.ndarray]], index_of: np.ndarray) -> None:
    """Write one line per user; ``index_of`` (item code -> item index, -1 for none yet) is
    filled in as items first appear. A user split across batches is carried over."""
    carry_user: int | None = None
    carry: list[str] = []
    for users, codes in batches:
        new = codes[index_of[codes] < 0]
        if len(new):
            firsts = np.unique(new, return_index=True)
            fresh = firsts[0][np.argsort(firsts[1])]  # in order of first appearance
            start = int(index_of.max()) + 1
            index_of[fresh] = np.arange(start, start + len(fresh))
        tokens = index_of[codes].astype(str).tolist()
        bounds = np.flatnonzero(np.diff(users)) + 1
        starts, ends = np.r_[0, bounds], np.r_[bounds, len(users)]
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
            user = int(users[a])
            if user == carry_user:
                carry.extend(tokens[a:b])
                continue
            if carry_user is not None:
                out.write(f"{carry_user} {' '.join(carry)}\n")
            carry_user, carry = user, tokens[a:b]
    if carry_user is not None:
        out.write(f"{carry_user} {' '.join(carry)}\n")
    if carry_user is None:
        raise DataError("no event left to write")
