"""Results in a SQLite file: run a batch, resume it, query it from a new scheduler, export it.

    python examples/persistence.py [results.db]

Run it twice: the second run finds the batch in the file and, with
``resume=True``, runs nothing again.
"""

from __future__ import annotations

import asyncio
import sys

from asyncsched import Scheduler, SQLiteStore, Task


def fetch(n: int) -> dict[str, int]:
    """Stands for real work; its value is plain JSON, so it is stored as JSON."""
    return {"id": n, "bytes": 1000 + n}


async def main(path: str) -> None:
    batch = [Task(fetch, n, key=f"page-{n}") for n in range(20)]
    async with Scheduler(workers=2, store=path) as scheduler:
        summary = await scheduler.run(batch, batch_id="pages", name="example", resume=True)
        print(f"{summary.completed}/{summary.total} completed in {summary.elapsed:.2f}s")

    async with SQLiteStore(path) as store:  # later, or from another process
        print(await store.stats("pages"))
        for result in await store.results(batch_id="pages", limit=3):
            print(result.key, result.status, result.value)
        print(await store.export_jsonl("pages.jsonl", batch_id="pages"), "results written to pages.jsonl")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "results.db"))
