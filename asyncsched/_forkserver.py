"""What the fork server imports once, so that each worker it forks need not: the main module, and ``_worker``.

Under ``forkserver`` every worker is forked from one server process. Before
it runs anything, a worker imports the program's main module again (as
``__mp_main__``: a task defined there is pickled by reference to it) and
``asyncsched._worker``. Python means the server to import the main module
once, for all of its workers: ``"__main__"`` is in the server's preloads by
default. But before 3.13.8 (CPython gh-126631) the server is never told the
main module's path, so each worker imports it, and all it imports, itself,
at every start: between a task's timeout or crash and the next task on the
new worker too. That is most of 140 ms here for a script that imports
asyncsched (``benchmarks/replacement.py``), and far more with numpy or torch.

``launch_server`` mends that, before the pool starts a worker: when no
server runs, it adds this module to the server's preloads and launches the
server with the main module's path (and the ``sys.path`` and ``sys.argv`` a
worker would import it with) in an environment variable. In the server this
module then imports ``_worker``, and the main module as a worker would,
unless Python already has. Where that import fails, the server goes on
without it, and each worker imports the main module itself, as before, and
says what fails there. A program that wants each worker to import its main
module afresh says so as with any fork server: it takes ``"__main__"`` out of
the preloads (``multiprocessing.set_forkserver_preload([])``) before the
first pool starts.

The server takes in no start before it has imported its preloads: the first
worker's start would wait that long. ``ProcessPool.astart`` (and so
``async with ProcessPool()`` and a scheduler's start) launches the server in
a thread, which waits until the server says it is done (through a FIFO) or
dies, and the event loop goes on meanwhile.

What a program sees of it: every worker starts from the main module's state
as the server left it. The server imports it with stdin from ``/dev/null``, as
a worker does. State made as it is imported is the same in every worker, and
in each one that replaces another: numpy's global random state, say, which is
not reseeded at a fork, as Python's own ``random`` is (seed it in the task).

Imported in the server, and so in every worker: neither asyncio nor aiosqlite.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import sys
import tempfile
import threading
from collections.abc import Callable
from multiprocessing import forkserver, process, resource_tracker, spawn
from typing import Any

from . import _worker  # noqa: F401  # imported here, in the server, so that no worker imports it

_TOLD = "ASYNCSCHED_FORKSERVER"
_MAX_TOLD = 32 * 1024
"""Longer (a huge ``sys.argv``) and the server is not told of the main module: an environment string has a limit
(128 KiB, Linux)."""
_launching = threading.Lock()  # two pools that start at once in two threads: the second waits for the first's launch


def server_pid() -> int | None:
    """The pid of this process's fork server, once one was launched."""
    return getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None)


def launch_server(gone: Callable[[int], bool] | None = None) -> None:
    """Launch the fork server with this module in its preloads, told the main module's path (see above).

    With ``gone`` (which says whether a server pid has died), return only once the server has imported all it
    preloads, or died: a thread of its own then waits, so that the event loop does not wait in the first start
    instead. It sets an environment variable for the launch."""
    with _launching, tempfile.TemporaryDirectory(prefix="asyncsched-") as directory:
        server = getattr(forkserver, "_forkserver", None)
        preload = list(getattr(server, "_preload_modules", None) or [])
        if __name__ not in preload:
            forkserver.set_forkserver_preload([*preload, __name__])
        told: dict[str, Any] = {"main": _main(preload)}
        ready = -1
        if gone is not None:  # the server writes to this FIFO once it has imported its preloads
            told["ready"] = fifo = os.path.join(directory, "ready")
            os.mkfifo(fifo, 0o600)
            ready = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        try:
            resource_tracker.ensure_running()  # launched first, as ensure_running() does: it is not to be told
            before = server_pid()
            os.environ[_TOLD] = json.dumps(told)
            try:
                forkserver.ensure_running()
            finally:
                del os.environ[_TOLD]
            pid = server_pid()
            if gone is not None and pid is not None and pid != before:  # launched here: not running already
                poll = select.poll()  # not select(): this process may have more than FD_SETSIZE descriptors open
                poll.register(ready, select.POLLIN)
                while not poll.poll(50) and not gone(pid):
                    pass
        finally:
            if ready >= 0:
                os.close(ready)


def _main(preload: list[str]) -> dict[str, Any] | None:
    """What the server is told of the main module, or None: no main module to preload (run with -c, or -m), or
    ``"__main__"`` taken out of the preloads."""
    data = spawn.get_preparation_data("worker")
    path = data.get("init_main_from_path")
    if path is None or "__main__" not in preload:
        return None
    main = {"path": path, "sys_path": data["sys_path"], "sys_argv": data["sys_argv"]}
    try:
        size = len(json.dumps(main))
    except (TypeError, ValueError):  # a path in sys.path that is not a str
        return None
    return main if size <= _MAX_TOLD else None


def _import_main(main: dict[str, Any]) -> None:
    """In the fork server: import the main module as each worker would (``spawn.prepare``), once for them all."""
    if getattr(sys.modules.get("__main__"), "__file__", None) == main["path"]:
        return  # Python preloaded it (3.13.8 and later)
    sys.path[:] = main["sys_path"]
    sys.argv[:] = main["sys_argv"]
    devnull = os.open(os.devnull, os.O_RDONLY)  # as the server's stdin becomes next: input() at import ends, not waits
    os.dup2(devnull, 0)
    os.close(devnull)
    current = process.current_process()
    current._inheriting = True  # type: ignore[attr-defined]  # a Process started at import fails, as in a worker
    try:
        spawn.import_main_path(main["path"])
    finally:
        del current._inheriting  # type: ignore[attr-defined]


def _in_the_server(told: dict[str, Any]) -> None:
    try:
        if told["main"] is not None:
            _import_main(told["main"])
    finally:
        if "ready" in told:  # the parent waits for this, unless it has given up (no reader: ENXIO)
            with contextlib.suppress(OSError):
                ready = os.open(told["ready"], os.O_WRONLY | os.O_NONBLOCK)
                os.write(ready, b"\0")
                os.close(ready)


if (_told := os.environ.pop(_TOLD, None)) is not None:  # in the fork server; no worker inherits the variable
    with contextlib.suppress(BaseException):  # a main module that fails here: each worker imports it then, as
        _in_the_server(json.loads(_told))  # without this, and says what fails
