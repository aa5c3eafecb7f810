"""What is particular to Dask: an existing client, timeouts without a kill, lost workers, cancellation."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from distributed import Client

from asyncsched import ConfigurationError, Scheduler, Status, Task, TaskReported, TaskStarted
from asyncsched.backends import DaskBackend

from . import faults, tasks
from .util import wait_gone

pytestmark = pytest.mark.timeout(120)


async def next_start(events: object) -> TaskStarted:
    async for event in events:  # type: ignore[attr-defined]
        if isinstance(event, TaskStarted):
            return event
    raise AssertionError("the events stream ended before a task started")


def test_needs_an_address_or_a_client() -> None:
    with pytest.raises(ConfigurationError, match="address= or client="):
        DaskBackend()
    with pytest.raises(ConfigurationError, match="capacity"):
        DaskBackend("tcp://127.0.0.1:1", capacity=0)


async def test_an_existing_client_is_used_and_left_open(dask_address: str) -> None:
    async with await Client(dask_address, asynchronous=True) as client:
        async with Scheduler(backend=DaskBackend(client=client, capacity=2)) as scheduler:
            summary = await scheduler.run([Task(tasks.square, i) for i in range(10)])
        assert [r.value for r in summary.results] == [i * i for i in range(10)]
        assert client.status == "running"
        assert await client.submit(tasks.square, 3) == 9


async def test_without_kill_a_timed_out_task_is_recorded_at_once_and_runs_on(dask_address: str) -> None:
    async with Scheduler(backend=DaskBackend(dask_address, capacity=2)) as scheduler:
        events = scheduler.events()
        summary = await scheduler.run([Task(tasks.sleep_then, 2.0, "late", timeout=0.3)])
    result = summary.results[0]
    assert result.status is Status.TIMED_OUT
    assert "runs on in the background" in (result.error or "")
    started, finished = [e async for e in events]
    assert finished.timestamp - started.timestamp < 1.5  # long before the task ends
    assert result.pid is not None and psutil.pid_exists(result.pid)  # its worker was left alone


async def test_restarting_a_worker_takes_the_tasks_children_with_it(dask_address: str, tmp_path: Path) -> None:
    pidfile = os.fspath(tmp_path / "child.pid")
    async with Scheduler(backend=DaskBackend(dask_address, capacity=2, kill_on_timeout=True)) as scheduler:
        summary = await scheduler.run([Task(faults.spawn_child_and_hang, pidfile, timeout=1.0)])
    result = summary.results[0]
    assert result.status is Status.TIMED_OUT
    child = int(await asyncio.to_thread(Path(pidfile).read_text))
    assert result.pid is not None and wait_gone(result.pid, timeout=10)
    assert wait_gone(child, timeout=3)  # not left running, orphaned, on the cluster's machine


async def test_a_result_that_cannot_be_unpickled_here_fails_alone(dask_address: str) -> None:
    async with Scheduler(backend=DaskBackend(dask_address, capacity=2)) as scheduler:
        summary = await scheduler.run([Task(faults.return_unloadable), Task(tasks.square, 3)])
    bad, fine = summary.results
    assert (bad.status, bad.error_type) == (Status.FAILED, "RuntimeError")
    assert "could not be unpickled here: RuntimeError: this value cannot be rebuilt here" in (bad.error or "")
    assert fine.value == 9


async def test_a_report_whose_data_cannot_be_unpickled_here_still_arrives(dask_address: str) -> None:
    async with Scheduler(backend=DaskBackend(dask_address, capacity=2)) as scheduler:
        events = scheduler.events(kinds=[TaskReported])
        summary = await scheduler.run([Task(faults.report_unloadable)])
    reported = [e async for e in events]
    assert summary.results[0].value == 1
    assert len(reported) == 1 and reported[0].message == "here"  # as on the local pool: only the data is spoilt
    assert "could not be unpickled here: RuntimeError: this value cannot be rebuilt here" in str(reported[0].data)


async def test_a_lost_worker_task_is_rescheduled_by_dask(dask_address: str, gate: Callable[[], str]) -> None:
    release = gate()
    async with Scheduler(backend=DaskBackend(dask_address, capacity=2)) as scheduler:
        events = scheduler.events()
        running = asyncio.ensure_future(scheduler.run([Task(tasks.wait_for_file, release, "done")]))
        first = await next_start(events)
        assert first.pid is not None
        os.kill(first.pid, signal.SIGKILL)  # the worker process dies under the task
        second = await next_start(events)  # Dask runs it again on a worker that is alive
        assert second.pid != first.pid
        await asyncio.to_thread(Path(release).touch)
        summary = await running
    assert summary.results[0].value == "done" and summary.results[0].pid == second.pid


async def test_leaving_a_stream_cancels_its_dask_tasks(dask_address: str, gate: Callable[[], str]) -> None:
    release = gate()
    async with await Client(dask_address, asynchronous=True) as client:
        async with Scheduler(backend=DaskBackend(client=client, capacity=2)) as scheduler:
            batch = [Task(tasks.identity, "first")] + [Task(tasks.wait_for_file, release) for _ in range(4)]
            stream = scheduler.stream(batch)
            assert (await anext(stream)).value == "first"
            await stream.aclose()
            results = await scheduler.results()
        assert not client.futures  # the backend cancelled every Dask future before it closed
        await asyncio.to_thread(Path(release).touch)  # the tasks already running end
    assert [r.status for r in results].count(Status.CANCELLED) == 4 and len(results) == 5


async def test_a_worker_that_leaves_before_its_restart_is_ended_all_the_same() -> None:
    ended: list[list[str]] = []

    class LeftClient:  # the calls _restart makes, on a worker the scheduler no longer knows
        asynchronous = True

        async def cancel(self, futures: object) -> None: ...

        async def processing(self, workers: list[str]) -> dict[str, object]:
            raise KeyError(workers[0])

        async def run(self, function: object, *, workers: list[str], on_error: str) -> None:
            ended.append(workers)

    class Key:
        key = "a-key"

    backend = DaskBackend(client=LeftClient())  # type: ignore[arg-type]
    await backend._restart(Key(), "tcp://gone:1")  # type: ignore[arg-type]
    assert ended == [["tcp://gone:1"]]
