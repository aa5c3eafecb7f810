"""The backend seam: where attempts of tasks run.

A backend runs one attempt of one task and reports what happened. Retries,
persistence, events fan-out and progress belong to the scheduler, so a backend
stays small: the local process pool, any ``concurrent.futures.Executor``, or a
distributed engine plug in here without the scheduler knowing which.

Two ways in, one contract::

    Scheduler --run_attempt(attempt, listener)--> Backend --listener.started / reported / finished-->
                                                    |
                    default run_attempt: submit(attempt, emit) -> future of Outcome,
                    its events and its result passed on to the listener

:meth:`Backend.submit` (a future, and events through ``emit``) is all a backend
must write. A backend that can call back directly overrides
:meth:`Backend.run_attempt` instead, and spares the scheduler a future, a
callback and the events' round trip for every attempt: the local pool does.
"""

from __future__ import annotations

import abc
import asyncio
import functools
import pickle
from collections.abc import Callable
from typing import Any, Protocol

from ._models import Attempt, Event, Outcome, Status, TaskReported, TaskStarted
from ._worker import error_info

__all__ = ["AttemptListener", "Backend", "Cancellable", "Emit", "backend_failure", "default_backend", "report_data",
           "unreadable_result"]

Emit = Callable[[Event], None]


class AttemptListener(Protocol):
    """What hears about one attempt: the scheduler's record of its task.

    Called on the scheduler's loop; ``finished`` never from inside
    :meth:`Backend.run_attempt` itself. ``started`` comes first, then a
    ``reported`` for each ``report()`` call, in order, then ``finished`` once,
    unless the attempt was cancelled. ``started`` may come again, with another
    pid, for the same attempt: the local pool's worker died before it began
    the call, which went to another one, or Celery's broker delivered the
    task again after its worker was lost. An attempt that started and ended
    before the backend looked may be told only ``finished`` (the local pool
    does so for fast calls queued behind another): its outcome's ``pid`` and
    ``started_at`` then say where and when it started.
    """

    def started(self, pid: int | None, timestamp: float) -> None: ...

    def reported(self, pid: int | None, timestamp: float, message: str | None, progress: float | None,
                 data: dict[str, Any]) -> None: ...

    def finished(self, outcome: Outcome) -> None: ...


class Cancellable(Protocol):
    """A running attempt, as :meth:`Backend.run_attempt` returns it."""

    def cancel(self) -> bool: ...


class Backend(abc.ABC):
    """Runs attempts. The contract, which every backend keeps:

    * :meth:`submit` is called on the scheduler's event loop. It starts one
      attempt and returns at once with a future of its :class:`Outcome`.
    * The task's own errors are outcomes (``failed``, ``timed_out``,
      ``crashed``), never exceptions of the future. The future raises only when
      the backend itself cannot run anything any more; the scheduler records the
      attempt as crashed with that error.
    * The backend enforces ``attempt.timeout``, counted from the moment the
      attempt starts running, and stops the work as well as it can.
    * Cancelling the future stops the attempt (kills it where it can).
    * ``emit`` receives a ``TaskStarted`` event when the attempt starts and a
      ``TaskReported`` event for each ``report()`` call, in order.
    * :attr:`capacity` is how many attempts run at once; the scheduler pulls
      about ``capacity * prefetch`` tasks of a batch ahead of execution.

    The scheduler calls :meth:`run_attempt`, which by default does all that
    through :meth:`submit`.
    """

    capacity: int = 1
    prefetch: int = 16
    """Attempts per slot of capacity worth handing to the backend ahead of time (it may vary as tasks run)."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Acquire resources (processes, connections). Called once before the first submit."""

    @abc.abstractmethod
    def submit(self, attempt: Attempt, emit: Emit) -> asyncio.Future[Outcome]:
        """Start one attempt; see the class docstring for the contract."""

    def run_attempt(self, attempt: Attempt, listener: AttemptListener) -> Cancellable:
        """Start one attempt and tell ``listener`` how it goes; cancelling what it returns stops the attempt.

        The same contract as :meth:`submit`, with the listener's calls in place
        of the events and the future's result (a future that raises becomes a
        ``crashed`` outcome). The default runs :meth:`submit` and passes on
        what the scheduler publishes anyway: of each ``TaskStarted`` its pid
        and time, of each ``TaskReported`` also its message, progress and
        data. The scheduler builds the events it publishes itself.
        """
        future = self.submit(attempt, functools.partial(_emit_to, listener))
        future.add_done_callback(functools.partial(_finish_from, listener))
        return future

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Stop everything and release every resource. Idempotent."""


def default_backend(*, workers: int | str, mp_context: Any, max_tasks_per_child: int | None,
                    max_memory_per_child: float | str | None) -> Backend:
    """The backend of ``Scheduler(backend=None)``: the local process pool, imported only when it is the one used."""
    from ._local import ProcessBackend

    return ProcessBackend(workers=workers, mp_context=mp_context, max_tasks_per_child=max_tasks_per_child,
                          max_memory_per_child=max_memory_per_child)


def _emit_to(listener: AttemptListener, event: Event) -> None:
    if isinstance(event, TaskStarted):
        listener.started(event.pid, event.timestamp)
    elif isinstance(event, TaskReported):
        listener.reported(event.pid, event.timestamp, event.message, event.progress, event.data or {})


def _finish_from(listener: AttemptListener, future: asyncio.Future[Outcome]) -> None:
    if future.cancelled():
        return  # whoever cancelled it records the task
    exc = future.exception()
    if exc is None:
        listener.finished(future.result())
    else:
        listener.finished(backend_failure(exc))


def backend_failure(exc: BaseException) -> Outcome:
    """The outcome of an attempt whose backend failed (not the task): ``crashed``, with that error."""
    return Outcome(Status.CRASHED, error=f"{type(exc).__name__}: {exc}", error_type=type(exc).__name__)


def report_data(data: bytes | None) -> dict[str, Any]:
    """The keyword arguments of a ``report()`` call, from the pickle a worker sent (see ``_worker``); never raises."""
    if data is None:
        return {}
    try:
        loaded: dict[str, Any] = pickle.loads(data)
    except BaseException as exc:  # e.g. a class that cannot be imported here, or a reducer calling sys.exit()
        return {"error": f"the data of this report could not be unpickled here: {error_info(exc)[1]}"}
    return loaded


def unreadable_result(exc: BaseException, **fields: Any) -> Outcome:
    """The outcome of an attempt whose result does not unpickle here (its class cannot be imported, say):
    ``failed``, saying why; ``fields`` are the outcome's other fields (pid, times)."""
    name, text, tb, _ = error_info(exc)
    return Outcome(Status.FAILED, error=f"the result could not be unpickled here: {text}", traceback=tb,
                   error_type=name, **fields)
