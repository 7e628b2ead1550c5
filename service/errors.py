"""The service's one exception hierarchy; every error carries its HTTP status.

Errors from onnxruntime, FAISS and (later) Redis are translated into these
where they are called, with ``raise ... from exc``.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error the service raises on purpose."""

    status_code = 500


class BundleError(ServiceError):
    """A bundle is missing, incomplete, corrupted or of an unknown format."""

    status_code = 503


class InferenceError(ServiceError):
    """The encoder or the index failed on a request."""

    status_code = 500


class StoreUnavailable(ServiceError):
    """Redis, the history store, did not answer in time, refused or failed a command."""

    status_code = 503
