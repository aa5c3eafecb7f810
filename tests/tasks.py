"""Task functions for the tests: module level, so they pickle under every start method."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from asyncsched import report


def square(n: int) -> int:
    return n * n


def double(n: int) -> int:
    return n * 2


def identity(value: Any) -> Any:
    return value


def sleep_then(seconds: float, value: Any = None) -> Any:
    time.sleep(seconds)
    return value


def whoami() -> int:
    return os.getpid()


def reporting(n: int, steps: int = 3) -> int:
    for step in range(steps):
        report(message=f"step {step}", progress=(step + 1) / steps, step=step)
    return n


def add(a: int, b: int = 0) -> int:
    return a + b


def wait_for_file(path: str, value: Any = None) -> Any:
    """Block until ``path`` exists: lets a test decide when a task may finish."""
    while not os.path.exists(path):
        time.sleep(0.005)
    return value


def log_run(log: str, key: str, seconds: float = 0.0, gate: str | None = None) -> str:
    """Append ``key`` to the file ``log`` (a line per run), then sleep, then wait for ``gate`` if given."""
    with open(log, "a") as file:
        file.write(key + "\n")
    time.sleep(seconds)
    if gate is not None:
        wait_for_file(gate)
    return key


def log_and_announce(log: str, fifo: str, key: str, gate: str | None = None) -> str:
    """Append ``key`` to ``log``, write a byte to ``fifo`` if someone reads it (a second run finds no one),
    then wait for ``gate`` if given."""
    with open(log, "a") as file:
        file.write(key + "\n")
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        pass
    else:
        os.write(fd, b"x")
        os.close(fd)
    if gate is not None:
        wait_for_file(gate)
    return key


def odd_values() -> Any:
    """A value JSON cannot carry as it is: a tuple, a set, a non-finite float, a non-string key."""
    return {"tuple": (1, 2), "set": {3}, "nan": float("nan"), 4: "int key"}


def say(message: str, fail: bool = False) -> str:
    """Report ``message``; raise with it when ``fail``."""
    report(message=message)
    if fail:
        raise ValueError(message)
    return message


def print_it(text: str) -> str:
    """Print ``text`` to the worker's stdout, and return it."""
    print(f"printed: {text}", flush=True)
    return text


def report_progress(progress: float) -> None:
    report(progress=progress)


def report_a_lock() -> None:
    report("a lock does not pickle", lock=threading.Lock())


def write_at_exit(path: str, daemon_child: bool = False) -> int:
    """Registers an exit handler that writes ``path`` (and leaves a daemon child running); returns this pid."""
    import atexit
    import multiprocessing

    atexit.register(Path(path).write_text, "written at exit")
    if daemon_child:
        multiprocessing.get_context("fork").Process(target=time.sleep, args=(3600,), daemon=True).start()
    return os.getpid()


def report_each(*reports: tuple[str | None, float | None]) -> None:
    """Call ``report(message, progress)`` once for each pair, in order."""
    for message, progress in reports:
        report(message=message, progress=progress)


def scheduling_policies() -> tuple[int, int]:
    """This process's scheduling policy, and that of a child it starts."""
    code = "import os; print(os.sched_getscheduler(0))"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return os.sched_getscheduler(0), int(child.stdout)


def stdin_target(_: object = None) -> str:
    """What the worker's fd 0 is."""
    return os.readlink("/proc/self/fd/0")


ITEMS = 3


async def async_square(n: int) -> int:  # not a task: a worker runs no event loop
    return n * n


def squares(n: int) -> Iterator[int]:  # not a task: a generator cannot be sent back
    yield from (i * i for i in range(n))
