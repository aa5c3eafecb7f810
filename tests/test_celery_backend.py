"""What is particular to Celery: JSON calls by name, the worker command, redelivery, revoke, missed messages,
servers that cannot be reached."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

from asyncsched import (
    BackendUnreachableError,
    ClosedError,
    ConfigurationError,
    Scheduler,
    Status,
    Summary,
    Task,
    TaskDefinitionError,
    TaskStarted,
)
from asyncsched._worker import error_info
from asyncsched.backends import CeleryBackend, _celery
from asyncsched.backends._celery import target_of

from . import faults, services, tasks
from .services import CeleryWorker
from .util import silent_server, wait_gone

pytestmark = pytest.mark.timeout(120)


def in_main() -> None:
    """Stands for a function defined in a script: workers cannot import it."""


in_main.__module__ = "__main__"


class Account:
    """A class with a method: by name, a worker finds the plain function, without the instance."""

    def __init__(self, balance: int) -> None:
        self.balance = balance

    def deposit(self, amount: int) -> int:
        return self.balance + amount

    @classmethod
    def opened(cls, balance: int) -> int:
        return balance


class Savings(Account):
    pass


def kill_then_return(pid: int, port: int) -> str:
    """Kill the Redis server ``pid`` (the result backend) and return once its ``port`` refuses connections: the
    worker stores the result while the result backend is down."""
    os.kill(pid, signal.SIGKILL)
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return "done"
        time.sleep(0.01)


def scheduler_on(worker: CeleryWorker, **options: object) -> Scheduler:
    return Scheduler(backend=CeleryBackend(worker.broker, worker.backend, capacity=2), **options)  # type: ignore[arg-type]


def announce_sends(backend: CeleryBackend, monkeypatch: pytest.MonkeyPatch) -> asyncio.Queue[str]:
    """A queue that gets the task id of each call of the app's send_task, once it has returned or raised."""
    loop, sent = asyncio.get_running_loop(), asyncio.Queue[str]()
    send_task = backend.app.send_task

    def announced(*args: Any, **kwargs: Any) -> Any:
        try:
            return send_task(*args, **kwargs)
        finally:
            loop.call_soon_threadsafe(sent.put_nowait, kwargs["task_id"])

    monkeypatch.setattr(backend.app, "send_task", announced)
    return sent


@contextlib.asynccontextmanager
async def on_a_broker_to_lose(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[
        tuple[Scheduler, str, asyncio.Queue[str], Callable[[], None]]]:
    """A scheduler on a backend whose broker is a Redis of its own, which no worker reads (tasks stay queued): the
    scheduler, the broker's URL, the task id of each send (:func:`announce_sends`), and what stops the broker."""
    with contextlib.ExitStack() as broker_server:
        broker = broker_server.enter_context(services.redis_server())
        backend = CeleryBackend(f"{broker}/0", f"{redis_url}/1", capacity=2)
        sent = announce_sends(backend, monkeypatch)
        async with Scheduler(backend=backend) as scheduler:
            yield scheduler, broker, sent, broker_server.close


async def store_meta(backend: CeleryBackend, task_id: str, state: str, result: Any) -> None:
    """Store a task's state in the result backend and publish it, as a Celery worker does."""
    key = backend.app.backend.get_key_for_task(task_id)
    payload = backend.app.backend.encode({"status": state, "result": result, "traceback": None, "task_id": task_id})
    async with redis.asyncio.Redis.from_url(backend.app.conf.result_backend) as client:
        await client.set(key, payload)
        await client.publish(key, payload)


def unreachable(summary: Summary, pattern: str) -> None:
    """Every task of ``summary`` failed because a server could not be reached, as ``pattern`` says."""
    for result in summary.results:
        assert result.status is Status.FAILED, result
        assert result.error_type == "asyncsched.BackendUnreachableError", result
        assert re.search(pattern, result.error or ""), result.error
        assert isinstance(result.exception, BackendUnreachableError)


async def next_start(events: object) -> TaskStarted:
    async for event in events:  # type: ignore[attr-defined]
        if isinstance(event, TaskStarted):
            return event
    raise AssertionError("the events stream ended before a task started")


def test_the_worker_logs_celerys_ready_line(celery_worker: CeleryWorker) -> None:
    assert re.search(r"INFO/MainProcess\] celery@\S+ ready\.$", celery_worker.ready_line), celery_worker.ready_line


def test_the_worker_exits_1_after_an_unrecoverable_error(redis_url: str, tmp_path: Path) -> None:
    pidfile = tmp_path / "missing" / "worker.pid"  # the worker cannot take its pid file: Celery gives up at its start
    ran = subprocess.run([sys.executable, "-m", "asyncsched", "celery-worker", "--broker", f"{redis_url}/0",
                          "--backend", f"{redis_url}/1", "--pidfile", os.fspath(pidfile), "--without-mingle",
                          "--without-gossip"], cwd=services.ROOT, env={**os.environ, "PYTHONPATH": str(services.ROOT)},
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=60)
    assert "Unrecoverable error" in ran.stdout, ran.stdout
    assert ran.returncode == 1, ran.stdout  # it exited 0, as after a clean stop


@pytest.mark.parametrize(("option", "message"), [
    (["--pool", "bogus"], r"Invalid value for '-P' / '--pool': 'bogus' is not one of 'prefork', .*"),
    (["--no-such-option"], r"No such option '--no-such-option'.*"),
], ids=["bad-value", "unknown-option"])
def test_a_bad_worker_option_is_a_usage_error_in_one_line(option: list[str], message: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    # click's exception came out as a traceback
    assert _celery.celery_worker_main(["--broker", "redis://127.0.0.1:1/0", "--backend", "redis://127.0.0.1:1/1",
                                       *option]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(rf"asyncsched celery-worker: error: {message}\n", err), err


def test_functions_travel_by_name() -> None:
    assert target_of(tasks.add, (1,)) == ("tests.tasks:add", [1], {})
    assert target_of(functools.partial(tasks.add, 1, b=2), ()) == ("tests.tasks:add", [1], {"b": 2})
    assert target_of(len, ("ab",)) == ("builtins:len", ["ab"], {})
    with pytest.raises(TaskDefinitionError, match="cannot be imported by name"):
        target_of(in_main, ())
    # a class method of the class that defines it is found bound the same way by name
    assert target_of(Account.opened, (1,)) == ("tests.test_celery_backend:Account.opened", [1], {})


@pytest.mark.parametrize("method", [Account(100).deposit, functools.partial(Account(100).deposit, 5),
                                    Savings.opened], ids=["bound", "partial", "subclass"])
def test_a_bound_method_is_refused_as_its_instance_cannot_travel(method: Callable[..., Any]) -> None:
    # it was sent as Account.deposit without its instance: the worker called deposit(5) with self=5
    with pytest.raises(TaskDefinitionError, match=r"is a bound method: Celery runs functions by name, and the "
                       r"(instance|class) it is bound to cannot travel with it; use a module-level function$"):
        target_of(method, (5,))


async def test_a_bound_method_fails_at_submit(celery_worker: CeleryWorker) -> None:
    async with scheduler_on(celery_worker) as scheduler:
        summary = await scheduler.run([Task(Account(100).deposit, 5)])
    result = summary.results[0]
    assert result.status is Status.FAILED and result.error_type == "asyncsched.TaskDefinitionError"
    assert result.attempts == 1 and "is a bound method" in (result.error or "")


def test_needs_urls_or_an_app_and_a_redis_result_backend() -> None:
    with pytest.raises(ConfigurationError, match="broker_url= and backend_url="):
        CeleryBackend("redis://127.0.0.1:1/0")
    with pytest.raises(ConfigurationError, match="must be redis://"):
        CeleryBackend("redis://127.0.0.1:1/0", "rpc://")


@pytest.mark.parametrize(("broker", "backend", "message"), [
    ("redsi://:secret@127.0.0.1:1/0", "redis://127.0.0.1:1/1",  # it raised KeyError: 'No such transport: redsi'
     r"the Celery broker URL redsi://:\*\*@127\.0\.0\.1:1/0 cannot be used \(No such transport: redsi\..*\): "
     r"check its scheme"),
    ("redis://127.0.0.1:1/0", "redsi://:secret@127.0.0.1:1/1",  # it raised ModuleNotFoundError: No module named 'redsi'
     r"the Celery result backend URL redsi://:\*\*@127\.0\.0\.1:1/1 cannot be used \(no result backend has the "
     r"scheme 'redsi'\): CeleryBackend needs a Redis result backend, redis://"),
    ("redis://127.0.0.1:1/0", "redis://:secret@127.0.0.1:port/1",
     r"the Celery result backend URL redis://:\*\*@127\.0\.0\.1:port/1 cannot be used \(.*port.*\): .*"),
    ("redis://127.0.0.1:1/0", "rpc://guest:secret@127.0.0.1:1//",
     r"CeleryBackend streams results over Redis pub/sub: the app's result backend must be redis://, "
     r"got 'rpc://guest:\*\*@127\.0\.0\.1:1//'"),
], ids=["broker-scheme", "backend-scheme", "backend-port", "backend-not-redis"])
def test_a_url_that_cannot_be_used_is_a_configuration_error_naming_it(broker: str, backend: str,
                                                                        message: str) -> None:
    with pytest.raises(ConfigurationError, match=f"^{message}$") as caught:
        CeleryBackend(broker, backend)
    assert "secret" not in str(caught.value)


def test_the_worker_refuses_a_url_that_cannot_be_used_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    # the worker started, logged an unrecoverable error, and exited
    assert _celery.celery_worker_main(["--broker", "redis://127.0.0.1:1/0", "--backend", "redsi://127.0.0.1:1/1"]) == 2
    assert capsys.readouterr().err == ("asyncsched celery-worker: error: the Celery result backend URL "
                                       "redsi://127.0.0.1:1/1 cannot be used (no result backend has the scheme "
                                       "'redsi'): CeleryBackend needs a Redis result backend, redis://\n")


async def test_keyword_arguments_and_json_values(celery_worker: CeleryWorker) -> None:
    async with scheduler_on(celery_worker) as scheduler:
        summary = await scheduler.run([Task(functools.partial(tasks.add, b=10), 5), Task(tasks.identity, (1, "a")),
                                       Task(tasks.identity, {1, 2}), Task(in_main)])
    added, pair, not_json, unnamed = summary.results
    assert added.value == 15
    assert pair.value == [1, "a"]  # JSON has no tuples
    assert not_json.status is Status.FAILED and "could not be sent to Celery" in (not_json.error or "")
    assert unnamed.status is Status.FAILED and unnamed.error_type == "asyncsched.TaskDefinitionError"


async def test_an_argument_that_is_not_json_is_not_retried(celery_worker: CeleryWorker) -> None:
    async with scheduler_on(celery_worker, retries=2) as scheduler:
        summary = await scheduler.run([Task(tasks.identity, {1, 2})])
    result = summary.results[0]
    assert result.status is Status.FAILED and "EncodeError" in (result.error or "")
    assert result.attempts == 1  # it would fail the same way again


async def test_a_closed_backend_refuses_to_start_again(celery_worker: CeleryWorker,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    backend = CeleryBackend(celery_worker.broker, celery_worker.backend, capacity=2)
    async with Scheduler(backend=backend) as scheduler:
        assert (await scheduler.run([Task(tasks.add, 1)])).results[0].value == 1

    def connect(*_: object, **__: object) -> None:  # what it would open, its closing would leave open
        raise AssertionError("the closed backend connected to its result backend again")

    monkeypatch.setattr(redis.asyncio.Redis, "from_url", connect)
    # it started, then each task crashed: "cannot schedule new futures after shutdown"
    with pytest.raises(ClosedError, match=r"^this CeleryBackend was closed; create a new one$"):
        async with Scheduler(backend=backend) as scheduler:
            await scheduler.run([Task(tasks.add, 2)])


async def test_a_started_task_without_a_result_past_its_time_limit_times_out_and_says_why(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_celery, "TIME_LIMIT_GRACE", 0.2)
    backend = CeleryBackend(f"{redis_url}/4", f"{redis_url}/5", capacity=2)  # no worker reads this broker
    sent = announce_sends(backend, monkeypatch)
    async with Scheduler(backend=backend) as scheduler:
        running = asyncio.ensure_future(scheduler.run([Task(tasks.add, 1, timeout=0.5)]))
        task_id = await sent.get()
        # its start, as a worker that then died (or that cannot enforce time limits) would have stored it
        await store_meta(backend, task_id, "STARTED", {"pid": 1, "started_at": 0.0})
        summary = await running
    result = summary.results[0]
    assert result.status is Status.TIMED_OUT and result.error_type == "TimeoutError"
    # it said "the worker did not enforce the time limit", also when the worker was lost
    assert result.error == ("timed out after 0.5s; no result within the timeout and 0.2s more: the worker did not "
                            "enforce the time limit or was lost; the task was revoked")


async def test_results_read_to_their_end_are_deleted_from_the_result_backend(
        celery_worker: CeleryWorker, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = CeleryBackend(celery_worker.broker, celery_worker.backend, capacity=2)
    sent = announce_sends(backend, monkeypatch)
    async with Scheduler(backend=backend) as scheduler:
        summary = await scheduler.run([Task(tasks.add, 1), Task(faults.boom), Task(tasks.reporting, 3)])
    assert [r.status for r in summary.results] == [Status.COMPLETED, Status.FAILED, Status.COMPLETED]
    keys = [backend.app.backend.get_key_for_task(sent.get_nowait()) for _ in range(3)]
    async with redis.asyncio.Redis.from_url(celery_worker.backend) as client:
        assert await client.exists(*keys) == 0  # they stayed for an hour (result_expires) after they were read


async def test_a_task_killed_at_its_time_limit_stores_no_result_of_its_own(celery_worker: CeleryWorker) -> None:
    backend = CeleryBackend(celery_worker.broker, celery_worker.backend, capacity=2)
    async with Scheduler(backend=backend) as scheduler, \
            redis.asyncio.Redis.from_url(celery_worker.backend) as client, \
            client.pubsub(ignore_subscribe_messages=True) as states:
        await states.psubscribe(f"{backend.app.backend.get_key_for_task(backend._prefix).decode()}*")
        events = scheduler.events()
        running = asyncio.ensure_future(scheduler.run([Task(faults.hang, timeout=0.5)]))
        started = await next_start(events)
        summary = await running
        assert started.pid is not None and wait_gone(started.pid)  # all it stored is published
        await client.publish(b"%s-end" % backend.app.backend.get_key_for_task(backend._prefix), b"end")
        published = []
        async for message in states.listen():
            if message["data"] == b"end":
                break
            published.append(backend.app.backend.decode(message["data"]))
    assert summary.results[0].status is Status.TIMED_OUT
    # the child, terminated, stored a SUCCESS with "SystemExit: -241" over Celery's TimeLimitExceeded: read by
    # the fallback sweep (after a reconnect, say), the task was recorded failed
    final = [meta for meta in published if meta["status"] != "STARTED"]
    assert final and all(meta["status"] == "FAILURE" and meta["result"]["exc_type"] == "TimeLimitExceeded"
                         for meta in final), published  # Celery stores it twice


async def test_a_task_that_calls_sys_exit_is_recorded_failed(celery_worker: CeleryWorker) -> None:
    async with scheduler_on(celery_worker) as scheduler:
        summary = await scheduler.run([Task(sys.exit, 4)])
    result = summary.results[0]
    assert result.status is Status.FAILED and result.error_type == "SystemExit" and result.error == "SystemExit: 4"


@pytest.mark.timeout(60)
async def test_a_result_stored_while_the_result_backend_is_down_arrives_once_it_is_back(redis_url: str) -> None:
    port = services.free_port()
    server = [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save",
              "", "--appendonly", "no"]
    backend_url, broker = f"redis://127.0.0.1:{port}/1", f"{redis_url}/6"
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(contextlib.ExitStack())
        first.enter_context(services.service(server, "Ready to accept connections"))
        stack.enter_context(services.celery_worker(broker, backend_url, concurrency=1))
        async with redis.asyncio.Redis.from_url(backend_url) as admin:
            pid = (await admin.info("server"))["process_id"]
        async with Scheduler(backend=CeleryBackend(broker, backend_url, capacity=1)) as scheduler:
            running = asyncio.ensure_future(scheduler.run([Task(kill_then_return, pid, port)]))
            assert await asyncio.to_thread(wait_gone, pid)
            first.close()
            stack.enter_context(services.service(server, "Ready to accept connections"))  # back, empty
            async with asyncio.timeout(30):
                summary = await running  # it waited for ever: the worker gave up storing the result at once
    assert summary.results[0].value == "done"


async def test_a_crashing_task_is_redelivered_once_then_recorded_crashed(celery_worker: CeleryWorker) -> None:
    async with scheduler_on(celery_worker) as scheduler:
        events = scheduler.events()
        summary = await scheduler.run([Task(faults.exit_hard, key="dies")])
    starts = [e async for e in events if isinstance(e, TaskStarted)]
    result = summary.results[0]
    assert result.status is Status.CRASHED and "died (2 times)" in (result.error or "")
    assert len(starts) == 2 and starts[0].pid != starts[1].pid  # sent again to a new child


async def test_cancelling_revokes_and_kills_the_child(celery_worker: CeleryWorker, gate: Callable[[], str]) -> None:
    release = gate()
    async with scheduler_on(celery_worker) as scheduler:
        events = scheduler.events()
        running = asyncio.ensure_future(scheduler.run([Task(tasks.wait_for_file, release)]))
        started = await next_start(events)
        running.cancel()  # cancels the batch
        with contextlib.suppress(asyncio.CancelledError):
            await running
        results = await scheduler.results()
    assert [r.status for r in results] == [Status.CANCELLED]
    assert started.pid is not None and wait_gone(started.pid)


async def test_a_task_cancelled_while_no_worker_was_up_does_not_run_when_one_comes(
        redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broker, result_backend, log = f"{redis_url}/6", f"{redis_url}/7", str(tmp_path / "runs.log")
    backend = CeleryBackend(broker, result_backend, capacity=2)  # no worker reads this broker yet
    sent = announce_sends(backend, monkeypatch)
    async with Scheduler(backend=backend) as scheduler:
        running = asyncio.ensure_future(scheduler.run([Task(tasks.log_run, log, "cancelled")]))
        await sent.get()
        running.cancel()
        assert (await asyncio.gather(running, return_exceptions=True))[0].__class__ is asyncio.CancelledError
    # the revoke's broadcast reached no worker; the message waits in the broker
    with services.celery_worker(broker, result_backend, concurrency=1):  # one task at a time, in their order
        async with Scheduler(backend=CeleryBackend(broker, result_backend, capacity=1)) as scheduler:
            assert (await scheduler.run([Task(tasks.log_run, log, "after")])).completed == 1
    assert await asyncio.to_thread(Path(log).read_text) == "after\n"  # the cancelled one was taken first, not run


async def test_a_result_published_while_disconnected_is_not_lost(
        celery_worker: CeleryWorker, gate: Callable[[], str], caplog: pytest.LogCaptureFixture) -> None:
    release = gate()
    async with scheduler_on(celery_worker) as scheduler:
        events = scheduler.events()
        running = asyncio.ensure_future(scheduler.run([Task(tasks.wait_for_file, release, "done")]))
        await next_start(events)
        with caplog.at_level(logging.WARNING, logger="asyncsched.backends._celery"):
            async with redis.asyncio.Redis.from_url(celery_worker.backend) as admin:
                await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")  # drop the subscription
            await asyncio.to_thread(Path(release).touch)  # the result is published, maybe to nobody
            summary = await running
    assert summary.results[0].value == "done"
    assert "lost the Celery result backend" in caplog.text


async def test_closing_ends_a_listener_whose_read_swallowed_the_cancellation(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    reading = asyncio.Event()

    async def get_message(self: object, **_: object) -> None:
        # redis-py returns None when a cancellation races with the timeout of its own read
        reading.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()

    monkeypatch.setattr(redis.asyncio.client.PubSub, "get_message", get_message)
    backend = CeleryBackend(f"{redis_url}/0", f"{redis_url}/1")
    await backend.start()
    await reading.wait()
    closing = asyncio.ensure_future(backend.aclose())
    done, _ = await asyncio.wait([closing], timeout=10)  # it used to wait forever
    assert closing in done and backend._listener is not None and backend._listener.done()


async def test_a_result_backend_that_cannot_be_reached_fails_the_start(redis_url: str) -> None:
    scheduler = Scheduler(backend=CeleryBackend(f"{redis_url}/0", "redis://:secret@127.0.0.1:1/1"))
    try:
        with pytest.raises(BackendUnreachableError, match=r"^the Celery result backend redis://:\*\*@127\.0\.0\.1:1/1 "
                           r"cannot be reached \(.+\): check that it runs and that its URL is right$") as caught:
            await scheduler.run([Task(tasks.add, 1)])  # it raised redis.ConnectionError, naming no server
    finally:
        await scheduler.aclose()
    assert isinstance(caught.value, ConnectionError) and "secret" not in str(caught.value)


async def test_a_broker_that_cannot_be_reached_fails_the_start(redis_url: str) -> None:
    scheduler = Scheduler(backend=CeleryBackend("redis://127.0.0.1:1/0", f"{redis_url}/1"), retries=2)
    try:
        with pytest.raises(BackendUnreachableError, match=r"^the Celery broker redis://127\.0\.0\.1:1/0 cannot be "
                           r"reached \(.*Connection refused.*\): check that it runs and that its URL is right$"):
            await scheduler.run([Task(tasks.add, 1)])  # each attempt of each task was tried for 0.6 s, then failed
    finally:
        await scheduler.aclose()


async def test_a_start_names_both_servers_when_neither_can_be_reached() -> None:
    scheduler = Scheduler(backend=CeleryBackend("redis://127.0.0.1:1/0", "redis://127.0.0.1:1/1"))
    try:
        with pytest.raises(BackendUnreachableError, match=r"^the Celery broker redis://127\.0\.0\.1:1/0 cannot be "
                           r"reached \(.+\) and the Celery result backend redis://127\.0\.0\.1:1/1 cannot be reached "
                           r"\(.+\): check that they run and that their URLs are right$"):
            await scheduler.run([Task(tasks.add, 1)])
    finally:
        await scheduler.aclose()


@pytest.mark.parametrize("wrong", ["broker", "result backend"])
async def test_a_listener_that_is_no_redis_fails_the_start(wrong: str, redis_url: str) -> None:
    async def answer_as_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")  # a proxy or a web server
        writer.close()
        await writer.wait_closed()

    async with await asyncio.start_server(answer_as_http, "127.0.0.1", 0) as server:
        # it raised redis' InvalidResponse
        await the_start_fails_naming(wrong, server.sockets[0].getsockname()[1], redis_url, ".+")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("silent", ["broker", "result backend"])
async def test_a_server_that_never_answers_fails_the_start_within_the_socket_timeout(
        silent: str, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_celery, "SOCKET_TIMEOUT", 0.2)  # 5 s: four tries of the broker would take 20 s
    async with silent_server() as server:
        # a silent broker: the first send waited for ever; a silent result backend: redis.TimeoutError
        await the_start_fails_naming(silent, server.port, redis_url, ".*[Tt]imeout.*")


async def the_start_fails_naming(which: str, port: int, redis_url: str, reason: str) -> None:
    """A scheduler whose broker or result backend (``which``) is at ``port`` fails its first run, naming it."""
    urls = {"broker": f"{redis_url}/0", "result backend": f"{redis_url}/1"}
    urls[which] = f"redis://127.0.0.1:{port}/{0 if which == 'broker' else 1}"
    scheduler = Scheduler(backend=CeleryBackend(urls["broker"], urls["result backend"]))
    try:
        with pytest.raises(BackendUnreachableError, match=rf"^the Celery {which} {re.escape(urls[which])} "
                           rf"cannot be reached \({reason}\): check that it runs and that its URL is right$"):
            await scheduler.run([Task(tasks.add, 1)])
    finally:
        await scheduler.aclose()


@pytest.mark.timeout(60)
async def test_a_broker_lost_after_the_start_fails_the_sends_in_bounded_time(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async with on_a_broker_to_lose(redis_url, monkeypatch) as (scheduler, broker, sent, stop_broker):
        queued = asyncio.ensure_future(scheduler.run([Task(tasks.add, 1)]))
        await sent.get()  # connected, and sent
        stop_broker()
        summary = await scheduler.run([Task(tasks.add, n) for n in range(5)])
        queued.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await queued
    # each attempt failed in turn, 0.6 s apart, with a kombu.exceptions.OperationalError
    unreachable(summary, rf"^the Celery broker {re.escape(broker)}/0 cannot be reached \(.*Connection refused.*\): "
                         "the task was not sent; check that the broker runs$")
    assert sent.qsize() < 5  # the sends queued behind the first that failed failed with it, without a try each


@pytest.mark.timeout(60)
async def test_a_revoke_while_the_broker_is_lost_ends_in_bounded_time(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async with on_a_broker_to_lose(redis_url, monkeypatch) as (scheduler, broker, sent, stop_broker):
        async with redis.asyncio.Redis.from_url(broker) as admin, \
                admin.pubsub(ignore_subscribe_messages=True) as broadcasts:
            await broadcasts.psubscribe("*pidbox*")  # the fanout of Celery's control commands on a Redis broker
            first = asyncio.ensure_future(scheduler.run([Task(tasks.add, 1)]))
            await sent.get()
            first.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await first
            async for _ in broadcasts.listen():  # its revoke, while the broker runs: the connection stays open
                break
        second = asyncio.ensure_future(scheduler.run([Task(tasks.add, 2)]))
        await sent.get()  # after that revoke: one thread publishes both, in turn
        stop_broker()
        second.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await second
        results = await scheduler.results()
    # closing waited for ever: kombu retried the revoke broadcast for ever, in the thread that sends the tasks
    assert [r.status for r in results] == [Status.CANCELLED, Status.CANCELLED]


@pytest.mark.timeout(60)
async def test_a_result_backend_lost_past_the_reconnect_timeout_fails_the_attempts_waiting_on_it(
        redis_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    del redis_url  # the session's server is not used: asked for only to skip where Redis cannot start
    monkeypatch.setattr(_celery, "RECONNECT_TIMEOUT", 0.0)  # give up at the first reconnection that fails
    with contextlib.ExitStack() as server:
        url = server.enter_context(services.redis_server())  # broker and result backend; no worker reads it
        backend = CeleryBackend(f"{url}/0", f"{url}/1", capacity=2)
        sent = announce_sends(backend, monkeypatch)
        with caplog.at_level(logging.WARNING, logger="asyncsched.backends._celery"):
            async with Scheduler(backend=backend) as scheduler:
                waiting = asyncio.ensure_future(scheduler.run([Task(tasks.add, 1)]))
                await sent.get()
                server.close()
                summary = await waiting  # it waited for ever: the listener reconnected for ever
                later = await scheduler.run([Task(tasks.add, 2)])  # failed at once, not sent
    given_up = (rf"^the Celery result backend {re.escape(url)}/1 cannot be reached \(.+\) for \d+s: the attempt is "
                r"given up, as its result cannot be read \(and revoked, in case a worker runs it\); check that the "
                r"result backend runs$")
    unreachable(summary, given_up)
    unreachable(later, given_up)
    assert sent.qsize() == 0
    assert f"lost the Celery result backend {url}/1" in caplog.text
    assert "could not revoke 1 Celery tasks through" in caplog.text  # it was silent: a worker may still run it


async def test_a_start_cancelled_while_it_tries_the_broker_leaves_no_error_unread(
        monkeypatch: pytest.MonkeyPatch) -> None:
    trying, go_on = threading.Event(), threading.Event()

    def try_broker(self: CeleryBackend) -> BaseException | None:
        trying.set()
        go_on.wait(10)
        raise RuntimeError("the broker's transport failed")  # not a connection error: a bug, say

    async def ping_for_ever(self: redis.asyncio.Redis) -> bool:
        await asyncio.Event().wait()
        return True

    monkeypatch.setattr(CeleryBackend, "_reach_broker", try_broker)
    monkeypatch.setattr(redis.asyncio.Redis, "ping", ping_for_ever)  # the start waits on the result backend
    loop = asyncio.get_running_loop()
    started: list[asyncio.Future[Any]] = []
    run_in_executor = loop.run_in_executor

    def keep(*args: Any) -> asyncio.Future[Any]:
        started.append(run_in_executor(*args))
        return started[-1]

    monkeypatch.setattr(loop, "run_in_executor", keep)
    unread: list[dict[str, Any]] = []
    monkeypatch.setattr(loop, "call_exception_handler", unread.append)
    backend = CeleryBackend("redis://127.0.0.1:1/0", "redis://127.0.0.1:1/1")
    start = asyncio.ensure_future(backend.start())
    await asyncio.to_thread(trying.wait, 10)
    start.cancel()
    with pytest.raises(asyncio.CancelledError):
        await start
    go_on.set()
    await asyncio.wait(started)  # reads nothing
    started.clear()
    gc.collect()  # a future whose error nobody read says so as it goes
    await backend.aclose()
    assert not unread, unread


def test_the_exit_status_of_a_task_ended_by_the_worker_s_sigterm_handler_is_the_handler_s() -> None:
    from asyncsched.backends._remote import _exit_code

    assert _exit_code(error_info(SystemExit(-241))[1]) == -241  # "SystemExit: -241"
    assert _exit_code("SystemExit") == 1
