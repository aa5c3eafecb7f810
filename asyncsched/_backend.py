"""The backend seam: where attempts of tasks run.

A backend runs one attempt of one task and reports what happened. Retries,
persistence, events fan-out and progress belong to the scheduler, so a backend
stays small: the local process pool, any ``concurrent.futures.Executor``, or a
distributed engine plug in here without the scheduler knowing which.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable

from ._models import Attempt, Event, Outcome

__all__ = ["Backend", "Emit"]

Emit = Callable[[Event], None]


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
    """

    capacity: int = 1
    prefetch: int = 16
    """Attempts per slot of capacity worth handing to the backend ahead of time (it may vary as tasks run)."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Acquire resources (processes, connections). Called once before the first submit."""

    @abc.abstractmethod
    def submit(self, attempt: Attempt, emit: Emit) -> asyncio.Future[Outcome]:
        """Start one attempt; see the class docstring for the contract."""

    def add_done_callback(self, future: asyncio.Future[Outcome],
                          callback: Callable[[asyncio.Future[Outcome]], object]) -> None:
        """Have ``callback(future)`` called once a future from :meth:`submit` is done.

        The default is ``future.add_done_callback``. A backend that settles its
        own futures may call ``callback`` right as it settles one instead,
        sparing the scheduler a loop iteration per attempt.
        """
        future.add_done_callback(callback)

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Stop everything and release every resource. Idempotent."""
