"""Where the SQLite store's cost goes: variants of its writer, and of SQLite's work per row.

    .venv/bin/python benchmarks/store_where.py [--rounds 10] [--tasks 20000] [VARIANT ...]
    .venv/bin/python benchmarks/store_where.py --per-row

The first form runs the measurement of ``store.py`` (tiny tasks on 2 workers,
per-task timeouts, an ``events()`` consumer) with the store off and then with
each variant of the writer, in alternating rounds in one process, and prints
each variant's throughput as a ratio of the medians to store off. A variant
replaces how the store commits a group of results, for its own rounds only:

- ``real``: the store as it is;
- ``no-key-index``: the store as it is, on a file whose schema has no ``UNIQUE (batch_id, key)``;
- ``no-insert``: each group is a transaction that inserts nothing;
- ``rows-on-loop``: each group's rows are built on the loop's thread, and nothing is inserted;
- ``process``: the store's inserts, made by a writer process of its own (no GIL shared), the rows sent as marshal;
- ``process-idle``: as ``process``, the writer process run under ``SCHED_IDLE`` (only on a core nothing else wants);
- ``one-call``: the store's inserts in one aiosqlite call per group, 1,024 rows per statement;
- ``json``: one statement per group, which reads the group's rows from one JSON parameter (``json_each``).

Every result of these tasks is a plain completed one, which the store writes as a lean row (``_lean_sql``);
the variants write only those, and check that they are.

``--per-row`` times SQLite alone, in one thread with no pool: 40,960 lean
rows in groups of 1,024 into the store's schema, and into variants of it;
the CPU per row is the best of seven runs, in alternating order.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import marshal
import multiprocessing
import os
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from multiprocessing.connection import Connection
from typing import Any

from store import WORKERS, throughput

import asyncsched._sqlite as sqlite_store
from asyncsched import SQLiteStore, Status, TaskResult

GROUP_STATEMENT_ROWS = 1024
"""Rows per statement of ``one-call``."""
_JSON_INSERT = (
    "INSERT OR REPLACE INTO results (id, batch_id, key, position, status, value, attempts, pid, started_at, "
    "finished_at) SELECT v->>0, ?, v->>1, v->>2, 'completed', v->>3, v->>4, v->>5, v->>6, v->>7 "
    "FROM (SELECT value AS v FROM json_each(?))")

Row = tuple[Any, ...]
Group = Callable[[SQLiteStore, list[TaskResult]], Awaitable[None]]
_REAL_COMMIT = SQLiteStore._commit


def lean_rows(results: Sequence[TaskResult], first_id: int) -> list[Row]:
    """The 9 parameters of each result's lean row, as the store binds them."""
    rows = []
    for row_id, r in enumerate(results, first_id):
        if r.status is not Status.COMPLETED or type(r.value) is not int or r.message is not None:
            raise SystemExit(f"not a lean result, which these variants do not write: {r}")
        rows.append((row_id, r.batch_id, r.key, r.index, r.value, r.attempts, r.pid, r.started_at, r.finished_at))
    return rows


def insert_rows(conn: sqlite3.Connection, rows: Sequence[Row], statement_rows: int) -> None:
    """Insert lean ``rows``, ``statement_rows`` to a statement, the rest as many as the store puts in one, then
    one statement."""
    flat = [parameter for row in rows for parameter in row]
    done = 0
    for size in dict.fromkeys((statement_rows, sqlite_store._ROWS_PER_INSERT)):
        whole = (len(rows) - done) // size * size
        width = size * 9
        conn.executemany(sqlite_store._lean_sql(size),
                         (flat[i:i + width] for i in range(done * 9, (done + whole) * 9, width)))
        done += whole
    if done < len(rows):
        conn.execute(sqlite_store._lean_sql(len(rows) - done), flat[done * 9:])


def next_id(conn: sqlite3.Connection) -> int:
    (last,) = conn.execute("SELECT coalesce(max(id), 0) FROM results").fetchone()
    return int(last) + 1


def one_transaction(conn: sqlite3.Connection, write: Callable[[sqlite3.Connection], None]) -> None:
    conn.execute("BEGIN IMMEDIATE")
    write(conn)
    conn.execute("COMMIT")


async def in_connection_thread(store: SQLiteStore, write: Callable[[sqlite3.Connection], None]) -> None:
    """One transaction of ``write`` in one call to the store's aiosqlite thread."""
    db = store._db
    assert db is not None
    await db._execute(one_transaction, db._conn, write)  # type: ignore[no-untyped-call]


async def no_insert(store: SQLiteStore, results: list[TaskResult]) -> None:
    await in_connection_thread(store, lambda conn: None)


async def rows_on_loop(store: SQLiteStore, results: list[TaskResult]) -> None:
    lean_rows(results, 1)
    await in_connection_thread(store, lambda conn: None)


async def one_call(store: SQLiteStore, results: list[TaskResult]) -> None:
    await in_connection_thread(
        store, lambda conn: insert_rows(conn, lean_rows(results, next_id(conn)), GROUP_STATEMENT_ROWS))


async def json_each(store: SQLiteStore, results: list[TaskResult]) -> None:
    def write(conn: sqlite3.Connection) -> None:
        rows = lean_rows(results, next_id(conn))
        conn.execute(_JSON_INSERT, (rows[0][1], json.dumps([row[:1] + row[2:] for row in rows])))
    await in_connection_thread(store, write)


def writer_process(conn: Connection, path: str, idle: bool) -> None:
    """Insert each group of rows that comes, and answer once it is committed; stop at an empty message."""
    if idle:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA synchronous = FULL")
    db.execute("PRAGMA busy_timeout = 5000")
    while data := conn.recv_bytes():
        rows: list[Row] = marshal.loads(data)
        db.execute("BEGIN IMMEDIATE")
        insert_rows(db, [(i, *row) for i, row in enumerate(rows, next_id(db))], sqlite_store._ROWS_PER_INSERT)
        db.execute("COMMIT")
        conn.send_bytes(b"committed")
    db.close()


class WriterProcesses:
    """The ``process`` variants: a writer process per store file (``idle``: under ``SCHED_IDLE``), stopped at the
    end of its round."""

    def __init__(self, idle: bool = False) -> None:
        self.idle = idle
        self.writers: dict[str, tuple[multiprocessing.process.BaseProcess, Connection]] = {}

    async def __call__(self, store: SQLiteStore, results: list[TaskResult]) -> None:
        if store.path not in self.writers:
            ours, theirs = multiprocessing.Pipe()
            process = multiprocessing.get_context("spawn").Process(target=writer_process,
                                                                   args=(theirs, store.path, self.idle))
            process.start()
            self.writers[store.path] = process, ours
        conn = self.writers[store.path][1]
        conn.send_bytes(marshal.dumps([row[1:] for row in lean_rows(results, 0)]))
        loop = asyncio.get_running_loop()
        committed: asyncio.Future[None] = loop.create_future()

        def answered() -> None:
            if not committed.done():
                committed.set_result(None)
        loop.add_reader(conn.fileno(), answered)
        try:
            await committed
        finally:
            loop.remove_reader(conn.fileno())
        conn.recv_bytes()

    def stop(self) -> None:
        for process, conn in self.writers.values():
            conn.send_bytes(b"")
            process.join()
        self.writers.clear()


SCHEMAS: dict[str, tuple[str, str]] = {  # variant: (text of the store's schema, replaced by)
    "without the key index": (",\n            UNIQUE (batch_id, key)", ""),
    "an integer batch id": ("batch_id TEXT NOT NULL", "batch_id INTEGER NOT NULL"),
}


def create_schema(path: str, variant: str) -> sqlite3.Connection:
    """A new results file at ``path`` with the store's schema, changed as ``SCHEMAS[variant]`` says (if it says),
    marked as the store marks its own: the store opens it as one of its own files."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    old, new = SCHEMAS.get(variant, ("", ""))
    statements = [statement for migration in sqlite_store._MIGRATIONS for statement in migration]
    if old and not any(old in statement for statement in statements):  # else it would measure nothing
        raise SystemExit(f"the store's schema no longer has {old!r}: update SCHEMAS")
    for statement in statements:
        db.execute(statement.replace(old, new) if old else statement)
    db.execute(f"PRAGMA application_id = {sqlite_store.APPLICATION_ID}")
    db.execute(f"PRAGMA user_version = {sqlite_store.SCHEMA_VERSION}")
    return db


@contextlib.contextmanager
def writing_groups_with(group: Group | None) -> Iterator[None]:
    """Patch how the store commits each group of queued results with ``group``; its other statements run as ever."""
    if group is None:
        yield
        return

    async def commit(self: SQLiteStore, sql: str | None = None, parameters: tuple[Any, ...] = ()) -> int:
        async with self._lock:
            results, self._pending = self._pending, []
            if results:
                await group(self, results)
        return 0 if sql is None else await _REAL_COMMIT(self, sql, parameters)

    SQLiteStore._commit = commit  # type: ignore[method-assign]
    try:
        yield
    finally:
        SQLiteStore._commit = _REAL_COMMIT  # type: ignore[method-assign]


async def compare(variants: Sequence[str], rounds: int, tasks: int) -> None:
    processes, idle = WriterProcesses(), WriterProcesses(idle=True)
    groups: dict[str, Group | None] = {"real": None, "no-key-index": None, "no-insert": no_insert,
                                       "rows-on-loop": rows_on_loop, "process": processes, "process-idle": idle,
                                       "one-call": one_call, "json": json_each}
    unknown = set(variants) - set(groups)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose among {list(groups)}")
    rates: dict[str, list[float]] = {name: [] for name in ("off", *variants)}
    with tempfile.TemporaryDirectory() as directory:
        for round_ in range(rounds):
            rates["off"].append(await throughput(None, tasks))
            for name in variants:
                path = os.path.join(directory, f"{name}-{round_}.db")
                if name == "no-key-index":
                    create_schema(path, "without the key index").close()
                with writing_groups_with(groups[name]):
                    try:
                        rates[name].append(await throughput(path, tasks,
                                                           stores=name not in ("no-insert", "rows-on-loop")))
                    finally:
                        processes.stop()
                        idle.stop()
            print(f"round {round_ + 1}: " + "   ".join(f"{name} {rate[-1]:6.0f}" for name, rate in rates.items()),
                  flush=True)
    off = statistics.median(rates["off"])
    print(f"{tasks} tiny tasks on {WORKERS} workers, {rounds} rounds; store off median {off:.0f} tasks/s")
    for name in variants:
        print(f"{name:14s} median {statistics.median(rates[name]):6.0f} tasks/s: "
              f"{statistics.median(rates[name]) / off:.3f}x store off")


PER_ROW_ROWS = 40 * 1024
RUNS = 7


def per_row(variant: str, directory: str) -> float:
    """Seconds of this thread's CPU to store PER_ROW_ROWS lean rows, in groups of 1,024, in one variant."""
    db = create_schema(os.path.join(directory, f"{variant}.db"), variant)
    db.execute(f"PRAGMA synchronous = {'NORMAL' if variant == 'synchronous=NORMAL' else 'FULL'}")
    batch: str | int = 7 if variant == "an integer batch id" else "measured"
    now = time.time()
    rows = [(i + 1, batch, str(i), i, 2 * i, 1, 1234, now + i * 1e-5, now + i * 1e-5 + 3e-6)
            for i in range(PER_ROW_ROWS)]
    size = sqlite_store._ROWS_PER_INSERT
    sql = sqlite_store._lean_sql(size)
    if variant == "plain INSERT":
        sql = sql.replace("INSERT OR REPLACE", "INSERT")
    started = time.thread_time()
    for first in range(0, PER_ROW_ROWS, 1024):
        db.execute("BEGIN IMMEDIATE")
        db.executemany(sql, ([p for row in rows[i:i + size] for p in row] for i in range(first, first + 1024, size)))
        db.execute("COMMIT")
    spent = time.thread_time() - started
    (stored,) = db.execute("SELECT count(*) FROM results").fetchone()
    assert stored == PER_ROW_ROWS, (variant, stored)
    db.close()
    return spent


def per_row_table() -> None:
    variants = ["as stored", *SCHEMAS, "synchronous=NORMAL", "plain INSERT"]
    best: dict[str, float] = {}
    for _ in range(RUNS):
        with tempfile.TemporaryDirectory() as directory:
            for variant in variants:
                spent = per_row(variant, directory)
                best[variant] = min(best.get(variant, spent), spent)
    print(f"SQLite's CPU per lean row, {PER_ROW_ROWS} rows in groups of 1,024, best of {RUNS}:")
    for variant in variants:
        print(f"  {variant:24s} {best[variant] / PER_ROW_ROWS * 1e6:5.2f} µs")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", default=["real", "no-key-index", "no-insert", "rows-on-loop", "process",
                                                        "process-idle", "one-call", "json"])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--per-row", action="store_true", help="SQLite's CPU per row alone, in schema variants")
    arguments = parser.parse_args()
    if arguments.per_row:
        per_row_table()
    else:
        asyncio.run(compare(arguments.variants, arguments.rounds, arguments.tasks))
