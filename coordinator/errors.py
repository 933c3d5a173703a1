"""The coordinator's exception hierarchy.

Each error carries a stable snake_case `code` that the HTTP edge turns into the
JSON error body, and the HTTP status class it belongs to, so the mapping from a
core's refusal to a response lives in one table here rather than in handlers.
"""

from __future__ import annotations


class CoordinatorError(Exception):
    """Base class: a request the cores refuse, with a machine-readable code."""

    code = "coordinator_error"
    http_status = 400

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidRequest(CoordinatorError):
    """The request is malformed or out of bounds (HTTP 400)."""

    code = "invalid_request"
    http_status = 400


class Unsatisfiable(CoordinatorError):
    """The request can never be placed on this cluster as it is (HTTP 400)."""

    code = "unsatisfiable"
    http_status = 400


class Forbidden(CoordinatorError):
    """The request is well formed but its caller may not ask for it, e.g. above its queue's priority ceiling (HTTP 403)."""

    code = "forbidden"
    http_status = 403


class NotFound(CoordinatorError):
    """An allocation or request id that the lease table does not know (HTTP 404)."""

    code = "not_found"
    http_status = 404


class Conflict(CoordinatorError):
    """The request clashes with current state, e.g. no capacity and queue=false (HTTP 409)."""

    code = "conflict"
    http_status = 409


class QueueFull(CoordinatorError):
    """The wait queue is at its bound; the caller should retry later (HTTP 503)."""

    code = "queue_full"
    http_status = 503


# How much of a caller's value an error message quotes: enough to recognise it, never
# a 5,000-character id (or a megabyte of JSON) echoed back.
MAX_QUOTED_CHARS = 64


def brief(text: str) -> str:
    """`text` cut to its first 64 characters plus "…" when longer, for quoting in a message."""
    return text if len(text) <= MAX_QUOTED_CHARS else text[:MAX_QUOTED_CHARS] + "…"
