"""asyncsched: run batches of Python tasks on a pool of processes, from asyncio.

The names a task's worker process needs (``report``, ``Task``, ``Status`` and
the errors) are imported eagerly and pull in no asyncio machinery; the rest is
imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._errors import (
    AsyncschedError,
    BackendUnreachableError,
    BrokenPoolError,
    ClosedError,
    ConfigurationError,
    RemoteTraceback,
    StoreError,
    TaskCancelledError,
    TaskCrashedError,
    TaskDefinitionError,
    TaskError,
    TaskFailedError,
    TaskTimeoutError,
)
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
)
from ._worker import report

if TYPE_CHECKING:
    from ._backend import AttemptListener, Backend, Cancellable
    from ._events import EventStream
    from ._local import ExecutorBackend, ProcessBackend
    from ._pool import CallListener, PoolStatistics, ProcessPool
    from ._progress import ProgressMonitor, ProgressStatistics
    from ._scheduler import Scheduler
    from ._sqlite import SQLiteStore
    from ._store import BatchInfo, MemoryStore, Store

__version__ = "0.1.0"

__all__ = [
    "AsyncschedError",
    "Attempt",
    "AttemptListener",
    "Backend",
    "BackendUnreachableError",
    "BatchInfo",
    "BrokenPoolError",
    "CallListener",
    "Cancellable",
    "ClosedError",
    "ConfigurationError",
    "Event",
    "EventStream",
    "ExecutorBackend",
    "MemoryStore",
    "Outcome",
    "PoolStatistics",
    "ProcessBackend",
    "ProcessPool",
    "ProgressMonitor",
    "ProgressStatistics",
    "RemoteTraceback",
    "RetryPolicy",
    "SQLiteStore",
    "Scheduler",
    "Stats",
    "Status",
    "Store",
    "StoreError",
    "Summary",
    "Task",
    "TaskCancelledError",
    "TaskCrashedError",
    "TaskDefinitionError",
    "TaskError",
    "TaskFailedError",
    "TaskFinished",
    "TaskReported",
    "TaskResult",
    "TaskRetried",
    "TaskStarted",
    "TaskTimeoutError",
    "report",
]

_LAZY = {
    "AttemptListener": "._backend",
    "Backend": "._backend",
    "BatchInfo": "._store",
    "CallListener": "._pool",
    "Cancellable": "._backend",
    "EventStream": "._events",
    "ExecutorBackend": "._local",
    "MemoryStore": "._store",
    "PoolStatistics": "._pool",
    "ProcessBackend": "._local",
    "ProcessPool": "._pool",
    "ProgressMonitor": "._progress",
    "ProgressStatistics": "._progress",
    "SQLiteStore": "._sqlite",
    "Scheduler": "._scheduler",
    "Store": "._store",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'asyncsched' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
