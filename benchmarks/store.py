"""What keeping results in SQLite costs: tiny tasks on 2 workers, store off and on, side by side.

    .venv/bin/python benchmarks/store.py [--tasks 20000] [--rounds 3]

Each round runs the batch once with results in memory only (``store=None``)
and once with a new SQLite file, alternating, so both see the same machine.
As in the suite's throughput measurement (and the target's definition), every
task has a timeout and an ``events()`` consumer is subscribed.
The time of the SQLite run includes the final commit at the end of the batch.
Target: the store on keeps at least 80% of the throughput with it off. Other
processes on the machine make single rounds noisy: the ratio is printed for the
medians and for the best rounds, the least disturbed ones.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from _common import double

from asyncsched import Scheduler, Task

WORKERS = 2
TARGET = 0.80


async def throughput(store: str | Path | None, tasks: int, *, stores: bool = True) -> float:
    """Tasks per second of one batch of ``tasks`` tiny tasks; ``stores``: check that the store has every result."""
    async with Scheduler(WORKERS, store=store, timeout=10) as scheduler, scheduler.events():
        await scheduler.run([Task(double, i) for i in range(200)], batch_id="warm-up")
        started = time.perf_counter()
        summary = await scheduler.run((Task(double, i) for i in range(tasks)), batch_id="measured")
        elapsed = time.perf_counter() - started
        assert summary.completed == tasks, summary
        if stores:
            assert (await scheduler.stats("measured")).completed == tasks
    return tasks / elapsed


async def main(tasks: int, rounds: int) -> float:
    off: list[float] = []
    on: list[float] = []
    with tempfile.TemporaryDirectory() as directory:
        for round_ in range(rounds):
            off.append(await throughput(None, tasks))
            on.append(await throughput(Path(directory) / f"round-{round_}.db", tasks))
            print(f"round {round_ + 1}: store off {off[-1]:8.0f} tasks/s   store on {on[-1]:8.0f} tasks/s   "
                  f"ratio {on[-1] / off[-1]:.2f}")
    best = max(on) / max(off)
    ratio = statistics.median(on) / statistics.median(off)
    print(f"{tasks} tiny tasks on {WORKERS} workers, {rounds} rounds: store off median {statistics.median(off):.0f}, "
          f"best {max(off):.0f} tasks/s; store on median {statistics.median(on):.0f}, best {max(on):.0f} tasks/s")
    print(f"ratio on/off: {ratio:.2f} of the medians, {best:.2f} of the best rounds "
          f"(target >= {TARGET:.2f}: {'met' if min(ratio, best) >= TARGET else 'NOT met'})")
    return ratio


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.tasks, arguments.rounds))
