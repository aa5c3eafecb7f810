"""Session-long services for the scale-out tests, subprocesses on 127.0.0.1: a Dask cluster, Redis, a Celery worker.

Every service is started once per test session and synchronised on its own
ready line, never on a sleep. ``python -m tests.services dask`` is the Dask
cluster itself: a ``distributed.LocalCluster`` with two worker processes that
prints its address and runs until its standard input closes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0

PIDS: set[int] = set()
"""The services' own pids: they and their descendants are not leaks of any one test."""


class ServiceError(RuntimeError):
    pass


class CeleryWorker(NamedTuple):
    broker: str
    backend: str
    ready_line: str


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def service(argv: list[str], ready: str, *, env: dict[str, str] | None = None) -> Iterator[str]:
    """Run ``argv`` until the context ends; yields the output line that contains ``ready``.

    Output is read line by line until that line (bounded by START_TIMEOUT), then
    drained in a thread so the service never blocks on a full pipe.
    """
    process = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})},
                               start_new_session=True)
    PIDS.add(process.pid)
    assert process.stdout is not None and process.stdin is not None
    output: deque[str] = deque(maxlen=200)
    found: list[str] = []
    seen = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            if not found and ready in line:
                found.append(line.strip())
                seen.set()
        seen.set()  # the service ended

    reader = threading.Thread(target=read, name=f"service-{argv[0]}", daemon=True)
    reader.start()
    try:
        if not seen.wait(START_TIMEOUT) or not found:
            raise ServiceError(f"{' '.join(argv)} did not print {ready!r}:\n{''.join(output)}")
        yield found[0]
    finally:
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # whatever the service left behind
            process.wait()
            reader.join(timeout=5)
            process.stdout.close()
            process.stdin.close()
            PIDS.discard(process.pid)


@contextlib.contextmanager
def dask_cluster() -> Iterator[str]:
    """A LocalCluster of two single-threaded worker processes; yields the scheduler address."""
    # One reschedule for the tasks of a lost worker, so a task that kills its worker is reported soon.
    env = {"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "1", "PYTHONPATH": str(ROOT)}
    with service([sys.executable, "-m", "tests.services", "dask"], "tcp://", env=env) as line:
        yield line


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A private redis-server on a free port; yields its URL. Raises ServiceError when there is none."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise ServiceError("redis-server is not installed (make test installs it with apt-get when run as root)")
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    with service(argv, "Ready to accept connections"):
        yield f"redis://127.0.0.1:{port}"


@contextlib.contextmanager
def celery_worker(broker: str, backend: str, concurrency: int = 2) -> Iterator[str]:
    """``python -m asyncsched celery-worker``; yields its ``celery@host ready.`` line."""
    argv = [sys.executable, "-m", "asyncsched", "celery-worker", "--broker", broker, "--backend", backend,
            "--concurrency", str(concurrency), "--without-mingle", "--without-gossip"]
    with service(argv, " ready.", env={"PYTHONPATH": str(ROOT)}) as line:
        yield line


def _run_dask_cluster() -> None:
    from distributed import LocalCluster

    def stop(*_: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)  # leave the with block: the cluster closes its workers
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", scheduler_port=0,
                      dashboard_address=None) as cluster:
        print(cluster.scheduler_address, flush=True)
        sys.stdin.read()  # until the test session ends, or dies


if __name__ == "__main__" and sys.argv[1:] == ["dask"]:
    _run_dask_cluster()
