"""The ``asyncsched`` command line (also ``python -m asyncsched``).

Commands::

    demo      the demo: simulated requests, live progress, results in SQLite
    run       call MODULE:FUNCTION once per line of JSON input, on a pool of workers
    results   stored results, as a table, JSON Lines or CSV      \
    stats     counts by status and the success rate               | read a results file; never change it,
    batches   every batch of a results file                       | and work while another process writes
    export    write stored results to a JSON Lines file          /
    serve     the web API and dashboard over a results file, running a module's registered tasks
    celery-worker  a Celery worker that runs the tasks a CeleryBackend sends (Celery's own options)

Exit status: 0 when every task completed, 1 when any did not, 2 for a usage
error or a results file that cannot be used (reported in one line on stderr,
never with a traceback), 130 when interrupted, 141 when the reader of the
output left; SIGTERM ends the process by that signal.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import dataclasses
import datetime
import errno
import functools
import importlib
import inspect
import io
import itertools
import json
import operator
import os
import queue
import shlex
import signal
import stat
import sys
import threading
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, BinaryIO, TextIO, TypeVar

from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__, _demo
from ._errors import AsyncschedError, ConfigurationError, StoreError
from ._models import (
    FINAL_STATUS_VALUES,
    FINAL_STATUSES,
    Task,
    TaskResult,
    describe,
    finite_json_float,
    is_seconds,
    no_json_constant,
    task_from_json,
)
from ._progress import QuietConsole, stats_table, success, visible

if TYPE_CHECKING:
    from ._sqlite import SQLiteStore
    from ._store import BatchInfo

__all__ = ["main"]

DEFAULT_DB = "asyncsched.db"
"""Where ``demo`` keeps its results unless ``--db`` says otherwise."""
FAILURES_SHOWN = 10
"""Tasks that did not complete listed after a run."""
OFF_TERMINAL_WIDTH = 160
"""Columns of tables and lines written to a file or a pipe rather than a terminal."""
KEY_WIDTH = 40
"""Columns of a batch id or a key in the results table, past which it is cut."""
MIN_ID_WIDTH = 8
MIN_VALUE_WIDTH = 20
"""Columns the results table keeps for a batch id or a key, and for the value, on a narrow terminal."""
MAX_LINE = 1 << 26
"""Longest input line read from a pipe, in bytes."""
MAX_UNWRITTEN = 1000
"""Results of ``run --output`` waiting for their lines to be written, past which the run waits for them."""

Command = Callable[[argparse.Namespace], int]
T = TypeVar("T")


class UsageError(Exception):
    """Bad input from the user: reported in one line, exit status 2."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command and return its exit status (``python -m asyncsched`` and the console script)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _open_standard_streams()
    if argv[:1] == ["celery-worker"]:  # its options belong to its own parser, and to Celery's
        return _celery_worker(argv[1:])
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
        with warnings.catch_warnings():
            warnings.showwarning = functools.partial(_show_warning, args.name)
            status = command(args)
        sys.stdout.flush()  # a reader that has left shows here, not as a traceback at exit
        return status
    except (UsageError, AsyncschedError) as exc:
        print(f"asyncsched {args.name}: error: {_as_options(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        after_echo = "\n" if sys.stderr.isatty() else ""  # the terminal echoed ^C where the cursor was
        print(f"{after_echo}asyncsched {args.name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (`| head`): stop quietly, as other commands do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more is flushed into the pipe
        return 141  # as a shell reports SIGPIPE
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # not written again at exit
        where = "the output" if exc.filename is None else exc.filename  # else a file of its own, in /tmp say
        print(f"asyncsched {args.name}: error: cannot write {where}: {exc.strerror}", file=sys.stderr)
        return 2


def _show_warning(name: str, message: Warning | str, *args: Any, **kwargs: Any) -> None:
    print(f"asyncsched {name}: warning: {message}", file=sys.stderr)


def _open_standard_streams() -> None:
    """Give a standard stream that was closed (`>&-`, `<&-`) /dev/null: else Python has None for it, and the
    next file opened, the event loop's own, say, would take its fd and get the output. Text that is not Unicode
    (a key made from an undecodable file name, with a lone surrogate) is written escaped, as ``\\udce9``."""
    for fd, name in enumerate(("stdin", "stdout", "stderr")):
        try:
            os.fstat(fd)
        except OSError:
            opened = os.open(os.devnull, os.O_RDWR)  # the lowest free fd: this one, as those before it are open
            if opened != fd:
                os.dup2(opened, fd)
                os.close(opened)
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, "r" if fd == 0 else "w", closefd=False))  # noqa: SIM115 - for the process
        stream = getattr(sys, name)
        if fd and isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")


def _celery_worker(argv: list[str]) -> int:
    try:
        from .backends._celery import celery_worker_main
    except ImportError as exc:
        print(f"asyncsched celery-worker: error: {exc}", file=sys.stderr)
        return 2
    return celery_worker_main(argv)


# -- demo -----------------------------------------------------------------------------------


def _demo_command(args: argparse.Namespace) -> int:
    """Simulate requests, with live progress and the final statistics.

    Each request takes 0.5-3 s and succeeds with data, fails with a server error,
    or hangs until its timeout. The results are kept in a SQLite file.
    """
    batch = _Counted(_demo_requests(args.tasks), args.tasks)  # made as they run: --tasks may be huge
    print(f"Simulating {args.tasks} requests on {args.workers} workers: each takes "
          f"{_demo.DELAY[0]}-{_demo.DELAY[1]}s and succeeds, fails with a server error, or hangs until "
          f"its {_demo.TIMEOUT}s timeout.")
    _print_outcome(_run_loop(_schedule(batch, args)), args)
    return 0


async def _demo_requests(count: int) -> AsyncIterator[Task]:
    for n in range(1, count + 1):
        yield Task(_demo.fetch, n, key=f"request-{n}")


# -- run ------------------------------------------------------------------------------------


def _run_command(args: argparse.Namespace) -> int:
    r"""Call MODULE:FUNCTION once for each line of JSON input, on a pool of workers.

    Each line is one task: an array gives positional arguments, an object keyword
    arguments, and any other value is the single argument. Blank lines are skipped;
    a task's key is its line number. The input is read as the tasks run.

    examples:
      printf '[1, 2]\n[3, 4]\n' | asyncsched run operator:add --workers 2
      asyncsched run mypackage.jobs:process --input jobs.jsonl --db results.db --timeout 30
      asyncsched run mypackage.jobs:process --input jobs.jsonl --output - | jq .response_data
    """
    fn = load_function(args.function)
    if args.resume and (args.batch_id is None or args.db is None):
        raise UsageError("--resume continues a stored batch: give its file with --db and its id with --batch-id")
    bad: list[UsageError] = []
    with _open_input(args.input) as file, _open_output(args, file) as args.output:
        batch: Any = _up_to_a_bad_line(tasks_from_lines(fn, read_lines(file)), bad)
        count = _count_lines(file)
        if count is not None:
            batch = _Counted(batch, count)
        summary = _run_loop(_schedule(batch, args))
    _print_outcome(summary, args)
    if bad:
        then = ("" if args.db is None else f", and their results are in {visible(args.db)}: fix that line, then "
                f"continue with --batch-id={visible(shlex.quote(args.batch_id))} --resume")
        raise UsageError(f"{bad[0]}. The tasks of the lines before it ran{then}")
    return 0 if summary.completed == summary.total else 1


class _Output:
    """The file of ``--output``, until the thread that writes it takes it over (:class:`_ResultLines`): closed at
    the end of the block unless it was taken. Once taken, only that thread closes it: its write may hold the file's
    lock for as long as the reader does not read, and the process must be able to end meanwhile."""

    def __init__(self, file: TextIO, *, empty: bool = False, terminal: bool = False, stdout: int | None = None) -> None:
        self._file: TextIO | None = file
        self._empty = file.fileno() if empty else None  # emptied once the batch has begun: not for a run refused
        self.terminal = terminal
        self._stdout = stdout  # a copy of this process's stdout while its fd 1 is stderr's (see _open_output)

    def take(self) -> TextIO:
        file, self._file = self._file, None
        assert file is not None
        return file

    def begun(self) -> None:
        """The batch has begun (before its first result): empty the file, unless it is appended to."""
        if self._empty is not None:
            os.ftruncate(self._empty, 0)
            self._empty = None

    def __enter__(self) -> _Output:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._file is not None:
            self._file.close()
        if self._stdout is not None:
            sys.stdout.flush()
            os.dup2(self._stdout, 1)
            os.close(self._stdout)


def _open_output(args: argparse.Namespace, source: BinaryIO) -> _Output | contextlib.nullcontext[None]:
    """The file of ``--output``, if there is one: never the input, nor a file of the results file.

    A file given by name is emptied once the batch has begun, unless it is
    resumed: a resumed run appends to what the runs before it wrote. Standard
    output is written where it points, as it was opened (``>> log``: appended
    to); this process's fd 1, which the workers inherit, then points to stderr,
    so that what tasks print does not come among the lines.
    """
    from ._sqlite import is_own_file

    path = args.output
    args.stdout_taken = path == "-" or (path is not None and _is_stdout(path))
    if path is None:
        return contextlib.nullcontext()
    what = "stdout" if args.stdout_taken else path
    if args.db is not None and is_own_file(args.db, f"/dev/fd/{sys.stdout.fileno()}" if args.stdout_taken else path):
        raise UsageError(f"--output {what} is a file of the --db results file, which writing to it would destroy: "
                         "write the results to another file")  # checked before it is opened, which would make it
    try:
        fd = os.dup(sys.stdout.fileno()) if args.stdout_taken else \
            os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if args.resume else 0), 0o666)
    except OSError as exc:
        raise UsageError(f"cannot write --output {what}: {exc.strerror}") from None
    found = os.fstat(fd)
    if os.path.samestat(found, os.fstat(source.fileno())):
        os.close(fd)
        raise UsageError(f"--output {what} is the --input file, which writing the results would destroy: write "
                         "them to another file")
    file = os.fdopen(fd, "w", encoding="utf-8")
    if not args.stdout_taken:
        return _Output(file, empty=stat.S_ISREG(found.st_mode) and not args.resume)
    sys.stdout.flush()
    stdout = os.dup(1)
    os.dup2(2, 1)
    return _Output(file, terminal=os.isatty(fd), stdout=stdout)


class _ResultLines:
    """Where ``run --output`` writes: a line of JSON for each result as its task ends, with the fields of
    ``export``.

    A thread of its own makes the lines and writes them, as many at once as
    came while its last write ran: a slow reader holds up none of the event
    loop's timers, and a large value only while the JSON encoder runs on it.
    Past MAX_UNWRITTEN results waiting, the run waits for it. A write that
    fails (a reader that left, a full disk) stops the run at once, with its
    error. At the end, also of a run that was stopped, every result that came is
    written; a second cancellation meanwhile leaves the thread behind, which does
    not hold up the exit.
    """

    def __init__(self, file: TextIO, run: asyncio.Task[Any]) -> None:
        from ._sqlite import result_line

        self._loop = asyncio.get_running_loop()
        self._run = run
        self._queue: queue.SimpleQueue[TaskResult | None] = queue.SimpleQueue()
        self._waiting = 0  # results put in the queue, not yet taken by the thread
        self._room: asyncio.Future[None] | None = None
        self._ended: asyncio.Future[BaseException | None] = self._loop.create_future()
        self._closing = False
        self._stopped = False  # the run was cancelled by a write that failed
        threading.Thread(target=self._write_lines, args=(file, result_line), name="asyncsched-output",
                         daemon=True).start()

    @classmethod
    @contextlib.asynccontextmanager
    async def writing(cls, output: _Output | None) -> AsyncIterator[_ResultLines | None]:
        """The lines written to ``output`` (None: nowhere), all of them by the end of the block, which closes it."""
        if output is None:
            yield None
            return
        run = asyncio.current_task()
        assert run is not None
        lines = cls(output.take(), run)
        cancelled = False
        try:
            yield lines
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            lines._closing = True
            lines._queue.put(None)
            interrupted = False
            while not lines._ended.done():
                try:
                    await asyncio.shield(lines._ended)
                except asyncio.CancelledError:  # a Ctrl-C or SIGTERM as it ends: what came is written first, once
                    if cancelled:
                        raise  # asked again (asyncio's own, after a third Ctrl-C): the thread is left behind
                    cancelled = interrupted = True
            if lines._stopped:
                run.uncancel()  # its error ends the run, rather than the cancellation that stopped it
            if (error := lines.error) is not None:
                raise error
            if interrupted:
                raise asyncio.CancelledError

    @property
    def error(self) -> BaseException | None:
        """What the thread's write raised, once it has."""
        return self._ended.result() if self._ended.done() else None

    async def add(self, result: TaskResult) -> None:
        if self._ended.done():
            raise self._ended.result() or RuntimeError("the output is closed")
        self._queue.put(result)
        self._waiting += 1
        if self._waiting >= MAX_UNWRITTEN:
            self._room = self._loop.create_future()
            await self._room

    def _write_lines(self, file: TextIO, line: Callable[[TaskResult], str]) -> None:
        """The thread: write the lines of the results queued, until None comes, or a write fails."""
        error: BaseException | None = None
        try:
            ending = False
            while not ending:
                results: list[TaskResult] = []
                item = self._queue.get()
                while item is not None:
                    results.append(item)
                    if len(results) == MAX_UNWRITTEN:
                        break
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                ending = item is None
                self._tell(self._took, len(results))
                file.write("".join(map(line, results)))
                file.flush()
        except BaseException as exc:  # a reader that left, a full disk; or a value that cannot make a line
            error = exc
        finally:
            with contextlib.suppress(OSError):  # what it holds is what failed to be written
                file.close()
            self._tell(self._end, error)

    def _tell(self, callback: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: a Ctrl-C left this thread behind
            self._loop.call_soon_threadsafe(callback, *args)

    def _took(self, count: int) -> None:
        self._waiting -= count
        if self._room is not None and not self._room.done():
            self._room.set_result(None)

    def _end(self, error: BaseException | None) -> None:
        self._ended.set_result(error)
        self._took(0)
        if error is not None and not self._closing:
            self._stopped = True
            self._run.cancel()


async def _up_to_a_bad_line(tasks: AsyncIterator[Task], bad: list[UsageError]) -> AsyncIterator[Task]:
    """``tasks`` until a line of input that is not one, whose error goes in ``bad``: the batch then ends as at
    the end of the input, so the tasks of the lines before it run to their end instead of being cancelled."""
    try:
        async for task in tasks:
            yield task
    except UsageError as exc:
        bad.append(exc)


def load_function(spec: str) -> Callable[..., Any]:
    """Import ``MODULE:FUNCTION``; a :class:`UsageError` naming what is missing when it cannot be."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise UsageError(f"{spec!r} is not MODULE:FUNCTION (for example mypackage.jobs:process)")
    target: Any = _import(module_name)
    for part in name.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise UsageError(f"module {module_name!r} has no function {name!r}") from None
    if not callable(target):
        kind = type(target).__name__
        raise UsageError(f"{spec} is {'an' if kind[0] in 'aeiou' else 'a'} {kind}, not a function")
    Task(target)  # refuses, with a clear message, what a worker could not load (a lambda, a nested function)
    return target  # type: ignore[no-any-return]


def _import(module_name: str) -> ModuleType:
    """Import a module as ``python -m`` would find it (the working directory first); a :class:`UsageError`
    when it cannot be."""
    _cwd_on_path()
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise UsageError(f"cannot import module {module_name!r}: {exc}") from None
    except SystemExit as exc:  # a script's own command line (argparse), run at import: no `__main__` guard
        raise UsageError(f"importing module {module_name!r} ended it (SystemExit: {exc.code}): code that runs the "
                         "module as a program goes under if __name__ == \"__main__\":") from None
    except Exception as exc:
        raise UsageError(f"importing module {module_name!r} failed: {type(exc).__name__}: {exc}") from None


def _cwd_on_path() -> None:
    """Put the working directory first on the import path, as ``python -m`` does: the user's modules are
    imported from it, and the types of pickled values."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def _open_input(path: str) -> BinaryIO:
    if path == "-":
        if sys.stdin.isatty():
            print("asyncsched run: reading one JSON value per line from the terminal; end with Ctrl-D",
                  file=sys.stderr)
        return os.fdopen(os.dup(sys.stdin.fileno()), "rb")  # a copy: closing it leaves sys.stdin open
    try:
        return open(path, "rb")
    except OSError as exc:
        raise UsageError(f"cannot read --input {path}: {exc.strerror}") from None


def _count_lines(file: BinaryIO) -> int | None:
    """How many tasks a regular file holds (its non-blank lines), read once before the run; None for a pipe."""
    if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
        return None
    start = file.tell()
    count = sum(1 for line in file if not line.isspace())
    file.seek(start)
    return count


def _when_begun(batch: Any, begun: Callable[[], None]) -> Any:
    """``batch``, whose first task pulled calls ``begun``: the scheduler pulls it once the store has begun the
    batch (not for a batch it refuses, one that exists already, say)."""

    async def tasks() -> AsyncIterator[Task]:
        begun()
        async with contextlib.aclosing(aiter(batch)) as pulled:
            async for task in pulled:
                yield task

    return _Counted(tasks(), len(batch)) if isinstance(batch, _Counted) else tasks()


class _Counted:
    """Tasks read as they run, and how many there are: the progress display then has a total and an ETA."""

    def __init__(self, tasks: AsyncIterator[Task], count: int) -> None:
        self.tasks = tasks
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __aiter__(self) -> AsyncIterator[Task]:
        return self.tasks


async def read_lines(file: BinaryIO) -> AsyncIterator[bytes]:
    """The lines of ``file``, one at a time, never blocking the event loop for long.

    A pipe, a socket or a terminal, whose writer may be slow, is read through the
    loop's non-blocking pipe reader; anything else (a regular file, whose reads
    are quick, or /dev/null, which no event loop can watch) directly.
    """
    mode = os.fstat(file.fileno()).st_mode
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or file.isatty()):
        for line in file:
            yield line
        return
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_LINE)
    fd = file.fileno()
    blocking = os.get_blocking(fd)  # shared with every copy of the fd, the terminal's stdin among them
    # a copy for the transport, which asyncio's closes at the end of the input (uvloop's does not): ours stays open
    pipe = os.fdopen(os.dup(fd), "rb", buffering=0)
    try:
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    except BaseException:
        pipe.close()
        raise
    try:
        for number in itertools.count(1):
            try:
                line = await reader.readline()
            except ValueError:  # longer than the reader's limit
                raise UsageError(f"input line {number} is longer than {MAX_LINE >> 20} MiB, the most a line read "
                                 "from a pipe may have; pass big arguments as file names instead") from None
            if not line:
                break
            yield line
    finally:
        os.set_blocking(fd, blocking)  # the reader made it non-blocking: as it was, for the shell after us
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
            value = json.loads(line, parse_constant=no_json_constant, parse_float=finite_json_float)
        except (ValueError, RecursionError) as exc:  # (nested deeper than Python's recursion limit)
            raise UsageError(f"input line {number} is not JSON ({exc}); each line must be one JSON value: "
                             "an array of arguments, an object of keyword arguments, or the single argument") from None
        yield task_from_json(fn, value, key=number)


# -- shared by demo and run -----------------------------------------------------------------


_OPTIONS = (("pass resume=True", "pass --resume"), ("another batch_id", "another --batch-id"),
            ("open it with readonly=True to query it", "query it with asyncsched results, stats or batches"),
            ("or pass a larger busy_timeout", "then run the command again"),
            ("or read it with export_jsonl, which leaves it pickled",
             "or read it with asyncsched results --format jsonl or asyncsched export, which leave it pickled"))
"""What the errors of the API advise, and what a command line does instead (tests hold both to their wording)."""


def _as_options(exc: Exception) -> str:
    text = str(exc)
    for arguments, options in _OPTIONS:
        text = text.replace(arguments, options)
    return text


@dataclasses.dataclass
class _Outcome:
    """What a run of ``run`` or ``demo`` says at its end: the counts of its batch, and the first results that
    were not ``completed`` (only those: a batch of millions of lines runs in flat memory)."""

    batch_id: str
    total: int
    completed: int
    elapsed: float
    failures: list[TaskResult]


async def _schedule(batch: Any, args: argparse.Namespace) -> _Outcome:
    from ._progress import ProgressMonitor
    from ._scheduler import Scheduler

    ran = False
    if args.batch_id is None:
        args.batch_id = uuid.uuid4().hex[:12]  # as the scheduler makes one; known here, to tell how to resume
    try:
        async with Scheduler(workers=args.workers, store=args.db, timeout=args.timeout, retries=args.retries) \
                as scheduler:
            # the file opens here: what is wrong with it is told before anything runs, with no advice to resume
            if args.resume and await scheduler.batch(args.batch_id) is None:
                print(f"asyncsched {args.name}: {args.db} has no batch {args.batch_id!r} yet: starting it",
                      file=sys.stderr)  # a typo in the id would run it all again
            failures: list[TaskResult] = []
            display = None
            if args.progress:  # on stderr when the results go to stdout: in plain lines if both are a terminal
                display = ProgressMonitor(scheduler, batch_id=args.batch_id, console=_console(
                    stderr=args.stdout_taken, plain=args.stdout_taken and args.output.terminal))

            def begun() -> None:
                if display is not None:
                    display.start()
                if args.output is not None:
                    args.output.begun()

            if display is not None or args.output is not None:  # else no layer more for each task
                batch = _when_begun(batch, begun)
            started = time.monotonic()
            output: _ResultLines | None = None
            try:
                ran = True
                async with _ResultLines.writing(args.output) as output, \
                        contextlib.aclosing(scheduler.stream(batch, batch_id=args.batch_id,
                                                             resume=args.resume)) as results:
                    async for result in results:
                        if not result.ok and len(failures) < FAILURES_SHOWN:
                            failures.append(result)
                        if output is not None:
                            await output.add(result)
            except asyncio.CancelledError:
                if scheduler._sigterm_received:  # the scheduler stops its workers, then ends the process by SIGTERM
                    print(f"asyncsched {args.name}: terminated", file=sys.stderr)
                raise
            except OSError as exc:
                if output is None or exc is not output.error or isinstance(exc, BrokenPipeError):
                    raise
                kept = (f"every result is in {args.db}, which `asyncsched export` writes, and the same command with "
                        f"--batch-id={shlex.quote(args.batch_id)} --resume runs the tasks that did not end"
                        ) if args.db else "the results of the tasks that ended after it are lost"
                raise UsageError(f"cannot write --output: {exc.strerror or exc}; {kept}") from None
            finally:
                if display is not None:
                    await display.aclose()  # the final report
            elapsed = time.monotonic() - started
            stats = await scheduler.stats(args.batch_id)  # with a resumed batch's stored results
            if len(failures) < min(FAILURES_SHOWN, stats.total - stats.completed):  # a resumed batch's, stored
                seen = {result.key for result in failures}
                stored = [result for status in FINAL_STATUSES[1:]  # every one but completed
                          for result in await scheduler.results(args.batch_id, status, limit=FAILURES_SHOWN)
                          if result.key not in seen]
                failures += sorted(stored, key=operator.attrgetter("index"))[:FAILURES_SHOWN - len(failures)]
            return _Outcome(args.batch_id, stats.total, stats.completed, elapsed,
                            sorted(failures, key=operator.attrgetter("index")))
    except StoreError as exc:  # the results it has not written yet go with this process
        again = (f". Once the file can be written, the same command with --batch-id={shlex.quote(args.batch_id)} "
                 "--resume runs the tasks whose results it does not hold") if ran else ""
        raise StoreError(f"{exc}{again}") from exc


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop when uvloop is installed, else an asyncio one: for the commands, and ``serve``."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _run_loop(coroutine: Coroutine[Any, Any, T], *, terminate: str | None = None) -> T:
    """Run on uvloop when it is installed, else on asyncio.

    Ctrl-C cancels ``coroutine``, as ``asyncio.run()`` does, and raises
    KeyboardInterrupt once it has cleaned up: stopped the workers, ended the
    batch in the store. A second Ctrl-C meanwhile (people press twice) is told
    to wait, where ``asyncio.run()`` would leave the batch half stored; a third
    ends the program at once. With ``terminate`` (the command's name), SIGTERM
    cancels it too, and once it has cleaned up (a file half written, say) ends
    the process by SIGTERM, as `run` does (its scheduler handles SIGTERM itself).
    """
    main: list[asyncio.Task[T]] = []
    interrupts = 0
    terminated = False

    def on_sigterm(signum: int, frame: Any) -> None:
        nonlocal terminated
        terminated = True
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second one ends it at once
        if main:
            main[0].get_loop().call_soon_threadsafe(main[0].cancel)

    def on_sigint(signum: int, frame: Any) -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1 and main:
            main[0].get_loop().call_soon_threadsafe(main[0].cancel)
        elif interrupts == 2 and main:
            print("\nasyncsched: stopping, as asked; Ctrl-C again to quit at once", file=sys.stderr, flush=True)
        else:
            raise KeyboardInterrupt

    async def run() -> T:
        main.append(asyncio.current_task())  # type: ignore[arg-type]
        if terminated:  # before there was a task to cancel
            coroutine.close()
            raise asyncio.CancelledError
        return await coroutine

    main_thread = threading.current_thread() is threading.main_thread()  # where Python runs signal handlers
    ours = main_thread and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if ours:
        signal.signal(signal.SIGINT, on_sigint)
    sigterm = terminate is not None and main_thread and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    if sigterm:
        signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            result = runner.run(run())
        if terminated:  # as it ended: it is done, but the process still ends as asked
            _end_by_sigterm(f"asyncsched {terminate}")
        return result
    except asyncio.CancelledError:
        if terminated:
            _end_by_sigterm(f"asyncsched {terminate}")
        if interrupts:
            raise KeyboardInterrupt from None
        raise
    finally:
        if ours:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _end_by_sigterm(name: str) -> None:
    """Say the command was terminated, and end the process by SIGTERM (143 in a shell), as it was asked to."""
    print(f"{name}: terminated", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _print_outcome(summary: _Outcome, args: argparse.Namespace) -> None:
    console = _console(stderr=args.stdout_taken)
    if failed := summary.total - summary.completed:
        console.print(f"{failed} of {summary.total} tasks did not complete:")
        width = max((len(visible(result.key)) for result in summary.failures), default=0)
        for result in summary.failures:
            console.print(f"  {visible(result.key):<{width}}  {result.status.value:<9}  {visible(result.error or '')}",
                          overflow="ellipsis", no_wrap=True, markup=False)
        if failed > len(summary.failures):
            console.print(f"  ... and {failed - len(summary.failures)} more")
    where = "" if args.db is None else \
        f"; see asyncsched results {shlex.quote(args.db)} --batch={shlex.quote(summary.batch_id)}"  # to paste
    console.print(visible(f"batch {summary.batch_id}: {summary.completed} of {summary.total} tasks completed "
                          f"in {summary.elapsed:.2f}s{where}"), soft_wrap=True, markup=False)


# -- commands that read a results file ------------------------------------------------------


def _results_command(args: argparse.Namespace) -> int:
    """Print stored results, oldest first: a table, JSON Lines, or CSV.

    JSON Lines and CSV have the fields of `asyncsched export`, and like it leave
    pickled values pickled. The file is opened read-only: it is never changed, and
    can be read while another process writes to it.
    """
    if args.format == "table":
        results = _run_loop(_read(args, lambda store: store.results(batch_id=args.batch, status=args.status,
                                                                     limit=args.limit)))
        console = _console()
        console.print(_results_table(results, with_batch=args.batch is None, width=console.width) if results
                      else "no results")
        return 0
    records = iter(_run_loop(_read(args, lambda store: store.records(batch_id=args.batch, status=args.status,
                                                                     limit=args.limit))))
    if args.format == "jsonl":
        sys.stdout.writelines(json.dumps(record) + "\n" for record in records)
        return 0
    from ._sqlite import RECORD_FIELDS

    writer = csv.DictWriter(sys.stdout, fieldnames=RECORD_FIELDS, lineterminator="\n")
    writer.writeheader()  # with no results too: the columns are known
    writer.writerows({name: _cell(value) for name, value in record.items()} for record in records)
    return 0


def _stats_command(args: argparse.Namespace) -> int:
    """Print the count of stored results for each status, and the success rate.

    For one batch (--batch) or for the whole file. The file is opened read-only.
    """
    stats = _run_loop(_read(args, lambda store: store.stats(args.batch)))
    if args.json:
        print(json.dumps({**dataclasses.asdict(stats), "success_rate": stats.json_success_rate()}))
        return 0
    console = _console()
    console.print(f"{args.db}: {'every batch' if args.batch is None else 'batch ' + args.batch}", markup=False)
    console.print(stats_table(stats))
    return 0


def _batches_command(args: argparse.Namespace) -> int:
    """List the batches of a results file, oldest first, with how many tasks completed.

    The file is opened read-only.
    """
    async def batches(store: SQLiteStore) -> list[tuple[BatchInfo, str]]:
        states = {True: "running", False: "interrupted", None: "not ended"}  # None: cannot be told here
        return [(batch, _when(batch.finished_at) if batch.finished_at is not None else
                 states[store.is_running(batch.batch_id)]) for batch in await store.batches()]

    listed = _run_loop(_read(args, batches))
    if not listed:
        print("no batches")
        return 0
    table = Table(box=box.SIMPLE_HEAD, show_edge=False)
    for name in ("batch", "name", "created", "finished", "tasks", "completed", "success"):
        table.add_column(name, justify="left" if name in ("batch", "name") else "right")
    for batch, finished in listed:
        table.add_row(_shown(batch.batch_id), _shown(batch.name or ""), _when(batch.created_at), finished,
                      str(batch.stats.total), str(batch.stats.completed), success(batch.stats))
    _console().print(table)
    return 0


def _export_command(args: argparse.Namespace) -> int:
    """Write stored results to a JSON Lines file, oldest first, one result per line.

    Each line has task_id, status, message, response_data, timestamp and
    process_id, then batch_id, index, error, error_type, traceback, attempts,
    started_at, finished_at, duration, progress and response_pickle. The
    results file is opened read-only.
    """
    if args.out == "-":  # as for run --input
        args.out = "/dev/stdout"
    try:
        count = _run_loop(_read(args, lambda store: store.export_jsonl(args.out, batch_id=args.batch)),
                          terminate="export")  # the file it writes goes
    except StoreError as exc:
        if isinstance(exc.__cause__, BrokenPipeError):  # OUT is a pipe whose reader left (`| head`): quietly
            raise exc.__cause__ from None
        raise
    if _is_stdout(args.out):  # the results fill stdout: the count goes to stderr
        print(f"exported {count} results to stdout", file=sys.stderr)
    else:
        print(f"exported {count} results to {args.out}")
    return 0


def _is_stdout(path: str) -> bool:
    """Whether ``path`` names this process's standard output (``/dev/stdout``, say), kept for the results."""
    try:
        return os.path.samestat(os.stat(path), os.fstat(sys.stdout.fileno()))
    except (OSError, ValueError):  # no such file, or a stdout without a file descriptor
        return False


async def _read(args: argparse.Namespace, query: Callable[[SQLiteStore], Awaitable[T]]) -> T:
    """Run ``query`` on the results file ``args.db`` opened read-only, once ``args.batch`` is known to be in it."""
    from ._sqlite import SQLiteStore

    _cwd_on_path()  # as for `run`: a pickled value's type may come from a module of the working directory
    async with SQLiteStore(args.db, readonly=True) as store:
        batch_id = getattr(args, "batch", None)
        if batch_id is not None and await store.batch(batch_id) is None:
            raise UsageError(f"{args.db} has no batch {batch_id!r}; `asyncsched batches {args.db}` lists them")
        return await query(store)


# -- serve ----------------------------------------------------------------------------------


def _serve_command(args: argparse.Namespace) -> int:
    """Serve the web API and the dashboard of a results file, until Ctrl-C or SIGTERM.

    With --tasks MODULE, clients can run the tasks of MODULE's `registry` (an
    asyncsched.web.TaskRegistry); without it, the server is a read-only view of
    an existing file. The dashboard is at http://HOST:PORT/asyncsched/. With a
    token (--token, or the ASYNCSCHED_TOKEN environment variable, which other
    users cannot read as they can a command line), every API request needs
    `Authorization: Bearer TOKEN`. Needs the web extra: pip install 'asyncsched[web]'.

    examples:
      asyncsched serve --db results.db --tasks mypackage.jobs
      ASYNCSCHED_TOKEN=s3cret asyncsched serve --db results.db --host 0.0.0.0 --port 9000
    """
    try:
        from .web import TaskRegistry
        from .web._serve import serve
    except ImportError as exc:
        raise UsageError(str(exc)) from None
    registry = None
    if args.tasks is not None:
        registry = getattr(_import(args.tasks), "registry", None)
        if not isinstance(registry, TaskRegistry):
            raise UsageError(f"module {args.tasks!r} has no TaskRegistry named 'registry' "
                             "(registry = asyncsched.web.TaskRegistry(), at module level)")
    stopped_by = serve(args.db, registry=registry, host=args.host, port=args.port, token=args.token,
                       workers=args.workers)
    if stopped_by == signal.SIGTERM:  # as `run` ends on SIGTERM: by that signal, once the workers are stopped
        _end_by_sigterm("asyncsched serve")
    raise KeyboardInterrupt  # Ctrl-C: main() says so, and exits 130


def _results_table(results: list[TaskResult], *, with_batch: bool, width: int) -> Table:
    """One row per result in ``width`` columns: the value or the error is cut to fit, and then the batch id and
    the key (past KEY_WIDTH, or to leave the value MIN_VALUE_WIDTH); never the status and the counts."""
    rows = []
    for result in results:
        shown = describe(result.value) if result.ok else result.error or ""
        duration = "" if result.duration is None else f"{result.duration:.3f}s"
        rows.append((*[_shown(result.batch_id)] * with_batch, _shown(result.key), result.status.value,
                     str(result.attempts), duration, _shown(shown)))
    names = ["batch"] * with_batch + ["key", "status", "attempts", "duration", "value or error"]
    widths = [min(KEY_WIDTH, max(len(name), *(cell_len(row[i]) for row in rows))) for i, name in enumerate(names)]
    padding = 3 * (len(names) - 1) + 2  # a space each side of every cell, one between cells
    ids = widths[:with_batch + 1]  # the batch id and the key: cut, down to MIN_ID_WIDTH, for the value to fit
    while sum(ids) > width - padding - sum(widths[len(ids):-1]) - MIN_VALUE_WIDTH and max(ids) > MIN_ID_WIDTH:
        ids[ids.index(max(ids))] -= 1
    widths[:len(ids)] = ids
    table = Table(box=box.SIMPLE_HEAD, show_edge=False)
    for name, column_width in zip(names[:-1], widths[:-1], strict=True):
        table.add_column(name, justify="right" if name in ("attempts", "duration") else "left", overflow="ellipsis",
                         no_wrap=True, min_width=column_width, max_width=column_width if name in ("batch", "key")
                         else None)
    table.add_column(names[-1], overflow="ellipsis", no_wrap=True,
                     max_width=max(MIN_VALUE_WIDTH, width - padding - sum(widths[:-1])))
    for row in rows:
        table.add_row(*row)
    return table


def _shown(text: str) -> str:
    """Text of a task or a batch, as a console prints it: no markup, no control characters."""
    return escape(visible(text))


def _console(*, stderr: bool = False, plain: bool = False) -> Console:
    """Where commands print: the terminal's width, or lines up to OFF_TERMINAL_WIDTH into a file or a pipe;
    ``plain``: as into a file, also on a terminal."""
    console = QuietConsole(highlight=False, stderr=stderr,  # a reader that left raises BrokenPipeError: main() -> 141
                           force_terminal=False if plain else None)
    if not console.is_terminal:
        console.width = max(console.width, OFF_TERMINAL_WIDTH)
    return console


def _cell(value: Any) -> Any:
    """A CSV cell: nested JSON stays JSON, as do true and false, and null is empty."""
    return json.dumps(value) if isinstance(value, dict | list | bool) else "" if value is None else value


def _when(timestamp: float | None) -> str:
    return "" if timestamp is None else datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


# -- the parser -----------------------------------------------------------------------------


def _file(value: str) -> str:
    if value in ("", ":memory:"):  # SQLite's names of a database in memory; leave out --db for that
        raise argparse.ArgumentTypeError(f"{value!r} is not the path of a file")
    return value


def _workers(value: str) -> str:
    from ._pool import resolve_workers  # the scheduler's own check

    try:
        resolve_workers(value)
    except ConfigurationError:
        raise argparse.ArgumentTypeError(f"{value!r} is not cpu, io or a positive number") from None
    return value


def _positive(kind: type[float] | type[int], *, zero: bool = False) -> Callable[[str], float]:
    def parse(value: str) -> float:
        try:
            number = kind(value)
        except ValueError:
            number = -1
        if not (number > 0 or (zero and number == 0)):
            raise argparse.ArgumentTypeError(f"{value!r} is not a {'non-negative' if zero else 'positive'} number")
        if not (is_seconds(number) and number < 2**63):  # inf, or past what SQLite and a timer take
            raise argparse.ArgumentTypeError(f"{value!r} is too large")
        return number

    return parse


def _batch_id(value: str) -> str:
    if not value:
        raise argparse.ArgumentTypeError("a batch id must not be empty")
    return value


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        port = 0
    if 0 < port < 65536:
        return port
    raise argparse.ArgumentTypeError(f"{value!r} is not a port number (1 to 65535)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asyncsched", description="Run batches of Python tasks on a pool of worker processes.",
        epilog="Exit status: 0 when every task completed (the commands that read a results file: 0 whatever the "
               "statuses in it), 1 when any did not, 2 for a usage error, 130 when interrupted, 141 when the reader "
               "of the output left; SIGTERM ends it by that signal.")
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
    demo.add_argument("--db", type=_file, default=DEFAULT_DB, metavar="PATH",
                      help=f"SQLite file for the results ({DEFAULT_DB})")
    demo.set_defaults(timeout=_demo.TIMEOUT, retries=0, progress=True, batch_id=None, resume=False,
                      output=None, stdout_taken=False)

    run = command("run", _run_command)
    run.add_argument("function", metavar="MODULE:FUNCTION", help="a module-level function, e.g. mypackage.jobs:process")
    run.add_argument("--input", default="-", metavar="FILE", help="JSON lines, one per task; - is stdin (default)")
    run.add_argument("--workers", type=_workers, default="cpu", metavar="cpu|io|N",
                     help="cpu: one worker per core (default); io: two per core; or a number")
    run.add_argument("--timeout", type=_positive(float), metavar="S",
                     help="seconds a task may run before it is killed (default: no limit)")
    run.add_argument("--retries", type=_positive(int, zero=True), default=0, metavar="N",
                     help="retries of a task that failed, crashed or timed out (0)")
    run.add_argument("--db", type=_file, metavar="PATH", help="SQLite file to keep the results in")
    run.add_argument("--batch-id", type=_batch_id, metavar="ID", help="the batch's id (default: a new random one)")
    run.add_argument("--resume", action="store_true",
                     help="continue batch --batch-id in --db: tasks whose line has a result are not run again")
    run.add_argument("--output", metavar="FILE",
                     help="write each result as a line of JSON as its task ends, with the fields of export (emptied "
                          "first; appended to with --resume); - is stdout (the display, the counts and what tasks "
                          "print then go to stderr)")
    run.add_argument("--no-progress", dest="progress", action="store_false",
                     help="no live progress display, nor its final report: only the line of counts")

    results = command("results", _results_command)
    results.add_argument("db", type=_file, metavar="DB", help="a results file (SQLite)")
    results.add_argument("--batch", metavar="ID", help="only this batch")
    results.add_argument("--status", choices=FINAL_STATUS_VALUES, help="only this status")
    results.add_argument("--limit", type=_positive(int), metavar="N", help="at most N results")
    results.add_argument("--format", choices=("table", "jsonl", "csv"), default="table", help="table (default)")

    stats = command("stats", _stats_command)
    stats.add_argument("db", type=_file, metavar="DB", help="a results file (SQLite)")
    stats.add_argument("--batch", metavar="ID", help="only this batch")
    stats.add_argument("--json", action="store_true", help="one JSON object instead of a table")

    batches = command("batches", _batches_command)
    batches.add_argument("db", type=_file, metavar="DB", help="a results file (SQLite)")

    export = command("export", _export_command)
    export.add_argument("db", type=_file, metavar="DB", help="a results file (SQLite)")
    export.add_argument("out", metavar="OUT.jsonl",
                        help="the JSON Lines file to write (replaced if it exists); - is stdout")
    export.add_argument("--batch", metavar="ID", help="only this batch")

    serve = command("serve", _serve_command)
    serve.add_argument("--db", type=_file, required=True, metavar="PATH", help="the results file (SQLite)")
    serve.add_argument("--tasks", metavar="MODULE",
                       help="module whose `registry` names the tasks clients may run; without it, read-only")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1: this machine only)")
    serve.add_argument("--port", type=_port, default=8080, metavar="N", help="port to listen on (8080)")
    serve.add_argument("--token", metavar="T", help="require 'Authorization: Bearer T' (default: $ASYNCSCHED_TOKEN)")
    serve.add_argument("--workers", type=_workers, default="cpu", metavar="cpu|io|N",
                       help="cpu: one worker per core (default); io: two per core; or a number")

    # Listed for --help only: main() hands its arguments to the Celery worker's own parser.
    commands.add_parser("celery-worker", add_help=False,
                        help="Start a Celery worker for CeleryBackend (--broker URL --backend URL [--concurrency N])")
    return parser
