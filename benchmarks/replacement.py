"""How soon a killed worker's replacement runs a task: from a timeout's kill to the next task's start.

    python benchmarks/replacement.py [--kills 20] [--rounds 5] [--against CHECKOUT]

On one worker, tasks that hang (each killed at its 50 ms timeout) alternate
with tiny ones, so each tiny task runs on the worker that replaced a killed
one: the gap between the killed task's end (``finished_at``, the kill) and the
tiny task's start (``started_at``, in the new worker) is what the kill costs
the batch beyond the timeout itself. Each round runs in a fresh interpreter,
which launches a fork server of its own (the default start method, where there
is one). Most of the gap is the new worker importing this script, the
program's main module, and all it imports, again: Python before 3.13.8 never
has its fork server import the main module once for all its workers.

``--against`` names another checkout of asyncsched (``git worktree add
/tmp/before <commit>``, say): rounds then alternate between it and this one,
and the medians are compared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from typing import Any

from _common import alternate, checkouts, double

import asyncsched
from asyncsched import Scheduler, Status, Task

TIMEOUT = 0.05


def hang() -> None:
    time.sleep(3600)


async def measure(kills: int) -> dict[str, Any]:
    async with Scheduler(workers=1) as scheduler:
        await scheduler.run([Task(double, 1)])
        batch = [task for _ in range(kills) for task in (Task(hang, timeout=TIMEOUT), Task(double, 2))]
        results = (await scheduler.run(batch)).results
    gaps = []
    for killed, next_ in zip(results[::2], results[1::2], strict=True):
        assert killed.status is Status.TIMED_OUT and next_.status is Status.COMPLETED, (killed, next_)
        assert killed.finished_at is not None and next_.started_at is not None
        gaps.append((next_.started_at - killed.finished_at) * 1000)
    return {"median_ms": statistics.median(gaps), "max_ms": max(gaps),
            "asyncsched": os.path.dirname(asyncsched.__file__)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--against", metavar="CHECKOUT", help="another checkout of asyncsched, to alternate with")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(asyncio.run(measure(json.loads(args.one)))))
        return
    sides = checkouts(parser, args.against)
    medians: dict[str, list[float]] = {side: [] for side in sides}
    for round_, side, result in alternate("replacement.py", sides, args.rounds, json.dumps(args.kills)):
        medians[side].append(result["median_ms"])
        print(f"round {round_ + 1} {side:8} kill -> next task started: median {result['median_ms']:6.1f} ms, "
              f"max {result['max_ms']:6.1f} ms")
    for side, values in medians.items():
        print(f"median of the rounds' medians, {side:8} {statistics.median(values):6.1f} ms "
              f"(rounds {min(values):.1f}-{max(values):.1f})")
    if args.against:
        print(f"this checkout against {args.against}: "
              f"{statistics.median(medians['this']) / statistics.median(medians['against']):.2f}x the time")


if __name__ == "__main__":
    main()
