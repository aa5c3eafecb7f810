"""The mixed-fault batch: every task accounted for, in close to the ideal time.

    python benchmarks/faults.py [--tasks 1000] [--workers 2] [--timeout 0.5]

10% of the tasks crash their worker (os._exit), 10% hang past the timeout,
10% raise, and the rest sleep 10 ms. The ideal schedule is the sum of the
unavoidable waits (the timeouts and the sleeps) spread over the workers; the
run must stay within 1.5x of it, with every status exact.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections import Counter
from typing import Any

from _faults import crash, fail, hang, work

from asyncsched import Scheduler, Status, Task

KINDS = {"crash": (crash, Status.CRASHED), "hang": (hang, Status.TIMED_OUT), "fail": (fail, Status.FAILED),
         "work": (work, Status.COMPLETED)}


async def measure(n: int, workers: int, deadline: float) -> dict[str, Any]:
    """Run the batch; its statuses, the tasks whose status is wrong, and the time against the ideal schedule."""
    kinds = ["crash"] * (n // 10) + ["hang"] * (n // 10) + ["fail"] * (n // 10)
    kinds += ["work"] * (n - len(kinds))
    random.Random(7).shuffle(kinds)
    async with Scheduler(workers=workers, timeout=deadline) as scheduler:
        await scheduler.run([Task(work)])
        start = time.perf_counter()
        summary = await scheduler.run(Task(KINDS[kind][0], key=f"{kind}-{i}") for i, kind in enumerate(kinds))
        elapsed = time.perf_counter() - start
    wrong = [(r.key, r.status.value) for r, kind in zip(summary.results, kinds, strict=True)
             if r.status != KINDS[kind][1]]
    ideal = (kinds.count("hang") * deadline + kinds.count("work") * 0.01) / workers
    return {"tasks": n, "workers": workers, "timeout": deadline,
            "statuses": dict(Counter(r.status.value for r in summary.results)), "mismatches": wrong,
            "elapsed": elapsed, "ideal": ideal, "ratio": elapsed / ideal}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=0.5)
    args = parser.parse_args()
    result = asyncio.run(measure(args.tasks, args.workers, args.timeout))
    print(f"mixed faults: {args.tasks} tasks on {args.workers} workers, timeout {args.timeout}s")
    print(f"  statuses     {result['statuses']}")
    print(f"  mismatches   {len(result['mismatches'])} {result['mismatches'][:5]}")
    print(f"  elapsed      {result['elapsed']:.2f}s")
    print(f"  ideal        {result['ideal']:.2f}s")
    print(f"  ratio        {result['ratio']:.2f}x (target <= 1.5x)")
    if result["mismatches"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
