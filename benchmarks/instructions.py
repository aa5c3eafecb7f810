"""The orchestrator's instructions per tiny task, counted by valgrind: a steady measure on a noisy machine.

    python benchmarks/instructions.py [--tasks 20000] [--store] [--against CHECKOUT]

Runs the throughput measurement's batch (tiny tasks on 2 workers, per-task
timeouts, an ``events()`` consumer subscribed that never reads; store off, or
with ``--store`` a new SQLite file, whose writer thread is counted too)
under ``valgrind --tool=cachegrind`` twice, with N and 2N tasks, and divides
the difference in instructions by N: start-up and imports cancel out. Only the
orchestrator is counted: the workers come from the forkserver, a program
valgrind does not follow. Timings swing by 10% and more between runs here; the
count moves by well under 1%, so it shows a change of a few percent that a
timing cannot.

Under valgrind the orchestrator runs some fifty times slower than the workers,
so results pile up and are read in large groups: the count is the work done
per task, not the work done per wake-up of the loop (for that, time tasks of
1 ms with ``cpu_per_task.py --ms 1``). Needs valgrind (``apt install
valgrind``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

from _common import HERE, checkouts, double

from asyncsched import Scheduler, Task


async def batch(n: int, store: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with Scheduler(workers=2, timeout=10, store=os.path.join(tmp, "b.db") if store else None) as scheduler:
            events = scheduler.events()
            await scheduler.run([Task(double, 1)])
            summary = await scheduler.run(Task(double, i) for i in range(n))
            await events.aclose()
    assert summary.completed == n


def instructions(checkout: str, n: int, store: bool) -> int:
    """Instructions the orchestrator runs for a whole batch of ``n`` tasks, start-up included."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([checkout, HERE]))
    out = subprocess.run(["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
                          sys.executable, os.path.join(HERE, "instructions.py"), "--one", json.dumps([n, store])],
                         check=True, capture_output=True, text=True, env=env)
    found = re.search(r"I\s+refs:\s+([\d,]+)", out.stderr)
    if found is None:
        raise SystemExit(f"no instruction count in valgrind's output:\n{out.stderr}")
    return int(found.group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--store", action="store_true", help="with the SQLite store on")
    parser.add_argument("--against", metavar="CHECKOUT", help="another checkout of asyncsched, to count as well")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        asyncio.run(batch(*json.loads(args.one)))
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed: apt install valgrind (or your system's equivalent)")
    sides = checkouts(parser, args.against)
    n = args.tasks
    per_task = {}
    for side, checkout in sides.items():
        per_task[side] = (instructions(checkout, 2 * n, args.store) - instructions(checkout, n, args.store)) / n
        print(f"{side:8} {per_task[side]:9,.0f} instructions per task  ({checkout})")
    if args.against:
        print(f"this checkout against {args.against}: {per_task['this'] / per_task['against']:.3f}x")


if __name__ == "__main__":
    main()
