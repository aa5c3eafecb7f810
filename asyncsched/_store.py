"""The store seam: where final results are kept, and the in-memory store.

The scheduler hands every final :class:`TaskResult` to a :class:`Store` with
:meth:`Store.add`, which must not block: a store buffers and writes in the
background. Queries are async. ``Scheduler(store=None)`` uses
:class:`MemoryStore`; a path selects the SQLite store.
"""

from __future__ import annotations

import abc
import itertools
import os
import time
from collections import Counter, deque
from collections.abc import Collection
from dataclasses import dataclass, field

from ._errors import ConfigurationError
from ._models import Stats, Status, TaskResult, is_int

__all__ = ["MAX_BACKLOG", "BatchInfo", "MemoryStore", "Store"]

MAX_BACKLOG = 10_000
"""Results a store may hold unwritten before the scheduler stops pulling new tasks until it has caught up."""
MAX_PAGE = 2**63 - 1
"""The largest ``limit`` or ``offset`` of a query: the most SQLite takes."""


def stored_text(text: str) -> str:
    """``text`` as a store that takes only UTF-8 keeps it (SQLite): a lone surrogate (from a file name, say)
    becomes a ``\\udc80`` escape. A key so stored is looked up in either form."""
    if text.isascii():
        return text
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode()
    return text


def check_page(limit: int | None, offset: int) -> None:
    """A :class:`ConfigurationError` unless ``limit`` (None for no limit) and ``offset`` are integers from 0 to
    :data:`MAX_PAGE`: every store then reads the same page."""
    for name, value in (("limit", limit), ("offset", offset)):
        if value is None and name == "limit":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_PAGE:
            raise ConfigurationError(f"{name} must be {'None or ' if name == 'limit' else ''}an integer from 0 to "
                                     f"2**63 - 1, got {value!r}")


def check_batch_id(batch_id: object, *, every: bool = True) -> None:
    """A :class:`ConfigurationError` unless ``batch_id`` is a str, or None where ``every`` batch may be meant."""
    if not (isinstance(batch_id, str) or (every and batch_id is None)):
        raise ConfigurationError(f"batch_id must be a str{' (or None for every batch)' if every else ''}, "
                                 f"got {batch_id!r}")


def check_status(status: Status | str | None) -> Status | None:
    """``status`` as a :class:`Status` (None for any); a :class:`ConfigurationError` when it names none."""
    try:
        return None if status is None else Status(status)
    except ValueError:
        raise ConfigurationError(f"unknown status {status!r}; use one of {[s.value for s in Status]}") from None


def open_store(store: Store | str | os.PathLike[str] | None) -> Store:
    """The store ``Scheduler(store=...)`` names: None for a :class:`MemoryStore`, a path for the SQLite store."""
    if store is None:
        return MemoryStore()
    if isinstance(store, Store):
        return store
    if isinstance(store, str | os.PathLike):
        from ._sqlite import SQLiteStore  # imported only when asked for: it pulls in aiosqlite

        return SQLiteStore(store)
    raise ConfigurationError(f"store must be None, a Store or the path of a SQLite file, got {store!r}")


@dataclass(frozen=True, slots=True)
class BatchInfo:
    """One batch as the store knows it."""

    batch_id: str
    name: str | None
    created_at: float
    finished_at: float | None
    stats: Stats = field(default_factory=Stats)


class Store(abc.ABC):
    """Keeps final results. Every method runs on the scheduler's loop.

    * :meth:`begin_batch` records a batch and, with ``resume=True``, returns the
      keys of the results it already holds for it, so those tasks are not run
      again (a mapping of those results by key does too). Cancelled results are
      left out: a cancelled task never reached an outcome, so a resumed batch
      runs it. Without ``resume`` a batch id that exists is an error. The keys
      alone are what a resumed ``stream()`` needs; ``run()`` reads the stored
      results themselves, for its summary, from that mapping or else through
      :meth:`results`, which must then return every one of them when given
      the ``batch_id`` alone.
    * :meth:`add` takes one final result. It does no I/O: a store buffers and
      writes in the background, and says in its docs how soon a result is durable.
    * :meth:`end_batch` marks the batch finished once all of its results are written.
    * :attr:`backlog` is how many results :meth:`add` took that are not written
      yet; while it is over :data:`MAX_BACKLOG` the scheduler pulls no new task
      and awaits :meth:`flush`, so a store slower than the tasks bounds memory
      instead of queueing without end.
    """

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Open files or connections; called once before first use."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Write what is buffered and release resources. Idempotent."""

    @property
    def backlog(self) -> int:
        """Results taken by :meth:`add` and not written yet."""
        return 0

    async def flush(self) -> None:  # noqa: B027 - optional hook
        """Write every result taken so far."""

    @abc.abstractmethod
    async def begin_batch(self, batch_id: str, *, name: str | None = None,
                          resume: bool = False) -> Collection[str]: ...

    @abc.abstractmethod
    def add(self, result: TaskResult) -> None: ...

    @abc.abstractmethod
    async def end_batch(self, batch_id: str) -> None: ...

    @abc.abstractmethod
    async def results(self, *, batch_id: str | None = None, status: Status | str | None = None,
                      limit: int | None = None, offset: int = 0) -> list[TaskResult]: ...

    @abc.abstractmethod
    async def stats(self, batch_id: str | None = None) -> Stats: ...

    @abc.abstractmethod
    async def batches(self) -> list[BatchInfo]: ...

    async def batch(self, batch_id: str) -> BatchInfo | None:
        """One batch, or None; a store may answer it without reading every batch."""
        check_batch_id(batch_id, every=False)
        return next((info for info in await self.batches() if info.batch_id == batch_id), None)

    async def batch_page(self, limit: int | None, offset: int = 0) -> tuple[list[BatchInfo], int]:
        """A page of the batches, newest first, and how many batches there are in all; a store may answer it
        without reading every batch."""
        check_page(limit, offset)
        every = (await self.batches())[::-1]
        return every[offset:None if limit is None else offset + limit], len(every)


class _Batch:
    __slots__ = ("counts", "created_at", "finished_at", "name", "rerun")

    def __init__(self, name: str | None) -> None:
        self.name = name
        self.created_at = time.time()
        self.finished_at: float | None = None
        self.counts: Counter[Status] = Counter()
        self.rerun: dict[str, TaskResult] = {}  # resumed: the stored results its new ones replace


class MemoryStore(Store):
    """Results in memory only, gone with the process.

    Counts are exact for every batch; of the results themselves the latest
    ``max_results`` are kept (all of them with ``None``), so that a stream of
    millions of tasks runs in flat memory. Of the batches, the latest
    ``max_batches`` are kept: past that, the oldest that have ended are
    forgotten, with what is kept of their results, so that a service running
    batch after batch runs in flat memory too. As in a SQLite store, a resumed
    batch's new result for a key replaces the one stored before; a batch some
    of whose results are no longer kept cannot be resumed, nor can one of the
    latest ``max_batches`` it forgot, nor one that is running (in another
    scheduler that shares this store).
    """

    def __init__(self, max_results: int | None = 10_000, *, max_batches: int | None = 10_000) -> None:
        for name, value in (("max_results", max_results), ("max_batches", max_batches)):
            if value is not None and not (is_int(value) and value >= 1):
                raise ConfigurationError(f"{name} must be an int of at least 1, or None to keep all, got {value!r}")
        self._results: deque[TaskResult] = deque(maxlen=max_results)
        self._batches: dict[str, _Batch] = {}
        self._max_batches = max_batches
        self._forgotten: dict[str, None] = {}  # the latest max_batches forgotten, oldest first: not to resume

    async def begin_batch(self, batch_id: str, *, name: str | None = None,
                          resume: bool = False) -> Collection[str]:
        if batch_id in self._batches:
            if not resume:
                raise ConfigurationError(
                    f"batch {batch_id!r} already exists; pass resume=True to continue it, or use another batch_id"
                )
            batch = self._batches[batch_id]
            if batch.finished_at is None:
                raise ConfigurationError(f"batch {batch_id!r} is running in another scheduler on this MemoryStore: "
                                         "let it end, or stop it, before you resume it here")
            kept = [r for r in self._results if r.batch_id == batch_id]
            if len(kept) < batch.counts.total():
                raise ConfigurationError(
                    f"batch {batch_id!r} has {batch.counts.total()} results and this MemoryStore keeps only the "
                    f"latest {self._results.maxlen} of all batches, so it cannot tell which tasks already ran; "
                    "resume from a SQLite store (store='results.db'), or use MemoryStore(max_results=None)"
                )
            batch.finished_at = None
            previous = {r.key: r for r in kept}
            batch.rerun = {key: r for key, r in previous.items() if r.status is Status.CANCELLED}
            return {key: r for key, r in previous.items() if key not in batch.rerun}
        if resume and batch_id in self._forgotten:
            raise ConfigurationError(
                f"batch {batch_id!r} was forgotten: this MemoryStore keeps the latest {self._max_batches} batches, "
                "so it cannot tell which tasks already ran; resume from a SQLite store (store='results.db'), or use "
                "MemoryStore(max_batches=None)")
        self._forgotten.pop(batch_id, None)
        self._batches[batch_id] = _Batch(name)
        if self._max_batches is not None and len(self._batches) > self._max_batches:
            self._forget(len(self._batches) - self._max_batches)
        return {}

    def _forget(self, count: int) -> None:
        """Forget the ``count`` oldest batches that have ended (fewer if fewer have), and their results."""
        ended = (batch_id for batch_id, batch in self._batches.items() if batch.finished_at is not None)
        forgotten = set(itertools.islice(ended, count))
        for batch_id in forgotten:
            del self._batches[batch_id]
            self._forgotten[batch_id] = None
        while len(self._forgotten) > (self._max_batches or 0):
            del self._forgotten[next(iter(self._forgotten))]
        if any(r.batch_id in forgotten for r in self._results):
            self._results = deque((r for r in self._results if r.batch_id not in forgotten), self._results.maxlen)

    def add(self, result: TaskResult) -> None:
        batch = self._batches[result.batch_id]
        if batch.rerun and (earlier := batch.rerun.pop(result.key, None)) is not None:
            batch.counts[earlier.status] -= 1
            # a scan, but rare: a batch's cancelled results are the tasks it had in flight when it was cancelled
            for position, kept in enumerate(self._results):
                if kept is earlier:  # still in the window of kept results
                    del self._results[position]
                    break
        self._results.append(result)
        batch.counts[result.status] += 1

    async def end_batch(self, batch_id: str) -> None:
        self._batches[batch_id].finished_at = time.time()

    async def results(self, *, batch_id: str | None = None, status: Status | str | None = None,
                      limit: int | None = None, offset: int = 0) -> list[TaskResult]:
        check_page(limit, offset)
        check_batch_id(batch_id)
        wanted = check_status(status)
        matches = [r for r in self._results
                   if (batch_id is None or r.batch_id == batch_id) and (wanted is None or r.status is wanted)]
        return matches[offset:None if limit is None else offset + limit]

    async def stats(self, batch_id: str | None = None) -> Stats:
        check_batch_id(batch_id)
        if batch_id is not None:
            batch = self._batches.get(batch_id)
            return Stats.of(dict(batch.counts) if batch else {}, batch_id)
        total: Counter[Status] = Counter()
        for batch in self._batches.values():
            total.update(batch.counts)
        return Stats.of(dict(total))

    async def batches(self) -> list[BatchInfo]:
        return [self._info(batch_id, b) for batch_id, b in self._batches.items()]

    async def batch(self, batch_id: str) -> BatchInfo | None:
        check_batch_id(batch_id, every=False)
        found = self._batches.get(batch_id)
        return None if found is None else self._info(batch_id, found)

    @staticmethod
    def _info(batch_id: str, b: _Batch) -> BatchInfo:
        return BatchInfo(batch_id, b.name, b.created_at, b.finished_at, Stats.of(dict(b.counts), batch_id))
