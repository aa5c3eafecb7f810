"""The public API of the core: run, stream, events, timeouts, errors, lazy batches, presets."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fractions
import gc
import math
import os
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import asyncsched._scheduler
from asyncsched import (
    AttemptListener,
    Backend,
    BatchInfo,
    Cancellable,
    ClosedError,
    ConfigurationError,
    Event,
    Outcome,
    ProcessBackend,
    RetryPolicy,
    Scheduler,
    SQLiteStore,
    Status,
    StoreError,
    Task,
    TaskCancelledError,
    TaskCrashedError,
    TaskDefinitionError,
    TaskFailedError,
    TaskFinished,
    TaskReported,
    TaskRetried,
    TaskStarted,
    TaskTimeoutError,
)
from asyncsched._events import EventHub
from asyncsched._models import Attempt, TaskResult
from asyncsched._pool import MAX_DEPTH, ProcessPool, resolve_workers
from asyncsched._store import MemoryStore

from . import faults, tasks
from .util import SlowToAnswerBegin, SlowToBegin, SlowToClose, SlowToEnd, wait_gone


async def test_run_returns_results_in_submission_order(scheduler: Scheduler) -> None:
    batch = [Task(tasks.sleep_then, 0.3 if i == 0 else 0.0, i, key=f"job-{i}") for i in range(8)]
    summary = await scheduler.run(batch)
    assert [r.key for r in summary.results] == [f"job-{i}" for i in range(8)]
    assert [r.value for r in summary.results] == list(range(8))
    assert (summary.total, summary.completed, summary.success_rate) == (8, 8, 1.0)
    assert summary.elapsed > 0
    assert all(r.batch_id == summary.batch_id for r in summary.results)
    first = summary.results[0]
    assert first.status == "completed" and first.attempts == 1 and first.pid
    assert first.started_at is not None and first.finished_at is not None
    assert first.duration is not None and first.duration >= 0.3


async def test_stream_yields_in_completion_order(scheduler: Scheduler, gate: Callable[[], str]) -> None:
    release = gate()
    batch = [Task(tasks.wait_for_file, release, "slow", key="slow")]
    batch += [Task(tasks.identity, i, key=str(i)) for i in range(5)]
    seen = []
    async for result in scheduler.stream(batch):
        seen.append(result.key)
        if len(seen) == 5:
            await asyncio.to_thread(Path(release).touch)  # every fast task is out: the slow one may finish
    assert set(seen[:5]) == {"0", "1", "2", "3", "4"} and seen[-1] == "slow"


async def test_default_keys_are_positions(scheduler: Scheduler) -> None:
    summary = await scheduler.run([Task(tasks.square, i) for i in range(3)])
    assert [r.key for r in summary.results] == ["0", "1", "2"]
    assert [r.value for r in summary.results] == [0, 1, 4]


async def test_timeout_kills_the_worker_and_others_complete() -> None:
    async with Scheduler(workers=2, timeout=30) as scheduler:
        pool: ProcessPool = scheduler.backend.pool  # type: ignore[attr-defined]
        batch = [Task(faults.hang, key="stuck", timeout=0.5)] + [Task(tasks.square, i) for i in range(20)]
        summary = await scheduler.run(batch)
        stuck = summary.results[0]
        assert stuck.status is Status.TIMED_OUT
        assert "timed out after 0.5s" in (stuck.error or "")
        assert stuck.pid is not None
        assert wait_gone(stuck.pid)
        assert summary.completed == 20 and summary.timed_out == 1
        assert len(pool.pids) == 2 and stuck.pid not in pool.pids  # back to full size


async def test_a_task_with_timeout_inf_has_none_though_the_scheduler_has_one(gate: Callable[[], str]) -> None:
    release = gate()
    async with Scheduler(workers=2, timeout=0.2) as scheduler:
        finished = scheduler.events(kinds=[TaskFinished])
        run = asyncio.create_task(scheduler.run([Task(tasks.wait_for_file, release, "done", key="exempt",
                                                      timeout=math.inf), Task(faults.hang, key="bound")]))
        bound = await anext(finished)  # past the scheduler's timeout, the exempt task still runs
        await asyncio.to_thread(Path(release).touch)
        summary = await run
        await finished.aclose()
    assert (bound.key, bound.status) == ("bound", Status.TIMED_OUT)
    assert [(r.key, r.status, r.value) for r in summary.results] == [("exempt", Status.COMPLETED, "done"),
                                                                     ("bound", Status.TIMED_OUT, None)]


async def test_exceptions_keep_type_message_and_traceback(scheduler: Scheduler) -> None:
    summary = await scheduler.run([Task(faults.boom, "bad input 7"), Task(faults.raise_custom)])
    failed, custom = summary.results
    assert failed.status is Status.FAILED
    assert failed.error == "ValueError: bad input 7"
    assert failed.error_type == "ValueError"
    assert failed.traceback is not None and "in boom" in failed.traceback and "faults.py" in failed.traceback
    assert isinstance(failed.exception, ValueError)
    assert "in boom" in str(failed.exception.__cause__)
    with pytest.raises(TaskFailedError) as info:
        failed.unwrap()
    assert isinstance(info.value.__cause__, ValueError)
    assert isinstance(custom.exception, faults.CustomError)
    assert custom.error_type == "tests.faults.CustomError"


async def test_report_events_arrive_before_completion(scheduler: Scheduler) -> None:
    events = scheduler.events(batch_id="b")
    summary = await scheduler.run([Task(tasks.reporting, i, key=f"k{i}") for i in range(6)], batch_id="b")
    await scheduler.aclose()  # the stream ends once it has delivered what it holds
    received = [event async for event in events]
    assert summary.completed == 6
    for key in (f"k{i}" for i in range(6)):
        mine = [e for e in received if e.key == key]
        kinds = [type(e) for e in mine]
        assert kinds == [TaskStarted, TaskReported, TaskReported, TaskReported, TaskFinished], kinds
        assert [e.progress for e in mine[1:4]] == pytest.approx([1 / 3, 2 / 3, 1.0])
        assert mine[1].message == "step 0" and mine[1].data == {"step": 0}
        assert all(e.pid == mine[0].pid and e.batch_id == "b" for e in mine)
        assert mine[-1].status is Status.COMPLETED


async def test_a_progress_that_is_not_a_fraction_fails_its_report(scheduler: Scheduler) -> None:
    events = scheduler.events(kinds=[TaskReported])
    wrong = [float("nan"), float("inf"), 1.5, -0.1, True, "half", 10**400]
    summary = await scheduler.run([Task(tasks.report_progress, p) for p in [*wrong, 0.5, 1, fractions.Fraction(1, 4)]])
    await scheduler.aclose()
    assert [r.status for r in summary.results] == [Status.FAILED] * len(wrong) + [Status.COMPLETED] * 3
    for result, progress in zip(summary.results, wrong, strict=False):
        assert result.error == f"ValueError: report(progress=...) takes a fraction between 0 and 1, got {progress!r}"
    assert Counter([e.progress async for e in events]) == Counter([0.5, 1.0, 0.25])  # as floats, in any order


async def test_report_data_that_does_not_pickle_fails_its_task_saying_so(scheduler: Scheduler) -> None:
    summary = await scheduler.run([Task(tasks.report_a_lock)])
    assert summary.results[0].status is Status.FAILED
    assert (summary.results[0].error or "").endswith("PicklingError: report()'s data could not be pickled: "
                                                     "TypeError: cannot pickle '_thread.lock' object")


async def test_every_fast_task_has_one_started_event_before_its_finished_event() -> None:
    async with Scheduler(workers=1) as scheduler:
        events = scheduler.events()
        summary = await scheduler.run([Task(tasks.square, i) for i in range(1000)])
        await scheduler.aclose()
        seen: dict[str, list[Event]] = {}
        async for event in events:
            seen.setdefault(event.key, []).append(event)
    assert len(seen) == 1000
    for result in summary.results:
        started, finished = seen[result.key]
        assert (type(started), type(finished)) == (TaskStarted, TaskFinished)
        assert started.pid == finished.pid == result.pid and started.attempt == finished.attempt == 1
        assert result.finished_at is not None and started.timestamp <= result.finished_at + 0.01


async def test_the_events_of_one_worker_never_overlap() -> None:
    async with Scheduler(workers=1) as scheduler:
        events = scheduler.events()
        await scheduler.run([Task(tasks.reporting, i, 2, key=f"k{i}") for i in range(6)])
        await scheduler.aclose()
        seen = [(type(e), e.key) async for e in events]
    expected = [(kind, f"k{i}") for i in range(6)
                for kind in (TaskStarted, TaskReported, TaskReported, TaskFinished)]
    assert seen == expected


async def test_every_consumer_sees_every_event_in_order(scheduler: Scheduler) -> None:
    first, second = scheduler.events(), scheduler.events()
    await scheduler.run([Task(tasks.reporting, i, 2) for i in range(4)], batch_id="b")
    await scheduler.aclose()  # ends both streams once they are drained
    one = [e async for e in first]
    two = [e async for e in second]
    assert one == two and len(one) == 4 * 4


async def test_slow_consumer_drops_oldest_and_keeps_order(scheduler: Scheduler) -> None:
    slow, everything = scheduler.events(buffer=5), scheduler.events()
    summary = await scheduler.run([Task(tasks.square, i) for i in range(20)])
    await scheduler.aclose()
    kept = [e async for e in slow]
    published = [e async for e in everything]
    assert len(kept) == 5 and slow.dropped == 20 * 2 - 5
    assert summary.completed == 20  # the run never waited for the consumer
    assert kept == published[-5:]  # the newest five, in the order they were published


async def test_a_consumer_gets_only_the_kinds_it_asks_for(scheduler: Scheduler) -> None:
    with pytest.raises(ConfigurationError, match="kinds are event classes"):
        scheduler.events(kinds=["TaskFinished"])  # type: ignore[list-item]
    with pytest.raises(ConfigurationError, match=r"kinds is a list of event classes, such as kinds=\[TaskFinished\]"):
        scheduler.events(kinds=TaskFinished)  # type: ignore[arg-type]
    reports = scheduler.events(kinds=[TaskReported])
    hub = scheduler._hub
    assert TaskReported in hub.wanted and TaskFinished not in hub.wanted and TaskStarted not in hub.wanted
    ends = scheduler.events(kinds=[TaskFinished], batch_id="b")
    assert TaskFinished in hub.wanted and TaskStarted not in hub.wanted
    await scheduler.run([Task(tasks.reporting, 1, 2, key="a")], batch_id="a")
    await scheduler.run([Task(tasks.reporting, 1, 2, key="b")], batch_id="b")
    only = await anext(ends)
    assert (type(only), only.key, len(ends._buffer)) == (TaskFinished, "b", 0)
    await ends.aclose()
    assert TaskFinished not in hub.wanted  # no consumer left for it: the scheduler no longer builds it
    everything = scheduler.events()
    assert TaskStarted in hub.wanted and TaskFinished in hub.wanted
    await everything.aclose()
    await scheduler.aclose()
    received = [(type(e), e.key) for e in [e async for e in reports]]
    assert received == [(TaskReported, "a")] * 2 + [(TaskReported, "b")] * 2


async def test_events_of_one_loop_turn_are_delivered_together_to_those_subscribed_before() -> None:
    hub = EventHub()
    early, small = hub.subscribe(), hub.subscribe(maxlen=1)
    hub.publish(TaskStarted, "b", "k", Status.RUNNING, 1.0)
    late = hub.subscribe()  # subscribed after the start was published, before it was delivered
    hub.publish(TaskFinished, "b", "k", Status.COMPLETED, 2.0)
    turn = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(turn.set_result, None)  # queued after the delivery the publish queued
    await turn
    assert (len(early._buffer), len(late._buffer), len(small._buffer), small.dropped) == (2, 1, 1, 1)
    hub.close()
    assert [type(e) for e in [e async for e in early]] == [TaskStarted, TaskFinished]
    assert [type(e) for e in [e async for e in late]] == [TaskFinished]


async def test_loop_stays_responsive_during_a_large_batch(scheduler: Scheduler) -> None:
    gaps: list[float] = []
    stop = asyncio.Event()

    async def heartbeat() -> None:
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    beat = asyncio.ensure_future(heartbeat())
    summary = await scheduler.run(Task(tasks.double, i) for i in range(5000))
    stop.set()
    await beat
    assert summary.completed == 5000
    assert len(gaps) > 5 and max(gaps) < 0.5, max(gaps)


async def test_generator_batch_is_consumed_lazily(scheduler: Scheduler) -> None:
    pulled = 0

    def batch() -> Iterator[Task]:
        nonlocal pulled
        for i in range(10_000):
            pulled += 1
            yield Task(tasks.double, i)

    window = scheduler.backend.capacity * MAX_DEPTH  # the most the window grows to while tasks are fast
    seen = 0
    async for _ in scheduler.stream(batch()):
        seen += 1
        assert pulled <= seen + window
        if seen == 50:
            break
    assert pulled < 50 + window + 1


async def test_async_iterable_batch(scheduler: Scheduler) -> None:
    async def batch() -> AsyncIterator[Task]:
        for i in range(10):
            await asyncio.sleep(0)
            yield Task(tasks.square, i)

    summary = await scheduler.run(batch())
    assert [r.value for r in summary.results] == [i * i for i in range(10)]


async def test_io_preset_runs_two_workers_per_core() -> None:
    cores = len(os.sched_getaffinity(0))
    async with Scheduler(workers="io") as scheduler:
        assert scheduler.backend.capacity == 2 * cores
        pids = {r.value for r in (await scheduler.run(
            Task(tasks.sleep_then, 0.2, None) for _ in range(2 * cores))).results}
        assert pids == {None}
        assert len(scheduler.backend.pool.pids) == 2 * cores  # type: ignore[attr-defined]


async def test_cpu_preset_runs_one_worker_per_core() -> None:
    async with Scheduler(workers="cpu") as scheduler:
        assert scheduler.backend.capacity == len(os.sched_getaffinity(0))


def test_the_presets_count_the_cores_this_process_may_run_on() -> None:
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})  # as under `taskset -c 0` or a container's CPU set
    try:
        assert (resolve_workers("cpu"), resolve_workers("io")) == (1, 2)
    finally:
        os.sched_setaffinity(0, allowed)


async def test_no_child_process_remains_after_exit() -> None:
    me = psutil.Process()
    with pytest.raises(RuntimeError, match="leaving"):
        async with Scheduler(workers=2) as scheduler:
            workers = list(scheduler.backend.pool.pids)  # type: ignore[attr-defined]
            assert workers
            await scheduler.run([Task(tasks.square, 2)])
            started = scheduler.events(kinds=[TaskStarted])
            running = asyncio.ensure_future(scheduler.run([Task(faults.hang)]))
            await anext(started)  # the task runs in a worker
            raise RuntimeError("leaving with a task running")
    await asyncio.gather(running, return_exceptions=True)
    alive = {p.pid for p in me.children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE}
    assert not alive & set(workers)


@pytest.mark.parametrize("stored", [False, True])
@pytest.mark.parametrize("first_loop", ["closed", "stopped"])
def test_a_scheduler_lives_on_the_loop_it_started_on(tmp_path: Path, stored: bool, first_loop: str) -> None:
    scheduler = Scheduler(workers=1, store=tmp_path / "r.db" if stored else None)
    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(scheduler.run([Task(tasks.square, 3)])).results[0].value == 9
        if first_loop == "closed":
            loop.close()
        pids = scheduler.backend.pool.pids  # type: ignore[attr-defined]
        with pytest.raises(ConfigurationError, match="started on another event loop"):
            asyncio.run(scheduler.run([Task(tasks.square, 4)]))  # not tasks recorded crashed

        async def subscribe() -> None:
            scheduler.events()  # not a stream that never yields

        with pytest.raises(ConfigurationError, match="started on another event loop"):
            asyncio.run(subscribe())
        asyncio.run(asyncio.wait_for(scheduler.aclose(), 30))  # from another loop too: it returns, nothing is left
        assert all(wait_gone(pid) for pid in pids)
        leftover = set() if loop.is_closed() else asyncio.all_tasks(loop)
        assert all(task.cancelling() for task in leftover)  # aclose() cancelled the store's writer there
        if leftover:  # it ends once its loop runs again: asyncio.run() also does this before it closes its loop
            loop.run_until_complete(asyncio.wait(leftover))
    finally:
        loop.close()
    if stored:
        assert asyncio.run(_stored_values(tmp_path / "r.db")) == [9]


async def _stored_values(path: Path) -> list[Any]:
    async with SQLiteStore(path) as store:
        return [r.value for r in await store.results()]


@pytest.mark.parametrize("failing", [3, 4])
async def test_tasks_waiting_to_be_retried_do_not_hold_back_the_rest_of_a_run(failing: int) -> None:
    # run() wakes to admit tasks once half its window has room, and the tasks in backoff hold no room: not even
    # when they fill the window (4), where the workers would otherwise sit idle for the whole backoff
    async with Scheduler(workers=1, window=4, retry_policy=RetryPolicy(base_delay=3600, jitter=0)) as scheduler:
        finished = scheduler.events(kinds=[TaskFinished])
        batch = ([Task(faults.boom, "x", retries=1, key=f"f{i}") for i in range(failing)]
                 + [Task(tasks.square, i, key=f"s{i}") for i in range(10)])
        running = asyncio.ensure_future(scheduler.run(batch, batch_id="b"))
        done = set()
        async for event in finished:
            done.add(event.key)
            if len(done) == 10:  # every square, while the failed tasks wait an hour for their retry
                break
        assert scheduler.cancel("b")
        summary = await running
    assert (summary.completed, summary.cancelled) == (10, failing)


async def test_tasks_waiting_to_be_retried_free_at_most_a_window_of_room() -> None:
    # else a lazy batch whose tasks all fail, and wait long for their retry, would be pulled whole into memory
    pulled = 0

    def batch() -> Iterator[Task]:
        nonlocal pulled
        for i in range(100):
            pulled += 1
            yield Task(faults.boom, "x", retries=1, key=f"f{i}")

    async with Scheduler(workers=1, window=4, retry_policy=RetryPolicy(base_delay=3600, jitter=0)) as scheduler:
        retried = scheduler.events(kinds=[TaskRetried])
        running = asyncio.ensure_future(scheduler.run(batch(), batch_id="b"))
        waiting = 0
        async for _ in retried:
            waiting += 1
            if waiting == 8:  # a window of them waiting, and another window admitted in their place
                break
        assert scheduler.cancel("b")
        summary = await running
    assert pulled == 8 and summary.cancelled == 8


async def test_scheduler_is_closed_after_exit() -> None:
    async with Scheduler(workers=1) as scheduler:
        pass
    await scheduler.aclose()  # a second close is a no-op
    with pytest.raises(ClosedError):
        await scheduler.run([Task(tasks.square, 1)])


async def test_a_second_aclose_returns_once_the_first_is_done() -> None:
    scheduler = Scheduler(workers=2)
    await scheduler.run([Task(tasks.square, 1)])
    first = asyncio.ensure_future(scheduler.aclose())
    await asyncio.sleep(0)  # its first step: the close has begun, and waits for the workers to exit
    await scheduler.aclose()
    assert scheduler.backend.pool.statistics().workers == 0  # type: ignore[attr-defined]
    await first


async def test_aclose_cancelled_twice_still_closes_everything() -> None:
    store = SlowToClose()
    scheduler = Scheduler(workers=1, store=store)
    await scheduler.run([Task(tasks.square, 1)])
    closing = asyncio.ensure_future(scheduler.aclose())
    await store.entered.wait()  # the workers are gone; the store closes
    closing.cancel()
    await asyncio.sleep(0)  # one step: the cancel is taken, and aclose() waits on for the close
    closing.cancel()
    store.release.set()
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert store.closed  # the second cancel did not stop the close


async def test_a_query_starts_no_worker_and_a_run_after_it_does(tmp_path: Path) -> None:
    scheduler = Scheduler(workers=2, store=tmp_path / "r.db")
    try:
        assert (await scheduler.stats()).total == 0 and await scheduler.batches() == []
        assert scheduler.backend.pool.pids == []  # type: ignore[attr-defined]  # reading the file needs no worker
        assert (await scheduler.run([Task(tasks.square, 3)])).results[0].value == 9
        assert len(scheduler.backend.pool.pids) == 2  # type: ignore[attr-defined]
    finally:
        await scheduler.aclose()


def test_bad_arguments_get_clear_errors() -> None:
    with pytest.raises(ConfigurationError, match="workers"):
        Scheduler(workers="many")
    with pytest.raises(ConfigurationError, match="timeout"):
        Scheduler(workers=1, timeout=-1)
    wrong: dict[str, Any]
    for wrong in ({"timeout": "5"}, {"timeout": True}, {"timeout": 10**400}, {"timeout": math.nan},
                  {"window": "10"}, {"event_buffer": -1}, {"retries": 1.5}, {"retries": True},
                  {"retry_policy": {"base_delay": 1}}, {"max_tasks_per_child": "3"}, {"mp_context": 5},
                  {"workers": "²"}, {"max_memory_per_child": "infGB"}, {"max_memory_per_child": "1e400"},
                  {"handle_sigterm": "no"}, {"progress": "yes"}):
        with pytest.raises(ConfigurationError, match=next(iter(wrong)) if "memory" not in str(wrong) else "memory"):
            Scheduler(**{"workers": 1, **wrong})  # type: ignore[arg-type]
        if next(iter(wrong)) in ("timeout", "retries"):
            with pytest.raises(TaskDefinitionError, match=next(iter(wrong))):  # the same checks for one task
                Task(tasks.square, 1, **wrong)
    with pytest.raises(ConfigurationError, match="max_delay"):
        RetryPolicy(max_delay=10**400)
    with pytest.raises(ConfigurationError, match=r"^backend must be a Backend, such as ExecutorBackend\(executor\) "
                       r"for a concurrent.futures executor, or None for the local pool; got <object object at"):
        Scheduler(backend=object())  # type: ignore[arg-type]  # it failed at the start, with an AttributeError
    with concurrent.futures.ThreadPoolExecutor(1) as executor, pytest.raises(ConfigurationError,
                                                                             match="ExecutorBackend"):
        Scheduler(backend=executor)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="buffer"):
        Scheduler(workers=1).events(buffer=0)
    with pytest.raises(ConfigurationError, match=r"^batch_id must be a str \(or None for every batch\), got 5$"):
        Scheduler(workers=1).events(batch_id=5)  # type: ignore[arg-type]  # as results() says: it never matched
    assert Scheduler(workers=1, max_memory_per_child=1e9).backend.pool._max_memory == 10**9  # type: ignore[attr-defined]
    with pytest.raises(TaskDefinitionError, match="callable"):
        Task(42)  # type: ignore[arg-type]
    for bad in ({"timeout": 0}, {"timeout": -1.5}, {"retries": -1}, {"retries": 1.5}):
        with pytest.raises(TaskDefinitionError, match=next(iter(bad))):
            Task(tasks.square, 1, **bad)
    with pytest.raises(TaskDefinitionError, match="lambda"):
        Task(lambda: 1)

    def nested() -> None: ...

    with pytest.raises(TaskDefinitionError, match="nested function"):
        Task(nested)

    class Local:
        def method(self) -> None: ...

    for method in (Local().method, Local.method):
        with pytest.raises(TaskDefinitionError, match="a method of a class defined inside a function"):
            Task(method)


async def test_a_batch_id_is_a_non_empty_string(scheduler: Scheduler) -> None:
    for wrong in ("", 7):
        with pytest.raises(ConfigurationError, match="batch_id must be a non-empty str"):
            await scheduler.run([Task(tasks.square, 1)], batch_id=wrong)  # type: ignore[arg-type]
    assert not scheduler.running()


async def test_a_batch_of_characters_bytes_or_dict_keys_is_refused(scheduler: Scheduler) -> None:
    for wrong, said in [("abc", "got a str$"), (b"abc", "got a bytes$"), (7, "got int$"),
                        ({"a": Task(tasks.square, 1)}, "got a dict; to run the tasks of a dict, pass its values()")]:
        with pytest.raises(TaskDefinitionError, match=f"a batch is an iterable or async iterable of Task, {said}"):
            await scheduler.run(wrong, batch_id="nightly")  # type: ignore[arg-type]
        with pytest.raises(TaskDefinitionError, match=f"a batch is an iterable or async iterable of Task, {said}"):
            await anext(aiter(scheduler.stream(wrong, batch_id="nightly")))  # type: ignore[arg-type]
    assert await scheduler.batch("nightly") is None  # refused before the store began it: the id is still free
    summary = await scheduler.run({"a": Task(tasks.square, 2)}.values(), batch_id="nightly")
    assert [r.value for r in summary.results] == [4]


async def test_a_non_task_item_fails_alone(scheduler: Scheduler) -> None:
    summary = await scheduler.run([Task(tasks.square, 3), "not a task", Task(tasks.square, 4)])  # type: ignore[list-item]
    assert [r.status for r in summary.results] == [Status.COMPLETED, Status.FAILED, Status.COMPLETED]
    assert "batch item 1 is str, not a Task: wrap each call as Task(fn, *args)" in (summary.results[1].error or "")


async def test_keyword_arguments_through_partial(scheduler: Scheduler) -> None:
    import functools

    summary = await scheduler.run([Task(functools.partial(tasks.add, b=10), 5)])
    assert summary.results[0].value == 15


def test_report_outside_a_task_sends_nothing_but_checks_its_progress() -> None:
    from asyncsched import report

    report(message="nobody listens", progress=0.5, extra=object())  # data that would not pickle: never pickled
    for wrong in [2, float("nan"), "not even a number"]:
        with pytest.raises(ValueError, match="takes a fraction between 0 and 1"):
            report(progress=wrong)  # type: ignore[arg-type]


class Unwritten(MemoryStore):
    """A store that writes only when flushed, and remembers its largest backlog."""

    def __init__(self) -> None:
        super().__init__()
        self.unwritten = self.most = self.flushes = 0

    def add(self, result: TaskResult) -> None:
        super().add(result)
        self.unwritten += 1
        self.most = max(self.most, self.unwritten)

    @property
    def backlog(self) -> int:
        return self.unwritten

    async def flush(self) -> None:
        self.flushes += 1
        self.unwritten = 0


async def test_a_store_that_falls_behind_holds_back_new_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(asyncsched._scheduler, "MAX_BACKLOG", 20)
    store = Unwritten()
    async with Scheduler(workers=2, store=store) as scheduler:
        summary = await scheduler.run(Task(tasks.double, i) for i in range(500))
        bound = 20 + 2 * scheduler.window  # what can finish between two looks at the backlog
    assert summary.completed == 500 and store.flushes > 0
    assert store.most <= bound, (store.most, bound)


async def test_a_batch_is_found_by_its_id(scheduler: Scheduler) -> None:
    await scheduler.run([Task(tasks.square, 2)], batch_id="found")
    info = await scheduler.batch("found")
    assert info is not None and info.stats.completed == 1 and info.finished_at is not None
    assert await scheduler.batch("missing") is None


async def test_the_window_follows_the_pools_batching(scheduler: Scheduler) -> None:
    backend = scheduler.backend
    assert isinstance(backend, ProcessBackend)
    slots = backend.capacity
    assert scheduler.window == 16 * slots  # no task has run yet: they are not known to be fast
    while backend.pool.depth < MAX_DEPTH:  # a call slowed by other load on the machine may hold it back a while
        await scheduler.run([Task(tasks.double, i) for i in range(500)])
    assert scheduler.window == MAX_DEPTH * slots  # fast tasks: enough to fill every worker's queue
    assert Scheduler(window=7).window == 7


async def test_an_argument_that_cannot_be_pickled_is_not_retried() -> None:
    async with Scheduler(workers=1, retries=3, retry_policy=RetryPolicy(base_delay=0.01, max_delay=0.01)) as scheduler:
        summary = await scheduler.run([Task(tasks.identity, threading.Lock())])
    (result,) = summary.results
    assert result.status is Status.FAILED and "could not be pickled" in (result.error or "")
    assert result.attempts == 1  # it would only fail again


async def test_a_resumed_batch_records_an_item_that_is_not_a_task_once(tmp_path: Path) -> None:
    batch: list[Any] = [Task(tasks.identity, 1), "not a task"]
    async with Scheduler(workers=1, store=tmp_path / "r.db") as scheduler:
        first = await scheduler.run(batch, batch_id="b")
        assert (first.total, first.completed, first.failed) == (2, 1, 1)
        again = await scheduler.run(batch, batch_id="b", resume=True)
    assert [r.key for r in again.results] == ["0", "1"]
    assert again.total == 2


class _KeysOnly(MemoryStore):
    """Hands back the keys of a resumed batch's results alone, as the SQLite store does; ``shown`` caps what its
    results() returns, as a store that pages by default would."""

    def __init__(self, shown: int | None = None) -> None:
        super().__init__()
        self.shown = shown

    async def begin_batch(self, batch_id: str, *, name: str | None = None, resume: bool = False) -> Collection[str]:
        return set(await super().begin_batch(batch_id, name=name, resume=resume))

    async def results(self, *, batch_id: str | None = None, status: Status | str | None = None,
                      limit: int | None = None, offset: int = 0) -> list[TaskResult]:
        return await super().results(batch_id=batch_id, status=status, limit=limit or self.shown, offset=offset)


@pytest.mark.parametrize("shown", [None, 2])
async def test_a_resumed_run_reads_the_stored_results_of_a_store_that_hands_back_keys(shown: int | None) -> None:
    store = _KeysOnly(shown)
    async with Scheduler(workers=1, store=store) as scheduler:
        first = await scheduler.run([Task(tasks.square, i) for i in range(3)], batch_id="b")
        batch = [Task(tasks.square, i) for i in range(4)]
        if shown is None:
            again = await scheduler.run(batch, batch_id="b", resume=True)
            assert again.results[:3] == first.results and again.results[3].value == 9  # one task ran
        else:  # a store whose results() leaves out a stored result: said before any task runs
            with pytest.raises(StoreError, match=r"_KeysOnly has a result of task '2' of batch 'b', and its "
                                                 r"results\(batch_id=...\) does not return it"):
                await scheduler.run(batch, batch_id="b", resume=True)
            assert len(await store.results(batch_id="b", limit=10)) == 3


async def test_an_async_batch_that_does_not_wait_hands_over_the_room_it_has_in_one_turn_of_the_loop() -> None:
    loop = asyncio.get_running_loop()
    turns = 0
    ticking = True

    def tick() -> None:  # counts the turns of the loop
        nonlocal turns
        turns += 1
        if ticking:
            loop.call_soon(tick)

    turn_of_item = []

    async def source() -> AsyncIterator[Task]:
        for i in range(40):
            turn_of_item.append(turns)
            yield Task(tasks.square, i)

    async with Scheduler(workers=1, window=16) as scheduler:
        tick()
        summary = await scheduler.run(source())
        ticking = False
    assert summary.completed == 40
    assert len(set(turn_of_item[:16])) == 1  # not a turn for each item: an async batch ran 7 times slower


async def test_an_async_batch_whose_source_is_cancelled_ends_the_run_with_that(scheduler: Scheduler) -> None:
    async def source() -> AsyncIterator[Task]:
        yield Task(tasks.square, 2)
        raise asyncio.CancelledError  # as from a future it awaits that something else cancelled

    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(30):  # it waited for ever
            await scheduler.run(source(), batch_id="b")
    assert scheduler.running() == {}


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_the_tasks_in_flight_when_the_batchs_source_raises_are_recorded_with_its_error(
        scheduler: Scheduler, gate: Callable[[], str], kind: str) -> None:
    release = gate()

    def sync_source() -> Iterator[Task]:
        yield from (Task(tasks.wait_for_file, release, i) for i in range(3))
        raise RuntimeError("source broke")

    async def async_source() -> AsyncIterator[Task]:
        for task in sync_source():
            yield task

    with pytest.raises(RuntimeError, match=r"^source broke$"):
        await scheduler.run(sync_source() if kind == "sync" else async_source(), batch_id="b")
    results = await scheduler.results("b")
    assert [(r.status, r.error) for r in results] == [(
        Status.CANCELLED, "the batch's source raised RuntimeError: source broke; the batch was cancelled")] * 3


async def test_a_stream_hands_out_results_while_its_async_batch_waits_for_the_next_task(scheduler: Scheduler) -> None:
    more = asyncio.Event()

    async def source() -> AsyncIterator[Task]:
        yield Task(tasks.identity, 1, key="first")
        await more.wait()  # e.g. the next request has not come in yet: it comes once the first result is out
        yield Task(tasks.identity, 2, key="second")

    seen = []
    async for result in scheduler.stream(source()):
        seen.append(result.key)
        more.set()
    assert seen == ["first", "second"]


async def test_cancel_ends_a_run_whose_async_batch_waits_for_the_next_task(scheduler: Scheduler,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    never = asyncio.Event()
    closed = asyncio.Event()
    waiting = asyncio.Event()  # the run waits for the source alone, nothing in flight
    wait = asyncsched._scheduler._BatchRun.wait

    async def noted(self: Any) -> None:
        if not self.records and sum(self.counts.values()):  # after the first result: it waits for the source
            waiting.set()
        await wait(self)

    monkeypatch.setattr(asyncsched._scheduler._BatchRun, "wait", noted)

    async def source() -> AsyncIterator[Task]:
        try:
            yield Task(tasks.identity, 1, key="first")
            await never.wait()
            yield Task(tasks.identity, 2, key="second")
        finally:
            closed.set()

    finished = scheduler.events(kinds=[TaskFinished])
    run = asyncio.ensure_future(scheduler.run(source(), batch_id="b"))
    assert (await anext(finished)).key == "first"
    await waiting.wait()
    assert scheduler.cancel("b")
    summary = await run
    await finished.aclose()
    assert [r.key for r in summary.results] == ["first"]
    assert closed.is_set()  # the source was closed, not left waiting


async def test_cancel_stops_a_batch_while_the_store_begins_it(tmp_path: Path) -> None:
    store = SlowToBegin()
    log = tmp_path / "runs"
    async with Scheduler(workers=1, store=store) as scheduler:
        run = asyncio.ensure_future(scheduler.run([Task(tasks.log_run, str(log), "ran")], batch_id="b"))
        await store.entered.wait()
        assert scheduler.cancel("b")  # known from the moment run() is called
        store.release.set()
        summary = await run
    assert summary.results == [] and not log.exists()


async def test_an_event_stream_refuses_a_second_consumer_at_once(scheduler: Scheduler) -> None:
    events = scheduler.events()
    first = asyncio.ensure_future(anext(events))
    await asyncio.sleep(0)  # a loop turn: the first consumer waits
    with pytest.raises(ConfigurationError, match="each consumer needs a stream of its own"):
        await anext(events)
    await events.aclose()  # the first consumer's wait ends with the stream
    with pytest.raises(StopAsyncIteration):
        await first


async def test_a_stream_left_open_past_its_schedulers_close_ends_cleanly(tmp_path: Path) -> None:
    async with Scheduler(workers=1, store=tmp_path / "r.db") as scheduler:
        stream = scheduler.stream([Task(tasks.identity, i) for i in range(50)], batch_id="b")
        async for _ in stream:
            break  # left without closing it
    await stream.aclose()  # as the garbage collector does, later: the store is closed by now
    async with SQLiteStore(tmp_path / "r.db", readonly=True) as store:
        info = await store.batch("b")
    assert info is not None and info.finished_at is not None  # ended by the scheduler's close
    assert info.stats.completed + info.stats.cancelled == info.stats.total > 0


class _Held(Backend):
    """Holds every attempt until the test settles it; cancelling the first one finishes the second (as the
    pool does when, cancelling a call, it reads the result of the one queued behind it)."""

    capacity = 4

    def __init__(self) -> None:
        self.listeners: list[AttemptListener] = []
        self.more = asyncio.Event()

    async def holding(self, count: int) -> None:
        """Until ``count`` attempts have come."""
        while len(self.listeners) < count:
            self.more.clear()
            await self.more.wait()

    def submit(self, attempt: Any, emit: Any) -> asyncio.Future[Outcome]:
        raise NotImplementedError

    def run_attempt(self, attempt: Any, listener: AttemptListener) -> Cancellable:
        self.listeners.append(listener)
        self.more.set()
        position = len(self.listeners) - 1
        backend = self

        class Attempt:
            def cancel(self) -> bool:
                if position == 0 and len(backend.listeners) > 1:
                    backend.listeners[1].finished(Outcome(Status.COMPLETED, value="done meanwhile"))
                return True

        return Attempt()

    async def aclose(self) -> None:
        pass


async def test_cancelling_a_batch_records_once_a_task_that_finishes_while_it_is_cancelled() -> None:
    backend = _Held()
    async with Scheduler(backend=backend) as scheduler:
        run = asyncio.ensure_future(scheduler.run([Task(tasks.identity, i) for i in range(3)], batch_id="b"))
        await backend.holding(3)
        assert scheduler.cancel("b")
        summary = await run
    assert [(r.key, r.status) for r in summary.results] == [
        ("0", Status.CANCELLED), ("1", Status.COMPLETED), ("2", Status.CANCELLED)]


async def test_a_cancelled_task_that_never_started_is_charged_no_attempt(gate: Callable[[], str]) -> None:
    release = gate()
    async with Scheduler(workers=1) as scheduler, scheduler.events(kinds=[TaskStarted]) as started:
        batch = [Task(tasks.wait_for_file, release, key="runs")] + [Task(tasks.square, i) for i in range(3)]
        run = asyncio.ensure_future(scheduler.run(batch, batch_id="b"))
        assert (await anext(started)).key == "runs"  # the others wait in the pool, or behind it on the worker
        assert scheduler.cancel("b")
        summary = await run
    assert [(r.key, r.status, r.attempts) for r in summary.results] == [
        ("runs", Status.CANCELLED, 1), ("1", Status.CANCELLED, 0), ("2", Status.CANCELLED, 0),
        ("3", Status.CANCELLED, 0)]


async def test_wait_ended_returns_once_the_store_has_ended_the_cancelled_batch() -> None:
    backend, store = _Held(), SlowToEnd()
    async with Scheduler(backend=backend, store=store) as scheduler:
        await scheduler.wait_ended("b")  # no run of that id: at once
        run = asyncio.ensure_future(scheduler.run([Task(tasks.identity, 1)], batch_id="b"))
        await backend.holding(1)
        assert scheduler.cancel("b")
        ended = asyncio.ensure_future(scheduler.wait_ended("b"))
        await store.entered.wait()  # the run is over (no longer running()), the batch not ended yet
        assert "b" not in scheduler.running() and not ended.done()
        store.release.set()
        await ended
        info = await scheduler.batch("b")
        assert info is not None and info.finished_at is not None and info.stats.cancelled == 1
        summary = await run
        assert summary.cancelled == 1
        await scheduler.wait_ended("b")  # ended: at once


@pytest.mark.parametrize("consumer", ["run", "stream"])
async def test_a_second_cancel_while_a_run_ends_still_cancels_its_tasks_and_ends_its_batch(consumer: str) -> None:
    backend = _Held()
    letting_go, let_go = asyncio.Event(), asyncio.Event()

    async def source() -> AsyncIterator[Task]:
        yield Task(tasks.identity, 1, key="held")
        try:
            await asyncio.Event().wait()  # the next task never comes
        finally:
            letting_go.set()
            await let_go.wait()  # the source takes its time to let go: the end of the run waits for it

    async def consume(scheduler: Scheduler) -> None:
        if consumer == "run":
            await scheduler.run(source(), batch_id="b")
        else:
            async for _ in scheduler.stream(source(), batch_id="b"):
                pass

    async with Scheduler(backend=backend) as scheduler:
        running = asyncio.ensure_future(consume(scheduler))
        await backend.holding(1)
        running.cancel()
        await letting_go.wait()
        running.cancel()  # again, as asyncio.timeout() and an outer cancel may both do
        let_go.set()
        with pytest.raises(asyncio.CancelledError):
            await running
        assert "b" not in scheduler.running() and len(backend.listeners) == 1  # nothing more was started
        assert [(r.key, r.status) for r in await scheduler.results(batch_id="b")] == [("held", Status.CANCELLED)]
        info = await scheduler.batch("b")
        assert info is not None and info.finished_at is not None


async def _released_then_ended(scheduler: Scheduler, running: asyncio.Future[Any],
                               release: asyncio.Event) -> BatchInfo:
    """Let the store go on; the cancelled run of batch "b" then raises, and the batch is ended: its info."""
    ended = asyncio.ensure_future(scheduler.wait_ended("b"))
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await running
    await ended
    info = await scheduler.batch("b")
    assert info is not None and info.finished_at is not None
    return info


async def test_a_second_cancel_while_the_store_ends_the_batch_lets_it_end() -> None:
    backend, store = _Held(), SlowToEnd()
    async with Scheduler(backend=backend, store=store) as scheduler:
        running = asyncio.ensure_future(scheduler.run([Task(tasks.identity, 1)], batch_id="b"))
        await backend.holding(1)
        running.cancel()
        await store.entered.wait()  # the end of the run: the store ends the batch
        running.cancel()
        assert (await _released_then_ended(scheduler, running, store.release)).stats.cancelled == 1


async def test_a_run_cancelled_while_the_store_begins_its_batch_ends_the_batch() -> None:
    store = SlowToAnswerBegin()
    async with Scheduler(backend=_Held(), store=store) as scheduler:
        running = asyncio.ensure_future(scheduler.run([Task(tasks.identity, 1)], batch_id="b"))
        await store.entered.wait()  # the store has begun the batch, and not returned yet
        running.cancel()
        assert (await _released_then_ended(scheduler, running, store.release)).stats.total == 0


async def test_running_a_batch_again_right_after_cancel_says_to_wait_for_its_end() -> None:
    backend = _Held()
    async with Scheduler(backend=backend) as scheduler:
        first = asyncio.ensure_future(scheduler.run([Task(tasks.identity, 1)], batch_id="b"))
        await backend.holding(1)
        with pytest.raises(ConfigurationError, match=r"wait for it to end, or cancel\(\) it and await "
                                                     r"scheduler.wait_ended\('b'\)"):
            await scheduler.run([], batch_id="b", resume=True)
        assert scheduler.cancel("b")
        with pytest.raises(ConfigurationError, match=r"'b' was cancelled and is still ending on this scheduler: "
                                                     r"await scheduler.wait_ended\('b'\) before you run it again"):
            await scheduler.run([], batch_id="b", resume=True)
        await scheduler.wait_ended("b")
        assert (await scheduler.run([], batch_id="b", resume=True)).total == 0  # as the message says
        assert (await first).cancelled == 1


class _RefusesKeyOne(MemoryStore):
    def add(self, result: TaskResult) -> None:
        if result.key == "1":
            raise RuntimeError("the store cannot take this result")
        super().add(result)


async def test_a_store_that_cannot_take_a_result_fails_the_run() -> None:
    async with Scheduler(workers=1, store=_RefusesKeyOne()) as scheduler:
        with pytest.raises(RuntimeError, match="the store cannot take this result"):
            await scheduler.run([Task(tasks.identity, i) for i in range(3)])


async def test_a_store_that_cannot_take_a_cancelled_result_fails_the_cancelled_run(gate: Callable[[], str]) -> None:
    release = gate()
    batch = [Task(tasks.identity, 0)] + [Task(tasks.wait_for_file, release) for _ in range(2)]
    async with Scheduler(workers=2, store=_RefusesKeyOne()) as scheduler:
        stream = scheduler.stream(batch, batch_id="b")
        async with contextlib.aclosing(stream):
            assert (await anext(stream)).key == "0"
            assert scheduler.cancel("b")  # records 1 and 2 as cancelled: the store refuses 1
            handed_out = []
            with pytest.raises(RuntimeError, match="the store cannot take this result"):
                async for result in stream:  # what was recorded, then the store's error
                    handed_out.append(result.key)
            assert handed_out == ["2"]
        await asyncio.to_thread(Path(release).touch)


async def test_a_store_that_refuses_a_result_of_a_stream_left_early_says_so(gate: Callable[[], str]) -> None:
    release, said = gate(), []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: said.append(context["message"]))
    batch = [Task(tasks.identity, 0)] + [Task(tasks.wait_for_file, release) for _ in range(2)]
    async with Scheduler(workers=2, store=_RefusesKeyOne()) as scheduler:
        stream = scheduler.stream(batch, batch_id="b")
        async with contextlib.aclosing(stream):
            async for _ in stream:
                break  # leaving cancels 1 and 2: the store refuses 1, and nobody is there to raise it to
        await asyncio.to_thread(Path(release).touch)
    assert said == ["the store refused a result of batch 'b'; the batch stops"]


async def test_aclose_while_a_run_starts_the_scheduler_closes_what_the_start_opened(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "r.db")
    scheduler = Scheduler(workers=1, store=store)
    running = asyncio.ensure_future(scheduler.run([Task(tasks.identity, 1)]))
    await asyncio.sleep(0)  # its first step: it is opening the store
    await scheduler.aclose()
    with pytest.raises(ClosedError):
        await running
    assert store._db is None and store._reader is None  # the start was waited for, and what it opened closed
    assert store._writer is not None and store._writer.done()


class _CannotStart(Backend):
    """A backend whose start fails, as a cluster that cannot be reached does."""

    capacity = 1

    def __init__(self) -> None:
        self.closed = False

    async def start(self) -> None:
        raise ConnectionError("no cluster answers")

    def submit(self, attempt: Any, emit: Any) -> asyncio.Future[Outcome]:
        raise NotImplementedError

    async def aclose(self) -> None:
        self.closed = True


async def test_a_start_that_fails_in_async_with_closes_what_it_opened(tmp_path: Path) -> None:
    store, backend = SQLiteStore(tmp_path / "r.db"), _CannotStart()
    scheduler = Scheduler(backend=backend, store=store)
    with pytest.raises(ConnectionError, match="no cluster answers"):
        async with scheduler:
            raise AssertionError("the block does not run")
    assert store._db is None and store._reader is None  # the file opened for the start is closed: no thread left
    assert store._writer is not None and store._writer.done()
    assert backend.closed
    with pytest.raises(ClosedError):  # closed, as after the block
        await scheduler.run([Task(tasks.identity, 1)])


async def test_a_run_is_known_to_cancel_from_its_first_step(tmp_path: Path) -> None:
    scheduler = Scheduler(workers=1, store=tmp_path / "r.db")  # not started: the run starts it, opening the file
    try:
        running = asyncio.ensure_future(scheduler.run([Task(tasks.identity, i) for i in range(3)], batch_id="b"))
        await asyncio.sleep(0)  # one turn of the loop: the run's first step
        assert scheduler.cancel("b")
        summary = await running
    finally:
        await scheduler.aclose()
    assert summary.completed == 0


def test_a_retry_policy_takes_one_exception_class_or_status_and_refuses_nonsense() -> None:
    policy = RetryPolicy(exceptions=ValueError, on=Status.CRASHED)  # type: ignore[arg-type]
    assert (policy.exceptions, policy.on) == ((ValueError,), frozenset({Status.CRASHED}))
    assert RetryPolicy(on=["failed"]).on == frozenset({Status.FAILED})  # type: ignore[arg-type]
    assert RetryPolicy(base_delay=0).delay(5000) == 0 and RetryPolicy(max_delay=5).delay(5000) <= 5  # no overflow
    for bad in ({"exceptions": [1]}, {"on": ["nope"]}, {"on": [Status.COMPLETED]}, {"on": "cancelled"},
                {"base_delay": -1}, {"jitter": 2}, {"max_delay": "5"}):
        with pytest.raises(ConfigurationError, match="RetryPolicy"):
            RetryPolicy(**bad)


async def test_aclose_while_the_store_begins_a_batch(tmp_path: Path) -> None:
    store = SlowToBegin()
    scheduler = Scheduler(workers=1, store=store)
    run = asyncio.ensure_future(scheduler.run([Task(tasks.identity, 1)], batch_id="b"))
    await store.entered.wait()
    await scheduler.aclose()  # the store never began "b": there is no batch of it to end
    store.release.set()
    with pytest.raises(ClosedError):
        await run
    assert await store.results(batch_id="b") == []  # no task was started on the closed pool and recorded crashed
    info = await store.batch("b")
    assert info is not None and info.finished_at is not None  # begun after aclose() began: ended all the same


async def test_a_run_waits_quietly_when_its_async_batchs_next_task_comes_while_the_window_is_full(
        monkeypatch: pytest.MonkeyPatch) -> None:
    backend = _Held()  # capacity 4, prefetch 16: a window of 64
    go = asyncio.Event()
    waits = 0
    wait = asyncsched._scheduler._BatchRun.wait

    async def counted(self: Any) -> None:
        nonlocal waits
        waits += 1
        await wait(self)

    monkeypatch.setattr(asyncsched._scheduler._BatchRun, "wait", counted)

    async def source() -> AsyncIterator[Task]:
        for i in range(20):
            yield Task(tasks.identity, i)
        await go.wait()
        yield Task(tasks.identity, 20)

    async with Scheduler(backend=backend) as scheduler:
        run = asyncio.ensure_future(scheduler.run(source()))
        await backend.holding(20)  # and the next item is being pulled
        backend.prefetch = 1  # the window shrinks to 16, below the 20 in flight (as the pool's does for slow tasks)
        assert scheduler.window == 16  # never below 16, though capacity * prefetch is 4
        go.set()  # the next item comes while the window is full
        waits = 0
        for _ in range(100):  # loop turns: a run that spins takes one wait per turn
            await asyncio.sleep(0)
        assert waits < 5, waits
        for listener in list(backend.listeners):
            listener.finished(Outcome(Status.COMPLETED))
        await backend.holding(21)
        backend.listeners[20].finished(Outcome(Status.COMPLETED))
        assert (await run).completed == 21


async def test_a_result_keeps_the_last_message_and_progress_and_its_finished_event_says_why(
        scheduler: Scheduler) -> None:
    finished = scheduler.events(kinds=[TaskFinished])
    summary = await scheduler.run([
        Task(tasks.report_each, ("said", None), (None, 0.5), key="message-then-progress"),
        Task(tasks.report_each, (None, 0.5), ("said", None), key="progress-then-message"),
        Task(faults.boom, "why", key="fails"),
    ])
    await scheduler.aclose()
    assert [(r.message, r.progress) for r in summary.results[:2]] == [("said", 0.5)] * 2
    assert {e.key: e.message async for e in finished} == {
        "message-then-progress": "said", "progress-then-message": "said", "fails": "ValueError: why"}


async def test_the_finished_events_of_a_stream_left_early_are_out_when_it_ends(scheduler: Scheduler,
                                                                             gate: Callable[[], str]) -> None:
    release = gate()
    finished = scheduler.events(kinds=[TaskFinished])
    batch = [Task(tasks.identity, 0, key="first")] + [Task(tasks.wait_for_file, release, key=f"w{i}") for i in range(2)]
    stream = scheduler.stream(batch)
    async with contextlib.aclosing(stream):
        async for _ in stream:
            break
    # no loop turn since the stream ended: the events of the tasks it cancelled were handed over as it ended
    assert sorted(raw[2] for raw in finished._buffer) == ["first", "w0", "w1"]  # (kind, batch_id, key, ...)
    await finished.aclose()
    await asyncio.to_thread(Path(release).touch)


async def test_a_resume_without_a_batch_id_and_an_unknown_status_are_clear_errors(scheduler: Scheduler) -> None:
    with pytest.raises(ConfigurationError, match="resume=True needs the batch_id"):
        await scheduler.run([Task(tasks.square, 1)], resume=True)
    with pytest.raises(ConfigurationError, match="unknown status 'done'"):
        await scheduler.results(status="done")
    assert await scheduler.batches() == []  # nothing was begun


def test_unwrap_raises_the_error_that_names_the_status() -> None:
    errors = {Status.FAILED: TaskFailedError, Status.TIMED_OUT: TaskTimeoutError, Status.CRASHED: TaskCrashedError,
              Status.CANCELLED: TaskCancelledError}
    for status, error in errors.items():
        with pytest.raises(error, match=f"^task 'k' {status.value}: why$"):
            TaskResult("b", "k", status, error="why").unwrap()
    assert TaskResult("b", "k", Status.COMPLETED, value=3).unwrap() == 3


async def test_an_event_stream_that_is_dropped_is_unsubscribed(scheduler: Scheduler) -> None:
    hub = scheduler._hub
    events = scheduler.events(kinds=[TaskStarted])
    assert TaskStarted in hub.wanted
    del events
    gc.collect()
    assert TaskStarted not in hub.wanted  # the scheduler no longer builds events that nobody can read


async def test_a_failing_listener_costs_no_other_consumer_its_events() -> None:
    said: list[str] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: said.append(context["message"]))
    hub, heard = EventHub(), list[Any]()

    def broken(events: list[Any]) -> None:
        raise RuntimeError("a broken listener")

    first, stream, last = hub.listen(broken), hub.subscribe(), hub.listen(heard.extend)
    hub.publish(TaskStarted, "b", "k", Status.RUNNING, 1.0)
    hub.deliver()
    assert (len(stream._buffer), len(heard), said) == (1, 1, ["an event listener failed"])
    first.close()
    last.close()
    hub.close()


async def test_closing_an_event_stream_discards_what_it_holds() -> None:
    hub = EventHub()
    stream = hub.subscribe()
    hub.publish(TaskStarted, "b", "k", Status.RUNNING, 1.0)
    hub.deliver()
    assert len(stream._buffer) == 1
    await stream.aclose()
    assert [e async for e in stream] == []


async def test_the_process_backends_submit_emits_events_with_the_attempts_number() -> None:
    backend = ProcessBackend(workers=1)
    await backend.start()
    emitted: list[Any] = []
    try:
        outcome = await backend.submit(Attempt("b", "k", tasks.reporting, (5, 1), None, 3), emitted.append)
    finally:
        await backend.aclose()
    assert outcome.value == 5
    assert [(type(e), e.attempt) for e in emitted] == [(TaskStarted, 3), (TaskReported, 3)]
