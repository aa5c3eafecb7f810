"""An orchestrator for the test that SIGKILLs one: ``python -m tests.orchestrator_script DB LOG GATE``.

It runs :func:`batch` with a SQLite store in ``DB`` and prints ``started`` once
the store is open and the workers are up. The first ``FREE`` tasks finish on
their own; the others wait for the file ``GATE``, so the batch cannot end
before the test kills this process.
"""

from __future__ import annotations

import asyncio
import sys

from asyncsched import Scheduler, Task

from . import tasks

BATCH_ID = "nightly"
FREE = 20
TOTAL = 40


def batch(log: str, gate: str) -> list[Task]:
    return [Task(tasks.log_run, log, f"k{i}", 0.01, None if i < FREE else gate, key=f"k{i}") for i in range(TOTAL)]


async def main(db: str, log: str, gate: str) -> None:
    async with Scheduler(workers=2, store=db) as scheduler:
        print("started", flush=True)
        await scheduler.run(batch(log, gate), batch_id=BATCH_ID)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
