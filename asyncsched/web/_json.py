"""How results, batches and values look in JSON."""

from __future__ import annotations

import math
from typing import Any

from .._models import TaskResult, describe, finite
from .._store import BatchInfo

__all__ = ["MAX_DEPTH", "batch_json", "jsonable", "result_json"]

MAX_DEPTH = 64
"""Nesting kept in a value; deeper parts are shown by their ``repr``."""
LONG_INT_BITS = 4096
"""Past this many bits, an int is checked to have a decimal form: past ``sys.get_int_max_str_digits()`` it has none."""


def jsonable(value: Any, depth: int = 0) -> Any:
    """``value`` as plain JSON: lists, objects with string keys, strings, finite numbers, booleans, null.

    Anything else (a tuple becomes a list) is shown by its ``repr``, and so is a
    non-finite float, which JSON has no token for. It never raises: an int too
    long to print and a value whose ``repr`` fails are described instead.
    """
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, int):
        return value if value.bit_length() <= LONG_INT_BITS or _printable(value) else describe(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if depth >= MAX_DEPTH:
        return describe(value)
    if isinstance(value, list | tuple):
        return [jsonable(item, depth + 1) for item in value]
    if isinstance(value, dict):
        return {key if isinstance(key, str) else describe(key, str): jsonable(item, depth + 1)
                for key, item in value.items()}
    return describe(value)


def _printable(number: int) -> bool:
    try:
        int.__repr__(number)
    except ValueError:  # over the interpreter's limit on digits
        return False
    return True


def result_json(result: TaskResult) -> dict[str, Any]:
    """The fields of a :class:`TaskResult` (all but the rebuilt exception), as JSON."""
    return {
        "batch_id": result.batch_id,
        "key": result.key,
        "index": result.index,
        "status": result.status.value,
        "value": jsonable(result.value),
        "error": result.error,
        "error_type": result.error_type,
        "traceback": result.traceback,
        "attempts": result.attempts,
        "pid": result.pid,
        "started_at": finite(result.started_at),
        "finished_at": finite(result.finished_at),
        "duration": finite(result.duration),
        "message": result.message,
        "progress": finite(result.progress),
    }


def batch_json(info: BatchInfo, state: str, expected: int | None) -> dict[str, Any]:
    """A batch's summary: its counts at the top level, its times and its state."""
    stats = info.stats
    return {
        "batch_id": info.batch_id,
        "name": info.name,
        "state": state,
        "total": stats.total,
        "expected": expected,
        "completed": stats.completed,
        "failed": stats.failed,
        "timed_out": stats.timed_out,
        "crashed": stats.crashed,
        "cancelled": stats.cancelled,
        "success_rate": stats.json_success_rate(),
        "created_at": finite(info.created_at),
        "finished_at": finite(info.finished_at),
        "elapsed": None if info.finished_at is None else finite(info.finished_at - info.created_at),
    }
