"""The worker side: what runs inside each pool process.

This module is all a worker process imports of asyncsched. It must import
neither asyncio machinery nor aiosqlite, and nothing from the parent's side.

Wire protocol (one socket pair per worker, each message one length-prefixed
pickle frame, the framing of ``multiprocessing.connection.Connection``):

    parent -> worker   (call_id, payload)   payload = pickle of (fn, args)
                       None                 finish and exit
    worker -> parent   (READY, pid)
                       (REPORT, call_id, timestamp, message, progress, data)
                       (DONE, call_id, True, value, started_at, finished_at)
                       (DONE, call_id, False, error, started_at, finished_at)

``error`` is an :data:`ErrorInfo` tuple: the exception's qualified type name, its
one-line ``"Type: message"`` text, the formatted traceback, and the pickled
exception (``None`` where it cannot be pickled or rebuilt).
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from ._models import type_name

__all__ = ["DONE", "READY", "REPORT", "ErrorInfo", "error_info", "report", "run_capturing", "worker_main"]

READY = 0
REPORT = 1
DONE = 2

ErrorInfo = tuple[str, str, str, "bytes | None"]

_PROTOCOL = pickle.HIGHEST_PROTOCOL
_PR_SET_PDEATHSIG = 1

# The call being run in this process: (send, call_id). None outside a task.
_current: tuple[Callable[[Any], None], int] | None = None
# Reports captured by run_capturing(), per thread, for executors without a pipe.
_capture = threading.local()


def report(message: str | None = None, progress: float | None = None, **data: Any) -> None:
    """Report progress from inside a running task; a no-op outside one.

    ``message`` is free text, ``progress`` a fraction between 0 and 1, and any
    keyword arguments travel along as ``Event.data`` (they must pickle).
    """
    now = time.time()
    if progress is not None:
        progress = float(progress)
    current = _current
    if current is not None:
        send, call_id = current
        send((REPORT, call_id, now, message, progress, data))
    else:
        captured = getattr(_capture, "reports", None)
        if captured is not None:
            captured.append((now, message, progress, data))


def error_info(exc: BaseException) -> ErrorInfo:
    """Describe ``exc`` so the parent can show it, and rebuild it where possible."""
    kind = type(exc)
    name = type_name(kind)
    try:
        text = traceback.format_exception_only(kind, exc)[-1].strip()
    except Exception:  # a broken __str__ must not lose the error
        text = f"{name}: <unprintable {kind.__qualname__}>"
    tb = "".join(traceback.format_exception(kind, exc, exc.__traceback__))
    blob: bytes | None
    try:
        blob = pickle.dumps(exc, _PROTOCOL)
        pickle.loads(blob)  # an exception that cannot be rebuilt travels as text only
    except Exception:
        blob = None
    return name, text, tb, blob


def _describe_pickle_failure(what: str, exc: BaseException) -> ErrorInfo:
    wrapped = pickle.PicklingError(f"{what} could not be pickled: {type(exc).__name__}: {exc}")
    return error_info(wrapped)


def _run_call(send: Callable[[Any], None], call_id: int, payload: bytes) -> None:
    global _current
    started = time.time()
    try:
        fn, args = pickle.loads(payload)
    except BaseException as exc:
        info = error_info(exc)
        info = (info[0], f"the task could not be unpickled in the worker: {info[1]}", info[2], info[3])
        send((DONE, call_id, False, info, started, time.time()))
        return
    _current = (send, call_id)
    try:
        value = fn(*args)
    except BaseException as exc:
        message: tuple[Any, ...] = (DONE, call_id, False, error_info(exc), started, time.time())
    else:
        message = (DONE, call_id, True, value, started, time.time())
    finally:
        _current = None
    try:
        send(message)
    except Exception as exc:  # the value (or an exception's payload) does not pickle
        what = f"the result of type {type(message[3]).__name__}" if message[2] else "the exception"
        send((DONE, call_id, False, _describe_pickle_failure(what, exc), started, message[5]))


def _die_with_parent() -> None:
    """Make sure this worker cannot outlive the process that started it."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
        return

    def watch() -> None:  # pragma: no cover - platforms without prctl
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="asyncsched-parent-watch", daemon=True).start()


def worker_main(conn: Connection) -> None:
    """Entry point of a pool worker: serve calls from ``conn`` until told to stop."""
    os.setpgrp()  # a kill of this worker's group takes the task's own children too
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the orchestrator's to handle
    lock = threading.Lock()

    def send(message: Any) -> None:
        data = pickle.dumps(message, _PROTOCOL)
        with lock:  # report() may be called from the task's own threads
            conn.send_bytes(data)

    send((READY, os.getpid()))
    while True:
        try:
            frame = conn.recv_bytes()
        except (EOFError, OSError):
            return
        message = pickle.loads(frame)
        if message is None:
            return
        _run_call(send, *message)


def run_capturing(fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Run ``fn`` in any executor and bring back what the pool's wire would carry.

    Used by ``ExecutorBackend``: returns ``(ok, value_or_error, started_at,
    finished_at, pid, reports)``, with the ``report()`` calls made meanwhile.
    """
    reports: list[tuple[float, str | None, float | None, dict[str, Any]]] = []
    _capture.reports = reports
    started = time.time()
    try:
        value = fn(*args)
    except BaseException as exc:
        return (False, error_info(exc), started, time.time(), os.getpid(), reports)
    finally:
        _capture.reports = None
    return (True, value, started, time.time(), os.getpid(), reports)
