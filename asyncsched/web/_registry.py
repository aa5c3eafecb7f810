"""The functions the HTTP API may run, by name."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from .._errors import ConfigurationError
from .._models import Task

__all__ = ["TaskRegistry"]

F = TypeVar("F", bound=Callable[..., Any])

NAME = re.compile(r"(?!\.\.?$)[A-Za-z0-9_.:-]{1,100}")
"""What a task name or a client's batch id may be: 1 to 100 letters, digits and ``_ . : -``, but not ``.`` or ``..``,
which no URL can hold."""


class TaskRegistry:
    """Names the functions that the HTTP API may run; nothing else can be run through it.

    ::

        registry = TaskRegistry()

        @registry.task("resize")
        def resize(path: str, width: int) -> str: ...

        registry.add("checksum", checksum)

    A function must be loadable by a worker process: defined at module level
    (or a ``functools.partial`` of such a function).
    """

    def __init__(self) -> None:
        self._tasks: dict[str, Callable[..., Any]] = {}

    def task(self, name: str) -> Callable[[F], F]:
        """Decorator: register the function under ``name`` and return it unchanged."""

        def register(fn: F) -> F:
            self.add(name, fn)
            return fn

        return register

    def add(self, name: str, fn: Callable[..., Any]) -> None:
        """Register ``fn`` under ``name``; a name can be registered once."""
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ConfigurationError(f"a task name is 1 to 100 letters, digits or _.:- characters, and not . or .., "
                                     f"got {name!r}")
        if name in self._tasks:
            raise ConfigurationError(f"task {name!r} is already registered")
        Task(fn)  # refuses, with a clear message, what a worker could not load (a lambda, a nested function)
        self._tasks[name] = fn

    def get(self, name: str) -> Callable[..., Any] | None:
        return self._tasks.get(name)

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._tasks)

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._tasks)

    def __repr__(self) -> str:
        return f"TaskRegistry({self.names()!r})"
