"""The live progress display, drawn with rich.

Data flow::

    Scheduler: each batch run keeps its counts (by status, retries, busy time) and its
    records (which tasks have started)  --watch: each run as it starts-->  ProgressMonitor._runs
    Scheduler --TaskReported events only--> EventListener --> ProgressMonitor._on_reports: the last message
                                                    |
                            ticker task, a few times a second: statistics() -> ProgressStatistics (frozen)
                            adds up the watched runs' counts and lists their running tasks
                                                    |
                               terminal: rich Live redraws in place (bar, %, ETA, counts, running, message)
                               otherwise: one plain line every ``interval`` seconds
                               at the end: the final report, with the total elapsed time

The monitor does not count events: it reads the counts the scheduler keeps
for each run anyway, a few times a second. Of the events it takes only the
messages tasks report (``TaskReported``), so while it is the only consumer the
scheduler builds no ``TaskFinished`` at all. That keeps the display's cost on
20,000 tiny tasks to its drawing (see ``benchmarks/progress.py``), and its
counts exact even when events would be dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from ._errors import ConfigurationError
from ._models import FINAL_STATUSES, Stats, Status, TaskReported, is_int, is_seconds

if TYPE_CHECKING:
    from ._events import EventListener
    from ._models import Event
    from ._scheduler import Scheduler, _BatchRun

__all__ = ["ProgressMonitor", "ProgressStatistics", "format_duration", "report", "stats_table"]

REFRESH_PER_SECOND = 4
"""Redraws per second on a terminal."""
PLAIN_INTERVAL = 5.0
"""Seconds between two plain lines when the output is not a terminal."""
NARROW = 72
"""A terminal narrower than this many columns shows the bar's row without the average and the elapsed time."""
RUNNING_SHOWN = 5
"""Running tasks listed on a terminal (the longest-running first)."""
MESSAGE_SHOWN = 200
"""Characters of the latest message shown, its task's key included; a longer one is cut, once, as it comes."""

_STYLES = {Status.COMPLETED: "green", Status.FAILED: "red", Status.TIMED_OUT: "yellow", Status.CRASHED: "magenta",
           Status.CANCELLED: "dim"}


@dataclass(frozen=True, slots=True)
class ProgressStatistics:
    """What a :class:`ProgressMonitor` knows at one moment.

    ``finished`` counts the tasks that reached a final status, by status
    (``finished.total`` of them); ``total`` is how many are expected, ``None``
    while unknown (a generator batch not yet exhausted). ``average`` is the mean
    duration of a finished task's last attempt, in seconds. ``skipped`` counts
    the tasks of resumed batches that had a stored result, and were not run
    again: they are in neither ``finished`` nor ``total``.
    """

    finished: Stats
    total: int | None
    running: int
    retries: int
    elapsed: float
    average: float | None
    last_message: str | None
    running_tasks: tuple[tuple[str, float], ...] = ()
    skipped: int = 0

    @property
    def done(self) -> int:
        return self.finished.total

    @property
    def fraction(self) -> float | None:
        """Done over total, between 0 and 1; ``None`` while the total is unknown."""
        if self.total is None:
            return None
        return min(1.0, self.done / self.total) if self.total else 1.0

    @property
    def rate(self) -> float:
        """Tasks finished per second since the monitor started (cancelled ones do not count)."""
        return (self.done - self.finished.cancelled) / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left at the average rate so far; ``None`` while it cannot be told."""
        if self.total is None or not self.done:
            return None
        return max(0, self.total - self.done) * self.elapsed / self.done

    def line(self) -> str:
        """The plain one-line form, written every few seconds when the output is not a terminal."""
        fraction = self.fraction
        parts = [f"{self.done}/{'?' if self.total is None else self.total}"
                 + ("" if fraction is None else f" ({fraction:.1%})"),
                 ", ".join(f"{status.value} {count}" for status, count in _counts(self.finished)),
                 f"success {success(self.finished)}",
                 f"running {self.running}"]
        if self.retries:
            parts.append(f"retries {self.retries}")
        parts += [f"avg {_seconds(self.average)}/task", f"{self.rate:.1f} tasks/s",
                  f"elapsed {format_duration(self.elapsed)}", f"ETA {format_duration(self.eta)}"]
        if self.last_message is not None:
            parts.append(f"last: {self.last_message}")
        return "asyncsched: " + " | ".join(parts)


class _Past:
    """The counts of batch runs that are over, added up (the fields a run keeps, see ``_BatchRun``)."""

    __slots__ = ("busy", "counts", "retries", "runs", "skipped", "timed", "total")

    def __init__(self) -> None:
        self.counts: Counter[Status] = Counter()
        self.retries = self.timed = self.total = self.runs = self.skipped = 0
        self.busy = 0.0

    def add(self, run: _BatchRun) -> None:
        self.counts.update(run.counts)
        self.retries += run.retries
        self.skipped += run.skipped
        self.timed += run.timed
        self.busy += run.busy
        self.total += run.total or 0  # known once the run is over
        self.runs += 1


class ProgressMonitor:
    """Shows the progress of a scheduler's batches while they run, then a final report.

    ``async with ProgressMonitor(scheduler): await scheduler.run(batch)`` watches
    every batch (or only ``batch_id``). On a terminal the display redraws in
    place ``refresh_per_second`` times a second: a bar with the percentage,
    done/total, the average time per task and the ETA, the count for each
    status, the success rate, the running tasks and the latest message a task
    reported. When the console is not a terminal (CI, a log file) it writes one
    plain line every ``interval`` seconds instead. ``total`` is how many tasks
    to expect; by default the scheduler's count is used as soon as it is known
    (at once for a list, when a generator is exhausted), and until then the
    display counts up without a percentage. ``Scheduler(progress=True)`` puts
    one around every batch.

    Nothing is done per task: the monitor reads the scheduler's counts at a
    bounded rate. Started in the middle of a batch, it counts that batch from
    its start, and so do its elapsed time, rate and ETA.
    """

    def __init__(self, scheduler: Scheduler, *, batch_id: str | None = None, total: int | None = None,
                 console: Console | None = None, refresh_per_second: float = REFRESH_PER_SECOND,
                 interval: float = PLAIN_INTERVAL) -> None:
        for name, value in (("refresh_per_second", refresh_per_second), ("interval", interval)):
            if not (is_seconds(value) and value > 0):
                raise ConfigurationError(f"{name} must be a positive, finite number, got {value!r}")
        if total is not None and not (is_int(total) and total >= 0):
            raise ConfigurationError(f"total must be None or an int of at least 0, got {total!r}")
        self.scheduler = scheduler
        self.batch_id = batch_id
        self.total = total
        self.console = console or QuietConsole()
        self.refresh_per_second = refresh_per_second
        self.interval = interval
        self._runs: list[_BatchRun] = []  # the runs watched that are still running, as of the last statistics()
        self._past = _Past()  # what the watched runs that are over added up to
        self._last_message: str | None = None
        self._listener: EventListener | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._live: Live | None = None
        self._started = 0.0
        self._closed = False
        self._gone = False  # the console's output is gone (a reader that left a pipe, say): nothing more is drawn

    async def __aenter__(self) -> ProgressMonitor:
        self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    def start(self) -> None:
        """Subscribe to the events and start drawing; ``async with`` calls it."""
        if self._listener is not None:
            raise RuntimeError("this ProgressMonitor was already started; create a new one")
        self._listener = self.scheduler._hub.listen(self._on_reports, self.batch_id, kinds=[TaskReported])
        self._started = time.monotonic()
        self.scheduler._watchers.append(self._watch)
        for run in self.scheduler._runs:
            self._watch(run)
        if self.console.is_interactive:
            self._live = Live(self._view(self.statistics()), console=self.console, auto_refresh=False)
            self._draw(self._live.start)
        self._ticker = asyncio.create_task(self._tick(), name="asyncsched-progress")

    async def aclose(self) -> None:
        """Stop listening, draw the last frame and print the final report. Idempotent."""
        if self._closed or self._listener is None:
            return
        self._closed = True
        self._listener.close()
        self.scheduler._watchers.remove(self._watch)
        try:
            if self._ticker is not None:
                self._ticker.cancel()
                await asyncio.wait([self._ticker])
        finally:  # also when this is cancelled meanwhile: the terminal is not left in the live display
            statistics = self.statistics()
            if self._live is not None:
                self._live.update(self._view(statistics))
                self._draw(self._live.stop)  # draws that last frame
            self._draw(lambda: self.console.print(report(statistics)))

    async def _tick(self) -> None:
        period = 1 / self.refresh_per_second
        next_line = time.monotonic() + self.interval
        while True:
            await asyncio.sleep(period)
            if self._live is not None:
                self._draw(self._redraw)
            elif time.monotonic() >= next_line:
                next_line += self.interval
                self._draw(self._write_line)

    def _redraw(self) -> None:
        assert self._live is not None
        self._live.update(self._view(self.statistics()), refresh=True)

    def _write_line(self) -> None:
        self.console.out(self.statistics().line(), highlight=False)

    def _draw(self, draw: Callable[[], object]) -> None:
        """Draw, unless the output is gone; a display never ends the batches it shows."""
        if self._gone:
            return
        try:
            draw()
        except (OSError, SystemExit) as exc:
            if isinstance(exc, SystemExit) and not self.console.quiet:
                raise  # not rich's answer to a broken pipe, which first makes its Console quiet: sys.exit(), say
            self._gone = True
            if self._live is not None:
                with contextlib.suppress(Exception, SystemExit):  # (an IndexError when it failed in its start)
                    self._live.stop()  # out of its live mode, and sys.stdout its own again

    def watch_every_batch(self) -> None:
        """Watch every batch from now on, and those running now (a monitor started for one batch)."""
        if self.batch_id is None or self._listener is None:
            return
        self.batch_id = None
        self._listener.close()
        self._listener = self.scheduler._hub.listen(self._on_reports, None, kinds=[TaskReported])
        for run in self.scheduler._runs:
            self._watch(run)

    def _watch(self, run: _BatchRun) -> None:
        if (self.batch_id is None or run.batch_id == self.batch_id) and run not in self._runs:
            self._runs.append(run)
            self._started = min(self._started, run.started)  # its counts are from its start: so is the rate

    def _on_reports(self, events: list[Event]) -> None:
        """Called by the scheduler's hub with each list of reports it delivers: quick, and never raises."""
        for event in reversed(events):
            if event.message is not None:
                shown = visible(f"[{event.key[:MESSAGE_SHOWN]}] {event.message[:MESSAGE_SHOWN]}")
                self._last_message = shown if len(shown) <= MESSAGE_SHOWN else shown[:MESSAGE_SHOWN - 1] + "…"
                return

    def statistics(self) -> ProgressStatistics:
        """What the monitor has counted so far."""
        live = self.scheduler._runs
        for run in [run for run in self._runs if run not in live]:  # over: kept as totals, not as a run
            self._runs.remove(run)
            if run.begun:  # else the store refused the batch: it never ran
                self._past.add(run)
        tallies: list[_BatchRun | _Past] = [self._past, *self._runs]
        counts: Counter[Status] = Counter()
        for tally in tallies:
            counts.update(tally.counts)
        finished = Stats.of(dict(counts), self.batch_id)
        timed = sum(tally.timed for tally in tallies)
        started = [(record.running_since, record.key) for run in self._runs for record in run.records.values()
                   if record.running_since is not None]
        now = time.time()
        return ProgressStatistics(
            finished=finished,
            total=self._total(finished.total),
            running=len(started),
            retries=sum(tally.retries for tally in tallies),
            elapsed=time.monotonic() - self._started if self._started else 0.0,
            average=sum(tally.busy for tally in tallies) / timed if timed else None,
            last_message=self._last_message,
            running_tasks=tuple((key, max(0.0, now - since)) for since, key in heapq.nsmallest(RUNNING_SHOWN, started)),
            skipped=sum(tally.skipped for tally in tallies),
        )

    def _total(self, done: int) -> int | None:
        if self.total is not None:
            return max(self.total, done)
        if self._closed and not self._runs:
            return done  # the final frame, with every batch over
        total = self._past.total
        for run in self._runs:
            if run.total is None:
                return None  # a generator batch not read to its end yet
            total += run.total
        return max(total, done) if self._runs or self._past.runs else None

    def _view(self, stats: ProgressStatistics) -> RenderableType:
        fraction = stats.fraction
        cells: list[RenderableType] = [
            Text("  --%" if fraction is None else f"{fraction:5.1%}", style="bold"),
            f"{stats.done}/{'?' if stats.total is None else stats.total}",
            f"avg {_seconds(stats.average)}/task",
            f"elapsed {format_duration(stats.elapsed)}",
            Text(f"ETA {format_duration(stats.eta)}", style="cyan"),
        ]
        if self.console.width < NARROW:
            del cells[2:4]  # the average and the elapsed time make way for the ETA
        bar = Table.grid(padding=(0, 1))
        bar.add_column(ratio=1, min_width=5, max_width=40)  # the bar takes what the numbers leave, up to 40
        for _ in cells:
            bar.add_column(no_wrap=True)
        bar.add_row(ProgressBar(total=None if fraction is None else 1.0, completed=fraction or 0.0, width=None,
                                pulse=fraction is None), *cells)
        rest = (f"  | success {success(stats.finished)}  | running {stats.running}"
                + (f"  | retries {stats.retries}" if stats.retries else "") + f"  | {stats.rate:.1f} tasks/s")
        counts = Text("  ".join(f"{status.value} {count}" for status, count in _counts(stats.finished)))
        if len(counts) + len(rest) > self.console.width:  # the statuses with no task make room, then it is cut
            counts = Text("  ".join(f"{status.value} {count}" for status, count in _counts(stats.finished)
                                    if count or status is Status.COMPLETED))
        for status, style in _STYLES.items():
            counts.highlight_words([f"{status.value} "], style)
        summary = Text.assemble(counts, rest, no_wrap=True, overflow="ellipsis")
        lines: list[RenderableType] = [bar, summary]
        if stats.running_tasks:
            lines.append(Text("running: " + ", ".join(f"{visible(key)} ({seconds:.1f}s)"
                                                       for key, seconds in stats.running_tasks)
                              + (" ..." if stats.running > len(stats.running_tasks) else ""), style="dim"))
        if stats.last_message is not None:
            lines.append(Text(f"last message: {stats.last_message}", overflow="ellipsis", no_wrap=True))
        return Group(*lines)


def report(stats: ProgressStatistics) -> RenderableType:
    """The final report of a monitor: counts by status, rates and the total elapsed time."""
    batch = "" if stats.finished.batch_id is None else f"Batch {visible(stats.finished.batch_id)}: "
    rates = (f"avg {_seconds(stats.average)}/task, {stats.rate:.1f} tasks/s"
             + (f", {stats.retries} retries" if stats.retries else ""))
    cancelled = stats.finished.cancelled
    if cancelled:  # stopped (Ctrl-C, cancel()): say so, the bar ends full all the same
        head = f"{batch}stopped after {_seconds(stats.elapsed)}: {_tasks(stats.done - cancelled)} finished, " \
               f"{cancelled} cancelled"
    else:
        head = f"{batch}finished {_tasks(stats.done)} in {_seconds(stats.elapsed)}"
    if stats.skipped:
        head += f" ({stats.skipped} stored before, not run again)"
    return Group(Text(head, style="bold"), stats_table(stats.finished), Text(rates))


def success(stats: Stats) -> str:
    """The success rate as a percentage, ``-`` while no task has finished."""
    return f"{stats.success_rate:.1%}" if stats.total else "-"


def _tasks(count: int) -> str:
    return f"{count} task{'' if count == 1 else 's'}"


def stats_table(stats: Stats) -> Table:
    """Counts by final status with their share, and the success rate."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False)
    table.add_column("status")
    table.add_column("tasks", justify="right")
    table.add_column("share", justify="right")
    for status, count in _counts(stats):
        table.add_row(Text(status.value, style=_STYLES[status]), str(count),
                      f"{count / stats.total:.1%}" if stats.total else "-")
    table.add_section()
    table.add_row("total", str(stats.total), "")
    table.add_row("success rate", "", success(stats))
    return table


def _count(stats: Stats, status: Status) -> int:
    count: int = getattr(stats, status.value)  # Stats has one field per final status
    return count


def _counts(stats: Stats) -> list[tuple[Status, int]]:
    """Every final status with its count, leaving out cancelled unless there are some."""
    return [(status, _count(stats, status)) for status in FINAL_STATUSES
            if status is not Status.CANCELLED or stats.cancelled]


class QuietConsole(Console):
    """rich's Console, where a reader that has left a pipe raises BrokenPipeError: rich's own raises SystemExit(1),
    which would end whatever runs, batches and a server included."""

    def on_broken_pipe(self) -> None:
        self.quiet = True  # nothing more is written
        raise BrokenPipeError


_VISIBLE = {code: repr(chr(code))[1:-1] for code in (*range(0x20), *range(0x7F, 0xA0))}


def visible(text: str) -> str:
    """``text`` with its control characters (newlines, ANSI escapes) written as escapes: what tasks say never
    moves the cursor, breaks a line or clears the screen."""
    return text.translate(_VISIBLE)


def format_duration(seconds: float | None) -> str:
    """``0:01:05`` for 65 seconds, ``--:--:--`` for an unknown duration."""
    if seconds is None:
        return "--:--:--"
    whole = int(seconds + 0.5)
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s" if value < 60 else format_duration(value)
