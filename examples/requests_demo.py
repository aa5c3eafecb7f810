"""Simulated requests on a pool of processes: the demo's scenario, with live events.

Each request waits a random 0.5-3 s, then succeeds with data, fails with a
server error, or hangs past its timeout (and its worker is killed). Ten
requests run on four workers; live events are printed as they happen, then
the final statistics.

    python examples/requests_demo.py
"""

from __future__ import annotations

import asyncio
import random
import time

from asyncsched import Scheduler, Task, TaskFinished, TaskReported, TaskStarted, report

TIMEOUT = 3.5
"""Above every delay: only a request that hangs times out."""


class ServerError(Exception):
    """The simulated server answered 500."""


def fetch(request_id: int, seed: int) -> dict[str, object]:
    """A simulated HTTP request: slow, and not always successful."""
    rng = random.Random(seed)
    delay = rng.uniform(0.5, 3.0)
    outcome = rng.choices(["success", "timeout", "error"], weights=[6, 2, 2])[0]
    report(message=f"request {request_id}: connecting", progress=0.1)
    if outcome == "timeout":
        time.sleep(delay + TIMEOUT)  # never answers in time: the scheduler kills this worker
    time.sleep(delay)
    report(message=f"request {request_id}: response after {delay:.2f}s", progress=0.9)
    if outcome == "error":
        raise ServerError(f"request {request_id}: HTTP 500 after {delay:.2f}s")
    return {"request_id": request_id, "status": 200, "items": rng.randint(1, 100), "latency": round(delay, 3)}


async def print_events(scheduler: Scheduler) -> None:
    async with scheduler.events() as events:
        async for event in events:
            if isinstance(event, TaskStarted):
                print(f"  started   {event.key:<12} pid {event.pid}")
            elif isinstance(event, TaskReported):
                print(f"  progress  {event.key:<12} {event.progress:>4.0%}  {event.message}")
            elif isinstance(event, TaskFinished):
                print(f"  {event.status.value:<9} {event.key:<12} {event.message or ''}")


async def main() -> None:
    seed = random.randrange(1_000_000)
    async with Scheduler(workers=4, timeout=TIMEOUT) as scheduler:
        printer = asyncio.create_task(print_events(scheduler))
        batch = [Task(fetch, i, seed + i, key=f"request-{i}") for i in range(10)]
        summary = await scheduler.run(batch)
    await printer  # the event stream ends when the scheduler closes
    print()
    print(f"batch {summary.batch_id}: {summary.total} requests in {summary.elapsed:.2f}s")
    print(f"  completed {summary.completed}  failed {summary.failed}  timed out {summary.timed_out}  "
          f"crashed {summary.crashed}  success rate {summary.success_rate:.0%}")
    durations = [r.duration for r in summary.results if r.duration is not None]
    if durations:
        print(f"  average time per request {sum(durations) / len(durations):.2f}s")


if __name__ == "__main__":
    asyncio.run(main())
