"""The ``asyncsched`` command line (also ``python -m asyncsched``).

Commands::

    demo      the article's scenario: simulated requests, live progress, results in SQLite
    run       call MODULE:FUNCTION once per line of JSON input, on a pool of workers

Exit status: 0 when every task completed, 1 when any did not, 2 for a usage
error (reported in one line on stderr, never with a traceback), 130 when
interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib
import inspect
import json
import os
import stat
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any, BinaryIO

from rich.console import Console
from rich.markup import escape

from . import __version__, _demo
from ._errors import AsyncschedError
from ._models import Summary, Task

__all__ = ["main"]

DEFAULT_DB = "asyncsched.db"
"""Where ``demo`` keeps its results unless ``--db`` says otherwise."""
FAILURES_SHOWN = 10
"""Tasks that did not complete listed after a run."""
MAX_LINE = 1 << 26
"""Longest input line read from a pipe, in bytes."""

Command = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """Bad input from the user: reported in one line, exit status 2."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command and return its exit status (``python -m asyncsched`` and the console script)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already reported by argparse
        return exc.code if isinstance(exc.code, int) else 2
    command: Command | None = getattr(args, "command", None)
    if command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return command(args)
    except (UsageError, AsyncschedError) as exc:
        print(f"asyncsched {args.name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"asyncsched {args.name}: interrupted", file=sys.stderr)
        return 130


# -- demo -----------------------------------------------------------------------------------


def _demo_command(args: argparse.Namespace) -> int:
    """Simulate requests, with live progress and the final statistics.

    Each request takes 0.5-3 s and succeeds with data, fails with a server error,
    or hangs until its timeout. The results are kept in a SQLite file.
    """
    batch = [Task(_demo.fetch, n, key=f"request-{n}") for n in range(1, args.tasks + 1)]
    print(f"Simulating {args.tasks} requests on {args.workers} workers: each takes "
          f"{_demo.DELAY[0]}-{_demo.DELAY[1]}s and succeeds, fails with a server error, or hangs until "
          f"its {_demo.TIMEOUT}s timeout.")
    summary = _run_loop(_schedule(batch, args))
    _print_outcome(summary, args)
    return 0


# -- run ------------------------------------------------------------------------------------


def _run_command(args: argparse.Namespace) -> int:
    r"""Call MODULE:FUNCTION once for each line of JSON input, on a pool of workers.

    Each line is one task: an array gives positional arguments, an object keyword
    arguments, and any other value is the single argument. Blank lines are skipped;
    a task's key is its line number. The input is read as the tasks run.

    examples:
      printf '[1, 2]\n[3, 4]\n' | asyncsched run operator:add --workers 2
      asyncsched run mypackage.jobs:process --input jobs.jsonl --db results.db --timeout 30
    """
    fn = load_function(args.function)
    if args.resume and args.batch_id is None:
        raise UsageError("--resume continues a batch: give its id with --batch-id")
    with _open_input(args.input) as file:
        summary = _run_loop(_schedule(tasks_from_lines(fn, read_lines(file)), args))
    _print_outcome(summary, args)
    return 0 if summary.completed == summary.total else 1


def load_function(spec: str) -> Callable[..., Any]:
    """Import ``MODULE:FUNCTION``; a :class:`UsageError` naming what is missing when it cannot be."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise UsageError(f"{spec!r} is not MODULE:FUNCTION (for example mypackage.jobs:process)")
    if os.getcwd() not in sys.path:  # as `python -m` does: a module in the working directory is found
        sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise UsageError(f"cannot import module {module_name!r}: {exc}") from None
    except Exception as exc:
        raise UsageError(f"importing module {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    for part in name.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise UsageError(f"module {module_name!r} has no function {name!r}") from None
    if not callable(target):
        raise UsageError(f"{spec} is a {type(target).__name__}, not a function")
    Task(target)  # refuses, with a clear message, what a worker could not load (a lambda, a nested function)
    return target  # type: ignore[no-any-return]


def _open_input(path: str) -> BinaryIO:
    if path == "-":
        return os.fdopen(os.dup(sys.stdin.fileno()), "rb")
    try:
        return open(path, "rb")
    except OSError as exc:
        raise UsageError(f"cannot read --input {path}: {exc.strerror}") from None


async def read_lines(file: BinaryIO) -> AsyncIterator[bytes]:
    """The lines of ``file``, one at a time, never blocking the event loop for long.

    A regular file is read directly (a disk read is quick); a pipe or a terminal,
    whose writer may be slow, through the loop's non-blocking pipe reader.
    """
    if stat.S_ISREG(os.fstat(file.fileno()).st_mode):
        for line in file:
            yield line
        return
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_LINE)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), file)
    try:
        while line := await reader.readline():
            yield line
    finally:
        transport.close()


async def tasks_from_lines(fn: Callable[..., Any], lines: AsyncIterator[bytes]) -> AsyncIterator[Task]:
    """One :class:`Task` per non-blank line of JSON, keyed by its line number.

    An array gives positional arguments, an object keyword arguments, and any
    other value is the single argument.
    """
    number = 0
    async for line in lines:
        number += 1
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as exc:
            raise UsageError(f"input line {number} is not JSON ({exc}); each line must be one JSON value: "
                             "an array of arguments, an object of keyword arguments, or the single argument") from None
        if isinstance(value, list):
            yield Task(fn, *value, key=number)
        elif isinstance(value, dict):
            yield Task(functools.partial(fn, **value), key=number)
        else:
            yield Task(fn, value, key=number)


# -- shared by demo and run -----------------------------------------------------------------


async def _schedule(batch: Any, args: argparse.Namespace) -> Summary:
    from ._scheduler import Scheduler

    async with Scheduler(workers=args.workers, store=args.db, timeout=args.timeout, retries=args.retries,
                         progress=args.progress) as scheduler:
        return await scheduler.run(batch, batch_id=args.batch_id, resume=args.resume)


def _run_loop(coroutine: Coroutine[Any, Any, Summary]) -> Summary:
    """Run on uvloop when it is installed, else on asyncio."""
    try:
        import uvloop
    except ImportError:
        factory = None
    else:
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coroutine)


def _print_outcome(summary: Summary, args: argparse.Namespace) -> None:
    console = Console(highlight=False)
    failures = [r for r in summary.results if not r.ok]
    if failures:
        console.print(f"{len(failures)} of {summary.total} tasks did not complete:")
        shown = failures[:FAILURES_SHOWN]
        width = max(len(result.key) for result in shown)
        for result in shown:
            console.print(f"  {escape(result.key):<{width}}  {result.status.value:<9}  {escape(result.error or '')}",
                          overflow="ellipsis", no_wrap=True)
        if len(failures) > FAILURES_SHOWN:
            console.print(f"  ... and {len(failures) - FAILURES_SHOWN} more")
    where = "" if args.db is None else f"; results in {args.db}"
    console.print(f"batch {summary.batch_id}: {summary.completed} of {summary.total} tasks completed "
                  f"in {summary.elapsed:.2f}s{where}")


# -- the parser -----------------------------------------------------------------------------


def _workers(value: str) -> str:
    if value in ("cpu", "io") or (value.isdigit() and int(value) > 0):
        return value
    raise argparse.ArgumentTypeError(f"{value!r} is not cpu, io or a positive number")


def _positive(kind: type[float] | type[int], *, zero: bool = False) -> Callable[[str], float]:
    def parse(value: str) -> float:
        try:
            number = kind(value)
        except ValueError:
            number = -1
        if number > 0 or (zero and number == 0):
            return number
        raise argparse.ArgumentTypeError(f"{value!r} is not a {'non-negative' if zero else 'positive'} number")

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asyncsched", description="Run batches of Python tasks on a pool of worker processes.",
        epilog="Exit status: 0 when every task completed, 1 when any did not, 2 for a usage error.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    def command(name: str, function: Command) -> argparse.ArgumentParser:
        """A subcommand whose help is the docstring of the function that runs it."""
        description = inspect.cleandoc(function.__doc__ or "")
        sub = commands.add_parser(name, help=description.split("\n")[0], description=description,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(command=function, name=name)
        return sub

    demo = command("demo", _demo_command)
    demo.add_argument("--tasks", type=_positive(int), default=50, metavar="N", help="requests to simulate (50)")
    demo.add_argument("--workers", type=_positive(int), default=10, metavar="W", help="worker processes (10)")
    demo.add_argument("--db", default=DEFAULT_DB, metavar="PATH", help=f"SQLite file for the results ({DEFAULT_DB})")
    demo.set_defaults(timeout=_demo.TIMEOUT, retries=0, progress=True, batch_id=None, resume=False)

    run = command("run", _run_command)
    run.add_argument("function", metavar="MODULE:FUNCTION", help="a module-level function, e.g. mypackage.jobs:process")
    run.add_argument("--input", default="-", metavar="FILE", help="JSON lines, one per task; - is stdin (default)")
    run.add_argument("--workers", type=_workers, default="cpu", metavar="cpu|io|N",
                     help="cpu: one worker per core (default); io: two per core; or a number")
    run.add_argument("--timeout", type=_positive(float), metavar="S", help="seconds a task may run before it is killed")
    run.add_argument("--retries", type=_positive(int, zero=True), default=0, metavar="N",
                     help="retries of a task that failed, crashed or timed out (0)")
    run.add_argument("--db", metavar="PATH", help="SQLite file to keep the results in")
    run.add_argument("--batch-id", metavar="ID", help="the batch's id (default: a new random one)")
    run.add_argument("--resume", action="store_true",
                     help="continue batch --batch-id in --db: tasks whose line has a result are not run again")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no live progress display")
    return parser
