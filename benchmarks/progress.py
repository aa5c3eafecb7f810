"""What the live progress display costs: 20,000 tiny tasks on 2 workers, with and without it.

Both variants run in the same process on the same scheduler, in alternating
rounds so that a busy machine slows both alike; the ratio of the best runs
(the least disturbed) is the figure to compare with the target, and the
medians are printed too. The display draws as on a terminal (the costly case) into memory.

    python benchmarks/progress.py [--tasks N] [--workers W] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import statistics
import time

from rich.console import Console

from asyncsched import ProgressMonitor, Scheduler, Task

TARGET = 1.05
"""The display may slow a run of tiny tasks by at most 5%."""


async def timed_run(scheduler: Scheduler, tasks: int, monitor: ProgressMonitor | None) -> float:
    batch = [Task(abs, i) for i in range(tasks)]
    started = time.perf_counter()
    async with monitor or contextlib.nullcontext():
        summary = await scheduler.run(batch)
    elapsed = time.perf_counter() - started
    assert summary.completed == tasks, summary
    return elapsed


async def main(tasks: int, workers: int, rounds: int) -> float:
    plain: list[float] = []
    shown: list[float] = []
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    async with Scheduler(workers=workers) as scheduler:
        await timed_run(scheduler, tasks // 10, None)  # warm up the workers and the caches
        for round_ in range(rounds):
            order = (False, True) if round_ % 2 == 0 else (True, False)
            for with_progress in order:
                monitor = ProgressMonitor(scheduler, console=console) if with_progress else None
                (shown if with_progress else plain).append(await timed_run(scheduler, tasks, monitor))
    print(f"{tasks} tasks on {workers} workers, {rounds} rounds each, alternating")
    for label, pick in (("best", min), ("median", statistics.median)):
        without, with_ = pick(plain), pick(shown)
        print(f"  {label:6}  without progress {without:.3f}s ({tasks / without:,.0f} tasks/s), "
              f"with progress {with_:.3f}s ({tasks / with_:,.0f} tasks/s), ratio {with_ / without:.3f}")
    ratio = min(shown) / min(plain)
    print(f"ratio of the best runs: {ratio:.3f} (target <= {TARGET}); the best run is the one least disturbed by "
          "other load on the machine")
    return ratio


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    asyncio.run(main(args.tasks, args.workers, args.rounds))
