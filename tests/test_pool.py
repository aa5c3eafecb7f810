"""The process pool on its own: as an Executor, across start methods, and its kill-one-worker promise."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import gc
import itertools
import multiprocessing.context
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
import types
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

import asyncsched._pool
from asyncsched import Outcome, ProcessPool, RetryPolicy, Scheduler, Status, Task, TaskFailedError, _worker
from asyncsched._errors import BrokenPoolError, ClosedError, ConfigurationError, RemoteTraceback, TaskDefinitionError
from asyncsched._pool import MAX_DEPTH, WORKER_MEMORY, parse_size

from . import faults, tasks
from .util import wait_gone

START_METHODS = ["fork", "forkserver", "spawn"]


@pytest.mark.parametrize("method", START_METHODS)
async def test_every_start_method_runs_fails_and_kills(method: str) -> None:
    async with ProcessPool(2, mp_context=method) as pool:
        ok, bad, stuck = await asyncio.gather(
            pool.call(tasks.square, (7,)), pool.call(faults.boom, ("x",)), pool.call(faults.hang, (), timeout=0.3)
        )
        assert (ok.status, ok.value) == (Status.COMPLETED, 49)
        assert bad.status is Status.FAILED and isinstance(bad.exception, ValueError)
        assert stuck.status is Status.TIMED_OUT
        assert stuck.pid is not None and wait_gone(stuck.pid)
        after = await pool.call(tasks.whoami)
        assert after.value != stuck.pid


async def test_run_in_executor_and_wait_for_kill_the_worker() -> None:
    loop = asyncio.get_running_loop()
    async with ProcessPool(2) as pool:
        assert await loop.run_in_executor(pool, tasks.square, 5) == 25
        pids_before = set(pool.pids)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(loop.run_in_executor(pool, faults.hang), 0.3)
        assert len(pool.pids) == 2
        killed = pids_before - set(pool.pids)
        assert len(killed) == 1 and all(wait_gone(pid) for pid in killed)
        assert pids_before - killed <= set(pool.pids)  # the other worker goes on
        assert await loop.run_in_executor(pool, tasks.square, 6) == 36


async def test_cancelling_a_running_call_kills_only_its_worker() -> None:
    async with ProcessPool(2) as pool:
        started: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        stuck = pool.call(faults.hang, on_start=lambda pid, _: started.set_result(pid))
        others = [pool.call(tasks.square, (i,)) for i in range(10)]
        pid = await started
        stuck.cancel()
        assert [o.value for o in await asyncio.gather(*others)] == [i * i for i in range(10)]
        assert wait_gone(pid)
        assert pool.statistics().killed == 1


async def test_queued_calls_behind_a_timed_out_one_are_not_lost() -> None:
    async with ProcessPool(1) as pool:
        fast = [pool.call(tasks.double, (i,)) for i in range(200)]  # teaches the pool that tasks are fast
        await asyncio.gather(*fast)
        mixed = [pool.call(faults.hang, (), timeout=0.3)] + [pool.call(tasks.double, (i,)) for i in range(50)]
        outcomes = await asyncio.gather(*mixed)
        assert outcomes[0].status is Status.TIMED_OUT
        assert [o.value for o in outcomes[1:]] == [2 * i for i in range(50)]


@pytest.mark.parametrize("first_loop", ["closed", "stopped"])
def test_a_pool_whose_loop_has_ended_refuses_calls_and_closes_from_another_loop(first_loop: str) -> None:
    pool = ProcessPool(1)

    async def call(n: int) -> Any:
        return (await pool.call(tasks.square, (n,))).value

    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(call(2)) == 4
        if first_loop == "closed":
            loop.close()
        pids = pool.pids
        refused = ClosedError if first_loop == "closed" else ConfigurationError
        with pytest.raises(refused, match=r"started on is closed|runs on the event loop it started on"):
            asyncio.run(call(3))
        asyncio.run(asyncio.wait_for(pool.aclose(), 30))
        assert all(wait_gone(pid) for pid in pids)
    finally:
        loop.close()


async def test_a_builtin_bound_to_an_object_carries_the_objects_current_state() -> None:
    items = [1]
    async with ProcessPool(1) as pool:
        first = await pool.call(items.count, (1,))
        items.append(1)
        second = await pool.call(items.count, (1,))  # not the pickle made for the first call
    assert (first.value, second.value) == (1, 2)


async def until_batching(pool: ProcessPool) -> None:
    """Run fast calls until the pool sends calls in groups (and their results come back grouped)."""
    while pool.depth < MAX_DEPTH:
        await asyncio.gather(*(pool.call(tasks.square, (i,)) for i in range(200)))


async def test_every_fast_call_is_told_it_started_once_before_it_ended() -> None:
    heard: dict[int, list[tuple[str, int, float]]] = {}

    def started(i: int) -> Callable[[int, float], None]:
        return lambda pid, at: heard.setdefault(i, []).append(("started", pid, at))

    def finished(i: int, _: object) -> None:
        heard.setdefault(i, []).append(("finished", 0, 0.0))

    async with ProcessPool(1) as pool:
        await until_batching(pool)  # calls queued behind others, most of which begin and end within one read
        calls = [pool.call(tasks.square, (i,), on_start=started(i)) for i in range(500)]
        for i, call in enumerate(calls):
            call.add_done_callback(functools.partial(finished, i))
        outcomes = await asyncio.gather(*calls)
    assert [o.value for o in outcomes] == [i * i for i in range(500)]
    for i, outcome in enumerate(outcomes):
        (_, pid, at), (then, _, _) = heard[i]
        assert then == "finished" and pid == outcome.pid
        assert outcome.started_at is not None and outcome.finished_at is not None
        assert at <= outcome.finished_at + 0.01  # its own start, or the moment the pool saw it running


async def test_a_call_that_crashes_in_the_read_where_it_began_is_told_it_started_first(tmp_path: Path) -> None:
    fifo = tmp_path / "sent"
    os.mkfifo(fifo)
    heard: list[str] = []
    async with ProcessPool(1) as pool:
        await until_batching(pool)
        fast = pool.call(tasks.square, (3,))  # sent in one frame with the next one
        bad = pool.call(faults.send_garbage_then_hang, (os.fspath(fifo),), on_start=lambda *_: heard.append("started"))
        bad.add_done_callback(lambda _: heard.append("finished"))
        await asyncio.sleep(0)  # sent
        assert fifo.read_text() == "sent"  # blocks the loop until the fast result and the garbage are both there
        assert (await fast).value == 9
        outcome = await bad  # began in the read that found the garbage
    assert outcome.status is Status.CRASHED and "cannot be read here" in (outcome.error or ""), outcome
    assert heard == ["started", "finished"]


async def test_a_call_given_back_then_begun_and_ended_within_one_read_elsewhere_is_told_where_it_started(
        gate: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(asyncsched._pool, "TAKE_BACK_AFTER", 3600.0)  # calls may wait behind a long one
    release, fifo = gate(), tmp_path / "running"
    os.mkfifo(fifo)
    async with ProcessPool(2) as pool:
        await until_batching(pool)
        while len(pool._ready) < 2:  # the second worker may still be starting
            await pool.call(tasks.square, (1,))
        running = asyncio.Event()
        long = pool.call(tasks.wait_for_file, (release,), on_start=lambda *_: running.set())
        await running.wait()
        b = long.call.worker  # type: ignore[attr-defined]
        (a,) = pool._workers - {b}
        os.kill(a.pid, signal.SIGSTOP)  # it takes in nothing more
        starts: list[int] = []
        sent = asyncio.Event()

        def started(pid: int, at: float) -> None:
            starts.append(pid)
            sent.set()

        given_back = pool.call(tasks.square, (7,), on_start=started)
        announcing = pool.call(faults.announce_then_hang, (os.fspath(fifo),))
        others = [pool.call(tasks.square, (i,)) for i in range(6)]  # 4 calls to each worker, these two first on a
        await sent.wait()  # the head of a: told it started there
        requeued = asyncio.Event()
        requeue = pool._requeue

        def requeue_then_say_so(worker: Any) -> None:
            requeue(worker)
            requeued.set()

        monkeypatch.setattr(pool, "_requeue", requeue_then_say_so)
        os.kill(a.pid, signal.SIGKILL)  # before it began it: given back, with the call behind it, to b
        await requeued.wait()
        assert given_back.call.worker is b, "given back to the worker that was busy"  # type: ignore[attr-defined]
        await asyncio.to_thread(Path(release).touch)
        assert fifo.read_text() == "started"  # blocks the loop until b has run the call given back, and the rest
        outcome = await given_back  # began and ended within one read of b's pipe
        announcing.cancel()
        assert [o.value for o in await asyncio.gather(*others)] == [i * i for i in range(6)]
    assert outcome.value == 49 and starts == [a.pid, b.pid] and outcome.pid == b.pid, (starts, outcome)


async def calls_ended_before_the_pool_looked(
        pool: ProcessPool, fifo: Path, calls: list[asyncio.Future[Outcome]], count: int,
        on_start: Callable[[int], Callable[[int, float], None]]) -> None:
    """Make ``count`` fast calls (into ``calls``) on a one-worker pool, all sent in one frame with a last one
    that says when it runs; the loop waits for that, so the results of all the others come in one read: only
    the first, begun as the frame went out, is told it started before it ended."""
    await until_batching(pool)
    os.mkfifo(fifo)
    calls += [pool.call(tasks.square, (i,), on_start=on_start(i)) for i in range(count)]
    last = pool.call(faults.announce_then_hang, (os.fspath(fifo),))
    await asyncio.sleep(0)  # sent
    assert fifo.read_text() == "started"  # noqa: ASYNC240 - on purpose: the loop reads nothing until all have ended
    await asyncio.wait_for(asyncio.wait(calls), 30)
    last.cancel()


async def test_an_on_start_that_raises_is_reported_and_its_fast_call_still_ends(tmp_path: Path) -> None:
    failures: list[BaseException | None] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: failures.append(context.get("exception")))

    def on_start(i: int) -> Callable[[int, float], None]:
        def raises(pid: int, at: float) -> None:
            raise RuntimeError("a bug in on_start")
        return raises

    calls: list[asyncio.Future[Outcome]] = []
    try:
        async with ProcessPool(1) as pool:
            await calls_ended_before_the_pool_looked(pool, tmp_path / "last", calls, 50, on_start)
    finally:
        loop.set_exception_handler(None)
    assert [call.result().value for call in calls] == [i * i for i in range(50)]
    assert len(failures) == 50 and all(isinstance(f, RuntimeError) for f in failures)


async def test_an_on_start_that_cancels_its_fast_call_cancels_it_and_nothing_fails(tmp_path: Path) -> None:
    failures: list[BaseException | None] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: failures.append(context.get("exception")))
    calls: list[asyncio.Future[Outcome]] = []

    def on_start(i: int) -> Callable[[int, float], None]:
        def cancel(pid: int, at: float) -> None:
            if i:  # the first one is told it started while it runs: cancelling it would kill its worker
                calls[i].cancel()
        return cancel

    try:
        async with ProcessPool(1) as pool:
            await calls_ended_before_the_pool_looked(pool, tmp_path / "last", calls, 50, on_start)
    finally:
        loop.set_exception_handler(None)
    assert failures == []
    assert calls[0].result().value == 0 and all(call.cancelled() for call in calls[1:])


class Heard:
    """A CallListener that keeps what it hears; ``then`` runs when its call finishes."""

    def __init__(self, then: Callable[[], object] = lambda: None) -> None:
        self.heard: list[str] = []
        self.running = asyncio.Event()
        self.outcome: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self.then = then

    def started(self, pid: int, timestamp: float) -> None:
        self.heard.append("started")
        self.running.set()

    def reported(self, pid: int, timestamp: float, message: str | None, progress: float | None,
                 data: dict[str, Any]) -> None:
        self.heard.append("reported")

    def finished(self, outcome: Outcome) -> None:
        self.heard.append("finished")
        self.then()
        self.outcome.set_result(outcome)


async def test_calls_queued_behind_a_call_that_runs_long_go_to_an_idle_worker(gate: Callable[[], str]) -> None:
    release = gate()
    async with ProcessPool(2) as pool:
        await until_batching(pool)
        blocker = pool.call(tasks.wait_for_file, (release, "released"))  # no timeout: it could run for ever
        fast = [pool.call(tasks.square, (i,)) for i in range(40)]  # the first 20 are queued behind it
        done = await asyncio.wait_for(asyncio.gather(*fast), 30)  # the other worker takes them back and runs them
        assert [outcome.value for outcome in done] == [i * i for i in range(40)]
        assert len({outcome.pid for outcome in done}) == 1 and not blocker.done()
        await asyncio.to_thread(Path(release).touch)
        assert (await blocker).value == "released"
        assert pool.statistics().killed == 0


async def test_a_listener_that_cancels_a_queued_call_makes_no_call_run_twice(tmp_path: Path) -> None:
    log = tmp_path / "runs"
    async with ProcessPool(1) as pool:
        await until_batching(pool)
        listeners = [Heard() for _ in range(10)]
        calls = [pool.start_call(tasks.log_run, (str(log), f"c{i}"), listener)
                 for i, listener in enumerate(listeners)]
        listeners[0].then = calls[1].cancel  # called while the pool handles c0's result, c1 queued behind it
        await asyncio.gather(*(listener.outcome for i, listener in enumerate(listeners) if i != 1))
        assert listeners[0].heard == ["started", "finished"]  # c1 may have finished already, or never
    runs = log.read_text().split()
    assert len(runs) == len(set(runs)) and "c9" in runs, runs


async def test_calls_cancelled_while_queued_on_a_worker_never_run(gate: Callable[[], str], tmp_path: Path) -> None:
    release, log = gate(), tmp_path / "runs"
    async with ProcessPool(1) as pool:
        await until_batching(pool)
        first, last, queued = Heard(), Heard(), [Heard() for _ in range(5)]
        pool.start_call(tasks.wait_for_file, (release,), first)
        cancelled = [pool.start_call(tasks.log_run, (str(log), f"c{i}"), heard) for i, heard in enumerate(queued)]
        cancelled.append(pool.start_call(faults.hang, (), queued[0]))  # no timeout of its own
        pool.start_call(tasks.log_run, (str(log), "last"), last)  # all sent to the worker in one frame
        await first.running.wait()
        assert all(call.cancel() for call in cancelled) and not cancelled[0].cancel()
        await asyncio.to_thread(Path(release).touch)
        assert (await last.outcome).value == "last"
        assert all(heard.heard == [] for heard in queued)
        assert pool.statistics().killed == 0  # skipped by the worker: none ran, so none was killed
    assert log.read_text().split() == ["last"]


async def test_a_call_cancelled_as_its_worker_starts_it_runs_only_its_grace_then_the_worker_is_killed(
        gate: Callable[[], str], tmp_path: Path) -> None:
    release, announce = gate(), tmp_path / "announce"
    os.mkfifo(announce)
    reader = os.open(announce, os.O_RDONLY | os.O_NONBLOCK)  # open before the task writes to it
    try:
        async with ProcessPool(1) as pool:
            await until_batching(pool)
            pid = pool.pids[0]
            first, abandoned = Heard(), Heard()
            pool.start_call(tasks.wait_for_file, (release, "first"), first)
            call = pool.start_call(tasks.log_and_announce, (str(tmp_path / "log"), str(announce), "b",
                                                            str(tmp_path / "never")), abandoned)  # no timeout
            await first.running.wait()  # both are on the worker, in one frame
            Path(release).touch()  # noqa: ASYNC240 - on purpose: the loop must not run before the cancel
            # The loop does not run until the cancel below: the worker has started the second call, and the
            # pool has not read the first one's result yet, so it still counts the second as queued.
            assert select.select([reader], [], [], 10)[0], "the second call did not start"
            assert call.cancel()  # revoked; the worker answers that it had started it already
            assert (await first.outcome).value == "first"
            while pid in pool.pids:  # killed once its grace (ABANDONED_GRACE) is over
                await pool.call(tasks.square, (2,))
            assert wait_gone(pid) and abandoned.heard == []
            assert pool.statistics().killed == 1
    finally:
        os.close(reader)


def test_a_worker_yields_its_cpu_to_the_parent_after_a_slow_call_at_most_once_per_gap(
        monkeypatch: pytest.MonkeyPatch) -> None:
    yields: list[None] = []
    monkeypatch.setattr(_worker, "_yield", lambda: yields.append(None))
    monkeypatch.setattr(_worker, "_yielded_at", 0.0)
    gap = _worker.YIELD_GAP
    for now in [100.0, 100.0 + gap / 2, 100.0 + gap * 0.9, 100.0 + gap * 1.5, 100.0 + gap * 3]:
        _worker._let_the_parent_run(now)  # after each message: a report or a result
    assert len(yields) == 3  # at 0, 1.5 and 3 gaps: the two in between come too soon after a yield
    sent: list[tuple[Any, ...]] = []
    channel: Any = types.SimpleNamespace(send=sent.append)
    # the worker's clock: the first call takes no time, the second twice YIELD_AFTER (however slow this machine)
    clock = iter([200.0, 200.0, 300.0, 300.0 + _worker.YIELD_AFTER * 2])
    monkeypatch.setattr(_worker, "time", types.SimpleNamespace(time=lambda: next(clock)))
    for call_id, (fn, args) in enumerate([(tasks.square, (3,)), (tasks.sleep_then, (_worker.YIELD_AFTER * 2, 7))]):
        _worker._run_call(channel, types.SimpleNamespace(value=-1), call_id, None, pickle.dumps((fn, args)))
    assert [message[3] for message in sent] == [9, 7]
    assert len(yields) == 4  # after the slow call only: the results of fast calls are read a group at a time


@contextlib.contextmanager
def held_gil(tmp_path: Path) -> Iterator[tuple[str, str, Callable[[], object]]]:
    """FIFOs for faults.announce_then_hold_the_gil, and a function that lets its call end."""
    announce, gate = tmp_path / "announce", tmp_path / "gate"
    os.mkfifo(announce)
    os.mkfifo(gate)
    writer = os.open(gate, os.O_RDWR)  # a writer from now on, so the task's open does not wait
    try:
        yield str(announce), str(gate), lambda: os.write(writer, b"x")
    finally:
        os.close(writer)


async def test_a_call_cancelled_behind_one_that_holds_the_gil_never_runs(tmp_path: Path) -> None:
    log = tmp_path / "runs"
    with held_gil(tmp_path) as (announce, gate, release):
        async with ProcessPool(1) as pool:
            await until_batching(pool)
            holder = pool.call(faults.announce_then_hold_the_gil, (announce, gate), timeout=30)
            cancelled = pool.call(tasks.log_run, (str(log), "cancelled"))
            last = pool.call(tasks.log_run, (str(log), "last"))  # the three go to the worker in one frame
            assert await asyncio.to_thread(Path(announce).read_text) == "started"
            cancelled.cancel()  # the revoke is in the worker's socket while no thread of it can read it
            release()
            assert (await last).value == "last" and (await holder).value == "held"
    assert log.read_text().split() == ["last"]


@pytest.mark.parametrize(("task", "seconds", "expected"), [
    (faults.report_then_hold_the_gil, 30, ["started", "reported", "finished"]),  # it reports: it runs
    (faults.announce_then_hold_the_gil, 0.5, ["started", "finished"]),  # it times out: it ran
], ids=["reports", "times-out"])
async def test_a_call_asked_back_after_it_began_is_told_it_started_before_anything_else(
        tmp_path: Path, task: Callable[[str, str], str], seconds: float, expected: list[str]) -> None:
    with held_gil(tmp_path) as (announce, gate, release):
        async with ProcessPool(1) as pool:
            await until_batching(pool)
            heard = Heard()
            pool.start_call(tasks.square, (2,), Heard())  # sent in one frame with the next one
            call = pool.start_call(task, (announce, gate), heard, timeout=seconds)
            await asyncio.sleep(0)  # sent
            assert Path(announce).read_text() == "started"  # noqa: ASYNC240 - on purpose: the loop reads nothing
            # meanwhile, so the pool still sees the first call running and this one queued behind it: asked back
            # after it began, before the worker can answer (its call holds the GIL)
            assert call.worker is not None
            pool._revoke(call.worker, {call.call_id})
            if seconds > 1:
                release()
            outcome = await heard.outcome
        assert outcome.status is (Status.COMPLETED if seconds > 1 else Status.TIMED_OUT), outcome
        assert heard.heard == expected


async def test_a_call_taken_back_is_told_started_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with held_gil(tmp_path) as (announce, gate, release):
        async with ProcessPool(2) as pool:
            await until_batching(pool)
            asked = asyncio.Event()
            revoke = pool._revoke

            def revoking(*args: Any) -> None:
                revoke(*args)
                asked.set()

            monkeypatch.setattr(pool, "_revoke", revoking)
            holder, queued, quick = Heard(), Heard(), Heard()
            pool.start_call(faults.announce_then_hold_the_gil, (announce, gate), holder, timeout=30)
            pool.start_call(tasks.whoami, (), queued)  # queued behind the holder
            pool.start_call(tasks.whoami, (), quick)  # on the other worker, which then has nothing to do
            assert await asyncio.to_thread(Path(announce).read_text) == "started"
            await asyncio.wait_for(asked.wait(), 30)  # the idle worker asks the queued call back ...
            release()  # ... and the holder's worker answers only once its call has ended
            assert (await holder.outcome).value == "held"
            assert (await queued.outcome).status is Status.COMPLETED  # on whichever worker was free first
        assert queued.heard == ["started", "finished"]  # not told it started before it was given back


async def test_a_call_cancelled_by_a_listener_hears_nothing_more() -> None:
    async with ProcessPool(1) as pool:
        await until_batching(pool)
        first, stuck = Heard(), Heard()
        pool.start_call(tasks.square, (2,), first)
        hanging = pool.start_call(faults.hang, (), stuck)  # sent in the same frame: it starts as the first ends
        first.then = hanging.cancel  # told while the pool still holds the news that the second has started
        assert (await first.outcome).value == 4
        assert stuck.heard == []


async def test_a_task_that_raises_broken_pool_error_itself_just_fails() -> None:
    async with ProcessPool(1) as pool:
        outcome = await pool.call(faults.raise_broken_pool)  # the future raises only when this pool breaks
        assert (outcome.status, outcome.error_type) == (Status.FAILED, "asyncsched._errors.BrokenPoolError")
        assert (await pool.call(tasks.square, (3,))).value == 9


def test_two_threads_can_shut_the_pool_down_at_once(gate: Callable[[], str]) -> None:
    release = gate()
    pool = ProcessPool(1)
    running = pool.submit(tasks.wait_for_file, release, "done")
    closers = [threading.Thread(target=pool.shutdown) for _ in range(2)]  # both wait for the running call
    for closer in closers:
        closer.start()
    Path(release).touch()
    for closer in closers:
        closer.join(timeout=30)
    assert not any(closer.is_alive() for closer in closers)
    assert running.result(timeout=0) == "done"


async def test_calls_made_together_go_to_different_workers_even_while_tasks_are_fast(
        gate: Callable[[], str]) -> None:
    release = gate()
    async with ProcessPool(2) as pool:
        await until_batching(pool)
        blocked = pool.call(tasks.wait_for_file, (release,))
        quick = await pool.call(tasks.square, (3,))  # not queued behind the blocked one, even if a worker starts late
        assert quick.value == 9 and not blocked.done()
        await asyncio.to_thread(Path(release).touch)
        assert (await blocked).status is Status.COMPLETED


async def test_a_slow_call_does_not_hold_back_the_result_of_a_fast_one_sent_with_it(tmp_path: Path) -> None:
    log = tmp_path / "runs"
    async with ProcessPool(1) as pool:
        await until_batching(pool)
        fast = pool.call(tasks.log_run, (str(log), "fast"), timeout=0.5)  # done at once, its deadline watched
        slow = pool.call(tasks.log_run, (str(log), "slow", 1.5), timeout=10)  # sent in the same frame
        outcomes = await asyncio.gather(fast, slow)
    assert [o.status for o in outcomes] == [Status.COMPLETED, Status.COMPLETED], outcomes
    assert log.read_text().split() == ["fast", "slow"]  # nothing killed, nothing run twice


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Counter[bool]:
    """How many reads of a worker's pipe found it polled (True) and watched (False)."""
    counted = Counter[bool]()
    read = ProcessPool._read

    def counting(self: ProcessPool, worker: Any) -> bool:
        counted[worker.polled] += 1
        return read(self, worker)

    monkeypatch.setattr(ProcessPool, "_read", counting)
    return counted


async def test_calls_read_on_the_poll_timer_end_as_they_would_watched(monkeypatch: pytest.MonkeyPatch,
                                                                     reads: Counter[bool], tmp_path: Path) -> None:
    """Every worker polled whenever it may be (not only while calls take milliseconds): values, errors,
    crashes and timeouts all come out as they would, and nothing runs twice."""
    monkeypatch.setattr(ProcessPool, "_worth_polling", lambda self, worker: not worker.inbuf and not worker.killed)
    log = tmp_path / "runs"
    faulty: dict[int, tuple[Callable[..., Any], Status]] = {
        3: (faults.exit_hard, Status.CRASHED), 5: (faults.hang, Status.TIMED_OUT), 7: (faults.boom, Status.FAILED)}
    async with ProcessPool(2) as pool:
        calls = []
        for i in range(60):
            if i % 10 in faulty:
                calls.append(pool.call(faulty[i % 10][0], (), timeout=0.3))
            else:
                calls.append(pool.call(tasks.log_run, (str(log), str(i))))
        outcomes = await asyncio.gather(*calls)
    assert [o.status for o in outcomes] == [faulty.get(i % 10, (None, Status.COMPLETED))[1] for i in range(60)]
    completed = [str(i) for i in range(60) if i % 10 not in faulty]
    assert [o.value for o in outcomes if o.status is Status.COMPLETED] == completed
    assert sorted(log.read_text().split(), key=int) == completed
    assert reads[True] > 0  # the timer read some of them


async def until_polled(pool: ProcessPool, gate: Callable[[], str]) -> tuple[Any, asyncio.Future[Outcome], str]:
    """Run calls of 1 ms until the worker is polled just as a call that waits for a gate begins, calls of 1 ms
    queued behind it. Returns the worker, that call and its gate."""
    (worker,) = pool._workers
    for _ in range(20):
        release = gate()
        before = [pool.call(tasks.sleep_then, (0.001, i)) for i in range(20)]
        blocker = pool.call(tasks.wait_for_file, (release,))
        after = [pool.call(tasks.sleep_then, (0.001, i)) for i in range(4)]
        await asyncio.gather(*before)
        if worker.polled and len(worker.calls) >= 3:  # worth polling for, but for how long its call runs
            return worker, blocker, release
        await asyncio.to_thread(Path(release).touch)
        await asyncio.gather(blocker, *after)
    pytest.fail("calls of 1 ms were never read on the timer")


async def test_a_polled_worker_whose_call_runs_long_is_watched_again(monkeypatch: pytest.MonkeyPatch,
                                                                    gate: Callable[[], str]) -> None:
    """With calls queued behind it, a call that runs long is not polled for until it ends: its worker's pipe is
    watched again, so the loop sleeps meanwhile and reads its result as it comes."""
    watched = asyncio.Event()
    poll = ProcessPool._poll

    def noting(self: ProcessPool) -> None:
        poll(self)
        if not any(worker.polled for worker in self._workers):
            watched.set()

    monkeypatch.setattr(ProcessPool, "_poll", noting)
    async with ProcessPool(1) as pool:
        worker, blocker, release = await until_polled(pool, gate)
        watched.clear()
        await watched.wait()
        assert len(worker.calls) >= 3 and not blocker.done()
        await asyncio.to_thread(Path(release).touch)
        assert (await blocker).status is Status.COMPLETED


async def test_a_result_half_read_is_read_as_it_comes_not_at_the_next_poll(monkeypatch: pytest.MonkeyPatch,
                                                                          gate: Callable[[], str]) -> None:
    """A large result is not left half read until the next poll, and the one after that: its worker's pipe is
    watched until all of it has come."""
    half_read = asyncio.Event()
    polled: list[bool] = []
    polls_before = 0

    def noting(method: Callable[..., None]) -> Callable[..., None]:
        def noted(self: ProcessPool, *args: Any) -> None:
            nonlocal polls_before
            polls_before += method.__name__ == "_poll" and not half_read.is_set()
            method(self, *args)
            for worker in self._workers:
                if worker.inbuf:
                    polled.append(worker.polled)
                    half_read.set()
        return noted

    monkeypatch.setattr(ProcessPool, "_poll", noting(ProcessPool._poll))
    monkeypatch.setattr(ProcessPool, "_on_readable", noting(ProcessPool._on_readable))
    async with ProcessPool(1) as pool:
        calls = [pool.call(tasks.sleep_then, (0.001, i)) for i in range(20)]  # the worker polled by now
        release = gate()
        halves = pool.call(faults.return_in_two_halves_at, (2**20, release))  # the rest of its result on release
        calls += [pool.call(tasks.sleep_then, (0.001, i)) for i in range(20)]  # worth polling for, but for it
        await half_read.wait()
        await asyncio.to_thread(Path(release).touch)
        assert (await halves).value == b"x" * 2**20
        await asyncio.gather(*calls)
    assert polls_before  # the worker was polled before
    assert polled and not any(polled)


async def test_a_worker_with_no_call_queued_behind_its_running_one_is_not_polled(reads: Counter[bool]) -> None:
    """Calls of 3 ms go one at a time: polled for, each result would wait for the timer, and its worker with it."""
    async with ProcessPool(1) as pool:
        await asyncio.gather(*(pool.call(tasks.sleep_then, (0.003, i)) for i in range(40)))
        assert pool.depth == 1
    assert reads[False] and not reads[True]


async def test_a_listener_raising_a_base_exception_loses_no_other_call(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ProcessPool, "_worth_polling", lambda self, worker: not worker.inbuf and not worker.killed)
    loop = asyncio.get_running_loop()
    raised: list[BaseException | None] = []
    loop.set_exception_handler(lambda _, context: raised.append(context.get("exception")))

    def cancelled(pid: int, timestamp: float) -> None:
        raise asyncio.CancelledError

    try:
        async with ProcessPool(1) as pool:
            calls = [pool.call(tasks.sleep_then, (0.001, i), on_start=cancelled if i == 30 else None)
                     for i in range(100)]
            outcomes = await asyncio.gather(*calls)
    finally:
        loop.set_exception_handler(None)
    assert [o.value for o in outcomes] == list(range(100))
    assert len(raised) == 1 and isinstance(raised[0], asyncio.CancelledError)


async def test_a_crash_costs_its_own_call_not_the_finished_one_before_it(tmp_path: Path) -> None:
    log = tmp_path / "runs"
    async with ProcessPool(1) as pool:
        await until_batching(pool)
        fast = pool.call(tasks.log_run, (str(log), "fast"))  # sent in one frame with the next one
        crasher = pool.call(faults.exit_hard, (3,))
        outcomes = await asyncio.gather(fast, crasher)
        crashed = pool.statistics().crashed
    assert [o.status for o in outcomes] == [Status.COMPLETED, Status.CRASHED], outcomes
    assert log.read_text().split() == ["fast"]
    assert crashed == 1  # the crasher ran once: it was not given back as if it had never started


async def test_a_result_is_sent_before_the_next_call_starts_even_one_that_keeps_the_gil(tmp_path: Path) -> None:
    log, fifo = tmp_path / "runs", tmp_path / "gate"
    os.mkfifo(fifo)
    gate = os.open(fifo, os.O_RDWR)  # a writer from now on, so the task's open does not wait
    try:
        async with ProcessPool(1) as pool:
            await until_batching(pool)
            fast = pool.call(tasks.log_run, (str(log), "fast"), timeout=0.5)
            slow = pool.call(faults.log_then_hold_the_gil, (str(log), str(fifo), "slow"), timeout=30)  # same frame
            assert (await fast).status is Status.COMPLETED  # while the next call holds the worker's GIL
            os.write(gate, b"x")
            assert (await slow).status is Status.COMPLETED
    finally:
        os.close(gate)
    assert log.read_text().split() == ["fast", "slow"]  # nothing killed, nothing run twice


async def test_cancelling_a_call_that_has_finished_never_reruns_the_one_after_it(tmp_path: Path,
                                                                              gate: Callable[[], str]) -> None:
    log, fifo, release = tmp_path / "runs", tmp_path / "ran", gate()
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        async with ProcessPool(1) as pool:
            await until_batching(pool)
            (worker,) = pool._workers
            loop = asyncio.get_running_loop()
            loop.remove_reader(worker.fd)  # idle: the pool reads nothing of it until the test says so
            first = pool.call(tasks.square, (2,))
            second = pool.call(tasks.log_and_announce, (str(log), str(fifo), "second", release))  # same frame
            await asyncio.sleep(0)  # one loop turn: the frame goes out
            assert select.select([reader], [], [], 30)[0], "second never ran"  # it runs, until the release
            first.cancel()  # finished, but the pool has not read it yet: the running call is the second, not it
            loop.add_reader(worker.fd, pool._on_readable, worker)
            await asyncio.to_thread(Path(release).touch)
            outcome = await second
    finally:
        os.close(reader)
    assert outcome.status is Status.COMPLETED
    assert log.read_text().split() == ["second"]


async def test_a_call_that_starts_just_before_its_worker_is_killed_is_not_run_again(
        tmp_path: Path, gate: Callable[[], str], monkeypatch: pytest.MonkeyPatch) -> None:
    log, fifo = tmp_path / "runs", tmp_path / "started"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    first_gate, second_gate = gate(), gate()
    try:
        async with ProcessPool(1) as pool:
            await until_batching(pool)
            first, second = Heard(), Heard()
            call = pool.start_call(tasks.log_run, (str(log), "first", 0.0, first_gate), first)
            pool.start_call(tasks.log_and_announce, (str(log), str(fifo), "second", second_gate), second)
            await first.running.wait()
            kill = pool._kill

            def kill_once_the_second_has_started(worker: Any) -> None:
                # the race: the first call ends and the second starts after the pool last read the worker
                Path(first_gate).touch()
                assert select.select([reader], [], [], 30)[0], "second never started"
                kill(worker)

            monkeypatch.setattr(pool, "_kill", kill_once_the_second_has_started)
            call.cancel()  # the pool still thinks the first call runs
            await asyncio.to_thread(Path(second_gate).touch)  # a second run of it, if any, ends at once
            outcome = await second.outcome
    finally:
        os.close(reader)
    assert outcome.status is Status.CRASHED  # killed with its worker: recorded, not given back as never started
    assert log.read_text().split() == ["first", "second"]


async def test_a_call_whose_worker_dies_before_beginning_it_goes_back_uncharged(tmp_path: Path) -> None:
    log = tmp_path / "runs"
    async with ProcessPool(1) as pool:
        await pool.call(tasks.whoami)  # the worker is up, and idle
        (worker,) = pool._workers
        os.kill(worker.pid, signal.SIGSTOP)  # from now on it takes in nothing it is sent
        heard = Heard()
        pool.start_call(tasks.log_run, (str(log), "once"), heard)
        await heard.running.wait()  # sent: running, as far as the pool can tell
        os.kill(worker.pid, signal.SIGKILL)  # between two calls, as the OOM killer may
        outcome = await heard.outcome
        crashed = pool.statistics().crashed
    assert outcome.status is Status.COMPLETED and outcome.pid != worker.pid, outcome
    assert log.read_text().split() == ["once"]
    assert crashed == 0 and heard.heard == ["started", "started", "finished"]  # told again as it began again


async def test_a_worker_over_its_memory_limit_between_two_calls_is_replaced_at_no_calls_cost(tmp_path: Path) -> None:
    log = tmp_path / "runs"
    async with ProcessPool(1, max_memory_per_child="1GB") as pool:
        await pool.call(tasks.whoami)
        (worker,) = pool._workers
        os.kill(worker.pid, signal.SIGSTOP)  # it takes in the next call, but never begins it
        heard = Heard()
        pool.start_call(tasks.log_run, (str(log), "once"), heard)
        await heard.running.wait()
        pool._max_memory = 1  # over the limit now, between two calls: memory earlier calls left behind
        pool._check_memory()
        pool._max_memory = None  # the next worker is not checked
        outcome = await heard.outcome
    assert outcome.status is Status.COMPLETED and outcome.pid != worker.pid, outcome
    assert log.read_text().split() == ["once"]


async def test_a_call_whose_workers_keep_dying_before_beginning_it_goes_back_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def die(*_: Any) -> None:  # in place of running the call, before it is marked begun
        os.kill(os.getpid(), signal.SIGKILL)

    monkeypatch.setattr(_worker, "_run_call", die)  # forked workers have it too
    async with ProcessPool(1, mp_context="fork") as pool:
        outcome = await pool.call(tasks.square, (3,))
        statistics = pool.statistics()
    assert outcome.status is Status.CRASHED and "killed by SIGKILL" in (outcome.error or ""), outcome
    assert (statistics.crashed, statistics.started) == (1, 3)  # given back once, then charged: no endless deaths


async def test_calls_queued_on_a_killed_worker_are_settled_when_the_pool_breaks_before_it_exits() -> None:
    async with ProcessPool(1) as pool:
        await until_batching(pool)
        heard = Heard(then=lambda: pool._break("broken by the test"))  # at the timeout, before the worker exits
        pool.start_call(faults.hang, (), heard, timeout=0.2)
        queued = pool.call(tasks.double, (21,))  # behind it, on the same worker: given back once that one exits
        with pytest.raises(BrokenPoolError, match="broken by the test"):
            await queued
        assert (await heard.outcome).status is Status.TIMED_OUT


async def test_a_call_queued_behind_one_that_times_out_is_not_taken_down_with_it() -> None:
    async with ProcessPool(1) as pool:
        await until_batching(pool)
        hanging = pool.call(faults.exit_on_sigterm_and_hang, (), timeout=0.2)
        queued = pool.call(tasks.sleep_then, (0.5, "queued"))  # behind it, on the same worker
        timed_out = await hanging
        assert timed_out.status is Status.TIMED_OUT
        outcome = await queued
    assert (outcome.status, outcome.value) == (Status.COMPLETED, "queued")
    assert timed_out.pid is not None and wait_gone(timed_out.pid)  # killed, though it handles SIGTERM
    assert outcome.pid != timed_out.pid  # so the queued call ran on the worker that replaced it


async def test_a_report_of_a_str_subclass_arrives_as_its_text() -> None:
    reports: list[str | None] = []
    async with ProcessPool(1) as pool:
        outcome = await pool.call(faults.report_a_label, on_report=lambda pid, ts, message, *_: reports.append(message))
    assert (outcome.status, outcome.value) == (Status.COMPLETED, "done")
    assert reports == ["labelled"] and type(reports[0]) is str


async def test_a_message_that_does_not_unpickle_here_crashes_its_call_and_no_other() -> None:
    async with ProcessPool(1) as pool:
        outcome = await pool.call(faults.send_garbage_then_hang)
        assert outcome.status is Status.CRASHED
        assert "sent a message that cannot be read here (_pickle.UnpicklingError" in (outcome.error or "")
        assert (await pool.call(tasks.double, (21,))).value == 42


@pytest.mark.parametrize("shape", ["short", "error"])
async def test_a_malformed_message_crashes_its_call_and_no_other(shape: str) -> None:
    async with ProcessPool(1) as pool:
        malformed = pool.call(faults.send_a_malformed_message_then_hang, (shape,))
        queued = pool.call(tasks.double, (21,))  # behind it, on the same worker
        outcome = await malformed
        assert outcome.status is Status.CRASHED
        assert "sent a message that cannot be read here" in (outcome.error or "")
        assert (await queued).value == 42


@pytest.mark.parametrize("leave", [faults.leave_a_thread_running, faults.leave_a_child_process_running,
                                   faults.leave_a_daemon_child_running, faults.keep_a_multiprocessing_pool])
async def test_a_retired_worker_exits_though_a_task_left_a_thread_or_a_process_running(
        leave: Callable[[], int]) -> None:
    async with ProcessPool(1, max_tasks_per_child=1) as pool:
        first = await pool.call(leave)
        assert (await pool.call(tasks.double, (21,))).value == 42  # on the worker that replaced it
        assert wait_gone(first.value)


async def test_a_worker_reaped_by_something_else_is_not_signalled_by_its_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    killed: list[int] = []
    kill = os.kill

    def recorded(pid: int, signum: int) -> None:
        killed.append(pid)
        kill(pid, signum)

    monkeypatch.setattr(os, "kill", recorded)
    async with ProcessPool(1, mp_context="fork") as pool:  # its workers are children of this process
        pid = (await pool.call(tasks.whoami)).value
        kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)  # noqa: ASYNC222 - reaped now, before the pool sees the exit: its pid is free
        assert (await pool.call(tasks.double, (21,))).value == 42  # on the worker that replaced it
    assert pid not in killed


async def test_a_retired_worker_whose_exit_is_held_up_is_killed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(asyncsched._pool, "RETIRE_GRACE", 0.2)
    async with ProcessPool(1, mp_context="forkserver", max_tasks_per_child=1) as pool:
        first = await pool.call(faults.hold_up_the_exit)
        assert (await pool.call(tasks.double, (21,))).value == 42  # on the worker that replaced it
        assert await asyncio.to_thread(wait_gone, first.value)  # not left until the pool closes, holding its fds
        assert pool.statistics().crashed == 0


@pytest.mark.parametrize("daemon_child", [False, True], ids=["alone", "with-a-daemon-child"])
async def test_a_spawned_worker_that_retires_runs_its_exit_handlers(tmp_path: Path, daemon_child: bool) -> None:
    marker = tmp_path / "at-exit"
    async with ProcessPool(1, mp_context="spawn", max_tasks_per_child=1) as pool:
        first = await pool.call(tasks.write_at_exit, (str(marker), daemon_child))
        assert (await pool.call(tasks.double, (21,))).value == 42  # on the worker that replaced it
        assert wait_gone(first.value)
    assert marker.read_text() == "written at exit"


@pytest.mark.parametrize(("fault", "method"), [
    (faults.start_child_then_exit, None),
    *((faults.fork_child_then_exit, method) for method in ("fork", "spawn", "forkserver")),
])
async def test_a_crashed_workers_task_processes_do_not_outlive_it(tmp_path: Path, fault: Callable[[str], None],
                                                                  method: str | None) -> None:
    pidfile = tmp_path / "child.pid"
    async with ProcessPool(1, mp_context=method) as pool:
        # bounded: a forked child held a fork or spawn worker's sentinel open, so its death went unseen for as long
        # as the child lived
        outcome = await asyncio.wait_for(pool.call(fault, (str(pidfile),)), 30)
    assert outcome.status is Status.CRASHED
    child = int(pidfile.read_text())
    gone = wait_gone(child)
    if not gone:
        os.kill(child, signal.SIGKILL)
    assert gone, "the crashed task's own process was left running"


async def test_a_call_its_stopped_worker_never_began_before_its_deadline_goes_back(tmp_path: Path) -> None:
    log = tmp_path / "runs"
    async with ProcessPool(1) as pool:
        stopped = (await pool.call(tasks.whoami)).value
        os.kill(stopped, signal.SIGSTOP)  # it takes in the next call, but never begins it
        outcome = await pool.call(tasks.log_run, (str(log), "once"), timeout=0.3)
    assert outcome.status is Status.COMPLETED, outcome  # not timed out: it never began
    assert outcome.pid != stopped and log.read_text().split() == ["once"]


def test_shutdown_of_a_pool_whose_loop_has_stopped() -> None:
    loop = asyncio.new_event_loop()
    try:
        pool = ProcessPool(1)

        async def use() -> Outcome:
            return await pool.call(tasks.square, (3,))  # started in a running loop, the pool binds to it

        assert loop.run_until_complete(use()).value == 9  # and that loop has stopped since
        pids = pool.pids
        closer = threading.Thread(target=pool.shutdown, daemon=True)  # as leaving `with pool:` elsewhere does
        closer.start()
        closer.join(timeout=30)
        assert not closer.is_alive(), "shutdown() hung"
        assert all(wait_gone(pid) for pid in pids)
        pool.shutdown()  # again: a no-op
    finally:
        loop.close()


@pytest.mark.parametrize("new_loop", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_a_pool_whose_loop_goes_on_in_another_thread_serves_that_thread_and_this_one(
        new_loop: Callable[[], asyncio.AbstractEventLoop]) -> None:
    pool = ProcessPool(1)

    async def call(n: int) -> Any:
        return (await pool.call(tasks.square, (n,))).value

    loop = new_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    try:
        assert loop.run_until_complete(call(2)) == 4  # the pool binds to the loop in this thread ...
        thread.start()  # ... which then runs in another one, as a loop may
        assert pool.submit(tasks.square, 3).result(timeout=30) == 9  # this thread is no longer the loop's
        assert asyncio.run_coroutine_threadsafe(call(4), loop).result(timeout=30) == 16  # that one is
    finally:
        if thread.is_alive():
            asyncio.run_coroutine_threadsafe(pool.aclose(), loop).result(timeout=30)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=30)
        else:
            loop.run_until_complete(pool.aclose())
        loop.close()


async def test_aclose_from_another_loop_closes_the_pool_on_its_own_loop_in_its_thread(tmp_path: Path) -> None:
    fifo = tmp_path / "started"
    os.mkfifo(fifo)
    loop = asyncio.new_event_loop()
    loop.set_debug(True)  # which makes a call_soon() on it from another thread raise
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        pool = ProcessPool(1)

        async def hang() -> Outcome:
            return await pool.call(faults.announce_then_hang, (os.fspath(fifo),))

        running = asyncio.run_coroutine_threadsafe(hang(), loop)  # the pool starts on that loop
        assert await asyncio.to_thread(fifo.read_text) == "started"
        pids = pool.pids
        await asyncio.wait_for(pool.aclose(), 30)  # from this loop, not the pool's
        assert all(wait_gone(pid) for pid in pids)
        assert concurrent.futures.wait([running], timeout=30).not_done == set()
        assert running.cancelled() or running.result().status is Status.CANCELLED  # closing cancelled it
        assert asyncio.run_coroutine_threadsafe(asyncio.sleep(0, "alive"), loop).result(timeout=30) == "alive"
        await pool.aclose()  # again: a no-op
    finally:
        loop.call_soon_threadsafe(loop.stop)
        await asyncio.to_thread(thread.join, 30)
        loop.close()


def test_threads_submitting_at_once_to_a_new_pool_start_it_once() -> None:
    pool = ProcessPool(2)
    ready = threading.Barrier(4)

    def submit(value: int) -> int:
        ready.wait()  # all four find the pool not started yet
        result: int = pool.submit(tasks.double, value).result()
        return result

    try:
        with concurrent.futures.ThreadPoolExecutor(4) as threads:
            assert list(threads.map(submit, range(4))) == [0, 2, 4, 6]
        assert (pool.statistics().started, len(pool.pids)) == (2, 2)
        assert [t.name for t in threading.enumerate()].count("asyncsched-pool") == 1
    finally:
        pool.shutdown()


def test_plain_executor_from_sync_code(tmp_path: Path) -> None:
    fifo = tmp_path / "started"
    os.mkfifo(fifo)
    with ProcessPool(2) as pool:
        assert list(pool.map(tasks.square, range(6))) == [0, 1, 4, 9, 16, 25]
        assert pool.submit(tasks.add, 1, b=2).result(timeout=10) == 3
        with pytest.raises(ValueError, match="sync boom"):
            pool.submit(faults.boom, "sync boom").result(timeout=10)
        assert pool.submit(tasks.whoami).result(timeout=10) in pool.pids
        running = pool.submit(faults.announce_then_hang, os.fspath(fifo))
        assert fifo.read_text() == "started"  # blocks until the task runs
        assert running.cancel()  # works while it runs: its worker is killed
        assert pool.submit(tasks.square, 3).result(timeout=10) == 9
        assert pool.statistics().killed == 1
    with pytest.raises(ClosedError):
        pool.submit(tasks.square, 1)
    assert issubclass(ClosedError, RuntimeError)  # what a stdlib executor raises after shutdown


def test_shutdown_without_waiting_ends_the_pools_own_thread() -> None:
    pool = ProcessPool(1)
    assert pool.submit(tasks.square, 2).result(timeout=30) == 4
    thread = pool._thread
    assert thread is not None
    pool.shutdown(wait=False)
    thread.join(timeout=30)
    assert not thread.is_alive()


SHUT_DOWN_WITHOUT_WAITING = """
import sys, time
from asyncsched import ProcessPool

def note(path, i):
    time.sleep(0.05)  # work not done yet as the program ends
    with open(path, "a") as out:
        out.write(f"{i}\\n")

if __name__ == "__main__":
    pool = ProcessPool(1)
    calls = [pool.submit(note, sys.argv[1], i) for i in range(8)]
    pool.shutdown(wait=False)
"""


def test_calls_submitted_before_a_shutdown_without_waiting_end_before_the_program_does(tmp_path: Path) -> None:
    """As with a concurrent.futures executor: shutdown(wait=False) returns at once, and the interpreter waits, as it
    exits, for the calls the pool took."""
    program, log = tmp_path / "main.py", tmp_path / "log"
    program.write_text(SHUT_DOWN_WITHOUT_WAITING)
    done = subprocess.run([sys.executable, os.fspath(program), os.fspath(log)], capture_output=True, text=True,
                          timeout=45, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(log.read_text().split(), key=int) == [str(i) for i in range(8)]


async def test_aclose_from_a_loop_closes_a_pool_started_from_a_plain_thread_and_ends_its_thread(
        tmp_path: Path) -> None:
    fifo = tmp_path / "started"
    os.mkfifo(fifo)
    pool = ProcessPool(1)
    running = await asyncio.to_thread(pool.submit, faults.announce_then_hang, os.fspath(fifo))  # no loop there:
    thread = pool._thread  # the pool runs its own, in a private thread
    assert thread is not None
    assert await asyncio.to_thread(fifo.read_text) == "started"
    pids = pool.pids
    await pool.aclose()
    assert not thread.is_alive()
    assert not concurrent.futures.wait([running], timeout=30).not_done and running.cancelled()  # killed
    assert all(wait_gone(pid) for pid in pids)
    await pool.aclose()  # again: a no-op
    with pytest.raises(ClosedError):
        pool.submit(tasks.square, 1)


def test_shutdown_from_a_done_callback_lets_the_running_call_finish(gate: Callable[[], str]) -> None:
    release = gate()
    pool = ProcessPool(2)
    running = pool.submit(tasks.wait_for_file, release, "finished")
    first = pool.submit(tasks.square, 2)
    first.add_done_callback(lambda _: pool.shutdown())  # runs on the pool's own loop thread: it cannot wait there
    assert first.result(timeout=30) == 4
    Path(release).touch()
    assert running.result(timeout=30) == "finished"  # cancel_futures=False: it was not cancelled
    thread = pool._thread
    assert thread is not None
    thread.join(timeout=30)
    assert not thread.is_alive()


async def test_waiting_for_a_future_on_the_pools_own_loop_raises_instead_of_blocking_it() -> None:
    async with ProcessPool(1) as pool:
        future = pool.submit(tasks.square, 3)
        with pytest.raises(RuntimeError, match="would block that loop forever"):
            future.result(timeout=30)
        with pytest.raises(RuntimeError, match="would block that loop forever"):
            list(pool.map(tasks.square, [1, 2], timeout=30))
        assert await asyncio.wrap_future(future) == 9
        assert future.result() == 9  # done: no wait


def test_a_cancelled_future_counts_as_done_for_wait_and_as_completed() -> None:
    with ProcessPool(1) as pool:
        future = pool.submit(faults.hang)
        assert future.cancel()  # it kills the worker running it
        assert concurrent.futures.wait([future], timeout=30).done == {future}
        assert list(concurrent.futures.as_completed([future], timeout=30)) == [future]


def test_shutdown_cancel_futures_cancels_only_the_calls_not_running(tmp_path: Path, gate: Callable[[], str]) -> None:
    log, fifo, release = tmp_path / "runs", tmp_path / "started", gate()
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        pool = ProcessPool(1)
        running = pool.submit(tasks.log_and_announce, str(log), str(fifo), "running", release)
        queued = [pool.submit(tasks.log_run, str(log), f"q{i}") for i in range(3)]
        assert select.select([reader], [], [], 30)[0], "the first call never ran"
        pool.shutdown(wait=False, cancel_futures=True)  # as concurrent.futures: the queued calls are cancelled
        assert all(future.cancelled() for future in queued)  # by the time it returns
        assert not concurrent.futures.wait(queued, timeout=30).not_done
        with pytest.raises(ClosedError, match="shut down"):
            pool.submit(tasks.square, 1)  # no new call, though the running one goes on
        Path(release).touch()
        assert running.result(timeout=30) == "running"
        thread = pool._thread
        assert thread is not None
        thread.join(timeout=30)
        assert not thread.is_alive()
    finally:
        os.close(reader)
    assert log.read_text().split() == ["running"]


def test_a_pool_whose_loop_has_ended_refuses_calls_and_its_shutdown_kills_the_workers() -> None:
    pool = ProcessPool(1)

    async def use() -> list[int]:
        pool.start()  # on this loop, which ends without aclose()
        await pool.call(tasks.square, (2,))
        return pool.pids

    async def run_in_executor() -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool, tasks.square, 3)

    pids = asyncio.run(use())
    try:
        with pytest.raises(ClosedError, match="started on is closed"):
            pool.submit(tasks.square, 3)
        with pytest.raises(ClosedError, match="started on is closed"):
            asyncio.run(run_in_executor())
    finally:
        pool.shutdown()
    assert all(wait_gone(pid) for pid in pids)
    with pytest.raises(ClosedError):
        pool.submit(tasks.square, 1)


def test_a_with_block_in_a_coroutine_that_ends_at_once_leaves_no_worker_and_no_pending_future() -> None:
    # shutdown() cannot wait on the pool's own loop: it begins the close there, and asyncio.run() cancels that
    # close as the coroutine ends; the workers are killed then, and the calls still waiting are settled
    async def main() -> tuple[list[int], concurrent.futures.Future[Any]]:
        with ProcessPool(2) as pool:
            assert await asyncio.get_running_loop().run_in_executor(pool, tasks.square, 3) == 9
            waiting = pool.submit(faults.hang)
        return pool.pids, waiting

    pids, waiting = asyncio.run(main())
    assert pids and all(wait_gone(pid) for pid in pids)
    assert waiting.cancelled()  # with the loop it needed, not pending for ever


@pytest.mark.parametrize(("error", "advice"), [
    (OSError(24, "Too many open files"), "[Errno 24] Too many open files; each worker takes some six file "
                                         "descriptors of this process: use fewer workers, or raise the limits "
                                         "(ulimit -n, ulimit -u)"),
    (OSError(111, "Connection refused"), "[Errno 111] Connection refused; check that this interpreter can start a "
                                         "process here"),  # the fork server could not be reached, say
], ids=["out-of-descriptors", "other"])
async def test_a_worker_that_cannot_be_started_breaks_the_pool_once_none_is_left(
        monkeypatch: pytest.MonkeyPatch, error: OSError, advice: str) -> None:
    def descriptors() -> int:
        return len(os.listdir("/proc/self/fd"))

    def out_of_descriptors() -> tuple[int, int]:
        raise error

    async with Scheduler(workers=1, max_tasks_per_child=1) as scheduler:
        await scheduler.run([Task(tasks.square, 1)])  # and its worker replaced
        monkeypatch.setattr(os, "pipe", out_of_descriptors)  # no worker starts from now on
        before = descriptors()
        with pytest.raises(OSError):
            scheduler.backend.pool._spawn()  # type: ignore[attr-defined]
        assert descriptors() == before  # what a failed start opened is closed again
        summary = await scheduler.run([Task(tasks.square, i) for i in range(3)])
    assert (summary.completed, summary.crashed) == (1, 2)  # the last worker's task, then no worker at all
    assert {r.error for r in summary.results if r.status is Status.CRASHED} == {
        f"BrokenPoolError: could not start a worker: {advice}"}


async def test_a_pool_that_can_start_only_some_of_its_workers_says_so_and_runs_with_those(
        monkeypatch: pytest.MonkeyPatch) -> None:
    spawn = ProcessPool._spawn
    spawns = itertools.count()

    def first_only(pool: ProcessPool) -> None:  # the first worker starts, no other does
        if next(spawns):
            raise OSError(24, "Too many open files")
        spawn(pool)

    monkeypatch.setattr(ProcessPool, "_spawn", first_only)
    with pytest.warns(RuntimeWarning, match=r"^could not start a worker: \[Errno 24\] Too many open files; the pool "
                      r"runs with 1 of its 2 workers, and tries again as each exits; each worker takes"):
        async with ProcessPool(2) as pool:
            outcomes = [await pool.call(tasks.square, (i,)) for i in range(3)]
            assert len(pool.pids) == 1
    assert [outcome.value for outcome in outcomes] == [0, 1, 4]


def test_executor_error_for_an_exception_not_rebuilt_here_has_its_remote_traceback() -> None:
    with ProcessPool(1) as pool:
        error = pool.submit(faults.raise_unrebuildable).exception(timeout=30)
    assert isinstance(error, TaskFailedError) and "UnrebuildableError" in str(error)
    assert isinstance(error.__cause__, RemoteTraceback) and "raise_unrebuildable" in str(error.__cause__)


def test_executor_error_for_non_exception_outcomes() -> None:
    with ProcessPool(1) as pool:
        future: concurrent.futures.Future[Any] = pool.submit(faults.exit_hard, 4)
        with pytest.raises(Exception, match="exited with code 4") as info:
            future.result(timeout=10)
        assert not isinstance(info.value, TaskFailedError)


def test_bad_pool_arguments() -> None:
    with pytest.raises(ConfigurationError, match="start method"):
        ProcessPool(1, mp_context="teleport")
    with pytest.raises(ConfigurationError, match=r"^mp_context must be a start method, one of \[.*'spawn'.*\], or a "
                       r"multiprocessing context such as multiprocessing.get_context\(\"spawn\"\), got 5$"):
        ProcessPool(1, mp_context=5)  # type: ignore[arg-type]  # it failed with an AttributeError at the start
    assert ProcessPool(1, mp_context=multiprocessing.get_context("spawn"))._ctx.get_start_method() == "spawn"
    with pytest.raises(ConfigurationError, match="max_tasks_per_child"):
        ProcessPool(1, max_tasks_per_child=0)
    with pytest.raises(ConfigurationError, match="workers"):
        ProcessPool(0)
    with pytest.raises(ConfigurationError, match=r"^1000000 worker processes would need 11718\.8 GiB at least .*: use "
                       "fewer workers$"):
        ProcessPool(10**6)  # it started them until the machine ran out of memory


def test_worker_side_imports_no_asyncio_or_aiosqlite() -> None:
    code = (
        "import sys, asyncsched, asyncsched._worker\n"
        "from asyncsched import report, Task, Status\n"
        "bad = [m for m in ('asyncio', 'aiosqlite') if m in sys.modules]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent.parent)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(("first", "second"), [(0.2, 0.5), (3600, 0.3)], ids=["later", "sooner"])
async def test_a_call_that_hangs_behind_a_quick_one_times_out_at_its_own_deadline(first: float,
                                                                                 second: float) -> None:
    async with ProcessPool(1) as pool:
        await until_batching(pool)
        quick = pool.call(tasks.square, (2,), timeout=first)  # the worker's deadline timer is armed for this one
        hanging = pool.call(faults.hang, (), timeout=second)  # same frame: it starts as the first ends
        assert (await quick).value == 4
        async with asyncio.timeout(15):
            outcome = await hanging
    assert outcome.status is Status.TIMED_OUT and f"timed out after {second:g}s" in (outcome.error or "")


async def test_calls_queued_behind_a_killed_one_go_back_ahead_of_the_pending_ones(tmp_path: Path) -> None:
    log = tmp_path / "runs"
    async with ProcessPool(1) as pool:
        await until_batching(pool)
        hanging = pool.call(faults.hang, (), timeout=0.3)
        rest = [pool.call(tasks.log_run, (str(log), str(i))) for i in range(100)]  # some queued on the worker
        await asyncio.sleep(0)  # one loop turn: they are sent
        assert 0 < len(pool._pending) < 100  # some went to the worker, behind the hanging one; the rest wait
        assert (await hanging).status is Status.TIMED_OUT
        assert [o.value for o in await asyncio.gather(*rest)] == [str(i) for i in range(100)]
    assert log.read_text().split() == [str(i) for i in range(100)]  # in the order they were made


async def test_max_tasks_per_child_holds_while_calls_are_sent_in_groups() -> None:
    async with ProcessPool(1, max_tasks_per_child=5) as pool:
        while pool.depth <= 10:  # calls go in groups larger than a worker may run
            await asyncio.gather(*(pool.call(tasks.square, (i,)) for i in range(50)))
        pids = [o.value for o in await asyncio.gather(*(pool.call(tasks.whoami) for _ in range(20)))]
    assert max(Counter(pids).values()) <= 5, Counter(pids)


class _DiesBeforeReady(multiprocessing.context.ForkProcess):
    def run(self) -> None:
        os._exit(5)


class _DyingContext(multiprocessing.context.ForkContext):
    """A start method whose workers exit before they are ready, as with a __main__ that cannot be imported."""

    Process = _DiesBeforeReady


async def test_workers_that_keep_dying_before_they_are_ready_break_the_pool() -> None:
    async with asyncio.timeout(20), ProcessPool(1, mp_context=_DyingContext()) as pool:
        with pytest.raises(BrokenPoolError, match="3 workers in a row exited with code 5 before they were ready"):
            await pool.call(tasks.square, (2,))  # pending when the pool breaks
        with pytest.raises(BrokenPoolError):
            await pool.call(tasks.square, (3,))  # made after it broke
        assert pool.statistics().started == 3  # no more respawning


async def test_a_script_with_no_main_guard_is_told_what_to_add(tmp_path: Path) -> None:
    script = tmp_path / "no_guard.py"  # the workers of every start method but fork import the script again
    script.write_text("import asyncio\n"
                      "from asyncsched import ProcessPool\n"
                      "async def main():\n"
                      "    async with ProcessPool(1, mp_context='forkserver') as pool:\n"
                      "        print((await pool.call(abs, (-2,))).value)\n"
                      "asyncio.run(main())\n")
    run = await asyncio.create_subprocess_exec(sys.executable, os.fspath(script), stdout=subprocess.PIPE,
                                               stderr=subprocess.PIPE)
    try:
        _, stderr = await asyncio.wait_for(run.communicate(), 60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            run.kill()
        await run.wait()
    assert run.returncode == 1
    assert "BrokenPoolError: 3 workers in a row" in stderr.decode()
    assert 'a script which runs tasks does so under if __name__ == "__main__":' in stderr.decode()


async def test_closing_the_pool_cancels_the_futures_of_its_calls() -> None:
    async with ProcessPool(1) as pool:
        started: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        running = pool.call(faults.hang, on_start=lambda pid, _: started.set_result(pid))
        waiting = pool.call(tasks.square, (2,))
        await started
    assert running.cancelled() and waiting.cancelled()


async def test_a_result_sent_just_before_the_exit_is_kept_when_the_exit_is_seen_first() -> None:
    async with ProcessPool(1) as pool:
        await pool.call(tasks.square, (1,))  # the worker is ready
        (worker,) = pool._workers
        asyncio.get_running_loop().remove_reader(worker.fd)  # the pool hears of the exit before it reads anything
        outcome = await pool.call(faults.return_then_exit, (42,))
        follow = await pool.call(tasks.square, (3,))
    assert (outcome.status, outcome.value) == (Status.COMPLETED, 42)
    assert follow.value == 9


async def test_an_idle_pool_keeps_nothing_of_the_calls_it_ran() -> None:
    async with ProcessPool(1) as pool:
        heard = Heard()
        pool.start_call(tasks.square, (3,), heard, timeout=30)
        await heard.outcome
        listener = weakref.ref(heard)
        del heard
        gc.collect()
        assert listener() is None  # nor what it holds: a scheduler's record of a task, with the task's arguments


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="a Linux scheduling policy")
async def test_workers_run_under_sched_batch_and_so_do_their_tasks_children() -> None:
    async with ProcessPool(1) as pool:
        outcome = await pool.call(tasks.scheduling_policies)
    worker, child = outcome.value
    assert worker == child == os.SCHED_BATCH
    assert os.sched_getscheduler(0) != os.SCHED_BATCH  # the orchestrator keeps its own


async def test_replacing_workers_leaves_no_file_descriptor_behind() -> None:
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"))

    before = open_fds()
    async with ProcessPool(1, max_tasks_per_child=1) as pool:
        await pool.call(tasks.square, (1,))
        await pool.call(tasks.square, (2,))  # the first worker is gone, its replacement is there
        steady = open_fds()
        for n in range(20):
            await pool.call(tasks.square, (n,))
        assert open_fds() == steady
    assert open_fds() == before


def test_a_memory_limit_below_what_any_worker_takes_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"max_memory_per_child='1KB' \(1,000 bytes\) is less than a worker"):
        ProcessPool(1, max_memory_per_child="1KB")
    with pytest.raises(ConfigurationError, match=r"=512 \(512 bytes\) .* in bytes or as a string such as \"1GB\""):
        ProcessPool(1, max_memory_per_child=512)  # meant as MiB: the error says how it was read


async def test_a_memory_limit_below_an_idle_workers_size_breaks_the_pool_with_the_reason() -> None:
    async with ProcessPool(1, max_memory_per_child=WORKER_MEMORY) as pool:  # accepted: idle workers take more
        with pytest.raises(BrokenPoolError, match=r"before it runs anything, more than max_memory_per_child=12 MiB"):
            await pool.call(tasks.square, (3,))
        assert pool.pids == []  # the worker was sent away


async def test_a_call_with_bad_arguments_is_refused_at_once() -> None:
    async with ProcessPool(1) as pool:
        for timeout in ("5", 0, -5, 10**400, float("nan"), True):
            with pytest.raises(TaskDefinitionError, match="timeout must be a positive number of seconds or None"):
                pool.call(tasks.square, (4,), timeout=timeout)  # type: ignore[arg-type]
        with pytest.raises(TaskDefinitionError, match=r"args must be a tuple .* as in call\(fn, \(x,\)\), got int"):
            pool.call(tasks.square, 4)  # type: ignore[arg-type]
        assert (await pool.call(tasks.square, (4,), timeout=5)).value == 16  # the pool goes on


async def test_a_broken_pool_is_not_retried() -> None:
    policy = RetryPolicy(base_delay=600)  # a retry would wait out the test's bound
    async with asyncio.timeout(30), Scheduler(workers=1, max_memory_per_child=WORKER_MEMORY, retries=3,
                                              retry_policy=policy) as scheduler:
        summary = await scheduler.run([Task(tasks.square, n) for n in range(3)])
    assert [(r.status, r.attempts) for r in summary.results] == [(Status.CRASHED, 1)] * 3
    assert all("BrokenPoolError: " in (r.error or "") for r in summary.results)


def test_memory_limits_are_read_in_decimal_and_binary_units() -> None:
    sizes: list[Any] = ["512MB", "3MiB", "1.5GiB", "100 KiB", "2kb", 1e9, 4096, None]
    expected = [512 * 10**6, 3 * 2**20, 3 * 2**29, 100 * 2**10, 2000, 10**9, 4096, None]
    assert [parse_size(size) for size in sizes] == expected
    for bad in ("lots", "0MB", "5TB", 0, -1, 0.5, True):
        with pytest.raises(ConfigurationError, match="memory limit"):
            parse_size(bad)
