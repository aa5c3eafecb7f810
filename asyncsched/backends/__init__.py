"""Scale-out backends: the same Scheduler on Dask distributed or on Celery.

``from asyncsched.backends import DaskBackend, CeleryBackend``. Each is imported
on first use, so neither engine is a dependency of asyncsched itself: install
the extra you need, ``asyncsched[dask]`` or ``asyncsched[celery]``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._celery import CeleryBackend
    from ._dask import DaskBackend

__all__ = ["CeleryBackend", "DaskBackend"]

_LAZY = {"CeleryBackend": ("._celery", "celery"), "DaskBackend": ("._dask", "dask")}


def __getattr__(name: str) -> Any:
    found = _LAZY.get(name)
    if found is None:
        raise AttributeError(f"module 'asyncsched.backends' has no attribute {name!r}")
    module, extra = found
    try:
        value = getattr(importlib.import_module(module, __name__), name)
    except ModuleNotFoundError as exc:
        raise ImportError(f"{name} needs an optional dependency ({exc.name}): "
                          f"pip install 'asyncsched[{extra}]'") from exc
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
