"""Throughput and memory of the scheduler against asyncio + the stdlib ProcessPoolExecutor.

    python benchmarks/throughput.py [--tasks 20000] [--memory-tasks 200000] [--stdlib-memory]

Each measurement runs in a fresh interpreter (so peak RSS is its own), one
after the other in the same run, and the ratios are printed:

* asyncsched: ``scheduler.run()`` of N tiny tasks (``x * 2``) on 2 workers, a
  per-task timeout on every task, events published;
* stdlib: ``asyncio.gather(*(loop.run_in_executor(ProcessPoolExecutor(2), f, i) ...))``;
* memory: M tiny tasks from a generator through ``scheduler.stream()``: the
  orchestrator's peak RSS (``--stdlib-memory`` also measures the stdlib gather
  at M tasks, which is slow).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from concurrent.futures import ProcessPoolExecutor

from _common import double, in_fresh_process, peak_rss_mb

from asyncsched import Scheduler, Task


async def ours(n: int) -> float:
    async with Scheduler(workers=2, timeout=10) as scheduler:
        events = scheduler.events()  # a live consumer, so events are really published
        await scheduler.run([Task(double, 1)])
        start = time.perf_counter()
        summary = await scheduler.run(Task(double, i) for i in range(n))
        elapsed = time.perf_counter() - start
        assert summary.completed == n, summary
        await events.aclose()
    return elapsed


async def stdlib(n: int) -> float:
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(2) as pool:
        await loop.run_in_executor(pool, double, 1)
        start = time.perf_counter()
        values = await asyncio.gather(*(loop.run_in_executor(pool, double, i) for i in range(n)))
        elapsed = time.perf_counter() - start
        assert len(values) == n
    return elapsed


async def ours_stream(n: int) -> float:
    count = 0
    async with Scheduler(workers=2, timeout=10) as scheduler:
        async for _ in scheduler.stream(Task(double, i) for i in range(n)):
            count += 1
    assert count == n
    return 0.0


MODES = {"ours": ours, "stdlib": stdlib, "ours-stream": ours_stream, "stdlib-stream": stdlib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--memory-tasks", type=int, default=200_000)
    parser.add_argument("--stdlib-memory", action="store_true")
    parser.add_argument("--one", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        mode, n = args.one[0], int(args.one[1])
        elapsed = asyncio.run(MODES[mode](n))
        print(json.dumps({"mode": mode, "n": n, "elapsed": elapsed, "rss_mb": peak_rss_mb()}))
        return

    n = args.tasks
    a = in_fresh_process("throughput.py", "ours", str(n))
    b = in_fresh_process("throughput.py", "stdlib", str(n))
    ra, rb = n / a["elapsed"], n / b["elapsed"]
    print(f"throughput, {n} tiny tasks on 2 workers")
    print(f"  asyncsched (timeouts + events) {ra:>9,.0f} tasks/s")
    print(f"  asyncio + ProcessPoolExecutor  {rb:>9,.0f} tasks/s")
    print(f"  ratio                          {ra / rb:>9.2f}x")
    m = args.memory_tasks
    c = in_fresh_process("throughput.py", "ours-stream", str(m))
    print(f"memory, {m} tiny tasks from a generator through stream()")
    print(f"  asyncsched peak RSS            {c['rss_mb']:>9.1f} MB")
    if args.stdlib_memory:
        d = in_fresh_process("throughput.py", "stdlib-stream", str(m))
        print(f"  asyncio + ProcessPoolExecutor  {d['rss_mb']:>9.1f} MB")


if __name__ == "__main__":
    main()
