"""What a resumed ``stream()`` holds: the orchestrator's peak RSS, resuming against starting.

    python benchmarks/resume_memory.py [--tasks 200000] [--against CHECKOUT]

A batch of 2N tiny tasks (``x * 2``) from a generator is stopped once N
results are stored in a new SQLite file; then, each in a fresh interpreter,
the same batch is resumed through ``stream()`` (the N stored keys are skipped,
N tasks run), and a new batch of N tasks is run from the start. The difference
of their peak RSS is what the resume holds for the stored results. ``--against``
names another checkout of asyncsched (``git worktree add /tmp/before <commit>``),
measured the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile

from _common import double, in_fresh_process, peak_rss_mb

from asyncsched import Scheduler, Task


async def measure(path: str, n: int, step: str) -> int:
    """Run ``step`` on results file ``path``; return how many results the stream gave."""
    seen = 0
    async with Scheduler(workers=2, store=path) as scheduler:
        if step == "fill":  # N results stored, and the batch left unfinished
            async for _ in scheduler.stream((Task(double, i) for i in range(2 * n)), batch_id="b"):
                seen += 1
                if seen == n:
                    break
        elif step == "resume":
            async for _ in scheduler.stream((Task(double, i) for i in range(2 * n)), batch_id="b", resume=True):
                seen += 1
        else:
            async for _ in scheduler.stream(Task(double, i) for i in range(n)):
                seen += 1
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200_000, help="N: the stored results, and the tasks run")
    parser.add_argument("--against", metavar="CHECKOUT", help="another checkout of asyncsched, measured the same way")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        path, n, step = json.loads(args.one)
        seen = asyncio.run(measure(path, n, step))
        print(json.dumps({"results": seen, "peak_rss_mb": peak_rss_mb()}))
        return
    sides = {"this": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    if args.against:
        sides["against"] = os.path.abspath(args.against)
    for side, checkout in sides.items():
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "r.db")
            rss = {step: in_fresh_process("resume_memory.py", json.dumps([path, args.tasks, step]),
                                          checkout=checkout)["peak_rss_mb"]
                   for step in ("fill", "resume", "fresh")}
        held = rss["resume"] - rss["fresh"]
        print(f"{side:<8} resuming with {args.tasks:,} stored: peak {rss['resume']:.0f} MB; starting {args.tasks:,} "
              f"tasks: {rss['fresh']:.0f} MB; held for the stored results: {held:.0f} MB "
              f"({held * 2**20 / args.tasks:.0f} bytes each)")


if __name__ == "__main__":
    main()
