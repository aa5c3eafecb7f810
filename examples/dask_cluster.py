"""Run a batch on a real Dask cluster: one `dask scheduler` and two `dask worker` processes on 127.0.0.1.

    python examples/dask_cluster.py

The script starts the cluster itself, runs a batch through
``Scheduler(backend=DaskBackend(address))`` (results, a failure, a timeout that
restarts its worker, live progress from ``report()``), and stops the cluster
again, whatever happens. On a real cluster, start the same commands by hand::

    dask scheduler --host 0.0.0.0 --port 8786
    dask worker tcp://SCHEDULER:8786 --nthreads 1     # on each machine, in a venv with asyncsched installed
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

from asyncsched import Scheduler, Task, TaskReported, report
from asyncsched.backends import DaskBackend

WORKERS = 2


def count_words(text: str) -> int:
    """A task: it reports its progress, which the parent sees as events."""
    words = text.split()
    for i, _ in enumerate(words, 1):
        report(f"{i} words", progress=i / len(words))
    return len(words)


def stuck() -> None:
    time.sleep(3600)


def refuse(n: int) -> int:
    raise ValueError(f"no {n}")


@contextlib.contextmanager
def cluster() -> Iterator[str]:
    """Start `dask scheduler` and the workers; yields the scheduler address; stops them all on exit."""
    with socket.socket() as sock:  # a free port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    dask = [sys.executable, "-m", "dask"]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    processes = [subprocess.Popen([*dask, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                   "--no-dashboard"], **quiet)]  # type: ignore[call-overload]
    try:
        for _ in range(WORKERS):
            processes.append(subprocess.Popen([*dask, "worker", address, "--host", "127.0.0.1", "--nthreads", "1",
                                               "--no-dashboard"], **quiet))  # type: ignore[call-overload]
        yield address
    finally:  # the workers first, while their scheduler is there to see them leave
        for process in reversed(processes):
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def main(address: str) -> None:
    # the cluster starts with this script: wait for its scheduler to come up as long as Dask itself would (30 s)
    backend = DaskBackend(address, capacity=WORKERS, kill_on_timeout=True, connect_timeout=30)
    async with Scheduler(backend=backend, timeout=30) as scheduler:
        assert backend.client is not None
        await backend.client.wait_for_workers(WORKERS, timeout=60)  # type: ignore[func-returns-value,misc]
        events = scheduler.events()
        texts = ["the quick brown fox", "jumps over", "the lazy dog", "and runs away again"]
        batch = [Task(count_words, text, key=f"text-{i}") for i, text in enumerate(texts)]
        batch += [Task(refuse, 7, key="refused"), Task(stuck, key="stuck", timeout=1)]
        summary = await scheduler.run(batch)
        for result in summary.results:
            outcome = result.value if result.ok else result.error
            print(f"{result.key:>8}  {result.status:<9}  worker pid {result.pid}  {outcome}")
        print(f"{summary.completed}/{summary.total} completed in {summary.elapsed:.2f}s")
    progress = [event async for event in events if isinstance(event, TaskReported)]
    print(f"{len(progress)} progress events from report() in the workers, e.g. {progress[0].message!r}")


if __name__ == "__main__":
    with cluster() as scheduler_address:
        asyncio.run(main(scheduler_address))
