"""The live progress display: what it counts, the plain lines off a terminal, the final report."""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import math
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from asyncsched import (
    ConfigurationError,
    ProgressMonitor,
    ProgressStatistics,
    Scheduler,
    Stats,
    Status,
    Task,
    TaskFinished,
    TaskStarted,
)
from asyncsched._progress import MESSAGE_SHOWN, QuietConsole, format_duration

from . import faults, tasks


class Output(io.StringIO):
    """A console's file that lets a test wait until some text has been written, without sleeping."""

    def __init__(self) -> None:
        super().__init__()
        self._written = asyncio.Event()

    def write(self, text: str) -> int:
        self._written.set()
        return super().write(text)

    async def wait_for(self, text: str) -> None:
        while text not in self.getvalue():
            self._written.clear()
            await self._written.wait()


def plain_console(output: io.StringIO) -> Console:
    return Console(file=output, force_terminal=False, width=200)


def statistics(**fields: object) -> ProgressStatistics:
    base: dict[str, object] = dict(finished=Stats.of({Status.COMPLETED: 3, Status.FAILED: 1}), total=10, running=2,
                                   retries=0, elapsed=8.0, average=1.5, last_message=None)
    return ProgressStatistics(**(base | fields))  # type: ignore[arg-type]


def test_statistics_derive_fraction_rate_and_eta() -> None:
    stats = statistics()
    assert (stats.done, stats.fraction, stats.rate, stats.eta) == (4, 0.4, 0.5, 12.0)
    unknown = statistics(total=None)
    assert unknown.fraction is None and unknown.eta is None
    assert statistics(finished=Stats()).eta is None  # nothing done yet: no rate to tell from


def test_plain_line_format() -> None:
    line = statistics(retries=2, last_message="[7] page 3 of 9").line()
    assert line == ("asyncsched: 4/10 (40.0%) | completed 3, failed 1, timed_out 0, crashed 0 | success 75.0% | "
                    "running 2 | retries 2 | avg 1.50s/task | 0.5 tasks/s | elapsed 0:00:08 | ETA 0:00:12 | "
                    "last: [7] page 3 of 9")
    assert statistics(total=None).line().startswith("asyncsched: 4/? | ")
    assert "ETA --:--:--" in statistics(total=None).line()
    assert "| success - |" in statistics(finished=Stats()).line()  # no task has finished: no rate yet, not 0.0%


@pytest.mark.parametrize("width", [40, 60, 80, 120])
async def test_the_bars_row_keeps_the_percentage_the_count_and_the_eta_on_one_line(width: int,
                                                                                   scheduler: Scheduler) -> None:
    output = io.StringIO()
    console = Console(file=output, width=width, force_terminal=True, color_system=None)
    monitor = ProgressMonitor(scheduler, console=console)
    console.print(monitor._view(statistics(finished=Stats.of({Status.COMPLETED: 2212}), total=4000)))
    first, second, *_ = output.getvalue().splitlines()
    assert "55.3% 2212/4000 " in first and first.endswith("ETA 0:00:06"), first  # a narrow one wrapped, mid-number
    assert ("avg 1.50s/task elapsed 0:00:08" in first) is (width >= 72)
    # the counts' row stays one row too: the statuses with no task make room, then it is cut
    assert second.startswith("completed 2212  ") and len(second) <= width, second
    assert ("failed 0" in second) is (width >= 120) and second.endswith("…") is (width <= 60), second


async def test_a_close_cancelled_as_it_stops_the_display_still_stops_it_and_reports(scheduler: Scheduler) -> None:
    output = io.StringIO()
    monitor = ProgressMonitor(scheduler, console=Console(file=output, width=100, force_terminal=True))
    monitor.start()
    closing = asyncio.ensure_future(monitor.aclose())
    await asyncio.sleep(0)  # one step: it waits for its ticker to end
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert monitor._live is not None and not monitor._live.is_started
    assert "finished 0 tasks" in output.getvalue()


def test_durations() -> None:
    assert [format_duration(s) for s in (None, 0, 59.6, 65, 3600 * 25 + 61)] == [
        "--:--:--", "0:00:00", "0:01:00", "0:01:05", "25:01:01"]


async def test_counts_every_status_retries_and_the_last_message(scheduler: Scheduler) -> None:
    batch = [Task(tasks.reporting, 1, key="reports"), Task(faults.boom, key="fails", retries=1),
             Task(faults.hang, key="hangs", timeout=0.3), Task(tasks.square, 3, key="works")]
    output = io.StringIO()
    async with ProgressMonitor(scheduler, console=plain_console(output)) as monitor:
        summary = await scheduler.run(batch)
    stats = monitor.statistics()
    assert stats.finished == Stats.of({Status.COMPLETED: 2, Status.FAILED: 1, Status.TIMED_OUT: 1})
    assert (stats.total, stats.running, stats.retries) == (4, 0, 1)
    assert stats.last_message == "[reports] step 2"
    durations = [r.duration for r in summary.results if r.duration is not None]
    assert stats.average is not None and min(durations) <= stats.average <= max(durations) + 0.1
    report = output.getvalue()
    assert "finished 4 tasks in" in report and "success rate" in report and "50.0%" in report
    assert "\x1b" not in report


async def test_what_a_task_reports_is_shown_without_its_control_characters(scheduler: Scheduler) -> None:
    async with ProgressMonitor(scheduler, console=plain_console(io.StringIO())) as monitor:
        await scheduler.run([Task(tasks.say, "\x1b[2Jcleared\nnext", key="k\r")])
    assert monitor.statistics().last_message == "[k\\r] \\x1b[2Jcleared\\nnext"  # no screen cleared, no new line


async def test_a_long_message_is_cut_once_as_it_comes(scheduler: Scheduler) -> None:
    output = Output()
    async with ProgressMonitor(scheduler, console=plain_console(output), interval=0.01) as monitor:
        await scheduler.run([Task(tasks.say, "\n" + "x" * 1_000_000, key="k" * 1000)])
        shown = monitor.statistics().last_message
        await output.wait_for("last: ")  # a plain line written with it
    assert shown is not None and len(shown) == MESSAGE_SHOWN and shown.startswith("[kkk") and shown.endswith("…")
    line = next(line for line in output.getvalue().splitlines() if "last: " in line)
    assert line.endswith(shown)


async def test_the_report_of_a_stopped_batch_says_it_stopped(scheduler: Scheduler, gate: Callable[[], str]) -> None:
    release = gate()
    events = scheduler.events(kinds=[TaskFinished])
    output = io.StringIO()
    async with ProgressMonitor(scheduler, console=plain_console(output)) as monitor:
        stuck = [Task(tasks.wait_for_file, release, key=f"stuck{i}") for i in range(3)]
        run = asyncio.ensure_future(scheduler.run([Task(tasks.square, 3, key="quick"), *stuck], batch_id="nightly"))
        assert (await anext(aiter(events))).key == "quick"
        scheduler.cancel("nightly")  # as Ctrl-C does
        summary = await run
    assert (summary.completed, summary.cancelled) == (1, 3)
    report = output.getvalue()
    assert report.startswith("stopped after ") and ": 1 task finished, 3 cancelled\n" in report, report
    stats = monitor.statistics()
    assert stats.rate == pytest.approx(1 / stats.elapsed)  # the cancelled ones are not counted


async def test_plain_lines_every_interval_off_a_terminal(scheduler: Scheduler, gate: Callable[[], str]) -> None:
    release = gate()
    batch = [Task(tasks.identity, 1), Task(tasks.identity, 2), Task(tasks.wait_for_file, release)]
    output = Output()
    async with ProgressMonitor(scheduler, console=plain_console(output), interval=0.05) as monitor:
        running = asyncio.ensure_future(scheduler.run(batch))
        await output.wait_for("asyncsched: 2/3 (66.7%) | completed 2, failed 0, timed_out 0, crashed 0 | "
                              "success 100.0% | running 1 | avg ")
        assert monitor.statistics().running_tasks[0][0] == "2"  # the gated task, still running
        await asyncio.to_thread(Path(release).touch)
        await running
    text = output.getvalue()
    lines = text.splitlines()
    assert lines[0].startswith("asyncsched: ") and " | ETA " in lines[0]
    assert "finished 3 tasks in" in text
    assert "\x1b" not in text and "\r" not in text  # no control characters off a terminal


class Gone(io.StringIO):
    """A console's file whose reader has left, as a pipe to `head` is once it has its lines."""

    def __init__(self) -> None:
        super().__init__()
        self.tried = asyncio.Event()

    def write(self, text: str) -> int:
        self.tried.set()
        raise BrokenPipeError(32, "Broken pipe")


class RichConsole(Console):
    def on_broken_pipe(self) -> None:
        self.quiet = True  # as rich's own does, without taking this process's stdout
        raise SystemExit(1)


@pytest.mark.parametrize("kind", [QuietConsole, RichConsole])
@pytest.mark.parametrize("terminal", [True, False])
async def test_a_display_whose_output_is_gone_stops_drawing_and_the_batch_goes_on(
        scheduler: Scheduler, gate: Callable[[], str], kind: type[Console], terminal: bool) -> None:
    release = gate()
    output = Gone()
    async with ProgressMonitor(scheduler, console=kind(file=output, force_terminal=terminal), interval=0.01):
        running = asyncio.ensure_future(scheduler.run([Task(tasks.square, 2), Task(tasks.wait_for_file, release)]))
        await output.tried.wait()  # a draw, while the batch runs
        await asyncio.to_thread(Path(release).touch)
        summary = await running
    assert summary.completed == 2


class Exits(io.StringIO):
    def write(self, text: str) -> int:
        raise SystemExit(3)  # a sys.exit() while it draws: a SIGTERM handler's, say


async def test_a_sys_exit_while_the_display_draws_is_not_taken_for_a_reader_that_left(scheduler: Scheduler) -> None:
    monitor = ProgressMonitor(scheduler, console=Console(file=Exits(), force_terminal=False))
    monitor.start()
    with pytest.raises(SystemExit, match="3"):
        await monitor.aclose()  # its final report


async def test_total_of_a_generator_is_unknown_until_it_is_exhausted(scheduler: Scheduler,
                                                                     gate: Callable[[], str]) -> None:
    release = gate()

    def batch() -> Iterator[Task]:
        yield Task(tasks.identity, 0)
        yield Task(tasks.wait_for_file, release)

    output = Output()
    async with ProgressMonitor(scheduler, console=plain_console(output), interval=0.05) as monitor:
        running = asyncio.ensure_future(scheduler.run(batch()))
        await output.wait_for("asyncsched: 1/2 (50.0%)")  # known once the scheduler has pulled every task
        await asyncio.to_thread(Path(release).touch)
        await running
    assert monitor.statistics().total == 2


async def test_async_generator_batch_reaches_its_total(scheduler: Scheduler) -> None:
    async def batch() -> object:
        for i in range(5):
            yield Task(tasks.square, i)

    async with ProgressMonitor(scheduler, console=plain_console(io.StringIO())) as monitor:
        await scheduler.run(batch())  # type: ignore[arg-type]
    stats = monitor.statistics()
    assert (stats.done, stats.total, stats.fraction) == (5, 5, 1.0)


async def test_a_monitor_started_mid_run_counts_the_whole_batch_and_no_finished_events(
        scheduler: Scheduler, gate: Callable[[], str]) -> None:
    release = gate()
    batch = [Task(tasks.identity, i) for i in range(3)] + [Task(tasks.wait_for_file, release, key="gated")]
    ends = scheduler.events(kinds=[TaskFinished])
    running = asyncio.ensure_future(scheduler.run(batch))
    await anext(ends)
    ran_since = time.monotonic()  # the batch began before this
    for _ in range(2):
        await anext(ends)  # the three quick tasks are done before the monitor starts
    await ends.aclose()
    async with ProgressMonitor(scheduler, console=plain_console(io.StringIO())) as monitor:
        assert TaskFinished not in scheduler._hub.wanted  # the display takes its counts from the scheduler
        at_least = time.monotonic() - ran_since
        stats = monitor.statistics()
        assert (stats.done, stats.total, stats.running) == (3, 4, 1)
        assert stats.elapsed >= at_least  # from the batch's start, as its counts: else the rate is too high
        assert [key for key, _ in stats.running_tasks] == ["gated"]
        await asyncio.to_thread(Path(release).touch)
        await running
    stats = monitor.statistics()
    assert (stats.done, stats.total, stats.running, stats.finished.completed) == (4, 4, 0, 4)


async def test_a_batch_left_before_its_end_still_has_a_total(scheduler: Scheduler) -> None:
    def endless() -> Iterator[Task]:
        for i in itertools.count():
            yield Task(tasks.square, i)

    async with ProgressMonitor(scheduler, console=plain_console(io.StringIO())) as monitor:
        for batch in (endless(), [Task(tasks.square, i) for i in range(200)]):
            async with contextlib.aclosing(scheduler.stream(batch)) as stream:
                async for _ in stream:
                    break  # the rest of the batch is cancelled; its total is what it finished
        await scheduler.run([Task(tasks.square, 1), Task(tasks.square, 2)])
        stats = monitor.statistics()  # both batches are over, the monitor still open
        assert stats.total == stats.done and stats.finished.completed >= 4 and stats.running == 0


async def test_the_total_of_a_resumed_list_leaves_out_what_is_stored(scheduler: Scheduler,
                                                                     gate: Callable[[], str]) -> None:
    await scheduler.run([Task(tasks.square, i, key=f"k{i}") for i in range(12)], batch_id="nightly")
    release = gate()
    resumed = [Task(tasks.square, i, key=f"k{i}") for i in range(3)]  # stored: not run again
    resumed += [Task(tasks.wait_for_file, release, key="new-1"), Task(tasks.square, 7, key="new-2")]
    output = io.StringIO()
    async with ProgressMonitor(scheduler, console=plain_console(output)) as monitor:
        running = asyncio.ensure_future(scheduler.run(resumed, batch_id="nightly", resume=True))
        ends = scheduler.events(kinds=[TaskFinished])
        await anext(ends)  # new-2 is done; new-1 waits for its gate
        await ends.aclose()
        assert scheduler.running() == {"nightly": 2}
        assert (monitor.statistics().done, monitor.statistics().total) == (1, 2)
        await asyncio.to_thread(Path(release).touch)
        await running
    assert monitor.statistics().skipped == 3
    assert "finished 2 tasks in " in output.getvalue() and " (3 stored before, not run again)\n" in output.getvalue()


async def test_a_batch_that_could_not_begin_is_not_counted(scheduler: Scheduler) -> None:
    await scheduler.run([Task(tasks.square, 1)], batch_id="taken")
    async with ProgressMonitor(scheduler, console=plain_console(io.StringIO())) as monitor:
        with pytest.raises(ConfigurationError, match="already exists"):
            await scheduler.run([Task(tasks.square, 2)], batch_id="taken")
        assert monitor.statistics().total is None  # no batch yet: not "0 of 0"
        await scheduler.run([Task(tasks.square, i) for i in range(3)])
    assert (monitor.statistics().done, monitor.statistics().total) == (3, 3)


async def test_a_monitor_can_watch_one_batch(scheduler: Scheduler) -> None:
    async with ProgressMonitor(scheduler, batch_id="mine", console=plain_console(io.StringIO())) as monitor:
        await scheduler.run([Task(tasks.square, 1)], batch_id="other")
        await scheduler.run([Task(tasks.square, i) for i in range(3)], batch_id="mine")
    assert (monitor.statistics().done, monitor.statistics().total) == (3, 3)


async def test_scheduler_progress_prints_a_report_for_each_batch(capsys: pytest.CaptureFixture[str]) -> None:
    async with Scheduler(workers=2, progress=True) as scheduler:
        first = await scheduler.run([Task(tasks.square, i) for i in range(3)])
        second = await scheduler.run(Task(tasks.square, i) for i in range(2))
    out = capsys.readouterr().out
    assert f"Batch {first.batch_id}: finished 3 tasks in" in out
    assert f"Batch {second.batch_id}: finished 2 tasks in" in out


async def test_batches_that_run_at_once_with_progress_share_one_display(capsys: pytest.CaptureFixture[str],
                                                                         gate: Callable[[], str]) -> None:
    release = gate()
    async with Scheduler(workers=2, progress=True) as scheduler:
        started = scheduler.events(kinds=[TaskStarted], batch_id="long")
        long = asyncio.create_task(scheduler.run([Task(tasks.wait_for_file, release)], batch_id="long"))
        await anext(started)
        await scheduler.run([Task(tasks.square, i) for i in range(3)], batch_id="short")  # while "long" runs
        assert "finished" not in capsys.readouterr().out  # the report comes as the last batch ends
        await asyncio.to_thread(Path(release).touch)
        await long
        await started.aclose()
    out = capsys.readouterr().out
    assert out.count("finished") == 1 and "finished 4 tasks in" in out and "Batch" not in out, out


async def test_a_batch_that_starts_while_the_display_closes_waits_for_it(monkeypatch: pytest.MonkeyPatch,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    live: list[ProgressMonitor] = []
    most = 0
    closing, release = asyncio.Event(), asyncio.Event()
    start, aclose = ProgressMonitor.start, ProgressMonitor.aclose

    def counted_start(self: ProgressMonitor) -> None:
        nonlocal most
        live.append(self)
        most = max(most, len(live))
        start(self)

    async def slow_aclose(self: ProgressMonitor) -> None:
        closing.set()
        await release.wait()
        await aclose(self)
        live.remove(self)

    monkeypatch.setattr(ProgressMonitor, "start", counted_start)
    monkeypatch.setattr(ProgressMonitor, "aclose", slow_aclose)
    async with Scheduler(workers=1, progress=True) as scheduler:
        entered = asyncio.Event()
        display = scheduler._display

        @contextlib.asynccontextmanager
        async def noted(batch_id: str) -> Any:
            entered.set()
            async with display(batch_id):
                yield

        first = asyncio.create_task(scheduler.run([Task(tasks.square, 1)], batch_id="a"))
        await closing.wait()  # a's display prints its report
        monkeypatch.setattr(scheduler, "_display", noted)
        second = asyncio.create_task(scheduler.run([Task(tasks.square, 2)], batch_id="b"))
        await entered.wait()  # b's display has been asked for, and has gone as far as it can
        release.set()
        await asyncio.gather(first, second)
    assert most == 1  # never two live displays
    out = capsys.readouterr().out
    assert "Batch a: finished 1 task" in out and "Batch b: finished 1 task" in out


async def test_monitor_lifecycle(scheduler: Scheduler) -> None:
    wrong: list[dict[str, Any]] = [{"interval": 0}, {"refresh_per_second": math.inf}, {"refresh_per_second": "x"},
                                   {"total": -1}, {"total": 2.5}, {"total": "x"}, {"total": True}]
    for arguments in wrong:
        name, value = next(iter(arguments.items()))
        with pytest.raises(ConfigurationError, match=f"^{name} must be .*, got {re.escape(repr(value))}$"):
            ProgressMonitor(scheduler, **arguments)
    monitor = ProgressMonitor(scheduler, console=plain_console(io.StringIO()))
    await monitor.aclose()  # never started: nothing to do
    async with monitor:
        with pytest.raises(RuntimeError, match="already started"):
            monitor.start()
    await monitor.aclose()  # a second close is a no-op


async def test_a_listener_sees_each_event_of_its_batch(scheduler: Scheduler) -> None:
    seen: list[str] = []
    listener = scheduler._hub.listen(lambda events: seen.extend(type(e).__name__ for e in events), batch_id="b")
    await scheduler.run([Task(tasks.square, 2)], batch_id="other")
    await scheduler.run([Task(tasks.square, 2)], batch_id="b")
    assert seen == ["TaskStarted", "TaskFinished"]
    listener.close()
    listener.close()  # idempotent
    await scheduler.run([Task(tasks.square, 2)], batch_id="c")
    assert len(seen) == 2 and TaskFinished not in scheduler._hub.wanted


async def test_the_final_report_counts_a_task_recorded_in_the_runs_last_turn(
        capsys: pytest.CaptureFixture[str]) -> None:
    async with Scheduler(workers=1, progress=True) as scheduler:
        # a batch item that is not a Task is recorded failed at once, in the turn in which the run ends
        summary = await scheduler.run(["not a task"], batch_id="odd")  # type: ignore[list-item]
    assert summary.failed == 1
    report = capsys.readouterr().out
    assert "finished 1 task in" in report and re.search(r"failed\s+1\s+100\.0%", report), report
