"""However a task or a worker goes wrong, the outcome is a recorded result; every other task goes on."""

from __future__ import annotations

import asyncio
import collections
import errno
import functools
import json
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import threading
import types
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from asyncsched import (
    Backend,
    ExecutorBackend,
    RemoteTraceback,
    RetryPolicy,
    Scheduler,
    Status,
    Task,
    TaskFailedError,
    TaskFinished,
    TaskReported,
    TaskRetried,
    TaskStarted,
)
from asyncsched._backend import Emit
from asyncsched._models import Attempt, Outcome
from asyncsched._pool import ProcessPool

from . import faults, tasks
from .util import wait_gone

ROOT = Path(__file__).parent.parent
START_METHODS = ["fork", "forkserver", "spawn"]


# -- 1. crashes -----------------------------------------------------------------------------

@pytest.mark.parametrize("method", START_METHODS)
async def test_crashes_cost_only_their_own_task(method: str) -> None:
    async with Scheduler(workers=2, mp_context=method) as scheduler:
        batch = [Task(faults.exit_hard, 3, key="exit"), Task(faults.segfault, key="segv"),
                 Task(faults.sigkill_self, key="kill")] + [Task(tasks.square, i) for i in range(30)]
        summary = await scheduler.run(batch)
    exit_, segv, kill = summary.results[:3]
    assert (exit_.status, segv.status, kill.status) == (Status.CRASHED,) * 3
    assert "exited with code 3" in (exit_.error or "")
    assert "SIGSEGV" in (segv.error or "")
    assert "SIGKILL" in (kill.error or "")
    assert [r.value for r in summary.results[3:]] == [i * i for i in range(30)]
    assert summary.crashed == 3 and summary.completed == 30


async def test_pool_stays_full_and_work_goes_on_after_crashes() -> None:
    async with ProcessPool(2) as pool:
        crashes = [pool.call(faults.exit_hard, (1,)) for _ in range(6)]
        assert {o.status for o in await asyncio.gather(*crashes)} == {Status.CRASHED}
        assert len(pool.pids) == 2
        assert (await pool.call(tasks.square, (9,))).value == 81


async def test_a_result_sent_just_before_the_exit_is_kept() -> None:
    async with ProcessPool(1) as pool:
        started: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        call = pool.call(faults.return_then_exit, (42,), on_start=lambda pid, _: started.set_result(pid))
        pid = await started
        assert wait_gone(pid)  # blocks the loop until the worker is dead: result and exit are both pending now
        outcome = await call
        follow = await pool.call(tasks.square, (3,))
    assert outcome.status is Status.COMPLETED and outcome.value == 42
    assert follow.value == 9


@pytest.mark.parametrize("sent", ["all", "half"])
async def test_a_result_still_arriving_at_the_deadline_is_waited_for_while_it_comes(
        monkeypatch: pytest.MonkeyPatch, sent: str) -> None:
    async with ProcessPool(1) as pool:
        checked = asyncio.Event()
        on_deadline = pool._on_deadline

        def deadline_then_the_rest(worker: Any) -> None:
            on_deadline(worker)  # half the result is here: it is waited for
            if not checked.is_set() and sent == "all":
                os.kill(worker.pid, signal.SIGUSR1)  # and now the rest comes
            checked.set()

        monkeypatch.setattr(pool, "_on_deadline", deadline_then_the_rest)
        outcome = await pool.call(faults.return_in_two_halves, (2**20,), timeout=0.5)
        assert checked.is_set()
    if sent == "all":
        assert outcome.status is Status.COMPLETED and outcome.value == b"x" * 2**20
    else:  # the rest never comes: killed once nothing more has come for a while
        assert outcome.status is Status.TIMED_OUT and outcome.pid is not None
        assert wait_gone(outcome.pid)


# -- 2. retries -----------------------------------------------------------------------------

async def test_retries_count_attempts_and_give_up(tmp_path: Path) -> None:
    counter = os.fspath(tmp_path / "count")
    policy = RetryPolicy(base_delay=0.01, max_delay=0.05)
    async with Scheduler(workers=2, retries=2, retry_policy=policy) as scheduler:
        events = scheduler.events()
        summary = await scheduler.run([
            Task(faults.fail_until, counter, 3, key="flaky"),        # fails twice, then succeeds
            Task(faults.exit_hard, 1, key="always-crashes"),          # crashes every time
            Task(faults.boom, key="no-retry", retries=0),
            Task(faults.hang, key="slow", timeout=0.2, retries=1),
        ])
        await scheduler.aclose()
        retried = [e async for e in events if isinstance(e, TaskRetried)]
    flaky, crashes, no_retry, slow = summary.results
    assert (flaky.status, flaky.attempts, flaky.value) == (Status.COMPLETED, 3, "ok after 3")
    assert (crashes.status, crashes.attempts) == (Status.CRASHED, 3)
    assert (no_retry.status, no_retry.attempts) == (Status.FAILED, 1)
    assert (slow.status, slow.attempts) == (Status.TIMED_OUT, 2)
    assert sorted(e.key for e in retried) == ["always-crashes", "always-crashes", "flaky", "flaky", "slow"]


class KeepsAttempts(Backend):
    """A backend that keeps each attempt it is given, and fails all but the third."""

    capacity = 1

    def __init__(self) -> None:
        self.kept: list[Attempt] = []

    def submit(self, attempt: Attempt, emit: Emit) -> asyncio.Future[Outcome]:
        self.kept.append(pickle.loads(pickle.dumps(attempt)))  # an attempt can travel, as a plain Attempt
        self.kept.append(attempt)
        future = asyncio.get_running_loop().create_future()
        future.set_result(Outcome(Status.COMPLETED, value=attempt.args) if attempt.number == 3
                          else Outcome(Status.FAILED, error="not yet"))
        return future

    async def aclose(self) -> None:
        pass


async def test_each_attempt_is_its_own_attempt_object() -> None:
    backend = KeepsAttempts()
    async with Scheduler(backend=backend, retries=2, retry_policy=RetryPolicy(base_delay=0.0)) as scheduler:
        summary = await scheduler.run([Task(tasks.square, 7)])
    assert summary.results[0].value == (7,)
    assert [(a.number, a.args) for a in backend.kept] == [(1, (7,)), (1, (7,)), (2, (7,)), (2, (7,)), (3, (7,)),
                                                          (3, (7,))]


async def test_retry_policy_filters_statuses_and_exception_types() -> None:
    policy = RetryPolicy(base_delay=0.0, on=frozenset({Status.FAILED}), exceptions=(KeyError,))
    async with Scheduler(workers=1, retries=3, retry_policy=policy) as scheduler:
        summary = await scheduler.run([Task(faults.boom), Task(faults.exit_hard, 2), Task(faults.raise_key_error)])
    assert [r.attempts for r in summary.results] == [1, 1, 4]


@pytest.mark.parametrize("where", ["pool", "executor"])
async def test_each_attempt_has_its_number_in_its_events_and_the_delay_doubles(where: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    policy = RetryPolicy(base_delay=0.01, max_delay=1.0, jitter=0)
    options: dict[str, Any] = (
        {"workers": 1} if where == "pool" else {"backend": ExecutorBackend(ThreadPoolExecutor(1))})
    async with Scheduler(retries=3, retry_policy=policy, **options) as scheduler:
        events = scheduler.events()
        summary = await scheduler.run([Task(faults.boom, "again", key="k")])
        await scheduler.aclose()
        seen = [e async for e in events]
    assert summary.results[0].attempts == 4
    assert [(type(e), e.attempt) for e in seen] == [
        (TaskStarted, 1), (TaskRetried, 1), (TaskStarted, 2), (TaskRetried, 2), (TaskStarted, 3), (TaskRetried, 3),
        (TaskStarted, 4), (TaskFinished, 4)]
    assert [e.message for e in seen if isinstance(e, TaskRetried)] == [
        f"ValueError: again; retrying in {delay}s" for delay in ("0.01", "0.02", "0.04")]


async def test_a_task_cancelled_while_it_waits_for_its_retry_has_no_running_times() -> None:
    policy = RetryPolicy(base_delay=60.0, jitter=0)  # the retry would come in a minute
    async with Scheduler(workers=1, retries=1, retry_policy=policy) as scheduler:
        retried = scheduler.events(kinds=[TaskRetried])
        run = asyncio.ensure_future(scheduler.run([Task(faults.boom, key="waits")], batch_id="b"))
        assert (await anext(retried)).key == "waits"
        assert scheduler.cancel("b")
        (result,) = (await run).results
    assert (result.status, result.attempts) == (Status.CANCELLED, 1)
    assert (result.started_at, result.finished_at) == (None, None)  # it was not running when it was cancelled


async def test_the_schedulers_timeout_applies_to_a_task_without_its_own() -> None:
    async with asyncio.timeout(15), Scheduler(workers=1, timeout=0.3) as scheduler:
        summary = await scheduler.run([Task(faults.hang, key="hangs"), Task(tasks.square, 3, key="after")])
    hangs, after = summary.results
    assert hangs.status is Status.TIMED_OUT and "timed out after 0.3s" in (hangs.error or "")
    assert after.value == 9


async def test_retry_policy_matches_an_exception_that_could_not_be_rebuilt_by_its_type_name() -> None:
    policy = RetryPolicy(base_delay=0.0, exceptions=(faults.UnrebuildableError,))
    async with Scheduler(workers=1, retries=2, retry_policy=policy) as scheduler:
        summary = await scheduler.run([Task(faults.raise_unrebuildable), Task(faults.boom)])
    rebuilt_as_text, other = summary.results
    assert rebuilt_as_text.exception is None and rebuilt_as_text.error_type == "tests.faults.UnrebuildableError"
    assert (rebuilt_as_text.attempts, other.attempts) == (3, 1)
    with pytest.raises(TaskFailedError) as raised:  # without the exception, its remote traceback is the cause
        rebuilt_as_text.unwrap()
    cause = raised.value.__cause__
    assert isinstance(cause, RemoteTraceback) and "raise_unrebuildable" in str(cause)


async def test_retry_policy_matches_a_subclass_of_its_exceptions_that_could_not_be_rebuilt() -> None:
    policy = RetryPolicy(base_delay=0.0, exceptions=(Exception,))
    async with Scheduler(workers=1, retries=2, retry_policy=policy) as scheduler:
        (unrebuilt,) = (await scheduler.run([Task(faults.raise_unrebuildable)])).results
    assert unrebuilt.exception is None and unrebuilt.attempts == 3  # its type imported here by name: a subclass


def test_retry_policy_matches_a_type_by_name_subclasses_included(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def failed(error_type: str) -> Outcome:
        return Outcome(Status.FAILED, error=f"{error_type}: x", error_type=error_type)

    assert RetryPolicy(exceptions=(OSError,)).should_retry(failed("urllib.error.HTTPError"))  # imported to see
    assert not RetryPolicy(exceptions=(ValueError,)).should_retry(failed("urllib.error.HTTPError"))
    assert RetryPolicy(exceptions=(LookupError,)).should_retry(failed("KeyError"))  # a builtin
    tmp_path.joinpath("exits_as_imported.py").write_text("import sys\nsys.exit(3)\n")
    monkeypatch.syspath_prepend(tmp_path)
    assert not RetryPolicy(exceptions=(OSError,)).should_retry(failed("exits_as_imported.Error"))  # and goes on
    elsewhere = type("Elsewhere", (Exception,), {"__module__": "no_such_module_here"})
    assert RetryPolicy(exceptions=(elsewhere,)).should_retry(failed("no_such_module_here.Elsewhere"))  # the name
    assert not RetryPolicy(exceptions=(elsewhere,)).should_retry(failed("no_such_module_here.Other"))


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    policy = RetryPolicy(base_delay=1.0, max_delay=5.0, jitter=0.5)
    for retry, top in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (10, 5.0)]:
        delays = [policy.delay(retry) for _ in range(200)]
        assert all(top * 0.5 <= d <= top for d in delays)
        assert max(delays) - min(delays) > 0  # jittered
    assert RetryPolicy(jitter=0).delay(3) == pytest.approx(0.4)


# -- 3. cancellation ------------------------------------------------------------------------

async def test_cancelling_run_kills_its_workers_and_the_scheduler_goes_on() -> None:
    async with Scheduler(workers=2) as scheduler:
        events = scheduler.events(batch_id="doomed")
        run = asyncio.ensure_future(scheduler.run([Task(faults.hang, key=str(i)) for i in range(4)],
                                                  batch_id="doomed"))
        pids = set()
        async for event in events:
            if event.pid is not None:
                pids.add(event.pid)
            if len(pids) == 2:
                break
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        assert all(wait_gone(pid) for pid in pids)
        stored = await scheduler.results(batch_id="doomed")
        assert sorted(r.key for r in stored) == ["0", "1", "2", "3"]
        assert {r.status for r in stored} == {Status.CANCELLED}
        again = await scheduler.run([Task(tasks.square, 4)])  # still usable
        assert again.results[0].value == 16


async def test_breaking_out_of_stream_cancels_the_rest() -> None:
    async with Scheduler(workers=2) as scheduler:
        batch = [Task(tasks.square, 1, key="quick")] + [Task(faults.hang, key=f"h{i}") for i in range(3)]
        events = scheduler.events()
        async with asyncio.timeout(30):
            stream = scheduler.stream(batch, batch_id="brk")
            async for result in stream:
                assert result.key == "quick"
                break
            await stream.aclose()
        pids, ended = set(), set()
        async for event in events:  # all buffered by now: the cancelled tasks are recorded
            if event.key.startswith("h") and isinstance(event, TaskStarted):
                pids.add(event.pid)
            if event.key.startswith("h") and isinstance(event, TaskFinished):
                ended.add(event.key)
                if len(ended) == 3:
                    break
        assert pids and all(pid is not None and wait_gone(pid) for pid in pids)
        statuses = {r.key: r.status for r in await scheduler.results(batch_id="brk")}
        assert statuses["quick"] is Status.COMPLETED
        assert {statuses[k] for k in statuses if k != "quick"} == {Status.CANCELLED}


async def test_cancelling_one_batch_leaves_another_alone() -> None:
    async with Scheduler(workers=2) as scheduler:
        events = scheduler.events(batch_id="doomed")
        doomed = asyncio.ensure_future(scheduler.run([Task(faults.hang)], batch_id="doomed"))
        steady = asyncio.ensure_future(scheduler.run([Task(tasks.sleep_then, 0.05, i) for i in range(10)],
                                                     batch_id="steady"))
        await anext(events)  # the doomed task runs
        doomed.cancel()
        summary = await steady
        assert summary.completed == 10
        with pytest.raises(asyncio.CancelledError):
            await doomed


async def test_cancel_by_id_kills_the_running_tasks_and_run_returns() -> None:
    async with Scheduler(workers=2) as scheduler:
        events = scheduler.events(batch_id="doomed")
        n = scheduler.window + 100  # more than it admits at once (slow tasks: the window stays small)
        batch = [Task(faults.hang, key=str(i)) for i in range(n)]
        run = asyncio.ensure_future(scheduler.run(batch, batch_id="doomed"))
        started = {}
        async for event in events:
            started[event.key] = event.pid
            if len(set(started.values())) == 2:
                break
        pids = set(started.values())
        assert scheduler.running() == {"doomed": n}
        assert scheduler.cancel("doomed") and not scheduler.cancel("no-such-batch")
        summary = await run  # ends with what it has: the tasks admitted so far, cancelled
        assert 2 <= summary.total < n and summary.cancelled == summary.total
        assert {r.error for r in summary.results} == {"the batch was cancelled"}
        # a task cancelled while it ran keeps where it ran, as its TaskStarted said
        assert {r.key: r.pid for r in summary.results if r.key in started} == started
        assert all(pid is not None and wait_gone(pid) for pid in pids)
        assert scheduler.running() == {} and not scheduler.cancel("doomed")
        assert (await scheduler.stats("doomed")).cancelled == summary.total


async def test_cancel_by_id_while_an_async_batch_is_pulled() -> None:
    async with Scheduler(workers=1) as scheduler:
        pulled = asyncio.Event()
        release = asyncio.Event()

        async def batch() -> AsyncIterator[Task]:
            yield Task(tasks.square, 2, key="first")
            pulled.set()
            await release.wait()  # cancelled while the scheduler waits for this item
            yield Task(tasks.square, 3, key="late")
            yield Task(tasks.square, 4, key="never")

        run = asyncio.ensure_future(scheduler.run(batch(), batch_id="b"))
        await pulled.wait()
        scheduler.cancel("b")
        summary = await run  # at once: the run does not wait for the source's next item
        release.set()
        assert [r.key for r in summary.results] == ["first"]  # never pulled, "late" runs if the batch resumes


# -- 4. signals and orphans -----------------------------------------------------------------

def _start_orchestrator(method: str) -> tuple[subprocess.Popen[str], list[int]]:
    process = subprocess.Popen([sys.executable, "-m", "tests.orchestrator", "--start-method", method], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    pids: list[int] = json.loads(process.stdout.readline())
    assert len(pids) == 2
    return process, pids


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_end_the_orchestrator_and_its_workers(signum: int) -> None:
    process, pids = _start_orchestrator("forkserver")
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=10)
    assert process.returncode == -signum, stderr  # ended by the signal, after cleaning up
    assert "KeyboardInterrupt" in stderr or signum == signal.SIGTERM
    assert all(wait_gone(pid) for pid in pids)


ENTERED_IN_A_TASK_THAT_ENDED = """
import asyncio, json, os, signal
from asyncsched import Scheduler, Task
from tests import tasks

async def main():
    scheduler = Scheduler(workers=2)
    async def setup():  # as an async fixture or a startup hook does
        await scheduler.__aenter__()
    await asyncio.create_task(setup())
    await scheduler.run([Task(tasks.square, 2)])
    print(json.dumps(scheduler.backend.pool.pids), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.Event().wait()  # no __aexit__ comes: the handler must end it

if __name__ == "__main__":
    asyncio.run(main())
"""


def test_sigterm_ends_a_scheduler_entered_in_a_task_that_has_ended() -> None:
    ended = subprocess.run([sys.executable, "-c", ENTERED_IN_A_TASK_THAT_ENDED], cwd=ROOT, capture_output=True,
                           text=True, timeout=30)  # it ran on, the SIGTERM lost on a task that was done
    assert ended.returncode == -signal.SIGTERM, ended.stderr
    assert all(wait_gone(pid) for pid in json.loads(ended.stdout))


@pytest.mark.parametrize("method", START_METHODS)
def test_workers_die_with_a_sigkilled_orchestrator(method: str) -> None:
    process, pids = _start_orchestrator(method)
    process.kill()
    process.communicate(timeout=10)
    assert all(wait_gone(pid) for pid in pids)


# -- 5. a task's own children ---------------------------------------------------------------

@pytest.mark.parametrize("apart", [None, "session", "group"])
async def test_a_timed_out_task_takes_its_children_with_it(apart: str | None, tmp_path: Path) -> None:
    pidfile = os.fspath(tmp_path / "child.pid")
    async with Scheduler(workers=1) as scheduler:
        summary = await scheduler.run([Task(faults.spawn_child_and_hang, pidfile, apart, timeout=1.0)])
    assert summary.results[0].status is Status.TIMED_OUT
    child = int(await asyncio.to_thread(Path(pidfile).read_text))
    assert await asyncio.to_thread(wait_gone, child)


async def test_a_timed_out_task_forking_as_it_is_killed_leaves_no_child(tmp_path: Path) -> None:
    log = tmp_path / "pids"
    async with Scheduler(workers=1) as scheduler:
        summary = await scheduler.run([Task(faults.fork_sessions_until_killed, os.fspath(log), timeout=0.5)])
    assert summary.results[0].status is Status.TIMED_OUT
    pids = [int(pid) for pid in (await asyncio.to_thread(log.read_text)).split()]
    assert len(pids) > 10  # (it forked while it ran)
    left = [pid for pid in pids if not await asyncio.to_thread(wait_gone, pid, 2.0)]
    assert not left


@pytest.mark.parametrize("apart", [None, "session"])
async def test_a_cancelled_task_takes_its_children_with_it(apart: str | None) -> None:
    async with Scheduler(workers=1) as scheduler:
        reports = scheduler.events(kinds=[TaskReported])
        running = asyncio.ensure_future(scheduler.run([Task(faults.spawn_child_and_hang, None, apart)], batch_id="b"))
        child = int((await anext(aiter(reports))).message or "")
        scheduler.cancel("b")
        summary = await running
    assert summary.results[0].status is Status.CANCELLED
    assert await asyncio.to_thread(wait_gone, child)


@pytest.mark.parametrize("round_", range(5))  # whether the pool sees the server dead, or refusing, is a race
async def test_a_pool_whose_fork_server_died_starts_workers_from_a_new_one(round_: int) -> None:
    async with Scheduler(workers=1, mp_context="forkserver") as scheduler:
        first = await scheduler.run([Task(faults.kill_the_fork_server)])
        assert first.results[0].status is Status.CRASHED
        summary = await scheduler.run([Task(tasks.square, i) for i in range(4)])
    assert [r.value for r in summary.results] == [0, 1, 4, 9], summary.results[0].error  # not a broken pool


@pytest.mark.parametrize("error", [BrokenPipeError(errno.EPIPE, "Broken pipe"),
                                   ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")])
async def test_a_fork_server_that_breaks_a_start_as_it_dies_is_no_short_pool(monkeypatch: pytest.MonkeyPatch,
                                                                              error: OSError) -> None:
    """A fork server that dies with its process group (SIGTERM to a shell's job, say) can break the connection
    of a start in flight: that is the server's death, as a refused start is, not a pool short of a worker."""
    failed: list[OSError] = []
    spawn = ProcessPool._spawn

    def broken_once(self: ProcessPool) -> None:
        if not failed:
            failed.append(error)
            raise error
        spawn(self)

    async with ProcessPool(2, mp_context="forkserver") as pool:
        await asyncio.gather(*(pool.call(tasks.square, (i,)) for i in range(4)))
        monkeypatch.setattr(ProcessPool, "_spawn", broken_once)
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            assert (await pool.call(faults.hang, (), timeout=0.2)).status is Status.TIMED_OUT  # its replacement fails
            assert (await pool.call(tasks.square, (3,))).value == 9
    assert failed and not [str(w.message) for w in warned]


@pytest.mark.parametrize("round_", range(3))
async def test_a_pool_whose_fork_server_dies_as_its_workers_start_starts_them_from_a_new_one(round_: int) -> None:
    import multiprocessing.forkserver

    multiprocessing.forkserver.ensure_running()
    async with ProcessPool(4, mp_context="forkserver") as pool:
        calls = [asyncio.ensure_future(pool.call(tasks.square, (i,))) for i in range(8)]  # the workers start
        os.kill(multiprocessing.forkserver._forkserver._forkserver_pid, signal.SIGKILL)  # type: ignore[attr-defined]
        outcomes = await asyncio.gather(*calls)
        after = await pool.call(tasks.square, (9,))
    for i, outcome in enumerate(outcomes):  # a call a worker had begun dies with it
        assert outcome.value == i * i or "exited with code 255" in (outcome.error or ""), outcome
    assert after.value == 81  # not a pool broken by "3 workers in a row exited with code 255 before they were ready"


async def test_a_task_that_closes_its_workers_pipes_crashes_alone_and_says_so(
        capfd: pytest.CaptureFixture[str]) -> None:
    async with Scheduler(workers=1, mp_context="fork") as scheduler:  # the worker writes to this test's stderr
        summary = await scheduler.run([Task(faults.close_every_descriptor, key="closes"), Task(tasks.square, 3)])
    closes, fine = summary.results
    assert closes.status is Status.CRASHED and f"worker {closes.pid} exited with code 1" == closes.error
    assert fine.value == 9
    err = capfd.readouterr().err
    assert f"asyncsched worker {closes.pid}: its pipe to the orchestrator is gone" in err and "Traceback" not in err


async def test_a_task_that_moved_its_worker_to_another_process_group_is_killed_all_the_same() -> None:
    async with Scheduler(workers=1) as scheduler:
        summary = await scheduler.run([Task(faults.leave_the_workers_group_and_hang, timeout=0.5),
                                       Task(tasks.square, 3)])
        moved, fine = summary.results
        assert moved.status is Status.TIMED_OUT and moved.pid is not None
        assert wait_gone(moved.pid) and fine.value == 9  # not left running, with a closing pool waiting for it


# -- 6. bad input ---------------------------------------------------------------------------

async def test_unpicklable_argument_result_and_exception_fail_alone(scheduler: Scheduler) -> None:
    lock = __import__("threading").Lock()
    summary = await scheduler.run([
        Task(tasks.identity, lock, key="arg"),
        Task(faults.return_unpicklable, key="result"),
        Task(faults.raise_unpicklable, key="exc"),
        Task(faults.raise_unrebuildable, key="rebuild"),
        Task(tasks.square, 5, key="fine"),
    ])
    arg, result, exc, rebuild, fine = summary.results
    assert arg.status is Status.FAILED and "argument 0 (lock) could not be pickled" in (arg.error or "")
    assert result.status is Status.FAILED and "result of type lock could not be pickled" in (result.error or "")
    assert exc.status is Status.FAILED and exc.error == "ValueError: carries a lock" and exc.exception is None
    assert rebuild.status is Status.FAILED and rebuild.error == "tests.faults.UnrebuildableError: 1/2"
    assert rebuild.error_type == "tests.faults.UnrebuildableError"
    assert fine.value == 25


@pytest.mark.parametrize("where", ["pool", "threads", "processes"])
async def test_an_exception_with_notes_or_a_hostile_getattr_and_a_result_whose_reducer_exits_fail_alone(
        where: str) -> None:
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    forkserver = multiprocessing.get_context("forkserver")
    options: dict[str, Any] = {"pool": {"workers": 1},
                               "threads": {"backend": ExecutorBackend(ThreadPoolExecutor(1))},
                               "processes": {"backend": ExecutorBackend(ProcessPoolExecutor(1, mp_context=forkserver))}}
    async with Scheduler(**options[where]) as scheduler:
        summary = await scheduler.run([Task(faults.raise_with_a_note, "abc", key="noted"),
                                       Task(faults.raise_payload_error, key="payload"),
                                       Task(faults.return_exiting_on_pickle, key="exits"),
                                       Task(tasks.square, 3, key="fine")])
    noted, payload, exits, fine = summary.results
    assert (noted.status, noted.error) == (Status.FAILED, "ValueError: invalid literal for int() with base 10: 'abc'")
    assert "while parsing row 'abc'" in (noted.traceback or "")  # the note is in the traceback, not the error
    assert (payload.status, payload.error) == (Status.FAILED, "tests.faults.PayloadError: quota exceeded")
    assert "raise_payload_error" in (payload.traceback or "")
    if where != "threads":  # a thread pool hands the value back as it is: nothing is pickled
        assert exits.status is Status.FAILED and "SystemExit: this handle cannot be pickled" in (exits.error or "")
    assert fine.value == 9
    if where == "pool":
        assert "the result of type ExitsOnPickle could not be pickled" in (exits.error or "")
        pool: ProcessPool = scheduler.backend.pool  # type: ignore[attr-defined]
        assert (pool.statistics().crashed, pool.statistics().killed) == (0, 0)  # each failed alone: no worker lost


async def test_a_container_result_that_does_not_pickle_or_unpickle_fails_alone(scheduler: Scheduler) -> None:
    pool: ProcessPool = scheduler.backend.pool  # type: ignore[attr-defined]
    summary = await scheduler.run([Task(faults.return_unpicklable_in_a_list, key="lock"),
                                   Task(faults.return_unloadable_in_a_list, key="unloadable"),
                                   Task(tasks.identity, [1, (2, 3)], key="fine")])
    lock, unloadable, fine = summary.results
    assert lock.status is Status.FAILED and "result of type list could not be pickled" in (lock.error or "")
    assert unloadable.status is Status.FAILED
    assert "could not be unpickled here: RuntimeError" in (unloadable.error or "")
    assert fine.value == [1, (2, 3)]
    assert (pool.statistics().crashed, pool.statistics().killed) == (0, 0)  # each failed alone: no worker lost


async def test_a_result_that_cannot_be_unpickled_here_fails_alone(scheduler: Scheduler) -> None:
    batch = [Task(tasks.square, i) for i in range(30)]
    batch.insert(15, Task(faults.return_unloadable, key="unloadable"))
    summary = await scheduler.run(batch)
    bad = summary.results[15]
    assert bad.status is Status.FAILED and bad.error_type == "RuntimeError"
    assert "could not be unpickled here: RuntimeError: this value cannot be rebuilt here" in (bad.error or "")
    rest = summary.results[:15] + summary.results[16:]
    assert [r.value for r in rest] == [i * i for i in range(30)] and summary.completed == 30


async def test_a_task_killed_or_lost_with_its_worker_has_the_times_it_ran(scheduler: Scheduler) -> None:
    summary = await scheduler.run([Task(faults.hang, key="hang", timeout=0.2), Task(faults.exit_hard, key="exit")])
    hung, exited = summary.results
    assert (hung.status, exited.status) == (Status.TIMED_OUT, Status.CRASHED)
    for result in (hung, exited):
        assert result.started_at is not None and result.finished_at is not None
        assert result.started_at <= result.finished_at
    assert hung.duration is not None and hung.duration > 0.15  # about its timeout (the clocks differ a little)


async def test_a_forked_child_of_a_task_reports_nothing(scheduler: Scheduler) -> None:
    events = scheduler.events()
    summary = await scheduler.run([Task(faults.fork_and_report)])
    await scheduler.aclose()
    messages = [e.message async for e in events if isinstance(e, TaskReported)]
    assert summary.completed == 1 and messages == ["from the task"]


async def test_a_report_from_a_signal_handler_that_interrupts_a_report_is_sent_after_it(
        scheduler: Scheduler) -> None:
    events = scheduler.events(kinds=[TaskReported], buffer=100_000)
    summary = await scheduler.run([Task(faults.report_from_a_signal_handler, 20_000, timeout=60)])
    await scheduler.aclose()
    messages = collections.Counter([e.message async for e in events])
    (result,) = summary.results
    assert result.status is Status.COMPLETED, result.error
    assert messages["from the task"] == 20_000 and 0 < messages["from the handler"] <= result.value


async def test_a_forked_child_that_leaves_the_task_with_sys_exit_ends_there(scheduler: Scheduler) -> None:
    summary = await scheduler.run([Task(faults.fork_and_leave_with_sys_exit)] + [Task(tasks.square, i)
                                                                                 for i in range(20)])
    forked = summary.results[0]
    assert forked.status is Status.COMPLETED, forked.error
    assert forked.value == ("the task's own value", 7)
    assert [r.value for r in summary.results[1:]] == [i * i for i in range(20)]
    assert {r.pid for r in summary.results} <= set(scheduler._backend.pool.pids)  # type: ignore[attr-defined]


async def test_report_data_that_cannot_be_unpickled_here_spoils_only_that_report(scheduler: Scheduler) -> None:
    events = scheduler.events()
    summary = await scheduler.run([Task(faults.report_unloadable, key="r"), Task(tasks.square, 3, key="s")])
    await scheduler.aclose()
    reported = [e async for e in events if isinstance(e, TaskReported)]
    assert [r.value for r in summary.results] == [1, 9]
    assert len(reported) == 1 and reported[0].message == "here"
    assert "could not be unpickled here: RuntimeError: this value cannot be rebuilt here" in str(reported[0].data)


@pytest.mark.parametrize(("kind", "raised"), [("exit", "SystemExit: a reducer called sys.exit()"),
                                              ("interrupt", "KeyboardInterrupt")])
async def test_a_result_exception_or_report_whose_unpickling_here_raises_a_base_exception_spoils_only_itself(
        scheduler: Scheduler, kind: str, raised: str) -> None:
    events = scheduler.events(kinds=[TaskReported])
    summary = await scheduler.run([Task(faults.return_raising_on_load, kind, key="result"),
                                   Task(faults.raise_raising_on_load_in_the_parent, kind, key="exception"),
                                   Task(faults.report_raising_on_load, kind, key="report"),
                                   Task(tasks.square, 3, key="fine")])
    await scheduler.aclose()
    reported = [e async for e in events]
    result, exception, report, fine = summary.results
    assert result.status is Status.FAILED and result.error == f"the result could not be unpickled here: {raised}"
    assert exception.status is Status.FAILED and exception.exception is None  # told as text only
    assert exception.error == f"tests.faults.RaisesOnLoadElsewhereError: {kind}"
    assert (report.value, fine.value) == (1, 9)
    assert [(r.key, r.message) for r in reported] == [("report", "here")]
    assert reported[0].data == {"error": f"the data of this report could not be unpickled here: {raised}"}
    pool: ProcessPool = scheduler.backend.pool  # type: ignore[attr-defined]
    assert (pool.statistics().crashed, pool.statistics().killed) == (0, 0)


@pytest.mark.parametrize("kind", ["exit", "interrupt"])
async def test_an_exception_whose_unpickling_raises_a_base_exception_travels_as_text(scheduler: Scheduler,
                                                                                    kind: str) -> None:
    summary = await scheduler.run([Task(faults.raise_raising_on_load, kind, key="raised"),
                                   Task(faults.return_raising_unloadable_error_on_load, kind, key="result"),
                                   Task(tasks.square, 3, key="fine")])
    raised, result, fine = summary.results
    assert raised.status is Status.FAILED and raised.error == "ValueError: cannot be rebuilt"  # checked in the worker
    assert raised.exception is None and "ValueError: cannot be rebuilt" in (raised.traceback or "")
    assert result.status is Status.FAILED  # and the error its unpickling raised here, described here
    assert result.error == "the result could not be unpickled here: ValueError: cannot be rebuilt"
    assert fine.value == 9
    pool: ProcessPool = scheduler.backend.pool  # type: ignore[attr-defined]
    assert (pool.statistics().crashed, pool.statistics().killed) == (0, 0)


async def test_unimportable_function_fails_in_the_worker_with_a_clear_error(scheduler: Scheduler) -> None:
    module = types.ModuleType("made_up_in_the_parent")  # importable here only: workers cannot load it
    exec("def here_only():\n    return 1\n", module.__dict__)
    sys.modules[module.__name__] = module
    try:
        summary = await scheduler.run([Task(functools.partial(tasks.add, 1), 2),
                                       Task(module.here_only, key="local")])
    finally:
        del sys.modules[module.__name__]
    assert summary.results[0].value == 3
    assert summary.results[1].status is Status.FAILED
    assert "could not be unpickled in the worker" in (summary.results[1].error or "")


# -- 7. limits per worker -------------------------------------------------------------------

async def test_max_tasks_per_child_recycles_workers() -> None:
    async with Scheduler(workers=1, max_tasks_per_child=3) as scheduler:
        summary = await scheduler.run([Task(tasks.whoami) for _ in range(9)])
    pids = [r.value for r in summary.results]
    assert len(set(pids)) == 3 and all(pids.count(pid) == 3 for pid in set(pids))


async def test_max_memory_per_child_kills_the_hungry_task() -> None:
    async with Scheduler(workers=2, max_memory_per_child="200MB") as scheduler:
        summary = await scheduler.run([Task(faults.allocate_and_hold, 400 * 2**20, key="hog"),
                                       Task(tasks.square, 6, key="fine")])
    hog, fine = summary.results
    assert hog.status is Status.CRASHED
    assert "max_memory_per_child" in (hog.error or "") and hog.pid is not None
    assert wait_gone(hog.pid)
    assert fine.value == 36


async def test_max_memory_per_child_under_fork_counts_only_what_the_worker_adds() -> None:
    parent = bytearray(300 * 2**20)  # a worker forked from here has these pages in its RSS too
    for i in range(0, len(parent), 4096):
        parent[i] = 1
    async with Scheduler(workers=2, mp_context="fork", max_memory_per_child="200MB") as scheduler:
        summary = await scheduler.run([Task(faults.allocate_and_hold, 400 * 2**20, key="hog"),
                                       Task(tasks.square, 6, key="fine")])
    del parent
    hog, fine = summary.results
    assert fine.value == 36  # not a pool broken by "a worker takes 300 MiB before it runs anything"
    assert hog.status is Status.CRASHED and "max_memory_per_child" in (hog.error or "") and hog.pid is not None
    assert wait_gone(hog.pid)


async def test_executor_backend_reports_timeouts_honestly() -> None:
    from concurrent.futures import ThreadPoolExecutor

    backend = ExecutorBackend(ThreadPoolExecutor(2))
    async with Scheduler(backend=backend) as scheduler:
        summary = await scheduler.run([Task(tasks.reporting, 3), Task(faults.boom),
                                       Task(tasks.sleep_then, 0.5, None, timeout=0.05)])
    done, failed, slow = summary.results
    assert done.value == 3 and done.message == "step 2" and done.progress == 1.0
    assert isinstance(failed.exception, ValueError)
    assert slow.status is Status.TIMED_OUT and "cannot stop" in (slow.error or "")


async def test_executor_backend_counts_a_timeout_from_when_the_attempt_starts() -> None:
    from concurrent.futures import ThreadPoolExecutor

    backend = ExecutorBackend(ThreadPoolExecutor(1))
    async with Scheduler(backend=backend) as scheduler:
        summary = await scheduler.run([Task(tasks.sleep_then, 1.0, "first"), Task(tasks.identity, "second",
                                                                                 timeout=0.5)])
    assert [(r.status, r.value) for r in summary.results] == [(Status.COMPLETED, "first"),
                                                               (Status.COMPLETED, "second")]


async def test_executor_backend_records_a_broken_executor_as_crashed() -> None:
    from concurrent.futures import ProcessPoolExecutor

    backend = ExecutorBackend(ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("forkserver")))
    async with Scheduler(backend=backend) as scheduler:
        summary = await scheduler.run([Task(faults.exit_hard)] + [Task(tasks.identity, i) for i in range(3)])
    assert [(r.status, r.error_type) for r in summary.results] == [(Status.CRASHED, "BrokenProcessPool")] * 4


async def test_executor_backend_records_a_call_its_executor_cancelled_as_crashed() -> None:
    from concurrent.futures import ThreadPoolExecutor

    executor, gate = ThreadPoolExecutor(1), threading.Event()
    async with Scheduler(backend=ExecutorBackend(executor)) as scheduler:
        starts = scheduler.events(kinds=[TaskStarted])
        run = asyncio.ensure_future(scheduler.run([Task(gate.wait, key="hangs", timeout=0.2),
                                                   Task(tasks.identity, 1, key="waits")]))
        async for started in starts:
            if started.key == "waits":  # handed over once "hangs" timed out: it waits in the executor's queue
                break
        executor.shutdown(wait=False, cancel_futures=True)
        summary = await run
        gate.set()
    assert [(r.key, r.status) for r in summary.results] == [("hangs", Status.TIMED_OUT), ("waits", Status.CRASHED)]
    assert "shut down" in (summary.results[1].error or "")


async def test_executor_backend_does_not_retry_an_argument_that_does_not_pickle() -> None:
    from concurrent.futures import ProcessPoolExecutor

    backend = ExecutorBackend(ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("forkserver")))
    async with Scheduler(backend=backend, retries=2) as scheduler:
        summary = await scheduler.run([Task(tasks.identity, threading.Lock()), Task(tasks.identity, 1)])
    refused, fine = summary.results
    assert (refused.status, refused.attempts) == (Status.FAILED, 1)
    assert "pickle" in (refused.error or "") and fine.value == 1


def test_psutil_is_the_memory_probe() -> None:
    assert psutil.Process().memory_info().rss > 0


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_an_exception_class_of_the_main_script_is_named_as_the_script_knows_it(tmp_path: Path, method: str) -> None:
    script = tmp_path / "script.py"
    script.write_text(
        "import asyncio\n"
        "from asyncsched import Scheduler, Task\n"
        "class MyError(Exception):\n"
        "    pass\n"
        "def fail():\n"
        "    raise MyError('bad')\n"
        "async def main():\n"
        f"    async with Scheduler(workers=1, mp_context={method!r}) as scheduler:\n"
        "        result = (await scheduler.run([Task(fail)])).results[0]\n"
        "        print(result.error_type, '|', result.error, '|', type(result.exception).__name__)\n"
        "if __name__ == '__main__':\n"
        "    asyncio.run(main())\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "__main__.MyError | __main__.MyError: bad | MyError"  # not __mp_main__


_KILLED_ORCHESTRATORS = {
    # its workers find the pipe broken as they send a report or a result
    "running": (
        "import asyncio, time\n"
        "from asyncsched import Scheduler, Task, report\n"
        "def busy(i):\n"
        "    for _ in range(20):\n"
        "        report(message='still here')\n"
        "        time.sleep(0.005)\n"
        "    return i\n"
        "async def main():\n"
        "    async with Scheduler(workers=2) as scheduler:\n"
        "        async for result in scheduler.stream(Task(busy, i) for i in range(10**6)):\n"
        "            if result.key == '4':\n"
        "                print('running', flush=True)\n"
        "if __name__ == '__main__':\n"
        "    asyncio.run(main())\n"
    ),
    # its workers find the pipe broken as they say they are ready
    "starting": (
        "import asyncio, os, select\n"
        "from asyncsched import Scheduler\n"
        "if __name__ == '__mp_main__':  # a worker starting up imports this file: it waits for the orchestrator's end\n"
        "    select.select([os.pidfd_open(int(os.environ['ORCHESTRATOR']))], [], [], 30)\n"
        "async def main():\n"
        "    async with Scheduler(workers=2):\n"
        "        print('starting', flush=True)\n"
        "        await asyncio.Event().wait()\n"
        "if __name__ == '__main__':\n"
        "    os.environ['ORCHESTRATOR'] = str(os.getpid())\n"
        "    asyncio.run(main())\n"
    ),
}


@pytest.mark.parametrize("when", list(_KILLED_ORCHESTRATORS))
def test_workers_of_a_killed_orchestrator_end_quietly(tmp_path: Path, when: str) -> None:
    script = tmp_path / "script.py"
    script.write_text(_KILLED_ORCHESTRATORS[when])
    orchestrator = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
    assert orchestrator.stdout is not None and orchestrator.stderr is not None
    try:
        assert orchestrator.stdout.readline() == f"{when}\n"
        orchestrator.kill()
        errors = orchestrator.stderr.read()  # to its end: every worker has let go of it
    finally:
        orchestrator.kill()
        orchestrator.wait()
        orchestrator.stdout.close()
        orchestrator.stderr.close()
    assert "Traceback" not in errors, errors


@pytest.mark.parametrize("backend", ["pool", "executor"])
def test_a_sigterm_to_a_process_forked_after_the_handler_ends_it_alone(tmp_path: Path, backend: str) -> None:
    # Forked children shared the loop's wakeup fd (Python 3.11): a SIGTERM sent to one ended the orchestrator.
    script = tmp_path / "script.py"
    script.write_text(
        "import asyncio, concurrent.futures, multiprocessing, os, signal, sys\n"
        "from asyncsched import ExecutorBackend, Scheduler, Task\n"
        "def pid():\n"
        "    return os.getpid()\n"
        "def end_by_sigterm():\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return 'lived on'\n"
        "async def main():\n"
        "    if sys.argv[1] == 'pool':  # each call on a new worker, forked after the handler was installed\n"
        "        scheduler = Scheduler(workers=1, mp_context='fork', max_tasks_per_child=1)\n"
        "    else:\n"
        "        executor = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('fork'))\n"
        "        scheduler = Scheduler(backend=ExecutorBackend(executor))\n"
        "    async with scheduler:\n"
        "        await scheduler.run([Task(pid)])\n"
        "        result = (await scheduler.run([Task(end_by_sigterm)])).results[0]\n"
        "        print(result.status, flush=True)\n"
        "if __name__ == '__main__':\n"
        "    asyncio.run(main())\n"
    )
    out = subprocess.run([sys.executable, str(script), backend], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout.strip()) == (0, "crashed"), out.stderr
