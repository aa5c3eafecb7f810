"""An orchestrator process for the signal tests: prints its worker pids, then waits on hanging tasks.

    python -m tests.orchestrator [--start-method M]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

from asyncsched import Scheduler, Task, TaskStarted

from . import faults


async def main(start_method: str | None) -> None:
    async with Scheduler(workers=2, mp_context=start_method) as scheduler:
        events = scheduler.events()
        running = asyncio.ensure_future(scheduler.run([Task(faults.hang, key=str(i)) for i in range(2)]))
        pids = set()
        async for event in events:
            if isinstance(event, TaskStarted) and event.pid is not None:
                pids.add(event.pid)
                if len(pids) == 2:
                    break
        print(json.dumps(sorted(pids)), flush=True)
        await running


if __name__ == "__main__":
    # As a terminal's Ctrl-C finds it: a process started by a shell's `&` (pytest in a background job, then
    # this process) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    parser = argparse.ArgumentParser()
    parser.add_argument("--start-method", default=None)
    asyncio.run(main(parser.parse_args().start_method))
    sys.exit(0)
