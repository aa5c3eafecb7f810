"""One acceptance scenario, every backend: the local pool, Dask distributed and Celery run the same Scheduler code."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from asyncsched import Scheduler, Status, Task, TaskFailedError, TaskFinished, TaskReported, TaskStarted
from asyncsched.backends import CeleryBackend, DaskBackend

from . import faults, tasks
from .util import wait_gone

MakeScheduler = Callable[..., Scheduler]

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=["local", "dask", "celery"])
def make_scheduler(request: pytest.FixtureRequest) -> MakeScheduler:
    """Builds a Scheduler on one backend, each with two worker processes; the clusters are shared by the session."""
    if request.param == "local":
        return lambda **options: Scheduler(workers=2, **options)
    if request.param == "dask":
        address = request.getfixturevalue("dask_address")
        return lambda **options: Scheduler(backend=DaskBackend(address, capacity=2, kill_on_timeout=True), **options)
    worker = request.getfixturevalue("celery_worker")
    return lambda **options: Scheduler(backend=CeleryBackend(worker.broker, worker.backend, capacity=2), **options)


def test_the_backends_are_imported_lazily() -> None:
    code = ("import sys, asyncsched.backends as b; assert 'distributed' not in sys.modules and 'celery' not in "
            "sys.modules; b.DaskBackend; assert 'distributed' in sys.modules and 'celery' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def rebuilds_exceptions(scheduler: Scheduler) -> bool:
    """Celery carries JSON only: a failure keeps its type name, text and traceback, not the exception object."""
    return not isinstance(scheduler.backend, CeleryBackend)


async def test_results_come_back_in_submission_order(make_scheduler: MakeScheduler) -> None:
    async with make_scheduler() as scheduler:
        summary = await scheduler.run(
            Task(tasks.sleep_then, 0.3 if i == 0 else 0.0, i, key=f"job-{i}") for i in range(8))
    assert [r.key for r in summary.results] == [f"job-{i}" for i in range(8)]
    assert [r.value for r in summary.results] == list(range(8))
    assert summary.completed == 8
    first = summary.results[0]
    assert first.pid and first.attempts == 1
    assert first.duration is not None and first.duration >= 0.3


async def test_exceptions_keep_type_message_and_traceback(make_scheduler: MakeScheduler) -> None:
    async with make_scheduler() as scheduler:
        summary = await scheduler.run([Task(faults.boom, "bad input 7"), Task(faults.raise_custom)])
    failed, custom = summary.results
    assert failed.status is Status.FAILED and custom.status is Status.FAILED
    assert failed.error == "ValueError: bad input 7" and failed.error_type == "ValueError"
    assert failed.traceback is not None and "in boom" in failed.traceback
    assert custom.error_type == "tests.faults.CustomError"
    with pytest.raises(TaskFailedError, match="bad input 7"):
        failed.unwrap()
    if rebuilds_exceptions(scheduler):
        assert isinstance(failed.exception, ValueError) and isinstance(custom.exception, faults.CustomError)


async def test_a_timeout_stops_the_task_and_the_rest_complete(make_scheduler: MakeScheduler) -> None:
    async with make_scheduler(timeout=60) as scheduler:
        summary = await scheduler.run([Task(faults.hang, key="stuck", timeout=1)]
                                      + [Task(tasks.square, i) for i in range(6)])
    stuck = summary.results[0]
    assert stuck.status is Status.TIMED_OUT
    assert "timed out after 1s" in (stuck.error or "")
    assert [r.value for r in summary.results[1:]] == [i * i for i in range(6)]
    assert stuck.pid is not None and wait_gone(stuck.pid)  # killed, not left running


async def test_a_crash_is_recorded_and_the_backend_recovers(make_scheduler: MakeScheduler) -> None:
    async with make_scheduler() as scheduler:
        crashed = (await scheduler.run([Task(faults.exit_hard, key="dies")])).results[0]
        after = await scheduler.run([Task(tasks.square, i) for i in range(6)])
    assert crashed.status is Status.CRASHED, crashed
    assert [r.value for r in after.results] == [i * i for i in range(6)]


async def test_report_reaches_events(make_scheduler: MakeScheduler) -> None:
    async with make_scheduler() as scheduler:
        events = scheduler.events(batch_id="b")
        summary = await scheduler.run([Task(tasks.reporting, i, key=f"k{i}") for i in range(4)], batch_id="b")
    received = [event async for event in events]  # the stream ends once the scheduler is closed
    assert summary.completed == 4
    for key in ("k0", "k1", "k2", "k3"):
        mine = [e for e in received if e.key == key]
        kinds: list[Any] = [type(e) for e in mine]
        assert kinds == [TaskStarted, TaskReported, TaskReported, TaskReported, TaskFinished], kinds
        assert [e.progress for e in mine[1:4]] == pytest.approx([1 / 3, 2 / 3, 1.0])
        assert mine[1].message == "step 0" and mine[1].data == {"step": 0}
        assert all(e.pid == mine[0].pid for e in mine)
        assert mine[-1].status is Status.COMPLETED


async def test_results_persist_and_a_batch_resumes(make_scheduler: MakeScheduler, tmp_path: Path) -> None:
    db = os.fspath(tmp_path / "results.db")
    async with make_scheduler(store=db) as scheduler:
        first = await scheduler.run([Task(tasks.identity, "a", key="a"), Task(tasks.identity, "b", key="b")],
                                    batch_id="nightly")
    # A new scheduler on the same file: a and b have results, so they do not run again (a would fail now).
    async with make_scheduler(store=db) as scheduler:
        second = await scheduler.run([Task(faults.boom, key="a"), Task(tasks.identity, "b", key="b"),
                                      Task(tasks.identity, "c", key="c"), Task(tasks.square, 4, key="d")],
                                     batch_id="nightly", resume=True)
        stored = await scheduler.results(batch_id="nightly")
        stats = await scheduler.stats("nightly")
    assert [(r.key, r.value) for r in second.results] == [("a", "a"), ("b", "b"), ("c", "c"), ("d", 16)]
    assert [(r.key, r.status, r.value, r.pid) for r in second.results[:2]] == [
        (r.key, r.status, r.value, r.pid) for r in first.results]
    assert sorted(r.key for r in stored) == ["a", "b", "c", "d"]
    assert stats.completed == 4 and stats.total == 4
