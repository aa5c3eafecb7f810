"""Shared fixtures: every async test runs under asyncio and uvloop; no test may leak a process or a task."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import psutil
import pytest
import uvloop

from asyncsched import Scheduler

from . import services
from .util import wait_gone

LOOPS: Mapping[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, Any]:
    return LOOPS


def _helper_pids() -> set[int]:
    """Long-lived multiprocessing helpers (forkserver, resource tracker) are not leaks, nor are the session's
    services (tests.services) and their children."""
    pids = set()
    server_pid = getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None)
    tracker_pid = getattr(multiprocessing.resource_tracker._resource_tracker, "_pid", None)
    for pid in (server_pid, tracker_pid):
        if pid:
            pids.add(pid)
    for pid in services.PIDS:
        pids.add(pid)
        with contextlib.suppress(psutil.NoSuchProcess):
            pids.update(child.pid for child in psutil.Process(pid).children(recursive=True))
    return pids


def _children() -> list[psutil.Process]:
    children = psutil.Process().children(recursive=True)
    helpers = _helper_pids()  # after: a process a service starts meanwhile (a Dask worker restarted) is its own
    found = []
    for child in children:
        try:
            if child.pid not in helpers and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    before = {p.pid for p in _children()}
    yield
    leftover = [p for p in _children() if p.pid not in before]
    # A killed worker's process group gets its SIGKILL after a short grace: wait for it, bounded.
    alive = [p for p in leftover if not wait_gone(p.pid, timeout=3)]
    alive = [p for p in alive if p.pid not in _helper_pids()]
    for process in alive:
        process.kill()
    assert not alive, f"the test left processes behind: {[(p.pid, p.name()) for p in alive]}"


@pytest.fixture(autouse=True)
async def no_leftover_tasks(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    # pytest-timeout's SIGALRM cannot interrupt an idle uvloop, so async tests get a watchdog
    # on their own loop too: a few seconds before pytest-timeout, it cancels what still runs.
    loop = asyncio.get_running_loop()
    watchdog = loop.call_later(_timeout_of(request) - WATCHDOG_MARGIN, _cancel_all_tasks, loop)
    yield
    watchdog.cancel()
    current = asyncio.current_task()
    leftover = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    for task in leftover:
        task.cancel()
    assert not leftover, f"the test left asyncio tasks behind: {leftover}"


WATCHDOG_MARGIN = 3.0


def _timeout_of(request: pytest.FixtureRequest) -> float:
    marker = request.node.get_closest_marker("timeout")
    if marker is not None and marker.args:
        return float(marker.args[0])
    return float(request.config.getini("timeout"))


def _cancel_all_tasks(loop: asyncio.AbstractEventLoop) -> None:
    for task in asyncio.all_tasks(loop):
        task.cancel("the test ran past its timeout")


@pytest.fixture
async def scheduler() -> AsyncIterator[Scheduler]:
    async with Scheduler(workers=2) as s:
        yield s


@pytest.fixture
def gate(tmp_path: Path) -> Callable[[], str]:
    """A path a task can wait for (tests.tasks.wait_for_file); create it to let the task go on."""
    counter = iter(range(1_000_000))
    return lambda: os.fspath(tmp_path / f"gate-{next(counter)}")


@pytest.fixture(scope="session")
def dask_address() -> Iterator[str]:
    """The address of a LocalCluster (two worker processes) shared by the whole session."""
    with services.dask_cluster() as address:
        yield address


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A private Redis server for the session; the tests that need it skip only where it cannot start at all."""
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(services.redis_server())
        except services.ServiceError as exc:
            pytest.skip(f"Redis cannot be started here: {exc}")
        yield url


@pytest.fixture(scope="session")
def celery_worker(redis_url: str) -> Iterator[services.CeleryWorker]:
    """One Celery worker (two children) for the session, with its broker and result backend URLs."""
    broker, backend = f"{redis_url}/0", f"{redis_url}/1"
    with services.celery_worker(broker, backend) as ready_line:
        yield services.CeleryWorker(broker, backend, ready_line)
