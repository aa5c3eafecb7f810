"""Helpers shared by the benchmarks: tiny task functions and a fresh-process runner."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
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


def checkouts(parser: argparse.ArgumentParser, against: str | None) -> dict[str, str]:
    """This checkout, and the other checkout of asyncsched that ``--against`` names, if it does."""
    sides = {"this": os.path.dirname(HERE)}
    if against:
        sides["against"] = os.path.abspath(against)
        if not os.path.isfile(os.path.join(sides["against"], "asyncsched", "__init__.py")):
            parser.error(f"{against} is not a checkout of asyncsched (it has no asyncsched/__init__.py)")
    return sides


def alternate(script: str, sides: dict[str, str], rounds: int, *args: str) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """``script --one args`` in a fresh interpreter for each of ``sides`` (see :func:`checkouts`) in each round,
    which side goes first alternating: ``(round, side, result)`` as each comes. The result's ``"asyncsched"``, the
    directory its interpreter imported asyncsched from, is checked to be in that side's checkout, and dropped."""
    for round_ in range(rounds):
        for side in sides if round_ % 2 == 0 else reversed(sides):
            result = in_fresh_process(script, *args, checkout=sides[side])
            imported = os.path.realpath(result.pop("asyncsched"))
            if not imported.startswith(os.path.realpath(sides[side]) + os.sep):
                raise SystemExit(f"the round meant for {sides[side]} imported asyncsched from {imported}")
            yield round_, side, result


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
