"""Errors the engine side raises to its callers, as types that survive a Ray hop (they pickle with
their fields), so the HTTP layer maps them by type, never by parsing messages. Their messages are
short and client-safe: no actor ids, pids or addresses (those go to the logs)."""

from __future__ import annotations


class InvalidRequest(ValueError):
    """The engine cannot run this request as asked (HTTP 400). `field` names the input at fault in
    the engine's terms ("prompt", "max_tokens", "temperature", ...); `code` is a stable error code."""

    def __init__(self, field: str, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.field, self.code = field, code

    def __reduce__(self):
        return type(self), (self.field, str(self), self.code)


class EngineUnavailable(RuntimeError):
    """The engine side cannot serve this request now (starting, restarting, a lost process); a retry
    shortly may succeed (HTTP 503 with Retry-After). `retry_after_s`, when the engine knows it, is
    when to retry; `code` is a stable error code."""

    def __init__(
        self, message: str, retry_after_s: int | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.retry_after_s, self.code = retry_after_s, code

    def __reduce__(self):
        return type(self), (str(self), self.retry_after_s, self.code)


class EngineOverloaded(EngineUnavailable):
    """Refused on arrival: too many requests wait already, or the predicted wait is longer than the
    engine's bound (HTTP 429 with Retry-After: `retry_after_s`, from the measured drain rate)."""


class QueueTimeout(EngineUnavailable):
    """The request waited longer than the engine's queue timeout without starting; it was dropped and
    holds nothing (HTTP 503 with Retry-After: `retry_after_s`)."""


class TensorParallelFailure(EngineUnavailable):
    """A tensor-parallel rank is gone or stopped answering (a collective failed or ran past its
    timeout). The group cannot continue without it: the engine stops, and its replica is restarted
    with a new group."""
