"""The worker side: what runs inside each pool process.

This module is all a worker process imports of asyncsched. It must import
neither asyncio machinery nor aiosqlite, and nothing from the parent's side.

Wire protocol: one socket pair per worker for the parent's frames, and one
pipe for the worker's (the doorbell, below, is a second socket pair); every frame is a length-prefixed
pickle, in the framing of ``multiprocessing.connection.Connection``; from the
worker, each frame is one message::

    parent -> worker   [(call_id, function, payload), ...]   calls to run in order: function is a
                                                         plain function pickled by name and payload
                                                         pickles args (or is args itself, when each
                                                         argument is of an INLINE type), or function is
                                                         None and payload pickles (fn, args)
                       {call_id, ...}              calls not to run here after all (cancelled, or
                                                   taken back for an idle worker)
                       None                        finish and exit
    worker -> parent   (READY, pid)
                       (REPORT, call_id, timestamp, message, progress, pickle of data or None)
                       (DONE, call_id, VALUE, value, started_at, finished_at)
                       (DONE, call_id, PICKLED, pickle of value, started_at, finished_at)
                       (DONE, call_id, ERROR, error, started_at, finished_at)
                       (REVOKED, [call_id, ...])   those of them still queued, which never will run

The parent may queue several calls on one worker when tasks are fast; the
worker runs them one by one and writes each DONE message before it starts the
next call. Whatever that call does (crash the process, hold the GIL, hang),
the parent already has every result before it, so a crash or a timeout costs
its own call only. The parent reads what has come in a group at a time.
After a REPORT, and after the DONE of a call that ran ``YIELD_AFTER`` or
longer, the worker yields its CPU (``sched_yield``), at most once per
``YIELD_GAP``: when the workers keep every core busy, the parent, woken by the
message, then handles it at once instead of after the rest of a worker's time
slice.

A revoke is answered with the calls the worker took out of its queue: the
parent knows exactly which calls never started, so it can give them to
another worker, or record them cancelled. The parent also rings a second
socket, the doorbell, after each revoke: a thread of the worker, woken by it
alone, answers even while a call runs (see ``_Inbox``).

A value of a plain builtin type (int, str, ...) travels as it is. Any other
value is pickled on its own, at once, so that a value that does not pickle
here, or does not unpickle in the parent, fails its own call and no other.

``error`` is an :data:`ErrorInfo` tuple: the exception's qualified type name, its
one-line ``"Type: message"`` text, the formatted traceback, and the pickled
exception (``None`` where it cannot be pickled or rebuilt).
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import numbers
import os
import pickle
import select
import signal
import struct
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, NoReturn

from ._models import type_name

__all__ = ["BIG_HEADER", "DONE", "ERROR", "FUNCTION_CACHE", "HEADER", "INLINE", "PICKLED", "READY", "REPORT", "REVOKED",
           "VALUE", "ErrorInfo", "Ran", "Report", "error_info", "frame_header", "report", "run_capturing",
           "run_reporting", "worker_main"]

READY = 0
REPORT = 1
DONE = 2
REVOKED = 3

ERROR, VALUE, PICKLED = 0, 1, 2
"""How a DONE message carries its outcome."""
INLINE = frozenset({int, float, str, bytes, bool, type(None)})
"""Types that always pickle and unpickle: arguments and values of these travel in their frame's own pickle."""

ErrorInfo = tuple[str, str, str, "bytes | None"]

_PROTOCOL = pickle.HIGHEST_PROTOCOL
FUNCTION_CACHE = 1024
"""Plain functions whose pickled reference is kept, on each side of the wire."""

HEADER = struct.Struct("!i")
"""A frame's length, as ``Connection.send_bytes`` writes it."""
BIG_HEADER = struct.Struct("!iQ")
"""The length of a frame of 2 GiB or more: -1, then the length."""


def frame_header(size: int) -> bytes:
    """The header ``Connection.recv_bytes`` expects before ``size`` bytes."""
    return HEADER.pack(size) if size < 0x7FFFFFFF else BIG_HEADER.pack(-1, size)


_PR_SET_PDEATHSIG = 1
LEAVE_GRACE = 1.0
"""Seconds a retiring worker gives its task's daemon children to stop before it ends at once."""

# The call being run in this process: (send, call_id). None outside a task.
_current: tuple[Callable[[Any], None], int] | None = None
# True in a child the task forked: it is not the worker, and ends where the task's code does.
_forked = False
# Plain functions by the pickled reference the parent sends, loaded once.
_functions: dict[bytes, Callable[..., Any]] = {}
# Where report() sends in run_reporting(), per thread, for executors without a pipe.
_capture = threading.local()
# Gives up this CPU to a process waiting for one, such as the parent just woken (a no-op when none waits).
_yield: Callable[[], None] = getattr(os, "sched_yield", lambda: None)
_yielded_at = 0.0
YIELD_GAP = 50e-6
"""Seconds after a yield to the parent during which a worker sends on without yielding again."""
YIELD_AFTER = 200e-6
"""Seconds a call must have run for the worker to yield to the parent after its result."""


def _let_the_parent_run(now: float) -> None:
    """After a message to the parent, give it the CPU: else, with every core busy with workers, the parent,
    woken by the message, may wait for the rest of a worker's time slice (some 4 ms) before it handles it.
    Not again within YIELD_GAP: a task that reports in a tight loop still has its reports handled several
    at a time."""
    global _yielded_at
    if now - _yielded_at > YIELD_GAP:
        _yielded_at = now
        _yield()


def report(message: str | None = None, progress: float | None = None, **data: Any) -> None:
    """Report progress from inside a running task; outside one it only checks ``progress``.

    ``message`` is free text, ``progress`` a fraction between 0 and 1 (anything
    else raises ValueError, inside a task or not), and any keyword arguments
    travel along as ``Event.data`` (they must pickle). It reports for the call
    the worker runs at that moment: a thread the task leaves running when it
    returns reports for the worker's next call.
    """
    if progress is not None:
        fraction = math.nan
        if isinstance(progress, numbers.Real) and not isinstance(progress, bool):
            with contextlib.suppress(OverflowError):
                fraction = float(progress)
        if not 0.0 <= fraction <= 1.0:  # NaN and infinities could not travel as JSON either
            raise ValueError(f"report(progress=...) takes a fraction between 0 and 1, got {progress!r}")
        progress = fraction
    current = _current
    captured = None if current is not None else getattr(_capture, "send", None)
    if current is None and captured is None:
        return
    now = time.time()
    if message is not None:
        message = str.__str__(str(message))  # a str, never a subclass that might not unpickle in the parent
    if current is not None:
        send, call_id = current
        # data pickled on its own: data that cannot be unpickled in the parent spoils only this report
        try:
            pickled = pickle.dumps(data, _PROTOCOL) if data else None
        except Exception as exc:
            raise _pickling_error("report()'s data", exc) from exc
        frame = (REPORT, call_id, now, message, progress, pickled)
        with contextlib.suppress(ConnectionError):  # the parent is gone: the worker ends once the task returns
            send(frame)
        _let_the_parent_run(now)
    elif captured is not None:
        captured((now, message, progress, data))


def error_info(exc: BaseException) -> ErrorInfo:
    """Describe ``exc`` so the parent can show it, and rebuild it where possible."""
    kind = type(exc)
    name = type_name(kind)
    try:
        described = traceback.TracebackException(kind, exc, exc.__traceback__)
        tb = "".join(described.format())
        described.__notes__ = None  # its notes (add_note()) are in the traceback: the error is the exception's line
        text = list(described.format_exception_only())[-1].strip()
    except BaseException:  # whatever a hostile exception raises (a __getattr__ asked for __notes__) loses no error
        text = f"{name}: {_message(exc)}"
        tb = "".join(["Traceback (most recent call last):\n", *traceback.format_tb(exc.__traceback__), text, "\n"])
    if kind.__module__ == "__mp_main__":  # the main script, as a worker imports it: named as the parent knows it
        text = text.replace(f"__mp_main__.{kind.__qualname__}", name, 1)
    blob: bytes | None
    try:
        blob = pickle.dumps(exc, _PROTOCOL)
        pickle.loads(blob)  # an exception that cannot be rebuilt travels as text only
    except BaseException:  # whatever its reducer raises, SystemExit too, must not end this process
        blob = None
    return name, text, tb, blob


def _message(exc: BaseException) -> str:
    try:
        return str(exc)
    except BaseException:  # a broken __str__
        return f"<unprintable {type(exc).__qualname__}>"


def _pickling_error(what: str, exc: BaseException) -> pickle.PicklingError:
    return pickle.PicklingError(f"{what} could not be pickled: {type(exc).__name__}: {_message(exc)}")


class _Channel:
    """The worker's end of its pipe to the parent: each message written at once, in a frame of its own.

    The lock keeps frames whole when threads of a task call ``report()`` while
    the worker's own thread sends. A ``report()`` from a signal handler runs in
    the thread whose send it interrupted, which it cannot wait for: its frame
    is queued, and that send writes it after its own.
    """

    def __init__(self, conn: Connection) -> None:
        self.fd = conn.fileno()
        self.lock = threading.RLock()
        self.writing = False  # a send holds the lock and is writing
        self.queued: deque[bytes] = deque()  # frames of sends that interrupted it

    def send(self, message: tuple[Any, ...]) -> None:
        """Send now; raises if ``message`` does not pickle."""
        data = pickle.dumps(message, _PROTOCOL)  # a report whose data does not pickle fails report() alone
        frame = frame_header(len(data)) + data
        with self.lock:
            if self.writing:
                self.queued.append(frame)
                return
            self.writing = True
            try:
                self._write(frame)
                while self.queued:
                    self._write(self.queued.popleft())
            finally:
                self.writing = False

    def _write(self, frame: bytes) -> None:
        sent = os.write(self.fd, frame)
        if sent < len(frame):  # a large frame: the rest in as many writes as it takes
            view = memoryview(frame)[sent:]
            while view:
                view = view[os.write(self.fd, view):]


def _load(function: bytes | None, payload: bytes | tuple[Any, ...]) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    loaded = payload if isinstance(payload, tuple) else pickle.loads(payload)
    if function is None:  # it pickles (fn, args)
        fn, args = loaded
        return fn, args
    fn = _functions.get(function)
    if fn is None:
        if len(_functions) >= FUNCTION_CACHE:
            _functions.clear()
        fn = _functions[function] = pickle.loads(function)
    return fn, loaded


def _run_call(channel: _Channel, last_begun: Any, call_id: int, function: bytes | None,
              payload: bytes | tuple[Any, ...]) -> None:
    global _current
    last_begun.value = call_id  # for the parent, should this worker die before it sends the result
    started = time.time()
    try:
        fn, args = _load(function, payload)
    except BaseException as exc:
        info = error_info(exc)
        info = (info[0], f"the task could not be unpickled in the worker: {info[1]}", info[2], info[3])
        channel.send((DONE, call_id, ERROR, info, started, time.time()))
        return
    _current = (channel.send, call_id)
    try:
        value = fn(*args)
    except BaseException as exc:
        if _forked:
            _end_fork(exc)
        message: tuple[Any, ...] = (DONE, call_id, ERROR, error_info(exc), started, time.time())
    else:
        if _forked:
            _end_fork(None)
        finished = time.time()
        if type(value) in INLINE:
            message = (DONE, call_id, VALUE, value, started, finished)
        else:
            try:
                message = (DONE, call_id, PICKLED, pickle.dumps(value, _PROTOCOL), started, finished)
            except BaseException as exc:  # whatever its reducer raises, SystemExit too, must not end this process
                failure = error_info(_pickling_error(f"the result of type {type(value).__name__}", exc))
                message = (DONE, call_id, ERROR, failure, started, finished)
    finally:
        _current = None
    channel.send(message)
    if message[5] - started >= YIELD_AFTER:  # the results of fast calls are read a group at a time anyway
        _let_the_parent_run(message[5])


def _die_with_parent() -> None:
    """Make sure this worker cannot outlive the process that started it.

    Under forkserver the parent is the fork server, which exits when the
    orchestrator does, once no process holds its "alive" pipe open. Workers
    inherit that pipe: drop it, or server and workers would wait on each other.
    """
    forkserver = sys.modules.get("multiprocessing.forkserver")
    alive_fd = getattr(getattr(forkserver, "_forkserver", None), "_forkserver_alive_fd", None)
    if alive_fd is not None:
        os.close(alive_fd)
        forkserver._forkserver._forkserver_alive_fd = None  # type: ignore[union-attr]
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


def _not_a_worker() -> None:
    global _current, _forked
    _current = None  # report() sends nothing there, and never touches the channel (whose lock a thread may hold)
    _forked = True


def _end_fork(exc: BaseException | None) -> NoReturn:
    """End a child the task forked that has come back out of the task's code, as a program ends there.

    It must neither send the task's result nor go on to serve the worker's calls.
    """
    code = 0
    if isinstance(exc, SystemExit):
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    elif exc is not None:
        traceback.print_exception(exc)
        code = 1
    _exit(code)


def _leave() -> None:
    """Let the worker end as a process normally does (exit handlers run, under ``spawn``), unless a thread
    or a child process a task started and left running would hold that up: then end it at once (the
    pool kills the worker's process group, children included, once it has exited). Daemon children are
    stopped as a normal exit stops them (SIGTERM, then a wait), for at most ``LEAVE_GRACE`` seconds."""
    me = threading.current_thread()
    children = multiprocessing.active_children()
    if any(not child.daemon for child in children) or any(
            not thread.daemon for thread in threading.enumerate() if thread is not me):
        _exit(0)
    if children:  # one that ignores SIGTERM, or a pool's finalizer stuck on a lock, would hold the exit up
        threading.Thread(target=_exit_after, args=(LEAVE_GRACE,), name="asyncsched-leave", daemon=True).start()


def _exit_after(seconds: float) -> None:
    time.sleep(seconds)
    _exit(0)


def _exit(code: int) -> NoReturn:
    """End this process now, without waiting for threads a task left running as a normal exit would."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def worker_main(conn: Connection, doorbell: Connection, results: Connection, last_begun: Any,
                revokes: Any) -> None:
    """Entry point of a pool worker: serve calls from ``conn`` until told to stop.

    ``last_begun`` is a shared ``c_longlong``: the id of the last call this worker began, which tells the parent,
    should the worker die, whether the first call it was sent had started. ``revokes``, another, counts the
    revokes the parent has sent (see ``_Inbox``).
    """
    os.setpgrp()  # a kill of this worker's group takes the task's own children too
    with contextlib.suppress(AttributeError, OSError):  # Linux: woken by new calls, wait for a core rather than
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))  # preempt the parent, which sets the pace
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the orchestrator's to handle
    # Forked from a loop that handles SIGTERM, a worker would pass a SIGTERM sent to it on to its parent through
    # the loop's wakeup fd (Python 3.11), and ignore it: a worker ends on SIGTERM, and alone.
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.register_at_fork(after_in_child=_not_a_worker)  # a task's forked child does not speak for the task
    _stdin_from_devnull(conn, doorbell, results)
    channel = _Channel(results)
    try:
        channel.send((READY, os.getpid()))
        inbox = _Inbox(conn, doorbell, channel, revokes)
        while (call := inbox.next()) is not None:
            _run_call(channel, last_begun, *call)
    except ConnectionError:  # the parent is gone (killed, say): there is no one left to tell
        _exit(1)
    except OSError as exc:  # a task closed the pipe (os.closerange(3, ...)): the parent sees the exit alone
        with contextlib.suppress(OSError):  # to fd 2 itself: the task may have closed what sys.stderr writes to
            os.write(2, f"asyncsched worker {os.getpid()}: its pipe to the orchestrator is gone ({exc}); a task "
                        "closed it, or replaced it\n".encode(errors="backslashreplace"))
        _exit(1)
    _leave()  # retired (every result is written), or orphaned


def _stdin_from_devnull(*own: Connection) -> None:
    """Give the worker's fd 0 /dev/null, as ``sys.stdin`` already is: else it is the parent's stdin (under
    forkserver and spawn), from which the program a task starts (``ssh``, ``cat``) would take input meant for
    the parent, such as the lines of tasks ``asyncsched run`` reads."""
    if 0 in (conn.fileno() for conn in own):  # the parent ran with fd 0 closed, and the pipe took it
        return
    devnull = os.open(os.devnull, os.O_RDONLY)
    if devnull != 0:  # else fd 0 was closed, and is /dev/null now
        os.dup2(devnull, 0)
        os.close(devnull)


class _Inbox:
    """The calls sent to this worker and not started yet.

    The worker's own thread takes in what the parent sends when it has nothing
    to run, waiting for it, and before each call while the parent has sent a
    revoke that it has not taken in (the count in ``revokes``, shared with the
    parent, tells without a system call): a revoke that came while a call ran
    (even one holding the GIL) still counts. The parent rings ``doorbell``
    after each revoke; a thread of the worker, woken by it alone, takes in what
    has come while a call runs, so a revoke is answered then, even if that call
    never ends. Frames are taken in, and calls started, under one lock: each
    call is either started or revoked, never both, and the answer to a revoke
    reaches the parent before the result of any call started after it.
    """

    def __init__(self, conn: Connection, doorbell: Connection, channel: _Channel, revokes: Any) -> None:
        self.conn = conn
        self.channel = channel
        self.revokes = revokes  # sent by the parent
        self.revokes_taken = 0
        self.reading = threading.Lock()
        self.queue: deque[tuple[int, bytes | None, bytes | tuple[Any, ...]]] = deque()
        self.leaving = False  # told to stop, or orphaned: no more calls will come
        self.sent = _poller(conn)
        threading.Thread(target=self._answer, args=(doorbell,), name="asyncsched-revokes", daemon=True).start()

    def next(self) -> tuple[int, bytes | None, bytes | tuple[Any, ...]] | None:
        """The next call to run, once there is one; None when the worker is to leave."""
        with self.reading:
            while not self.leaving and (not self.queue or (self.revokes.value != self.revokes_taken
                                                           and self.sent.poll(0))):  # sent, not taken in yet
                self._take_one()  # waits for a frame when the queue is empty
            return self.queue.popleft() if self.queue else None

    def _answer(self, doorbell: Connection) -> None:
        """Each time the parent rings, take in what it has sent and the worker's own thread has not."""
        sent = _poller(self.conn)  # poll objects are not shared between threads
        while not self.leaving:
            try:
                if not os.read(doorbell.fileno(), 4096):  # one ring or several
                    return  # the parent is gone
            except OSError:
                return
            with self.reading:  # once the worker's own thread is in a call, or waits for frames
                while not self.leaving and sent.poll(0):  # else that thread has taken them in
                    self._take_one()

    def _take_one(self) -> None:
        """Read one frame (waiting for it) and take it in; the caller holds ``reading``."""
        try:
            frame = pickle.loads(self.conn.recv_bytes())
        except (EOFError, OSError):  # the parent is gone
            frame = None
        if frame is None:
            self.leaving = True
        elif isinstance(frame, set):
            self.revokes_taken += 1
            revoked = [call[0] for call in self.queue if call[0] in frame]
            if revoked:
                self.queue = deque(call for call in self.queue if call[0] not in frame)
            try:
                self.channel.send((REVOKED, revoked))
            except OSError:  # the parent is gone
                self.leaving = True
        else:
            self.queue.extend(frame)


def _poller(conn: Connection) -> select.poll:
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    return poller


Report = tuple[float, "str | None", "float | None", "dict[str, Any]"]
"""One ``report()`` call off the pool's pipe: ``(timestamp, message, progress, data)``."""
Ran = tuple[bool, Any, float, float, int]
"""``(ok, value or ErrorInfo, started_at, finished_at, pid)``"""


def run_reporting(fn: Callable[..., Any], args: Any, send: Callable[[Report], None],
                  kwargs: dict[str, Any] | None = None) -> Ran:
    """Call ``fn(*args, **kwargs)`` with each ``report()`` it makes from its thread handed to ``send``.

    For executors and engines without the pool's pipe: ``ExecutorBackend``
    (through :func:`run_capturing`), Dask and Celery.
    """
    _capture.send = send
    started = time.time()
    try:
        value = fn(*args, **(kwargs or {}))
    except BaseException as exc:
        return False, error_info(exc), started, time.time(), os.getpid()
    finally:
        _capture.send = None
    return True, value, started, time.time(), os.getpid()


def run_capturing(fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Run ``fn`` in any executor and bring back what the pool's wire would carry.

    Used by ``ExecutorBackend``: returns ``(ok, value_or_error, started_at,
    finished_at, pid, reports)``, with the ``report()`` calls made meanwhile.
    """
    reports: list[Report] = []
    return (*run_reporting(fn, args, reports.append), reports)
