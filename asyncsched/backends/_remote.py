"""The worker side of the scale-out backends: what runs inside a Dask or Celery worker.

Like ``asyncsched._worker``, this module imports no asyncio machinery and
nothing of the parent's side, so a worker that imports it pays for nothing but
the task. Both engines call one function per attempt:

* :func:`run_on_dask` takes the attempt as one opaque pickle (so Dask never
  reads the arguments as a graph) and returns one (so a result that does not
  pickle is a failed attempt, not a stuck one). ``report()`` calls and the
  start travel as Dask events on the backend's topic.
* :func:`run_by_name` is the body of the one registered Celery task: it imports
  ``module:qualname`` and calls it with JSON arguments. The start and each
  ``report()`` are Celery task states (``update_state``), which the Redis
  result backend publishes.

Event messages on the Dask topic (msgpack-able tuples)::

    (STARTED, tag, timestamp, pid, worker_address)
    (REPORTED, tag, pickle of (timestamp, message, progress), pickle of data or None)
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import time
from collections.abc import Callable
from typing import Any

from .._worker import Ran, Report, error_info, run_reporting

__all__ = ["REPORT_STATE", "STARTED", "REPORTED", "end_dask_worker", "resolve", "run_by_name", "run_on_dask"]

STARTED = "started"
REPORTED = "reported"
REPORT_STATE = "ASYNCSCHED_REPORT"
"""The Celery task state that carries one ``report()`` call."""

def _failure(what: str, exc: BaseException) -> Ran:
    name, text, tb, blob = error_info(exc)
    now = time.time()
    return False, (name, f"{what}: {text}", tb, blob), now, now, os.getpid()


def run_on_dask(payload: bytes, topic: str, tag: str) -> bytes:
    """Run one attempt in a Dask worker; ``payload`` is a pickle of ``(fn, args)``."""
    import cloudpickle  # comes with distributed, not with Celery
    from distributed import get_worker

    worker = get_worker()
    worker.log_event(topic, (STARTED, tag, time.time(), os.getpid(), worker.address))

    def send(report: Report) -> None:
        timestamp, message, progress, data = report
        # data pickled on its own, as by the local pool: data that cannot be unpickled there spoils only itself
        worker.log_event(topic, (REPORTED, tag, pickle.dumps((timestamp, message, progress)),
                                 pickle.dumps(data) if data else None))

    try:
        fn, args = pickle.loads(payload)
    except BaseException as exc:
        outcome = _failure("the task could not be unpickled in the worker", exc)
    else:
        outcome = run_reporting(fn, args, send)
    try:
        blob: bytes = cloudpickle.dumps(outcome)
    except Exception as exc:  # the value, or the exception's payload, does not pickle
        what = f"the result of type {type(outcome[1]).__name__}" if outcome[0] else "the exception"
        blob = cloudpickle.dumps(_failure(f"{what} could not be pickled", exc)[:2] + outcome[2:])
    return blob


def end_dask_worker() -> None:
    """Run in a Dask worker whose task timed out (``kill_on_timeout``): end it at once, its nanny starts a new one.

    The processes it started go first, so a timed-out task's own children
    (a ``subprocess`` it waits on, say) do not run on, orphaned.
    """
    import psutil  # comes with distributed

    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            child.kill()
    os._exit(1)


def resolve(target: str) -> Callable[..., Any]:
    """The function named ``module:qualname``."""
    module, _, qualname = target.partition(":")
    found: Any = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part)
    if not callable(found):
        raise TypeError(f"{target} is not callable")
    return found  # type: ignore[no-any-return]


def _terminating() -> bool:
    """Whether the terminate-signal handler of billiard (Celery's prefork pool) has fired in this process."""
    try:
        common = importlib.import_module("billiard.common")  # comes with Celery, untyped
    except ImportError:
        return False
    fired = getattr(common, "terminate_handler_fired", None)  # recent billiard; older ones have only the flag
    if fired is not None:
        return bool(fired())
    flag = getattr(common, "_should_have_exited", None)  # what it reads
    return bool(flag and flag[0])


def _exit_code(text: str) -> int:
    """The exit status the handler's SystemExit carried (its ``-(256 - signum)``), from its ``SystemExit: -241``
    text, else 1."""
    try:
        return int(text.rpartition(" ")[2])
    except ValueError:
        return 1


def run_by_name(task: Any, target: str, args: list[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The body of the registered Celery task (bound: ``task`` is the Celery task)."""
    if task.AsyncResult(task.request.id).state == "REVOKED":  # revoked while no worker was up to hear it
        from celery.exceptions import Ignore

        raise Ignore  # stores nothing, and acknowledges the message
    pid = os.getpid()
    task.update_state(state="STARTED", meta={"pid": pid, "hostname": task.request.hostname,
                                             "started_at": time.time()})

    def send(report: Report) -> None:
        timestamp, message, progress, data = report
        task.update_state(state=REPORT_STATE, meta={"timestamp": timestamp, "message": message,
                                                     "progress": progress, "data": data, "pid": pid})

    try:
        fn = resolve(target)
    except BaseException as exc:
        outcome = _failure(f"{target} could not be imported in the worker", exc)
    else:
        outcome = run_reporting(fn, args, send, kwargs)
    ok, value, started, finished, pid = outcome
    if not ok and _terminating():
        # The worker's own SIGTERM handler raised SystemExit in the task: Celery's hard time limit (which has
        # stored the task's TimeLimitExceeded) or the worker's shutdown. The task did not end: leave as billiard
        # means, storing nothing (a result would overwrite the time limit's, as a task that failed with SystemExit).
        raise SystemExit(_exit_code(value[1]))
    if not ok:
        value = list(value[:3])  # JSON carries the type name, text and traceback, not the pickled exception
    return {"ok": ok, "value": value, "started_at": started, "finished_at": finished, "pid": pid}
