"""The errors the project raises on purpose, for a user to read and act on.

    MQSAError                 the base; the CLI prints its message in one line and exits with
                              its ``exit_code``: 2 unless the class says otherwise
    ├── ConfigError           a setting is out of range or inconsistent (model, training,
    │                         export or service settings)
    ├── DataError             an input file is missing, malformed or in the way; the message
    │                         names the file and, where it applies, the line
    ├── ResumeError           ``last.pt`` is missing, unreadable or from other settings or data
    ├── PromotionRefused      exit 3: the quality gate refused a candidate bundle (``mqsa
    │                         promote``); the serving version is unchanged
    └── ServiceError          raised by the HTTP service; each carries its HTTP status
        ├── Unauthorized      401  a missing or wrong API key
        ├── Forbidden         403  a valid API key without the scope the route needs
        ├── NotFound          404  no such item (in the catalogue, or known to the model)
        ├── BundleRefused     409  /admin/reload: not a usable bundle (the old one keeps serving)
        ├── InferenceError    500  the encoder or the index failed on a request
        ├── BundleError       503  a bundle is missing, incomplete, corrupted or of an unknown format
        └── StoreUnavailable  503  Redis did not answer in time, refused or failed a command

Anything else that escapes (a ``RuntimeError`` from torch, a CUDA fault, a bug) is
not the user's mistake: the CLI lets it keep its traceback and exit 1.

Foreign errors are translated where the foreign call is made, with
``raise ... from exc`` (pydantic in ``service/settings.py``, Redis in
``service/store.py``, onnxruntime and FAISS in ``service/bundle.py``, torch's
loader in ``training/checkpoint.py``). This module imports nothing of the project's
(only the standard library), so every part (the model, the trainer, the service) can
share it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class MQSAError(Exception):
    """Base of every error the project raises for a user to fix."""

    exit_code = 2


class ConfigError(MQSAError, ValueError):
    """A setting is out of range or inconsistent; the message names the setting."""


class DataError(MQSAError, ValueError):
    """An input file is bad. The message names the file and, where it applies, the line."""

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None) -> None:
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)
        self.path = path
        self.line = line


class ResumeError(MQSAError, ValueError):
    """``last.pt`` is missing, unreadable or from a run with other settings or data."""


class PromotionRefused(MQSAError):
    """The candidate bundle did not pass the quality gate; the serving version is unchanged.

    Exit code 3, so a scheduled job can tell a refused night (the model was not good
    enough) from a broken one (exit 2: bad input; 1: a crash).
    """

    exit_code = 3


class ServiceError(MQSAError):
    """Base of the service's errors; ``status_code`` is the HTTP status it answers with.

    Args:
        message: what is wrong, for a person to read (the answer's ``detail``).
        fields: ``{"field", "message"}`` pairs naming the request's fields at fault (the
            answer's ``fields``), when the error is about some.
    """

    status_code = 500

    def __init__(self, message: str = "", fields: Sequence[dict[str, str]] = ()) -> None:
        super().__init__(message)
        self.fields = list(fields)


class Unauthorized(ServiceError):
    """The request needs an API key and carries none, or a wrong one."""

    status_code = 401


class Forbidden(ServiceError):
    """The request's API key is valid but lacks the scope the route needs."""

    status_code = 403


class NotFound(ServiceError):
    """The item asked about is not in the catalogue, or not known to the model."""

    status_code = 404


class BundleRefused(ServiceError):
    """A reload asked for a bundle that is not usable; the one loaded keeps serving."""

    status_code = 409


class InferenceError(ServiceError):
    """The encoder or the index failed on a request."""

    status_code = 500


class BundleError(ServiceError):
    """A bundle is missing, incomplete, corrupted or of an unknown format."""

    status_code = 503


class StoreUnavailable(ServiceError):
    """Redis, the history store, did not answer in time, refused or failed a command."""

    status_code = 503
