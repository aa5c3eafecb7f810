"""The SQLite store: every batch and every final result in one file, through aiosqlite.

Data flow::

    Scheduler --add(result)--> pending list            no I/O: add() appends and wakes the writer
                                   |
                                   |  writer task: one transaction with everything pending,
                                   |  at most every FLUSH_INTERVAL (group commit)
                                   v
    write connection (aiosqlite thread) --> results.db (WAL) <-- read connection (aiosqlite thread)
      begin_batch, end_batch, flush,                               results, stats, batches,
      import_jsonl                                                 export_jsonl

Every write transaction holds ``_lock``, so the writer task, :meth:`SQLiteStore.flush`
and an import never interleave on the write connection. Queries go through their
own connection: in WAL mode they read the last commit without waiting for the
writer, in this process and in any other one.

The file carries its schema version in ``PRAGMA user_version``; ``_MIGRATIONS[n]``
takes a file from version ``n`` to ``n + 1``, and :meth:`SQLiteStore.open` runs
the missing steps in one transaction. Errors of sqlite3 are translated here into
:class:`StoreError`, with what to do about them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import functools
import hashlib
import itertools
import json
import math
import os
import pickle
import pickletools
import re
import sqlite3
import stat
import struct
import threading
import time
import traceback
import urllib.parse
import weakref
from collections.abc import AsyncIterator, Collection, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, overload

try:
    import fcntl
except ImportError:  # Windows: no lock of a batch, but those of one store
    fcntl = None  # type: ignore[assignment]

import aiofiles
import aiofiles.os
import aiosqlite

from ._errors import ClosedError, ConfigurationError, StoreError
from ._models import Stats, Status, TaskResult, finite, finite_json_float, is_seconds, no_json_constant
from ._store import BatchInfo, Store, check_batch_id, check_page, check_status, stored_text

__all__ = ["SQLiteStore"]

FLUSH_INTERVAL = 0.1
"""Seconds between two group commits of the writer task: the most a result waits to be committed."""
GROUP_ROWS = 1024
"""Queued results that make the writer commit at once, before FLUSH_INTERVAL is up: fast batches never stall on
a large backlog, and the last commit of a batch stays short."""
DEFAULT_BUSY_TIMEOUT = 5.0
"""Seconds to wait for another connection's write lock before giving up."""
_MAX_BUSY_TIMEOUT = (2**31 - 1) / 1000
"""SQLite takes the busy timeout in milliseconds, in a 32-bit int: a longer one would mean no wait at all."""
SCHEMA_VERSION = 2
_READABLE_VERSION = 1
"""The oldest schema a read-only connection can query: version 2 changed an index only."""
APPLICATION_ID = 0x61736368  # "asch", in PRAGMA application_id: marks a file as ours
_NOT_COMPLETED = "status != 'completed'"
"""The condition of the status index; a query that says it too can use the index."""
_CHUNK = 500
"""Rows per fetch while exporting; about as many lines per read while importing."""

_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 0 -> 1
        """CREATE TABLE batches (
            batch_id TEXT PRIMARY KEY,
            name TEXT,
            created_at REAL NOT NULL,
            finished_at REAL
        )""",
        """CREATE TABLE results (
            id INTEGER PRIMARY KEY,
            batch_id TEXT NOT NULL,
            key TEXT NOT NULL,
            position INTEGER NOT NULL,
            status TEXT NOT NULL,
            value TEXT,
            value_pickle BLOB,
            error TEXT,
            error_type TEXT,
            traceback TEXT,
            attempts INTEGER NOT NULL,
            pid INTEGER,
            started_at REAL,
            finished_at REAL,
            duration REAL GENERATED ALWAYS AS (finished_at - started_at) VIRTUAL,
            message TEXT,
            progress REAL,
            UNIQUE (batch_id, key)
        )""",
        "CREATE INDEX results_by_status ON results (batch_id, status)",
    ),
    (  # 1 -> 2: index only the results that did not complete, the few that a query by status looks for:
        # storing a completed one, most of them, then updates one index less
        "DROP INDEX results_by_status",
        f"CREATE INDEX results_not_completed ON results (batch_id, status) WHERE {_NOT_COMPLETED}",
    ),
)
assert len(_MIGRATIONS) == SCHEMA_VERSION

_COLUMNS = ("batch_id", "key", "position", "status", "value", "value_pickle", "error", "error_type", "traceback",
            "attempts", "pid", "started_at", "finished_at", "message", "progress")
_ROWS_PER_INSERT = 64
"""Rows per INSERT statement: each statement is one SQLite step, and each step hands the GIL to the loop and back."""
_LEAN_PARAMETERS = 9
"""Parameters per row of a lean INSERT (see _lean_sql)."""
_INT64 = 2**63
"""Ints in [-_INT64, _INT64) bind to SQLite as they are."""
_VALUE_ROOM = 1_000_000_000 - 2**26
"""The longest value stored, in bytes: SQLite's limit on one string, blob or row (SQLITE_MAX_LENGTH, as SQLite is
built by default), less room for the row's other columns (see _TEXT_ROOM). A longer one would fail every commit."""
_TEXT_ROOM = 2**22
"""The longest error, traceback or message stored, in characters (16 MiB of UTF-8 at most); a longer one is cut."""
_COMPLETED = Status.COMPLETED  # for the writer's loop over results: an enum member costs a lookup each time
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM results"

Row = tuple[Any, ...]
_OPEN: weakref.WeakSet[SQLiteStore] = weakref.WeakSet()
"""Stores whose connections may be open."""
_OFD_SETLK: int | None = getattr(fcntl, "F_OFD_SETLK", None)
"""Linux's lock of an open file description: held until that description unlocks it or closes, or its process
dies, and refused to every other description, in this process or another."""
_OFD_GETLK: int | None = getattr(fcntl, "F_OFD_GETLK", None)
_FLOCK = "@hhqqi4x"
"""Linux's struct flock: type, whence, start, length, pid (0 for a lock of an open file description)."""


def _stop_open_stores() -> None:
    """At exit, before the interpreter waits for its threads: stop the connection threads of the stores never
    closed, after what was queued on them. They are not daemon threads, and would keep the process alive."""
    for store in list(_OPEN):
        for connection in (store._reader, store._db):
            if connection is not None:
                connection.stop()


threading._register_atexit(_stop_open_stores)  # type: ignore[attr-defined]  # concurrent.futures uses it so too


def _let_go_of_claims() -> None:
    """In a child forked after a batch began (a task's own, a fork-started pool's worker), close the copy of the
    descriptor that holds the batch's lock: else the lock would outlive a killed orchestrator in that child."""
    for store in list(_OPEN):
        if store._claims is not None:
            os.close(store._claims)  # the parent's descriptor holds the lock all the same
            store._claims = None
        store._claimed.clear()


os.register_at_fork(after_in_child=_let_go_of_claims)
_JSON = json.JSONEncoder(separators=(",", ":"))


class SQLiteStore(Store):
    """Batches and results in a SQLite file: they survive the process and can be queried from others.

    ``SQLiteStore("results.db")`` is what ``Scheduler(store="results.db")`` builds.
    On its own it opens with ``async with SQLiteStore(path) as store``, e.g. to
    query, export or import without running anything.

    Durability: :meth:`add` only queues the result. A writer task commits what
    is queued in one transaction, at most every :data:`FLUSH_INTERVAL` (0.1 s),
    and at once when :data:`GROUP_ROWS` results are queued, so a result is on
    disk at most about 0.1 s (plus the commit itself) after its task is
    reported finished to the caller. :meth:`end_batch` (the end of
    ``run()`` and ``stream()``), :meth:`flush` and :meth:`aclose` commit
    everything queued before they return; so does a cancel of the writer task
    from outside, as at the end of ``asyncio.run()`` for a store never closed
    (what comes after is committed by ``end_batch``, ``flush`` or ``aclose``).
    At exit, the connections of a store never closed are stopped, after what
    was queued on them. Commits are synchronous (WAL with
    ``synchronous=FULL``): a committed result survives SIGKILL and power loss.
    If a commit fails (disk full, a lock held too long) the results stay queued
    and the next commit tries again; ``end_batch``, ``flush`` and ``aclose``
    raise :class:`StoreError` if it still fails.

    One row per ``(batch_id, key)``: a later result for the same key replaces
    the earlier one. Values are stored as JSON when they are plain JSON (dicts
    with str keys, lists, str, int, finite float, bool, None) and pickled
    otherwise, so every value reads back equal and of the same type. Reading a
    pickled value unpickles it: open only files you trust.

    ``busy_timeout`` (seconds) is how long a write waits for another
    connection's lock before it fails with :class:`StoreError`.

    ``readonly=True`` opens an existing file for queries and export only
    (SQLite's ``mode=ro``): it never changes the file, never creates one, and
    reads the last commit while another process writes to it.
    """

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
                 readonly: bool = False) -> None:
        fspath = os.fspath(path) if isinstance(path, str | os.PathLike) else None
        if not isinstance(fspath, str):
            raise ConfigurationError(f"SQLiteStore needs the path of a SQLite file, a str or an os.PathLike such as "
                                     f"pathlib.Path (a bytes path decoded with os.fsdecode()), got {path!r}")
        self.path = fspath
        if self.path in ("", ":memory:"):
            raise ConfigurationError(f"SQLiteStore needs a file path, got {self.path!r}; "
                                     "use store=None to keep results in memory")
        if not (is_seconds(busy_timeout) and 0 <= busy_timeout <= _MAX_BUSY_TIMEOUT):
            raise ConfigurationError(f"busy_timeout must be a number of seconds from 0 to {int(_MAX_BUSY_TIMEOUT)}, "
                                     f"got {busy_timeout!r}")
        self.busy_timeout = busy_timeout
        self.readonly = readonly
        self._db: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._writer: asyncio.Task[None] | None = None
        self._pending: list[TaskResult] = []
        self._wake = asyncio.Event()  # a result is queued
        self._full = asyncio.Event()  # GROUP_ROWS results are queued
        self._lock = asyncio.Lock()
        self._claims: int | None = None  # the file of the locks of the batches this store runs (see _claim)
        self._claimed: set[str] = set()  # those batches
        self._closed = False

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r}{', readonly=True' if self.readonly else ''})"

    async def __aenter__(self) -> SQLiteStore:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the file, creating or migrating its schema; fails with :class:`StoreError` on a bad file."""
        if self._closed:
            raise self._unavailable()
        if self._db is not None or self._reader is not None:
            return
        try:
            with self._translate("open"):
                # A failed aiosqlite.connect() leaves its thread to finish on its own, maybe after the loop
                # closed: find out in a thread of ours whether the file opens at all.
                await asyncio.to_thread(_try_to_open, self.path, self.readonly)
                if self.readonly:
                    self._reader = await self._connect()
                    if await self._version(self._reader) < _READABLE_VERSION:  # an empty database
                        raise StoreError(f"{self.path} holds no asyncsched results: it is empty (a run stopped "
                                         "before it stored anything, say); pass the path of a results file")
                else:
                    self._db = await self._connect()
                    await self._version(self._db)  # refuse a file that is not ours before changing anything in it
                    await self._db.execute("PRAGMA journal_mode = WAL")
                    await self._db.execute("PRAGMA synchronous = FULL")
                    await self._migrate()
                    self._reader = await self._connect()
        except BaseException:
            await self._close_connections()
            raise
        if not self.readonly:
            self._writer = asyncio.get_running_loop().create_task(self._write_loop(), name=f"{self!r} writer")

    async def _connect(self) -> aiosqlite.Connection:
        _OPEN.add(self)
        return await aiosqlite.connect(_readonly_uri(self.path) if self.readonly else self.path, uri=self.readonly,
                                       isolation_level=None, timeout=self.busy_timeout, iter_chunk_size=_CHUNK)

    async def _version(self, db: aiosqlite.Connection) -> int:
        """The file's schema version, once it is known to be a file asyncsched can use."""
        if await _pragma(db, "application_id") != APPLICATION_ID:  # not ours (every version of ours sets it)
            cursor = await db.execute("SELECT count(*) FROM sqlite_schema")
            row = await cursor.fetchone()
            if row is not None and row[0]:  # whatever its user_version: many applications set theirs
                raise StoreError(f"{self.path} is a SQLite database of another application; "
                                 f"{_pass_a_results_file(self.readonly)}")
            return 0  # an empty database: a new file
        version = await _pragma(db, "user_version")
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path} has schema version {version}, newer than this asyncsched "
                             f"understands ({SCHEMA_VERSION}); upgrade asyncsched, or use another file")
        return version

    async def _migrate(self) -> None:
        async with self._writing("open") as db:  # BEGIN IMMEDIATE: waits for another writer up to busy_timeout
            version = await self._version(db)
            for step in _MIGRATIONS[version:]:
                for statement in step:
                    await db.execute(statement)
            # PRAGMA takes no parameters; both values are constants of this module.
            await db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            await db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    async def aclose(self) -> None:
        """Commit what is queued and close the file. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            writer = self._writer
            if writer is not None and writer.get_loop() is not asyncio.get_running_loop():
                if not writer.get_loop().is_closed():  # stopped: it will not run again, or else only to end
                    writer.cancel()
            elif writer is not None:
                async with self._lock:  # never stop the writer in the middle of a commit
                    writer.cancel()
                await asyncio.wait([writer])
            if self._db is not None:
                await self.flush()
        finally:
            await self._close_connections()

    async def _close_connections(self) -> None:
        if self._claims is not None:
            os.close(self._claims)  # releases every batch this store ran
            self._claims = None
        self._claimed.clear()
        for connection in (self._reader, self._db):
            if connection is not None:
                with contextlib.suppress(sqlite3.Error):
                    await connection.close()
        self._reader = self._db = None
        _OPEN.discard(self)

    # -- writes ----------------------------------------------------------------------------

    def add(self, result: TaskResult) -> None:
        """Queue one final result; the writer task commits it within :data:`FLUSH_INTERVAL`."""
        if self._closed or self.readonly:
            raise self._unavailable()
        pending = self._pending
        pending.append(result)
        if len(pending) == 1:
            self._wake.set()
        elif len(pending) >= GROUP_ROWS:
            self._full.set()

    @property
    def backlog(self) -> int:
        return len(self._pending)

    async def flush(self) -> None:
        """Commit every result queued so far."""
        await self._commit()

    async def begin_batch(self, batch_id: str, *, name: str | None = None,
                          resume: bool = False) -> Collection[str]:
        batch_id = _text(batch_id)
        if self._db is None:  # not open, closed, or read-only: refused before the lock is touched
            raise self._unavailable()
        self._claim(batch_id, True)
        try:
            created = await self._commit("INSERT OR IGNORE INTO batches (batch_id, name, created_at) "
                                         "VALUES (?, ?, ?)", (batch_id, name, time.time()))
            if created:
                return {}
            if not resume:
                raise ConfigurationError(
                    f"batch {batch_id!r} already exists in {self.path}; pass resume=True to continue it, "
                    "or use another batch_id"
                )
            await self._commit("UPDATE batches SET finished_at = NULL WHERE batch_id = ?", (batch_id,))
            cancelled = Status.CANCELLED.value  # a cancelled task never reached an outcome: the resumed batch runs it
            keys: set[str] = set()
            with self._translate("read"):
                async with self._read_connection().execute(
                        "SELECT key FROM results WHERE batch_id = ? AND status != ?", (batch_id, cancelled)) as cursor:
                    while rows := await cursor.fetchmany(_CHUNK * 20):
                        keys.update(key for (key,) in rows)
            return _Stored(keys)
        except BaseException:
            self._claim(batch_id, False)
            raise

    async def end_batch(self, batch_id: str) -> None:
        batch_id = _text(batch_id)
        try:
            await self._commit("UPDATE batches SET finished_at = ? WHERE batch_id = ?", (time.time(), batch_id))
        finally:
            self._claim(batch_id, False)

    def _claim(self, batch_id: str, claim: bool) -> None:
        """Lock ``batch_id`` while this store runs it (``claim``), or unlock it.

        Two schedulers that ran one batch at once would run its tasks twice:
        whoever runs a batch holds a lock of one byte of ``<file>-batches``,
        at an offset that a hash of the batch id gives, from begin_batch() to
        end_batch(). It is a lock of this store's open file description
        (Linux; elsewhere only the schedulers that share this store are kept
        apart), so the kernel drops it when the process dies: a batch whose
        orchestrator was killed can be resumed. The file stays empty; it is
        not the database file, whose descriptors this process must not close
        while SQLite holds locks on it.
        """
        if not claim:
            self._claimed.discard(batch_id)
        elif batch_id in self._claimed:  # by another scheduler with this store
            raise _running_elsewhere(batch_id, self.path)
        if _OFD_SETLK is not None and (self._claims is not None or claim):
            if self._claims is None:
                with _file_errors("open the batch locks of", self.path):
                    self._claims = _open_claims(self.path)
            try:
                fcntl.fcntl(self._claims, _OFD_SETLK, _flock(batch_id, fcntl.F_WRLCK if claim else fcntl.F_UNLCK))
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise StoreError(f"cannot lock batch {batch_id!r} in {self.path}-batches: {exc}") from exc
                raise _running_elsewhere(batch_id, self.path) from None
        if claim:
            self._claimed.add(batch_id)

    def is_running(self, batch_id: str) -> bool | None:
        """Whether a scheduler runs ``batch_id`` now, in this process or another: whether it holds the batch's
        lock (see :meth:`_claim`). None where that cannot be told: not on Linux, and not run by this store."""
        batch_id = _text(batch_id)
        if batch_id in self._claimed:
            return True
        if _OFD_GETLK is None:
            return None
        try:
            fd = os.open(_claims_path(self.path), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # none: no batch was ever run with this version
            return False
        try:
            held = fcntl.fcntl(fd, _OFD_GETLK, _flock(batch_id, fcntl.F_WRLCK))
        finally:
            os.close(fd)  # a lock of an open file description is not dropped by closing another
        return bool(struct.unpack(_FLOCK, held)[0] != fcntl.F_UNLCK)

    async def _write_loop(self) -> None:
        try:
            await self._write_groups()
        except asyncio.CancelledError:
            if not self._closed:  # not by aclose(): asyncio.run() cancels the tasks left when its main returns
                await self._commit()  # what is queued; the file stays open for what the other tasks end with
            raise

    async def _write_groups(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            started = loop.time()
            try:
                await self._commit()
            except Exception:  # a StoreError, or a bug: the results stay queued and _wake set; try again later
                await asyncio.sleep(started + FLUSH_INTERVAL - loop.time())
                continue
            self._full.clear()
            if len(self._pending) < GROUP_ROWS:
                with contextlib.suppress(TimeoutError):  # let the next group gather, unless it fills up first
                    async with asyncio.timeout_at(started + FLUSH_INTERVAL):
                        await self._full.wait()

    async def _commit(self, sql: str | None = None, parameters: tuple[Any, ...] = ()) -> int:
        """One transaction: every queued result, then ``sql``; returns how many rows ``sql`` changed.

        With nothing queued and no ``sql`` it still waits for a commit in
        flight, which holds what was queued before: once it returns,
        everything queued before the call is committed.
        """
        results: list[TaskResult] = []
        async with self._lock:
            if sql is None and not self._pending:
                return 0
            try:
                async with self._transaction() as db:
                    results, self._pending = self._pending, []
                    await _insert_results(db, results)
                    return 0 if sql is None else (await db.execute(sql, parameters)).rowcount
            except BaseException:
                self._pending[:0] = results  # not committed: queued again, ahead of newer ones
                if self._pending:
                    self._wake.set()  # for the writer to try again
                raise

    @contextlib.asynccontextmanager
    async def _writing(self, doing: str = "write to") -> AsyncIterator[aiosqlite.Connection]:
        """A write transaction on the write connection, for this caller alone."""
        async with self._lock, self._transaction(doing) as db:
            yield db

    @contextlib.asynccontextmanager
    async def _transaction(self, doing: str = "write to") -> AsyncIterator[aiosqlite.Connection]:
        """A write transaction, committed at the end or rolled back; the caller holds ``_lock``."""
        db = self._db
        if db is None:
            raise self._unavailable()
        with self._translate(doing):
            try:
                await db.execute("BEGIN IMMEDIATE")  # runs even if this await is cancelled: so does the rollback
                yield db
                await db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    await db.rollback()
                raise

    # -- queries ---------------------------------------------------------------------------

    async def results(self, *, batch_id: str | None = None, status: Status | str | None = None,
                      limit: int | None = None, offset: int = 0) -> list[TaskResult]:
        check_page(limit, offset)
        where, parameters = _where(batch_id, status)
        return await self._select(f"{where} ORDER BY id LIMIT ? OFFSET ?",
                                  (*parameters, -1 if limit is None else limit, offset))

    async def stats(self, batch_id: str | None = None) -> Stats:
        where, parameters = _where(batch_id, None)
        rows = await self._fetch(_counts_sql(where), parameters * 2)
        return Stats.of(_tally((status, n) for _, status, n in rows), batch_id)

    async def batches(self) -> list[BatchInfo]:
        return await self._batches(None)

    async def batch(self, batch_id: str) -> BatchInfo | None:
        check_batch_id(batch_id, every=False)
        found = await self._batches(batch_id)
        return found[0] if found else None

    async def batch_page(self, limit: int | None, offset: int = 0) -> tuple[list[BatchInfo], int]:
        """Counts the results of the page's batches alone: a page of a store of 40,000 batches and 2,000,000
        results took 0.4 s through :meth:`batches`."""
        check_page(limit, offset)
        ((total,),) = await self._fetch("SELECT count(*) FROM batches", ())
        ids = await self._fetch("SELECT batch_id FROM batches ORDER BY created_at DESC, batch_id DESC LIMIT ? OFFSET ?",
                                (-1 if limit is None else limit, offset))
        page = [info for (batch_id,) in ids for info in await self._batches(batch_id)]
        return page, total

    async def _batches(self, batch_id: str | None) -> list[BatchInfo]:
        where, parameters = _where(batch_id, None)
        rows = await self._fetch(
            "SELECT b.batch_id, b.name, b.created_at, b.finished_at, c.status, c.n"
            f" FROM batches b LEFT JOIN ({_counts_sql(where)}) c USING (batch_id){where}"
            " ORDER BY b.created_at, b.batch_id", parameters * 3)
        found: dict[str, tuple[str | None, float, float | None, list[tuple[str | None, int]]]] = {}
        for batch_id, name, created_at, finished_at, status, n in rows:
            counts = found.setdefault(batch_id, (name, created_at, finished_at, []))[3]
            if n is not None:
                counts.append((status, n))
        return [BatchInfo(batch_id, name, created_at, finished_at, Stats.of(_tally(counts), batch_id))
                for batch_id, (name, created_at, finished_at, counts) in found.items()]

    async def _select(self, rest: str, parameters: tuple[Any, ...]) -> list[TaskResult]:
        return [_result(row) for row in await self._fetch(_SELECT + rest, parameters)]

    async def _fetch(self, sql: str, parameters: tuple[Any, ...]) -> list[Row]:
        with self._translate("read"):
            return [tuple(row) for row in await self._read_connection().execute_fetchall(sql, parameters)]

    def _read_connection(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise self._unavailable()
        return self._reader

    def _unavailable(self) -> Exception:
        if self._closed:
            return ClosedError(f"{self!r} is closed; create a new one")
        if self.readonly and self._reader is not None:
            return StoreError(f"{self!r} is read-only; open it without readonly=True to write to it")
        return StoreError(f"{self!r} is not open; use `async with` or await open() first")

    # -- JSON Lines ------------------------------------------------------------------------

    async def export_jsonl(self, path: str | os.PathLike[str], *, batch_id: str | None = None) -> int:
        """Write the stored results (of one batch, or all), oldest first, as JSON Lines; returns how many.

        Streams: rows are read and written a few hundred at a time. Each line
        has the fields ``task_id`` (our key), ``status``, ``message``,
        ``response_data`` (the value, when it is plain JSON), ``timestamp`` (the
        end, ISO 8601 in UTC) and ``process_id``, plus ``batch_id``, ``index``,
        ``error``, ``error_type``, ``traceback``, ``attempts``, ``started_at``,
        ``finished_at``, ``duration`` and ``progress`` (times in seconds since
        the epoch), and ``response_pickle``: the base64 pickle of a value that
        is not plain JSON, else null.

        ``path`` is replaced only once the export is complete, so a failed
        export leaves it as it was; the store's own files are refused. A path
        that names a descriptor of this process (``/dev/stdout``,
        ``/dev/fd/3``) is written through it, where it points.
        """
        if await asyncio.to_thread(is_own_file, self.path, path):
            raise StoreError(f"cannot export to {os.fspath(path)}: it is the result store {self.path} itself (or "
                             "its -wal, -shm or -batches file), which the export would destroy; write to another path")
        where, parameters = _where(batch_id, None)
        count = 0
        with self._translate("read"), _file_errors("write", path):
            async with _replacing(path) as out:
                cursor = await self._read_connection().execute(f"{_SELECT}{where} ORDER BY id", parameters)
                async with cursor:
                    while rows := list(await cursor.fetchmany(_CHUNK)):
                        await out.write("".join(_line(tuple(row)) for row in rows))
                        count += len(rows)
        return count

    async def records(self, *, batch_id: str | None = None, status: Status | str | None = None,
                      limit: int | None = None, offset: int = 0) -> list[dict[str, Any]]:
        """The results that :meth:`results` returns, as the lines of :meth:`export_jsonl` have them: a value
        that is not plain JSON stays pickled, so this works where its type cannot be imported."""
        check_page(limit, offset)
        where, parameters = _where(batch_id, status)
        rows = await self._fetch(f"{_SELECT}{where} ORDER BY id LIMIT ? OFFSET ?",
                                 (*parameters, -1 if limit is None else limit, offset))
        return [_record(row) for row in rows]

    async def import_jsonl(self, path: str | os.PathLike[str], *, batch_id: str = "imported") -> int:
        """Add the results of a JSON Lines file, as :meth:`export_jsonl` writes them; returns how many.

        Streams, in one transaction: a bad line imports nothing and raises
        :class:`StoreError` naming the line (and the field, for one of the wrong
        type). A line needs ``task_id`` (a string or an integer) and a final
        ``status``; the other fields are optional, so files in the bare format
        (``task_id``, ``status``, ``message``, ``response_data``, ``timestamp``,
        ``process_id``) import too. Lines without a ``batch_id`` go to
        ``batch_id``. A result replaces the stored one with the same batch and
        key, so importing a file twice changes nothing.
        """
        count = number = 0
        now = time.time()
        with _file_errors("read", path):
            async with aiofiles.open(path, encoding="utf-8") as source, self._writing() as db:
                while lines := await source.readlines(_CHUNK * 200):  # a hint in characters
                    rows = []
                    for line in lines:
                        number += 1
                        if line.strip():
                            rows.append(_import_row(line, path, number, batch_id))
                    await db.executemany("INSERT OR IGNORE INTO batches (batch_id, created_at, finished_at) "
                                         "VALUES (?, ?, ?)", [(b, now, now) for b in {row[0] for row in rows}])
                    await _insert(db, rows)
                    count += len(rows)
        return count

    # -- errors ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _translate(self, doing: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise StoreError(f"cannot {doing} the result store {self.path}: {exc}; "
                             f"{_advice(self.path, exc, self.busy_timeout, self.readonly)}") from exc


def _pass_a_results_file(readonly: bool) -> str:
    """What to pass instead of a file that is not one of ours: a read-only store never creates one."""
    return "pass the path of an asyncsched results file" + ("" if readonly else ", or of a new file")


def _advice(path: str, exc: sqlite3.Error, busy_timeout: float, readonly: bool) -> str:
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return (f"another connection held its write lock for more than busy_timeout={busy_timeout:g}s; "
                "stop the other writer, or pass a larger busy_timeout")
    if code == sqlite3.SQLITE_NOTADB:
        return f"it is not a SQLite database: {_pass_a_results_file(readonly)}"
    if code in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR):
        directory = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            return "it is a directory: pass the path of a file"
        if not os.path.isdir(directory):
            return f"directory {directory} does not exist: create it, or choose another path"
        if readonly:  # a file in WAL mode is read through a -shm file that SQLite creates next to it
            return (f"check that it can be read, and that directory {directory} is writable: reading a results "
                    "file takes a file SQLite creates next to it (its -shm file); else copy the file, with its "
                    "-wal file if there is one, to a directory that is")
        if os.path.isfile(path) and not os.access(path, os.W_OK):
            return "the file is read-only: make it writable, or open it with readonly=True to query it"
        stuck = [name for name in (f"{path}-wal", f"{path}-shm") if os.path.isfile(name)
                 and not os.access(name, os.W_OK)]  # made by SQLite with the permissions the file had then
        if stuck:
            it, are = ("it", "is") if len(stuck) == 1 else ("them", "are")
            return f"{' and '.join(stuck)} {are} read-only, as the file was when SQLite made {it}: make {it} writable"
        return (f"check that directory {directory} is writable, since SQLite creates the file and its WAL files "
                "there")
    if code == sqlite3.SQLITE_FULL:
        return "the disk is full: free some space (the results queued stay queued while the store is open)"
    return "see the SQLite error above"


@contextlib.contextmanager
def _file_errors(doing: str, path: str | os.PathLike[str]) -> Iterator[None]:
    try:
        yield
    except OSError as exc:  # its reason alone: the file it names may be the export's temporary one
        why = exc.strerror or str(exc)
        directory = os.path.dirname(os.path.abspath(path))
        if exc.errno == errno.ENOENT and not os.path.isdir(directory):
            why = f"directory {directory} does not exist: create it, or choose another path"
        raise StoreError(f"cannot {doing} {os.fspath(path)}: {why}") from exc
    except UnicodeError as exc:
        raise StoreError(f"cannot {doing} {os.fspath(path)}: it is not UTF-8 text ({exc})") from exc


@contextlib.asynccontextmanager
async def _replacing(path: str | os.PathLike[str]) -> AsyncIterator[Any]:
    """``path`` opened to write text into; a regular file (or a new one) is written under a temporary name
    next to it, with its permissions from the start, and renamed over it only when the block ends without
    an error."""
    fd = _descriptor(path)
    if fd is not None:  # written where the descriptor is, as a shell's `>>` or `{ ...; } >` expects: not reopened
        async with aiofiles.open(os.dup(fd), "w", encoding="utf-8") as out:
            yield out
        return
    names = await asyncio.to_thread(_partial, path)
    if names is None:
        async with aiofiles.open(path, "w", encoding="utf-8") as out:
            yield out
        return
    partial, target, mode = names
    try:
        creating = _NEW_FILE_MODE if mode is None else mode
        async with aiofiles.open(partial, "x", encoding="utf-8",
                                 opener=lambda name, flags: os.open(name, flags, creating)) as out:
            yield out
        if mode is not None:  # the umask may have taken bits the file had
            await asyncio.to_thread(os.chmod, partial, mode)
        await aiofiles.os.replace(partial, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(partial)
        raise


def _descriptor(path: str | os.PathLike[str]) -> int | None:
    """The file descriptor of this process that ``path`` names (/dev/stdout, /dev/fd/3, /proc/self/fd/3), else
    None: opening such a path opens its file anew, at its start, where a rename would replace it."""
    found = re.fullmatch(r"/dev/(stdout|stderr)|/(?:dev|proc/self)/fd/(\d+)", os.path.normpath(os.fspath(path)))
    if found is None:
        return None
    stream, number = found.groups()
    return {"stdout": 1, "stderr": 2}[stream] if stream else int(number)


_NEW_FILE_MODE = 0o666
"""As ``open()`` creates a file: less the umask."""


def _partial(path: str | os.PathLike[str]) -> tuple[str, str, int | None] | None:
    """A new name next to the file ``path`` names, that file's own name (``path`` may be a link to it) and
    the permissions it has (None for a new file); None when ``path`` is a pipe or a device (/dev/stdout),
    or a file with other names (hard links), which is written in place."""
    target = os.path.realpath(path)
    mode = None
    try:
        found = os.stat(path)  # not of target: /dev/stdout's real path, /proc/self/fd/pipe:[N], names no file
    except FileNotFoundError:
        pass  # a new file
    else:
        if not stat.S_ISREG(found.st_mode) or found.st_nlink > 1:
            return None
        mode = stat.S_IMODE(found.st_mode)
    return os.path.join(os.path.dirname(target), f".asyncsched-{os.urandom(4).hex()}.partial"), target, mode


@functools.cache
def _insert_sql(rows: int, columns: Sequence[str] = _COLUMNS) -> str:
    values = ", ".join([f"({', '.join('?' * len(columns))})"] * rows)
    return f"INSERT OR REPLACE INTO results ({', '.join(columns)}) VALUES {values}"


@functools.cache
def _lean_sql(rows: int) -> str:
    """An INSERT of ``rows`` plain completed results: 9 parameters a row, the status a constant.

    Plain ``?`` only: Python 3.12.0 to 3.12.3 warn about numbered ones (``?1``) bound from a sequence.
    """
    values = ", ".join(["(?, ?, ?, ?, 'completed', ?, ?, ?, ?, ?)"] * rows)
    return ("INSERT OR REPLACE INTO results (id, batch_id, key, position, status, value, attempts, pid, started_at, "
            f"finished_at) VALUES {values}")


async def _insert(db: aiosqlite.Connection, rows: Sequence[Row], columns: Sequence[str] = _COLUMNS) -> None:
    """Insert (or replace) ``rows`` of ``columns``, :data:`_ROWS_PER_INSERT` per statement.

    The parameters of the full statements are gathered in the connection's thread, off the event loop.
    """
    size = _ROWS_PER_INSERT
    full = len(rows) - len(rows) % size
    if full:
        await db.executemany(_insert_sql(size, columns), (tuple(itertools.chain.from_iterable(rows[i:i + size]))
                                                          for i in range(0, full, size)))
    if full < len(rows):
        await db.execute(_insert_sql(len(rows) - full, columns), tuple(itertools.chain.from_iterable(rows[full:])))


async def _insert_results(db: aiosqlite.Connection, results: Sequence[TaskResult]) -> None:
    """Insert (or replace) the rows of ``results``, in order: ids as they come, and the later of two
    results with the same key last.

    Most results are a plain value of a completed task: those go in lean
    statements (:func:`_lean_sql`), which cost SQLite half as much per row,
    and hold the GIL, which the event loop needs, half as long. The rest go in
    full rows, after them. Each row is given its id in the order of
    ``results``, so reading by id stays oldest first; a lean result that comes
    after a full one of the same key goes with the full rows, so the later one
    still wins.
    """
    (last,) = next(iter(await db.execute_fetchall("SELECT coalesce(max(id), 0) FROM results")))
    full: list[Row] = []
    rest: list[Any] = []  # the parameters of the lean rows that fill no whole statement
    complete = _ROWS_PER_INSERT * _LEAN_PARAMETERS

    def lean_statements() -> Iterator[list[Any]]:  # runs in the connection's thread
        full_keys: set[tuple[str, str]] = set()
        parameters: list[Any] = []
        batch_id: str | None = None
        batch = None
        for row_id, r in enumerate(results, last + 1):
            encoded: tuple[str | None, bytes | None] | _Unstorable | None = None
            if (r.status is _COMPLETED and r.message is None and r.progress is None and r.error is None
                    and r.traceback is None and r.error_type is None
                    and not (full_keys and (r.batch_id, r.key) in full_keys)):
                value = r.value
                if type(value) is int and -_INT64 <= value < _INT64:
                    blob = None  # bound as it is: the column's TEXT affinity stores its decimal text, as _encode()
                else:
                    try:
                        encoded = value, blob = _encode(value)
                    except _Unstorable as exc:
                        encoded, blob = exc, b""  # a full row, which says why
                if blob is None:
                    if r.batch_id is not batch_id:
                        batch_id, batch = r.batch_id, _text(r.batch_id)
                    key = r.key if r.key.isascii() else _text(r.key)
                    parameters += (row_id, batch, key, r.index, value, r.attempts, r.pid, r.started_at,
                                   r.finished_at)
                    if len(parameters) == complete:
                        yield parameters
                        parameters = []
                    continue
            full_keys.add((r.batch_id, r.key))
            full.append((row_id, *_row(r, encoded)))
        rest.extend(parameters)

    await db.executemany(_lean_sql(_ROWS_PER_INSERT), lean_statements())
    if rest:
        await db.execute(_lean_sql(len(rest) // _LEAN_PARAMETERS), rest)
    await _insert(db, full, ("id", *_COLUMNS))


def is_own_file(store: str | os.PathLike[str], path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names the results file ``store``, or its -wal, -shm or -batches file (which may not exist
    yet): a file that writing to would destroy the results."""
    store = os.fspath(store)
    for own in (store, f"{store}-wal", f"{store}-shm", _claims_path(store)):
        if os.path.realpath(path) == os.path.realpath(own):
            return True
        with contextlib.suppress(OSError):  # either one does not exist
            if os.path.samefile(path, own):  # another name of it: a hard link, another mount
                return True
    return False


def _claims_path(path: str) -> str:
    """The file of the locks of the batches of the results file ``path``: beside the file itself, links resolved
    as SQLite resolves them, so that every name of one file finds the same locks."""
    return os.path.realpath(path) + "-batches"


def _open_claims(path: str) -> int:
    """Open the file of the locks of ``path``'s batches, creating it with the results file's permissions (as SQLite
    gives its -wal and -shm files), so that every user who may write the results may run a batch."""
    name, mode = _claims_path(path), stat.S_IMODE(os.stat(path).st_mode) & 0o666
    try:
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except FileExistsError:
        return os.open(name, os.O_RDWR | os.O_CLOEXEC)
    os.fchmod(fd, mode)  # the umask does not narrow it
    return fd


def _flock(batch_id: str, how: int) -> bytes:
    """The struct flock of ``batch_id``'s lock: one byte, at an offset of 2**62 and a hash of the id (SQLite locks
    bytes at 1 GiB)."""
    digest = hashlib.blake2b(batch_id.encode(), digest_size=7).digest()
    return struct.pack(_FLOCK, how, os.SEEK_SET, 2**62 + int.from_bytes(digest, "big"), 1, 0)


def _running_elsewhere(batch_id: str, path: str) -> ConfigurationError:
    return ConfigurationError(f"batch {batch_id!r} is running in another scheduler or process on {path}: let it "
                              "end, or stop it, before you run or resume it here")


def _try_to_open(path: str, readonly: bool) -> None:
    if readonly and not os.path.isfile(path):
        raise StoreError(f"{path} {'is a directory' if os.path.isdir(path) else 'does not exist'}: "
                         "pass the path of an asyncsched results file")
    sqlite3.connect(_readonly_uri(path) if readonly else path, uri=readonly).close()


def _readonly_uri(path: str) -> str:
    """A URI that opens ``path`` for reading only, and never creates it."""
    return f"file:{urllib.parse.quote(os.fsencode(os.path.abspath(path)))}?mode=ro"  # bytes: any file name


async def _pragma(db: aiosqlite.Connection, name: str) -> int:
    cursor = await db.execute(f"PRAGMA {name}")  # name is a constant of this module
    row = await cursor.fetchone()
    return int(row[0]) if row is not None else 0


def _where(batch_id: str | None, status: Status | str | None) -> tuple[str, tuple[Any, ...]]:
    check_batch_id(batch_id)
    conditions, parameters = [], []
    if batch_id is not None:
        conditions.append("batch_id = ?")
        parameters.append(_text(batch_id))
    status = check_status(status)
    if status is not None:
        conditions.append("status = ?" if status is _COMPLETED else f"status = ? AND {_NOT_COMPLETED}")
        parameters.append(status.value)
    return (" WHERE " + " AND ".join(conditions) if conditions else ""), tuple(parameters)


def _counts_sql(where: str) -> str:
    """Rows of (batch_id, NULL, results) for each batch, and of (batch_id, status, results) for each status but
    completed: both read from an index alone. Takes the parameters of ``where`` twice."""
    return (f"SELECT batch_id, NULL AS status, count(*) AS n FROM results{where} GROUP BY batch_id UNION ALL "
            f"SELECT batch_id, status, count(*) FROM results{where}{' AND' if where else ' WHERE'} {_NOT_COMPLETED} "
            "GROUP BY batch_id, status")


def _tally(counts: Iterable[tuple[str | None, int]]) -> dict[Status, int]:
    """Results by status, from rows of :func:`_counts_sql`: totals (status NULL) and counts of the other statuses."""
    tally = {_COMPLETED: 0}
    for status, n in counts:
        if status is None:
            tally[_COMPLETED] += n
        else:
            other = Status(status)
            tally[other] = tally.get(other, 0) + n
            tally[_COMPLETED] -= n
    return tally


# -- values and rows -------------------------------------------------------------------------


def _plain_json(value: Any) -> bool:
    """True when ``json.loads(json.dumps(value))`` gives back an equal value of the very same types."""
    kind = type(value)
    if value is None or kind is str or kind is int or kind is bool:
        return True
    if kind is float:
        return math.isfinite(value)
    if kind is list:
        return all(_plain_json(item) for item in value)
    if kind is dict:
        return all(type(k) is str and _plain_json(v) for k, v in value.items())
    return False


class _Unstorable(Exception):
    """A value the store cannot hold: why, for the ``failed`` row stored instead."""


def _encode(value: Any) -> tuple[str | None, bytes | None]:
    """The ``(value, value_pickle)`` columns of a value; raises _Unstorable."""
    if value is None:
        return None, None
    kind = type(value)
    try:  # not contextlib.suppress: this runs for every result, in the writer thread, holding the GIL
        if kind is int or (kind is float and math.isfinite(value)):
            return repr(value), None  # the JSON of a number is its repr
        if _plain_json(value):
            text = _JSON.encode(value)
            if len(text) > _VALUE_ROOM:  # (ASCII: as many bytes as characters)
                raise _Unstorable(f"its value, {len(text):,} bytes of JSON, is over the {_VALUE_ROOM:,} bytes "
                                  "SQLite can hold in one row: it was not stored")
            return text, None
    except ValueError:  # an int too long for str() (sys.set_int_max_str_digits): pickled
        pass
    try:
        blob = pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # it came unpickled, but does not pickle again (its __setstate__ made a lock, say)
        raise _Unstorable(f"its value, of type {type(value).__name__}, could not be pickled again here to be "
                          f"stored: {type(exc).__name__}: {exc}") from None
    if len(blob) > _VALUE_ROOM:
        raise _Unstorable(f"its value, {len(blob):,} bytes pickled, is over the {_VALUE_ROOM:,} bytes SQLite can "
                          "hold in one row: it was not stored")
    return None, blob


@overload
def _text(text: str) -> str: ...


@overload
def _text(text: None) -> None: ...


def _text(text: str | None) -> str | None:
    """``text`` as SQLite can take it (:func:`stored_text`): keys and batch ids are stored so, and looked up so."""
    return None if text is None else stored_text(text)


class _Stored(Collection[str]):
    """The keys of a batch's stored results, as stored: a key with a lone surrogate is found in either form.

    Only the keys: a resumed ``stream()`` asks no more, so it holds no stored
    value in memory (nor reads one that no longer unpickles, its class renamed).
    """

    def __init__(self, keys: set[str]) -> None:
        self._keys = keys

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and (key in self._keys or stored_text(key) in self._keys)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


_STATUS_TEXT = {status: status.value for status in Status}  # Enum.value is a slow property


def _row(r: TaskResult, encoded: tuple[str | None, bytes | None] | _Unstorable | None = None) -> Row:
    """The row of ``r``, in the order of ``_COLUMNS``; ``encoded`` is what ``_encode(r.value)`` gave, if known.

    A value the store cannot hold makes a ``failed`` row that says why: a commit that failed on it would fail
    again each time, and hold back every result after it.
    """
    status, error, error_type, tb = r.status, r.error, r.error_type, r.traceback
    try:
        if isinstance(encoded, _Unstorable):
            raise encoded  # not encoded again: a value of a gigabyte, say
        value, blob = encoded or _encode(r.value)
    except _Unstorable as exc:
        value = blob = None
        status, error, error_type, tb = Status.FAILED, f"StoreError: {exc}", "StoreError", None
    return (_text(r.batch_id), _text(r.key), r.index, _STATUS_TEXT[status], value, blob, _cut(_text(error)),
            _text(error_type), _cut(_text(tb)), r.attempts, r.pid, r.started_at, r.finished_at,
            _cut(_text(r.message)), r.progress)


def _cut(text: str | None) -> str | None:
    """``text``, cut to _TEXT_ROOM characters."""
    if text is None or len(text) <= _TEXT_ROOM:
        return text
    return f"{text[:_TEXT_ROOM]}… (cut: {len(text):,} characters in all)"


def _result(row: Row) -> TaskResult:
    (batch_id, key, index, status, value, blob, error, error_type, tb, attempts, pid, started_at, finished_at,
     message, progress) = row
    if blob is not None:
        try:
            value = pickle.loads(blob)
        except BaseException as exc:  # e.g. its class cannot be imported here, or a reducer calls sys.exit()
            why = traceback.format_exception_only(exc)[-1].strip()
            fix = "it is not a whole pickle: the file was damaged, or written by something else" \
                if isinstance(exc, pickle.UnpicklingError | EOFError) else "make the module that defines its " \
                "type importable, or read it with export_jsonl, which leaves it pickled"
            raise StoreError(f"the value of task {key!r} of batch {batch_id!r} cannot be unpickled here ({why}); "
                             f"{fix}") from exc
    elif value is not None:
        value = json.loads(value)
    return TaskResult(batch_id, key, Status(status), value, error, tb, attempts, pid, started_at, finished_at,
                      message, progress, error_type, index)


_DECODE = object()


def _line(row: Row, data: Any = _DECODE) -> str:
    return json.dumps(_record(row, data)) + "\n"


def result_line(result: TaskResult) -> str:
    """``result`` as a line of :meth:`SQLiteStore.export_jsonl`, as it would be stored (``run --output``)."""
    row = _row(result)
    return _line(row, result.value if row[4] is not None else None)  # its JSON not decoded again


def _record(row: Row, data: Any = _DECODE) -> dict[str, Any]:
    """The record of a stored ``row``; ``data``: its value, when known (else decoded from the row's JSON)."""
    (batch_id, key, index, status, value, blob, error, error_type, tb, attempts, pid, started_at, finished_at,
     message, progress) = row
    started_at, finished_at, progress = finite(started_at), finite(finished_at), finite(progress)  # JSON has no inf
    return {
        "task_id": key,
        "status": status,
        "message": message,
        "response_data": (None if value is None else json.loads(value)) if data is _DECODE else data,
        "timestamp": _iso(finished_at),
        "process_id": pid,
        "batch_id": batch_id,
        "index": index,
        "error": error,
        "error_type": error_type,
        "traceback": tb,
        "attempts": attempts,
        "started_at": started_at,
        "finished_at": finished_at,
        "duration": None if started_at is None or finished_at is None else finished_at - started_at,
        "progress": progress,
        "response_pickle": None if blob is None else base64.b64encode(blob).decode("ascii"),
    }


def _iso(seconds: float | None) -> str | None:
    """A time in seconds since the epoch in ISO 8601 (UTC); None when there is none, or it is past what a datetime
    can hold (an imported time, say)."""
    if seconds is None:
        return None
    try:
        return datetime.fromtimestamp(seconds, UTC).isoformat()
    except (OverflowError, ValueError, OSError):
        return None


RECORD_FIELDS = tuple(_record((None,) * len(_COLUMNS)))
"""The fields of a record (:meth:`SQLiteStore.records`, a line of :meth:`SQLiteStore.export_jsonl`), in order."""


def _import_row(line: str, path: str | os.PathLike[str], number: int, batch_id: str) -> Row:
    """The row of one line written by :func:`_line`, or in the bare format."""
    try:
        # NaN, Infinity, 1e400: export could not have written them
        record = json.loads(line, parse_constant=no_json_constant, parse_float=finite_json_float)
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        status = Status(record["status"])
        if not status.is_final:
            raise ValueError(f"status {status.value!r} is not final")
        key = _field(record, "task_id", (str, int), "a string or an integer", _REQUIRED)
        pickled = _field(record, "response_pickle", str, "a string of base64")
        data = record.get("response_data")
        finished_at = _field(record, "finished_at", _NUMBER, _SECONDS)
        stamp = _field(record, "timestamp", (str, *_NUMBER), "an ISO 8601 time or a number")
        if isinstance(stamp, str):
            moment = datetime.fromisoformat(stamp)
            stamp = (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()  # naive: UTC, not local
        if finished_at is None:
            finished_at = stamp
        blob = None
        if pickled:
            try:
                blob = base64.b64decode(pickled, validate=True)
                for _ in pickletools.genops(blob):  # reads every opcode, runs none: a whole pickle, or ValueError
                    pass
            except ValueError:  # binascii.Error too
                raise ValueError("field 'response_pickle' must be the base64 of a pickle, as export writes "
                                 "it") from None

        def text(name: str) -> str | None:  # a lone surrogate ("\udce9" in JSON, from a file name) escaped
            found: str | None = _field(record, name, str, "a string")
            return _text(found)

        return (
            text("batch_id") or _text(batch_id), _text(str(key)), _field(record, "index", int, "an integer", -1),
            status.value, None if data is None or pickled else _JSON.encode(data), blob, text("error"),
            text("error_type"), text("traceback"), _field(record, "attempts", int, "an integer", 1),
            _field(record, "process_id", int, "an integer"), _field(record, "started_at", _NUMBER, _SECONDS),
            finished_at, text("message"), _field(record, "progress", _NUMBER, "a number"),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"{os.fspath(path)}, line {number}: {type(exc).__name__}: {exc}; each line must be a JSON "
                         "object with at least task_id and a final status") from exc


_NUMBER = (int, float)
_SECONDS = "a number of seconds since the epoch"
_REQUIRED: Any = object()


def _field(record: dict[str, Any], name: str, kinds: type | tuple[type, ...], what: str, default: Any = None) -> Any:
    """``record[name]`` (``default`` when it is missing, unless that is ``_REQUIRED``) if it is one of ``kinds``,
    or null when ``default`` is None; a ValueError naming the field when it is not."""
    value = record.get(name, default)
    if value is _REQUIRED:
        raise KeyError(name)
    if value is None and default is None:
        return None
    valid = isinstance(value, kinds) and not isinstance(value, bool)
    if valid and isinstance(value, int | float):
        valid = math.isfinite(value) and (isinstance(value, float) or abs(value) < 2**63)  # what SQLite can store
    if valid:
        return value
    shown = json.dumps(value)
    raise ValueError(f"field {name!r} must be {what}{' or null' if default is None else ''}, "
                     f"not {shown if len(shown) <= 40 else shown[:37] + '...'}")
