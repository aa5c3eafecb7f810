"""Fault functions: each goes wrong in one way. Module level, so they pickle under spawn."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from typing import Any


class CustomError(Exception):
    pass


class UnrebuildableError(Exception):
    """Its __init__ needs two arguments, so unpickling it in the parent fails."""

    def __init__(self, a: Any, b: Any) -> None:
        super().__init__(f"{a}/{b}")


def boom(message: str = "boom") -> None:
    raise ValueError(message)


def raise_custom() -> None:
    raise CustomError("custom failure")


def raise_broken_pool() -> None:
    from asyncsched import BrokenPoolError

    raise BrokenPoolError("a pool of the task's own broke")


def raise_unrebuildable() -> None:
    raise UnrebuildableError(1, 2)


def raise_unpicklable() -> None:
    error = ValueError("carries a lock")
    error.lock = threading.Lock()  # type: ignore[attr-defined]
    raise error


def hang(seconds: float = 3600) -> None:
    time.sleep(seconds)


def exit_hard(code: int = 3) -> None:
    os._exit(code)


def segfault() -> None:
    ctypes.string_at(0)


def sigkill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def return_unpicklable() -> Any:
    return threading.Lock()


def _refuse_to_load() -> None:
    raise RuntimeError("this value cannot be rebuilt here")


class Unloadable:
    """Pickles in the worker; unpickling it calls _refuse_to_load, which raises."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_refuse_to_load, ())


def return_unloadable() -> Any:
    return Unloadable()


def return_unpicklable_in_a_list() -> Any:
    """A list (a type the worker pickles on its own, not inline) holding something that does not pickle."""
    return ["fine", threading.Lock()]


def return_unloadable_in_a_list() -> Any:
    """A list holding something that pickles in the worker and does not unpickle in the parent."""
    return [1, Unloadable()]


def _raise_on_load(kind: str) -> None:
    if kind == "exit":
        sys.exit("a reducer called sys.exit()")
    raise KeyboardInterrupt


class RaisesOnLoad:
    """Pickles; unpickling it raises SystemExit (``kind="exit"``) or KeyboardInterrupt, as a hostile reducer may."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __reduce__(self) -> tuple[Any, ...]:
        return (_raise_on_load, (self.kind,))


def return_raising_on_load(kind: str) -> Any:
    return RaisesOnLoad(kind)


def report_raising_on_load(kind: str) -> int:
    from asyncsched import report

    report("here", thing=RaisesOnLoad(kind))
    return 1


class RaisesOnLoadElsewhereError(Exception):
    """Unpickles in the process that pickled it (the worker checks that it does); anywhere else, in the parent,
    unpickling it raises SystemExit or KeyboardInterrupt."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_where_pickled, (os.getpid(), self.kind))


def _rebuild_where_pickled(pid: int, kind: str) -> RaisesOnLoadElsewhereError:
    if os.getpid() != pid:
        _raise_on_load(kind)
    return RaisesOnLoadElsewhereError(kind)


def raise_raising_on_load_in_the_parent(kind: str) -> None:
    raise RaisesOnLoadElsewhereError(kind)


def _unloadable_error(kind: str) -> ValueError:
    """An exception whose unpickling raises SystemExit or KeyboardInterrupt, wherever it happens."""
    error = ValueError("cannot be rebuilt")
    error.thing = RaisesOnLoad(kind)  # type: ignore[attr-defined]
    return error


def raise_raising_on_load(kind: str) -> None:
    raise _unloadable_error(kind)


class RaisesUnloadableErrorOnLoad:
    """Pickles; unpickling it raises an exception whose own unpickling raises SystemExit or KeyboardInterrupt."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __reduce__(self) -> tuple[Any, ...]:
        return (raise_raising_on_load, (self.kind,))


def return_raising_unloadable_error_on_load(kind: str) -> Any:
    return RaisesUnloadableErrorOnLoad(kind)


def fork_and_report() -> int:
    """Forks a child that calls report(); the child is not the worker, so nothing is reported."""
    from asyncsched import report

    pid = os.fork()
    if pid == 0:
        report("from the forked child")
        os._exit(0)
    os.waitpid(pid, 0)
    report("from the task")
    return 1


def report_unloadable() -> int:
    from asyncsched import report

    report("here", thing=Unloadable())
    return 1


def exit_on_sigterm_and_hang() -> None:
    """Ends its call cleanly on SIGTERM, as tasks that clean up do."""

    def leave(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, leave)
    time.sleep(3600)


def spawn_child_and_hang(pidfile: str | None, apart: str | None = None) -> None:
    """Start a child (``apart``: in a session or a process group of its own), write its pid (or report it, with
    no ``pidfile``), and hang."""
    import subprocess

    from asyncsched import report

    child = subprocess.Popen(["sleep", "3600"], start_new_session=apart == "session",
                             process_group=0 if apart == "group" else None)
    if pidfile is None:
        report(str(child.pid))
    else:
        with open(pidfile + ".tmp", "w") as f:
            f.write(str(child.pid))
        os.rename(pidfile + ".tmp", pidfile)
    time.sleep(3600)


def fork_sessions_until_killed(log: str) -> None:
    """Fork a child into a session of its own every 2 ms, logging its pid, until killed: forks that race the kill."""
    with open(log, "a") as pids:
        while True:
            pid = os.fork()
            if pid == 0:
                os.setsid()
                os.execvp("sleep", ["sleep", "3600"])
            pids.write(f"{pid}\n")
            pids.flush()
            time.sleep(0.002)


def announce_then_hang(fifo: str) -> None:
    """Tell the test (blocked reading the FIFO ``fifo``) that the task runs, then hang."""
    with open(fifo, "w") as f:
        f.write("started")
    time.sleep(3600)


def return_in_two_halves(size: int) -> bytes:
    """Return ``size`` bytes; the worker writes the first half of its result at once, the rest on a SIGUSR1."""
    from asyncsched import _worker

    write = _worker._Channel._write

    def in_halves(self: Any, frame: bytes) -> None:
        _worker._Channel._write = write  # type: ignore[method-assign]
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})  # one that comes early waits for sigwait
        write(self, frame[:len(frame) // 2])
        signal.sigwait({signal.SIGUSR1})
        write(self, frame[len(frame) // 2:])

    _worker._Channel._write = in_halves  # type: ignore[method-assign]
    return b"x" * size


def return_in_two_halves_at(size: int, gate: str) -> bytes:
    """Return ``size`` bytes; the worker writes the first half of its result at once, the rest once ``gate``
    exists."""
    from asyncsched import _worker

    write = _worker._Channel._write

    def in_halves(self: Any, frame: bytes) -> None:
        _worker._Channel._write = write  # type: ignore[method-assign]
        write(self, frame[:len(frame) // 2])
        while not os.path.exists(gate):
            time.sleep(0.005)
        write(self, frame[len(frame) // 2:])

    _worker._Channel._write = in_halves  # type: ignore[method-assign]
    return b"x" * size


def return_then_exit(value: Any) -> Any:
    """Return normally, and have the worker die the moment its result is written."""
    from asyncsched import _worker

    send = _worker._Channel.send

    def send_then_exit(self: Any, message: Any) -> None:
        send(self, message)
        os._exit(0)

    _worker._Channel.send = send_then_exit  # type: ignore[method-assign]
    return value


def hold_the_gil(seconds: int) -> str:
    """Sleep ``seconds`` in a C call that keeps the GIL all along, from the task's first instant."""
    ctypes.PyDLL(None).sleep(seconds)
    return "held"


def log_then_hold_the_gil(log: str, fifo: str, key: str) -> str:
    """Append ``key`` to ``log``, then wait for a byte on ``fifo`` in a C call that keeps the GIL all along."""
    with open(log, "a") as file:
        file.write(key + "\n")
    fd = os.open(fifo, os.O_RDONLY)
    try:
        ctypes.PyDLL(None).read(fd, ctypes.create_string_buffer(1), 1)  # PyDLL: the GIL is not released
    finally:
        os.close(fd)
    return key


def announce_then_hold_the_gil(announce: str, gate: str) -> str:
    """Tell the test (blocked reading the FIFO ``announce``) that the task runs, then wait for a byte on the FIFO
    ``gate`` in a C call that keeps the GIL all along: no other thread of the worker runs meanwhile."""
    with open(announce, "w") as f:
        f.write("started")
    fd = os.open(gate, os.O_RDONLY)
    try:
        ctypes.PyDLL(None).read(fd, ctypes.create_string_buffer(1), 1)
    finally:
        os.close(fd)
    return "held"


def report_then_hold_the_gil(announce: str, gate: str) -> str:
    """Report, then as announce_then_hold_the_gil."""
    from asyncsched import report

    report("here")
    return announce_then_hold_the_gil(announce, gate)


def start_child_then_exit(pidfile: str) -> None:
    """Start a process of the task's own (as a task running a tool does), note its pid, then crash the worker."""
    import subprocess

    child = subprocess.Popen(["sleep", "3600"])
    with open(pidfile, "w") as file:
        file.write(str(child.pid))
    os._exit(3)


def fork_child_then_exit(pidfile: str) -> None:
    """Fork a child that lives on (with every file descriptor of the worker), note its pid, then crash the worker."""
    child = os.fork()
    if child == 0:
        time.sleep(3600)
        os._exit(0)
    with open(pidfile, "w") as file:
        file.write(str(child))
    os._exit(3)


def fail_until(counter: str, succeed_on: int) -> str:
    """Fail until called ``succeed_on`` times (counted in the file ``counter``)."""
    count = 1
    if os.path.exists(counter):
        with open(counter) as f:
            count += int(f.read())
    with open(counter, "w") as f:
        f.write(str(count))
    if count < succeed_on:
        raise RuntimeError(f"attempt {count} fails")
    return f"ok after {count}"


def raise_key_error() -> None:
    raise KeyError("missing")


def allocate_and_hold(size: int) -> None:
    block = bytearray(size)
    for i in range(0, size, 4096):
        block[i] = 1
    time.sleep(3600)


def report_from_a_signal_handler(reports: int) -> int:
    """Calls report() in a loop while a timer signal's handler calls it too; returns how often the handler ran."""
    from asyncsched import report

    ran = 0

    def handler(signum: int, frame: object) -> None:
        nonlocal ran
        ran += 1
        report("from the handler")

    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
    try:
        for i in range(reports):
            report("from the task", i / reports)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return ran


def fork_and_leave_with_sys_exit() -> tuple[str, int]:
    """Forks a child that leaves the task with sys.exit(7); returns the child's exit code."""
    pid = os.fork()
    if pid == 0:
        sys.exit(7)
    _, status = os.waitpid(pid, 0)
    return "the task's own value", os.waitstatus_to_exitcode(status)


class Label(str):
    """A str that cannot be rebuilt from its text alone, and whose str() is itself."""

    def __new__(cls, text: str, color: str) -> Label:
        return super().__new__(cls, text)

    def __str__(self) -> str:
        return self


def report_a_label() -> str:
    from asyncsched import report

    report(Label("labelled", "red"))
    return "done"


def send_garbage_then_hang(fifo: str | None = None) -> None:
    """Writes a frame that does not unpickle onto the worker's pipe (a stand-in for a bug), then says so on the
    FIFO ``fifo`` if given (to a test blocked reading it), then hangs."""
    from asyncsched import _worker

    assert _worker._current is not None
    channel = _worker._current[0].__self__  # type: ignore[attr-defined]
    garbage = b"\x80\x05not a pickle"
    channel._write(_worker.frame_header(len(garbage)) + garbage)
    if fifo is not None:
        with open(fifo, "w") as f:
            f.write("sent")
    time.sleep(3600)


def send_a_malformed_message_then_hang(shape: str) -> None:
    """Sends a DONE message for its own call that unpickles but is malformed (a stand-in for a bug), then hangs.

    ``shape`` is ``"short"`` (too few fields) or ``"error"`` (an error that is not an ErrorInfo).
    """
    from asyncsched import _worker

    assert _worker._current is not None
    send, call_id = _worker._current
    if shape == "short":
        send((_worker.DONE, call_id))
    else:
        send((_worker.DONE, call_id, _worker.ERROR, "not an error description", 0.0, 0.0))
    time.sleep(3600)


def leave_a_thread_running() -> int:
    """Starts a thread that is not a daemon and never ends; returns at once."""
    threading.Thread(target=threading.Event().wait, name="left-behind").start()
    return os.getpid()


def leave_a_child_process_running() -> int:
    """Starts a multiprocessing child that is not a daemon and sleeps for an hour; returns at once."""
    import multiprocessing

    multiprocessing.get_context("fork").Process(target=time.sleep, args=(3600,), name="left-behind").start()
    return os.getpid()


def _ignore_sigterm_and_sleep() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(3600)


def leave_a_daemon_child_running() -> int:
    """Starts a multiprocessing daemon child that ignores SIGTERM and sleeps for an hour; returns at once."""
    import multiprocessing

    multiprocessing.get_context("fork").Process(target=_ignore_sigterm_and_sleep, daemon=True).start()
    return os.getpid()


_kept_pools: list[Any] = []


def keep_a_multiprocessing_pool() -> int:
    """Starts a multiprocessing pool (daemon workers) that lives on in the module; returns at once."""
    import multiprocessing

    pool = multiprocessing.get_context("fork").Pool(2)
    pool.map(abs, range(4))
    _kept_pools.append(pool)
    return os.getpid()


def raise_with_a_note(row: str) -> int:
    try:
        return int(row)
    except ValueError as exc:
        exc.add_note(f"while parsing row {row!r}")
        raise


class PayloadError(Exception):
    """Its attributes come from its payload: asked for one it does not have (``__notes__``), it raises KeyError."""

    def __init__(self, payload: dict[str, Any]) -> None:
        super().__init__(payload["message"])
        self.payload = payload

    def __getattr__(self, name: str) -> Any:
        return self.payload[name]


def raise_payload_error() -> None:
    raise PayloadError({"message": "quota exceeded", "code": 429})


class ExitsOnPickle:
    """Its reducer calls sys.exit(), as a handle that refuses to travel may."""

    def __reduce__(self) -> tuple[Any, ...]:
        sys.exit("this handle cannot be pickled")


def return_exiting_on_pickle() -> Any:
    return ExitsOnPickle()


def leave_the_workers_group_and_hang() -> None:
    os.setpgid(0, os.getpgid(os.getppid()))  # the orchestrator's group: killing the worker's group misses it
    time.sleep(3600)


def hold_up_the_exit() -> int:
    """Register a finalizer that holds up this worker's exit for ever, as a task's own cleanup may."""
    import multiprocessing.util

    multiprocessing.util.Finalize(None, time.sleep, args=(3600,), exitpriority=10)
    return os.getpid()


def kill_the_fork_server() -> None:
    os.kill(os.getppid(), signal.SIGKILL)  # a forkserver worker's parent is the fork server
    time.sleep(3600)  # the worker dies with it


def close_every_descriptor() -> None:
    os.closerange(3, 65536)  # the worker's pipes to the orchestrator too
