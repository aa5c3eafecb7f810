"""The errors asyncsched raises.

Every error asyncsched raises derives from one base class, so ``except AsyncschedError``
catches them all::

    AsyncschedError
    ├── ConfigurationError        bad arguments to Scheduler, ProcessPool, ...  (also ValueError)
    ├── TaskDefinitionError       a Task that can never run: not callable, not picklable  (also TypeError)
    ├── ClosedError               the scheduler or pool was closed by your code  (also RuntimeError)
    ├── BrokenPoolError           something outside broke the pool: workers die while starting, or start over
    │                             max_memory_per_child
    ├── BackendUnreachableError   a backend's Dask scheduler, Celery broker or result backend does not answer
    │                             (also ConnectionError)
    ├── TaskError                 raised by TaskResult.unwrap() for a task that did not complete
    │   ├── TaskFailedError       the task raised; the original exception is the __cause__
    │   ├── TaskTimeoutError      the task ran past its timeout (the local pool kills its worker)
    │   ├── TaskCrashedError      the worker died (segfault, os._exit, SIGKILL, memory limit)
    │   └── TaskCancelledError    the task was cancelled
    └── StoreError                the result store cannot be opened, read or written

Exceptions raised by a task keep their own type: ``TaskResult.exception`` is the
exception rebuilt in the parent, with the remote traceback attached as its
``__cause__`` (a :class:`RemoteTraceback`, which is never raised and so is no
AsyncschedError), as ``concurrent.futures`` does.
"""

from __future__ import annotations

__all__ = [
    "AsyncschedError",
    "BackendUnreachableError",
    "BrokenPoolError",
    "ClosedError",
    "ConfigurationError",
    "RemoteTraceback",
    "StoreError",
    "TaskCancelledError",
    "TaskCrashedError",
    "TaskDefinitionError",
    "TaskError",
    "TaskFailedError",
    "TaskTimeoutError",
]


class AsyncschedError(Exception):
    """Base class of every error raised by asyncsched."""


class ConfigurationError(AsyncschedError, ValueError):
    """An argument to a constructor or method is invalid."""


class TaskDefinitionError(AsyncschedError, TypeError):
    """A task can never run: its function is not callable or cannot be sent to a worker."""


class ClosedError(AsyncschedError, RuntimeError):
    """The scheduler or pool was closed by your own code and cannot take more work (a RuntimeError, as the
    stdlib executors raise after shutdown)."""


class BrokenPoolError(AsyncschedError):
    """Something outside your code broke the pool, e.g. workers keep dying while starting."""


class BackendUnreachableError(AsyncschedError, ConnectionError):
    """A backend could not reach the cluster it runs attempts on: no Dask scheduler answered at its address within
    its ``connect_timeout``; a Celery broker or Redis result backend did not answer (raised by the start, or the
    ``exception`` of an attempt that needed it). A ConnectionError, so an OSError, as what Dask raises itself."""


class TaskError(AsyncschedError):
    """A task did not complete; raised by :meth:`TaskResult.unwrap`."""


class TaskFailedError(TaskError):
    """The task raised an exception; the original one is the ``__cause__``."""


class TaskTimeoutError(TaskError):
    """The task ran past its timeout (the local pool kills its worker; see each backend for what it can stop)."""


class TaskCrashedError(TaskError):
    """The worker running the task died."""


class TaskCancelledError(TaskError):
    """The task was cancelled before it finished."""


class StoreError(AsyncschedError):
    """The result store cannot be opened, read or written."""


class RemoteTraceback(Exception):
    """Carries the traceback text of an exception raised in a worker process."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb
