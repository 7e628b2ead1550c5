from __future__ import annotations

import numpy as np
import pytest

from mqsa.errors import DataError
from mqsa.training.sequences import (
    left_pad,
    read_sequences,
    sequence_stats,
    split_leave_one_out,
    write_sequences,
)


def test_round_trip(tmp_path) -> None:
    seqs = [np.array([0, 1, 2, 3]), np.array([4, 4, 2])]
    write_sequences(tmp_path / "s.txt", seqs, ["a", "b"])
    data = read_sequences(tmp_path / "s.txt")
    assert data.user_ids == ["a", "b"] and data.num_items == 5
    assert [s.tolist() for s in data.sequences] == [[0, 1, 2, 3], [4, 4, 2]]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0 1 2 3\n1 4 x 6\n", ":2: 'x' is not an integer item index"),
        ("0 1 2 3\n1 4 2.5 6\n", ":2: '2.5' is not an integer item index"),
        ("0 1 2 3\n7\n", ":2: user '7' has no items"),
        ("0 1 -2 3\n", ":1: negative item index -2"),
        ("0 1 2 3\n1 3 4 5\n2 5\n", ":3: user '2' has 1 items; the leave-one-out split needs at least 3"),
        ("", ": the file holds no sequences"),
        ("\n\n", ": the file holds no sequences"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, text: str, message: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(DataError) as info:
        read_sequences(path)
    assert str(info.value).startswith(f"{path}{message}")


def test_index_out_of_vocabulary_and_missing_file(tmp_path) -> None:
    path = tmp_path / "s.txt"
    path.write_text("0 1 2 9\n")
    with pytest.raises(DataError, match=r"s\.txt:1: item index 9 is out of range for 5 items"):
        read_sequences(path, num_items=5)
    with pytest.raises(DataError, match=r"nope\.txt: no such file"):
        read_sequences(tmp_path / "nope.txt")


def test_leave_one_out_cuts_train_to_max_len() -> None:
    split = split_leave_one_out([np.arange(10), np.array([7, 8, 9])], max_len=4)
    assert [t.tolist() for t in split.train] == [[4, 5, 6, 7], [7]]
    assert split.valid.tolist() == [8, 8] and split.test.tolist() == [9, 9]


def test_left_pad() -> None:
    out = left_pad([np.array([1, 2, 3, 4, 5]), np.array([6]), np.array([], dtype=np.int64)], 3, 99)
    assert out.tolist() == [[3, 4, 5], [99, 99, 6], [99, 99, 99]]
    assert out.dtype == np.int64


def test_beauty_matches_its_readme(shared_data) -> None:
    """The benchmark file reads cleanly and has the README's counts."""
    stats = sequence_stats(read_sequences(shared_data / "beauty.txt"))
    assert (stats["users"], stats["items"], stats["actions"]) == (22363, 12101, 198502)
    assert stats["avg_length"] == pytest.approx(8.88, abs=0.005)
