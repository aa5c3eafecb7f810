"""Backends that run on this machine: the process pool, and any Executor."""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing.context
import os
import time
from typing import Any

from ._backend import AttemptListener, Backend, Cancellable, Emit, backend_failure
from ._models import Attempt, Outcome, Status, TaskReported, TaskStarted
from ._pool import ProcessPool
from ._worker import error_info, run_capturing

__all__ = ["ExecutorBackend", "ProcessBackend"]


class ProcessBackend(Backend):
    """The default backend: a :class:`ProcessPool` that kills timed-out and cancelled attempts.

    Pass a pool you built yourself, or the pool's own arguments.
    """

    def __init__(
        self,
        pool: ProcessPool | None = None,
        *,
        workers: int | str = "cpu",
        mp_context: str | multiprocessing.context.BaseContext | None = None,
        max_tasks_per_child: int | None = None,
        max_memory_per_child: float | str | None = None,
    ) -> None:
        self.pool = pool or ProcessPool(workers, mp_context=mp_context, max_tasks_per_child=max_tasks_per_child,
                                        max_memory_per_child=max_memory_per_child)
        self.capacity = self.pool.size

    @property
    def prefetch(self) -> int:  # type: ignore[override]
        """While tasks are fast the pool queues up to 64 calls on a worker: enough to keep those queues full."""
        return max(Backend.prefetch, self.pool.depth)

    async def start(self) -> None:
        self.pool.start()

    def submit(self, attempt: Attempt, emit: Emit) -> asyncio.Future[Outcome]:
        relay = _Relay(attempt, emit)
        return self.pool.call(attempt.fn, attempt.args, timeout=attempt.timeout, on_start=relay,
                              on_report=relay.reported)

    def run_attempt(self, attempt: Attempt, listener: AttemptListener) -> Cancellable:
        """The pool calls ``listener`` directly: no future, relay or event per attempt."""
        return self.pool.start_call(attempt.fn, attempt.args, listener, timeout=attempt.timeout)

    async def aclose(self) -> None:
        await self.pool.aclose()


class _Relay:
    """Turns the pool's callbacks for one attempt into its events; calling it says the attempt started."""

    __slots__ = ("attempt", "emit")

    def __init__(self, attempt: Attempt, emit: Emit) -> None:
        self.attempt = attempt
        self.emit = emit

    def __call__(self, pid: int | None, timestamp: float) -> None:
        a = self.attempt
        self.emit(TaskStarted(a.batch_id, a.key, Status.RUNNING, timestamp, pid, None, None, a.number))

    def reported(self, pid: int | None, timestamp: float, message: str | None, progress: float | None,
                 data: dict[str, Any]) -> None:
        a = self.attempt
        self.emit(TaskReported(a.batch_id, a.key, Status.RUNNING, timestamp, pid, message, progress, a.number,
                               data or None))


class ExecutorBackend(Backend):
    """Runs attempts on any ``concurrent.futures.Executor`` through ``loop.run_in_executor``.

    A thread pool makes a fast in-process backend for tests; the stdlib
    ``ProcessPoolExecutor`` works too. At most ``capacity`` attempts are
    handed to the executor at once, so each starts when it is handed over, and
    its timeout counts from there. What an executor cannot do stays undone,
    honestly reported: a timed-out attempt is recorded ``timed_out`` at once,
    but a plain executor cannot stop it, so it runs on in the background, and
    the attempt handed over in its place may wait behind it (and time out
    there, rather than wait for a call that may never end). ``report()``
    events arrive when the attempt ends. An executor that is broken (its
    worker died) or shut down makes the attempt ``crashed``; one that refuses
    the call (an argument that does not pickle) makes it ``failed``, not to be
    retried.
    The executor is shut down on :meth:`aclose` when ``owned`` is true.
    """

    def __init__(self, executor: concurrent.futures.Executor, *, capacity: int | None = None,
                 owned: bool = True) -> None:
        self.executor = executor
        self.capacity = capacity or getattr(executor, "_max_workers", None) or os.cpu_count() or 1
        self._owned = owned
        self._places = asyncio.Semaphore(self.capacity)  # attempts handed to the executor and not over yet

    def submit(self, attempt: Attempt, emit: Emit) -> asyncio.Future[Outcome]:
        return asyncio.ensure_future(self._run(attempt, emit))

    async def _run(self, attempt: Attempt, emit: Emit) -> Outcome:
        loop = asyncio.get_running_loop()
        relay = _Relay(attempt, emit)
        places = self._places
        await places.acquire()  # a place of its own in the executor: it starts now, not behind others
        try:
            future = loop.run_in_executor(self.executor, run_capturing, attempt.fn, attempt.args)
        except Exception as exc:  # broken or shut down: it takes no more calls
            places.release()
            return backend_failure(exc)
        future.add_done_callback(lambda _: places.release())  # over: done, timed out or cancelled
        relay(None, time.time())
        try:
            async with asyncio.timeout(attempt.timeout):
                ok, value, started, finished, pid, reports = await future
        except TimeoutError:
            return Outcome(Status.TIMED_OUT, error=f"timed out after {attempt.timeout:g}s (this executor cannot "
                           "stop a running call)", error_type="TimeoutError")
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if future.cancelled() and task is not None and not task.cancelling():  # the executor's doing
                return backend_failure(concurrent.futures.CancelledError(
                    "the executor cancelled the call before it started (it was shut down)"))
            raise
        except concurrent.futures.BrokenExecutor as exc:  # its worker died, as a pool worker can
            return backend_failure(exc)
        except BaseException as exc:  # the executor refused the call: an argument, say, that does not pickle
            if not isinstance(exc, Exception) and not (future.done() and not future.cancelled()
                                                       and future.exception() is exc):
                raise  # not the call's SystemExit (a result's reducer raised it): a Ctrl-C landed here, say
            return Outcome.from_error(error_info(exc), retryable=False)
        for timestamp, message, progress, data in reports:
            relay.reported(pid, timestamp, message, progress, data)
        if ok:
            return Outcome(Status.COMPLETED, value=value, pid=pid, started_at=started, finished_at=finished)
        return Outcome.from_error(value, pid=pid, started_at=started, finished_at=finished)

    async def aclose(self) -> None:
        if self._owned:
            await asyncio.get_running_loop().run_in_executor(None, self.executor.shutdown)
