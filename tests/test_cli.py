"""The command line: every command in-process through main(argv), and the real thing in a subprocess and a pty."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import hashlib
import io
import itertools
import json
import os
import pty
import re
import select
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import asyncsched._cli
import asyncsched._sqlite
import asyncsched._store
from asyncsched import Scheduler, SQLiteStore, Status, StoreError, Task, TaskResult
from asyncsched._cli import main
from asyncsched._pool import ProcessPool

from . import tasks
from .conftest import LOOPS

ROOT = Path(__file__).resolve().parent.parent
CONSOLE_SCRIPT = Path(sys.executable).parent / "asyncsched"
COMMANDS = ["demo", "run", "results", "stats", "batches", "export", "serve"]


@pytest.fixture(autouse=True, params=sorted(LOOPS))
def commands_loop(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every command in these tests runs on each loop: uvloop's, and asyncio's, which the commands use when uvloop
    is not installed (it is an extra)."""
    monkeypatch.setattr(asyncsched._cli, "new_event_loop", LOOPS[request.param])


def write_lines(path: Path, *values: object) -> str:
    path.write_text("".join(json.dumps(value) + "\n" for value in values))
    return os.fspath(path)


@pytest.mark.parametrize("argv", [["--help"], *([command, "--help"] for command in COMMANDS)])
def test_every_command_has_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 0
    assert "usage: asyncsched" in capsys.readouterr().out


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: asyncsched" in capsys.readouterr().err


def test_run_maps_arrays_objects_and_single_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    jobs = write_lines(tmp_path / "jobs.jsonl", [1, 2], {"a": 3, "b": 4}, 5)
    assert main(["run", "tests.tasks:add", "--input", jobs, "--workers", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "3 of 3 tasks completed" in out


def test_run_exits_1_and_lists_the_tasks_that_did_not_complete(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('"fine"\n\n"bad input"\n')
    assert main(["run", "tests.faults:boom", "--input", os.fspath(jobs), "--workers", "1", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "2 of 2 tasks did not complete:" in out
    assert "  3  failed     ValueError: bad input" in out  # the key is the line number; blank lines count


def test_what_tasks_and_names_say_reaches_the_console_as_text(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    jobs = write_lines(tmp_path / "jobs.jsonl", "\x1b[2J[bold]cleared\nnext line")  # would clear the screen
    db = os.fspath(tmp_path / "r[red].db")
    assert main(["run", "tests.faults:boom", "--input", jobs, "--workers", "1", "--no-progress", "--db", db,
                 "--batch-id", "c[/]d"]) == 1  # the closing tag alone made rich raise a MarkupError
    out = capsys.readouterr().out
    assert "  1  failed     ValueError: \\x1b[2J[bold]cleared\\nnext line\n" in out
    assert "batch c[/]d: 0 of 1 tasks completed in" in out
    assert f"see asyncsched results '{db}' --batch='c[/]d'" in out  # quoted for a shell, as the brackets are
    table = read(["results", db], capsys)
    assert "c[/]d" in table and "ValueError: \\x1b[2J[bold]cleared\\nnext line" in table


def test_run_shows_progress_and_the_final_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    jobs = write_lines(tmp_path / "jobs.jsonl", *range(4))
    assert main(["run", "tests.tasks:square", "--input", jobs, "--workers", "2", "--timeout", "30",
                 "--retries", "1"]) == 0
    out = capsys.readouterr().out
    assert "finished 4 tasks in" in out and "success rate" in out and "4 of 4 tasks completed" in out


@pytest.mark.parametrize(("spec", "message"), [
    ("tests.no_such_module:f", "cannot import module 'tests.no_such_module'"),
    ("tests.tasks:no_such_function", "module 'tests.tasks' has no function 'no_such_function'"),
    ("tests.tasks", "'tests.tasks' is not MODULE:FUNCTION"),
    ("tests.tasks:os", "tests.tasks:os is a module, not a function"),
    ("tests.tasks:ITEMS", "tests.tasks:ITEMS is an int, not a function"),
    ("tests.tasks:async_square", "tests.tasks.async_square is an async function, and a worker runs no event loop"),
    ("tests.tasks:squares", "tests.tasks.squares is a generator function: what it returns, a generator, cannot be "
                            "sent back from a worker"),
])
def test_run_reports_what_cannot_be_imported_in_one_line(spec: str, message: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    jobs = write_lines(tmp_path / "jobs.jsonl", 1)
    assert main(["run", spec, "--input", jobs]) == 2
    err = capsys.readouterr().err
    assert err.startswith("asyncsched run: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_a_module_that_fails_to_import_is_one_line_too(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken_module_for_cli.py").write_text("raise RuntimeError('no config')\n")
    monkeypatch.chdir(tmp_path)  # the working directory is on the import path, as with python -m
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert main(["run", "broken_module_for_cli:f"]) == 2
    err = capsys.readouterr().err
    assert err == "asyncsched run: error: importing module 'broken_module_for_cli' failed: RuntimeError: no config\n"


def test_a_module_that_exits_as_it_is_imported_is_one_line_too(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "script_for_cli.py").write_text("import sys\nsys.exit(5)  # as argparse does on a bad command line\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert main(["run", "script_for_cli:f"]) == 2
    err = capsys.readouterr().err
    assert err == ("asyncsched run: error: importing module 'script_for_cli' ended it (SystemExit: 5): code that runs "
                   'the module as a program goes under if __name__ == "__main__":\n')


@pytest.mark.parametrize(("argv", "message"), [
    (["--workers", "0"], "argument --workers: '0' is not cpu, io or a positive number"),
    (["--workers", "²"], "argument --workers: '²' is not cpu, io or a positive number"),  # not int()'s ValueError
    (["--workers", "\uff11"], "argument --workers: '\uff11' is not cpu, io or a positive number"),  # a fullwidth 1
    (["--db", ""], "argument --db: '' is not the path of a file"),
    (["--workers", "1000000", "--input", os.devnull], "1000000 worker processes would need 11718.8 GiB at least"),
    (["--timeout", "-1"], "argument --timeout: '-1' is not a positive number"),
    (["--timeout", "inf"], "argument --timeout: 'inf' is too large"),
    (["--batch-id", ""], "argument --batch-id: a batch id must not be empty"),
    (["--retries", "x"], "argument --retries: 'x' is not a non-negative number"),
    (["--resume", "--batch-id", "b"], "--resume continues a stored batch: give its file with --db and its id"),
    (["--input", "/no/such/file"], "cannot read --input /no/such/file: No such file or directory"),
])
def test_run_usage_errors_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "tests.tasks:square", *argv]) == 2
    assert message in capsys.readouterr().err


def test_run_on_a_full_disk_says_how_to_run_what_it_could_not_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    async def disk_full(*args: Any) -> None:
        exc = sqlite3.OperationalError("database or disk is full")
        exc.sqlite_errorcode = sqlite3.SQLITE_FULL
        raise exc

    monkeypatch.setattr(asyncsched._sqlite, "_insert_results", disk_full)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("1\n2\n")
    assert main(["run", "tests.tasks:square", "--input", str(jobs), "--db", str(tmp_path / "r.db"),
                 "--batch-id", "b 1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "database or disk is full; the disk is full: free some space (the results queued stay queued while " in err
    assert err.endswith(". Once the file can be written, the same command with --batch-id='b 1' --resume runs the "
                        "tasks whose results it does not hold\n"), err


def test_run_with_a_file_that_is_not_ours_says_so_without_advice_to_resume(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(other)) as db:
        db.execute("CREATE TABLE t (x)")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("1\n")
    assert main(["run", "tests.tasks:square", "--input", str(jobs), "--db", str(other), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.endswith("is a SQLite database of another application; pass the path of an asyncsched results "
                        "file, or of a new file\n"), err  # nothing ran: no "--resume"


def test_the_api_s_advice_is_put_in_options_in_the_words_the_api_uses() -> None:
    sources = "".join(Path(module.__file__ or "").read_text() for module in (asyncsched._sqlite, asyncsched._store))
    for arguments, options in asyncsched._cli._OPTIONS:
        assert " ".join(arguments.split()) in " ".join(sources.split()), arguments  # as the stores still say it
        assert asyncsched._cli._as_options(StoreError(f"so {arguments}.")) == f"so {options}."


@pytest.mark.parametrize("port", ["0", "65536", "99999", "http"])
def test_serve_refuses_a_port_out_of_range(port: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--db", os.fspath(tmp_path / "r.db"), "--port", port]) == 2
    assert f"argument --port: {port!r} is not a port number (1 to 65535)" in capsys.readouterr().err
    assert not (tmp_path / "r.db").exists()


@pytest.mark.parametrize("via", ["--input", "stdin"])
def test_run_counts_the_tasks_of_a_file_first_for_the_progress_total(via: str, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("1\n\n2\n   \n3")  # blank lines are no tasks; the last line has no newline
    sizes: list[int] = []
    schedule = asyncsched._cli._schedule

    async def sized(batch: Any, args: Any) -> Any:
        sizes.append(len(batch))  # the scheduler takes a sized batch's len() as its total
        return await schedule(batch, args)

    monkeypatch.setattr(asyncsched._cli, "_schedule", sized)
    argv = ["run", "tests.tasks:square", "--no-progress"]
    if via == "stdin":
        with jobs.open() as stdin:
            monkeypatch.setattr(sys, "stdin", stdin)
            assert main(argv) == 0
    else:
        assert main([*argv, "--input", os.fspath(jobs)]) == 0
    assert sizes == [3]


@pytest.mark.parametrize("line", ["{not json", "[" * 10_000 + "]" * 10_000], ids=["not-json", "deeper-than-python"])
def test_run_stops_at_a_line_that_is_not_json(tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(f"1\n{line}\n2\n")
    assert main(["run", "tests.tasks:square", "--input", os.fspath(jobs), "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert "input line 2 is not JSON" in err and "each line must be one JSON value" in err
    assert err.endswith(". The tasks of the lines before it ran\n")
    assert "1 of 1 tasks completed" in out  # they did: run to their end, not cancelled with the batch


@pytest.mark.parametrize(("constant", "why"), [("NaN", "NaN is not JSON"), ("Infinity", "Infinity is not JSON"),
                                               ("-Infinity", "-Infinity is not JSON"),
                                               ("1e400", "1e400 is past the range of a float")])
def test_run_refuses_a_line_with_a_constant_python_reads_but_json_has_not(
        constant: str, why: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(f"[{constant}]\n")
    assert main(["run", "tests.tasks:square", "--input", os.fspath(jobs), "--no-progress"]) == 2
    assert f"input line 1 is not JSON ({why})" in capsys.readouterr().err


def test_a_line_that_is_not_json_says_how_to_continue_the_batch_once_it_is_fixed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    jobs, db = tmp_path / "jobs.jsonl", os.fspath(tmp_path / "results.db")
    jobs.write_text("1\n{not json\n2\n")
    assert main(["run", "tests.tasks:square", "--input", os.fspath(jobs), "--no-progress", "--db", db]) == 2
    found = re.search(r"their results are in (.+): fix that line, then continue with --batch-id=(\w+) --resume\n$",
                      capsys.readouterr().err)
    assert found is not None and found[1] == db
    stored = read(["results", db, "--format", "jsonl"], capsys).splitlines()
    assert [(r["task_id"], r["status"], r["response_data"]) for r in map(json.loads, stored)] == [("1", "completed", 1)]
    jobs.write_text("1\n3\n2\n")
    assert main(["run", "tests.tasks:square", "--input", os.fspath(jobs), "--no-progress", "--db", db,
                 "--batch-id", found[2], "--resume"]) == 0
    assert "batch" not in capsys.readouterr().err  # it has the batch: no note
    values = {r["task_id"]: r["response_data"] for r in map(json.loads, read(["results", db, "--format", "jsonl"],
                                                                               capsys).splitlines())}
    assert values == {"1": 1, "2": 9, "3": 4}


def test_resume_of_a_batch_the_file_does_not_have_says_it_starts_it(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    db = os.fspath(tmp_path / "results.db")
    assert main(["run", "tests.tasks:square", "--input", write_lines(tmp_path / "jobs.jsonl", 3), "--no-progress",
                 "--db", db, "--batch-id", "nightyl", "--resume"]) == 0
    assert capsys.readouterr().err == f"asyncsched run: {db} has no batch 'nightyl' yet: starting it\n"


def test_run_stops_at_a_piped_line_that_is_too_long(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(asyncsched._cli, "MAX_LINE", 1 << 20)
    read_end, write_end = os.pipe()

    def write() -> None:
        with contextlib.suppress(BrokenPipeError), open(write_end, "wb") as pipe:
            pipe.write(b'1\n"' + b"x" * (1 << 20) + b'"\n2\n')

    writer = threading.Thread(target=write)
    writer.start()
    with open(read_end) as stdin:
        monkeypatch.setattr(sys, "stdin", stdin)
        assert main(["run", "tests.tasks:square", "--workers", "1", "--no-progress"]) == 2
    writer.join()  # the pipe's last reader is closed: the rest of the write fails at once
    assert capsys.readouterr().err == ("asyncsched run: error: input line 2 is longer than 1 MiB, the most a line "
                                       "read from a pipe may have; pass big arguments as file names instead. The "
                                       "tasks of the lines before it ran\n")


@pytest.mark.parametrize("argv", [[], ["--input", "/dev/null"]])
def test_run_reads_dev_null_as_no_tasks(argv: list[str]) -> None:
    ran = subprocess.run([os.fspath(CONSOLE_SCRIPT), "run", "tests.tasks:square", "--no-progress", *argv], cwd=ROOT,
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert (ran.returncode, ran.stderr) == (0, "")  # no event loop can watch /dev/null: it was read directly
    assert "0 of 0 tasks completed" in ran.stdout


def test_run_leaves_its_stdin_blocking_for_the_programs_after_it(monkeypatch: pytest.MonkeyPatch) -> None:
    read_end, write_end = os.pipe()
    os.write(write_end, b"1\n2\n")
    os.close(write_end)
    with open(read_end) as stdin:
        monkeypatch.setattr(sys, "stdin", stdin)
        assert main(["run", "tests.tasks:square", "--workers", "1", "--no-progress"]) == 0
        assert os.get_blocking(stdin.fileno())  # as a shell's terminal: a `read` after us would fail with EAGAIN


@pytest.mark.skipif(not os.path.exists("/proc/self/fd/0"), reason="no /proc (Linux has it)")
def test_the_workers_stdin_is_dev_null_not_the_input_run_reads(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    jobs, db = tmp_path / "jobs.jsonl", os.fspath(tmp_path / "r.db")
    jobs.write_text("1\n")
    ran = subprocess.run([sys.executable, "-m", "asyncsched", "run", "tests.tasks:stdin_target", "--input",
                          os.fspath(jobs), "--db", db, "--no-progress"], cwd=ROOT, input="a line for run only\n",
                         capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    (stored,) = map(json.loads, read(["results", db, "--format", "jsonl"], capsys).splitlines())
    assert stored["response_data"] == "/dev/null"  # not the pipe: a program the task starts cannot take run's input


@pytest.mark.parametrize("uvloop", ["installed", "not installed"])
def test_python_m_asyncsched_reads_stdin_as_it_comes(uvloop: str) -> None:
    # without uvloop (an extra), as a plain `pip install` has it: the commands run on asyncio's loop
    hide = "sys.modules['uvloop'] = None; " if uvloop == "not installed" else ""
    program = f"import sys; {hide}from asyncsched._cli import main; sys.exit(main())"
    process = subprocess.Popen([sys.executable, "-c", program, "run", "tests.tasks:square", "--workers", "1",
                                "--no-progress"], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    out, err = process.communicate("3\n[4]\n", timeout=30)
    assert process.returncode == 0, err
    assert "2 of 2 tasks completed" in out


# -- results files ------------------------------------------------------------------------------


def test_demo_keeps_its_results_in_sqlite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = os.fspath(tmp_path / "demo.db")
    assert main(["demo", "--tasks", "4", "--workers", "4", "--db", db]) == 0
    out = capsys.readouterr().out
    assert "Simulating 4 requests" in out and "finished 4 tasks in" in out and f"asyncsched results {db}" in out
    assert main(["stats", db, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["total"] == 4 and stats["total"] == sum(stats[s] for s in ("completed", "failed", "timed_out"))


def test_the_demo_makes_its_requests_as_they_run(monkeypatch: pytest.MonkeyPatch) -> None:
    class Scheduled(Exception):
        pass

    async def schedule(batch: Any, args: Any) -> Any:
        assert len(batch) == 10**15  # for the progress display's total
        keys = []
        async for task in batch:
            keys.append(task.key)
            if len(keys) == 3:
                raise Scheduled(keys)

    monkeypatch.setattr(asyncsched._cli, "_schedule", schedule)
    with pytest.raises(Scheduled) as scheduled:  # a list of them first: out of memory
        main(["demo", "--tasks", str(10**15)])
    assert scheduled.value.args[0] == ["request-1", "request-2", "request-3"]


@pytest.fixture
def results_db(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """A results file with batch "b1": line 1 completed (3), line 2 failed, line 3 completed (7)."""
    db = os.fspath(tmp_path / "results.db")
    jobs = write_lines(tmp_path / "jobs.jsonl", [1, 2], ["x", 1], {"a": 3, "b": 4})
    assert main(["run", "tests.tasks:add", "--input", jobs, "--db", db, "--batch-id", "b1", "--workers", "1",
                 "--no-progress"]) == 1
    capsys.readouterr()
    return db


def read(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 0
    return capsys.readouterr().out


def test_results_in_every_format(results_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    lines = [json.loads(line) for line in read(["results", results_db, "--format", "jsonl"], capsys).splitlines()]
    by_key = {line["task_id"]: line for line in lines}
    assert {key: line["status"] for key, line in by_key.items()} == {"1": "completed", "2": "failed", "3": "completed"}
    assert (by_key["1"]["response_data"], by_key["3"]["response_data"]) == (3, 7)
    assert "TypeError" in by_key["2"]["error"] and by_key["2"]["batch_id"] == "b1"
    rows = list(csv.DictReader(io.StringIO(read(["results", results_db, "--format", "csv", "--status", "failed"],
                                                capsys))))
    assert [(row["task_id"], row["status"]) for row in rows] == [("2", "failed")]
    assert len(read(["results", results_db, "--format", "jsonl", "--limit", "2"], capsys).splitlines()) == 2
    table = read(["results", results_db, "--batch", "b1"], capsys)
    assert "value or error" in table and "TypeError" in table and "completed" in table
    assert "batch" not in table.splitlines()[0]  # one batch asked for: no batch column
    assert read(["results", results_db, "--status", "crashed"], capsys).strip() == "no results"
    header = read(["results", results_db, "--status", "crashed", "--format", "csv"], capsys)
    assert header.startswith("task_id,status,message,response_data,") and header.count("\n") == 1  # no rows


def test_csv_writes_true_and_false_as_json_does(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db, jobs = os.fspath(tmp_path / "r.db"), write_lines(tmp_path / "jobs.jsonl", 1, 0)
    assert main(["run", "builtins:bool", "--input", jobs, "--db", db, "--no-progress"]) == 0
    capsys.readouterr()
    rows = csv.DictReader(io.StringIO(read(["results", db, "--format", "csv"], capsys)))
    assert {row["task_id"]: row["response_data"] for row in rows} == {"1": "true", "2": "false"}  # not True


def test_results_table_cuts_a_long_value_and_no_other_column(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    db, jobs = os.fspath(tmp_path / "r.db"), tmp_path / "jobs.jsonl"
    jobs.write_text('1\n"' + "a" * 300 + '"\n')
    assert main(["run", "builtins:str", "--input", os.fspath(jobs), "--db", db, "--batch-id", "b",
                 "--no-progress"]) == 0
    capsys.readouterr()
    lines = read(["results", db], capsys).splitlines()
    assert lines[0].split() == ["batch", "key", "status", "attempts", "duration", "value", "or", "error"]
    rows = [line.split() for line in lines[2:]]
    assert [row[:4] for row in rows] == [["b", "1", "completed", "1"], ["b", "2", "completed", "1"]]
    assert rows[1][-1].startswith("'aaaa") and rows[1][-1].endswith("…")
    assert max(map(len, lines)) <= asyncsched._cli.OFF_TERMINAL_WIDTH


@pytest.mark.parametrize("width", [80, 100])
def test_on_a_narrow_terminal_the_results_table_cuts_long_ids_and_keeps_the_value(width: int) -> None:
    from rich.console import Console

    from asyncsched import Status, TaskResult

    result = TaskResult("a-batch-id-" + "x" * 40, "k" * 30, Status.TIMED_OUT, error="timed out after 1s; " + "e" * 99,
                        attempts=3, started_at=1.0, finished_at=2.5)
    console = Console(width=width, record=True)
    console.print(asyncsched._cli._results_table([result], with_batch=True, width=width))
    lines = console.export_text().splitlines()
    header, _, row = lines
    assert header.split() == ["batch", "key", "status", "attempts", "duration", "value", "or", "error"]
    assert row.split()[2:5] == ["timed_out", "3", "1.500s"] and "timed out after 1s;" in row  # the value, cut
    assert row.split()[0].startswith("a-batch") and max(map(len, lines)) <= width


def test_results_table_shows_a_value_whose_repr_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = os.fspath(tmp_path / "huge.db")
    ran = main(["run", "operator:pow", "--input", write_lines(tmp_path / "jobs.jsonl", [10, 5000]), "--db", db,
                "--workers", "1", "--no-progress"])
    assert ran == 0, capsys.readouterr()
    capsys.readouterr()
    assert main(["results", db]) == 0  # repr() of an int of 5001 digits raises ValueError
    assert "<int of 16610 bits, too long to show>" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["results", "--format", "jsonl"], ["results"], ["stats"], ["batches"]],
                         ids=["jsonl", "table", "stats", "batches"])
def test_results_into_a_pipe_its_reader_left_stop_quietly(results_db: str, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    reader, writer = os.pipe()
    os.close(reader)  # as `| head` does once it has its lines
    with os.fdopen(writer, "w") as pipe:
        monkeypatch.setattr(sys, "stdout", pipe)
        assert main([argv[0], results_db, *argv[1:]]) == 141
        monkeypatch.undo()
    assert capsys.readouterr().err == ""


def test_text_that_is_not_unicode_is_written_escaped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = os.fspath(tmp_path / "r.db")  # stdout encodes strictly, as with a locale such as en_US.UTF-8
    assert main(["run", "tests.tasks:identity", "--input", write_lines(tmp_path / "jobs.jsonl", "caf\udce9"),
                 "--db", db, "--batch-id", "b\udce9", "--no-progress"]) == 0
    assert "batch b\\udce9: 1 of 1 tasks completed" in capsys.readouterr().out
    assert main(["results", db, "--format", "csv"]) == 0  # a UnicodeEncodeError, with its traceback
    assert "caf\\udce9" in capsys.readouterr().out


@pytest.mark.filterwarnings("always::RuntimeWarning")  # as outside the tests, where warnings are not errors
def test_a_warning_is_one_line_of_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    spawn = ProcessPool._spawn
    spawns = itertools.count()

    def first_only(pool: ProcessPool) -> None:  # as with `ulimit -n 64` and 40 workers
        if next(spawns):
            raise OSError(24, "Too many open files")
        spawn(pool)

    monkeypatch.setattr(ProcessPool, "_spawn", first_only)
    assert main(["run", "tests.tasks:square", "--input", write_lines(tmp_path / "jobs.jsonl", 1, 2), "--workers", "2",
                 "--no-progress"]) == 0
    assert capsys.readouterr().err == (
        "asyncsched run: warning: could not start a worker: [Errno 24] Too many open files; the pool runs with 1 of "
        "its 2 workers, and tries again as each exits; each worker takes some six file descriptors of this process: "
        "use fewer workers, or raise the limits (ulimit -n, ulimit -u)\n")


def test_run_with_progress_into_a_pipe_its_reader_left_runs_its_batch_and_stops_quietly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    db = os.fspath(tmp_path / "r.db")
    reader, writer = os.pipe()
    os.close(reader)  # as `| head -1` does once it has its line
    with os.fdopen(writer, "w") as pipe:
        monkeypatch.setattr(sys, "stdout", pipe)
        assert main(["run", "tests.tasks:square", "--input", write_lines(tmp_path / "jobs.jsonl", *range(6)),
                     "--db", db, "--batch-id", "b", "--workers", "2"]) == 141  # the display's output is gone too
        monkeypatch.undo()
    assert capsys.readouterr().err == ""
    assert main(["stats", db, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["completed"] == 6


@pytest.mark.parametrize("closed", [">&-", "<&-", "2>&-"])
def test_a_command_with_a_standard_stream_closed_runs(results_db: str, closed: str) -> None:
    # the event loop (uvloop's aborts) or the file a command opens would take the free fd
    ran = subprocess.run(["sh", "-c", f'exec "$0" -m asyncsched stats "$1" --json {closed}', sys.executable,
                          results_db], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full (Linux has it)")
def test_a_full_disk_for_the_output_is_one_line_error(results_db: str) -> None:
    with open("/dev/full", "w") as full:
        ran = subprocess.run([sys.executable, "-m", "asyncsched", "results", results_db], cwd=ROOT, stdout=full,
                             stderr=subprocess.PIPE, text=True, timeout=60)
    assert (ran.returncode, ran.stderr) == (2, "asyncsched results: error: cannot write the output: No space left on "
                                               "device\n")


def test_export_into_a_pipe_its_reader_left_stops_quietly(results_db: str, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    reader, writer = os.pipe()
    os.close(reader)  # as `| head` does once it has its lines
    with open(os.devnull, "w") as devnull:  # a stdout with a file descriptor, as the console script's
        monkeypatch.setattr(sys, "stdout", devnull)
        try:
            assert main(["export", results_db, f"/dev/fd/{writer}"]) == 141  # OUT given as /dev/stdout, say
        finally:
            os.close(writer)
            monkeypatch.undo()
    assert capsys.readouterr().err == ""


def test_stats_batches_and_export(results_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stats = json.loads(read(["stats", results_db, "--batch", "b1", "--json"], capsys))
    assert stats == {"total": 3, "completed": 2, "failed": 1, "timed_out": 0, "crashed": 0, "cancelled": 0,
                     "batch_id": "b1", "success_rate": 2 / 3}
    table = read(["stats", results_db], capsys)
    assert "every batch" in table and "66.7%" in table
    batches = read(["batches", results_db], capsys)
    assert "b1" in batches and "66.7%" in batches
    out = tmp_path / "out.jsonl"
    assert read(["export", results_db, os.fspath(out), "--batch", "b1"], capsys).strip() == \
        f"exported 3 results to {out}"
    assert sorted(json.loads(line)["task_id"] for line in out.read_text().splitlines()) == ["1", "2", "3"]


def test_stats_of_no_result_give_no_success_rate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = os.fspath(tmp_path / "r.db")

    async def create() -> None:
        async with SQLiteStore(db):  # a file with the schema and no result
            pass

    asyncio.run(create())
    assert "success rate -" in " ".join(read(["stats", db], capsys).split())
    assert json.loads(read(["stats", db, "--json"], capsys))["success_rate"] is None  # not 0.0: nothing failed


@pytest.mark.parametrize("out", ["/dev/stdout", "-"])
def test_export_to_dev_stdout_writes_into_the_pipe_and_reports_on_stderr(results_db: str, out: str,
                                                                         tmp_path: Path) -> None:
    exported = subprocess.run([os.fspath(CONSOLE_SCRIPT), "export", results_db, out], capture_output=True,
                              text=True, timeout=60, cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert sorted(json.loads(line)["task_id"] for line in exported.stdout.splitlines()) == ["1", "2", "3"]
    assert exported.stderr == "exported 3 results to stdout\n"
    assert not (tmp_path / "-").exists()


SIGTERM_IN_AN_EXPORT = """
import asyncio, os, signal, sys
import asyncsched._sqlite

async def export_jsonl(self, path, batch_id=None):
    async with asyncsched._sqlite._replacing(path) as out:  # a file written under a temporary name
        await out.write("{}\\n")
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.Event().wait()

asyncsched._sqlite.SQLiteStore.export_jsonl = export_jsonl
from asyncsched._cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_in_an_export_leaves_no_file_half_written(results_db: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    ended = subprocess.run([sys.executable, "-c", SIGTERM_IN_AN_EXPORT, "export", results_db,
                            os.fspath(out / "r.jsonl")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (ended.returncode, ended.stderr) == (-signal.SIGTERM, "asyncsched export: terminated\n")
    assert os.listdir(out) == []  # its .partial file was left behind


def test_a_sigterm_before_the_command_has_its_task_still_ends_it(monkeypatch: pytest.MonkeyPatch) -> None:
    ended: list[str] = []
    monkeypatch.setattr(asyncsched._cli, "_end_by_sigterm", ended.append)  # not this process, in a test
    new_event_loop = asyncsched._cli.new_event_loop

    def sigterm_then_a_loop() -> asyncio.AbstractEventLoop:
        os.kill(os.getpid(), signal.SIGTERM)  # as the loop is made: no task to cancel yet
        return new_event_loop()

    monkeypatch.setattr(asyncsched._cli, "new_event_loop", sigterm_then_a_loop)
    ran: list[bool] = []

    async def export() -> None:
        ran.append(True)

    with pytest.raises(asyncio.CancelledError):
        asyncsched._cli._run_loop(export(), terminate="export")
    assert (ended, ran) == (["asyncsched export"], [])  # it ran to its end, and the process exited 0


def test_export_to_stdout_writes_where_the_shell_points_it(results_db: str, tmp_path: Path) -> None:
    out = tmp_path / "all.jsonl"
    out.write_text("an earlier line\n")
    script = 'exec >> "$1"; echo header; "$0" export "$2" -; echo footer'  # appended, among other output
    subprocess.run(["sh", "-c", script, os.fspath(CONSOLE_SCRIPT), os.fspath(out), results_db], check=True,
                   timeout=60)
    lines = out.read_text().splitlines()
    assert lines[:2] == ["an earlier line", "header"] and lines[-1] == "footer"
    assert sorted(json.loads(line)["task_id"] for line in lines[2:-1]) == ["1", "2", "3"]


def test_export_refuses_to_write_over_the_results_file(results_db: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    own = [results_db, f"{results_db}-wal", f"{results_db}-shm"]
    before = Path(results_db).read_bytes()
    os.link(results_db, tmp_path / "another-name.db")
    for out in [*own, os.fspath(tmp_path / "another-name.db")]:
        assert main(["export", results_db, out]) == 2
        err = capsys.readouterr().err
        assert f"cannot export to {out}: it is the result store {results_db} itself" in err and "Traceback" not in err
    assert Path(results_db).read_bytes() == before
    assert not any(b"task_id" in Path(path).read_bytes() for path in own if Path(path).exists())
    assert json.loads(read(["stats", results_db, "--json"], capsys))["total"] == 3


def test_read_commands_report_bad_files_and_batches(results_db: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.db"
    for argv in (["stats", os.fspath(missing)], ["results", os.fspath(tmp_path / "jobs.jsonl")],
                 ["results", results_db, "--batch", "nope"], ["results", results_db, "--status", "nope"],
                 ["results", results_db, "--limit", str(2**63)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "error: " in err and "Traceback" not in err
    assert not missing.exists()  # reading never creates a file
    assert main(["stats", os.fspath(tmp_path)]) == 2
    assert f"error: {tmp_path} is a directory: pass the path of an asyncsched results file" in capsys.readouterr().err
    assert main(["export", results_db, os.fspath(tmp_path / "out.jsonl"), "--batch", "nope"]) == 2
    assert "has no batch 'nope'" in capsys.readouterr().err
    (tmp_path / "empty.db").touch()  # what a run stopped as it opened the file leaves
    assert main(["stats", os.fspath(tmp_path / "empty.db")]) == 2
    assert "holds no asyncsched results: it is empty" in capsys.readouterr().err


def test_results_unpickle_values_as_run_imports_and_jsonl_and_csv_leave_them_pickled(tmp_path: Path) -> None:
    (tmp_path / "point_for_cli.py").write_text("class Point:\n    def __init__(self, x): self.x = x\n"
                                               "    def __repr__(self): return f'Point({self.x})'\n"
                                               "def make(x): return Point(x)\n")
    jobs = write_lines(tmp_path / "jobs.jsonl", 1, 2)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def console_script(*argv: str, cwd: Path = tmp_path) -> subprocess.CompletedProcess[str]:
        # not python -m, which puts the working directory on the import path itself
        return subprocess.run([os.fspath(CONSOLE_SCRIPT), *argv], cwd=cwd, capture_output=True, text=True,
                              timeout=60)

    ran = console_script("run", "point_for_cli:make", "--input", jobs, "--db", "r.db", "--workers", "1",
                         "--no-progress")
    assert ran.returncode == 0, ran.stderr
    shown = console_script("results", "r.db")
    assert shown.returncode == 0 and "Point(1)" in shown.stdout and "Point(2)" in shown.stdout, shown.stderr
    lines = console_script("results", "../r.db", "--format", "jsonl", cwd=elsewhere)  # Point cannot be imported
    assert lines.returncode == 0, lines.stderr
    assert [json.loads(line)["response_pickle"] is not None for line in lines.stdout.splitlines()] == [True, True]
    rows = console_script("results", "../r.db", "--format", "csv", cwd=elsewhere)
    assert rows.returncode == 0 and len(list(csv.DictReader(io.StringIO(rows.stdout)))) == 2, rows.stderr
    table = console_script("results", "../r.db", cwd=elsewhere)
    assert table.returncode == 2 and "cannot be unpickled here" in table.stderr and "Traceback" not in table.stderr
    assert "or read it with asyncsched results --format jsonl or asyncsched export, which leave it pickled" in (
        table.stderr)  # not the API's export_jsonl


def test_resume_runs_only_the_lines_without_a_result(results_db: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    jobs = write_lines(tmp_path / "more.jsonl", [1, 2], ["x", 1], {"a": 3, "b": 4}, [10, 20])
    argv = ["run", "tests.tasks:add", "--input", jobs, "--db", results_db, "--batch-id", "b1"]
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 1  # line 2 still failed: its result is kept, not run again
    out = capsys.readouterr().out
    assert "finished 1 task in" in out and "3 of 4 tasks completed" in out
    assert "1 of 4 tasks did not complete:\n  2  failed     TypeError: " in out  # the stored failure, listed
    lines = read(["results", results_db, "--format", "jsonl"], capsys).splitlines()
    assert {json.loads(line)["task_id"]: json.loads(line)["response_data"] for line in lines}["4"] == 30


def test_run_output_has_a_line_for_each_result_as_export_writes_it(results_db: str, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text("what was there before\n" * 100)  # emptied first
    jobs = write_lines(tmp_path / "more.jsonl", [1, 2], ["x", 1], {"a": 3, "b": 4}, [10, 20])
    assert main(["run", "tests.tasks:add", "--input", jobs, "--db", results_db, "--batch-id", "b2",
                 "--output", os.fspath(out), "--no-progress"]) == 1
    assert "1 of 4 tasks did not complete:" in capsys.readouterr().out
    written = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda r: r["index"])
    read(["export", results_db, os.fspath(tmp_path / "exported.jsonl"), "--batch", "b2"], capsys)
    exported = [json.loads(line) for line in (tmp_path / "exported.jsonl").read_text().splitlines()]
    assert written == sorted(exported, key=lambda r: r["index"])
    assert [(r["task_id"], r["status"], r["response_data"]) for r in written] == [
        ("1", "completed", 3), ("2", "failed", None), ("3", "completed", 7), ("4", "completed", 30)]
    assert "TypeError" in written[1]["error"] and "Traceback" in written[1]["traceback"]


def test_run_output_to_stdout_leaves_it_to_the_lines(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    jobs = write_lines(tmp_path / "jobs.jsonl", *range(3))
    assert main(["run", "tests.tasks:square", "--input", jobs, "--workers", "2", "--output", "-"]) == 0
    out, err = capfd.readouterr()
    assert sorted(json.loads(line)["response_data"] for line in out.splitlines()) == [0, 1, 4]
    assert "finished 3 tasks in" in err and "3 of 3 tasks completed" in err  # the report and the counts


@pytest.mark.parametrize("which", ["input", "db", "db-wal", "db-shm"])
def test_run_output_is_never_the_input_nor_a_file_of_the_results(which: str, results_db: str, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    jobs = write_lines(tmp_path / "more.jsonl", [1, 2])
    before = {path: Path(path).read_bytes() for path in (jobs, results_db)}
    target = jobs if which == "input" else results_db + which[2:]
    assert main(["run", "tests.tasks:add", "--input", jobs, "--db", results_db, "--output", target]) == 2
    what = "the --input file" if which == "input" else "a file of the --db results file"
    assert capsys.readouterr().err.startswith(f"asyncsched run: error: --output {target} is {what}, which ")
    assert {path: Path(path).read_bytes() for path in before} == before
    assert not os.path.exists(results_db + "-shm")  # not made either (SQLite makes it when it opens the file)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full (Linux has it)")
def test_run_output_on_a_full_disk_stops_the_run_with_a_one_line_error(tmp_path: Path, gate: Callable[[], str],
                                                                       capfd: pytest.CaptureFixture[str]) -> None:
    jobs = write_lines(tmp_path / "jobs.jsonl", [os.fspath(tmp_path), 1], [gate(), 2])  # the second never ends
    db = os.fspath(tmp_path / "r.db")
    assert main(["run", "tests.tasks:wait_for_file", "--input", jobs, "--workers", "2", "--output", "/dev/full",
                 "--no-progress", "--db", db, "--batch-id", "b"]) == 2
    assert capfd.readouterr().err == (
        f"asyncsched run: error: cannot write --output: No space left on device; every result is in {db}, which "
        "`asyncsched export` writes, and the same command with --batch-id=b --resume runs the tasks that did not "
        "end\n")


class HeldFile(io.StringIO):
    """An output file whose writes wait until ``release`` is set, then raise ``error`` if one is given."""

    def __init__(self, error: OSError | None = None) -> None:
        super().__init__()
        self.entered, self.release, self.error = threading.Event(), threading.Event(), error
        self.text = ""

    def write(self, text: str) -> int:
        self.entered.set()
        assert self.release.wait(30)
        if self.error is not None:
            raise self.error
        self.text += text
        return len(text)

    def close(self) -> None:
        pass


def a_result(key: int) -> TaskResult:
    return TaskResult("b", str(key), Status.COMPLETED, value=key, attempts=1, index=key)


@pytest.mark.parametrize("when", ["running", "ending"])
async def test_output_lines_are_made_and_written_off_the_loop_and_a_stopped_run_writes_them_all(
        when: str, monkeypatch: pytest.MonkeyPatch) -> None:
    made_in: set[str] = set()

    def result_line(result: TaskResult) -> str:  # a value of many MB takes seconds: not on the loop
        made_in.add(threading.current_thread().name)
        return f"{result.key}\n"

    monkeypatch.setattr(asyncsched._sqlite, "result_line", result_line)
    file = HeldFile()

    async def run() -> None:
        async with asyncsched._cli._ResultLines.writing(asyncsched._cli._Output(file)) as lines:
            assert lines is not None
            for key in range(3):
                await lines.add(a_result(key))
            if when == "running":
                await asyncio.Event().wait()  # until cancelled, as by Ctrl-C
            # else it ends, and waits for the writes

    running = asyncio.ensure_future(run())
    await asyncio.to_thread(file.entered.wait, 30)  # a slow reader: the first write waits
    running.cancel()
    for _ in range(10):
        await asyncio.sleep(0)  # (the cancellation reaches the block, which waits for the writes)
    assert not running.done()
    file.release.set()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert sorted(file.text.split()) == ["0", "1", "2"] and made_in == {"asyncsched-output"}


async def test_a_second_cancellation_leaves_the_output_to_its_thread() -> None:
    file = HeldFile()

    async def run() -> None:
        async with asyncsched._cli._ResultLines.writing(asyncsched._cli._Output(file)) as lines:
            assert lines is not None
            await lines.add(a_result(0))
            await asyncio.Event().wait()

    running = asyncio.ensure_future(run())
    await asyncio.to_thread(file.entered.wait, 30)  # a reader that does not read
    running.cancel()  # Ctrl-C: the run stops, and waits for the writes
    for _ in range(10):
        await asyncio.sleep(0)
    running.cancel()  # as asyncio's runner does after a third Ctrl-C: the process may now end
    with pytest.raises(asyncio.CancelledError):
        await running
    file.release.set()  # (the thread ends)


@pytest.mark.parametrize("when", ["running", "closing"])
async def test_a_write_that_fails_ends_the_run_with_its_error_also_as_the_block_ends(when: str) -> None:
    file = HeldFile(BrokenPipeError(32, "Broken pipe"))
    stopped = asyncio.Event()

    async def run() -> None:
        async with asyncsched._cli._ResultLines.writing(asyncsched._cli._Output(file)) as lines:
            assert lines is not None
            await lines.add(a_result(1))
            await asyncio.to_thread(file.entered.wait, 30)
            if when == "running":  # the run goes on: the failed write stops it
                file.release.set()
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    stopped.set()
                    raise
            # else the block ends as the write fails
        file.release.set()

    running = asyncio.ensure_future(run())
    if when == "closing":
        await asyncio.to_thread(file.entered.wait, 30)
        file.release.set()
    with pytest.raises(BrokenPipeError):
        await running
    assert stopped.is_set() == (when == "running")
    assert running.cancelling() == 0  # not left with a cancellation that an outer timeout would take as its own


async def test_output_waits_for_its_writer_past_max_unwritten_results(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(asyncsched._cli, "MAX_UNWRITTEN", 2)
    file = HeldFile()
    async with asyncsched._cli._ResultLines.writing(asyncsched._cli._Output(file)) as lines:
        assert lines is not None
        await lines.add(a_result(0))
        await asyncio.to_thread(file.entered.wait, 30)  # the writer took it, and its write waits
        await lines.add(a_result(1))
        third = asyncio.ensure_future(lines.add(a_result(2)))
        for _ in range(10):
            await asyncio.sleep(0)
        assert not third.done()  # two wait already: the run waits for the writer
        file.release.set()
        await third
    assert file.text.count("\n") == 3


def test_run_output_to_dev_stdout_appends_as_the_shell_opened_it(tmp_path: Path,
                                                                  capfd: pytest.CaptureFixture[str]) -> None:
    print("written before", flush=True)  # as in `>> log.jsonl`
    jobs = write_lines(tmp_path / "jobs.jsonl", 1, 2)
    assert main(["run", "tests.tasks:square", "--input", jobs, "--output", "/dev/stdout", "--no-progress"]) == 0
    out, err = capfd.readouterr()
    assert out.splitlines()[0] == "written before" and len(out.splitlines()) == 3
    assert "2 of 2 tasks completed" in err


def test_run_output_to_stdout_keeps_what_tasks_print_off_it(tmp_path: Path) -> None:
    jobs = write_lines(tmp_path / "jobs.jsonl", "one", "two")
    ran = subprocess.run([os.fspath(CONSOLE_SCRIPT), "run", "tests.tasks:print_it", "--input", jobs, "--output", "-",
                          "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert sorted(json.loads(line)["response_data"] for line in ran.stdout.splitlines()) == ["one", "two"]
    assert "printed: one" in ran.stderr and "printed: two" in ran.stderr  # the workers' stdout is stderr


def test_run_output_to_stdout_appended_to_the_input_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    jobs = write_lines(tmp_path / "jobs.jsonl", 1, 2)
    with open(jobs, "a") as appended:  # `run --input jobs.jsonl --output - >> jobs.jsonl`: it would read its lines
        monkeypatch.setattr(sys, "stdout", appended)
        assert main(["run", "tests.tasks:square", "--input", jobs, "--output", "-"]) == 2
        monkeypatch.undo()
    assert capsys.readouterr().err.startswith("asyncsched run: error: --output stdout is the --input file, which ")
    assert Path(jobs).read_text() == "1\n2\n"


def test_run_output_is_emptied_once_the_batch_begins_and_appended_to_by_a_resume(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db, out = os.fspath(tmp_path / "r.db"), tmp_path / "out.jsonl"
    out.write_text("before\n")
    argv = ["run", "tests.tasks:square", "--db", db, "--batch-id", "b", "--output", os.fspath(out), "--no-progress"]
    assert main([*argv, "--input", write_lines(tmp_path / "jobs.jsonl", 1, 2)]) == 0
    assert sorted(json.loads(line)["task_id"] for line in out.read_text().splitlines()) == ["1", "2"]
    assert main([*argv, "--input", write_lines(tmp_path / "more.jsonl", 1, 2, 3)]) == 2  # b exists: refused
    assert "already exists" in capsys.readouterr().err
    assert len(out.read_text().splitlines()) == 2  # as it was
    assert main([*argv, "--input", os.fspath(tmp_path / "more.jsonl"), "--resume"]) == 0
    assert sorted(json.loads(line)["task_id"] for line in out.read_text().splitlines()) == ["1", "2", "3"]


def test_after_a_resume_the_failures_of_the_run_come_first_then_stored_ones(
        results_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["run", "tests.tasks:add", "--db", results_db, "--batch-id", "many", "--no-progress"]
    assert main([*argv, "--input", write_lines(tmp_path / "bad.jsonl", *[["x", 1]] * 12)]) == 1
    capsys.readouterr()
    assert main([*argv, "--input", write_lines(tmp_path / "more.jsonl", *[["x", 1]] * 13), "--resume"]) == 1
    out = capsys.readouterr().out
    assert "13 of 13 tasks did not complete:" in out and "\n  13  failed " in out  # the one this run ran
    assert "\n  1   failed " in out and "  ... and 3 more" in out  # then the stored ones, by line


def test_run_output_whose_reader_left_stops_the_batch_quietly(tmp_path: Path, gate: Callable[[], str],
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    db = os.fspath(tmp_path / "r.db")
    jobs = write_lines(tmp_path / "jobs.jsonl", [db, 1], [gate(), 2], [gate(), 3])  # the first ends; the others wait
    reader, writer = os.pipe()
    os.close(reader)  # as `| head -1` does once it has its line
    with os.fdopen(writer, "w") as pipe:
        monkeypatch.setattr(sys, "stdout", pipe)
        assert main(["run", "tests.tasks:wait_for_file", "--input", jobs, "--db", db, "--batch-id", "b",
                     "--workers", "2", "--output", "-", "--no-progress"]) == 141  # not waiting for the gates
        monkeypatch.undo()
    assert capsys.readouterr().err == ""
    assert main(["stats", db, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) | {"success_rate": None} == {
        "total": 3, "completed": 1, "failed": 0, "timed_out": 0, "crashed": 0, "cancelled": 2, "batch_id": None,
        "success_rate": None}


def test_an_existing_batch_is_continued_with_the_resume_option(results_db: str, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    jobs = write_lines(tmp_path / "more.jsonl", [1, 2])
    assert main(["run", "tests.tasks:add", "--input", jobs, "--db", results_db, "--batch-id", "b1"]) == 2
    out, err = capsys.readouterr()
    assert err == (f"asyncsched run: error: batch 'b1' already exists in {results_db}; "
                   "pass --resume to continue it, or use another --batch-id\n")
    assert out == ""  # no display, nor a report of a batch that did not run


def test_read_commands_work_while_another_process_writes_and_change_nothing(
        tmp_path: Path, gate: Callable[[], str], capsys: pytest.CaptureFixture[str]) -> None:
    release, db = gate(), tmp_path / "live.db"
    quick = os.fspath(tmp_path / "jobs.jsonl")
    jobs = write_lines(tmp_path / "jobs.jsonl", [quick, 1], [quick, 2], [release, 3])
    writer = subprocess.Popen([sys.executable, "-m", "asyncsched", "run", "tests.tasks:wait_for_file", "--input",
                               jobs, "--db", os.fspath(db), "--batch-id", "live", "--workers", "2", "--no-progress"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (db.exists() and main(["stats", os.fspath(db), "--json"]) == 0
                   and json.loads(capsys.readouterr().out)["total"] == 2):  # the writer committed the quick ones
            assert time.monotonic() < deadline and writer.poll() is None, capsys.readouterr()
            time.sleep(0.05)
        batches = read(["batches", os.fspath(db)], capsys)
        assert "live" in batches and "100.0%" in batches  # still running: the 2 results so far completed
        assert " running " in batches and "interrupted" not in batches  # its process holds its lock
        assert len(read(["results", os.fspath(db), "--format", "jsonl"], capsys).splitlines()) == 2
        Path(release).touch()
        _, err = writer.communicate(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.communicate()
    assert writer.returncode == 0, err
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    for argv in (["results", os.fspath(db)], ["stats", os.fspath(db)], ["batches", os.fspath(db)],
                 ["export", os.fspath(db), os.fspath(tmp_path / "out.jsonl")]):
        read(argv, capsys)
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    assert json.loads(read(["stats", os.fspath(db), "--json"], capsys))["completed"] == 3


def test_batches_tells_an_interrupted_batch_from_a_finished_one(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "r.db"

    async def store_two_batches() -> None:
        async with SQLiteStore(db) as store:
            for batch_id in ("done", "cut"):
                await store.begin_batch(batch_id)
                store.add(TaskResult(batch_id, "k", Status.COMPLETED, 1))
            await store.end_batch("done")
        # closed with "cut" not ended, as when its process is killed: its lock went with the store

    asyncio.run(store_two_batches())
    rows = {line.split()[0]: line for line in read(["batches", os.fspath(db)], capsys).splitlines()[2:]}
    assert "interrupted" in rows["cut"] and re.search(r" \d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", rows["done"]), rows


async def test_a_readonly_store_reads_and_refuses_to_write(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    async with Scheduler(workers=1, store=os.fspath(path)) as scheduler:
        await scheduler.run([Task(tasks.square, 3)], batch_id="b")
    async with SQLiteStore(path, readonly=True) as store:
        assert repr(store).endswith("readonly=True)")
        assert [r.value for r in await store.results()] == [9]
        with pytest.raises(StoreError, match="read-only"):
            await store.begin_batch("other")
        with pytest.raises(StoreError, match="read-only"):
            store.add((await store.results())[0])
    with pytest.raises(StoreError, match="does not exist"):
        await SQLiteStore(tmp_path / "missing.db", readonly=True).open()
    assert not (tmp_path / "missing.db").exists()


# -- through a pseudo-terminal ------------------------------------------------------------------


class Terminal:
    """A process on a pseudo-terminal; ``read_until`` waits (bounded) for a condition on its output."""

    def __init__(self, argv: list[str], cwd: Path) -> None:
        self.fd, child = pty.openpty()
        os.set_inheritable(child, True)
        import fcntl
        import struct
        import termios

        fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
        env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TTY_INTERACTIVE", "COLUMNS", "LINES")}
        self.process = subprocess.Popen(argv, cwd=cwd, stdin=child, stdout=child, stderr=child,
                                        env=env | {"TERM": "xterm-256color"})
        os.close(child)
        self.output = b""

    def read_until(self, done: Callable[[bytes], bool], timeout: float = 30) -> bytes:
        deadline = time.monotonic() + timeout
        while not done(self.output):
            left = deadline - time.monotonic()
            assert left > 0, f"gave up waiting; the terminal shows: {self.output[-2000:]!r}"
            if select.select([self.fd], [], [], left)[0]:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:  # EIO: the process closed the terminal
                    chunk = b""
                if not chunk:
                    break
                self.output += chunk
        return self.output

    def close(self) -> int:
        """Read to the end of the output; a process still running is interrupted, as with Ctrl-C."""
        try:
            self.read_until(lambda _: False, timeout=10)
        finally:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGINT)
            os.close(self.fd)
        return self.process.wait(timeout=30)


def test_console_script_redraws_the_bar_in_place_on_a_terminal(tmp_path: Path, gate: Callable[[], str]) -> None:
    release = gate()
    quick = os.fspath(tmp_path / "jobs.jsonl")  # exists: those tasks return at once
    jobs = write_lines(tmp_path / "jobs.jsonl", [quick, 1], [quick, 2], [release, 3], [release, 4])
    terminal = Terminal([os.fspath(CONSOLE_SCRIPT), "run", "tests.tasks:wait_for_file", "--input", jobs,
                         "--workers", "2"], cwd=ROOT)
    try:
        # two frames at 50% while the gated tasks run: the display redraws on its own
        half = terminal.read_until(lambda out: text(out).count("50.0% 2/4 ") >= 2)
        Path(release).touch()
        terminal.read_until(lambda out: "finished 4 tasks in" in text(out))
    finally:
        status = terminal.close()
    assert status == 0
    assert "ETA 0:00:" in text(half) and "running: 3" in text(half)
    assert b"\x1b[1A\x1b[2K" in half  # cursor up and erase line: each frame is drawn over the last one
    end = text(terminal.output[len(half):])
    assert "100.0% 4/4 " in end and "4 of 4 tasks completed" in end


def test_run_output_to_a_terminal_shares_it_with_a_display_in_plain_lines(tmp_path: Path) -> None:
    jobs = write_lines(tmp_path / "jobs.jsonl", *range(4))
    terminal = Terminal([os.fspath(CONSOLE_SCRIPT), "run", "tests.tasks:square", "--input", jobs, "--workers", "2",
                         "--output", "-"], cwd=ROOT)
    try:
        terminal.read_until(lambda out: "4 of 4 tasks completed" in text(out))
    finally:
        status = terminal.close()
    assert status == 0
    assert b"\x1b[?25l" not in terminal.output and b"\x1b[2K" not in terminal.output  # no live display over them
    shown = text(terminal.output)
    assert sorted(json.loads(line)["response_data"] for line in shown.splitlines() if line.startswith("{")) == [
        0, 1, 4, 9]
    assert "finished 4 tasks in" in shown


def text(output: bytes) -> str:
    """What the terminal shows, without colours and cursor movements."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output.decode(errors="replace"))


def test_ctrl_c_stops_the_run_with_130_and_says_so_and_resume_finishes_it(tmp_path: Path,
                                                                          gate: Callable[[], str]) -> None:
    release = gate()
    quick = os.fspath(tmp_path / "jobs.jsonl")  # exists: that task returns at once
    jobs = write_lines(tmp_path / "jobs.jsonl", [quick, 1], *([release, n] for n in range(2, 6)))
    db = os.fspath(tmp_path / "results.db")
    argv = ["run", "tests.tasks:wait_for_file", "--input", jobs, "--workers", "2", "--db", db, "--batch-id", "b"]
    in_the_foreground = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                         "from asyncsched._cli import main; sys.exit(main())")  # as a shell starts a command
    terminal = Terminal([sys.executable, "-c", in_the_foreground, *argv], cwd=ROOT)
    try:
        terminal.read_until(lambda out: " 1/5 " in text(out) and "running: " in text(out))
        terminal.process.send_signal(signal.SIGINT)  # Ctrl-C
        terminal.read_until(lambda out: "interrupted" in text(out))
    finally:
        status = terminal.close()
    assert status == 130
    shown = text(terminal.output).replace("\r", "")
    assert "stopped after " in shown and ": 1 task finished, 4 cancelled" in shown  # not "finished 5 tasks"
    assert "\nasyncsched run: interrupted\n" in shown
    Path(release).touch()
    assert main([*argv, "--resume", "--no-progress"]) == 0  # what was cancelled runs; what finished does not


def test_a_second_ctrl_c_waits_for_the_cleanup_the_first_began(capsys: pytest.CaptureFixture[str]) -> None:
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # as in a program run from a shell
    cleaned: list[str] = []

    async def work() -> None:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C
        try:
            await asyncio.get_running_loop().create_future()  # until it cancels this
        except asyncio.CancelledError:
            os.kill(os.getpid(), signal.SIGINT)  # pressed again while the workers are stopped
            await asyncio.to_thread(cleaned.append, "the workers stopped, the batch ended")
            raise

    with pytest.raises(KeyboardInterrupt):
        asyncsched._cli._run_loop(work())
    assert cleaned == ["the workers stopped, the batch ended"]  # not left half done
    assert "Ctrl-C again to quit at once" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigterm_stops_the_run_says_so_and_ends_the_process_by_it(tmp_path: Path, gate: Callable[[], str]) -> None:
    release, fifo, log = gate(), tmp_path / "started", os.fspath(tmp_path / "runs")
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    jobs = write_lines(tmp_path / "jobs.jsonl", *([log, os.fspath(fifo), f"k{n}", release] for n in range(4)))
    process = subprocess.Popen([os.fspath(CONSOLE_SCRIPT), "run", "tests.tasks:log_and_announce", "--input", jobs,
                                "--workers", "2", "--no-progress"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        assert select.select([reader], [], [], 30)[0], "no task started"
        process.terminate()
        _, err = process.communicate(timeout=30)
    finally:
        process.kill()
        os.close(reader)
    assert process.returncode == -signal.SIGTERM  # after it stopped its workers
    assert err == "asyncsched run: terminated\n"
