"""What is particular to Dask: an existing client, timeouts without a kill, lost workers, cancellation, a scheduler
that cannot be reached."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dask.config
import psutil
import pytest
from distributed import Client
from distributed.client import _get_global_client

from asyncsched import (
    BackendUnreachableError,
    ClosedError,
    ConfigurationError,
    Scheduler,
    Status,
    Task,
    TaskReported,
    TaskStarted,
)
from asyncsched.backends import DaskBackend, _dask
from asyncsched.backends._dask import DEFAULT_CONNECT_TIMEOUT, _last_failure

from . import faults, services, tasks
from .util import silent_server, wait_gone

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
    for bad in (0, -1, float("nan"), "5", True):
        with pytest.raises(ConfigurationError, match="connect_timeout"):
            DaskBackend("tcp://127.0.0.1:1", connect_timeout=bad)  # type: ignore[arg-type]
    assert DaskBackend("tcp://127.0.0.1:1").connect_timeout == DEFAULT_CONNECT_TIMEOUT <= 10  # not Dask's 30 s


async def test_an_existing_client_is_used_and_left_open(dask_address: str) -> None:
    async with await Client(dask_address, asynchronous=True) as client:
        async with Scheduler(backend=DaskBackend(client=client, capacity=2)) as scheduler:
            summary = await scheduler.run([Task(tasks.square, i) for i in range(10)])
        assert [r.value for r in summary.results] == [i * i for i in range(10)]
        assert client.status == "running"
        assert await client.submit(tasks.square, 3) == 9


async def test_a_closed_backend_leaves_no_events_on_the_dask_scheduler(dask_address: str) -> None:
    backend = DaskBackend(address=dask_address, capacity=2)
    async with Scheduler(backend=backend) as scheduler:
        summary = await scheduler.run([Task(tasks.reporting, i) for i in range(3)])
    assert summary.completed == 3
    async with await Client(dask_address, asynchronous=True) as client:
        assert await client.get_events(backend._topic) == ()  # they were kept for good: a leak per backend


async def test_after_the_dask_scheduler_restarts_at_its_address_reports_and_timeouts_still_come() -> None:
    from distributed import Scheduler as DaskScheduler
    from distributed import Worker

    port = services.free_port()
    address = f"tcp://127.0.0.1:{port}"
    first = await DaskScheduler(host="127.0.0.1", port=port, dashboard_address=":0")
    worker = await Worker(address, nthreads=1)
    second = None
    client = await Client(address, asynchronous=True)
    try:
        async with asyncio.timeout(60), Scheduler(backend=DaskBackend(client=client)) as scheduler:
            (before,) = (await scheduler.run([Task(tasks.reporting, 1)])).results
            assert before.message == "step 2"
            await worker.close()
            await first.close()  # as a supervisor restarts it, at the same address
            second = await DaskScheduler(host="127.0.0.1", port=port, dashboard_address=":0")
            worker = await Worker(address, nthreads=1)
            await client.wait_for_workers(1)
            assert client.scheduler_info().get("id") == second.id  # the client is back, on the new scheduler
            summary = await scheduler.run([Task(tasks.reporting, 2, key="after"), Task(faults.hang, 2, key="hang",
                                                                                        timeout=0.5)])
            after, hang = summary.results
            assert after.message == "step 2"  # its reports came: Dask's client does not subscribe again by itself
            assert hang.status is Status.TIMED_OUT
    finally:
        await client.close()
        await worker.close()
        for scheduler_ in (first, second):
            if scheduler_ is not None:
                await scheduler_.close()


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


async def test_a_task_that_holds_the_gil_past_its_timeout_is_recorded_timed_out(dask_address: str) -> None:
    # its worker's loop cannot send the start (which starts the timeout) until the task lets go of the GIL
    async with Scheduler(backend=DaskBackend(dask_address, capacity=2)) as scheduler:
        summary = await scheduler.run([Task(faults.hold_the_gil, 2, timeout=0.5)])
    result = summary.results[0]
    assert result.status is Status.TIMED_OUT, result
    assert (result.error or "").startswith("timed out after 0.5s")


async def test_restarting_a_worker_takes_the_tasks_children_with_it(dask_address: str, tmp_path: Path) -> None:
    pidfile = os.fspath(tmp_path / "child.pid")
    async with Scheduler(backend=DaskBackend(dask_address, capacity=2, kill_on_timeout=True)) as scheduler:
        summary = await scheduler.run([Task(faults.spawn_child_and_hang, pidfile, timeout=1.0)])
    result = summary.results[0]
    assert result.status is Status.TIMED_OUT
    child = int(await asyncio.to_thread(Path(pidfile).read_text))
    assert result.pid is not None and wait_gone(result.pid)
    assert wait_gone(child)  # not left running, orphaned, on the cluster's machine


async def test_a_result_that_cannot_be_unpickled_here_fails_alone(dask_address: str) -> None:
    async with Scheduler(backend=DaskBackend(dask_address, capacity=2)) as scheduler:
        summary = await scheduler.run([Task(faults.return_unloadable), Task(tasks.square, 3)])
    bad, fine = summary.results
    assert (bad.status, bad.error_type) == (Status.FAILED, "RuntimeError")
    assert "could not be unpickled here: RuntimeError: this value cannot be rebuilt here" in (bad.error or "")
    assert fine.value == 9


@pytest.mark.parametrize(("kind", "raised"), [("exit", "SystemExit: a reducer called sys.exit()"),
                                              ("interrupt", "KeyboardInterrupt")])
async def test_a_result_whose_unpickling_here_raises_a_base_exception_fails_alone(dask_address: str, kind: str,
                                                                                   raised: str) -> None:
    async with Scheduler(backend=DaskBackend(dask_address, capacity=2)) as scheduler:
        summary = await scheduler.run([Task(faults.return_raising_on_load, kind), Task(tasks.square, 3)])
    bad, fine = summary.results
    assert bad.status is Status.FAILED and bad.error == f"the result could not be unpickled here: {raised}"
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


async def test_a_restart_the_scheduler_does_not_answer_is_given_up(monkeypatch: pytest.MonkeyPatch) -> None:
    class FrozenClient:  # a scheduler that stopped answering (frozen, cut off) after the start
        asynchronous = True

        async def cancel(self, futures: object) -> None:
            await asyncio.Event().wait()

        async def run(self, function: object, *, workers: list[str], on_error: str) -> None:
            await asyncio.Event().wait()

    class Key:
        key = "a-key"

    monkeypatch.setattr(_dask, "CANCEL_WAIT", 0.1)
    monkeypatch.setattr(_dask, "RESTART_WAIT", 0.1)
    backend = DaskBackend(client=FrozenClient())  # type: ignore[arg-type]
    async with asyncio.timeout(10):  # else aclose(), which waits for restarts, and SIGTERM with it, would hang
        await backend._restart(Key(), "tcp://frozen:1")  # type: ignore[arg-type]


# -- a scheduler that cannot be reached ----------------------------------------------------------------------------

UNREACHABLE_BOUND = 20.0
"""Generous: each start below waits connect_timeout=0.5 s; Dask alone waits 30 s, or forever for a silent listener."""


@pytest.fixture
def refused() -> Iterator[str]:
    """A port that is bound but does not listen: connections to it are refused, and nothing else can take it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"tcp://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def silent() -> Iterator[str]:
    """A listener that never accepts: the kernel completes the connection, and nobody ever answers on it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield f"tcp://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def unresolvable() -> str:
    return "tcp://no-such-host.invalid:8786"  # .invalid never resolves (RFC 6761)


@contextlib.contextmanager
def dask_left_as_it_was() -> Iterator[None]:
    """A client that is not closed stays Dask's default client, and sets dask's scheduler for the whole process."""
    scheduler = dask.config.get("scheduler", None)
    yield
    assert _get_global_client() is None
    assert dask.config.get("scheduler", None) == scheduler


@pytest.mark.parametrize("where", ["refused", "unresolvable", "silent"])
async def test_a_scheduler_that_cannot_be_reached_fails_the_start_within_connect_timeout(
        where: str, request: pytest.FixtureRequest) -> None:
    address = request.getfixturevalue(where)
    backend = DaskBackend(address, connect_timeout=0.5)
    began = time.monotonic()
    with dask_left_as_it_was(), pytest.raises(BackendUnreachableError) as caught:
        await backend.start()
    assert time.monotonic() - began < UNREACHABLE_BOUND
    message = str(caught.value)
    assert message.startswith(f"could not reach the Dask scheduler at {address} within 0.5s")
    assert "check that a Dask scheduler runs there" in message and "connect_timeout" in message
    assert isinstance(caught.value, OSError)  # as Dask's own error was: an `except OSError` still catches it
    assert backend.client is None
    await backend.aclose()


def test_the_error_names_dasks_last_failure_when_the_timeout_cut_into_its_back_off() -> None:
    refused = ConnectionRefusedError(111, "Connection refused")
    try:
        try:
            raise OSError("in <TCPConnector>: ConnectionRefusedError") from refused  # as Dask wraps it
        except OSError:
            raise asyncio.CancelledError() from None  # the timeout, while Dask waits to try again
    except asyncio.CancelledError as cancelled:
        timeout = TimeoutError()
        timeout.__context__ = cancelled
    assert _last_failure(timeout) is refused
    assert _last_failure(TimeoutError()) is None  # cut into a try: nothing known


async def test_a_failed_start_leaves_nothing_behind_and_the_scheduler_closes(refused: str) -> None:
    threads = set(threading.enumerate())
    backend = DaskBackend(refused, connect_timeout=0.5)
    scheduler = Scheduler(backend=backend)
    with dask_left_as_it_was(), pytest.raises(BackendUnreachableError, match=r"within 0\.5s"):
        await scheduler.run([Task(tasks.square, 2)])
    assert set(threading.enumerate()) <= threads  # no thread of Dask's, nor of the connection, is left
    await scheduler.aclose()  # the tasks and processes are checked by the autouse fixtures
    await scheduler.aclose()
    with pytest.raises(ClosedError):
        await scheduler.run([Task(tasks.square, 2)])


async def test_a_listener_that_is_no_dask_scheduler_fails_the_start_at_once() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()
        await writer.wait_closed()

    async with await asyncio.start_server(hang_up, "127.0.0.1", 0) as server:
        address = f"tcp://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        backend = DaskBackend(address, connect_timeout=UNREACHABLE_BOUND * 10)  # it is not waited for
        with dask_left_as_it_was(), pytest.raises(BackendUnreachableError) as caught:
            await backend.start()
    assert str(caught.value).startswith(f"could not connect to a Dask scheduler at {address} (")
    assert isinstance(caught.value.__cause__, OSError)  # Dask's own error, kept as the cause
    await backend.aclose()


async def test_a_listener_that_speaks_first_fails_the_start_at_once() -> None:
    async def banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")  # as an HTTP, SSH or SMTP server greets
        await writer.drain()
        await reader.read()  # until the client hangs up
        writer.close()

    async with await asyncio.start_server(banner, "127.0.0.1", 0) as server:
        address = f"tcp://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        backend = DaskBackend(address, connect_timeout=UNREACHABLE_BOUND * 10)  # it is not waited for
        with dask_left_as_it_was(), pytest.raises(BackendUnreachableError, match="could not connect to a Dask "
                                                  f"scheduler at {address}"):
            await backend.start()  # Dask read the banner as a frame's length: a MemoryError
    await backend.aclose()


async def test_a_tls_address_with_no_security_is_a_configuration_error() -> None:
    backend = DaskBackend("tls://127.0.0.1:1", connect_timeout=UNREACHABLE_BOUND * 10)
    with dask_left_as_it_was(), pytest.raises(ConfigurationError, match=r"pass client=Client\(address, security="):
        await backend.start()
    await backend.aclose()


async def test_closing_after_dask_closed_the_client_is_quiet(dask_address: str) -> None:
    client = await Client(dask_address, asynchronous=True)
    backend = DaskBackend(client=client)
    await backend.start()
    await client.close()  # as Dask does once it gives up reconnecting to a lost cluster
    await backend.aclose()


async def test_tasks_after_dask_closed_the_client_crash_at_once_saying_so_and_a_closed_backend_is_not_reused(
        dask_address: str) -> None:
    client = await Client(dask_address, asynchronous=True)
    backend = DaskBackend(client=client)
    async with Scheduler(backend=backend, retries=3) as scheduler:
        await client.close()  # as Dask does once it gives up reconnecting to a lost cluster
        summary = await scheduler.run([Task(tasks.square, 2)])
        (result,) = summary.results
        assert (result.status, result.attempts, result.error_type) == (Status.CRASHED, 1, "BackendUnreachableError")
        assert (result.error or "").startswith("BackendUnreachableError: the Dask client is closed: it lost the "
                                               "scheduler for longer than Dask waits to reconnect")
        assert not backend._running  # an attempt left its entry there
    with pytest.raises(ClosedError, match=r"^this DaskBackend was closed; create a new one$"):
        async with Scheduler(backend=backend):
            pass


@pytest.mark.parametrize("address", ["foo://127.0.0.1:8786", "tcp://127.0.0.1", "tcp://127.0.0.1:port"])
async def test_an_address_dask_cannot_read_is_a_configuration_error(address: str) -> None:
    backend = DaskBackend(address, connect_timeout=UNREACHABLE_BOUND * 10)  # it is not waited for
    with dask_left_as_it_was(), pytest.raises(ConfigurationError) as caught:
        await backend.start()
    message = str(caught.value)
    assert message.startswith(f"DaskBackend cannot use the address {address!r} (") and "tcp://host:8786" in message
    assert isinstance(caught.value.__cause__, ValueError)  # Dask's own error, kept as the cause
    await backend.aclose()


async def test_a_connect_timeout_longer_than_dasks_own_is_waited_for(refused: str) -> None:
    with dask.config.set({"distributed.comm.timeouts.connect": "0.1s"}), dask_left_as_it_was():
        backend = DaskBackend(refused, connect_timeout=1)
        with pytest.raises(BackendUnreachableError, match=" within 1s"):  # not Dask's own: after 0.1 s
            await backend.start()
    await backend.aclose()


async def test_cancelling_a_start_closes_the_client_it_opened() -> None:
    async with silent_server() as server:
        backend = DaskBackend(f"tcp://127.0.0.1:{server.port}", connect_timeout=UNREACHABLE_BOUND * 10)
        with dask_left_as_it_was():
            start = asyncio.ensure_future(backend.start())
            await server.connected.wait()  # Dask waits for the handshake
            start.cancel()
            with pytest.raises(asyncio.CancelledError):
                await start
        await server.hung_up.wait()  # its connection closed
        await backend.aclose()
