"""Every message on the wire: an attrs class, tagged by ``t``, coded by one converter.

A frame body is a JSON object ``{"t": "<type>", ...fields}``. Unknown keys are
ignored (forward compatibility); a missing or mistyped field is ``invalid_field``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import cattrs
import orjson
from cattrs.preconf.orjson import make_converter

from ..errors import ErrorCode, ProtocolError
from ..job import ErrorInfo, Job, JobSpec, JobState, Progress

PROTOCOL_VERSION = 1

ROLES = ("producer", "worker", "admin")


@attrs.define(slots=True)
class Message:
    TYPE: ClassVar[str] = ""


_REGISTRY: dict[str, type[Message]] = {}


def message(tag: str):
    """Register an attrs message class under its wire tag."""

    def wrap(cls):
        cls = attrs.define(slots=True)(cls)
        cls.TYPE = tag
        _REGISTRY[tag] = cls
        return cls

    return wrap


# --- handshake ---------------------------------------------------------------


@attrs.define(slots=True)
class TaskDefaults:
    """Per-task defaults a worker announces; a submit's own values win."""

    max_attempts: int | None = None
    timeout: float | None = None


@message("hello")
class Hello(Message):
    version: int
    role: str
    name: str = ""
    token: str | None = None
    # workers only
    concurrency: int = 0
    tasks: list[str] = attrs.Factory(list)
    queues: list[str] = attrs.Factory(list)
    defaults: dict[str, TaskDefaults] = attrs.Factory(dict)


@message("welcome")
class Welcome(Message):
    version: int
    session: str
    role: str
    heartbeat_interval: float
    heartbeat_timeout: float
    max_frame: int
    max_batch: int


@message("error")
class Error(Message):
    code: str
    message: str
    req: int | None = None
    fatal: bool = False


@message("heartbeat")
class Heartbeat(Message):
    pass


# --- producer -> broker ------------------------------------------------------


@message("submit")
class Submit(Message):
    req: int
    jobs: list[JobSpec]


@message("ack")
class Ack(Message):
    req: int
    ids: list[str]
    existing: list[bool] = attrs.Factory(list)  # True where an idempotency key matched


@message("get")
class GetJob(Message):
    req: int
    id: str


@message("list")
class ListJobs(Message):
    req: int
    state: str | None = None
    queue: str | None = None
    task: str | None = None
    limit: int = 50
    cursor: int | None = None


@message("wait")
class WaitJob(Message):
    """Ask to be told when a job ends; answered by JOB when it is terminal."""

    req: int
    id: str


@message("cancel")
class CancelJob(Message):
    req: int
    id: str


@message("retry")
class RetryJob(Message):
    req: int
    id: str


@message("discard")
class DiscardJob(Message):
    req: int
    id: str


@message("status")
class StatusRequest(Message):
    req: int


@message("job")
class JobReply(Message):
    req: int
    job: Job


@message("jobs")
class JobsReply(Message):
    req: int
    jobs: list[Job]
    next_cursor: int | None = None


@message("status_reply")
class StatusReply(Message):
    req: int
    stats: dict[str, Any]


# --- broker <-> worker ----------------------------------------------------------


@attrs.define(slots=True)
class Delivery:
    id: str
    attempt: int
    task: str
    payload: Any
    queue: str
    priority: int
    timeout: float | None = None


@message("dispatch")
class Dispatch(Message):
    jobs: list[Delivery]


@attrs.define(slots=True)
class Outcome:
    id: str
    attempt: int
    ok: bool
    result: Any = None
    error: ErrorInfo | None = None


@message("result")
class Result(Message):
    outcomes: list[Outcome]


@message("progress")
class ProgressReport(Message):
    id: str
    attempt: int
    progress: Progress


@message("release")
class Release(Message):
    """The worker hands jobs back unrun or interrupted (graceful stop)."""

    ids: list[str]
    attempts: list[int]


@message("drain")
class Drain(Message):
    """The worker takes no new jobs (it is stopping); sent by worker or broker."""

    stop: bool = False  # from the broker: True = hand back what you hold, then exit


@message("abort")
class Abort(Message):
    """Broker -> worker: cancel this attempt (the job was cancelled or timed out)."""

    id: str
    attempt: int
    reason: str = "cancelled"


def _strict_int(v: Any, _: Any) -> int:
    if type(v) is not int:
        raise TypeError(f"expected an integer, got {type(v).__name__}")
    return v


def _strict_float(v: Any, _: Any) -> float:
    if type(v) is float or type(v) is int:
        return float(v)
    raise TypeError(f"expected a number, got {type(v).__name__}")


def _strict_str(v: Any, _: Any) -> str:
    if type(v) is not str:
        raise TypeError(f"expected a string, got {type(v).__name__}")
    return v


def _strict_bool(v: Any, _: Any) -> bool:
    if type(v) is not bool:
        raise TypeError(f"expected true or false, got {type(v).__name__}")
    return v


def _make_converter() -> cattrs.Converter:
    conv = make_converter(forbid_extra_keys=False)
    # Strict scalars: "3" is not an int and 1 is not a string on this wire.
    conv.register_structure_hook(int, _strict_int)
    conv.register_structure_hook(float, _strict_float)
    conv.register_structure_hook(str, _strict_str)
    conv.register_structure_hook(bool, _strict_bool)
    conv.register_unstructure_hook(JobState, lambda s: s.value)
    conv.register_structure_hook(JobState, lambda v, _: JobState(v))
    return conv


converter = _make_converter()

# The hot messages skip Message.TYPE lookups by prebinding their functions.
_unstructure_by_type = {
    cls: converter.get_unstructure_hook(cls) for cls in _REGISTRY.values()
}
_structure_by_tag = {
    tag: (cls, converter.get_structure_hook(cls)) for tag, cls in _REGISTRY.items()
}


def encode(msg: Message) -> bytes:
    d = _unstructure_by_type[type(msg)](msg)
    d["t"] = msg.TYPE
    return orjson.dumps(d)


def decode(body: bytes | bytearray | memoryview) -> Message:
    """Decode one frame body, raising ProtocolError with the code to send back."""
    try:
        d = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"frame body is not JSON: {exc}") from None
    if not isinstance(d, dict):
        raise ProtocolError(ErrorCode.BAD_FRAME, "frame body must be a JSON object")
    tag = d.pop("t", None)
    entry = _structure_by_tag.get(tag) if isinstance(tag, str) else None
    if entry is None:
        raise ProtocolError(ErrorCode.UNKNOWN_MESSAGE, f"unknown message type {tag!r}")
    cls, hook = entry
    try:
        return hook(d, cls)
    except Exception as exc:  # cattrs raises ClassValidationError (an ExceptionGroup) and more
        raise ProtocolError(
            ErrorCode.INVALID_FIELD, f"invalid {tag!r} message: {describe_structure_error(exc)}"
        ) from None


def describe_structure_error(exc: BaseException) -> str:
    """One line for a cattrs error tree, naming the fields that were wrong."""
    if isinstance(exc, cattrs.BaseValidationError):
        try:
            notes = cattrs.transform_error(exc)
        except Exception:
            notes = []
        if notes:
            return "; ".join(notes[:5])
    return f"{type(exc).__name__}: {exc}"
