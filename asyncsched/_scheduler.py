"""The scheduler: batches in, results and events out.

Data flow for one batch::

    batch (iterable or async iterable of Task), pulled lazily: at most `window` in flight
        |
        v
    _Record (parent-side state of one task: attempts, last message, the running attempt)
        |  Attempt (a new one for each attempt); the record is its listener
        v
    Backend.run_attempt(attempt, record) --> a handle to cancel it
        |                                          |
        | record.started() / reported()            | record.finished(outcome): retry later
        v                                          v (RetryPolicy) or finish
    EventHub --> every events() stream   TaskResult --> Store.add() and the batch's ready queue
                                                              |
                                                              v
                                         stream() yields it; run() collects and sorts them

The scheduler knows backends and stores only through their interfaces. It
owns retries, persistence, cancellation and the events fan-out.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import math
import operator
import os
import signal
import threading
import time
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
    Sized,
)
from typing import TYPE_CHECKING, Any, TypeVar

from ._backend import Backend, Cancellable, backend_failure, default_backend
from ._errors import ClosedError, ConfigurationError, StoreError, TaskDefinitionError
from ._events import DEFAULT_EVENT_BUFFER, EventHub, EventStream
from ._models import (
    Attempt,
    Event,
    Outcome,
    RetryPolicy,
    Stats,
    Status,
    Summary,
    Task,
    TaskFinished,
    TaskReported,
    TaskResult,
    TaskRetried,
    TaskStarted,
    is_int,
    is_seconds,
)
from ._store import MAX_BACKLOG, BatchInfo, Store, check_batch_id, check_status, open_store, stored_text

if TYPE_CHECKING:
    from ._progress import ProgressMonitor

__all__ = ["Scheduler"]

_handling_sigterm = 0
"""Schedulers of this process whose loop handles SIGTERM now."""


def _after_fork_in_child() -> None:
    """A process forked while a Scheduler's loop handles SIGTERM (a stdlib pool's worker, a task's child) ends on
    SIGTERM, and alone: the loop's handler would ignore it, and pass it on to the parent through the loop's wakeup
    fd, which the child shares (Python 3.11)."""
    if _handling_sigterm:
        with contextlib.suppress(ValueError):  # forked from a thread other than the main one: nothing was shared
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


os.register_at_fork(after_in_child=_after_fork_in_child)

Batch = Iterable[Task] | AsyncIterable[Task]
T = TypeVar("T")

MIN_WINDOW = 16

_END: Any = object()


def _check_batch(batch: object) -> None:
    if isinstance(batch, str | bytes | bytearray | Mapping):  # iterable, but of characters, bytes or keys
        values = "; to run the tasks of a dict, pass its values()" if isinstance(batch, Mapping) else ""
        raise TaskDefinitionError(f"a batch is an iterable or async iterable of Task, got a "
                                  f"{type(batch).__name__}{values}")
    if not isinstance(batch, AsyncIterable | Iterable):
        raise TaskDefinitionError(f"a batch is an iterable or async iterable of Task, got {type(batch).__name__}")


def _room(window: int, run: _BatchRun) -> int:
    """How many tasks ``run`` may hold: tasks waiting for a retry take no room, up to a window of them."""
    return window + min(run.backing_off, window)


def _source_raised(exc: BaseException) -> str:
    return f"the batch's source raised {type(exc).__name__}: {exc}; the batch was cancelled"


class _Feed:
    """The items of an async batch, pulled beside its run by a task of their own and admitted as they come, while
    the run has room for them.

    A source that does not wait (most async generators, most of the time) so hands over all the run has room for in
    one turn of the loop, rather than one item a turn; and results still go out while a source that waits waits.
    """

    def __init__(self, source: AsyncIterator[object], take: Callable[[object], bool], wake: Callable[[], None]) -> None:
        self._source = source
        self._take = take  # admits an item (or _END); whether the run has room for another
        self._wake = wake  # the run's stream
        self._asked: asyncio.Future[None] | None = None  # the puller waits on it for room
        self.error: BaseException | None = None  # what the source raised, or admitting an item: the run raises it
        self.why: str | None = None  # what to record the tasks in flight with, then
        self.task = asyncio.ensure_future(self._pull())

    def ask(self) -> None:
        """The run has room again: pull on."""
        if self._asked is not None and not self._asked.done():
            self._asked.set_result(None)

    async def _pull(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    item = await anext(self._source, _END)
                except (Exception, asyncio.CancelledError) as exc:
                    if isinstance(exc, asyncio.CancelledError) and self.task.cancelling():
                        raise  # the run ends and stops the feed
                    self.why = _source_raised(exc)  # a cancellation of its own too: the run would wait for ever
                    self.error = exc
                    self._wake()
                    return
                if not self._take(item):
                    if item is _END:
                        return
                    self._asked = loop.create_future()
                    await self._asked
        except Exception as exc:
            self.error = exc
            self._wake()


_COMPLETED, _RUNNING = Status.COMPLETED, Status.RUNNING
"""For the code that runs for every task: an enum member costs a lookup each time (Python 3.11)."""


class _Record:
    """What the parent keeps about one task of a running batch.

    It is also the :class:`AttemptListener` of the task's attempts: the backend
    calls it directly, with no future or event in between. An event is
    published only when some consumer wants its kind.
    """

    __slots__ = ("args", "attempts", "fn", "index", "key", "message", "progress", "retries", "retry_handle", "run",
                 "running", "running_pid", "running_since", "timeout")

    def __init__(self, run: _BatchRun, index: int, key: str, fn: Any, args: tuple[Any, ...], timeout: float | None,
                 retries: int) -> None:
        self.run = run
        self.index = index
        self.key = key
        self.fn = fn
        self.args = args
        self.timeout = timeout
        self.retries = retries
        self.attempts = 0
        self.running: Cancellable | None = None  # the attempt in the backend's hands
        self.running_since: float | None = None  # when that attempt started running, once it has
        self.running_pid: int | None = None  # and in which process
        self.retry_handle: asyncio.TimerHandle | None = None
        self.message: str | None = None
        self.progress: float | None = None

    def started(self, pid: int | None, timestamp: float) -> None:
        self.running_since = timestamp
        self.running_pid = pid
        hub = self.run.hub
        if TaskStarted in hub.wanted:
            hub.publish(TaskStarted, self.run.batch_id, self.key, _RUNNING, timestamp, pid, None, None, self.attempts)

    def reported(self, pid: int | None, timestamp: float, message: str | None, progress: float | None,
                 data: dict[str, Any]) -> None:
        if message is not None:
            self.message = message
        if progress is not None:
            self.progress = progress
        hub = self.run.hub
        if TaskReported in hub.wanted:
            hub.publish(TaskReported, self.run.batch_id, self.key, _RUNNING, timestamp, pid, message, progress,
                        self.attempts, data or None)

    def finished(self, outcome: Outcome) -> None:
        if self.running is not None:  # else cancelled meanwhile: cancel_all() records the task
            self.running = None
            run = self.run
            if self.running_since is None and outcome.started_at is not None:
                self.started(outcome.pid, outcome.started_at)  # it ended before the backend told it started
            try:
                if outcome.status is _COMPLETED:  # never retried: recorded at once
                    run.record(self, outcome)
                else:
                    run.finished(self, outcome)
            except Exception as exc:  # e.g. a store that cannot take the result: the run fails with it
                run.abort(exc)


class _BatchRun:
    """The live state of one batch: what is in flight, what is ready to hand out, and running counts.

    The counts (``counts`` by final status, ``retries``, and ``busy`` seconds
    over ``timed`` tasks with a known duration) cost a few additions per task;
    a progress display reads them instead of counting every event.
    """

    def __init__(self, scheduler: Scheduler, batch_id: str) -> None:
        self.batch_id = batch_id
        self.started = time.monotonic()
        self.loop = asyncio.get_running_loop()
        self.backend = scheduler._backend
        self.store = scheduler._store
        self.hub = scheduler._hub
        self.policy = scheduler._retry_policy
        self.records: dict[int, _Record] = {}
        self.ready: list[TaskResult] = []
        self.waiter: asyncio.Future[None] | None = None
        self.eager = True  # wake the stream for every result; run() needs them only to make room in the window
        self.low_water = 0  # else wake it once no more than this many tasks are in flight, not counting
        self.backing_off = 0  # those waiting for a retry, which hold no worker
        self.aborted: BaseException | None = None
        self.total: int | None = None  # tasks this run will finish, once known; known once it is over
        self.skipped = 0  # items of a resumed batch with a stored result, not run again
        self.resumed: list[TaskResult] | None = None  # their results, at their positions here, for run() to keep
        self.stored: Mapping[str, TaskResult] = {}  # for run(): the stored results of the batch, by key as stored
        self.stopped: str | None = None  # why the batch was cancelled (Scheduler.cancel)
        self.begun = False  # the store has begun the batch
        self.ended: asyncio.Future[None] = self.loop.create_future()  # the run is over, the store has ended the batch
        self.ending: asyncio.Task[None] | None = None  # the end of its stream: the store ends the batch
        self.counts: dict[Status, int] = dict.fromkeys(Status, 0)
        self.retries = 0
        self.busy = 0.0
        self.timed = 0

    def start(self, record: _Record) -> None:
        if record.retry_handle is not None:
            self._end_backoff(record)
        if self.stopped is not None:  # admitted while the batch was being cancelled
            self.record(record, Outcome(Status.CANCELLED, error=self.stopped, error_type="asyncio.CancelledError"))
            return
        record.attempts += 1
        attempt = Attempt(self.batch_id, record.key, record.fn, record.args, record.timeout, record.attempts)
        try:
            record.running = self.backend.run_attempt(attempt, record)
        except Exception as exc:  # a backend that cannot take work any more
            self.record(record, backend_failure(exc))

    def finished(self, record: _Record, outcome: Outcome) -> None:
        """An attempt of ``record`` ended: retry it later, or record the task."""
        if (outcome.status is not _COMPLETED and record.attempts <= record.retries
                and self.policy.should_retry(outcome)):
            delay = self.policy.delay(record.attempts)
            record.running_since = None
            self.retries += 1
            if TaskRetried in self.hub.wanted:
                self.hub.publish(TaskRetried, self.batch_id, record.key, outcome.status, time.time(), outcome.pid,
                                 f"{outcome.error}; retrying in {delay:.2f}s", None, record.attempts)
            record.retry_handle = self.loop.call_later(delay, self.start, record)
            self.backing_off += 1
            self._made_room()
            return
        self.record(record, outcome)

    def record(self, record: _Record, outcome: Outcome) -> None:
        """Record the task's final result, and hand it out."""
        del self.records[record.index]
        started, finished = outcome.started_at, outcome.finished_at
        if started is None and record.running_since is not None:  # killed, lost or cancelled while it ran
            started, finished = record.running_since, finished or time.time()
        result = TaskResult(
            self.batch_id, record.key, outcome.status, outcome.value, outcome.error, outcome.traceback,
            record.attempts, outcome.pid, started, finished, record.message,
            record.progress, outcome.error_type, record.index, outcome.exception,
        )
        try:
            self.store.add(result)
        except Exception as exc:  # the store cannot take it: the run stops, and fails with that error
            first = self.aborted is None
            self.aborted = self.aborted or exc
            self.stopped = self.stopped or str(exc)
            if first:
                self.loop.call_soon(self.cancel_all, str(exc))  # not from inside a cancel_all() in progress
                # said here too: the run raises it only to a consumer still there (a stream may have been left)
                self.loop.call_exception_handler({"message": f"the store refused a result of batch "
                                                             f"{self.batch_id!r}; the batch stops", "exception": exc})
            self._wake()
            return  # not recorded: not handed out either
        self.counts[outcome.status] += 1
        if started is not None and finished is not None:
            self.busy += finished - started
            self.timed += 1
        if TaskFinished in self.hub.wanted:
            self.hub.publish(TaskFinished, self.batch_id, record.key, outcome.status, finished or time.time(),
                             outcome.pid, outcome.error or record.message, record.progress, record.attempts)
        self.ready.append(result)
        if self.eager or len(self.records) - self.backing_off <= self.low_water:  # self._made_room(), inlined
            self._wake()

    def _made_room(self) -> None:
        """A task left the workers: wake the stream, if it hands out every result or has room for half a window."""
        if self.eager or len(self.records) - self.backing_off <= self.low_water:
            self._wake()

    def _end_backoff(self, record: _Record) -> None:
        """``record`` waits for its retry no more: it starts now, or it is cancelled."""
        assert record.retry_handle is not None
        record.retry_handle.cancel()  # a no-op once it has fired
        record.retry_handle = None
        self.backing_off -= 1

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def fail_item(self, index: int, key: str, error: str) -> None:
        """Record a batch item that is not a runnable Task as failed, without running it."""
        record = _Record(self, index, key, None, (), None, 0)
        self.records[index] = record
        self.record(record, Outcome(Status.FAILED, error=error, error_type="asyncsched.TaskDefinitionError"))

    def cancel_all(self, why: str) -> None:
        """Stop every task still in flight and record it as cancelled; wake the batch's stream."""
        for record in list(self.records.values()):
            if self.records.get(record.index) is not record:
                continue  # finished meanwhile: cancelling a call read the result of the one after it
            running, record.running = record.running, None
            if running is not None:
                running.cancel()
                if record.running_since is None:  # it never started: not an attempt
                    record.attempts -= 1
            if record.retry_handle is not None:
                self._end_backoff(record)
            pid = None if record.running_since is None else record.running_pid  # where it ran, if it was running
            self.record(record, Outcome(Status.CANCELLED, error=why, error_type="asyncio.CancelledError", pid=pid))
        self._wake()  # also with nothing in flight: a stream waiting for its async batch's next item ends

    def abort(self, error: BaseException) -> None:
        """End the run with ``error``: what is in flight is cancelled, nothing more starts, and it raises."""
        self.aborted = self.aborted or error
        self.stopped = self.stopped or str(error)
        try:
            self.cancel_all(str(error))
        finally:
            self._wake()

    def stop(self, why: str) -> None:
        """Cancel what is in flight and start nothing more: the batch ends with the results it has."""
        self.stopped = why
        self.cancel_all(why)

    async def wait(self) -> None:
        """Until the stream has something to do: a result is ready, there is room, the async batch is over."""
        self.waiter = self.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None


class Scheduler:
    """Runs batches of :class:`Task` on a backend, keeps their results and publishes their events.

    ``workers`` sizes the default local process pool: ``"cpu"`` (one per core),
    ``"io"`` (two per core) or a number. ``store`` is ``None`` (results kept in
    memory only), a :class:`Store`, or a path to a SQLite file. ``timeout``
    (seconds) and ``retries`` are defaults that each Task may override;
    ``retry_policy`` says which attempts are retried and after what delay.
    ``max_tasks_per_child`` and ``max_memory_per_child`` recycle or kill pool
    workers (see :class:`ProcessPool`). ``backend`` replaces the local pool
    (then leave those pool options alone). ``window`` bounds how many tasks of a
    batch are pulled ahead of execution. ``event_buffer`` is each events()
    consumer's buffer. ``progress=True`` shows a live progress display of each
    batch while it runs, and its final report (see :class:`ProgressMonitor`).

    Use it as ``async with Scheduler(...) as scheduler``; ``aclose()`` works too.
    A start that fails there (the store cannot open, the backend cannot reach
    its cluster) closes the scheduler again before the error is raised.
    Inside ``async with`` on the main thread, a SIGTERM (when nothing else
    handles it; turn off with ``handle_sigterm=False``) cancels the block, stops
    every worker, and then ends the process as SIGTERM asks (entered in a task
    that has ended since, it closes the scheduler, then ends the process).
    Ctrl-C is handled by ``asyncio.run`` the same way.
    """

    def __init__(
        self,
        workers: int | str = "cpu",
        *,
        store: Store | str | os.PathLike[str] | None = None,
        timeout: float | None = None,
        retries: int = 0,
        retry_policy: RetryPolicy | None = None,
        backend: Backend | None = None,
        mp_context: Any = None,
        max_tasks_per_child: int | None = None,
        max_memory_per_child: float | str | None = None,
        window: int | None = None,
        event_buffer: int = DEFAULT_EVENT_BUFFER,
        handle_sigterm: bool = True,
        progress: bool = False,
    ) -> None:
        if timeout is not None and not (is_seconds(timeout) and timeout > 0):
            raise ConfigurationError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
        if not (is_int(retries) and retries >= 0):
            raise ConfigurationError(f"retries must be a non-negative int, got {retries!r}")
        if window is not None and not (is_int(window) and window >= 1):
            raise ConfigurationError(f"window must be an int of at least 1, or None, got {window!r}")
        if not (is_int(event_buffer) and event_buffer >= 1):
            raise ConfigurationError(f"event_buffer must be an int of at least 1, got {event_buffer!r}")
        if retry_policy is not None and not isinstance(retry_policy, RetryPolicy):
            raise ConfigurationError(f"retry_policy must be a RetryPolicy, got {retry_policy!r}")
        for name, flag in ("handle_sigterm", handle_sigterm), ("progress", progress):
            if not isinstance(flag, bool):  # "no" would be true
                raise ConfigurationError(f"{name} must be True or False, got {flag!r}")
        if backend is None:
            backend = default_backend(workers=workers, mp_context=mp_context, max_tasks_per_child=max_tasks_per_child,
                                      max_memory_per_child=max_memory_per_child)
        elif not isinstance(backend, Backend):
            raise ConfigurationError(f"backend must be a Backend, such as ExecutorBackend(executor) for a "
                                     f"concurrent.futures executor, or None for the local pool; got {backend!r}")
        elif (workers, mp_context, max_tasks_per_child, max_memory_per_child) != ("cpu", None, None, None):
            raise ConfigurationError("workers, mp_context, max_tasks_per_child and max_memory_per_child configure "
                                     "the default local pool; with backend= configure the backend itself")
        self._backend = backend
        self._store = open_store(store)
        self.timeout = timeout
        self.retries = retries
        self._retry_policy = retry_policy or RetryPolicy()
        self._window = window
        self._hub = EventHub(event_buffer)
        self._progress = progress
        self._runs: set[_BatchRun] = set()
        self._unended: set[_BatchRun] = set()  # runs whose batch is not ended yet: what wait_ended() waits for
        self._watchers: list[Callable[[_BatchRun], None]] = []  # told of each run as it starts (progress displays)
        self._display_monitor: ProgressMonitor | None = None  # the display of progress=True, while batches run
        self._display_runs = 0  # the runs it shows
        self._display_closing: asyncio.Future[None] | None = None  # its last aclose(): a new display waits for it
        self._started = False
        self._closed = False
        self._start_lock: asyncio.Lock | None = None
        self._closing: asyncio.Future[None] | None = None  # aclose() in progress, or done
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop it started on, and lives on
        self._handle_sigterm = handle_sigterm
        self._sigterm_installed = False
        self._sigterm_received = False
        self._ending: asyncio.Future[None] | None = None  # the close that a SIGTERM began, held

    @property
    def window(self) -> int:
        """How many tasks of a batch are pulled ahead of execution at most, now.

        ``window=`` when given, else the backend's ``capacity * prefetch``
        (for the local pool, 16 per worker, and up to 64 while tasks are fast).
        """
        return self._window or max(MIN_WINDOW, self._backend.capacity * self._backend.prefetch)

    @property
    def backend(self) -> Backend:
        return self._backend

    @property
    def store(self) -> Store:
        return self._store

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Scheduler:
        try:
            await self._ensure_started()
        except BaseException:
            if not self._started and self._loop in (None, asyncio.get_running_loop()):  # its start failed (not: it
                await self.aclose()  # lives on another loop): close what the start opened, as __aexit__ will not run
            raise
        if self._handle_sigterm:
            self._install_sigterm(asyncio.current_task())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            await self.aclose()
        finally:
            self._remove_sigterm()
            if self._sigterm_received:  # cleaned up: now end as SIGTERM asks
                os.kill(os.getpid(), signal.SIGTERM)

    def _install_sigterm(self, task: asyncio.Task[Any] | None) -> None:
        """On SIGTERM, cancel the task inside ``async with``, so workers are stopped before the process ends.

        Only in the main thread, and only where nobody else handles SIGTERM.
        """
        if (task is None or threading.current_thread() is not threading.main_thread()
                or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
            return
        def on_sigterm() -> None:
            self._sigterm_received = True
            self._remove_sigterm()  # a second SIGTERM ends the process at once
            if not task.done():
                task.cancel("SIGTERM")
            else:  # it entered from a task that has ended (a fixture, a startup hook): no __aexit__ will end it
                self._ending = asyncio.ensure_future(self._close_then_end())

        global _handling_sigterm
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_sigterm)
        self._sigterm_installed = True
        _handling_sigterm += 1

    async def _close_then_end(self) -> None:
        try:
            await self.aclose()
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # as SIGTERM asks, once the workers are stopped

    def _remove_sigterm(self) -> None:
        global _handling_sigterm
        if self._sigterm_installed:
            self._sigterm_installed = False
            _handling_sigterm -= 1
            asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("this Scheduler is closed; create a new one")

    def _check_loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
        if self._loop is not loop and self._loop is not None:
            raise ConfigurationError("this Scheduler started on another event loop (an earlier asyncio.run()?), and "
                                     "a Scheduler lives on one loop: aclose() it, and create one on this loop")

    async def _ensure_started(self, *, backend: bool = True) -> None:
        """Open the store and, unless ``backend`` is False (a query needs no worker), start the backend."""
        self._check_open()
        loop = asyncio.get_running_loop()
        self._check_loop(loop)
        if self._started or (self._loop is not None and not backend):
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            self._check_open()  # closed while this waited for another start
            if self._loop is None:
                await self._store.open()
                self._loop = loop
            if backend and not self._started:
                await self._backend.start()
                self._started = True

    async def aclose(self) -> None:
        """Cancel running batches, stop every worker, flush the store. Idempotent.

        Runs to the end even when the calling task is cancelled meanwhile, so no
        process outlives the scheduler. A start in progress (the store opening,
        a backend connecting) is waited for first, and what it opened closed.
        A call made while another one runs returns when that one is done.
        """
        if self._closing is None:
            self._closed = True
            running = list(self._runs)
            for run in running:
                run.abort(ClosedError("the scheduler was closed while the batch ran"))
            self._hub.close()
            self._closing = asyncio.ensure_future(self._release({run.batch_id for run in running if run.begun}))
        elif self._closing.done() or self._closing.get_loop() is not asyncio.get_running_loop():
            return  # closed; or closing on a loop that has ended, where it can be waited for no more
        await _to_the_end(self._closing, "closing the scheduler")

    async def _release(self, ended: set[str]) -> None:
        """Stop the backend; end the batches that were running (their streams may end later), close the store.

        A start in progress is waited for first: what it opens (the store's threads, a Dask client) is then
        closed here, not left open. That wait is as long as the backend's own start can take.
        """
        if self._start_lock is not None:
            async with self._start_lock:
                pass
        try:
            await self._backend.aclose()
        finally:
            try:
                for batch_id in ended:
                    await self._store.end_batch(batch_id)
            finally:
                await self._store.aclose()

    # -- running batches -------------------------------------------------------------------

    async def run(self, batch: Batch, *, batch_id: str | None = None, name: str | None = None,
                  resume: bool = False) -> Summary:
        """Run every task of ``batch`` and return the :class:`Summary`, results in submission order.

        With ``resume=True`` the tasks whose key already has a final result in
        the store for ``batch_id`` are not run again; their stored results are
        part of the summary, at their positions in ``batch`` (the stored results
        of keys ``batch`` does not have are not).
        """
        started = time.monotonic()
        _check_batch(batch)  # before the store begins a batch of that id
        run, previous = await self._begin(batch_id, name, resume, read_all=True)
        results: list[TaskResult] = []
        run.resumed = []
        run.eager = False
        try:
            async with self._monitor(run.batch_id), contextlib.aclosing(self._stream(batch, run, previous)) as stream:
                async for ready in stream:
                    results.extend(ready)
        finally:
            self._runs.discard(run)
            self._ended(run)  # also when the stream never began
        results += run.resumed
        results.sort(key=operator.attrgetter("index"))
        return Summary.of(run.batch_id, results, time.monotonic() - started)

    async def stream(self, batch: Batch, *, batch_id: str | None = None, name: str | None = None,
                     resume: bool = False) -> AsyncGenerator[TaskResult, None]:
        """Yield each :class:`TaskResult` as its task finishes.

        Leaving the loop early (``break``, an exception, cancellation) cancels
        the batch's remaining tasks and kills the workers running them. Wrap
        the stream in ``contextlib.aclosing`` to have that happen at once rather
        than when the stream is garbage collected.
        """
        _check_batch(batch)  # before the store begins a batch of that id
        run, previous = await self._begin(batch_id, name, resume)
        try:
            async with self._monitor(run.batch_id), contextlib.aclosing(self._stream(batch, run, previous)) as stream:
                async for ready in stream:
                    for result in ready:
                        yield result
        finally:
            self._runs.discard(run)
            self._ended(run)

    async def _begin(self, batch_id: str | None, name: str | None,
                     resume: bool, read_all: bool = False) -> tuple[_BatchRun, Collection[str]]:
        """The run of a batch, known to cancel() from now on, and the keys of the results the store has of it
        (``read_all``: the results too, in ``run.stored``, for run()'s summary, read before any task runs)."""
        self._check_open()
        if batch_id is None:
            if resume:
                raise ConfigurationError("resume=True needs the batch_id of the batch to resume")
            batch_id = uuid.uuid4().hex[:12]
        elif not (isinstance(batch_id, str) and batch_id):
            raise ConfigurationError(f"batch_id must be a non-empty str (or None for a new id), got {batch_id!r}")
        elif running := [run for run in self._runs if run.batch_id == batch_id]:
            if all(run.stopped is not None for run in running):
                raise ConfigurationError(f"batch {batch_id!r} was cancelled and is still ending on this scheduler: "
                                         f"await scheduler.wait_ended({batch_id!r}) before you run it again")
            raise ConfigurationError(f"batch {batch_id!r} is running on this scheduler: wait for it to end, or "
                                     f"cancel() it and await scheduler.wait_ended({batch_id!r}), before you run it "
                                     "again")
        if name is not None and not isinstance(name, str):
            raise ConfigurationError(f"name must be a str or None, got {name!r}")
        run = _BatchRun(self, batch_id)
        self._runs.add(run)  # a cancel() while the scheduler starts or the store begins the batch stops it
        self._unended.add(run)
        for watcher in self._watchers:
            watcher(run)
        try:
            await self._ensure_started()
            run.started = time.monotonic()  # for its rate: not the time it took to start workers
            # to its end even if this is cancelled meanwhile: a batch the store has begun is then ended below
            beginning = asyncio.ensure_future(self._begin_batch(run, name, resume, read_all))
            previous = await _to_the_end(beginning, f"beginning batch {batch_id!r}")
        except BaseException as exc:
            self._runs.discard(run)
            try:
                if run.begun and not self._closed:  # cancelled while the store began it: the batch ends at once
                    cancelled = exc if isinstance(exc, asyncio.CancelledError) else None
                    await _to_the_end(asyncio.ensure_future(self._store.end_batch(batch_id)),
                                      f"ending batch {batch_id!r}", cancelled)
            finally:
                self._ended(run)
            raise
        return run, previous

    async def _begin_batch(self, run: _BatchRun, name: str | None, resume: bool, read_all: bool) -> Collection[str]:
        previous = await self._store.begin_batch(run.batch_id, name=name, resume=resume)
        run.begun = True
        if self._closed:  # aclose() came while the store began it: end the batch, as aclose() ends the others
            with contextlib.suppress(Exception):  # unless the store is closing or closed already
                await self._store.end_batch(run.batch_id)
        if read_all and isinstance(previous, Mapping):
            run.stored = previous
        elif read_all and previous:  # a value that no longer unpickles fails here, before any task runs
            stored = await self._store.results(batch_id=run.batch_id)
            run.stored = {r.key: r for r in stored if r.status is not Status.CANCELLED}
            if (missing := next((key for key in previous if key not in run.stored), None)) is not None:
                raise StoreError(f"{type(self._store).__name__} has a result of task {missing!r} of batch "
                                 f"{run.batch_id!r}, and its results(batch_id=...) does not return it: a store must "
                                 "return every result of the batch, whose keys begin_batch() returns")
        return previous

    def _monitor(self, batch_id: str) -> contextlib.AbstractAsyncContextManager[object]:
        return self._display(batch_id) if self._progress else contextlib.nullcontext()

    @contextlib.asynccontextmanager
    async def _display(self, batch_id: str) -> AsyncIterator[None]:
        """The display of ``progress=True`` while a batch runs: one for every batch that runs at once, as two
        live displays on one terminal would draw over each other. Its final report comes as the last one ends."""
        from ._progress import ProgressMonitor  # the display sits above the scheduler and imports rich

        while (closing := self._display_closing) is not None and not closing.done():  # the last one ends first
            await asyncio.wait([closing])
        monitor = self._display_monitor
        if monitor is None:
            monitor = self._display_monitor = ProgressMonitor(self, batch_id=batch_id)
            monitor.start()
        else:
            monitor.watch_every_batch()
        self._display_runs += 1
        try:
            yield
        finally:
            self._display_runs -= 1
            if not self._display_runs:
                self._display_monitor = None
                self._display_closing = asyncio.ensure_future(monitor.aclose())
                await self._display_closing

    async def _stream(self, batch: Batch, run: _BatchRun,
                      previous: Collection[str]) -> AsyncGenerator[list[TaskResult], None]:
        """Yield the results as they come, a list of those ready at a time."""
        batch_id = run.batch_id
        if isinstance(batch, Sized) and not previous:
            run.total = len(batch)
        elif isinstance(batch, Sequence):  # resumed: its size less the tasks with a stored result
            run.total = len(batch) - sum(1 for index, item in enumerate(batch) if _key(item, index) in previous)
        store = self._store
        items: Iterator[object] = iter(())
        feed: _Feed | None = None  # the items of an async batch, admitted as they come
        index = 0
        exhausted = False
        cancelled: asyncio.CancelledError | None = None
        why = "the batch was cancelled"  # what is in flight when the stream ends early is recorded so

        def take(item: object) -> bool:
            """Admit an item of an async batch as the feed pulls it; whether the run has room for another."""
            nonlocal index, exhausted
            if run.stopped is not None:
                return False
            if item is _END:
                exhausted = True
                run.total = index - run.skipped
                run._wake()
                return False
            index = self._admit(run, item, index, previous)
            return len(run.records) + len(run.ready) < _room(self.window, run)

        try:
            if isinstance(batch, AsyncIterable):
                feed = _Feed(aiter(batch), take, run._wake)
            else:  # an Iterable (see _check_batch)
                items = iter(batch)
            while True:
                if store.backlog > MAX_BACKLOG:  # the store writes slower than tasks finish: let it catch up
                    await store.flush()
                window = self.window
                run.low_water = window // 2
                room = _room(window, run)
                if feed is not None:  # pulled beside the run, so that results go out while the source waits
                    if feed.error is not None:
                        why = feed.why or why
                        raise feed.error
                    if not exhausted and run.stopped is None and len(run.records) + len(run.ready) < room:
                        feed.ask()
                else:
                    while not exhausted and run.stopped is None and len(run.records) + len(run.ready) < room:
                        try:
                            item = next(items, _END)
                        except Exception as exc:
                            why = _source_raised(exc)
                            raise
                        if item is _END:
                            exhausted = True
                            run.total = index - run.skipped
                            break
                        index = self._admit(run, item, index, previous)
                if run.ready:
                    ready, run.ready = run.ready, []
                    yield ready
                    continue
                if run.aborted is not None:
                    raise run.aborted
                if not run.records and (exhausted or run.stopped is not None):
                    break
                await run.wait()
        except asyncio.CancelledError as exc:
            cancelled = exc
            raise
        finally:
            # First what needs no await: a second cancel, landing in an await below, cannot skip it.
            self._runs.discard(run)
            try:
                if run.records:
                    run.cancel_all(why)
                run.total = sum(run.counts.values())  # what it finished, also when it was left early
            finally:
                if feed is not None:  # stopped or left while the source was waiting
                    feed.task.cancel()
                self._hub.deliver()  # every TaskFinished of the batch is out before its run() returns
                run.ending = asyncio.ensure_future(self._end(run, None if feed is None else feed.task))
                await _to_the_end(run.ending, f"ending batch {batch_id!r}", cancelled)

    async def _end(self, run: _BatchRun, pulling: asyncio.Future[Any] | None) -> None:
        """The end of a batch's run, once its tasks are recorded: the source lets go, the store ends the batch."""
        if pulling is not None:
            await asyncio.wait([pulling])
        if not self._closed:  # else aclose() ends the batch, and may have closed the store already
            await self._store.end_batch(run.batch_id)  # run() and stream() then tell wait_ended()

    def _admit(self, run: _BatchRun, item: object, index: int, previous: Collection[str]) -> int:
        """Start one batch item; returns the next index."""
        key = item.key if isinstance(item, Task) else None  # _key(), inlined: this runs for every task
        if key is None:
            key = str(index)
        if key in previous:
            run.skipped += 1
            if run.resumed is not None:
                stored = run.stored.get(key) or run.stored[stored_text(key)]
                run.resumed.append(dataclasses.replace(stored, index=index))
        elif not isinstance(item, Task):
            run.fail_item(index, key, f"TaskDefinitionError: batch item {index} is {type(item).__name__}, not a Task: "
                                      "wrap each call as Task(fn, *args)")
        else:
            timeout = item.timeout
            retries = item.retries
            record = _Record(run, index, key, item.fn, item.args,
                             self.timeout if timeout is None else None if timeout == math.inf else timeout,
                             self.retries if retries is None else retries)
            run.records[index] = record
            run.start(record)
        return index + 1

    def cancel(self, batch_id: str) -> bool:
        """Cancel a running batch: its tasks in flight are killed and recorded as cancelled, no more are started.

        The batch's ``run()`` then returns, and its ``stream()`` ends, with the
        results recorded so far. Returns False when no batch of that id runs here.
        """
        runs = [run for run in self._runs if run.batch_id == batch_id]
        for run in runs:
            run.stop("the batch was cancelled")
        return bool(runs)

    async def wait_ended(self, batch_id: str) -> None:
        """Wait until the batch ``batch_id`` has ended here: its run is over and the store has ended it.

        After a ``cancel()``, this is when the batch's tasks are all recorded
        and ``batch()`` shows it finished (when the scheduler is closed
        meanwhile, ``aclose()`` ends it instead). Returns at once when no run
        of that id is going on. Cancelling the wait, or bounding it with
        ``asyncio.timeout()``, leaves the batch alone.
        """
        ends = [run.ended for run in self._unended if run.batch_id == batch_id]
        if ends:
            await asyncio.wait(ends)

    def _ended(self, run: _BatchRun) -> None:
        ending = run.ending
        if ending is not None and not ending.done():  # a stream closed while the store ends its batch
            ending.add_done_callback(lambda _: self._ended(run))
            return
        self._unended.discard(run)
        if not run.ended.done():
            run.ended.set_result(None)

    def running(self) -> dict[str, int | None]:
        """The batches running now: for each id, how many tasks this run will finish (None until known).

        The count is known at once for a batch with a length (a list), else
        once the batch has been read to its end.
        """
        return {run.batch_id: run.total for run in self._runs}

    # -- events and queries ----------------------------------------------------------------

    def events(self, *, batch_id: str | None = None, buffer: int | None = None,
               kinds: Iterable[type[Event]] | None = None) -> EventStream:
        """Live status events from now on, for every batch or for one, of every kind or of ``kinds``.

        ``kinds`` lists event classes, e.g. ``[TaskReported, TaskFinished]``;
        the kinds no consumer asks for cost the run nothing. Each consumer has
        its own buffer of ``buffer`` events (default ``event_buffer``); when it
        is full the oldest are dropped and counted in ``stream.dropped``, so a
        slow consumer never slows the run. The stream ends when the scheduler
        closes.
        """
        self._check_open()
        try:
            self._check_loop(asyncio.get_running_loop())
        except RuntimeError:  # no loop runs here: its events could never be read
            self._check_loop(None)
        check_batch_id(batch_id)  # as results() and stats() do: any other value would never match
        if buffer is not None and not (is_int(buffer) and buffer >= 1):
            raise ConfigurationError(f"buffer must be an int of at least 1, or None, got {buffer!r}")
        return self._hub.subscribe(batch_id, buffer, kinds)

    async def results(self, batch_id: str | None = None, status: Status | str | None = None,
                      limit: int | None = None, offset: int = 0) -> list[TaskResult]:
        """Stored results, oldest first, filtered by batch and status."""
        status = check_status(status)  # before the store opens
        await self._ensure_started(backend=False)
        return await self._store.results(batch_id=batch_id, status=status, limit=limit, offset=offset)

    async def stats(self, batch_id: str | None = None) -> Stats:
        """Counts of stored results, for one batch or for all."""
        await self._ensure_started(backend=False)
        return await self._store.stats(batch_id)

    async def batches(self) -> list[BatchInfo]:
        """Every batch the store knows, oldest first."""
        await self._ensure_started(backend=False)
        return await self._store.batches()

    async def batch(self, batch_id: str) -> BatchInfo | None:
        """One batch the store knows, or None."""
        await self._ensure_started(backend=False)
        return await self._store.batch(batch_id)

    async def batch_page(self, limit: int | None, offset: int = 0) -> tuple[list[BatchInfo], int]:
        """A page of the batches the store knows, newest first, and how many it knows in all."""
        await self._ensure_started(backend=False)
        return await self._store.batch_page(limit, offset)


async def _to_the_end(task: asyncio.Future[T], doing: str, cancelled: asyncio.CancelledError | None = None) -> T:
    """Wait for ``task`` to its end, even when the caller is cancelled meanwhile, once or many times; then raise
    that cancellation, or ``cancelled``, the one the caller is handling already.

    A cancelled caller gets no result: an error of ``task`` then goes to the
    loop's exception handler, saying what it was ``doing``. A caller closed
    meanwhile (GeneratorExit: on Python 3.11, a stream left early and closed
    by the end of ``asyncio.run()`` can get one in the middle of an await)
    returns at once, and ``task`` ends on its own.
    """
    try:
        while not task.done():
            try:
                await asyncio.wait([task])
            except asyncio.CancelledError as exc:
                cancelled = cancelled or exc
    except GeneratorExit:
        task.add_done_callback(functools.partial(_report_failure, doing))
        raise
    if cancelled is not None:
        _report_failure(doing, task)
        raise cancelled
    return task.result()


def _report_failure(doing: str, task: asyncio.Future[Any]) -> None:
    """Tell the loop's exception handler of an error of ``task``, which no caller is there to get."""
    if not task.cancelled() and (error := task.exception()) is not None:
        task.get_loop().call_exception_handler({"message": f"{doing} failed after its run was cancelled",
                                                "exception": error, "task": task})


def _key(item: object, index: int) -> str:
    """The key of the batch item at ``index``: its own, or its position."""
    key = item.key if isinstance(item, Task) else None
    return key if key is not None else str(index)


