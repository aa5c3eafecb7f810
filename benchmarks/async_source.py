"""A batch from an async generator against the same batch from a plain generator.

    python benchmarks/async_source.py [--tasks 20000] [--rounds 5] [--against CHECKOUT]

N tiny tasks (``x * 2``) on 2 workers, from ``(Task(double, i) for i in
range(N))`` and from an async generator that yields the same tasks without
ever waiting, in alternating rounds, each round in a fresh interpreter; prints
the median rate of each and their ratio. An async source is pulled beside the
run; one that does not wait should cost about what a plain one does.
``--against`` names another checkout of asyncsched (``git worktree add
/tmp/before <commit>``), measured in the same alternating rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import AsyncIterator

from _common import checkouts, double, in_fresh_process

from asyncsched import Scheduler, Task


async def tasks(n: int) -> AsyncIterator[Task]:
    for i in range(n):
        yield Task(double, i)


async def measure(n: int, kind: str) -> float:
    async with Scheduler(workers=2, timeout=10) as scheduler:
        await scheduler.run([Task(double, 1)])
        start = time.perf_counter()
        summary = await scheduler.run(tasks(n) if kind == "async" else (Task(double, i) for i in range(n)))
        elapsed = time.perf_counter() - start
    assert summary.completed == n, summary
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--against", metavar="CHECKOUT", help="another checkout of asyncsched, to alternate with")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        n, kind = json.loads(args.one)
        print(json.dumps({"tasks_per_s": asyncio.run(measure(n, kind))}))
        return
    sides = checkouts(parser, args.against)
    rates: dict[tuple[str, str], list[float]] = {(side, kind): [] for side in sides for kind in ("sync", "async")}
    for round_number in range(1, args.rounds + 1):
        for side, checkout in sides.items():
            for kind in ("sync", "async") if round_number % 2 else ("async", "sync"):
                rate = in_fresh_process("async_source.py", json.dumps([args.tasks, kind]),
                                        checkout=checkout)["tasks_per_s"]
                rates[side, kind].append(rate)
                print(f"round {round_number} {side:<8} {kind:<5} {rate:>8,.0f} tasks/s", flush=True)
    for side in sides:
        sync, async_ = (statistics.median(rates[side, kind]) for kind in ("sync", "async"))
        print(f"median   {side:<8} plain generator {sync:,.0f} tasks/s, async generator {async_:,.0f} tasks/s: "
              f"{async_ / sync:.2f}x")


if __name__ == "__main__":
    main()
