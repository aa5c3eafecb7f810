"""The whole benchmark suite: one command, a table on stdout, JSON in benchmarks/results/suite.json.

    python benchmarks/suite.py [--quick] [--rounds 3]

Every measurement runs in a fresh interpreter, one after the other in the same
run, on 2 workers. The throughput measurements (asyncsched with the store off
and on, and each peer) and the CPU-bound ones (sequential, asyncsched, bare
processes) go round ``--rounds`` times, in alternating order; the table gives
the median of each, so that one burst of other load on the machine does not
decide a ratio. See benchmarks/README.md for what each one measures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

from _common import HERE, crunch, double, in_fresh_process, iterations_for, peak_rss_mb
from faults import measure as mixed_faults
from peers import PEERS
from peers import measure as measure_peers

from asyncsched import Scheduler, Task, TaskReported, TaskStarted

WORKERS = 2


def crunch_many(count: int, iterations: int) -> None:
    for _ in range(count):
        crunch(iterations)


def report_stamps(count: int) -> None:
    from asyncsched import report

    for i in range(count):
        report(progress=i / count)
        crunch(2_000)


def hang() -> None:
    time.sleep(3600)


# -- measurements (each runs in its own interpreter) ----------------------------------------------

async def throughput(n: int, store: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.db") if store else None
        async with Scheduler(workers=WORKERS, timeout=10, store=path) as scheduler:
            events = scheduler.events()
            await scheduler.run([Task(double, 1)])
            start = time.perf_counter()
            summary = await scheduler.run(Task(double, i) for i in range(n))
            elapsed = time.perf_counter() - start
            await events.aclose()
    assert summary.completed == n
    return {"tasks_per_s": n / elapsed}


async def cpu_bound(n: int, ms: float, rounds: int) -> dict[str, Any]:
    """Seconds for ``n`` tasks of ``ms`` in sequence, on asyncsched's workers and on bare processes, ``rounds``
    times in alternating order; the ratios are of the medians."""
    import multiprocessing

    iterations = iterations_for(ms)
    ctx = multiprocessing.get_context("fork")
    times: dict[str, list[float]] = {"sequential": [], "asyncsched": [], "bare": []}

    async def run(how: str) -> None:
        if how == "sequential":
            start = time.perf_counter()
            crunch_many(n, iterations)
        elif how == "asyncsched":
            async with Scheduler(workers=WORKERS) as scheduler:
                await scheduler.run([Task(crunch, 10)])
                start = time.perf_counter()
                await scheduler.run(Task(crunch, iterations) for _ in range(n))
        else:
            procs = [ctx.Process(target=crunch_many, args=(n // WORKERS, iterations)) for _ in range(WORKERS)]
            start = time.perf_counter()
            for p in procs:
                p.start()
            for p in procs:
                p.join()
        times[how].append(time.perf_counter() - start)

    for round_ in range(rounds):
        for how in list(times) if round_ % 2 == 0 else reversed(times):
            await run(how)
    sequential, ours, bare = (statistics.median(t) for t in times.values())
    return {"speedup": sequential / ours, "bare_speedup": sequential / bare, "ratio": bare / ours,
            "rounds": times}


async def memory(n: int) -> dict[str, Any]:
    pulled = 0
    yielded = 0
    ahead = 0

    def batch() -> Iterator[Task]:
        nonlocal pulled, ahead
        for i in range(n):
            pulled += 1
            ahead = max(ahead, pulled - yielded)
            yield Task(double, i)

    async with Scheduler(workers=WORKERS, timeout=10) as scheduler:
        async for _ in scheduler.stream(batch()):
            yielded += 1
    assert yielded == n
    return {"peak_rss_mb": peak_rss_mb(), "max_pulled_ahead": ahead}


async def latency(n: int) -> dict[str, Any]:
    delays: list[float] = []
    per_task = n // 4
    async with Scheduler(workers=WORKERS) as scheduler:
        events = scheduler.events()

        async def consume() -> None:
            async for event in events:
                if isinstance(event, TaskReported):
                    delays.append(time.time() - event.timestamp)
                    if len(delays) == per_task * 4:
                        return

        await asyncio.gather(scheduler.run([Task(report_stamps, per_task) for _ in range(4)]), consume())
        await events.aclose()
    return percentiles(delays)


async def result_lag(n: int, ms: float) -> dict[str, Any]:
    """From the end of a task (``finished_at``, in its worker) to its result coming out of ``stream()``."""
    iterations = iterations_for(ms)
    lags: list[float] = []
    async with Scheduler(workers=WORKERS) as scheduler:
        await scheduler.run([Task(crunch, 10)])
        async for result in scheduler.stream(Task(crunch, iterations) for _ in range(n)):
            assert result.finished_at is not None
            lags.append(time.time() - result.finished_at)
    return percentiles(lags)


def percentiles(seconds: list[float]) -> dict[str, float]:
    """The p50 and p99 of ``seconds``, in milliseconds."""
    ordered = sorted(seconds)
    return {"p50_ms": 1000 * ordered[len(ordered) // 2], "p99_ms": 1000 * ordered[int(len(ordered) * 0.99)]}


async def timeout_kill(n: int, seconds: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    lags: list[float] = []
    done = asyncio.Event()
    async with Scheduler(workers=WORKERS, timeout=seconds) as scheduler:
        events = scheduler.events()

        def watch(pid: int, deadline: float) -> None:
            fd = os.pidfd_open(pid)

            def dead() -> None:
                lags.append(time.time() - deadline)
                loop.remove_reader(fd)
                os.close(fd)
                if len(lags) == n:
                    done.set()

            loop.add_reader(fd, dead)

        async def consume() -> None:
            async for event in events:
                if isinstance(event, TaskStarted) and event.pid is not None:
                    watch(event.pid, event.timestamp + seconds)
                    if event.key == str(n - 1):
                        return

        await asyncio.gather(scheduler.run([Task(hang) for _ in range(n)]), consume())
        await done.wait()
        await events.aclose()
    return {"p50_ms": 1000 * statistics.median(lags), "max_ms": 1000 * max(lags)}


MEASURES: dict[str, Callable[..., Coroutine[Any, Any, dict[str, Any]]]] = {
    "throughput": throughput, "cpu": cpu_bound, "memory": memory, "latency": latency, "result_lag": result_lag,
    "timeout": timeout_kill, "faults": mixed_faults,
}


def one(name: str, args: list[str]) -> dict[str, Any]:
    values: list[Any] = [json.loads(a) for a in args]
    return in_fresh_process("suite.py", name, json.dumps(values))


def throughput_rounds(n: int, rounds: int) -> dict[str, list[float]]:
    """Tasks per second of asyncsched (store off, store on) and of each peer, ``rounds`` times, in alternating order."""
    names = ["store off", "store on", *PEERS]
    rates: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else reversed(names):
            if name in PEERS:
                rate = measure_peers([name], n)[name]
            else:
                rate = one("throughput", [str(n), json.dumps(name == "store on")])["tasks_per_s"]
            rates[name].append(rate)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes and one round, for a smoke run")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of the throughput and CPU-bound measurements (default 3)")
    parser.add_argument("--one", nargs=2, metavar=("NAME", "ARGS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        result = asyncio.run(MEASURES[args.one[0]](*json.loads(args.one[1])))
        print(json.dumps(result))
        return

    q = args.quick
    n_tiny, n_cpu, n_mem = (2_000, 200, 20_000) if q else (20_000, 2_000, 1_000_000)
    rows: list[tuple[str, str, str]] = []
    out: dict[str, Any] = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
                                      f"{platform.python_version()}", "workers": WORKERS}

    rates = throughput_rounds(n_tiny, 1 if q else args.rounds)
    out["throughput"] = {"rounds": rates, "median": {name: statistics.median(r) for name, r in rates.items()}}
    median = out["throughput"]["median"]
    off, on = median.pop("store off"), median.pop("store on")
    rows.append((f"1. throughput, {n_tiny:,} tiny tasks, timeouts + events, store off", f"{off:,.0f}/s", ""))
    rows.append(("   store on (SQLite)", f"{on:,.0f}/s", f"{on / off:.2f}x store off"))
    for name, rate in median.items():
        rows.append((f"   {name}", f"{rate:,.0f}/s", f"asyncsched is {off / rate:.2f}x"))

    cpu = one("cpu", [str(n_cpu), "1.0", str(1 if q else args.rounds)])
    out["cpu"] = cpu
    rows.append((f"2. CPU-bound, {n_cpu:,} x 1 ms, speedup over sequential", f"{cpu['speedup']:.2f}x",
                 f"{cpu['ratio']:.2f}x of 2 bare processes ({cpu['bare_speedup']:.2f}x)"))

    mem = one("memory", [str(n_mem)])
    out["memory"] = mem
    rows.append((f"3. memory, {n_mem:,} tasks through stream(): peak RSS", f"{mem['peak_rss_mb']:.0f} MB",
                 f"at most {mem['max_pulled_ahead']} pulled ahead"))

    lat = one("latency", ["400" if q else "2000"])
    out["latency"] = lat
    rows.append(("4. report() -> events() latency p50 / p99", f"{lat['p50_ms']:.2f} / {lat['p99_ms']:.2f} ms", ""))
    lag = one("result_lag", [str(n_cpu), "1.0"])
    out["result_lag"] = lag
    rows.append((f"   task end -> its result out of stream(), {n_cpu:,} x 1 ms, p50 / p99",
                 f"{lag['p50_ms']:.2f} / {lag['p99_ms']:.2f} ms", ""))

    kill = one("timeout", ["6" if q else "20", "0.2"])
    out["timeout"] = kill
    rows.append(("5. deadline -> worker dead, p50 / max", f"{kill['p50_ms']:.0f} / {kill['max_ms']:.0f} ms", ""))

    faults = one("faults", ["100" if q else "1000", str(WORKERS), "0.5"])
    out["faults"] = faults
    rows.append((f"6. mixed faults, {faults['tasks']:,} tasks: time against the ideal schedule",
                 f"{faults['ratio']:.2f}x", f"{len(faults['mismatches'])} statuses wrong, {faults['statuses']}"))

    width = max(len(r[0]) for r in rows)
    print(f"asyncsched benchmark suite: {out['machine']}, {WORKERS} workers")
    for label, value, note in rows:
        print(f"{label:<{width}}  {value:>16}  {note}")
    results = os.path.join(HERE, "results")
    os.makedirs(results, exist_ok=True)
    with open(os.path.join(results, "suite.json"), "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
