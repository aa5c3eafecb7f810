"""The SQLite store: persistence, queries, resume after SIGKILL, JSON Lines, and clear errors on bad files."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import errno
import itertools
import json
import math
import os
import re
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import tracemalloc
import types
import warnings
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest

import asyncsched._sqlite
from asyncsched import (
    ClosedError,
    ConfigurationError,
    ExecutorBackend,
    MemoryStore,
    ProcessBackend,
    Scheduler,
    SQLiteStore,
    Stats,
    Status,
    Store,
    StoreError,
    Task,
    TaskResult,
    TaskStarted,
)
from asyncsched._sqlite import SCHEMA_VERSION

from . import faults, orchestrator_script, tasks
from .util import wait_gone

ROOT = Path(__file__).resolve().parent.parent

JSON_VALUES: list[Any] = [1, -0.5, "text", True, [1, "a", None], {"nested": {"list": [1.5, False]}}, 2**70, -2**63,
                          2**63]
PICKLED_VALUES: list[Any] = [(1, 2), {1: "int key"}, {"a": (1,)}, [(1, 2)], {1, 2}, b"bytes", Status.COMPLETED,
                             datetime.date(2024, 1, 2)]


def threads(path: Path) -> Scheduler:
    """A scheduler on the in-process thread backend: fast, for tests that need no process. One thread: tasks
    finish in the order they are given, which is the order results are stored and read back in."""
    return Scheduler(store=path, backend=ExecutorBackend(ThreadPoolExecutor(1)))


async def wait_until(condition: Callable[[], Awaitable[bool]], within: float = 30.0) -> None:
    """Poll ``condition`` (another process's progress has no event to wait on), for at most ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await condition():
        assert loop.time() < deadline, f"condition not met within {within}s"
        await asyncio.sleep(0.02)


def runs_per_key(log: str) -> Counter[str]:
    """How many times each key ran, from the log that tasks.log_run appends to."""
    return Counter(Path(log).read_text().split())


def test_a_path_selects_the_sqlite_store(tmp_path: Path) -> None:
    assert isinstance(Scheduler(store=str(tmp_path / "a.db")).store, SQLiteStore)
    assert isinstance(Scheduler(store=tmp_path / "b.db").store, SQLiteStore)
    assert isinstance(Scheduler(store=None).store, MemoryStore)
    with pytest.raises(ConfigurationError, match="store must be None, a Store or the path"):
        Scheduler(store=42)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="store=None"):
        SQLiteStore(":memory:")
    for path in (123, None, b"x.db"):  # they raised a TypeError, or took a bytes path its str methods then met
        with pytest.raises(ConfigurationError, match=r"^SQLiteStore needs the path of a SQLite file, a str or an "
                           r"os.PathLike such as pathlib.Path \(a bytes path decoded with os.fsdecode\(\)\), got "):
            SQLiteStore(path)  # type: ignore[arg-type]
    for busy_timeout in ("1", -1, True, math.nan, math.inf, 10**400, 3e6):  # inf and 3e6 meant no wait at all
        with pytest.raises(ConfigurationError, match=r"^busy_timeout must be a number of seconds from 0 to 2147483, "
                           f"got {re.escape(repr(busy_timeout))}$"):
            SQLiteStore(tmp_path / "c.db", busy_timeout=busy_timeout)  # type: ignore[arg-type]
    assert SQLiteStore(tmp_path / "d.db", busy_timeout=2147483).busy_timeout == 2147483


async def test_the_later_of_two_results_for_one_key_wins_within_one_commit(tmp_path: Path) -> None:
    def result(batch: str, key: str, value: Any = None, error: str | None = None) -> TaskResult:
        status = Status.COMPLETED if error is None else Status.FAILED
        return TaskResult(batch, key, status, value, error, attempts=1, pid=7, started_at=1.0, finished_at=2.5)

    async with SQLiteStore(tmp_path / "results.db") as store:
        for batch in ("a", "b", "c"):
            await store.begin_batch(batch)
        # plain completed results take a lean INSERT, the others a full one: the order must still hold
        for added in [result("a", "plain-then-failed", 1), result("a", "plain-then-failed", error="E: x"),
                      result("a", "failed-then-plain", error="E: y"), result("a", "failed-then-plain", 2),
                      result("a", "plain-pickled-plain", 3), result("a", "plain-pickled-plain", (3,)),
                      result("a", "plain-pickled-plain", 4)] + [result(b, f"k{i}", i) for i in range(75) for b in "bc"]:
            store.add(added)
        await store.flush()
        in_order = await store.results()
        stored = {(r.batch_id, r.key): r for r in in_order}
    assert [r.key for r in in_order[:3]] == ["plain-then-failed", "failed-then-plain", "plain-pickled-plain"]
    assert len(stored) == 3 + 150
    assert (stored["a", "plain-then-failed"].status, stored["a", "plain-then-failed"].value) == (Status.FAILED, None)
    assert (stored["a", "failed-then-plain"].status, stored["a", "failed-then-plain"].value) == (Status.COMPLETED, 2)
    assert stored["a", "plain-pickled-plain"].value == 4
    for batch in "bc":  # their rows interleaved: two statements of 64, one of 22
        assert [stored[batch, f"k{i}"].value for i in range(75)] == list(range(75))
    assert {(r.attempts, r.pid, r.duration) for r in stored.values()} == {(1, 7, 1.5)}


def test_statements_number_no_parameter() -> None:
    # Python 3.12.0 to 3.12.3 warn about a numbered parameter (?1) bound from a sequence: -W error failed every commit
    for sql in (asyncsched._sqlite._lean_sql(3), asyncsched._sqlite._insert_sql(3)):
        assert re.search(r"[?:@$]\w", sql) is None, sql


async def test_a_full_group_is_committed_before_the_interval_is_up(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(asyncsched._sqlite, "FLUSH_INTERVAL", 3600.0)

    def result(key: int) -> TaskResult:
        return TaskResult("b", str(key), Status.COMPLETED, key, attempts=1)

    async def committed(count: int) -> bool:
        return (await store.stats("b")).completed == count

    async with SQLiteStore(tmp_path / "results.db") as store:
        await store.begin_batch("b")
        store.add(result(0))
        await wait_until(lambda: committed(1))  # the writer's first commit; the next waits up to an hour
        for key in range(1, 1 + asyncsched._sqlite.GROUP_ROWS):
            store.add(result(key))
        await wait_until(lambda: committed(1 + asyncsched._sqlite.GROUP_ROWS))  # a full group does not wait


async def test_results_survive_the_scheduler(tmp_path: Path) -> None:
    db = tmp_path / "results.db"
    values = JSON_VALUES + PICKLED_VALUES
    batch = [Task(tasks.identity, value, key=f"v{i}") for i, value in enumerate(values)]
    batch += [Task(faults.boom, "bad input", key="failed"), Task(tasks.reporting, 5, key="reported")]
    async with Scheduler(workers=2, store=db) as scheduler:
        summary = await scheduler.run(batch, batch_id="first", name="values")

    async with Scheduler(workers=1, store=db) as again:
        stored = sorted(await again.results(batch_id="first"), key=lambda r: r.index)
        assert stored == summary.results
        assert [r.value for r in stored[:len(values)]] == values
        assert [type(r.value) for r in stored[:len(values)]] == [type(v) for v in values]
        failed = stored[len(values)]
        assert failed.status is Status.FAILED and failed.error_type == "ValueError"
        assert "bad input" in (failed.error or "") and "Traceback" in (failed.traceback or "")
        reported = stored[-1]
        assert (reported.message, reported.progress, reported.attempts) == ("step 2", 1.0, 1)
        assert reported.pid and reported.duration is not None and reported.duration >= 0
        stats = await again.stats("first")
        assert (stats.total, stats.completed, stats.failed) == (len(batch), len(batch) - 1, 1)
        [info] = await again.batches()
        assert (info.batch_id, info.name, info.stats) == ("first", "values", stats)
        assert info.finished_at is not None and info.finished_at >= info.created_at

    with contextlib.closing(sqlite3.connect(db)) as raw:
        columns = dict(raw.execute("SELECT key, value_pickle IS NULL FROM results WHERE key LIKE 'v%'").fetchall())
        texts = raw.execute("SELECT value FROM results WHERE key LIKE 'v%' AND typeof(value) = 'text' "
                            "ORDER BY position")
        assert [json.loads(text) for (text,) in texts] == JSON_VALUES  # JSON text, ints too (bound as they are)
    assert [columns[f"v{i}"] for i in range(len(values))] == [1] * len(JSON_VALUES) + [0] * len(PICKLED_VALUES)


async def test_queries_filter_and_page(tmp_path: Path) -> None:
    async with threads(tmp_path / "results.db") as scheduler:
        await scheduler.run([Task(tasks.square, i) for i in range(3)], batch_id="a")
        await scheduler.run([Task(tasks.square, i) if i % 2 else Task(faults.boom) for i in range(10)], batch_id="b")

        everything = await scheduler.results()
        assert len(everything) == 13
        page = await scheduler.results(batch_id="b", limit=3, offset=2)
        assert page == (await scheduler.results(batch_id="b"))[2:5]
        failed = await scheduler.results(status="failed")
        assert {r.batch_id for r in failed} == {"b"} and len(failed) == 5
        assert await scheduler.results(batch_id="a", status=Status.FAILED) == []
        await scheduler.run([], batch_id="empty")
        assert (await scheduler.stats()) == Stats(13, 8, 5)
        b = await scheduler.stats("b")
        assert (b.total, b.completed, b.failed, b.batch_id, b.success_rate) == (10, 5, 5, "b", 0.5)
        assert [(info.batch_id, info.stats) for info in await scheduler.batches()] == [
            ("a", Stats(3, 3, batch_id="a")), ("b", b), ("empty", Stats(batch_id="empty"))]
        assert await scheduler.stats("empty") == Stats(batch_id="empty")
        one = await scheduler.batch("b")
        assert one is not None and one == (await scheduler.batches())[1] and one.stats == b
        assert await scheduler.batch("c") is None


@pytest.mark.parametrize("in_sqlite", [False, True])
async def test_a_page_out_of_range_or_an_unknown_status_is_refused_by_every_store_alike(tmp_path: Path,
                                                                                         in_sqlite: bool) -> None:
    store: Store = SQLiteStore(tmp_path / "results.db") if in_sqlite else MemoryStore()
    async with Scheduler(store=store, backend=ExecutorBackend(ThreadPoolExecutor(1))) as scheduler:
        await scheduler.run([Task(tasks.square, i) for i in range(3)], batch_id="a")
        assert await scheduler.results(limit=0) == []
        assert [r.value for r in await scheduler.results(limit=2**63 - 1, offset=1)] == [1, 4]
        for page in ({"limit": -1}, {"offset": -1}, {"limit": 2**63}, {"offset": 2**63}, {"limit": True},
                     {"limit": 1.5}):
            with pytest.raises(ConfigurationError, match=f"{next(iter(page))} must be .*an integer from 0"):
                await scheduler.results(**page)
        if isinstance(store, SQLiteStore):
            with pytest.raises(ConfigurationError, match="offset must be an integer from 0"):
                await store.records(offset=-2)
        for query in scheduler.results, store.results:  # the store itself as well, not only the scheduler
            with pytest.raises(ConfigurationError, match=r"^unknown status 'done'; use one of \['pending', "):
                await query(status="done")


@pytest.mark.parametrize("in_sqlite", [False, True])
async def test_a_batch_id_or_name_that_is_not_a_str_is_refused_by_every_store_alike(tmp_path: Path,
                                                                                    in_sqlite: bool) -> None:
    store: Store = SQLiteStore(tmp_path / "results.db") if in_sqlite else MemoryStore()
    async with Scheduler(store=store, backend=ExecutorBackend(ThreadPoolExecutor(1))) as scheduler:
        await scheduler.run([Task(tasks.square, 2)], batch_id="a")
        queries: list[Callable[[], Awaitable[object]]] = [
            lambda: scheduler.results(batch_id=123),  # type: ignore[arg-type]
            lambda: scheduler.stats(123),  # type: ignore[arg-type]
            lambda: scheduler.batch(123),  # type: ignore[arg-type]
            lambda: scheduler.batch(None),  # type: ignore[arg-type]  # not "every batch": that is batches()
        ]
        for query in queries:
            with pytest.raises(ConfigurationError, match="batch_id must be a str"):
                await query()
        with pytest.raises(ConfigurationError, match="name must be a str or None, got <object"):
            await scheduler.run([], name=object())  # type: ignore[arg-type]
        assert [info.batch_id for info in await scheduler.batches()] == ["a"]


async def test_an_existing_batch_needs_resume(tmp_path: Path) -> None:
    async with threads(tmp_path / "results.db") as scheduler:
        batch = [Task(tasks.square, i) for i in range(4)]
        first = await scheduler.run(batch, batch_id="nightly")
        with pytest.raises(ConfigurationError, match="already exists"):
            await scheduler.run(batch, batch_id="nightly")
        again = await scheduler.run(batch, batch_id="nightly", resume=True)
        assert again.results == first.results  # nothing ran again: every result is the stored one


async def test_a_resumed_summary_holds_the_tasks_of_the_batch_given_at_their_positions_there(tmp_path: Path) -> None:
    async with threads(tmp_path / "results.db") as scheduler:
        await scheduler.run([Task(tasks.square, i, key=f"k{i}") for i in range(4)], batch_id="b")
        reordered = [Task(tasks.square, 5, key="new"), Task(tasks.square, 3, key="k3"),
                     Task(tasks.square, 1, key="k1")]  # k0 and k2 are stored, not in this batch
        summary = await scheduler.run(reordered, batch_id="b", resume=True)
    assert [(r.key, r.value, r.index) for r in summary.results] == [("new", 25, 0), ("k3", 9, 1), ("k1", 1, 2)]
    assert summary.total == 3


async def test_a_batch_still_running_cannot_be_resumed_beside_itself(tmp_path: Path, gate: Callable[[], str]) -> None:
    release, log = gate(), str(tmp_path / "runs.log")
    batch = [Task(tasks.log_run, log, key, 0.0, release, key=key) for key in "ab"]
    async with Scheduler(workers=2, store=tmp_path / "results.db") as scheduler:
        async with scheduler.events(kinds=[TaskStarted]) as started:
            first = asyncio.ensure_future(scheduler.run(batch, batch_id="job"))
            await anext(started)
        with pytest.raises(ConfigurationError, match="'job' is running on this scheduler"):
            await scheduler.run(batch, batch_id="job", resume=True)
        await asyncio.to_thread(Path(release).touch)
        assert (await first).completed == 2
    assert runs_per_key(log) == {"a": 1, "b": 1}


@pytest.mark.parametrize("shared", [False, True], ids=["a store each", "one store"])
async def test_a_batch_running_in_another_scheduler_is_not_run_or_resumed_there_too(
        tmp_path: Path, gate: Callable[[], str], shared: bool) -> None:
    release, log, path = gate(), str(tmp_path / "runs.log"), tmp_path / "results.db"
    batch = [Task(tasks.log_run, log, key, 0.0, release, key=key) for key in "ab"]
    store = SQLiteStore(path)
    async with (Scheduler(workers=2, store=store) as scheduler,
                Scheduler(workers=1, store=store if shared else path) as other):
        async with scheduler.events(kinds=[TaskStarted]) as started:
            first = asyncio.ensure_future(scheduler.run(batch, batch_id="job"))
            await anext(started)
        for resume in (False, True):  # not "already exists; pass resume=True", which would run its tasks twice
            with pytest.raises(ConfigurationError, match=r"^batch 'job' is running in another scheduler or process "
                                                         r"on .*results\.db: let it end, or stop it, before you run "):
                await other.run(batch, batch_id="job", resume=resume)
        await asyncio.to_thread(Path(release).touch)
        assert (await first).completed == 2
        assert (await other.run(batch, batch_id="job", resume=True)).completed == 2  # stored: not run again
    assert runs_per_key(log) == {"a": 1, "b": 1}


@pytest.mark.skipif(not hasattr(os, "fork") or not os.path.isdir("/proc/self/fd"), reason="Linux: fork, /proc")
async def test_a_child_forked_while_a_batch_runs_does_not_hold_its_lock(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "results.db") as store:
        await store.begin_batch("b")
        readable, writable = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # 3.12: fork() with the connection's threads
            pid = os.fork()
        if pid == 0:  # the child: how many of its descriptors name the lock file (a killed parent's lock lives on)
            try:
                os.write(writable, str(sum(os.path.realpath(f"/proc/self/fd/{fd}").endswith("-batches")  # noqa: ASYNC240
                                           for fd in os.listdir("/proc/self/fd"))).encode())
            finally:
                os._exit(0)
        os.close(writable)
        with os.fdopen(readable) as answer:
            assert answer.read() == "0"
        await asyncio.to_thread(os.waitpid, pid, 0)
        assert store.is_running("b")  # the parent still holds it
        await store.end_batch("b")


async def test_every_name_of_the_file_finds_the_same_batch_locks(tmp_path: Path) -> None:
    path, link = tmp_path / "results.db", tmp_path / "link.db"
    async with SQLiteStore(path) as store:
        await store.begin_batch("b")
        link.symlink_to(path)
        async with SQLiteStore(link) as other:
            with pytest.raises(ConfigurationError, match="'b' is running in another scheduler"):
                await other.begin_batch("b", resume=True)
            assert other.is_running("b")
            with pytest.raises(StoreError, match=r"it is the result store .* -batches file\), which the export"):
                await other.export_jsonl(tmp_path / "results.db-batches")  # would put a new file in its place
        await store.end_batch("b")
    assert sorted(os.listdir(tmp_path)) == ["link.db", "results.db", "results.db-batches"]


async def test_the_batch_locks_take_the_results_file_s_permissions_and_a_store_that_cannot_write_takes_none(
        tmp_path: Path) -> None:
    path = tmp_path / "results.db"
    async with SQLiteStore(path):
        pass
    path.chmod(0o664)  # a file a group shares
    umask = os.umask(0o022)
    try:
        async with SQLiteStore(path) as store:
            await store.begin_batch("b")
            await store.end_batch("b")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "results.db-batches").stat().st_mode) == 0o664
    (tmp_path / "results.db-batches").unlink()
    closed = SQLiteStore(path)
    await closed.aclose()
    async with SQLiteStore(path, readonly=True) as readonly:
        for store in (closed, readonly):
            with pytest.raises((ClosedError, StoreError)):
                await store.begin_batch("c")
    assert not (tmp_path / "results.db-batches").exists()  # nor a descriptor left open on it


async def test_resume_runs_cancelled_tasks_again(tmp_path: Path, gate: Callable[[], str]) -> None:
    db, log, release = tmp_path / "results.db", str(tmp_path / "runs.log"), gate()
    batch = [Task(tasks.log_run, log, "a", key="a")]
    batch += [Task(tasks.log_run, log, key, 0.0, release, key=key) for key in ("b", "c")]
    async with Scheduler(workers=2, store=db) as scheduler:
        stream = scheduler.stream(batch, batch_id="job")
        async with contextlib.aclosing(stream):
            async for result in stream:
                assert result.key == "a"
                break
        assert (await scheduler.stats("job")).cancelled == 2
        await asyncio.to_thread(Path(release).touch)
        summary = await scheduler.run(batch, batch_id="job", resume=True)
    assert [(r.key, r.status) for r in summary.results] == [(k, Status.COMPLETED) for k in "abc"]
    assert runs_per_key(log)["a"] == 1


LEFT_OPEN = """
import asyncio, sys
from asyncsched import Scheduler, Status, Task, TaskResult, TaskStarted
from tests import faults, tasks

async def main() -> None:
    scheduler = Scheduler(workers=1, store=sys.argv[1])  # never closed
    await scheduler.run([Task(tasks.square, 3)], batch_id="done")
    scheduler.store.add(TaskResult("done", "queued", Status.COMPLETED, 16, attempts=1))
    started = scheduler.events(kinds=[TaskStarted])
    asyncio.ensure_future(scheduler.run([Task(faults.hang)], batch_id="left"))  # runs on when main returns
    async for _ in started:
        break

asyncio.run(main())
"""


async def test_a_scheduler_left_open_when_asyncio_run_ends_stores_everything_and_lets_the_process_exit(
        tmp_path: Path) -> None:
    db = str(tmp_path / "results.db")
    # the store's connection threads kept it alive for ever; its writer closed the file under the batch's end
    assert await _run_script(LEFT_OPEN, db, 60) == (0, "")
    async with SQLiteStore(db, readonly=True) as reader:
        stored = {(r.batch_id, r.key): (r.status, r.value) for r in await reader.results()}
        assert stored == {("done", "0"): (Status.COMPLETED, 9), ("done", "queued"): (Status.COMPLETED, 16),
                          ("left", "0"): (Status.CANCELLED, None)}
        assert all(info.finished_at is not None for info in await reader.batches())


async def _run_script(script: str, db: str, seconds: float) -> tuple[int | None, str]:
    """Run ``script`` with ``db`` as its argument, in a Python of its own; its exit status and its stderr."""
    orchestrator = await asyncio.create_subprocess_exec(sys.executable, "-c", script, db, cwd=ROOT,
                                                        stderr=subprocess.PIPE)
    try:
        _, stderr = await asyncio.wait_for(orchestrator.communicate(), seconds)
    finally:
        with contextlib.suppress(ProcessLookupError):
            orchestrator.kill()
        await orchestrator.wait()
    return orchestrator.returncode, stderr.decode()


LEFT_EARLY = """
import asyncio, sys
from asyncsched import Scheduler, Task
from tests import tasks

async def main() -> None:
    scheduler = Scheduler(workers=1, store=sys.argv[1])  # never closed
    async for _ in scheduler.stream([Task(tasks.identity, i) for i in range(50)], batch_id="left"):
        break  # left without aclosing(): the end of asyncio.run() closes the stream

asyncio.run(main())
"""


async def test_a_stream_left_early_on_a_scheduler_left_open_lets_asyncio_run_end(tmp_path: Path) -> None:
    db = str(tmp_path / "results.db")
    # the end of asyncio.run() waited for ever for the store's lock (Python 3.11)
    assert await _run_script(LEFT_EARLY, db, 30) == (0, "")
    async with SQLiteStore(db, readonly=True) as reader:
        info = await reader.batch("left")
    assert info is not None and info.finished_at is not None
    assert info.stats.completed + info.stats.cancelled == info.stats.total > 0


async def test_a_writer_cancelled_from_outside_leaves_the_store_open_for_what_the_runs_end_with(
        tmp_path: Path) -> None:
    async with Scheduler(workers=1, store=tmp_path / "results.db") as scheduler:
        assert isinstance(scheduler.store, SQLiteStore) and scheduler.store._writer is not None
        started = scheduler.events(kinds=[TaskStarted])
        running = asyncio.ensure_future(scheduler.run([Task(faults.hang)], batch_id="left"))
        async for _ in started:
            break
        writer = scheduler.store._writer  # cancelled first, then the run, as asyncio.run() may do when main returns
        writer.cancel()
        running.cancel()
        await asyncio.gather(writer, running, return_exceptions=True)
        assert [(r.key, r.status) for r in await scheduler.results(batch_id="left")] == [("0", Status.CANCELLED)]
        info = await scheduler.batch("left")
        assert info is not None and info.finished_at is not None


async def test_a_write_cancelled_while_it_begins_leaves_no_transaction_open(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    async with SQLiteStore(tmp_path / "results.db") as store:
        assert store._db is not None
        execute, begun = store._db.execute, asyncio.Event()

        def spy(sql: str, *args: Any) -> Any:
            if sql == "BEGIN IMMEDIATE":
                begun.set()
            return execute(sql, *args)

        monkeypatch.setattr(store._db, "execute", spy)
        beginning = asyncio.ensure_future(store.begin_batch("cancelled"))
        await begun.wait()
        beginning.cancel()  # the BEGIN runs all the same, in the connection's thread
        with pytest.raises(asyncio.CancelledError):
            await beginning
        assert await store.begin_batch("next") == {}  # not "cannot start a transaction within a transaction"
        with contextlib.closing(sqlite3.connect(tmp_path / "results.db", timeout=0)) as other:
            other.execute("BEGIN IMMEDIATE")  # the file is not left locked either
            other.rollback()


async def test_resume_after_the_orchestrator_is_killed(tmp_path: Path) -> None:
    db, log, release = str(tmp_path / "results.db"), str(tmp_path / "runs.log"), str(tmp_path / "gate")
    orchestrator = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.orchestrator_script", db, log, release, cwd=ROOT, stdout=subprocess.PIPE)
    helpers: list[psutil.Process] = []
    try:
        assert orchestrator.stdout is not None
        assert await asyncio.wait_for(orchestrator.stdout.readline(), 30) == b"started\n"
        async with SQLiteStore(db) as reader:  # another process reads while the orchestrator writes

            async def some_are_durable() -> bool:
                return (await reader.stats(orchestrator_script.BATCH_ID)).total >= 5

            await wait_until(some_are_durable)
            helpers = psutil.Process(orchestrator.pid).children(recursive=True)
            orchestrator.kill()  # SIGKILL: its workers and helpers must end by themselves
            alive = [p for p in helpers if not await asyncio.to_thread(wait_gone, p.pid, 10)]
            assert not alive, f"processes of the killed orchestrator are still alive: {alive}"
            durable = {r.key for r in await reader.results(batch_id=orchestrator_script.BATCH_ID)}
    finally:
        for process in helpers:  # after a failure above: leave nothing behind
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        with contextlib.suppress(ProcessLookupError):
            orchestrator.kill()
        await asyncio.wait_for(orchestrator.communicate(), 10)  # reaps it (its helpers held its stdout)
    assert 5 <= len(durable) <= orchestrator_script.FREE  # killed in the middle: the gated tasks never finished

    await asyncio.to_thread(Path(release).touch)
    async with Scheduler(workers=2, store=db) as scheduler:
        summary = await scheduler.run(orchestrator_script.batch(log, release), batch_id=orchestrator_script.BATCH_ID,
                                      resume=True)
        assert (await scheduler.stats(orchestrator_script.BATCH_ID)).completed == orchestrator_script.TOTAL
    keys = [f"k{i}" for i in range(orchestrator_script.TOTAL)]
    assert [r.key for r in summary.results] == keys
    assert summary.completed == orchestrator_script.TOTAL
    runs = runs_per_key(log)
    assert set(runs) == set(keys)  # every key ran
    assert {key: runs[key] for key in durable} == dict.fromkeys(durable, 1)  # and no durable one ran again


async def test_export_and_import_round_trip(tmp_path: Path) -> None:
    exported = tmp_path / "results.jsonl"
    async with threads(tmp_path / "a.db") as scheduler:
        batch = [Task(tasks.identity, value) for value in JSON_VALUES + PICKLED_VALUES] + [Task(faults.boom)]
        batch += [Task(tasks.square, i) for i in range(200)]  # more than one INSERT statement's worth of rows
        await scheduler.run(batch, batch_id="x")
        await scheduler.run([Task(tasks.square, 3)], batch_id="y")
        assert isinstance(scheduler.store, SQLiteStore)
        assert await scheduler.store.export_jsonl(exported, batch_id="x") == len(batch)
        original = await scheduler.results(batch_id="x")

    lines = [json.loads(line) for line in exported.read_text().splitlines()]
    first = lines[0]
    assert {"task_id", "status", "message", "response_data", "timestamp", "process_id"} <= set(first)
    assert (first["task_id"], first["status"], first["response_data"]) == ("0", "completed", JSON_VALUES[0])
    assert datetime.datetime.fromisoformat(first["timestamp"]).timestamp() == pytest.approx(first["finished_at"])
    assert {"batch_id", "index", "error", "traceback", "attempts", "duration", "response_pickle"} <= set(first)

    async with SQLiteStore(tmp_path / "b.db") as store:
        assert await store.import_jsonl(exported) == len(batch)
        assert await store.import_jsonl(exported) == len(batch)  # the same results again replace themselves
        assert await store.results() == original
        assert (await store.stats("x")).total == len(batch)
        assert [info.batch_id for info in await store.batches()] == ["x"]


async def test_an_export_over_a_file_keeps_its_mode_its_links_and_takes_long_names(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    line, modes = asyncsched._sqlite._line, list[int]()

    def watched(row: Any) -> str:  # while the export writes: the mode of the file it writes into
        modes.extend(p.stat().st_mode & 0o777 for p in tmp_path.glob(".asyncsched-*.partial"))
        return line(row)

    monkeypatch.setattr(asyncsched._sqlite, "_line", watched)
    private, linked = tmp_path / "private.jsonl", tmp_path / "linked.jsonl"
    shared = tmp_path / "shared.jsonl"  # more than the umask lets a new file have
    long = tmp_path / ("r" * 240 + ".jsonl")  # near the longest name a file may have: no room for a suffix
    for out in (private, linked, shared):
        out.write_text("the last export\n")
    private.chmod(0o600)
    shared.chmod(0o666)
    os.link(linked, tmp_path / "other-name.jsonl")
    async with SQLiteStore(tmp_path / "results.db") as store:
        await store.begin_batch("b")
        store.add(_completed("k", 1))
        await store.flush()
        for out in (private, linked, long, shared):
            assert await store.export_jsonl(out) == 1
    assert private.stat().st_mode & 0o777 == 0o600 and modes[0] == 0o600  # private from the first line on
    assert shared.stat().st_mode & 0o777 == 0o666
    assert (tmp_path / "other-name.jsonl").read_text() == linked.read_text() != "the last export\n"
    assert json.loads(long.read_text())["task_id"] == "k"


async def test_a_failed_export_leaves_the_file_it_would_replace_as_it_was(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text("the last export\n")

    def disk_full(row: Any) -> str:
        raise OSError(errno.ENOSPC, "No space left on device")

    async with SQLiteStore(tmp_path / "results.db") as store:
        await store.begin_batch("b")
        store.add(_completed("k", 1))
        await store.flush()
        with monkeypatch.context() as patched:
            patched.setattr(asyncsched._sqlite, "_line", disk_full)
            with pytest.raises(StoreError, match=f"cannot write {out}: .*No space left"):
                await store.export_jsonl(out)
        assert out.read_text() == "the last export\n"
        assert sorted(os.listdir(tmp_path)) == ["out.jsonl", "results.db", "results.db-batches", "results.db-shm",
                                                "results.db-wal"]
        assert await store.export_jsonl(out) == 1
    assert json.loads(out.read_text())["task_id"] == "k"
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl", "results.db", "results.db-batches"]


async def test_import_reads_the_bare_format_and_rejects_bad_lines(tmp_path: Path) -> None:
    bare = {"task_id": "t1", "status": "completed", "message": "ok", "response_data": {"rows": 3},
            "timestamp": "2024-01-02T03:04:05+00:00", "process_id": 123}
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text(json.dumps(bare) + "\n\n")
    bad.write_text(json.dumps(bare) + "\n" + json.dumps({"task_id": "t2", "status": "running"}) + "\n")
    async with SQLiteStore(tmp_path / "results.db") as store:
        with pytest.raises(StoreError, match=r"bad.jsonl, line 2: .*not final"):
            await store.import_jsonl(bad)
        assert await store.results() == []  # a bad line imports nothing
        with pytest.raises(StoreError, match=r"cannot read .*missing\.jsonl: No such file or directory$"):
            await store.import_jsonl(tmp_path / "missing.jsonl")
        missing = tmp_path / "no" / "out.jsonl"
        with pytest.raises(StoreError) as raised:
            await store.export_jsonl(missing)
        assert str(raised.value) == (f"cannot write {missing}: directory {missing.parent} does not exist: create it, "
                                     "or choose another path")  # not the name of the export's temporary file
        assert await store.import_jsonl(good, batch_id="legacy") == 1
        [result] = await store.results(batch_id="legacy")
    assert (result.key, result.status, result.value, result.pid, result.message) == ("t1", "completed", {"rows": 3},
                                                                                    123, "ok")
    assert result.finished_at == datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.UTC).timestamp()


@pytest.mark.parametrize(("field", "value", "message"), [
    ("task_id", None, "must be a string or an integer, not null"),
    ("started_at", "2024-05-01T09:59:00Z", "must be a number of seconds since the epoch or null, not \"2024"),
    ("finished_at", "2024-05-01T10:00:00Z", "must be a number of seconds since the epoch or null"),
    ("progress", "half", "must be a number or null"),
    ("process_id", "123", "must be an integer or null"),
    ("attempts", 1.5, "must be an integer, not 1.5"),
    ("index", "3", "must be an integer, not"),
    ("message", {"text": "ok"}, "must be a string or null"),
    ("response_pickle", "AAAA", "must be the base64 of a pickle, as export writes it"),
    ("response_pickle", "not base64!", "must be the base64 of a pickle"),
    ("response_pickle", "gAX/SwEu", "must be the base64 of a pickle"),  # an opcode there is none of
    ("response_pickle", "gAVLAQ==", "must be the base64 of a pickle"),  # no STOP
])
async def test_import_rejects_a_field_of_the_wrong_type(tmp_path: Path, field: str, value: Any, message: str) -> None:
    line = {"task_id": "t", "status": "completed", "response_data": 1}
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps(line) + "\n" + json.dumps({**line, field: value}) + "\n")
    async with SQLiteStore(tmp_path / "results.db") as store:
        with pytest.raises(StoreError, match=rf"odd.jsonl, line 2: ValueError: field '{field}' {message}"):
            await store.import_jsonl(path)
        assert await store.results() == []


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
async def test_import_refuses_nan_and_infinity_which_export_could_not_write_back(tmp_path: Path,
                                                                                 constant: str) -> None:
    path = tmp_path / "odd.jsonl"
    path.write_text('{"task_id": "a", "status": "completed", "response_data": 1}\n'
                    f'{{"task_id": "b", "status": "completed", "response_data": {{"x": {constant}}}}}\n')
    async with SQLiteStore(tmp_path / "results.db") as store:
        with pytest.raises(StoreError, match=rf"odd.jsonl, line 2: ValueError: {constant} is not JSON; each line"):
            await store.import_jsonl(path)
        assert await store.results() == []


async def test_import_takes_text_with_a_lone_surrogate_as_a_result_would_be_stored(tmp_path: Path) -> None:
    path = tmp_path / "names.jsonl"  # what json.dumps writes for a str made from an undecodable file name
    path.write_text(json.dumps({"task_id": "caf\udce9", "status": "failed", "batch_id": "dir-\udce9",
                                "error": "OSError: caf\udce9"}) + "\n")
    async with SQLiteStore(tmp_path / "results.db") as store:
        assert await store.import_jsonl(path) == 1
        [result] = await store.results(batch_id="dir-\udce9")  # found by either form, as a task's own result
        assert (result.batch_id, result.key, result.error) == ("dir-\\udce9", "caf\\udce9", "OSError: caf\\udce9")
        assert "caf\udce9" in await store.begin_batch("dir-\udce9", resume=True)  # resuming it skips the task


async def test_a_time_past_what_a_datetime_holds_is_exported_with_no_timestamp(tmp_path: Path) -> None:
    path = tmp_path / "far.jsonl"
    path.write_text(json.dumps({"task_id": "t", "status": "completed", "finished_at": 1e20}) + "\n")
    async with SQLiteStore(tmp_path / "results.db") as store:
        assert await store.import_jsonl(path) == 1
        [record] = await store.records()
        assert await store.export_jsonl(tmp_path / "out.jsonl") == 1
    assert (record["finished_at"], record["timestamp"]) == (1e20, None)
    assert json.loads((tmp_path / "out.jsonl").read_text()) == record


async def test_import_reads_a_timestamp_without_a_time_zone_as_utc(tmp_path: Path) -> None:
    path = tmp_path / "naive.jsonl"
    path.write_text(json.dumps({"task_id": "t", "status": "completed", "timestamp": "2024-05-01T10:00:00"}) + "\n")
    try:
        with pytest.MonkeyPatch.context() as patched:
            patched.setenv("TZ", "EST5")  # local time is 5 hours behind UTC
            time.tzset()
            async with SQLiteStore(tmp_path / "results.db") as store:
                await store.import_jsonl(path)
                [result] = await store.results()
    finally:
        time.tzset()
    assert result.finished_at == datetime.datetime(2024, 5, 1, 10, tzinfo=datetime.UTC).timestamp()


async def test_a_failed_commit_loses_nothing(tmp_path: Path) -> None:
    db = tmp_path / "results.db"
    async with SQLiteStore(db, busy_timeout=0.05) as store:
        await store.begin_batch("b")
        with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")  # another writer holds the lock
            store.add(TaskResult("b", "k", Status.COMPLETED, value=(1, 2)))
            with pytest.raises(StoreError, match="busy_timeout"):
                await store.flush()
            other.execute("ROLLBACK")
        await store.flush()
        [result] = await store.results()
    assert (result.key, result.value) == ("k", (1, 2))


async def test_the_writer_tries_a_failed_commit_again_after_the_interval(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(asyncsched._sqlite, "FLUSH_INTERVAL", 0.2)
    db = tmp_path / "results.db"
    async with SQLiteStore(db, busy_timeout=0) as store:
        await store.begin_batch("b")
        attempts: list[float] = []
        commit = store._commit

        async def counted(*args: Any) -> int:
            attempts.append(asyncio.get_running_loop().time())
            return await commit(*args)

        async def tried_three_times() -> bool:
            return len(attempts) >= 3

        monkeypatch.setattr(store, "_commit", counted)
        with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")  # every commit fails at once
            for key in range(asyncsched._sqlite.GROUP_ROWS):  # a full group, which is otherwise committed at once
                store.add(TaskResult("b", str(key), Status.COMPLETED, key))
            await wait_until(tried_three_times)
            other.execute("ROLLBACK")
        assert min(b - a for a, b in itertools.pairwise(attempts)) >= 0.15  # not in a tight loop
        await store.flush()
        assert (await store.stats("b")).completed == asyncsched._sqlite.GROUP_ROWS


async def test_a_value_of_a_type_this_process_cannot_import_is_a_clear_error(tmp_path: Path) -> None:
    module = types.ModuleType("results_of_another_process")
    module.Point = type("Point", (), {"__module__": module.__name__})  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    try:
        async with SQLiteStore(tmp_path / "results.db") as store:
            await store.begin_batch("b")
            store.add(TaskResult("b", "k", Status.COMPLETED, value=module.Point()))
            await store.flush()
            del sys.modules[module.__name__]
            with pytest.raises(StoreError, match=r"task 'k' of batch 'b' cannot be unpickled here .*; make the module "
                               r"that defines its type importable"):
                await store.results()
            assert await store.export_jsonl(tmp_path / "out.jsonl") == 1  # exporting does not unpickle
    finally:
        sys.modules.pop(module.__name__, None)


async def test_a_stored_value_that_no_longer_unpickles_stops_a_resumed_run_but_not_a_resumed_stream(
        tmp_path: Path) -> None:
    module = types.ModuleType("renamed_since")
    module.Point = type("Point", (), {"__module__": module.__name__})  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    try:
        async with Scheduler(workers=1, store=tmp_path / "results.db") as scheduler:
            store = scheduler.store
            await store.begin_batch("b")
            store.add(TaskResult("b", "old", Status.COMPLETED, value=module.Point()))
            await store.end_batch("b")
            del sys.modules[module.__name__]
            batch = [Task(tasks.square, 2, key="old"), Task(tasks.square, 3, key="new")]
            with pytest.raises(StoreError, match=r"task 'old' of batch 'b' cannot be unpickled here"):
                await scheduler.run(batch, batch_id="b", resume=True)  # its summary would hold it
            assert (await scheduler.stats("b")).total == 1  # refused before any task ran
            streamed = [(r.key, r.value) async for r in scheduler.stream(batch, batch_id="b", resume=True)]
            assert streamed == [("new", 9)]
    finally:
        sys.modules.pop(module.__name__, None)


async def test_a_damaged_stored_value_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "results.db"
    async with SQLiteStore(path) as store:
        await store.begin_batch("b")
        store.add(TaskResult("b", "k", Status.COMPLETED, value=object()))
    with sqlite3.connect(path) as db:
        db.execute("UPDATE results SET value_pickle = x'80050000'")
    async with SQLiteStore(path, readonly=True) as store:
        with pytest.raises(StoreError, match=r"cannot be unpickled here .*; it is not a whole pickle: the file was "
                           r"damaged, or written by something else"):
            await store.results()



@pytest.mark.parametrize(("kind", "raised"), [("exit", "SystemExit: a reducer called sys.exit()"),
                                              ("interrupt", "KeyboardInterrupt")])
async def test_a_stored_value_whose_unpickling_raises_a_base_exception_is_a_store_error(
        tmp_path: Path, kind: str, raised: str) -> None:
    async with SQLiteStore(tmp_path / "results.db") as store:
        await store.begin_batch("b")
        store.add(TaskResult("b", "k", Status.COMPLETED, value=faults.RaisesOnLoad(kind)))
        await store.flush()
        with pytest.raises(StoreError, match=re.escape(f"task 'k' of batch 'b' cannot be unpickled here ({raised})")):
            await store.results()
        assert (await store.stats("b")).completed == 1  # the store is still usable

# -- bad input gets a clear error before any work starts ---------------------------------------


@pytest.mark.parametrize(("where", "message"), [
    ("missing/results.db", "directory .*missing does not exist"),
    ("file/results.db", "file does not exist"),
    (".", "it is a directory: pass the path of a file"),
])
async def test_a_bad_path_is_refused_when_the_store_opens(tmp_path: Path, where: str, message: str) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(StoreError, match=message):
        await SQLiteStore(tmp_path / where).open()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc, a directory no one may create files in")
async def test_an_unwritable_directory_is_refused() -> None:
    with pytest.raises(StoreError, match="check that directory /proc is writable"):
        await SQLiteStore("/proc/asyncsched-results.db").open()


async def test_a_bad_store_stops_the_scheduler_before_any_worker_starts(tmp_path: Path) -> None:
    scheduler = Scheduler(workers=2, store=tmp_path / "missing" / "results.db")
    with pytest.raises(StoreError, match="does not exist"):
        async with scheduler:
            pytest.fail("the scheduler started")
    assert isinstance(scheduler.backend, ProcessBackend) and scheduler.backend.pool.pids == []


@pytest.mark.parametrize("readonly", [False, True])
async def test_a_file_that_is_not_sqlite_is_refused(tmp_path: Path, readonly: bool) -> None:
    path = tmp_path / "notes.db"
    path.write_text("these are my notes, not a database\n" * 100)
    with pytest.raises(StoreError, match="not a SQLite database: pass the path of an asyncsched results file") as e:
        await SQLiteStore(path, readonly=readonly).open()
    assert ("or of a new file" in str(e.value)) is not readonly  # a read-only store never creates one
    assert path.read_text().startswith("these are my notes")


@pytest.mark.parametrize("user_version", [0, 1, SCHEMA_VERSION + 1])  # other applications number their schemas
@pytest.mark.parametrize("readonly", [False, True])
async def test_a_database_of_another_application_is_refused_and_left_as_it_was(
        tmp_path: Path, user_version: int, readonly: bool) -> None:
    path = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(path)) as other:
        other.execute("CREATE TABLE customers (name TEXT)")
        other.execute(f"PRAGMA user_version = {user_version}")
    with pytest.raises(StoreError, match="another application") as e:
        await SQLiteStore(path, readonly=readonly).open()
    assert ("or of a new file" in str(e.value)) is not readonly  # a read-only store never creates one
    with contextlib.closing(sqlite3.connect(path)) as other:
        assert other.execute("PRAGMA application_id").fetchone() == (0,)
        assert other.execute("PRAGMA journal_mode").fetchone() == ("delete",)


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "results.db"
    async with SQLiteStore(path):
        pass
    with contextlib.closing(sqlite3.connect(path)) as raw:
        assert raw.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}, newer .* upgrade asyncsched"):
        await SQLiteStore(path).open()


async def test_a_file_of_schema_1_is_read_as_it_is_and_upgraded_when_opened_for_writing(tmp_path: Path) -> None:
    path = tmp_path / "results.db"
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as raw:
        for statement in asyncsched._sqlite._MIGRATIONS[0]:
            raw.execute(statement)
        raw.execute("INSERT INTO batches (batch_id, created_at) VALUES ('old', 0)")
        raw.executemany("INSERT INTO results (batch_id, key, position, status, attempts) VALUES ('old', ?, ?, ?, 1)",
                        [(str(i), i, "failed" if i % 3 == 0 else "completed") for i in range(9)])
        raw.execute(f"PRAGMA application_id = {asyncsched._sqlite.APPLICATION_ID}")
        raw.execute("PRAGMA user_version = 1")
    expected = Stats(9, 6, 3, batch_id="old")
    for readonly in (True, False):
        async with SQLiteStore(path, readonly=readonly) as store:
            assert await store.stats("old") == expected
            assert [info.stats for info in await store.batches()] == [expected]
            assert [r.key for r in await store.results(status=Status.FAILED)] == ["0", "3", "6"]
        with contextlib.closing(sqlite3.connect(path)) as raw:
            indexes = {name for (name,) in raw.execute("SELECT name FROM sqlite_schema WHERE type = 'index'")}
            assert raw.execute("PRAGMA user_version").fetchone() == ((1,) if readonly else (SCHEMA_VERSION,))
            assert ("results_by_status" in indexes) is readonly and ("results_not_completed" in indexes) is not readonly


async def test_queries_by_status_and_counts_read_the_index_of_results_not_completed(tmp_path: Path) -> None:
    path = tmp_path / "results.db"
    async with SQLiteStore(path):  # a new file, of the current schema
        pass
    with contextlib.closing(sqlite3.connect(path)) as raw:
        def plan(sql: str, parameters: tuple[Any, ...]) -> str:
            return " | ".join(row[-1] for row in raw.execute(f"EXPLAIN QUERY PLAN {sql}", parameters))

        for batch_id in ("b", None):
            where, parameters = asyncsched._sqlite._where(batch_id, "timed_out")
            assert "INDEX results_not_completed" in plan(asyncsched._sqlite._SELECT + where, parameters)
            where, parameters = asyncsched._sqlite._where(batch_id, None)
            counts = plan(asyncsched._sqlite._counts_sql(where), parameters * 2)
            assert "COVERING INDEX results_not_completed" in counts and "SCAN results |" not in f"{counts} |"


def test_a_read_only_file_is_told_apart_from_a_directory_that_is_not_writable(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "results.db"
    path.touch()
    exc = sqlite3.OperationalError("attempt to write a readonly database")
    exc.sqlite_errorcode = sqlite3.SQLITE_READONLY
    assert "check that directory" in asyncsched._sqlite._advice(str(path), exc, 5.0, False)
    access = os.access  # root may write any file: the file's own answer is faked
    monkeypatch.setattr(os, "access", lambda p, mode: mode != os.W_OK and access(p, mode) if p == str(path) else
                        access(p, mode))
    assert asyncsched._sqlite._advice(str(path), exc, 5.0, False) == ("the file is read-only: make it writable, or "
                                                                       "open it with readonly=True to query it")
    shm = f"{path}-shm"
    Path(shm).touch()
    monkeypatch.setattr(os, "access", lambda p, mode: mode != os.W_OK and access(p, mode) if p == shm else
                        access(p, mode))  # the file made writable again, its -shm left as it was
    assert asyncsched._sqlite._advice(str(path), exc, 5.0, False) == (
        f"{shm} is read-only, as the file was when SQLite made it: make it writable")
    # opened for reading only already: what it needs is its directory, for the -shm file
    assert "(its -shm file); else copy the file" in asyncsched._sqlite._advice(str(path), exc, 5.0, True)
    exc.sqlite_errorcode = sqlite3.SQLITE_CANTOPEN
    assert asyncsched._sqlite._advice(str(tmp_path), exc, 5.0, False) == "it is a directory: pass the path of a file"


async def test_a_locked_database_fails_after_the_busy_timeout(tmp_path: Path) -> None:
    path = tmp_path / "results.db"
    async with SQLiteStore(path):
        pass
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreError, match=r"locked.*busy_timeout=0\.05s"):
            await SQLiteStore(path, busy_timeout=0.05).open()


def _completed(key: str, value: Any = None, message: str | None = None) -> TaskResult:
    return TaskResult("b", key, Status.COMPLETED, value, None, None, 1, 1, 1.0, 2.0, message, None, None, 0)


@pytest.mark.parametrize(("odd", "key", "kept"), [
    (_completed("big", 10**5000), "big", 10**5000),  # str() of an int this long raises ValueError: pickled
    (_completed("k\udc80", 1), "k\\udc80", 1),  # a lone surrogate (a file name's undecodable byte): escaped
    (_completed("m", 1, message="\udc80"), "m", "\\udc80"),  # ... in a report()'s message
], ids=["huge-int", "surrogate-key", "surrogate-message"])
async def test_a_result_sqlite_cannot_take_as_it_is_still_stored_with_the_others(
        tmp_path: Path, odd: TaskResult, key: str, kept: Any) -> None:
    async with SQLiteStore(tmp_path / "r.db") as store:
        await store.begin_batch("b")
        for result in (_completed("good-1", 1), odd, _completed("good-2", 2)):
            store.add(result)
        await store.flush()
        stored = {r.key: r for r in await store.results()}
    assert sorted(stored) == sorted(["good-1", key, "good-2"])
    assert kept in (stored[key].value, stored[key].message)


async def test_what_is_over_sqlites_length_limit_fails_its_own_result_and_holds_back_no_other(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(asyncsched._sqlite, "_VALUE_ROOM", 2**20)  # as SQLite's 1 GB, less room for the rest
    monkeypatch.setattr(asyncsched._sqlite, "_TEXT_ROOM", 2**16)
    encode, encoded = asyncsched._sqlite._encode, Counter[str]()

    def counted(value: Any) -> Any:
        encoded[type(value).__name__] += 1
        return encode(value)

    monkeypatch.setattr(asyncsched._sqlite, "_encode", counted)
    async with SQLiteStore(tmp_path / "r.db") as store:
        db = store._db
        assert db is not None
        # and SQLite's own limit with it: a row over it fails its commit
        await db._execute(db._conn.setlimit, sqlite3.SQLITE_LIMIT_LENGTH, 2**21)  # type: ignore[no-untyped-call]
        await store.begin_batch("b")
        for result in (_completed("good-1", 1), _completed("text", "x" * (2**20 + 1)),  # plain JSON: a lean row
                       _completed("bytes", b"x" * 2**20),  # pickled: a full row
                       _completed("said", 2, message="y" * 2**18), _completed("good-2", 2)):
            store.add(result)
        await store.flush()  # the rows over the limit failed every commit, and held back every row after them
        stored = {r.key: r for r in await store.results()}
    assert (stored["good-1"].value, stored["good-2"].value, stored["said"].value) == (1, 2, 2)
    assert stored["said"].message == f"{'y' * 2**16}… (cut: {2**18:,} characters in all)"
    assert (encoded["str"], encoded["bytes"]) == (1, 1)  # a value of a gigabyte is not pickled twice
    for key, what in ("text", "1,048,579 bytes of JSON"), ("bytes", "1,048,585 bytes pickled"):
        assert (stored[key].status, stored[key].value, stored[key].error_type) == (Status.FAILED, None, "StoreError")
        assert f"its value, {what}" in (stored[key].error or "") and "SQLite can hold in one row" in (
            stored[key].error or "")


async def test_a_value_that_does_not_pickle_again_is_stored_as_a_failure_that_says_so(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "r.db") as store:  # (its __setstate__ made a lock, say)
        await store.begin_batch("b")
        store.add(_completed("lock", threading.Lock()))
        await store.flush()
        (stored,) = await store.results()
    assert (stored.status, stored.value) == (Status.FAILED, None)  # not the text of its repr(), as completed
    assert stored.error == ("StoreError: its value, of type lock, could not be pickled again here to be stored: "
                            "TypeError: cannot pickle '_thread.lock' object")


async def test_flush_waits_for_the_commit_in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entered, release = asyncio.Event(), asyncio.Event()
    insert = asyncsched._sqlite._insert_results

    async def held(db: Any, results: Any) -> None:
        if results:
            entered.set()
            await release.wait()  # the writer's commit stops here, after it has taken what was queued
        await insert(db, results)

    monkeypatch.setattr(asyncsched._sqlite, "_insert_results", held)
    async with SQLiteStore(tmp_path / "r.db") as store:
        await store.begin_batch("b")
        store.add(_completed("a", 1))
        await entered.wait()
        flushed = asyncio.ensure_future(store.flush())
        await asyncio.sleep(0)  # a loop turn: a flush that does not wait for the commit is done by now
        assert not flushed.done()
        release.set()
        await flushed
        assert [r.key for r in await store.results()] == ["a"]


async def test_a_read_only_store_opened_twice_keeps_one_connection(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "r.db") as store:
        await store.begin_batch("b")
    async with SQLiteStore(tmp_path / "r.db", readonly=True) as reader:
        first = reader._reader
        await reader.open()  # as Scheduler(store=reader) does
        assert reader._reader is first


async def test_the_memory_store_keeps_one_result_per_key_when_a_batch_resumes() -> None:
    store = MemoryStore()
    await store.begin_batch("b")
    store.add(TaskResult("b", "k", Status.CANCELLED, None, "the batch was cancelled", None, 1, None, None, None,
                         None, None, "asyncio.CancelledError", 0))
    await store.end_batch("b")
    assert await store.begin_batch("b", resume=True) == {}  # the cancelled task runs again
    store.add(_completed("k", 42))
    results = await store.results(batch_id="b")
    stats = await store.stats("b")
    assert [(r.key, r.status) for r in results] == [("k", Status.COMPLETED)]
    assert (stats.total, stats.completed, stats.cancelled) == (1, 1, 0)


UNDECODABLE = b"caf\xe9".decode("utf-8", "surrogateescape")  # what os.listdir() gives for a Latin-1 file name


async def test_a_key_with_a_lone_surrogate_is_not_run_again_when_its_batch_resumes(tmp_path: Path) -> None:
    async with threads(tmp_path / "results.db") as scheduler:
        batch = [Task(tasks.square, 2, key=UNDECODABLE), Task(tasks.square, 3, key="plain")]
        first = await scheduler.run(batch, batch_id="files")
        again = await scheduler.run(batch, batch_id="files", resume=True)
    stored = [("caf\\udce9", 4, first.results[0].started_at), ("plain", 9, first.results[1].started_at)]
    assert [(r.key, r.value, r.started_at) for r in again.results] == stored  # nothing ran again


async def test_a_batch_id_with_a_lone_surrogate_is_stored_and_found(tmp_path: Path) -> None:
    async with threads(tmp_path / "results.db") as scheduler:
        await scheduler.run([Task(tasks.square, 2)], batch_id=UNDECODABLE)
        assert (await scheduler.stats(UNDECODABLE)).completed == 1
        assert [r.value for r in await scheduler.results(UNDECODABLE)] == [4]
        info = await scheduler.batch(UNDECODABLE)
    assert info is not None and info.batch_id == "caf\\udce9" and info.finished_at is not None


async def test_a_file_whose_name_is_not_utf8_opens_read_only(tmp_path: Path) -> None:
    path = tmp_path / f"{UNDECODABLE}.db"
    async with SQLiteStore(path) as store:
        await store.begin_batch("b")
    async with SQLiteStore(path, readonly=True) as reader:
        assert [b.batch_id for b in await reader.batches()] == ["b"]


async def test_the_memory_store_refuses_to_resume_a_batch_whose_results_it_no_longer_keeps() -> None:
    store = MemoryStore(max_results=3)
    await store.begin_batch("b")
    for key in "abcd":
        store.add(_completed(key, 1))
    await store.end_batch("b")
    with pytest.raises(ConfigurationError, match="has 4 results and this MemoryStore keeps only the latest 3"):
        await store.begin_batch("b", resume=True)
    assert (await store.stats("b")).completed == 4


async def test_the_memory_store_refuses_to_resume_a_batch_it_forgot() -> None:
    store = MemoryStore(max_batches=2)
    for batch_id in "abc":  # "a" is forgotten as "c" begins
        await store.begin_batch(batch_id)
        store.add(dataclasses.replace(_completed("k", 1), batch_id=batch_id))
        await store.end_batch(batch_id)
    with pytest.raises(ConfigurationError, match=r"^batch 'a' was forgotten: this MemoryStore keeps the latest 2 "
                                                 r"batches, so it cannot tell which tasks already ran"):
        await store.begin_batch("a", resume=True)  # it began anew, and ran every task again
    assert await store.begin_batch("a") == {}  # a new batch of that id is another matter
    await store.end_batch("a")
    assert await store.begin_batch("a", resume=True) == {}  # and that one resumes


async def test_a_memory_store_shared_by_two_schedulers_runs_a_batch_in_one_at_a_time(
        tmp_path: Path, gate: Callable[[], str]) -> None:
    store, log, release = MemoryStore(), os.fspath(tmp_path / "runs.log"), gate()
    batch = [Task(tasks.log_run, log, str(n), 0.0, release, key=str(n)) for n in range(4)]
    async with Scheduler(workers=1, store=store) as one, Scheduler(workers=1, store=store) as two:
        started = one.events(kinds=[TaskStarted])
        first = asyncio.ensure_future(one.run(batch, batch_id="b", resume=True))
        await anext(aiter(started))
        with pytest.raises(ConfigurationError, match=r"^batch 'b' is running in another scheduler on this MemoryStore"):
            await two.run(batch, batch_id="b", resume=True)  # it ran every task a second time
        await asyncio.to_thread(Path(release).touch)
        assert (await first).completed == 4
        await started.aclose()
    assert sorted((await asyncio.to_thread(Path(log).read_text)).split()) == ["0", "1", "2", "3"]  # each ran once


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_a_page_of_batches_is_newest_first_with_the_total(tmp_path: Path, kind: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    store: Store = MemoryStore() if kind == "memory" else SQLiteStore(tmp_path / "r.db")
    await store.open()
    try:
        for n, batch_id in enumerate(["a", "b", "c", "d"]):
            await store.begin_batch(batch_id)
            for key in range(n):
                store.add(dataclasses.replace(_completed(str(key), key), batch_id=batch_id))
            await store.end_batch(batch_id)
        every = (await store.batches())[::-1]
        if kind == "sqlite":  # it reads the page's batches alone
            monkeypatch.setattr(store, "batches", None)
        pages = [await store.batch_page(limit, offset) for limit, offset in [(2, 0), (2, 1), (None, 3), (5, 9)]]
    finally:
        await store.aclose()
    assert [b.batch_id for b in every] == ["d", "c", "b", "a"]
    assert pages == [(every[0:2], 4), (every[1:3], 4), (every[3:], 4), ([], 4)]
    assert [b.stats.total for b in pages[0][0]] == [3, 2]


async def test_the_memory_store_forgets_its_oldest_ended_batches_past_max_batches() -> None:
    store = MemoryStore(max_batches=2)
    await store.begin_batch("running")  # never ended: never forgotten
    for batch_id in ("old", "new"):
        await store.begin_batch(batch_id)
        store.add(dataclasses.replace(_completed("k", 1), batch_id=batch_id))
        await store.end_batch(batch_id)
    assert [b.batch_id for b in await store.batches()] == ["running", "new"]
    assert [r.batch_id for r in await store.results()] == ["new"]  # and its results with it
    assert (await store.stats("old")).total == 0
    assert await store.begin_batch("old") == {}  # a new batch again


@pytest.mark.parametrize("bad", [0, -1, 1.5, "10"])
def test_the_memory_store_refuses_a_bound_that_is_not_a_positive_int(bad: Any) -> None:
    for name in ("max_results", "max_batches"):
        with pytest.raises(ConfigurationError, match=f"{name} must be an int of at least 1, or None to keep all"):
            MemoryStore(**{name: bad})


@pytest.mark.parametrize(("progress", "back"), [(math.inf, None), (1e20, 1e20)])
async def test_an_export_of_an_odd_number_imports_back(tmp_path: Path, progress: float, back: float | None) -> None:
    odd = TaskResult("b", "k", Status.COMPLETED, 1, None, None, 1, 1, 1.0, math.inf, None, progress, None, 0)
    async with SQLiteStore(tmp_path / "r.db") as store:
        await store.begin_batch("b")
        store.add(odd)
        await store.flush()
        await store.export_jsonl(tmp_path / "out.jsonl")
    async with SQLiteStore(tmp_path / "again.db") as store:
        assert await store.import_jsonl(tmp_path / "out.jsonl") == 1
        (result,) = await store.results()
    assert (result.finished_at, result.progress) == (None, back)


async def test_the_stored_keys_of_a_resumed_batch_find_a_key_by_either_form(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "r.db") as store:
        await store.begin_batch("b")
        store.add(_completed(UNDECODABLE, 7))
        await store.end_batch("b")
        stored = await store.begin_batch("b", resume=True)
    assert UNDECODABLE in stored and "caf\\udce9" in stored and list(stored) == ["caf\\udce9"]
    assert "absent" not in stored and 5 not in stored  # type: ignore[comparison-overlap]


async def test_resuming_a_batch_reads_the_keys_of_its_stored_results_not_their_values(tmp_path: Path) -> None:
    value = "x" * 100_000
    async with SQLiteStore(tmp_path / "r.db") as store:
        await store.begin_batch("b")
        for i in range(200):  # 20 MB of values
            store.add(_completed(f"k{i}", value))
        await store.end_batch("b")
        tracemalloc.start()
        try:
            stored = await store.begin_batch("b", resume=True)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert len(stored) == 200 and "k199" in stored
    assert peak < 2_000_000, f"resuming took {peak:,} bytes: it read the stored values"


async def test_the_memory_store_filters_and_pages_its_results_and_reopens_a_resumed_batch() -> None:
    store = MemoryStore()
    await store.begin_batch("b")
    for key in "abcde":
        store.add(_completed(key, 1))
    store.add(TaskResult("b", "f", Status.FAILED, None, "ValueError: no", None, 1, None, None, None, None, None,
                         "ValueError", 5))
    await store.end_batch("b")
    assert [r.key for r in await store.results(batch_id="b", limit=2, offset=1)] == ["b", "c"]
    assert [r.key for r in await store.results(status=Status.FAILED)] == ["f"]
    assert await store.results(batch_id="other") == []
    await store.begin_batch("b", resume=True)
    info = await store.batch("b")
    assert info is not None and info.finished_at is None  # running again
