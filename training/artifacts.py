"""The files a run leaves behind, written so a crash never leaves half of one.

JSON and torch files are written beside their final path and renamed over it
(``os.replace`` is atomic on one file system); :func:`file_sha256` is the digest
the run records for its data and the bundle records for each of its files.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mqsa.errors import DataError


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn a failure to write ``path`` (no such folder, no permission, a full disk) into a DataError."""
    try:
        yield
    except OSError as exc:
        raise DataError(f"cannot write here: {exc.strerror or exc}", path) from exc


def file_sha256(path: str | Path) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: str | Path, payload: Any, indent: int | None = None) -> None:
    """Write JSON (UTF-8, a newline at the end) to a file beside ``path``, then move it into place."""
    write_text_atomic(path, json.dumps(payload, ensure_ascii=False, indent=indent) + "\n")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write UTF-8 text to a file beside ``path``, then move it into place."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def save_torch_atomic(payload: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` so that a crash mid-write leaves the previous file whole."""
    import torch  # lazily: `mqsa data` commands write JSON only and start faster without torch

    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    with writing(path):
        torch.save(payload, partial)
        os.replace(partial, path)
