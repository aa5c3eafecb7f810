"""Value objects: tasks, results, events, statistics and the retry policy."""

from __future__ import annotations

import collections
import enum
import functools
import importlib
import inspect
import math
import operator
import pickle
import random
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeGuard

from ._errors import (
    ConfigurationError,
    RemoteTraceback,
    TaskCancelledError,
    TaskCrashedError,
    TaskDefinitionError,
    TaskError,
    TaskFailedError,
    TaskTimeoutError,
)

__all__ = [
    "FINAL_STATUSES",
    "FINAL_STATUS_VALUES",
    "Attempt",
    "Event",
    "Outcome",
    "RetryPolicy",
    "Stats",
    "Status",
    "Summary",
    "Task",
    "TaskFinished",
    "TaskReported",
    "TaskResult",
    "TaskRetried",
    "TaskStarted",
]


class Status(enum.StrEnum):
    """Where a task stands. A ``str`` enum: ``Status.COMPLETED == "completed"``."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CRASHED = "crashed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self not in (Status.PENDING, Status.RUNNING)


FINAL_STATUSES = (Status.COMPLETED, Status.FAILED, Status.TIMED_OUT, Status.CRASHED, Status.CANCELLED)
FINAL_STATUS_VALUES = [status.value for status in FINAL_STATUSES]
"""What a query by status may ask for (a store keeps final results only)."""


_SENDABLE: set[Callable[..., Any]] = set()
"""Module-level functions already checked (at most 1024): a million tasks of one function check it once."""


def _check_sendable(fn: Callable[..., Any]) -> None:
    """Refuse, at submission, functions a worker process could never load."""
    plain = type(fn) is types.FunctionType
    if plain and fn in _SENDABLE:
        return
    _check_callable(fn)
    if plain:
        if len(_SENDABLE) >= 1024:
            _SENDABLE.clear()
        _SENDABLE.add(fn)


def _check_callable(fn: Callable[..., Any]) -> None:
    if not callable(fn):
        raise TaskDefinitionError(f"a Task needs a callable, got {type(fn).__name__} {fn!r}")
    while isinstance(fn, functools.partial):
        fn = fn.func
    if isinstance(fn, types.MethodType) and isinstance(fn.__func__, types.FunctionType):
        fn = fn.__func__  # a method is loaded through its class, by name too
    if isinstance(fn, types.FunctionType) and "<" in fn.__qualname__:
        if fn.__name__ == "<lambda>":
            what = "a lambda"
        elif "." in fn.__qualname__.rsplit("<locals>.", 1)[-1]:
            what = "a method of a class defined inside a function"
        else:
            what = "a nested function"
        raise TaskDefinitionError(
            f"{fn.__module__}.{fn.__qualname__} is {what}; a worker process can only load functions "
            "by name: define it at module level (use functools.partial to bind arguments)"
        )
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        raise TaskDefinitionError(
            f"{fn.__module__}.{fn.__qualname__} is an async function, and a worker runs no event loop: pass a "
            "plain function that calls it with asyncio.run(), or await it in your own loop")
    if inspect.isgeneratorfunction(fn):
        raise TaskDefinitionError(
            f"{fn.__module__}.{fn.__qualname__} is a generator function: what it returns, a generator, cannot be "
            "sent back from a worker; pass a plain function that returns a list of what it yields")


class Task:
    """One call to run in a worker: ``Task(fn, *args, key=None, timeout=None, retries=None)``.

    ``fn`` must be loadable by name in another process: a module-level function,
    a builtin, or a ``functools.partial`` of one (that is how keyword arguments
    are passed). ``key`` identifies the task in its batch (default: its position,
    as a string) and must be unique there: a duplicate is not detected, and the
    store keeps one result per key; ``timeout`` (seconds) and ``retries`` override the scheduler's
    defaults (``timeout=math.inf``: none for this task). A Task holds no state of a run, so one list of tasks can be run
    several times.
    """

    __slots__ = ("args", "fn", "key", "retries", "timeout")

    def __init__(
        self,
        fn: Callable[..., Any],
        /,
        *args: Any,
        key: str | int | None = None,
        timeout: float | None = None,
        retries: int | None = None,
    ) -> None:
        _check_sendable(fn)
        if timeout is not None and not ((is_seconds(timeout) and timeout > 0) or timeout == math.inf):
            raise TaskDefinitionError(f"timeout must be a positive number of seconds, or math.inf for none (the "
                                      f"scheduler's timeout then does not apply), got {timeout!r}")
        if retries is not None and not (is_int(retries) and retries >= 0):
            raise TaskDefinitionError(f"retries must be a non-negative int, got {retries!r}")
        self.fn = fn
        self.args = args
        self.key = None if key is None else str(key)
        self.timeout = timeout
        self.retries = retries

    def __repr__(self) -> str:
        name = getattr(self.fn, "__qualname__", repr(self.fn))
        return f"Task({name}, *{self.args!r}, key={self.key!r})"


def describe(value: Any, show: Callable[[Any], str] = repr) -> str:
    """``show(value)``, or what the value is when that fails (an int past str()'s digit limit, a broken
    ``__repr__``); never raises."""
    try:
        return show(value)
    except Exception as exc:
        if isinstance(value, int) and isinstance(exc, ValueError):
            return f"<int of {value.bit_length()} bits, too long to show>"
        return f"<{type(value).__name__} object: {show.__name__}() failed: {type(exc).__name__}>"


def no_json_constant(name: str) -> NoReturn:
    """``json.loads(..., parse_constant=no_json_constant)`` refuses NaN and Infinity, which Python reads and JSON
    has not."""
    raise ValueError(f"{name} is not JSON")


def finite_json_float(text: str) -> float:
    """``json.loads(..., parse_float=finite_json_float)`` refuses a number past a float's range (``1e400``), which
    Python reads as infinity."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is past the range of a float")
    return value


def task_from_json(fn: Callable[..., Any], value: Any, *, key: str | int | None = None,
                   timeout: float | None = None, retries: int | None = None) -> Task:
    """The task for one JSON input (a line of ``asyncsched run``, an input of the web API): an array
    gives positional arguments, an object keyword arguments, and any other value is the single argument."""
    if isinstance(value, list):
        return Task(fn, *value, key=key, timeout=timeout, retries=retries)
    if isinstance(value, dict):
        return Task(functools.partial(fn, **value), key=key, timeout=timeout, retries=retries)
    return Task(fn, value, key=key, timeout=timeout, retries=retries)


@dataclass(slots=True)
class Attempt:
    """One attempt of one task, as handed to a backend."""

    batch_id: str
    key: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    timeout: float | None
    number: int = 1


@dataclass(slots=True)
class Outcome:
    """How one attempt ended, as a backend reports it.

    ``retryable=False`` marks a failure that another attempt would only
    repeat (an argument that cannot be pickled): it is never retried.
    """

    status: Status
    value: Any = None
    error: str | None = None
    traceback: str | None = None
    exception: BaseException | None = None
    error_type: str | None = None
    pid: int | None = None
    started_at: float | None = None
    finished_at: float | None = None
    retryable: bool = True

    @classmethod
    def from_error(
        cls, info: tuple[str, str, str, bytes | None], *, status: Status = Status.FAILED, **kw: Any
    ) -> Outcome:
        """Build a failed outcome from a worker's ``ErrorInfo``, rebuilding the exception."""
        name, text, tb, blob = info
        exc: BaseException | None = None
        if blob is not None:
            try:
                exc = pickle.loads(blob)
            except BaseException:  # a reducer may raise anything, SystemExit and KeyboardInterrupt too
                exc = None
            if isinstance(exc, BaseException):
                exc.__cause__ = RemoteTraceback(tb)
            else:
                exc = None
        return cls(status, error=text, traceback=tb, exception=exc, error_type=name, **kw)


_RAISES: dict[Status, type[TaskError]] = {
    Status.FAILED: TaskFailedError,
    Status.TIMED_OUT: TaskTimeoutError,
    Status.CRASHED: TaskCrashedError,
    Status.CANCELLED: TaskCancelledError,
}


def task_error(status: Status, key: str | None, error: str | None, traceback: str | None = None) -> TaskError:
    """The :class:`TaskError` that stands for a task that ended with ``status``; ``traceback``, the remote one of
    an exception that is not at hand (not rebuilt here, or read from a store), becomes its ``__cause__``."""
    name = "task" if key is None else f"task {key!r}"
    exc = _RAISES.get(status, TaskError)(f"{name} {status.value}: {error}")
    if traceback:
        exc.__cause__ = RemoteTraceback(traceback)
    return exc


@dataclass(slots=True)
class TaskResult:
    """The final record of one task. Treat it as read-only: it is shared by every consumer."""

    batch_id: str
    key: str
    status: Status
    value: Any = None
    error: str | None = None
    traceback: str | None = None
    attempts: int = 0
    pid: int | None = None
    started_at: float | None = None
    finished_at: float | None = None
    message: str | None = None
    progress: float | None = None
    error_type: str | None = None
    index: int = -1
    exception: BaseException | None = field(default=None, compare=False, repr=False)

    @property
    def duration(self) -> float | None:
        """Seconds between the start and the end of the last attempt."""
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at

    @property
    def ok(self) -> bool:
        return self.status is Status.COMPLETED

    def unwrap(self) -> Any:
        """Return the value, or raise a :class:`TaskError` describing why there is none.

        For a failed task the task's own exception (with its type) is the
        ``__cause__`` of the :class:`TaskFailedError`; where there is none (it
        could not be rebuilt here, or the result was read from a store), the
        remote traceback is.
        """
        if self.status is Status.COMPLETED:
            return self.value
        if self.exception is not None:
            raise task_error(self.status, self.key, self.error) from self.exception
        raise task_error(self.status, self.key, self.error, self.traceback)


@dataclass(slots=True)
class Event:
    """A status event. Subclasses tell what happened; all carry the same fields.

    Treat it as read-only. (Not frozen, because a frozen dataclass is five
    times slower to build, and a consumer of every event gets several per task.)
    """

    batch_id: str
    key: str
    status: Status
    timestamp: float
    pid: int | None = None
    message: str | None = None
    progress: float | None = None
    attempt: int = 1
    data: dict[str, Any] | None = None


class TaskStarted(Event):
    """An attempt started running on a worker (status ``RUNNING``)."""

    __slots__ = ()


class TaskReported(Event):
    """The task called ``report()`` (status ``RUNNING``)."""

    __slots__ = ()


class TaskRetried(Event):
    """An attempt ended badly and another one is scheduled; ``status`` is that attempt's."""

    __slots__ = ()


class TaskFinished(Event):
    """The task reached its final status."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Stats:
    """Counts of final results, for one batch or for all of them."""

    total: int = 0
    completed: int = 0
    failed: int = 0
    timed_out: int = 0
    crashed: int = 0
    cancelled: int = 0
    batch_id: str | None = None

    @property
    def success_rate(self) -> float:
        """Completed over total, between 0 and 1 (0 for an empty batch)."""
        return self.completed / self.total if self.total else 0.0

    def json_success_rate(self) -> float | None:
        """The success rate as JSON gives it: null for an empty batch, where 0.0 would say every task failed."""
        return self.success_rate if self.total else None

    @classmethod
    def of(cls, counts: dict[Status, int], batch_id: str | None = None) -> Stats:
        return cls(
            total=sum(counts.values()),
            completed=counts.get(Status.COMPLETED, 0),
            failed=counts.get(Status.FAILED, 0),
            timed_out=counts.get(Status.TIMED_OUT, 0),
            crashed=counts.get(Status.CRASHED, 0),
            cancelled=counts.get(Status.CANCELLED, 0),
            batch_id=batch_id,
        )


@dataclass(frozen=True, slots=True)
class Summary:
    """What :meth:`Scheduler.run` returns: the counts and every result in submission order."""

    batch_id: str
    total: int
    completed: int
    failed: int
    timed_out: int
    crashed: int
    cancelled: int
    elapsed: float
    results: list[TaskResult]

    @property
    def success_rate(self) -> float:
        """Completed over total, between 0 and 1 (0 for an empty batch)."""
        return self.completed / self.total if self.total else 0.0

    @classmethod
    def of(cls, batch_id: str, results: list[TaskResult], elapsed: float) -> Summary:
        stats = Stats.of(collections.Counter(map(operator.attrgetter("status"), results)))
        return cls(
            batch_id=batch_id,
            total=len(results),
            completed=stats.completed,
            failed=stats.failed,
            timed_out=stats.timed_out,
            crashed=stats.crashed,
            cancelled=stats.cancelled,
            elapsed=elapsed,
            results=results,
        )


DEFAULT_RETRY_ON = frozenset({Status.FAILED, Status.CRASHED, Status.TIMED_OUT})


@dataclass(frozen=True)
class RetryPolicy:
    """When and how soon a task that did not complete is tried again.

    The delay before retry ``n`` (1-based) is ``min(max_delay, base_delay * 2 ** (n - 1))``,
    scaled by a random factor in ``[1 - jitter, 1]``. ``on`` takes some of
    ``failed``, ``crashed`` and ``timed_out``. ``exceptions`` limits the
    retried *failures* to those types and their subclasses (matched on the
    rebuilt exception; when it could not be rebuilt, on its type, imported here
    by name, or on the name alone where it cannot be imported); ``None`` retries any.

    >>> RetryPolicy(base_delay=0.5, max_delay=10, on=frozenset({Status.CRASHED}))  # doctest: +ELLIPSIS
    RetryPolicy(...)
    """

    base_delay: float = 0.1
    max_delay: float = 30.0
    jitter: float = 0.5
    on: frozenset[Status] = DEFAULT_RETRY_ON
    exceptions: tuple[type[BaseException], ...] | None = None

    def __post_init__(self) -> None:
        for name in ("base_delay", "max_delay"):
            value = getattr(self, name)
            if not (is_seconds(value) and value >= 0):
                raise ConfigurationError(f"RetryPolicy {name} must be a non-negative number of seconds, got {value!r}")
        if not (is_number(self.jitter) and 0 <= self.jitter <= 1):
            raise ConfigurationError(f"RetryPolicy jitter must be a number between 0 and 1, got {self.jitter!r}")
        on = [self.on] if isinstance(self.on, Status | str) else self.on
        try:
            statuses = frozenset(Status(status) for status in on)
        except (TypeError, ValueError):
            statuses = frozenset({Status.COMPLETED})  # refused below
        if not statuses <= DEFAULT_RETRY_ON:
            raise ConfigurationError(f"RetryPolicy on= takes statuses to retry: some of Status.FAILED, Status.CRASHED "
                                     f"and Status.TIMED_OUT, got {self.on!r}")
        object.__setattr__(self, "on", statuses)
        if self.exceptions is not None:
            kinds = (self.exceptions,) if isinstance(self.exceptions, type) else tuple(self.exceptions)
            if not all(isinstance(kind, type) and issubclass(kind, BaseException) for kind in kinds):
                raise ConfigurationError(f"RetryPolicy exceptions= takes exception classes, got {self.exceptions!r}")
            object.__setattr__(self, "exceptions", kinds)

    def delay(self, retry: int) -> float:
        raw: float = min(self.max_delay, self.base_delay * 2.0 ** min(retry - 1, 1000))  # 2.0 ** 1024 overflows
        return raw * (1 - self.jitter * random.random())

    def should_retry(self, outcome: Outcome) -> bool:
        if outcome.status not in self.on or not outcome.retryable:
            return False
        if outcome.status is not Status.FAILED or self.exceptions is None:
            return True
        if outcome.exception is not None:
            return isinstance(outcome.exception, self.exceptions)
        kind = _exception_type(outcome.error_type)
        if kind is not None:  # the exception could not be rebuilt (an __init__ of its own), but its type can
            return issubclass(kind, self.exceptions)
        return outcome.error_type in {type_name(kind) for kind in self.exceptions}


@functools.lru_cache(maxsize=256)  # a miss too: each name is imported once, whatever comes of it
def _exception_type(name: str | None) -> type[BaseException] | None:
    """The exception class :func:`type_name` gave ``name``, imported if need be; None when it cannot be found."""
    if not name:
        return None
    parts = name.split(".")
    for split in range(len(parts) - 1, -1, -1):  # the longest module name first: "a.b.C" is C of a.b, or b.C of a
        module_name = ".".join(parts[:split]) or "builtins"
        try:
            found: Any = sys.modules.get(module_name) or importlib.import_module(module_name)
            for attribute in parts[split:]:
                found = getattr(found, attribute)
        except (Exception, SystemExit):  # not found, or what the module raises as it is imported
            continue
        return found if isinstance(found, type) and issubclass(found, BaseException) else None
    return None


def is_int(value: object) -> TypeGuard[int]:
    """An int, and not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> TypeGuard[int | float]:
    """An int or a float, and not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_seconds(value: object) -> TypeGuard[int | float]:
    """A number of seconds a timer can be set to: an int or a float (not a bool), finite as a float."""
    try:
        return is_number(value) and math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def finite(number: float | None) -> float | None:
    """A number field as JSON: null when it is not finite (JSON has no token for nan or infinity)."""
    return number if number is None or math.isfinite(number) else None


def type_name(kind: type) -> str:
    """``ValueError`` for builtins, ``module.Qualified`` for the rest (``__main__`` as the parent knows it)."""
    module = "__main__" if kind.__module__ == "__mp_main__" else kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"
