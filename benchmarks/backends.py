"""The scale-out backends side by side with the local pool: what one attempt costs on each.

    python -m benchmarks.backends [--tiny 2000] [--short 200]     (from the repository root; make bench-backends)

Each backend runs the same batches through the same ``Scheduler`` code, with
two worker processes, all on this machine:

* local: ``Scheduler(workers=2)``;
* dask: a ``LocalCluster`` of two single-threaded worker processes, in a
  process of its own, reached with ``DaskBackend(address)``;
* celery: a Redis server and one Celery worker with two children, reached
  with ``CeleryBackend(broker_url, backend_url)``.

The services are the ones the tests start (``tests/services.py``). The
batches: ``--tiny`` tasks that return at once (``x * 2``: the per-task
overhead), and ``--short`` tasks that sleep about 10 ms (the ideal is
``short * 10 ms / 2``). Each backend first runs a small warm-up batch. The
ratios are each backend's time over the local pool's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator

from asyncsched import Scheduler, Task
from asyncsched.backends import CeleryBackend, DaskBackend
from tests import services, tasks

WORKERS = 2


async def measure(make: Callable[[], Scheduler], tiny: int, short: int) -> tuple[float, float]:
    async with make() as scheduler:
        await scheduler.run([Task(tasks.double, i) for i in range(20)])
        timings = []
        for batch in ([Task(tasks.double, i) for i in range(tiny)],
                      [Task(tasks.sleep_then, 0.01, i) for i in range(short)]):
            start = time.perf_counter()
            summary = await scheduler.run(batch)
            timings.append(time.perf_counter() - start)
            assert summary.completed == len(batch), summary
    return timings[0], timings[1]


@contextlib.contextmanager
def backends() -> Iterator[dict[str, Callable[[], Scheduler]]]:
    with services.dask_cluster() as address, services.redis_server() as redis_url:
        broker, backend = f"{redis_url}/0", f"{redis_url}/1"
        with services.celery_worker(broker, backend, concurrency=WORKERS):
            yield {
                "local": lambda: Scheduler(workers=WORKERS),
                "dask": lambda: Scheduler(backend=DaskBackend(address, capacity=WORKERS)),
                "celery": lambda: Scheduler(backend=CeleryBackend(broker, backend, capacity=WORKERS)),
            }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", type=int, default=2000)
    parser.add_argument("--short", type=int, default=200)
    options = parser.parse_args()
    with backends() as makers:
        timings = {name: asyncio.run(measure(make, options.tiny, options.short)) for name, make in makers.items()}
    local_tiny, local_short = timings["local"]
    print(f"{WORKERS} worker processes per backend, on one machine (127.0.0.1)")
    print(f"{'backend':<8} {options.tiny} tiny tasks{'':>19} {options.short} tasks of 10 ms")
    for name, (tiny, short) in timings.items():
        print(f"{name:<8} {tiny:6.2f}s {options.tiny / tiny:7.0f} tasks/s {tiny / local_tiny:6.1f}x local   "
              f"{short:6.2f}s {short / local_short:6.1f}x local")


if __name__ == "__main__":
    main()
