"""The libraries a user would pick instead, each running N tiny tasks on 2 workers.

    python benchmarks/peers.py [--tasks 20000] [PEER ...]

Each peer runs in a fresh interpreter, one after the other, with its
defaults (no tuned chunk sizes): this is what a user gets out of the box.
Every peer's workers are warmed up before the clock starts, except that
mpire's defaults start new workers for each ``map()``: it is measured both
that way and with ``keep_alive=True`` (warm, like the others).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

from _common import double, in_fresh_process

WORKERS = 2


async def double_async(x: int) -> int:
    return x * 2


def stdlib_gather(n: int) -> float:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        with ProcessPoolExecutor(WORKERS) as pool:
            await loop.run_in_executor(pool, double, 1)
            start = time.perf_counter()
            await asyncio.gather(*(loop.run_in_executor(pool, double, i) for i in range(n)))
            return time.perf_counter() - start

    return asyncio.run(main())


def mp_pool(n: int) -> float:
    with multiprocessing.get_context("forkserver").Pool(WORKERS) as pool:
        pool.apply(double, (1,))
        start = time.perf_counter()
        for _ in pool.imap_unordered(double, range(n)):
            pass
        return time.perf_counter() - start


def aiomultiprocess_map(n: int) -> float:
    import aiomultiprocess

    async def main() -> float:
        async with aiomultiprocess.Pool(processes=WORKERS) as pool:
            await pool.apply(double_async, (1,))
            start = time.perf_counter()
            await pool.map(double_async, range(n))
            return time.perf_counter() - start

    return asyncio.run(main())


def pebble_schedule(n: int) -> float:
    import pebble

    with pebble.ProcessPool(max_workers=WORKERS) as pool:
        pool.schedule(double, args=(1,)).result()
        start = time.perf_counter()
        futures = [pool.schedule(double, args=(i,), timeout=10) for i in range(n)]
        for future in futures:
            future.result()
        return time.perf_counter() - start


def mpire_map(n: int, keep_alive: bool = False) -> float:
    """mpire's defaults start new workers for every map() (the timing includes that); ``keep_alive`` reuses
    the warm ones, as asyncsched's measurement does."""
    import mpire

    with mpire.WorkerPool(n_jobs=WORKERS, keep_alive=keep_alive) as pool:
        pool.map(double, [1])
        start = time.perf_counter()
        pool.map(double, range(n))
        return time.perf_counter() - start


def mpire_map_warm(n: int) -> float:
    return mpire_map(n, keep_alive=True)


def loky_map(n: int) -> float:
    import loky

    executor = loky.get_reusable_executor(max_workers=WORKERS)
    executor.submit(double, 1).result()
    start = time.perf_counter()
    for _ in executor.map(double, range(n)):
        pass
    elapsed = time.perf_counter() - start
    executor.shutdown()
    return elapsed


PEERS: dict[str, Callable[[int], float]] = {
    "stdlib asyncio + ProcessPoolExecutor": stdlib_gather,
    "multiprocessing.Pool.imap_unordered": mp_pool,
    "aiomultiprocess Pool.map": aiomultiprocess_map,
    "pebble ProcessPool.schedule (timeout)": pebble_schedule,
    "mpire WorkerPool.map": mpire_map,
    "mpire WorkerPool.map (keep_alive)": mpire_map_warm,
    "loky map": loky_map,
}


def measure(names: list[str], n: int) -> dict[str, float]:
    """Tasks per second of each named peer, each measured in a fresh interpreter."""
    return {name: n / in_fresh_process("peers.py", name, str(n))["elapsed"] for name in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("peers", nargs="*", default=list(PEERS))
    parser.add_argument("--one", nargs=2, metavar=("PEER", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps({"elapsed": PEERS[args.one[0]](int(args.one[1]))}))
        return
    for name, rate in measure(args.peers, args.tasks).items():
        print(f"{name:<40} {rate:>10,.0f} tasks/s")


if __name__ == "__main__":
    main()
