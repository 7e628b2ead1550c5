"""Versions of the serving bundle under one root, and the atomic switch between them.

    ROOT/
      versions/<model_version>/   one bundle per version (``mqsa export``'s layout), never changed
      current -> versions/<v>      a relative symbolic link: what the service loads
                                   (``MQSA_BUNDLE_DIR=ROOT/current``)
      history.json                 every promotion, refusal and rollback, oldest first
      .lock                        held (flock) by the promote or rollback that is running

``current`` is switched by creating a new link beside it and renaming it over the old
one (``os.replace``: atomic on one file system), so a reader sees the old version or
the new one, never neither. The service's loader follows the link once per load
(``load_bundle`` resolves it first), so a switch during a load cannot mix two versions'
files, and its watch reads ``current/manifest.json`` through the link every poll.

A version directory appears by a copy to a hidden sibling renamed into place, so a
half-copied version is never listed. Old versions are pruned to the last K (by when
they last served), never the current one or the one a rollback would return to.
No torch here: ``mqsa rollback`` and ``mqsa versions`` run in the service image.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mqsa.errors import BundleError, ConfigError, DataError
from mqsa.service.bundle import verify_bundle

CURRENT = "current"
VERSIONS = "versions"
HISTORY = "history.json"
LOCK = ".lock"
SWITCHES = ("promote", "rollback", "adopt")  # history actions that change what `current` names
MIN_KEEP = 2  # the current version and the one a rollback returns to


def now() -> str:
    """The time, for the history: ISO-8601 UTC to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def open_root(root: str | Path) -> Path:
    """An existing bundle root, with its ``versions/`` folder.

    Raises:
        DataError: the root is missing or not a directory, or cannot be written.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError("no such bundle root (a directory holding versions/ and current)", root)
    try:
        (root / VERSIONS).mkdir(exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot write here: {exc.strerror or exc}", root / VERSIONS) from exc
    return root


@contextlib.contextmanager
def locked(root: Path) -> Iterator[None]:
    """Hold ``ROOT/.lock`` for one promote or rollback; another one running is an error.

    A plain ``current`` directory (what ``mqsa export --out ROOT/current`` wrote before
    versions) is adopted as a version first, under the lock.
    """
    import fcntl  # POSIX only: imported here so the module still imports elsewhere

    try:
        f = open(root / LOCK, "a")  # noqa: SIM115 (closed below, after the body)
    except OSError as exc:
        raise DataError(f"cannot write here: {exc.strerror or exc}", root / LOCK) from exc
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(
                "another promote or rollback is running (it holds the lock)", root / LOCK
            ) from None
        try:
            if (root / CURRENT).is_dir() and not (root / CURRENT).is_symlink():
                _adopt(root)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_json_atomic(path: Path, payload: Any) -> None:
    """JSON to a file beside ``path``, flushed to disk, then renamed over it.

    An intentional copy of ``mqsa.training.artifacts.write_json_atomic`` (the service
    never imports the trainer), with an fsync: the history must survive a crash.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f, ensure_ascii=False, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from other readers
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_history(root: Path) -> list[dict[str, Any]]:
    """The entries of ``history.json``, oldest first (none when it does not exist yet).

    Raises:
        DataError: the file is not a history.
    """
    path = root / HISTORY
    if not path.exists():
        return []
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["entries"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"not a readable history ({exc})", path) from exc
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise DataError("not a readable history (entries must be a list of objects)", path)
    return entries


def record(root: Path, action: str, version: str | None, **details: Any) -> dict[str, Any]:
    """Append one entry (``time``, ``action``, ``version`` and ``details``) to the history."""
    entry = {"time": now(), "action": action, "version": version, **details}
    write_json_atomic(root / HISTORY, {"format": 1, "entries": [*read_history(root), entry]})
    return entry


def current_version(root: Path) -> str | None:
    """The version ``ROOT/current`` names, or None when nothing is current yet.

    Raises:
        DataError: ``current`` is not a link into ``versions/``.
    """
    link = root / CURRENT
    if not link.is_symlink():
        if link.exists():
            raise DataError("not a link to versions/<model_version> (`mqsa promote` adopts a bundle)", link)
        return None
    target = Path(os.readlink(link))
    if target.parent != Path(VERSIONS) or not (root / target).is_dir():
        raise DataError(f"links to {target}, not to an existing versions/<model_version>", link)
    return target.name


def version_dir(root: Path, version: str) -> Path:
    return root / VERSIONS / version


def add_version(root: Path, bundle_dir: str | Path, hmac_key: str | None = None) -> str:
    """Copy a verified bundle to ``versions/<model_version>`` (kept if already there); its version.

    Raises:
        BundleError: the bundle (or a copy already there) fails verification.
        DataError: the copy cannot be written.
    """
    version = str(verify_bundle(bundle_dir, hmac_key)["model_version"])
    target = version_dir(root, version)
    if target.exists():
        verify_bundle(target, hmac_key)
        return version
    tmp = root / VERSIONS / f".{version}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(bundle_dir, tmp, symlinks=False)
        verify_bundle(tmp, hmac_key)  # what was copied is what was verified
        os.rename(tmp, target)
    except OSError as exc:
        raise DataError(f"cannot copy the bundle here: {exc.strerror or exc}", target) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return version


def switch(root: Path, version: str) -> None:
    """Point ``ROOT/current`` at ``versions/<version>`` atomically (a new link renamed over the old)."""
    if not version_dir(root, version).is_dir():
        raise DataError(f"no version {version} to switch to", version_dir(root, version))
    tmp = root / f".{CURRENT}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        os.symlink(Path(VERSIONS) / version, tmp)  # relative: the root may be mounted anywhere
        os.replace(tmp, root / CURRENT)
        _sync_dir(root)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot switch current: {exc.strerror or exc}", root / CURRENT) from exc


def _sync_dir(path: Path) -> None:
    """Flush a directory's entries (the rename) to disk, where the platform allows."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def previous_version(root: Path, current: str | None = None) -> str | None:
    """The version a rollback returns to: the one serving before ``current`` (default: the
    current version) was last promoted. Rollbacks walk back one promotion at a time."""
    current = current_version(root) if current is None else current
    for entry in reversed(read_history(root)):
        if entry.get("action") in ("promote", "adopt") and entry.get("version") == current:
            return entry.get("from")
    return None


def rollback(root: str | Path, hmac_key: str | None = None) -> tuple[str, str]:
    """Switch ``current`` back to the previous version; returns (from, to).

    Raises:
        DataError: no root, nothing current, no previous version (or it was removed).
        BundleError: the previous version fails verification (``current`` is left as it was).
    """
    root = open_root(root)
    with locked(root):
        current = current_version(root)
        if current is None:
            raise DataError("nothing is current yet: nothing to roll back", root / CURRENT)
        previous = previous_version(root, current)
        if previous is None:
            raise DataError(f"no version before {current} in the history: nothing to roll back to", root)
        if not version_dir(root, previous).is_dir():
            raise DataError(f"the previous version {previous} is no longer kept", version_dir(root, previous))
        verify_bundle(version_dir(root, previous), hmac_key)
        switch(root, previous)
        record(root, "rollback", previous, **{"from": current})
    return current, previous


def last_served(root: Path) -> dict[str, tuple[int, str]]:
    """Each version's last time as current: (its place in the history, the time)."""
    served: dict[str, tuple[int, str]] = {}
    for place, entry in enumerate(read_history(root)):
        if entry.get("action") in SWITCHES and entry.get("version"):
            served[entry["version"]] = (place, str(entry.get("time")))
    return served


def prune(root: Path, keep: int) -> list[str]:
    """Remove all but the ``keep`` versions that served last; never the current one or the
    one a rollback returns to. Returns the versions removed.

    Raises:
        ConfigError: ``keep`` below 2.
    """
    if keep < MIN_KEEP:
        raise ConfigError(f"--keep must be at least {MIN_KEEP} (the current version and the previous one)")
    current = current_version(root)
    protected = {current, previous_version(root, current)}
    served = last_served(root)
    names = [p.name for p in (root / VERSIONS).iterdir() if p.is_dir() and not p.name.startswith(".")]
    names.sort(key=lambda v: (served.get(v, (-1, ""))[0], _mtime(version_dir(root, v))), reverse=True)
    removed = [v for v in names[keep:] if v not in protected]
    for version in removed:
        trash = root / VERSIONS / f".{version}.removed-{uuid.uuid4().hex[:8]}"
        os.rename(version_dir(root, version), trash)  # gone from the listing at once
        shutil.rmtree(trash, ignore_errors=True)
    return removed


def _mtime(path: Path) -> float:
    with contextlib.suppress(OSError):
        return path.stat().st_mtime
    return 0.0


def list_versions(root: str | Path) -> list[dict[str, Any]]:
    """The versions kept, most recently served first: version, created_at, last_served, role."""
    root = open_root(root)
    current = current_version(root)
    previous = previous_version(root, current) if current else None
    served = last_served(root)
    rows: list[dict[str, Any]] = []
    order: list[tuple[int, str]] = []
    for path in (root / VERSIONS).iterdir():
        if not path.is_dir() or path.name.startswith("."):
            continue
        try:
            created = json.loads((path / "manifest.json").read_text(encoding="utf-8")).get("created_at")
        except (OSError, ValueError):
            created = None
        role = {current: "current", previous: "previous"}.get(path.name, "")
        place, time = served.get(path.name, (-1, None))
        rows.append({"version": path.name, "created_at": created, "last_served": time, "role": role})
        order.append((place, created or ""))
    return [row for _, row in sorted(zip(order, rows, strict=True), key=lambda p: p[0], reverse=True)]


def _adopt(root: Path) -> None:
    """Turn a plain ``current`` directory into ``versions/<its version>`` and a link to it.

    The one step that is not atomic: between the rename and the link (microseconds)
    ``current`` does not exist; the service's watch skips a poll that finds no manifest.
    """
    link = root / CURRENT
    try:
        version = str(verify_bundle(link)["model_version"])
    except BundleError as exc:
        raise DataError(
            f"is a directory but not a usable bundle, so it cannot be adopted ({exc})", link
        ) from exc
    target = version_dir(root, version)
    if target.exists():
        old = root / f".{CURRENT}.old-{uuid.uuid4().hex[:8]}"
        os.rename(link, old)
        switch(root, version)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(link, target)
        switch(root, version)
    record(root, "adopt", version, **{"from": None})
