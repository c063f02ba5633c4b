"""Every message on the wire: an attrs class, tagged by ``t``, coded by one converter.

A frame body is a JSON object ``{"t": "<type>", ...fields}``. Unknown keys are
ignored (forward compatibility); a missing or mistyped field is ``invalid_field``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import cattrs
import orjson
from cattrs.fns import identity
from cattrs.preconf.orjson import make_converter

from ..errors import ErrorCode, ProtocolError
from ..job import DEFAULT_PRIORITY, DEFAULT_QUEUE, ErrorInfo, Job, JobSpec, JobState, Progress

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
    #: the broker answers a SUBMIT with ``wait`` (older brokers do not say so, and do not)
    submit_wait: bool = False
    #: the broker ends a WAIT after its ``timeout`` (older brokers do not take the field)
    wait_timeout: bool = False


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
    #: one job, answered with its final state (JOB) instead of an ACK: submit and wait in one trip
    wait: bool = False
    #: with ``wait``: seconds after which the wait ends with ERROR ``timeout`` (the job goes on)
    wait_timeout: float | None = None


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
    """Ask to be told when a job ends; answered by JOB when it is terminal, or by ERROR
    ``timeout`` after ``timeout`` seconds (a wait a client gave up on ends on the broker too)."""

    req: int
    id: str
    timeout: float | None = None


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


@message("pause")
class PauseQueue(Message):
    """Admin: stop (or, with ``paused`` false, restart) dispatching a queue; its jobs stay queued."""

    req: int
    queue: str
    paused: bool = True


@message("queue")
class QueueReply(Message):
    req: int
    queue: str
    paused: bool


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
    # Payloads and results are JSON already: pass them through as they are.
    conv.register_unstructure_hook_func(lambda t: t is Any, identity)
    conv.register_unstructure_hook(JobState, lambda s: s.value)
    conv.register_structure_hook(JobState, lambda v, _: JobState(v))
    return conv


converter = _make_converter()


# --- hand-written hooks for the frames on the hot path -------------------------------------------
# Generic hooks cost several microseconds a job (Any fields unstructured by runtime type, one strict
# check call per field); these do the same checks inline. Errors name the field like cattrs does.


class FieldError(ValueError):
    """A wrong or missing field, with its JSON path."""


def _need(d: Any, path: str) -> dict:
    if type(d) is not dict:
        raise FieldError(f"expected an object @ {path}")
    return d


def _str(d: dict, key: str, path: str, default: Any = ...) -> Any:
    v = d.get(key, default)
    if v is ...:
        raise FieldError(f"required field missing @ {path}.{key}")
    if type(v) is not str and not (v is None and default is None):
        raise FieldError(f"invalid value for type, expected str @ {path}.{key}")
    return v


def _int(d: dict, key: str, path: str, default: Any = ...) -> Any:
    v = d.get(key, default)
    if v is ...:
        raise FieldError(f"required field missing @ {path}.{key}")
    if type(v) is not int and not (v is None and default is None):
        raise FieldError(f"invalid value for type, expected int @ {path}.{key}")
    return v


def _num(d: dict, key: str, path: str) -> float | None:
    v = d.get(key)
    if v is None:
        return None
    if type(v) is float or type(v) is int:
        return float(v)
    raise FieldError(f"invalid value for type, expected a number @ {path}.{key}")


def _structure_jobspec(d: Any, path: str) -> JobSpec:
    d = _need(d, path)
    # Most jobs name a task and perhaps a payload, every option at its default (the client
    # leaves defaults out): no per-field checks to make then. A third of a no-op job's decoding.
    if len(d) == 1 or (len(d) == 2 and "payload" in d):
        task = d.get("task")
        if type(task) is str:
            return JobSpec(task, d.get("payload", {}))
    return _structure_jobspec_fields(d, path)


def _structure_jobspec_fields(d: dict, path: str) -> JobSpec:
    return JobSpec(
        _str(d, "task", path),
        d.get("payload", {}),
        _int(d, "priority", path, 5),
        _str(d, "queue", path, "default"),
        _num(d, "delay", path),
        _num(d, "run_at", path),
        _int(d, "max_attempts", path, None),
        _num(d, "timeout", path),
        _str(d, "idempotency_key", path, None),
    )


def _structure_submit(d: dict, _: Any) -> Submit:
    jobs = d.get("jobs")
    if type(jobs) is not list:
        raise FieldError("invalid value for type, expected a list @ $.jobs")
    try:
        specs = [_structure_jobspec(j, "$.jobs[]") for j in jobs]
    except FieldError:
        for i, j in enumerate(jobs):  # again, to name the job: errors are rare, paths per job are not free
            _structure_jobspec(j, f"$.jobs[{i}]")
        raise
    wait = d.get("wait", False)
    if type(wait) is not bool:
        raise FieldError("invalid value for type, expected a bool @ $.wait")
    return Submit(_int(d, "req", "$"), specs, wait, _num(d, "wait_timeout", "$"))


def _unstructure_jobspec(j: JobSpec) -> dict:
    """Only what differs from the defaults: a batch of small jobs is a third of the bytes to parse."""
    d: dict[str, Any] = {"task": j.task}
    if type(j.payload) is not dict or j.payload:  # {} is the default
        d["payload"] = j.payload
    if j.priority != DEFAULT_PRIORITY:
        d["priority"] = j.priority
    if j.queue != DEFAULT_QUEUE:
        d["queue"] = j.queue
    for name in ("delay", "run_at", "max_attempts", "timeout", "idempotency_key"):
        v = getattr(j, name)
        if v is not None:
            d[name] = v
    return d


def _unstructure_submit(m: Submit) -> dict:
    d = {"req": m.req, "jobs": [_unstructure_jobspec(j) for j in m.jobs]}
    if m.wait:
        d["wait"] = True
    if m.wait_timeout is not None:
        d["wait_timeout"] = m.wait_timeout
    return d


def _structure_ack(d: dict, _: Any) -> Ack:
    ids = d.get("ids")
    if type(ids) is not list or any(type(i) is not str for i in ids):
        raise FieldError("invalid value for type, expected a list of strings @ $.ids")
    existing = d.get("existing", [])
    if type(existing) is not list:
        raise FieldError("invalid value for type, expected a list @ $.existing")
    return Ack(_int(d, "req", "$"), ids, existing)


def _unstructure_ack(m: Ack) -> dict:
    return {"req": m.req, "ids": m.ids, "existing": m.existing}


def _unstructure_dispatch(m: Dispatch) -> dict:
    return {
        "jobs": [
            {
                "id": j.id, "attempt": j.attempt, "task": j.task, "payload": j.payload,
                "queue": j.queue, "priority": j.priority, "timeout": j.timeout,
            }
            for j in m.jobs
        ]
    }


def _structure_dispatch(d: dict, _: Any) -> Dispatch:
    jobs = d.get("jobs")
    if type(jobs) is not list:
        raise FieldError("invalid value for type, expected a list @ $.jobs")
    out = []
    for i, j in enumerate(jobs):
        path = f"$.jobs[{i}]"
        j = _need(j, path)
        out.append(Delivery(
            _str(j, "id", path), _int(j, "attempt", path), _str(j, "task", path), j.get("payload"),
            _str(j, "queue", path, "default"), _int(j, "priority", path, 5), _num(j, "timeout", path),
        ))
    return Dispatch(out)


def _unstructure_result(m: Result) -> dict:
    unerr = converter.get_unstructure_hook(ErrorInfo)
    return {
        "outcomes": [
            {
                "id": o.id, "attempt": o.attempt, "ok": o.ok, "result": o.result,
                "error": None if o.error is None else unerr(o.error),
            }
            for o in m.outcomes
        ]
    }


def _structure_result(d: dict, _: Any) -> Result:
    items = d.get("outcomes")
    if type(items) is not list:
        raise FieldError("invalid value for type, expected a list @ $.outcomes")
    out = []
    for i, o in enumerate(items):
        path = f"$.outcomes[{i}]"
        o = _need(o, path)
        ok = o.get("ok")
        if type(ok) is not bool:
            raise FieldError(f"invalid value for type, expected true or false @ {path}.ok")
        err = o.get("error")
        if err is not None:
            try:
                err = converter.structure(err, ErrorInfo)
            except Exception as exc:
                raise FieldError(f"{describe_structure_error(exc)} @ {path}.error") from None
        out.append(Outcome(_str(o, "id", path), _int(o, "attempt", path), ok, o.get("result"), err))
    return Result(out)


for _cls, _un, _st in (
    (Submit, _unstructure_submit, _structure_submit),
    (Ack, _unstructure_ack, _structure_ack),
    (Dispatch, _unstructure_dispatch, _structure_dispatch),
    (Result, _unstructure_result, _structure_result),
):
    converter.register_unstructure_hook(_cls, _un)
    converter.register_structure_hook(_cls, _st)

# The hot messages skip Message.TYPE lookups by prebinding their functions.
_unstructure_by_type = {
    cls: converter.get_unstructure_hook(cls) for cls in _REGISTRY.values()
}
_structure_by_tag = {
    tag: (cls, converter.get_structure_hook(cls)) for tag, cls in _REGISTRY.items()
}


#: orjson reads 1024 levels of nesting but writes only 253, and frames wrap a value in 3 more:
#: a payload or result must fit in every frame that will carry it (dispatch, replies, the store).
MAX_PAYLOAD_DEPTH = 249


def fits_in_frames(value: Any) -> bool:
    """Whether a decoded payload or result can be written back out in any frame or row."""
    if (type(value) is not dict and type(value) is not list) or not value:
        return True  # a scalar, or an empty container: no deeper than the frame around it
    try:
        orjson.dumps([[[[value]]]])  # 4 levels of margin for the frames around it
    except TypeError:
        return False
    return True


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
    if isinstance(exc, FieldError):
        return str(exc)
    if isinstance(exc, cattrs.BaseValidationError):
        try:
            notes = cattrs.transform_error(exc)
        except Exception:
            notes = []
        if notes:
            return "; ".join(notes[:5])
    return f"{type(exc).__name__}: {exc}"
