"""Small helpers shared by the tests."""

from __future__ import annotations

import asyncio
import os
import select
from collections.abc import Mapping

import psutil

from asyncsched import TaskResult
from asyncsched._store import MemoryStore


def wait_gone(pid: int, timeout: float = 3.0) -> bool:
    """Wait, bounded, until process ``pid`` has ended (a zombie counts); True if it has.

    Waits on a pidfd, so it is woken by the exit itself and never reaps the process
    (reaping belongs to its parent).
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class _Holding(MemoryStore):
    """A store that holds one of its calls until the test sets ``release``; ``entered`` says it has been made."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = asyncio.Event(), asyncio.Event()

    async def _hold(self) -> None:
        self.entered.set()
        await self.release.wait()


class SlowToBegin(_Holding):
    """Begins a batch only once the test sets ``release``."""

    async def begin_batch(self, batch_id: str, *, name: str | None = None,
                          resume: bool = False) -> Mapping[str, TaskResult]:
        await self._hold()
        return await super().begin_batch(batch_id, name=name, resume=resume)


class SlowToEnd(_Holding):
    """Ends a batch only once the test sets ``release``."""

    async def end_batch(self, batch_id: str) -> None:
        await self._hold()
        await super().end_batch(batch_id)
