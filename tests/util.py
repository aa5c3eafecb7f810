"""Small helpers shared by the tests."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import select
from collections.abc import AsyncIterator, Collection

import psutil

from asyncsched._store import MemoryStore


@dataclasses.dataclass
class SilentServer:
    port: int
    connected: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    """Set once a client connects."""
    hung_up: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    """Set once a client hangs up."""


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[SilentServer]:
    """A TCP server on 127.0.0.1 that accepts connections and never answers."""
    holding: set[asyncio.Task[None]] = set()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        holding.add(asyncio.current_task())  # type: ignore[arg-type]
        found.connected.set()
        try:
            await reader.read()  # until the client hangs up
            found.hung_up.set()
        finally:
            writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    found = SilentServer(server.sockets[0].getsockname()[1])
    try:
        yield found
    finally:
        server.close()
        for task in holding:
            task.cancel()
        await asyncio.gather(*holding, return_exceptions=True)
        await server.wait_closed()


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
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
                          resume: bool = False) -> Collection[str]:
        await self._hold()
        return await super().begin_batch(batch_id, name=name, resume=resume)


class SlowToAnswerBegin(_Holding):
    """Begins a batch at once, and returns only once the test sets ``release``."""

    async def begin_batch(self, batch_id: str, *, name: str | None = None,
                          resume: bool = False) -> Collection[str]:
        previous = await super().begin_batch(batch_id, name=name, resume=resume)
        await self._hold()
        return previous


class SlowToClose(_Holding):
    """Closes only once the test sets ``release``; ``closed`` says it did."""

    closed = False

    async def aclose(self) -> None:
        await self._hold()
        self.closed = True


class SlowToEnd(_Holding):
    """Ends a batch only once the test sets ``release``."""

    async def end_batch(self, batch_id: str) -> None:
        await self._hold()
        await super().end_batch(batch_id)
