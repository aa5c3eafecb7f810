"""Helpers shared by the benchmarks: tiny task functions and a fresh-process runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))


def double(x: int) -> int:
    return x * 2


def crunch(iterations: int) -> int:
    """A fixed amount of pure-Python work."""
    total = 0
    for i in range(iterations):
        total += i * i % 7
    return total


def iterations_for(ms: float) -> int:
    """How many iterations of ``crunch`` take about ``ms`` milliseconds here.

    Timed by the fastest of several runs: one run slowed by the rest of the machine would make every task shorter
    than ``ms`` once the machine is quiet again, and the orchestrator's cost per task seem larger.
    """
    fastest = float("inf")
    for _ in range(7):
        start = time.perf_counter()
        crunch(100_000)
        fastest = min(fastest, time.perf_counter() - start)
    return int(100_000 * ms / 1000 / fastest)


def in_fresh_process(script: str, *args: str, checkout: str = os.path.dirname(HERE)) -> dict[str, Any]:
    """Run ``script --one ...`` in a new interpreter, so each measurement has its own RSS; return its JSON.

    The interpreter imports asyncsched from ``checkout`` (by default this one).
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([checkout, HERE]))
    out = subprocess.run([sys.executable, os.path.join(HERE, script), "--one", *args], check=True,
                         capture_output=True, text=True, env=env)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
