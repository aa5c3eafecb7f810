"""The orchestrator's CPU per task, the number to drive down, and the workers' beside it.

    python benchmarks/cpu_per_task.py [--tasks 20000] [--rounds 5] [--ms MS] [--against CHECKOUT]

Each round runs the suite's throughput measurement (tiny tasks on 2 workers,
per-task timeouts, an ``events()`` consumer subscribed, store off) in a fresh
interpreter, and reads the CPU time of the orchestrator (user + system, all
its threads) and of its two workers (time on a CPU, from
``/proc/<pid>/schedstat``) around ``run()``. CPU time swings less than
throughput when other jobs share the machine. As in the suite, the events
consumer is subscribed and never reads: once its buffer is full, each new
event pushes out the oldest. ``--ms 1`` runs tasks of about 1 ms of pure
Python each instead (the suite's CPU-bound tasks; ``--tasks 2000`` is enough):
their results come one at a time, so the orchestrator's cost per task is
mostly that of waking up for them (the pool reads them on a 2 ms timer, a few
in each wake-up).

``--against`` names another checkout of asyncsched (``git worktree add
/tmp/before <commit>``, say): rounds then alternate between it and this one,
each in a fresh interpreter, and the medians are compared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from typing import Any

import psutil
from _common import alternate, checkouts, crunch, double, iterations_for

import asyncsched
from asyncsched import Scheduler, Task


def cpu_seconds(pid: int) -> float:
    """Seconds ``pid`` has spent on a CPU: in nanoseconds from /proc where there is one, else in clock ticks."""
    try:
        with open(f"/proc/{pid}/schedstat") as stat:
            return int(stat.read().split()[0]) / 1e9
    except OSError:
        times = psutil.Process(pid).cpu_times()
        return float(times.user + times.system)


async def measure(n: int, ms: float) -> dict[str, Any]:
    iterations = iterations_for(ms) if ms else 0
    async with Scheduler(workers=2, timeout=10) as scheduler:
        events = scheduler.events()
        await scheduler.run([Task(double, 1)])
        workers = scheduler._backend.pool.pids  # type: ignore[attr-defined]
        before = time.process_time(), sum(map(cpu_seconds, workers))
        start = time.perf_counter()
        summary = await scheduler.run(Task(crunch, iterations) if ms else Task(double, i) for i in range(n))
        elapsed = time.perf_counter() - start
        after = time.process_time(), sum(map(cpu_seconds, workers))
        await events.aclose()
    assert summary.completed == n
    return {"tasks_per_s": n / elapsed, "orchestrator_us": (after[0] - before[0]) / n * 1e6,
            "workers_us": (after[1] - before[1]) / n * 1e6, "asyncsched": os.path.dirname(asyncsched.__file__)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ms", type=float, default=0.0, help="tasks of about MS milliseconds of work (default: tiny)")
    parser.add_argument("--against", metavar="CHECKOUT", help="another checkout of asyncsched, to alternate with")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(asyncio.run(measure(*json.loads(args.one)))))
        return
    sides = checkouts(parser, args.against)
    results: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    for round_, side, result in alternate("cpu_per_task.py", sides, args.rounds, json.dumps([args.tasks, args.ms])):
        results[side].append(result)
        print(f"round {round_ + 1} {side:8} {result['tasks_per_s']:9,.0f} tasks/s   orchestrator "
              f"{result['orchestrator_us']:5.2f} µs/task   workers {result['workers_us']:5.2f} µs/task")
    medians = {side: {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
               for side, rounds in results.items()}
    for side, median in medians.items():
        low = {key: min(r[key] for r in results[side]) for key in median}
        high = {key: max(r[key] for r in results[side]) for key in median}
        print(f"median   {side:8} {median['tasks_per_s']:9,.0f} tasks/s   orchestrator "
              f"{median['orchestrator_us']:5.2f} µs/task   workers {median['workers_us']:5.2f} µs/task   (rounds: "
              f"{low['tasks_per_s']:,.0f}-{high['tasks_per_s']:,.0f} tasks/s, orchestrator "
              f"{low['orchestrator_us']:.2f}-{high['orchestrator_us']:.2f} µs)")
    if args.against:
        this, against = medians["this"], medians["against"]
        print(f"this checkout against {args.against}: orchestrator CPU per task "
              f"{this['orchestrator_us'] / against['orchestrator_us']:.2f}x, throughput "
              f"{this['tasks_per_s'] / against['tasks_per_s']:.2f}x")


if __name__ == "__main__":
    main()
