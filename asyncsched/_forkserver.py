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
server runs, it puts ``asyncsched._preload`` first in the server's preloads
and launches the server with, in an environment variable, the main module's
path and the ``sys.path`` and ``sys.argv`` a worker would import it with; and
with this copy of asyncsched first on ``PYTHONPATH``, so that the server
imports the copy the program runs (``sys.path.insert()`` and all). Imported
there, ``_preload`` calls :func:`in_the_server`, which gives ``PYTHONPATH``
back its value, imports ``_worker`` and the main module as a worker would
(Python 3.13.8 and later have imported it already). Where that import fails,
the server goes on without it, and each worker imports the main module
itself, as before, and says what fails there. Nothing else imports
``_preload``: a module that imports asyncsched as Python imports it in the
server, or in a worker, does nothing more. A program that wants each worker
to import its main module afresh says so as with any fork server: it takes
``"__main__"`` out of the preloads (``multiprocessing.set_forkserver_preload([])``)
before the first pool starts.

The server takes in no start before it has imported its preloads: the first
worker's start would wait that long. ``ProcessPool.astart`` (and so
``async with ProcessPool()`` and a scheduler's start) launches the server in
a thread instead, and the event loop goes on meanwhile. The thread waits until
the server writes to a FIFO that it is done, or dies, or has not said within
:data:`STARTED_WITHIN` that it has begun (it could not import ``_preload``:
run with ``-E``, say). A server launched for another start, after its
predecessor died, is not waited for: that start waits, on the loop.

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
import time
from collections.abc import Callable, Iterator
from multiprocessing import forkserver, process, resource_tracker, spawn
from typing import Any

from . import _worker  # noqa: F401  # imported here, in the server, so that no worker imports it

HOOK = f"{__package__}._preload"
"""The module the server imports first of its preloads: it calls :func:`in_the_server`. Nothing else imports it."""
STARTED_WITHIN = 5.0
"""Seconds for a new server to say it has begun: one that cannot import the hook (asyncsched is not on the path of
a fresh interpreter here) never does, and the pool goes on without waiting for it."""
_TOLD = "ASYNCSCHED_FORKSERVER"
_MAX_TOLD = 32 * 1024
"""Longer (a huge ``sys.argv``) and the server is not told of the main module: an environment string has a limit
(128 KiB, Linux)."""
_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_launching = threading.Lock()  # two pools that start at once in two threads: the second waits for the first's launch


def server_pid() -> int | None:
    """The pid of this process's fork server, once one was launched."""
    return getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None)


def launching() -> bool:
    """Whether a launch is in progress (in another thread): a start now would wait for that server."""
    return _launching.locked()


def launch_server(gone: Callable[[int], bool] | None = None) -> None:
    """Launch the fork server with :data:`HOOK` first in its preloads, told the main module's path (see above).

    With ``gone`` (which says whether a server pid has died), return only once the server has imported all it
    preloads, or died: a thread of its own then waits, so that the event loop does not wait in the first start
    instead. It sets an environment variable for the launch."""
    with _launching, contextlib.ExitStack() as opened:
        server = getattr(forkserver, "_forkserver", None)
        preload = list(getattr(server, "_preload_modules", None) or [])
        if preload[:1] != [HOOK]:
            forkserver.set_forkserver_preload([HOOK, *(name for name in preload if name != HOOK)])
        told: dict[str, Any] = {"main": _main(preload), "pythonpath": os.environ.get("PYTHONPATH")}
        ready = -1
        if gone is not None:  # the server writes to this FIFO as it begins, and once it has imported the main module
            told["ready"] = fifo = os.path.join(opened.enter_context(tempfile.TemporaryDirectory(
                prefix="asyncsched-")), "ready")
            os.mkfifo(fifo, 0o600)
            ready = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
            opened.callback(os.close, ready)
        resource_tracker.ensure_running()  # launched first, as ensure_running() does: it is not to be told
        before = server_pid()
        os.environ[_TOLD] = json.dumps(told)
        # The server finds this copy of asyncsched first: the one its workers are to run, and maybe on no path a
        # fresh interpreter here has (sys.path.insert()). It gives the variable its value back.
        os.environ["PYTHONPATH"] = os.pathsep.join([os.path.dirname(_PACKAGE), *filter(None, [told["pythonpath"]])])
        try:
            forkserver.ensure_running()
        finally:
            del os.environ[_TOLD]
            _restore("PYTHONPATH", told["pythonpath"])
        pid = server_pid()
        if gone is not None and pid is not None and pid != before:  # launched here: not running already
            _wait(ready, pid, gone)


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


def _wait(ready: int, pid: int, gone: Callable[[int], bool]) -> None:
    """Until the server writes ``b"d"`` (done) to FIFO ``ready``, or dies, or writes nothing at all for
    :data:`STARTED_WITHIN` seconds (it writes ``b"s"`` as it begins)."""
    poll = select.poll()  # not select(): this process may have more than FD_SETSIZE descriptors open
    poll.register(ready, select.POLLIN)
    began = time.monotonic()
    heard = b""
    while b"d" not in heard:
        if poll.poll(50):
            chunk = os.read(ready, 16)
            if not chunk:  # closed before done
                return
            heard += chunk
        elif gone(pid) or (not heard and time.monotonic() - began > STARTED_WITHIN):
            return


def in_the_server() -> None:
    """In a fork server launched by :func:`launch_server`: import the main module as each worker would
    (``spawn.prepare``), once for them all, and say when done. Whatever fails, the server goes on."""
    told = os.environ.pop(_TOLD, None)  # no worker inherits it
    if told is None:
        return
    with contextlib.suppress(BaseException):
        data: dict[str, Any] = json.loads(told)
        _restore("PYTHONPATH", data["pythonpath"])  # for the workers, as the program has it
        with _telling(data.get("ready")) as tell:
            tell(b"s")
            if data["main"] is not None:
                _import_main(data["main"])
            tell(b"d")


def _restore(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


@contextlib.contextmanager
def _telling(fifo: str | None) -> Iterator[Callable[[bytes], None]]:
    """A function that writes to the FIFO the parent waits on (if it does, and still waits)."""
    fd = -1
    if fifo is not None:
        with contextlib.suppress(OSError):  # ENXIO: it has given up waiting
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)

    def tell(what: bytes) -> None:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.write(fd, what)
    try:
        yield tell
    finally:
        if fd >= 0:
            os.close(fd)


def _import_main(main: dict[str, Any]) -> None:
    sys.path[:] = main["sys_path"]
    sys.argv[:] = main["sys_argv"]
    devnull = os.open(os.devnull, os.O_RDONLY)  # as the server's stdin becomes next: input() at import ends, not waits
    os.dup2(devnull, 0)
    os.close(devnull)
    current: Any = process.current_process()
    inheriting = getattr(current, "_inheriting", None)
    current._inheriting = True  # a Process started as it is imported fails, as in a worker
    try:
        spawn.import_main_path(main["path"])
    except BaseException:  # each worker imports it then, as without this, and says what fails
        pass
    finally:
        if inheriting is None:
            del current._inheriting
