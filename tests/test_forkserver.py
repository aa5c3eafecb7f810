"""The fork server imports the program's main module once, for all of its workers (``asyncsched._forkserver``).

Each test runs a program of its own, so that its pool launches a fork server of its own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PROGRAM = """
import asyncio, multiprocessing, multiprocessing.spawn, os, sys, time

import helper  # beside this file, which is not the working directory: found through the sys.path it ran with
from asyncsched import ProcessPool, Status  # as the main module is imported: in the server, before the preloads

IN_THE_SERVER = os.getppid() == int(os.environ.get("ORCHESTRATOR", 0))
if os.environ.get("RAISE_IN_THE_SERVER") and IN_THE_SERVER:
    with open(os.environ["IMPORTS"], "a") as log:
        log.write(f"raised {os.getpid()}\\n")
    raise RuntimeError("only in the fork server")
if os.environ.get("GATE") and IN_THE_SERVER:
    open(os.environ["GATE"] + ".waiting", "w").close()
    while not os.path.exists(os.environ["GATE"]):  # the program's event loop creates it as its pool starts
        time.sleep(0.01)
with open(os.environ["IMPORTS"], "a") as log:
    log.write(f"{__name__} {os.getpid()} {os.getppid()} {sys.argv[1:]}\\n")
print(f"imported as {__name__}")  # not flushed: what a worker prints later must not repeat it


def where():  # a task of the main module
    print("a task prints", flush=True)
    return os.getpid()


def hang():
    time.sleep(60)


async def open_gate():
    while not os.path.exists(os.environ["GATE"] + ".waiting"):  # the fork server is importing this module
        await asyncio.sleep(0.01)
    second = None
    if os.environ.get("SECOND_POOL"):  # starts while the first pool's fork server is being launched
        second = asyncio.ensure_future(second_pool())
        await asyncio.sleep(0)  # one loop turn: its start begins
    open(os.environ["GATE"], "w").close()
    if second is not None:
        await second


async def second_pool():
    async with ProcessPool(1, mp_context="forkserver") as pool:
        assert (await pool.call(divmod, (7, 2))).value == (3, 1)


async def main():
    gate = asyncio.ensure_future(open_gate()) if os.environ.get("GATE") else None
    async with ProcessPool(2, mp_context="forkserver") as pool:
        before = [await pool.call(where, ()) for _ in range(4)]
        for _ in range(2):  # each kills its worker: a new one starts
            assert (await pool.call(hang, (), timeout=0.2)).status is Status.TIMED_OUT
        after = [await pool.call(where, ()) for _ in range(4)]
        started = pool.statistics().started
    assert all(o.status is Status.COMPLETED for o in before + after), before + after
    print("workers", started)
    if gate is not None:
        await gate


def with_main_path(name):
    \"\"\"Preparation data as Python 3.13.8 and later read it for the fork server: with the main module's path,
    which it imports before its preloads.\"\"\"
    data = prepared(name)
    if "init_main_from_path" in data:
        data["main_path"] = data["init_main_from_path"]
    return data


prepared = multiprocessing.spawn.get_preparation_data
if __name__ == "__main__":
    os.environ["ORCHESTRATOR"] = str(os.getpid())
    if "--fresh-main" in sys.argv:
        multiprocessing.set_forkserver_preload([])
    if "--as-python-3.13.8" in sys.argv:
        multiprocessing.spawn.get_preparation_data = with_main_path
    asyncio.run(main())
"""


def run_program(tmp_path: Path, *args: str, beside: bool = False, **env: str) -> tuple[list[list[str]], list[str]]:
    """Run PROGRAM with ``args``, from another directory than its own (unless ``beside``); its imports' log lines
    and its output."""
    program = tmp_path / "program" / "main.py"
    program.parent.mkdir()
    program.write_text(PROGRAM)
    (program.parent / "helper.py").write_text("")
    imports = tmp_path / "imports"
    done = subprocess.run([sys.executable, os.fspath(program), *args], capture_output=True, text=True, timeout=45,
                          cwd=program.parent if beside else tmp_path,
                          env={**os.environ, "IMPORTS": os.fspath(imports), **env})
    assert done.returncode == 0, done.stderr
    return [line.split(" ", 3) for line in imports.read_text().splitlines()], done.stdout.splitlines()


def test_the_fork_server_imports_the_main_module_once_for_every_worker(tmp_path: Path) -> None:
    (main, server), output = run_program(tmp_path, "--an-argument")
    assert main[0] == "__main__" and server[0] == "__mp_main__"
    assert server[2] == main[1]  # the fork server, whose parent is the program: no worker imported it again
    assert server[3] == main[3] == "['--an-argument']"  # imported with the arguments a worker sees
    assert output[-1] == "workers 4"
    assert output.count("imported as __mp_main__") == 1  # by the server, once: not again by each worker
    assert output.count("a task prints") == 8


def test_the_event_loop_goes_on_while_the_fork_server_imports_the_main_module(tmp_path: Path) -> None:
    """The server's import waits for a file that the program's event loop creates as the pool starts: were the
    loop to wait for the server in that start, neither would ever go on."""
    (main, server), output = run_program(tmp_path, GATE=os.fspath(tmp_path / "gate"))
    assert server[0] == "__mp_main__" and server[2] == main[1]
    assert output[-1] == "workers 4"


def test_a_pool_that_starts_while_another_s_fork_server_is_launched_leaves_the_event_loop_going(
        tmp_path: Path) -> None:
    (main, server), output = run_program(tmp_path, GATE=os.fspath(tmp_path / "gate"), SECOND_POOL="1")
    assert server[0] == "__mp_main__" and server[2] == main[1]
    assert output[-1] == "workers 4"


def test_where_python_imports_the_main_module_in_the_fork_server_it_is_imported_once(tmp_path: Path) -> None:
    """Python 3.13.8 and later import it before the preloads: the server then has it, and asyncsched with it.
    (Run beside its helper module, which 3.11's server, told the main module's path, would not find.)"""
    (main, server), output = run_program(tmp_path, "--as-python-3.13.8", beside=True)
    assert server[0] == "__mp_main__" and server[2] == main[1]
    assert output[-1] == "workers 4"


def test_a_program_that_takes_the_main_module_out_of_the_preloads_has_each_worker_import_it(tmp_path: Path) -> None:
    (main, *imported), output = run_program(tmp_path, "--fresh-main")
    assert main[0] == "__main__"
    assert all(line[0] == "__mp_main__" and line[2] != main[1] for line in imported)  # by workers, not the server
    assert len(imported) == int(output[-1].removeprefix("workers "))


def test_a_main_module_that_fails_in_the_fork_server_is_imported_by_each_worker(tmp_path: Path) -> None:
    (main, raised, *imported), output = run_program(tmp_path, RAISE_IN_THE_SERVER="1")
    assert main[0] == "__main__" and raised[0] == "raised"
    assert all(line[0] == "__mp_main__" and line[2] != main[1] for line in imported)
    assert len(imported) == int(output[-1].removeprefix("workers "))


@pytest.mark.parametrize("flag", ["-c", "-m"])
def test_a_program_with_no_main_file_runs_its_workers_as_ever(tmp_path: Path, flag: str) -> None:
    code = ("import asyncio\nfrom asyncsched import ProcessPool\n"
            "async def main():\n"
            "    async with ProcessPool(2, mp_context='forkserver') as pool:\n"
            "        print((await pool.call(divmod, (7, 2))).value)\n"
            "asyncio.run(main())\n")
    if flag == "-m":
        (tmp_path / "a_module.py").write_text(code.replace("asyncio.run(main())", "if __name__ == '__main__':\n"
                                                                                  "    asyncio.run(main())"))
        code = "a_module"
    done = subprocess.run([sys.executable, flag, code], capture_output=True, text=True, timeout=45, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "(3, 1)\n"


def test_a_main_module_that_reads_stdin_as_it_is_imported_fails_the_pool_rather_than_hangs(tmp_path: Path) -> None:
    """The fork server imports the main module with stdin from /dev/null, as a worker does: an input() there ends
    (and each worker, importing it again, fails as it always did); it does not wait on the program's own stdin."""
    program = tmp_path / "main.py"
    program.write_text("import asyncio\nfrom asyncsched import BrokenPoolError, ProcessPool\n"
                       "line = input()\n"
                       "async def main():\n"
                       "    async with ProcessPool(1, mp_context='forkserver') as pool:\n"
                       "        try:\n"
                       "            await pool.call(divmod, (7, 2))\n"
                       "        except BrokenPoolError as exc:\n"
                       "            print('broken:', exc)\n"
                       "if __name__ == '__main__':\n"
                       "    asyncio.run(main())\n")
    with subprocess.Popen([sys.executable, os.fspath(program)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True) as running:
        assert running.stdin is not None
        running.stdin.write("the program's own line\n")
        running.stdin.flush()  # and left open: the line the program reads, and then nothing more for ever
        try:
            running.wait(timeout=30)
        except subprocess.TimeoutExpired:
            running.kill()
            raise
        assert running.stdout is not None
        out = running.stdout.read()
    assert out.startswith("broken: "), out


def test_a_fork_server_that_dies_as_it_imports_the_main_module_breaks_the_pool_rather_than_hangs(
        tmp_path: Path) -> None:
    program = tmp_path / "main.py"
    program.write_text("import asyncio, os\nfrom asyncsched import BrokenPoolError, ProcessPool\n"
                       "if os.getppid() == int(os.environ.get('ORCHESTRATOR', 0)):  # in the fork server\n"
                       "    os._exit(3)\n"
                       "async def main():\n"
                       "    async with ProcessPool(1, mp_context='forkserver') as pool:\n"
                       "        try:\n"
                       "            await pool.call(divmod, (7, 2))\n"
                       "        except BrokenPoolError as exc:\n"
                       "            print('broken:', exc)\n"
                       "if __name__ == '__main__':\n"
                       "    os.environ['ORCHESTRATOR'] = str(os.getpid())\n"
                       "    asyncio.run(main())\n")
    done = subprocess.run([sys.executable, os.fspath(program)], capture_output=True, text=True, timeout=45)
    assert done.stdout.startswith("broken: could not start a worker: "), (done.stdout, done.stderr)
    assert "the fork server kept dying, or refusing starts; check that the program's main module imports " \
           "cleanly in a fresh process (the fork server imports it)" in done.stdout


WHICH_COPY = """
import asyncio, os, sys
sys.path[:0] = PATHS
import asyncsched
from asyncsched import ProcessPool

def which():
    return sys.modules["asyncsched"].__file__

async def main():
    async with ProcessPool(1, mp_context="forkserver") as pool:
        print(asyncsched.__file__)
        print((await pool.call(which, ())).value)

if __name__ == "__main__":
    asyncio.run(main())
"""


def installed() -> list[str]:
    """Where this interpreter finds the packages asyncsched needs."""
    return [path for path in sys.path if path.endswith("site-packages")]


def test_a_program_that_runs_another_copy_of_asyncsched_than_the_installed_one_runs_it_in_its_workers(
        tmp_path: Path) -> None:
    """The fork server, a fresh interpreter, finds the installed copy: the workers have the program's all the same."""
    import asyncsched

    shutil.copytree(Path(asyncsched.__file__).parent, tmp_path / "vendored" / "asyncsched",
                    ignore=shutil.ignore_patterns("__pycache__"))
    program = tmp_path / "main.py"
    program.write_text(WHICH_COPY.replace("PATHS", repr([os.fspath(tmp_path / "vendored")])))
    done = subprocess.run([sys.executable, os.fspath(program)], capture_output=True, text=True, timeout=45,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [os.fspath(tmp_path / "vendored" / "asyncsched" / "__init__.py")] * 2


def test_a_fork_server_that_cannot_import_asyncsched_is_not_waited_for(tmp_path: Path) -> None:
    """Run without site and without PYTHONPATH (-S -E, which the fork server inherits), asyncsched found only on a
    path the program adds: the server cannot import the module that would tell when it is done, and the pool goes
    on without it, once the server has not begun to tell within STARTED_WITHIN seconds."""
    import asyncsched

    paths = [os.fspath(Path(asyncsched.__file__).parent.parent), *installed()]
    program = tmp_path / "main.py"
    program.write_text(WHICH_COPY.replace("PATHS", repr(paths)))
    done = subprocess.run([sys.executable, "-S", "-E", os.fspath(program)], capture_output=True, text=True,
                          timeout=45, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [asyncsched.__file__] * 2
