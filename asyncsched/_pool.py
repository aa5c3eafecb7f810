"""The local process pool: a ``concurrent.futures.Executor`` that can kill one task.

Data flow (everything on the left runs on one event loop thread; no locks)::

    start_call() / call() / submit()                           worker process (one per slot)
      |                                                        -------------------------------
      | pickle the arguments here (a bad one fails only this call;
      | plain builtins go as they are); a plain function is
      | pickled once per pool
      v
    _Call -> pending deque --_dispatch: up to `depth` calls--> socket (one per worker)
                             per worker, in one frame    [(call_id, function, payload), ...] -> worker_main()
                                                                                              runs them in order
           _revoke (a queued call cancelled,  ------------> {call_id, ...} on the socket, the
           or taken back by _balance)                      doorbell rung, `revokes` += 1 (shared)
                                                                                              |
    listener.started / reported / finished <-- _read <-- add_reader(pipe) <-- READY / REPORT / DONE
                                                     or _poll, while calls are fast
    _on_revoked: calls not begun -> pending deque <--------------------------- REVOKED [call_id, ...]
         ^                                                                                    |
         |           _on_exit  <-------- add_reader(pidfd or sentinel) <--- process exit -----+
         |
    the running call's deadline (loop.call_at), its cancel(), the worker over max_memory_per_child,
    a message that cannot be read -> _kill(worker): SIGKILL to the worker's process group and descendants, and a new
    worker takes the slot. _retire (max_tasks_per_child) sends None: the worker exits after its calls.

Actors:

* ``_Call`` is the record kept in the parent for one call: the payload
  (its arguments, pickled unless all are plain builtins), its timeout, the
  worker it was sent to and the listener told how it goes (for
  :meth:`ProcessPool.call`, the future the caller awaits). Only
  ``(call_id, function, payload)`` crosses the wire; the wire format is in
  ``_worker``. A plain function is pickled once (a reference by name) and
  cached on both sides, so a call pays only for pickling its arguments (and
  not even that when each is a plain builtin, such as an int or a str).
* ``_Worker`` is the record of one process: its socket (calls go to the
  worker), its pipe (messages come back), its doorbell (rung after a revoke,
  so the worker answers it even while a call runs), its pidfd or sentinel,
  the two values it shares with the worker (``last_begun``, ``revokes``) and
  the calls sent to it, in order; the first one is running. Each worker has its own socket and
  pipe, so killing one worker costs only its running call: the calls
  queued behind it go back to the pending deque once it has exited and what
  it wrote has been read. The worker writes the id of each call it begins
  into a value shared with the parent (``_Worker.last_begun``): a worker
  that dies before it began its running call costs no call at all (see
  ``_requeue``). A dead worker never breaks the pool (unlike the stdlib
  ``ProcessPoolExecutor``). A call cancelled while it is queued on a
  worker is revoked: the worker takes it out of its queue, and says so.
* Batching adapts to the tasks: while they are fast (an average under
  ``BATCH_SECONDS``) several calls go to a worker in one frame; slow tasks go
  one at a time. A call that turns out slow (``TAKE_BACK_AFTER``) gets no more
  calls queued behind it, and an idle worker takes back half of those already
  there (``_balance``): the worker answers with the ones it has not started.
  The worker writes each result before it starts the next call, and the loop
  reads whatever has come in at once (or at its next poll, below). A call's
  timeout starts when the pool sees it reach the head of its worker.
* The event loop watches every pipe and every process's exit (a pidfd on
  Linux, else its sentinel) with ``add_reader``. One exception: while calls
  end every few milliseconds, each result would wake the loop on its own, and
  the wake-ups would take more CPU from the workers than the results
  themselves; so a worker with ``POLL_SECONDS`` of calls queued behind its
  running one is read on a timer instead, every such worker in the same
  wake-up (``_poll``), and its queue is topped up each time. A result then
  waits for that timer, ``POLL_SECONDS`` at most. Messages come back through
  a pipe rather than the socket: the kernel packs a pipe's small writes into
  one buffer, where a socket keeps each in a buffer of its own, and reading
  forty results costs a third of the CPU. Reads and writes are
  non-blocking, so a large argument or result never blocks the loop.
* Before a worker is declared crashed or timed out, what it already sent is
  read, so a result that raced with a kill or an exit is not lost.
* A result that does not unpickle in the parent fails its own call only.
* Listeners are told what :meth:`ProcessPool._read` found only once it has
  handled all of it, so a listener that cancels a call cannot make another
  one run twice. A call that began and ended within one read (most fast
  calls queued behind another) is told only that it ended: its outcome says
  when and where it started.

Used from a thread with no running loop (plain ``Executor`` use), the pool runs
its own loop in a private thread.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import errno
import functools
import itertools
import math
import multiprocessing
import multiprocessing.context
import multiprocessing.util
import os
import pickle
import signal
import socket
import sys
import threading
import time
import types
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Protocol

import psutil

from ._backend import report_data, unreadable_result
from ._errors import BrokenPoolError, ClosedError, ConfigurationError, TaskDefinitionError
from ._models import Outcome, Status, is_int, is_seconds, task_error
from ._worker import (
    BIG_HEADER,
    DONE,
    FUNCTION_CACHE,
    HEADER,
    INLINE,
    PICKLED,
    READY,
    REPORT,
    REVOKED,
    VALUE,
    error_info,
    frame_header,
    worker_main,
)

__all__ = ["CallListener", "PoolStatistics", "ProcessPool", "default_start_method", "resolve_workers"]

MAX_START_FAILURES = 3
"""Workers dying one after another before their READY break the pool."""
MAX_SERVER_DEATHS = 10
"""Times in a row a worker may fail to start, or die before its READY, for its fork server's death (see
ProcessPool._server_died) before that counts against the pool."""
SERVER_GRACE = 0.1
"""Seconds before a pool with no worker tries again to start one, when it could not for its fork server's death."""
BATCH_SECONDS = 0.005
"""Queue several calls on one worker only while that much work or less waits behind the running one."""
MAX_DEPTH = 64
"""The most calls queued on one worker."""
TAKE_BACK_AFTER = 2 * BATCH_SECONDS
"""Seconds a call may run before half the calls queued behind it are taken back for an idle worker."""
POLL_SECONDS = 0.002
"""While calls take from ``POLL_FROM`` to ``BATCH_SECONDS`` each, a worker with at least this much work queued
behind its running call is read this often, every such worker at once, rather than as each message comes: one
wake-up of the loop reads several results (see ProcessPool._poll)."""
POLL_FROM = POLL_SECONDS / 10
"""Calls shorter than this on average are never polled for: their results come faster than a timer would read
them."""
MEMORY_CHECK_SECONDS = 0.1
"""How often busy workers' memory is sampled when ``max_memory_per_child`` is set."""
STOP_READINGS = 10
"""Readings of a killed worker's tree at most, each after it stopped what the last one found (see
:func:`_stop_descendants`)."""
RETIRE_GRACE = 5.0
"""A retiring worker that has run every call it was sent is killed once it has not exited for this long: its exit
is held up (an exit handler, a finalizer of a task's that never returns), and it would hold its descriptors."""
SENDING_GRACE = 0.5
"""A message still being read at a call's deadline is checked this often; the worker is killed once none of it
has come since the last check (see ``ProcessPool._still_sending``)."""
ABANDONED_GRACE = 0.1
"""Seconds a call cancelled while queued on a worker may run once it is reached, before that worker is killed."""
WORKER_MEMORY = 12 * 2**20
"""The memory of its own an idle worker takes at least (its USS here): a pool that cannot have that much for each
worker is refused, rather than left to run the machine out of memory as it starts."""

_OUT_OF = (errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM)  # descriptors, processes, memory
_SERVER_GONE = (errno.ECONNREFUSED, errno.EPIPE, errno.ECONNRESET)  # a start refused or cut by a dying fork server
_PLAIN_FUNCTIONS = (types.FunctionType, types.BuiltinFunctionType)
_get_ident = threading.get_ident
_COMPLETED = Status.COMPLETED  # for _read: an enum member costs a lookup each time (Python 3.11)
_READ_SIZE = 1 << 16
_PROTOCOL = pickle.HIGHEST_PROTOCOL

OnStart = Callable[[int, float], None]
OnReport = Callable[[int, float, "str | None", "float | None", "dict[str, Any]"], None]


class CallListener(Protocol):
    """What :meth:`ProcessPool.start_call` tells how a call goes, on the pool's loop.

    ``started`` when the call starts running in a worker, ``reported`` for each
    ``report()`` inside it, then ``finished`` once with its :class:`Outcome`.
    A call that started and ended before the pool looked (a fast call queued
    behind another) is told only ``finished``: its outcome's ``started_at`` and
    ``pid`` say when and where it started. A call cancelled through what
    :meth:`ProcessPool.start_call` returned is told nothing more; closing the
    pool finishes a call as ``cancelled``. Each must be quick.
    """

    def started(self, pid: int, timestamp: float) -> None: ...

    def reported(self, pid: int, timestamp: float, message: str | None, progress: float | None,
                 data: dict[str, Any]) -> None: ...

    def finished(self, outcome: Outcome) -> None: ...


def resolve_workers(workers: int | str) -> int:
    """``"cpu"`` is the number of cores this process may run on, ``"io"`` twice that, or a positive int."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if workers == "cpu":
        return cores
    if workers == "io":
        return 2 * cores
    if is_int(workers) and workers > 0:
        return workers
    if isinstance(workers, str) and workers.isascii() and workers.isdigit() and int(workers) > 0:  # not "²"
        return int(workers)
    raise ConfigurationError(f'workers must be "cpu", "io" or a positive int, got {workers!r}')


def default_start_method() -> str:
    """``forkserver`` where the platform has it, else ``spawn``.

    ``fork`` is available on request but unsafe once threads exist (aiosqlite and
    the default executor start some), so it is never the default.
    """
    methods = multiprocessing.get_all_start_methods()
    return "forkserver" if "forkserver" in methods else "spawn"


def _forkserver_pid() -> int | None:
    """The pid of this process's fork server, once one was started."""
    return getattr(getattr(sys.modules.get("multiprocessing.forkserver"), "_forkserver", None), "_forkserver_pid", None)


def _forkserver_gone(pid: int) -> bool:
    """Whether fork server ``pid`` has died (a task killed it, or it crashed out of descriptors): the workers it
    forked die with it, and not for a fault of their own. A start after its death launches a new one."""
    if pid != _forkserver_pid():
        return True  # replaced already
    try:
        return psutil.Process(pid).status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def _context(mp_context: str | multiprocessing.context.BaseContext | None) -> Any:
    if mp_context is None:
        return multiprocessing.get_context(default_start_method())
    if isinstance(mp_context, str):
        try:
            return multiprocessing.get_context(mp_context)
        except ValueError:
            raise ConfigurationError(
                f"unknown start method {mp_context!r}; use one of {multiprocessing.get_all_start_methods()}"
            ) from None
    if not isinstance(mp_context, multiprocessing.context.BaseContext):
        raise ConfigurationError(
            f"mp_context must be a start method, one of {multiprocessing.get_all_start_methods()}, or a "
            f"multiprocessing context such as multiprocessing.get_context(\"spawn\"), got {mp_context!r}")
    return mp_context


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    """A snapshot of the pool, from :meth:`ProcessPool.statistics`."""

    workers: int
    idle: int
    running: int
    pending: int
    started: int
    crashed: int
    killed: int


class _Call:
    """One call: the parent's record of it. Cancelling it kills the worker running it.

    Only ``(call_id, function, payload)`` crosses the wire.
    """

    __slots__ = ("call_id", "cancelled", "done", "function", "given_back", "listener", "payload", "pool", "timeout",
                 "worker")

    payload: bytes | tuple[Any, ...]

    def __init__(self, pool: ProcessPool, call_id: int, timeout: float | None, listener: CallListener) -> None:
        self.pool = pool
        self.call_id = call_id
        self.timeout = timeout
        self.listener = listener
        self.function: bytes | None = None
        self.payload = b""
        self.worker: _Worker | None = None
        self.done = False  # settled or cancelled
        self.cancelled = False
        self.given_back = False  # a worker died before it began this call, which went back to the queue

    def cancel(self) -> bool:
        """Stop the call: a running one has its worker killed. False if it had already ended."""
        if self.done:
            return False
        self.done = self.cancelled = True
        self.pool._on_cancel(self)
        return True

    def settle(self, outcome: Outcome) -> None:
        """Tell the listener how the call ended, unless it has already ended."""
        if self.done:
            return
        self.done = True
        pool = self.pool
        pool._tell(self, self.listener.finished, (outcome,))
        if pool._progress is not None:
            pool._progressed()


class _ExecutorFuture(concurrent.futures.Future[Any]):
    """What :meth:`ProcessPool.submit` returns. Waiting on it in the thread of the pool's loop would stop
    the loop that must run the call: that raises RuntimeError instead of blocking forever."""

    def __init__(self, pool: ProcessPool) -> None:
        super().__init__()
        self._pool = pool

    def result(self, timeout: float | None = None) -> Any:
        self._check_wait()
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._check_wait()
        return super().exception(timeout)

    def _check_wait(self) -> None:
        if not self.done() and self._pool._on_loop_thread():
            raise RuntimeError("waiting for a ProcessPool future in the thread of the pool's own event loop "
                               "would block that loop forever: await asyncio.wrap_future(future), or use "
                               "await loop.run_in_executor(pool, fn, *args)")


class _CallFuture(asyncio.Future[Outcome]):
    """The future :meth:`ProcessPool.call` returns: the listener of its call. Cancelling it cancels the call."""

    __slots__ = ("call", "on_report", "on_start", "told_start")

    def __init__(self, loop: asyncio.AbstractEventLoop, on_start: OnStart | None, on_report: OnReport | None) -> None:
        super().__init__(loop=loop)
        self.on_start = on_start
        self.on_report = on_report
        self.call: _Call | None = None
        self.told_start = False

    def started(self, pid: int, timestamp: float) -> None:
        self.told_start = True
        if self.on_start is not None:
            self.on_start(pid, timestamp)

    def reported(self, pid: int, timestamp: float, message: str | None, progress: float | None,
                 data: dict[str, Any]) -> None:
        if self.on_report is not None:
            self.on_report(pid, timestamp, message, progress, data)

    def finished(self, outcome: Outcome) -> None:
        if self.done():
            return
        if (self.call is not None and not self.told_start and outcome.started_at is not None
                and outcome.pid is not None):  # it ended before the pool told it started: as the pool would
            self.call.pool._call_listener(self.started, (outcome.pid, outcome.started_at))
            if self.done():  # on_start cancelled it
                return
        if outcome.status is Status.CANCELLED:  # the pool was closed
            super().cancel()
        elif self.call is not None and (broken := self.call.pool._broken) is not None and outcome.exception is broken:
            self.set_exception(broken)  # the pool's own error, not one the task raised
        else:
            self.set_result(outcome)

    def cancel(self, msg: Any | None = None) -> bool:
        if not super().cancel(msg):
            return False
        if self.call is not None:
            self.call.cancel()
        return True


class _Worker:
    __slots__ = ("began", "begun", "calls", "calls_sent", "closed", "deadline", "deadline_at", "doorbell", "exit_fd",
                 "fd", "idle_since", "inbuf", "inherited", "killed", "last_begun", "outbuf", "pid", "pidfd", "polled",
                 "process", "ready", "received", "results", "retiring", "revokes", "revoking", "sending", "server",
                 "sock", "timer_at", "told")

    def __init__(self, process: Any, sock: socket.socket, doorbell: socket.socket, results: int,
                 last_begun: Any, revokes: Any, *, pidfd: int | None, server: int | None) -> None:
        self.process = process
        self.pidfd = pidfd  # readable once the process has exited
        self.exit_fd: int = process.sentinel if pidfd is None else pidfd  # watched for the exit
        self.last_begun = last_begun  # shared with the worker: the id of the last call it began (-1: none yet)
        self.revokes = revokes  # shared with the worker: how many revokes were sent to it
        self.sock = sock
        self.doorbell = doorbell  # rung after a revoke, for the worker to answer it even while a call runs
        self.fd = sock.fileno()
        self.results = results  # the read end of the worker's pipe of messages
        self.pid: int = process.pid
        self.ready = False
        self.retiring = False  # leaving the pool: killed or told to stop
        self.killed = False
        self.calls: deque[_Call] = deque()  # sent to this worker, in order; the first one runs
        self.calls_sent = 0
        self.deadline_at: float | None = None  # loop time by which the running call must end
        self.deadline: asyncio.TimerHandle | None = None  # a timer at or before deadline_at
        self.timer_at = 0.0  # when that timer fires
        self.began = 0.0  # loop time the running call reached the head
        self.begun: _Call | None = None  # the call that reached the head last: its timeout runs
        self.told: _Call | None = None  # the call whose listener was told it started
        self.revoking: deque[set[int]] = deque()  # the calls of each revoke sent here and not answered yet
        self.inbuf = bytearray()
        self.received = 0  # bytes read from its pipe so far
        self.polled = False  # its pipe is read on the pool's timer, not watched (see ProcessPool._poll)
        self.sending: tuple[int, int, int] | None = None  # see ProcessPool._still_sending
        self.outbuf = bytearray()
        self.inherited = 0  # under fork, the RSS it had when ready: the parent's pages, not counted as its own
        self.idle_since: float | None = None  # retiring: when it was first seen with every call it was sent done
        self.server = server  # the pid of the fork server that started it, under forkserver
        self.closed = False  # exited, reaped, and its descriptors closed

    def close(self) -> None:
        self.sock.close()
        self.doorbell.close()
        os.close(self.results)
        if self.pidfd is not None:
            os.close(self.pidfd)
        self.closed = True

    @property
    def call(self) -> _Call | None:
        """The running call."""
        return self.calls[0] if self.calls else None

    @property
    def in_call(self) -> bool:
        """Whether the worker has begun its running call, as it says in ``last_begun``: else it is between two
        calls (or was never sent one)."""
        return bool(self.calls) and self.last_begun.value == self.calls[0].call_id

    def signal(self, signum: int) -> None:
        """Signal the worker's whole process group (the task's own children too), and the worker itself until it
        is reaped: its task may have moved it to another group.

        A SIGKILL also reaches the worker's descendants in a group or session
        of their own. They are found while they are still its own (the children
        of a dead process are init's): the worker and its group are stopped
        first, and each descendant as it is found, so none forks once it has
        been looked at, and none is reaped before its SIGKILL (its parent is
        stopped), which goes to the deepest first: a pid signalled is never
        another process's.
        """
        if signum == signal.SIGKILL and not self.closed:
            self._send(signal.SIGSTOP)
            for pid in reversed(_stop_descendants(self.pid)):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signum)
        self._send(signum)

    def _send(self, signum: int) -> None:
        if self.ready:  # the worker has made itself a group leader
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signum)
        if self.closed:  # reaped (by something else, maybe): its pid may be another process's by now
            return
        if self.pidfd is not None:  # Linux: it cannot reach another process, should something else reap this one
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, signum)
        elif self.process.exitcode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, signum)


def _stop_descendants(pid: int) -> list[int]:
    """SIGSTOP every descendant of process ``pid``, which is stopped and not reaped; their pids, parents first.

    Read from ``/proc/<pid>/task/<tid>/children`` (Linux), so only the tree is
    visited, not every process of the machine. A process found is stopped at
    once; the tree is read again until a reading finds no new one, as a fork
    that was under way when its parent was stopped may show only after.
    Elsewhere (or a kernel without those files) the descendants are looked up
    with psutil, and are not stopped.
    """
    if not os.path.exists(f"/proc/{pid}/task/{pid}/children"):
        try:
            return [child.pid for child in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            return []
    stopped: dict[int, None] = {}
    for _ in range(STOP_READINGS):
        found = False
        for parent in (pid, *stopped):
            for child in _children(parent):
                if child not in stopped:
                    try:
                        os.kill(child, signal.SIGSTOP)
                    except (ProcessLookupError, PermissionError):  # gone; or not ours to signal (setuid)
                        continue
                    stopped[child] = None
                    found = True
        if not found:
            break
    return list(stopped)


def _children(pid: int) -> list[int]:
    """The pids of the children of process ``pid``: those of each of its threads."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for thread in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{thread}/children", "rb") as children:
                found += map(int, children.read().split())
    return found


_live_pools: weakref.WeakSet[ProcessPool] = weakref.WeakSet()


@atexit.register
def _kill_leftover_workers() -> None:
    # Registered after multiprocessing's own exit handler, so it runs first:
    # a pool nobody closed cannot make the interpreter wait for its workers.
    # One shut down without waiting, on its own thread, first ends the calls it
    # took, as a concurrent.futures executor does before the interpreter exits.
    for pool in list(_live_pools):
        thread = pool._thread
        if pool._stopping and thread is not None:
            thread.join()
        for worker in list(pool._workers):
            worker.signal(signal.SIGKILL)


class ProcessPool(concurrent.futures.Executor):
    """A pool of worker processes where any running call can be killed alone.

    ``workers`` is ``"cpu"``, ``"io"`` or a number. ``mp_context`` is a start
    method name or a multiprocessing context (default: :func:`default_start_method`).
    A worker is replaced after ``max_tasks_per_child`` calls when that is set.
    With ``max_memory_per_child`` (bytes, or a string such as ``"512MB"``) the
    resident memory of every busy worker is sampled every
    ``MEMORY_CHECK_SECONDS``; a worker over the limit is killed and its task
    ends ``crashed``, with the limit named in its error.

    From async code use :meth:`call` (or ``loop.run_in_executor``) inside
    ``async with ProcessPool(...)``. As a plain ``Executor``, ``submit()`` and
    ``map()`` work from any thread. Cancelling a future, even a running one,
    kills the worker that runs it and starts a new one.
    """

    def __init__(
        self,
        workers: int | str = "cpu",
        *,
        mp_context: str | multiprocessing.context.BaseContext | None = None,
        max_tasks_per_child: int | None = None,
        max_memory_per_child: float | str | None = None,
    ) -> None:
        self.size = resolve_workers(workers)
        available = psutil.virtual_memory().available
        if self.size * WORKER_MEMORY > available:
            raise ConfigurationError(
                f"{self.size} worker processes would need {self.size * WORKER_MEMORY / 2**30:.1f} GiB at least "
                f"({WORKER_MEMORY >> 20} MiB each, idle), and this machine has {available / 2**30:.1f} GiB available: "
                "use fewer workers")
        if max_tasks_per_child is not None and not (is_int(max_tasks_per_child) and max_tasks_per_child >= 1):
            raise ConfigurationError(f"max_tasks_per_child must be an int of at least 1, got {max_tasks_per_child!r}")
        self._ctx = _context(mp_context)
        self._max_tasks = max_tasks_per_child
        self._max_memory = parse_size(max_memory_per_child)
        if self._max_memory is not None and self._max_memory < WORKER_MEMORY:
            raise ConfigurationError(
                f"max_memory_per_child={max_memory_per_child!r} ({self._max_memory:,} bytes) is less than a worker "
                f"takes before it runs anything (over {WORKER_MEMORY >> 20} MiB): every task would be killed; set a "
                "limit above what your largest task needs, in bytes or as a string such as \"1GB\"")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_says_its_thread = False  # an asyncio loop, which keeps the id of the thread that runs it
        self._starting = threading.Lock()
        self._thread: threading.Thread | None = None
        self._workers: set[_Worker] = set()
        self._ready: list[_Worker] = []  # in service and READY: the ones calls may be sent to
        self._pending: deque[_Call] = deque()
        self._dispatching = False
        self._average = BATCH_SECONDS  # moving average of a call's run time
        self._ids = itertools.count()
        self._functions: dict[Callable[..., Any], bytes] = {}
        self._held: list[tuple[_Call, Callable[..., None], tuple[Any, ...]]] | None = None  # see _tell
        self._balancing: asyncio.Handle | None = None  # a _balance() to come
        self._polling: asyncio.TimerHandle | None = None  # the next _poll(), while a worker is polled
        self._progress: asyncio.Future[None] | None = None  # set when a call ends, while _close() waits
        self._closing: asyncio.Task[None] | None = None  # the close that shutdown() began on the loop thread
        self._closed = False
        self._stopping = False  # shutdown() has begun: submit() takes no more calls
        self._broken: BrokenPoolError | None = None
        self._start_failures = 0
        self._dead_servers: set[int] = set()  # see _server_died
        self._refusals = 0
        self._short = False  # a worker could not be started: it ran with fewer (warned once)
        self._all_exited: asyncio.Event | None = None
        self._started = self._crashed = self._killed = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the workers, on the running loop, or on a private loop thread if there is none."""
        if self._loop is not None:
            return
        with self._starting:  # threads that submit to a new pool at once start it once
            if self._loop is not None:
                return
            if self._closed:
                raise ClosedError("this ProcessPool is closed; create a new one")
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self._start_thread()
            else:
                self._bind(loop)

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Bind the pool to ``loop``; called in the thread that runs it."""
        self._loop = loop
        self._loop_says_its_thread = getattr(loop, "_thread_id", None) == threading.get_ident()
        self._all_exited = asyncio.Event()
        _live_pools.add(self)
        self._fill()
        if self._max_memory is not None:
            loop.call_later(MEMORY_CHECK_SECONDS, self._check_memory)

    def _start_thread(self) -> None:
        loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(started.set)
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="asyncsched-pool", daemon=True)
        self._thread.start()
        started.wait()
        _call_on(loop, functools.partial(self._bind, loop))

    async def __aenter__(self) -> ProcessPool:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Kill what runs, stop every worker and wait until all are gone. Idempotent.

        Awaited on another loop than the pool's, it closes the pool on the pool's loop (in that loop's thread)
        and waits for it here.
        """
        if self._thread is not None and not self._on_loop_thread():
            # Started from a plain thread, on its private loop: closed there, and that loop's thread ended, as
            # shutdown() does, in a thread of this loop's executor so as not to block this loop meanwhile.
            await asyncio.to_thread(self._shutdown, True, cancel_futures=False, cancel=True)
            return
        loop = self._loop
        if loop is not None and loop.is_running() and _running_loop() is not loop:
            # Started on a loop that runs in another thread: closed there, as nothing of it is thread-safe.
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._close(cancel=True), loop))
            return
        await self._close(cancel=True)

    async def _close(self, *, cancel: bool) -> None:
        """Close: with ``cancel``, kill what runs; else let every call end first."""
        if self._loop is None:
            self._closed = True
            return
        if self._loop is not _running_loop() and not self._loop.is_running():
            self._kill_here()  # its loop has ended or stopped (an earlier asyncio.run()): nothing watches the workers
            return
        try:
            await self._stop_workers(cancel=cancel)
        except asyncio.CancelledError:  # e.g. asyncio.run() ending with the close in flight: kill what is left now
            self._close_calls()
            self._kill_here()
            raise

    async def _stop_workers(self, *, cancel: bool) -> None:
        """``_close()`` on the pool's running loop."""
        assert self._loop is not None
        if not self._closed and not cancel:
            while self._unfinished():
                if self._progress is None or self._progress.done():
                    self._progress = self._loop.create_future()
                await self._progress  # shared by every caller waiting here
        self._closed = True
        self._ready.clear()  # nothing more is sent
        self._close_calls()
        for worker in list(self._workers):
            if worker.calls:
                self._kill(worker)
            elif not worker.retiring:
                self._retire(worker)
        assert self._all_exited is not None
        if self._workers:
            try:
                await asyncio.wait_for(asyncio.shield(self._all_exited.wait()), 2.0)
            except TimeoutError:  # a worker ignored its stop: no process outlives the pool
                for worker in list(self._workers):
                    worker.signal(signal.SIGKILL)
                await self._all_exited.wait()
        _live_pools.discard(self)

    def _cancel_queued(self) -> None:
        """Cancel every call that has not started: those pending, and those queued on a worker (revoked)."""
        for call in self._pending:
            call.settle(_CLOSED)
        for worker in self._workers:
            queued = [call for call in itertools.islice(worker.calls, 1, None) if not call.done]
            for call in queued:
                call.settle(_CLOSED)
            if queued:
                self._revoke(worker, {call.call_id for call in queued})

    def _kill_here(self) -> None:
        """Close the pool without its loop, which is closed or out of reach: kill, reap and close every worker
        in this thread."""
        self._closed = True
        loop = self._loop
        if self._polling is not None:
            self._polling.cancel()
            self._polling = None
        for worker in list(self._workers):
            worker.signal(signal.SIGKILL)
            if loop is not None and not loop.is_closed():  # stopped: it may run again, with none of these
                for watched in (worker.results, worker.exit_fd):
                    loop.remove_reader(watched)
                loop.remove_writer(worker.fd)
            if worker.deadline is not None:
                worker.deadline.cancel()
            worker.process.join()
            worker.close()
        self._workers.clear()
        _live_pools.discard(self)

    def _calls(self) -> Iterator[_Call]:
        """The calls sent to the workers, in their order, then those pending."""
        return itertools.chain(*(w.calls for w in self._workers), self._pending)

    def _unfinished(self) -> bool:
        return any(not call.done for call in self._calls())

    def _close_calls(self) -> None:
        """End every call not ended yet as closed; none is pending any more."""
        for call in self._calls():
            call.settle(_CLOSED)
        self._pending.clear()

    def _progressed(self) -> None:
        """A call ended or was cancelled: wake a ``_close()`` that waits for them all."""
        waiter = self._progress
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _tell(self, call: _Call, method: Callable[..., None], args: tuple[Any, ...]) -> None:
        """Call a method of ``call``'s listener now, or once ``_read`` has handled all it read."""
        held = self._held
        if held is not None:
            held.append((call, method, args))
        else:
            self._call_listener(method, args)

    def _call_listener(self, method: Callable[..., None], args: tuple[Any, ...]) -> None:
        try:
            method(*args)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._listener_failed(exc)

    def _listener_failed(self, exc: BaseException) -> None:
        """As the loop treats a failing callback: reported, never fatal to the pool (nor to the other calls whose
        listeners are told after it); only SystemExit and KeyboardInterrupt go through."""
        assert self._loop is not None
        self._loop.call_exception_handler({"message": "a ProcessPool call listener failed", "exception": exc})

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """``Executor.shutdown``. From the pool's own loop thread it cannot wait: use ``await aclose()`` there.

        A pool whose loop has stopped (after ``run_until_complete``) is closed
        on that loop, here; one whose loop is closed has its workers killed.
        """
        self._shutdown(wait, cancel_futures=cancel_futures, cancel=False)

    def _shutdown(self, wait: bool, *, cancel_futures: bool, cancel: bool) -> None:
        """``shutdown()``; with ``cancel``, what runs is killed (see ``_close``)."""
        loop = self._loop
        if loop is None or self._closed:
            self._closed = True
            return
        self._stopping = True  # submit() takes no call from now on (those it took go on)
        if cancel_futures and not loop.is_closed():  # before it returns, as concurrent.futures does
            if self._on_loop_thread() or not loop.is_running():
                self._cancel_queued()
            else:
                _call_on(loop, self._cancel_queued)
        closing = self._close(cancel=cancel)
        if self._on_loop_thread():
            task = self._closing = loop.create_task(closing)  # held: the loop keeps only a weak reference
            if self._thread is not None:
                task.add_done_callback(lambda _: loop.stop())  # the private loop's thread ends with it
            return
        if not loop.is_running() and not loop.is_closed():  # stopped, e.g. after run_until_complete(): run it here
            with contextlib.suppress(RuntimeError):  # unless another loop runs in this thread
                loop.run_until_complete(closing)
                return
        done = None
        if loop.is_running():
            with contextlib.suppress(RuntimeError):  # closed meanwhile
                done = asyncio.run_coroutine_threadsafe(closing, loop)
        if done is None:  # closed (it ended without aclose(), or another shutdown closed it), or out of reach
            closing.close()
            self._kill_here()
            return
        if self._thread is not None:
            done.add_done_callback(lambda _: self._stop_thread_loop(loop))
        if wait:
            done.result()
            if self._thread is not None:
                self._thread.join()

    @staticmethod
    def _stop_thread_loop(loop: asyncio.AbstractEventLoop) -> None:
        with contextlib.suppress(RuntimeError):  # already stopped and closed by another shutdown
            loop.call_soon_threadsafe(loop.stop)

    # -- async API ---------------------------------------------------------------------------

    def call(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...] = (),
        *,
        timeout: float | None = None,
        on_start: OnStart | None = None,
        on_report: OnReport | None = None,
    ) -> asyncio.Future[Outcome]:
        """Run ``fn(*args)`` in a worker; the future resolves to its :class:`Outcome`.

        Must be called on the pool's loop. The future never raises for the task's
        own errors: those are outcomes (failed, timed out, crashed). Cancelling it
        stops the call; if it runs, its worker is killed and replaced.
        """
        if not isinstance(args, tuple):
            raise TaskDefinitionError(f"args must be a tuple of the call's arguments, as in call(fn, (x,)), got "
                                      f"{type(args).__name__}")
        if timeout is not None and not (is_seconds(timeout) and timeout > 0):
            raise TaskDefinitionError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
        if self._loop is None:
            self.start()
        assert self._loop is not None
        future = _CallFuture(self._loop, on_start, on_report)
        future.call = self.start_call(fn, args, future, timeout=timeout)
        return future

    def start_call(self, fn: Callable[..., Any], args: tuple[Any, ...], listener: CallListener, *,
                   timeout: float | None = None) -> _Call:
        """Run ``fn(*args)`` in a worker and tell ``listener`` how it goes; cancel what it returns to stop it.

        The lean form of :meth:`call`, with no future: must be called on the
        pool's loop, and never calls the listener before it returns. A broken
        pool makes the call ``crashed`` (with the :class:`BrokenPoolError` as
        the outcome's exception).
        """
        loop = self._loop
        if loop is None or self._closed or not (getattr(loop, "_thread_id", None) == _get_ident()  # the usual case
                                                or self._on_loop_thread()):
            return self._start_call_slowly(fn, args, listener, timeout)
        call = _Call(self, next(self._ids), timeout, listener)
        if self._broken is not None:
            loop.call_soon(call.settle, _broken_outcome(self._broken))
            return call
        try:
            call.function = function = self._pickled_function(fn)
            if function is not None and type(args) is tuple and INLINE.issuperset(map(type, args)):
                call.payload = args  # travels in the frame's own pickle, which cannot fail for these types
            else:
                call.payload = pickle.dumps(args if function is not None else (fn, args), _PROTOCOL)
        except Exception as exc:
            loop.call_soon(call.settle, _pickle_failure(fn, args, exc))
            return call
        self._pending.append(call)
        if not self._dispatching:  # calls made in one loop iteration are sent together
            self._dispatching = True
            loop.call_soon(self._dispatch)
        return call

    def _start_call_slowly(self, fn: Callable[..., Any], args: tuple[Any, ...], listener: CallListener,
                           timeout: float | None) -> _Call:
        """start_call() on a pool not started yet, or the error that says why it cannot take the call."""
        if self._loop is None:
            self.start()
        if self._closed:
            raise ClosedError("this ProcessPool is closed; create a new one")
        loop = self._loop
        assert loop is not None
        if not self._on_loop_thread():  # as start_call() asks, so that the call below takes the fast way
            if loop.is_closed():
                raise ClosedError(_LOOP_CLOSED)
            raise ConfigurationError("this ProcessPool runs on the event loop it started on: call it there (from "
                                     "another thread, use submit())")
        return self.start_call(fn, args, listener, timeout=timeout)

    def _pickled_function(self, fn: Callable[..., Any]) -> bytes | None:
        """A plain function pickled (by name) once, or None for other callables, which travel with their call.

        A builtin bound to an object (``some_list.append``) is not plain: it pickles that object's state.
        """
        if type(fn) not in _PLAIN_FUNCTIONS:
            return None
        pickled = self._functions.get(fn)  # only plain ones are kept: a hit needs no more checks
        if pickled is None:
            if not isinstance(getattr(fn, "__self__", None), types.ModuleType | None):
                return None
            if len(self._functions) >= FUNCTION_CACHE:
                self._functions.clear()
            pickled = self._functions[fn] = pickle.dumps(fn, _PROTOCOL)
        return pickled

    @property
    def pids(self) -> list[int]:
        """Process ids of the workers that are alive and in service."""
        return [w.pid for w in self._workers if not w.retiring]

    def statistics(self) -> PoolStatistics:
        return PoolStatistics(
            workers=len(self._workers),
            idle=sum(1 for w in self._ready if not w.calls),
            running=sum(1 for w in self._workers if w.call is not None),
            pending=len(self._pending),
            started=self._started,
            crashed=self._crashed,
            killed=self._killed,
        )

    # -- Executor API ------------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        """``Executor.submit``: a future of the value; a task's exception is raised from it.

        Unlike the stdlib's, ``cancel()`` works while the call runs: it kills the worker.
        """
        if kwargs:
            fn = functools.partial(fn, **kwargs)
        if self._closed or self._stopping:
            raise ClosedError("this ProcessPool is shut down; create a new one")
        self.start()
        result = _ExecutorFuture(self)
        loop = self._loop
        assert loop is not None
        if self._on_loop_thread():
            self._submit_on_loop(result, fn, args)
        elif loop.is_closed():  # it ended without aclose() or shutdown()
            raise ClosedError(_LOOP_CLOSED)
        else:
            loop.call_soon_threadsafe(self._submit_on_loop, result, fn, args)
        return result

    def _submit_on_loop(self, result: concurrent.futures.Future[Any], fn: Callable[..., Any], args: Any) -> None:
        if result.cancelled():
            result.set_running_or_notify_cancel()
            return
        try:
            inner = self.call(fn, args)
        except Exception as exc:
            _settle(result, exc, error=True)
            return
        loop = self._loop
        assert loop is not None

        def on_done(future: concurrent.futures.Future[Any]) -> None:
            # Never marked RUNNING, so cancel() keeps working until the call finishes. On the loop (the future
            # of run_in_executor() was cancelled) the worker is killed before the canceller goes on.
            if future.cancelled():
                if self._on_loop_thread():
                    inner.cancel()
                else:
                    loop.call_soon_threadsafe(inner.cancel)

        result.add_done_callback(on_done)
        inner.add_done_callback(lambda f: _settle_from_outcome(result, f))

    def _on_loop_thread(self) -> bool:
        """Whether this runs on the pool's loop: in the thread that runs it now, which need not be the one it
        started in (a stopped loop may run again in another thread). An asyncio loop keeps that thread's id,
        cheaper to compare than asyncio.get_running_loop() is to call (it asks for the pid); others are asked."""
        loop = self._loop
        if loop is None:
            return False
        if self._loop_says_its_thread:
            return getattr(loop, "_thread_id", None) == threading.get_ident()
        return _running_loop() is loop

    # -- workers -----------------------------------------------------------------------------

    def _fill(self) -> None:
        if self._closed or self._broken is not None:
            return
        for _ in range(self.size - sum(1 for w in self._workers if not w.retiring)):
            try:
                self._spawn()
            except (OSError, EOFError) as exc:  # out of descriptors, processes or memory: it goes on with fewer
                running = sum(1 for w in self._workers if not w.retiring)
                refused = self._ctx.get_start_method() == "forkserver" and (  # by a fork server as it dies
                    isinstance(exc, EOFError) or exc.errno in _SERVER_GONE)
                if refused and self._server_died(_forkserver_pid(), refused=True):
                    if not running:  # else the fill as its workers exit tries again
                        assert self._loop is not None  # a new fork server is launched by the next start
                        self._loop.call_later(SERVER_GRACE, self._fill)
                    return
                advice = ("each worker takes some six file descriptors of this process: use fewer workers, or raise "
                          "the limits (ulimit -n, ulimit -u)") if getattr(exc, "errno", None) in _OUT_OF else \
                    "check that this interpreter can start a process here"
                if not running:  # the calls would wait for ever
                    self._break(f"could not start a worker: {exc}; {advice}")
                elif not self._short:
                    self._short = True
                    warnings.warn(f"could not start a worker: {exc}; the pool runs with {running} of its {self.size} "
                                  f"workers, and tries again as each exits; {advice}", RuntimeWarning, stacklevel=1)
                return  # tried again when a worker exits

    def _server_died(self, server: int | None, *, refused: bool = False) -> bool:
        """Whether fork server ``server`` (None: no fork server) has died, or ``refused`` a start, as it does as it
        exits. Told MAX_SERVER_DEATHS times in a row at most, for deaths and refusals (until a worker is ready), so
        a server that dies as it starts, or keeps refusing, breaks the pool instead of starting workers for ever."""
        if server is None or not (refused or _forkserver_gone(server)):
            return False
        self._dead_servers.add(server)
        self._refusals += refused
        return len(self._dead_servers) + self._refusals <= MAX_SERVER_DEATHS

    def _spawn(self) -> None:
        loop = self._loop
        assert loop is not None
        with contextlib.ExitStack() as opened:  # closed again if the worker cannot start
            parent_sock, child_sock = socket.socketpair()
            opened.enter_context(parent_sock)
            opened.enter_context(child_sock)
            doorbell, child_doorbell = socket.socketpair()
            opened.enter_context(doorbell)
            opened.enter_context(child_doorbell)
            results, child_results = os.pipe()
            opened.callback(os.close, results)
            child_conns = (Connection(child_sock.detach()), Connection(child_doorbell.detach()),
                           Connection(child_results))
            try:
                shared = self._ctx.RawValue("q", -1), self._ctx.RawValue("q", 0)  # last_begun, revokes
                process = self._ctx.Process(target=worker_main, args=(*child_conns, *shared),
                                            name="asyncsched-worker")
                process.start()
            finally:
                for conn in child_conns:
                    conn.close()
            opened.pop_all()  # started: the parent's ends are the worker's now
        parent_sock.setblocking(False)
        doorbell.setblocking(False)
        os.set_blocking(results, False)
        server = _forkserver_pid() if self._ctx.get_start_method() == "forkserver" else None
        worker = _Worker(process, parent_sock, doorbell, results, *shared, pidfd=self._pidfd(process), server=server)
        self._workers.add(worker)
        self._started += 1
        assert self._all_exited is not None
        self._all_exited.clear()
        loop.add_reader(worker.results, self._on_readable, worker)
        loop.add_reader(worker.exit_fd, self._on_exit, worker)

    def _pidfd(self, process: Any) -> int | None:
        """A pidfd of the worker (Linux), to watch for its exit: a child its task forks holds the write end of
        a fork or spawn worker's sentinel, which would then say nothing until that child too has ended. Not
        under forkserver, whose sentinel is the fork server's and says the exit status too."""
        if self._ctx.get_start_method() == "forkserver":
            return None
        try:
            return os.pidfd_open(process.pid)
        except (AttributeError, OSError):  # not Linux (5.3 or later)
            return None

    def _retire(self, worker: _Worker) -> None:
        """Take a worker out of service; it exits once it has run what it was sent."""
        worker.retiring = True
        with contextlib.suppress(ValueError):
            self._ready.remove(worker)
        self._send(worker, pickle.dumps(None))
        self._fill()
        self._leave_or_kill(worker)

    def _leave_or_kill(self, worker: _Worker) -> None:
        """Kill a retiring worker that is still here ``RETIRE_GRACE`` after it was seen done with its calls."""
        loop = self._loop
        if loop is None or loop.is_closed() or worker.killed or worker not in self._workers:
            return  # exited, killed, or the pool closed
        if any(not call.done for call in worker.calls):
            worker.idle_since = None
        elif worker.idle_since is None:
            worker.idle_since = loop.time()
        elif loop.time() - worker.idle_since >= RETIRE_GRACE:
            self._kill(worker)
            return
        loop.call_later(RETIRE_GRACE, self._leave_or_kill, worker)

    def _kill(self, worker: _Worker) -> None:
        """SIGKILL the worker's process group: the worker and its task's own children.

        Not SIGTERM: a task that handles it could end its call and let the
        worker start the next one, which the kill would then take down.
        The running call must be settled by the caller. The calls queued behind
        it go back to the front of the pending deque once the worker has exited
        (``_on_exit``): the results it wrote until then are read first, so a call
        it finished and the one it started meanwhile are known, and no call that
        has run is given back.
        """
        if worker.killed:
            return
        worker.killed = worker.retiring = True
        self._killed += 1
        if worker.deadline is not None:
            worker.deadline.cancel()
        with contextlib.suppress(ValueError):
            self._ready.remove(worker)
        worker.signal(signal.SIGKILL)
        self._fill()

    def _requeue(self, worker: _Worker) -> None:
        """Give back the calls of a worker that has exited which are not settled: they never started.

        Those are the calls queued behind its running one and, if it died before it began that one (the
        ``last_begun`` it shares with the pool says so), the running one too. That one goes back once only: a
        call whose worker dies again before beginning it (say, its arguments are too large to take in) is
        crashed, or it could kill workers for ever. A pool that has broken or closed meanwhile settles them
        instead: no worker will take them.
        """
        calls, worker.calls = worker.calls, deque()
        waiting = [call for call in calls if not call.done]
        if self._broken is not None or self._closed:
            outcome = _broken_outcome(self._broken) if self._broken is not None else _CLOSED
            for call in waiting:
                call.settle(outcome)
            return
        for call in reversed(waiting):
            call.worker = None
            self._pending.appendleft(call)
        self._dispatch()

    def _on_exit(self, worker: _Worker) -> None:
        loop = self._loop
        assert loop is not None
        loop.remove_reader(worker.exit_fd)
        self._read(worker)  # results sent just before the exit still count
        loop.remove_reader(worker.results)
        worker.polled = False
        if worker.outbuf:
            loop.remove_writer(worker.fd)
        worker.process.join()
        code = worker.process.exitcode  # None if something else reaped it (e.g. psutil's wait())
        worker.close()
        with contextlib.suppress(ValueError):
            worker.process.close()
        worker.signal(signal.SIGKILL)  # the task's own children, whatever ended the worker
        self._workers.discard(worker)
        with contextlib.suppress(ValueError):
            self._ready.remove(worker)
        if worker.deadline is not None:
            worker.deadline.cancel()
        running = worker.call
        unexpected = (running is not None and not running.done) or not (worker.ready or worker.retiring)
        server_died = unexpected and self._server_died(worker.server)  # asked only then: a process lookup
        if running is None or running.done or running.given_back or worker.in_call:
            died_with = " with the fork server that started it" if server_died else ""
            self._crash_running_call(worker, f"worker {worker.pid} {_describe_exit(code)}{died_with}")
        else:  # the worker died before it began its running call: that goes back, once (see _requeue)
            running.given_back = True
        if not worker.ready and not worker.retiring and not server_died:  # else no fault of its own
            self._start_failures += 1
            if self._start_failures >= MAX_START_FAILURES:
                self._break(f"{self._start_failures} workers in a row {_describe_exit(code)} before they were "
                            "ready; check that the task module imports cleanly in a fresh process, and that a "
                            "script which runs tasks does so under if __name__ == \"__main__\": (each new worker "
                            "imports the script)")
        if not self._workers:
            assert self._all_exited is not None
            self._all_exited.set()
        self._requeue(worker)
        self._fill()

    def _break(self, why: str) -> None:
        if self._broken is not None:
            return  # broken once: every call since has been given that error
        self._broken = broken = BrokenPoolError(why)
        for call in self._pending:
            call.settle(_broken_outcome(broken))
        self._pending.clear()

    # -- the wire ----------------------------------------------------------------------------

    def _on_readable(self, worker: _Worker) -> None:
        loop = self._loop
        assert loop is not None
        if not self._read(worker):
            loop.remove_reader(worker.results)  # EOF: the sentinel tells the rest
        elif self._worth_polling(worker):
            loop.remove_reader(worker.results)
            worker.polled = True
            if self._polling is None:
                self._polling = loop.call_later(POLL_SECONDS, self._poll)

    def _worth_polling(self, worker: _Worker) -> bool:
        """Whether the worker's calls end often enough for its pipe to be read on a timer (``POLL_SECONDS``), and
        it has calls queued behind its running one for that long at least: it never waits for the timer with
        nothing to run. Not while a message is half read: a large result is read as it comes."""
        average = self._average
        return (POLL_FROM <= average < BATCH_SECONDS and (len(worker.calls) - 1) * average >= POLL_SECONDS
                and not worker.inbuf and not worker.killed)

    def _poll(self) -> None:
        """Read every polled worker. One no longer worth polling is watched again, and so is one that sent
        nothing while its running call has run longer than ``BATCH_SECONDS``: that call's end is read as it
        comes."""
        self._polling = None
        loop = self._loop
        assert loop is not None
        try:
            for worker in list(self._workers):
                if not worker.polled:
                    continue  # or it exited meanwhile
                received = worker.received
                if not self._read(worker):
                    worker.polled = False  # EOF: the sentinel tells the rest
                elif not self._worth_polling(worker) or (
                        worker.received == received and loop.time() - worker.began > BATCH_SECONDS):
                    worker.polled = False
                    loop.add_reader(worker.results, self._on_readable, worker)
        finally:  # whatever a read raised, the workers left polled are read again
            if any(worker.polled for worker in self._workers):
                self._polling = loop.call_later(POLL_SECONDS, self._poll)

    def _read(self, worker: _Worker) -> bool:
        """Read what the worker has sent and handle each whole message; False at EOF.

        Never runs inside another read: listeners, which might cancel a call (and so read), are told what a
        read found only once it has handled all of it (see _tell).
        """
        assert self._held is None
        buf = worker.inbuf
        had = len(buf)
        alive = True
        while True:
            try:
                data = os.read(worker.results, _READ_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                data = b""
            if not data:
                alive = False
                break
            buf += data
            if len(data) < _READ_SIZE:
                break
        worker.received += len(buf) - had
        held: list[tuple[_Call, Callable[..., None], tuple[Any, ...]]] = []
        self._held = held
        pos, end = 0, len(buf)
        assert self._loop is not None
        now = self._loop.time()  # for every call that begins as this read finds its worker free
        average = self._average
        try:
            while end - pos >= 4:
                (size,) = HEADER.unpack_from(buf, pos)
                head = 4
                if size == -1:
                    if end - pos < BIG_HEADER.size:
                        break
                    size = BIG_HEADER.unpack_from(buf, pos)[1]
                    head = BIG_HEADER.size
                if end - pos - head < size:
                    break
                frame = buf[pos + head: pos + head + size]
                pos += head + size
                try:
                    message = pickle.loads(frame)
                    if message[0] != DONE:
                        self._on_message(worker, message)
                        continue
                    _, call_id, how, value, started, finished = message  # the one message of every call
                    duration = finished - started
                    if how != VALUE and how != PICKLED and not _is_error_info(value):
                        raise ValueError(f"a DONE message whose error is not an ErrorInfo: {value!r:.200}")
                except Exception as exc:  # never from the wire format itself: the worker is not to be trusted
                    self._on_unreadable(worker, exc)
                    break
                calls = worker.calls
                if not calls or calls[0].call_id != call_id:
                    continue  # the worker was killed meanwhile and its calls given back
                call = calls.popleft()
                average += 0.2 * (duration - average)
                if not call.done:  # call.settle(), inlined: this runs for every call
                    call.done = True
                    held.append((call, call.listener.finished, (
                        Outcome(_COMPLETED, value, None, None, None, None, worker.pid, started, finished)
                        if how == VALUE else _outcome(worker.pid, how, value, started, finished),)))
                    if self._progress is not None:
                        self._progressed()
                if calls:  # self._next(), its usual case inlined
                    following = calls[0]  # told below if it still runs then, unless told it started elsewhere
                    self._begin(worker, following, now, tell=following.given_back)
                else:
                    self._next(worker, now)
            if pos:
                self._average = average
                self._dispatch()  # the calls it starts are told after the results that made room for them
        finally:
            del buf[:pos]
            self._tell_begun(worker)  # a call that began and ended in this read is told only that it ended
            self._held = None
            for call, method, args in held:
                if not call.cancelled:  # else a listener cancelled it meanwhile: nothing more about it
                    try:
                        method(*args)
                    except (SystemExit, KeyboardInterrupt):
                        raise
                    except BaseException as exc:  # as in _call_listener(), inlined: this runs twice for every call
                        self._listener_failed(exc)
        if not worker.calls and not self._pending and self._balancing is None and worker in self._ready:
            assert self._loop is not None  # after the listeners' new calls are dispatched (call_soon, too)
            self._balancing = self._loop.call_soon(self._balance)
        return alive

    def _on_unreadable(self, worker: _Worker, exc: Exception) -> None:
        """The worker sent a message that does not unpickle here: its running call is crashed, and it is killed."""
        self._crash_running_call(worker, f"worker {worker.pid} sent a message that cannot be read here "
                                         f"({error_info(exc)[1]}); it was killed")
        self._kill(worker)

    def _crash_running_call(self, worker: _Worker, error: str, error_type: str = "WorkerCrash") -> None:
        """Settle the worker's running call, if it has not ended, as ``crashed`` with ``error``."""
        call = worker.call
        if call is not None and not call.done:
            if worker.in_call:
                self._tell_begun(worker)  # it began in the read that found it crashed, say
            self._crashed += 1
            call.settle(Outcome(Status.CRASHED, error=error, error_type=error_type, pid=worker.pid))

    def _on_message(self, worker: _Worker, message: tuple[Any, ...]) -> None:
        """Any message but DONE (see _read)."""
        kind = message[0]
        if kind == REVOKED:
            self._on_revoked(worker, message[1])
        elif kind == REPORT:
            running = worker.call
            if running is not None and running.call_id == message[1] and not running.done:
                self._tell_begun(worker)  # it reports: it runs, even if it is being asked back
                _, _, timestamp, text, progress, data = message
                self._tell(running, running.listener.reported,
                           (worker.pid, timestamp, text, progress, report_data(data)))
        elif kind == READY:
            worker.ready = True
            self._start_failures = self._refusals = 0
            self._dead_servers.clear()
            limit = self._max_memory
            rss = 0 if limit is None else _rss(worker.pid) or 0
            if self._ctx.get_start_method() == "fork":
                worker.inherited = rss  # copies of the parent's pages: its RSS counts them, though they are shared
            elif limit is not None and rss > limit:
                self._break(f"a worker takes {rss / 2**20:.0f} MiB before it runs anything, more than "
                            f"max_memory_per_child={limit / 2**20:.0f} MiB: every task would be killed; raise the "
                            "limit above what your largest task needs")
            if self._closed or self._broken is not None:
                self._retire(worker)
            else:
                self._ready.append(worker)

    def _next(self, worker: _Worker, now: float | None = None) -> None:
        """The worker's running call has ended, or was revoked: the next one begins, or it retires."""
        worker.deadline_at = None  # the timer, if any, stays: it re-checks when it fires
        worker.begun = worker.told = None  # an idle worker keeps nothing of its last call (its listener, its args)
        if worker.calls:
            self._begin(worker, worker.calls[0], now)
        elif worker.retiring:
            pass  # it exits now; the sentinel follows
        elif self._max_tasks is not None and worker.calls_sent >= self._max_tasks:
            self._retire(worker)

    def _on_revoked(self, worker: _Worker, call_ids: list[int]) -> None:
        """The worker answered the oldest revoke: it took these calls out of its queue, and they never
        started. The cancelled ones are dropped, the others (taken back for an idle worker) go to the front
        of the pending queue. The head may have been one of them, or waited for this answer to begin."""
        if worker.revoking:
            worker.revoking.popleft()
        revoked = set(call_ids)
        back = [call for call in worker.calls if call.call_id in revoked]
        if back:
            worker.calls = deque(call for call in worker.calls if call.call_id not in revoked)
            worker.calls_sent -= len(back)
            for call in reversed(back):
                if not call.done:
                    call.worker = None
                    self._pending.appendleft(call)
        head = worker.call
        if head is not worker.begun:  # the head was taken back
            self._next(worker)
        elif head is not None and head is not worker.told:
            self._tell_started(worker, head)  # kept: its listener hears of it now
        if back:
            self._dispatch()

    def _send(self, worker: _Worker, data: bytes) -> bool:
        """Send one frame without blocking; False if the worker can no longer be reached."""
        header = frame_header(len(data))
        if worker.outbuf:
            worker.outbuf += header + data
            return True
        try:
            sent = worker.sock.sendmsg([header, data])
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            return False  # the worker is gone; its sentinel will say so
        total = len(header) + len(data)
        if sent < total:
            worker.outbuf += (header + data)[sent:]
            assert self._loop is not None
            self._loop.add_writer(worker.fd, self._on_writable, worker)
        return True

    def _on_writable(self, worker: _Worker) -> None:
        try:
            sent = worker.sock.send(worker.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            sent = len(worker.outbuf)
        del worker.outbuf[:sent]
        if not worker.outbuf:
            assert self._loop is not None
            self._loop.remove_writer(worker.fd)

    # -- scheduling --------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """How many calls one worker may hold now: one for slow tasks, up to ``MAX_DEPTH`` while tasks are fast."""
        return max(1, min(MAX_DEPTH, int(BATCH_SECONDS / max(self._average, 1e-6))))

    def _dispatch(self) -> None:
        """Send pending calls to the least loaded ready workers, a frame per worker."""
        self._dispatching = False
        pending = self._pending
        if not pending or not self._ready:
            return
        depth = self.depth
        # Refill a worker once half of its calls are done: fewer, larger frames. Calls slow enough to be polled
        # for are kept topped up instead, so that a poll's worth of them stays queued (see _worth_polling).
        refill_at = depth // 2 if self._average < POLL_FROM else depth - 1
        share = -(-len(pending) // self.size)  # a few calls go to several workers (one still starting included)
        assert self._loop is not None
        slow_since = self._loop.time() - TAKE_BACK_AFTER
        for worker in sorted(self._ready, key=lambda w: len(w.calls)):  # a copy: the loop may remove some
            if len(worker.calls) > refill_at:
                break
            if worker.calls and worker.began < slow_since:
                continue  # nothing more waits behind a call that runs long: it goes to whichever worker frees first
            room = min(depth - len(worker.calls), share)
            if self._max_tasks is not None:
                room = min(room, self._max_tasks - worker.calls_sent)
            batch: list[tuple[int, bytes | None, bytes | tuple[Any, ...]]] = []
            while pending and len(batch) < room:
                call = pending.popleft()
                if call.done:
                    continue  # cancelled while pending
                call.worker = worker
                worker.calls.append(call)
                batch.append((call.call_id, call.function, call.payload))
            if not batch:
                continue
            if not self._send(worker, pickle.dumps(batch, _PROTOCOL)):
                # It died while idle: the calls never reached it, so they go back, not crashed.
                for _ in batch:
                    pending.appendleft(worker.calls.pop())
                worker.retiring = True
                self._ready.remove(worker)
                continue
            worker.calls_sent += len(batch)
            if len(worker.calls) == len(batch):  # it was idle: the first call starts now
                self._begin(worker, worker.calls[0])
            if not pending:
                return

    def _balance(self) -> None:
        """With a worker idle and nothing pending, take back the back half of the calls queued behind a call
        that has run ``TAKE_BACK_AFTER`` (the worker answers with those it has not started: see _on_revoked).
        So no call waits behind a slow or hung one while a worker is idle."""
        self._balancing = None
        loop = self._loop
        if loop is None or self._closed or self._pending or all(worker.calls for worker in self._ready):
            return
        queued = {worker: [call for call in itertools.islice(worker.calls, 1, None) if not call.done]
                  for worker in self._ready if not worker.revoking}
        busiest = max(queued, key=lambda worker: len(queued[worker]), default=None)
        if busiest is None or not queued[busiest]:
            return
        due = busiest.began + TAKE_BACK_AFTER
        if due > loop.time():
            self._balancing = loop.call_at(due, self._balance)
            return
        calls = queued[busiest]
        self._revoke(busiest, {call.call_id for call in calls[len(calls) // 2:]})

    def _begin(self, worker: _Worker, call: _Call, now: float | None = None, *, tell: bool = True) -> None:
        """``call`` has reached the head of its worker: it runs now, and its timeout starts.

        One timer per worker serves a stream of fast calls: it is re-armed when
        it fires rather than replaced for every call. A call cancelled while it
        was queued has been revoked, and the worker skips it; if the worker had
        started it before the revoke came, it gets at most ``ABANDONED_GRACE``,
        then its worker is killed. A call asked back is timed from here too (it
        may run, holding the GIL so that the worker cannot answer), but its
        listener hears that it started only once the worker has kept it.
        ``now`` is the loop's time, when the caller has it already. ``tell=False``
        leaves telling the listener to the caller (see _tell_begun).
        """
        loop = self._loop
        assert loop is not None
        if now is None:
            now = loop.time()
        worker.began = now
        worker.begun = call
        timeout = call.timeout
        if call.done:
            timeout = ABANDONED_GRACE if timeout is None else min(timeout, ABANDONED_GRACE)
        if timeout is None:
            worker.deadline_at = None
        else:
            worker.deadline_at = deadline = now + timeout
            timer = worker.deadline
            if timer is not None and worker.timer_at > deadline:
                timer.cancel()
                timer = None
            if timer is None:
                worker.deadline = loop.call_at(deadline, self._on_deadline, worker)
                worker.timer_at = deadline
        if tell and not self._asked_back(worker, call):
            self._tell_started(worker, call)
        else:
            worker.told = None  # told later: see _tell_begun, and _on_revoked for a call asked back

    @staticmethod
    def _asked_back(worker: _Worker, call: _Call) -> bool:
        return bool(worker.revoking) and any(call.call_id in asked for asked in worker.revoking)

    def _tell_begun(self, worker: _Worker) -> None:
        """Tell the listener of the worker's running call that it started, unless it has been told. A call
        being asked back, or whose worker was killed, is told only if the worker says it began it
        (``in_call``): else it may never run there (see _on_revoked, _requeue).

        ``_read`` tells it only once it has read all that came: a call that began and ended within one
        read is told only that it ended, and its outcome says when it started, and where.
        """
        head = worker.call
        if head is not None and head is worker.begun and head is not worker.told and (
                not (worker.killed or self._asked_back(worker, head)) or worker.in_call):
            self._tell_started(worker, head)

    def _tell_started(self, worker: _Worker, call: _Call) -> None:
        worker.told = call
        if not call.done:
            self._tell(call, call.listener.started, (worker.pid, time.time()))

    def _on_deadline(self, worker: _Worker) -> None:
        worker.deadline = None
        loop = self._loop
        if worker.deadline_at is None or worker.killed or loop is None:
            return
        if worker.deadline_at > loop.time():  # a later call is running: wait for its deadline
            worker.deadline = loop.call_at(worker.deadline_at, self._on_deadline, worker)
            worker.timer_at = worker.deadline_at
            return
        self._read(worker)  # the result may already be here (then a new call may have begun)
        call = worker.call
        if call is None or worker.deadline_at is None or worker.deadline_at > loop.time():
            return
        if not call.done and self._still_sending(worker, call):
            worker.deadline = loop.call_later(SENDING_GRACE, self._on_deadline, worker)
            worker.timer_at = loop.time() + SENDING_GRACE
            return
        if not call.done and (worker.in_call or call.given_back):  # else it was abandoned: nobody waits for it;
            if worker.in_call:
                self._tell_begun(worker)  # it ran, even if it was being asked back
            call.settle(Outcome(  # or the worker never began it (stopped, say): it goes back, once, as it exits
                Status.TIMED_OUT, error=f"timed out after {call.timeout:g}s; worker {worker.pid} was killed",
                error_type="TimeoutError", pid=worker.pid))
        self._kill(worker)

    @staticmethod
    def _still_sending(worker: _Worker, call: _Call) -> bool:
        """Whether the worker is still sending the message it had begun to send at its running call's deadline.

        That message is most likely the call's result, of a size that takes time to send: it is waited for while
        its bytes keep coming. One message only: a task that sends report after report past its deadline, or
        stops halfway through a message, is killed.
        """
        if not worker.inbuf:
            return False
        begun = worker.received - len(worker.inbuf)  # where the message being read began
        seen, worker.sending = worker.sending, (call.call_id, begun, worker.received)
        return seen is None or seen[0] != call.call_id or (seen[1] == begun and seen[2] < worker.received)

    def _check_memory(self) -> None:
        limit = self._max_memory
        if self._closed or limit is None or self._loop is None:
            return
        for worker in list(self._workers):
            if worker.call is None or worker.killed:
                continue
            rss = _rss(worker.pid)
            if rss is None or rss - worker.inherited <= limit:
                continue  # (None: it is exiting; the sentinel tells)
            rss -= worker.inherited
            self._read(worker)  # a call that has just finished is not the one to blame
            running = worker.call
            if running is not None and not worker.killed:
                if worker.in_call:  # else it is between two calls: the call it was sent goes back
                    self._crash_running_call(worker, f"worker {worker.pid} used {rss / 2**20:.0f} MiB, over "
                                                     f"max_memory_per_child={limit / 2**20:.0f} MiB; it was killed",
                                             "MemoryError")
                self._kill(worker)
        self._loop.call_later(MEMORY_CHECK_SECONDS, self._check_memory)

    def _on_cancel(self, call: _Call) -> None:
        worker = call.worker
        if worker is not None and worker.call is call:
            self._read(worker)  # it may have finished, and the call after it started: only a running call is killed
            if worker.call is call:
                self._kill(worker)
        if worker is not None and call in worker.calls and worker.call is not call:
            self._revoke(worker, {call.call_id})
        # a call still pending is skipped by _dispatch
        self._progressed()

    def _revoke(self, worker: _Worker, call_ids: set[int]) -> None:
        """Ask ``worker`` for these calls back, queued there behind another; it answers with the ones it had
        not started (see _on_revoked; a cancelled one it had started gets ``ABANDONED_GRACE``, see _begin)."""
        worker.revokes.value += 1  # before the frame: the worker looks for it before each call until it has it
        if not worker.killed and self._send(worker, pickle.dumps(call_ids, _PROTOCOL)):
            worker.revoking.append(call_ids)
            with contextlib.suppress(OSError):  # full: it rings already; gone: its exit tells the rest
                worker.doorbell.send(b"!")


_LOOP_CLOSED = ("the event loop this ProcessPool started on is closed (a pool lives on one loop): close it, and "
                "create a new one on this loop")


def _call_on(loop: asyncio.AbstractEventLoop, function: Callable[[], None]) -> None:
    """Run ``function`` on ``loop``, which runs in another thread, and wait until it has (its error raises here)."""
    async def call() -> None:
        function()

    asyncio.run_coroutine_threadsafe(call(), loop).result()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _rss(pid: int) -> int | None:
    """The resident memory of process ``pid``, None if it is gone."""
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return None


def _outcome(pid: int, how: int, value: Any, started: float, finished: float) -> Outcome:
    """The Outcome a DONE message carries with a PICKLED value or an ERROR (see ``_worker``; _read builds that
    of a plain VALUE)."""
    if how == PICKLED:
        try:
            value = pickle.loads(value)
        except BaseException as exc:  # e.g. its class cannot be imported here, or a reducer calls sys.exit()
            return unreadable_result(exc, pid=pid, started_at=started, finished_at=finished)
        return Outcome(Status.COMPLETED, value, None, None, None, None, pid, started, finished)
    return Outcome.from_error(value, pid=pid, started_at=started, finished_at=finished)  # ERROR (checked by _read)


def _is_error_info(value: Any) -> bool:
    """Whether ``value`` is an ``ErrorInfo`` (see ``_worker``)."""
    return (type(value) is tuple and len(value) == 4 and all(type(text) is str for text in value[:3])
            and (value[3] is None or type(value[3]) is bytes))


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: float | str | None) -> int | None:
    """Bytes from a number or a string like ``"512MB"`` or ``"1.5GiB"``."""
    if size is None or (is_int(size) and size > 0):
        return size
    if isinstance(size, float) and 1 <= size < math.inf:
        return int(size)
    if isinstance(size, str):
        text = size.strip().upper().replace(" ", "")
        number = text.rstrip("BKMGI")
        unit = text[len(number):]
        try:
            value = float(number) * _UNITS[unit]
        except (ValueError, KeyError):
            value = 0
        if 1 <= value < math.inf:  # "infGB", "1e400"
            return int(value)
    raise ConfigurationError(f'a memory limit is a positive number of bytes or a string like "512MB", got {size!r}')


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "ended with an unknown status"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with code {code}"


_CLOSED = Outcome(Status.CANCELLED, error="the pool was closed", error_type="asyncio.CancelledError")


def _broken_outcome(broken: BrokenPoolError) -> Outcome:
    return Outcome(Status.CRASHED, error=f"BrokenPoolError: {broken}", error_type="BrokenPoolError", exception=broken,
                   retryable=False)  # the pool stays broken: another attempt would only wait out its backoff


def _pickle_failure(fn: Callable[..., Any], args: tuple[Any, ...], exc: Exception) -> Outcome:
    what = f"the function {fn!r}"
    for position, arg in enumerate(args):
        try:
            pickle.dumps(arg, _PROTOCOL)
        except Exception as arg_exc:
            what, exc = f"argument {position} ({type(arg).__name__})", arg_exc
            break
    text = f"PicklingError: {what} could not be pickled: {type(exc).__name__}: {exc}"
    return Outcome(Status.FAILED, error=text, error_type="pickle.PicklingError", retryable=False)


def _settle(result: concurrent.futures.Future[Any], value: Any, *, error: bool) -> None:
    with contextlib.suppress(concurrent.futures.InvalidStateError):  # cancelled meanwhile
        if error:
            result.set_exception(value)
        else:
            result.set_result(value)


def _settle_from_outcome(result: concurrent.futures.Future[Any], inner: asyncio.Future[Outcome]) -> None:
    if inner.cancelled():
        result.cancel()
    elif (exc := inner.exception()) is not None:
        _settle(result, exc, error=True)
    elif (outcome := inner.result()).status is Status.COMPLETED:
        _settle(result, outcome.value, error=False)
    else:
        _settle(result, outcome.exception or task_error(outcome.status, None, outcome.error, outcome.traceback),
                error=True)
    if result.cancelled():  # as an executor must, or wait() and as_completed() never count it done
        result.set_running_or_notify_cancel()
