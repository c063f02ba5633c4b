"""trioq's exceptions and the stable error codes carried by ERROR frames."""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    BAD_FRAME = "bad_frame"  # bytes that are not a frame, or not JSON
    TOO_LARGE = "too_large"  # frame, batch or payload over its limit
    UNKNOWN_MESSAGE = "unknown_message"  # a frame whose type trioq does not know
    INVALID_FIELD = "invalid_field"  # a known message with a wrong or missing field
    UNEXPECTED = "unexpected"  # a valid message at the wrong time (e.g. SUBMIT before HELLO)
    VERSION = "version"  # protocol version the broker does not speak
    UNKNOWN_TASK = "unknown_task"
    UNKNOWN_JOB = "unknown_job"
    INVALID_STATE = "invalid_state"  # e.g. retry of a job that is not dead
    FORBIDDEN = "forbidden"  # the session's role may not send this
    UNAUTHENTICATED = "unauthenticated"
    BUSY = "busy"  # the broker cannot accept this now (store failing, limits)
    TIMEOUT = "timeout"
    STALE = "stale"  # a report for an attempt that is no longer current
    TOO_MANY_ERRORS = "too_many_errors"  # the connection broke the rules too often and is closed
    SHUTTING_DOWN = "shutting_down"  # the broker is stopping: the request was not answered, retry after
    INTERNAL = "internal"


class TrioqError(Exception):
    """Base class of every error trioq raises to its users."""


class ProtocolError(TrioqError):
    """A peer broke the protocol; carries the code sent in the ERROR frame."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message


class RemoteError(TrioqError):
    """The broker refused a request with an ERROR frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ConnectError(TrioqError):
    """Could not reach the broker, or the TLS handshake failed."""


class ConnectionLost(TrioqError):
    """The connection to the broker ended while a request was waiting."""


class BrokerShuttingDown(ConnectionLost):
    """The broker stopped (SIGTERM, or ``Broker.shutdown``) before it answered.

    What it had acknowledged is stored: a job waited for is finished after the restart, and a
    request sent again then (a SUBMIT with an idempotency key, a wait) gets its answer.
    """


class JobNotFound(RemoteError):
    def __init__(self, job_id: str) -> None:
        super().__init__(ErrorCode.UNKNOWN_JOB.value, f"no job with id {job_id!r}")
        self.job_id = job_id


class StoreError(TrioqError):
    """The store could not write; nothing in the failed batch was acknowledged."""
