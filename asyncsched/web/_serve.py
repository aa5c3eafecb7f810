"""``asyncsched serve``: the API and the dashboard as a server of their own, over a SQLite file.

The command line (``asyncsched._cli``) parses the arguments and imports the
task module; :func:`serve` runs the server until SIGINT or SIGTERM.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import signal
import sys

from aiohttp import web

from .._backend import Backend, Emit
from .._cli import new_event_loop
from .._errors import ClosedError, ConfigurationError
from .._models import Attempt, Outcome
from .._scheduler import Scheduler
from .._sqlite import SQLiteStore
from ._app import setup
from ._registry import TaskRegistry

__all__ = ["LOOPBACK_NAMES", "PREFIX", "TOKEN_VARIABLE", "build_app", "serve"]

PREFIX = "/asyncsched"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
"""The Host names a server listening on loopback answers for."""
TOKEN_VARIABLE = "ASYNCSCHED_TOKEN"
"""The environment variable read for the token when ``--token`` is not given (a command line is visible to all)."""
SHUTDOWN_GRACE = 3.0
"""Seconds the server gives the requests in progress to end once it is asked to stop (aiohttp's default is 60)."""


class _NoBackend(Backend):
    """The backend of a read-only server: it runs nothing."""

    def submit(self, attempt: Attempt, emit: Emit) -> asyncio.Future[Outcome]:
        raise ClosedError("this server is read-only: it runs no task")

    async def aclose(self) -> None:
        pass


def build_app(db: str, *, registry: TaskRegistry | None, token: str | None = None,
              workers: int | str = "cpu", allowed_hosts: frozenset[str] | None = None) -> web.Application:
    """An app serving the scheduler's API and dashboard under ``/asyncsched``, with results in ``db``.

    Without a registry it is a read-only view of ``db``, which must exist: the
    file is opened read-only, and may be written by another process meanwhile.
    """
    if registry is None:
        scheduler = Scheduler(backend=_NoBackend(), store=SQLiteStore(db, readonly=True), handle_sigterm=False)
    else:
        scheduler = Scheduler(workers, store=db, handle_sigterm=False)  # the server handles the signals
    app = web.Application()
    setup(app, scheduler, registry=registry, token=token, allowed_hosts=allowed_hosts)

    async def home(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"{PREFIX}/")

    app.router.add_get("/", home)
    return app


def serve(db: str, *, registry: TaskRegistry | None, host: str, port: int,
          token: str | None = None, workers: int | str = "cpu") -> signal.Signals:
    """Serve :func:`build_app` until SIGINT or SIGTERM, and return which; the token defaults to
    ``$ASYNCSCHED_TOKEN``.

    Prints one line once the server listens. Once asked to stop, it gives the
    requests in progress :data:`SHUTDOWN_GRACE` seconds, then cancels the
    batches submitted over HTTP; a second SIGINT cuts that wait short, a second
    SIGTERM ends the process at once.
    """
    token = token if token is not None else os.environ.get(TOKEN_VARIABLE) or None
    # On loopback, only this machine's names: a page that reaches the server through DNS rebinding is refused.
    allowed = LOOPBACK_NAMES | {host.lower()} if _loopback(host) else None
    app = build_app(db, registry=registry, token=token, workers=workers, allowed_hosts=allowed)
    if token is None and not _loopback(host):
        print(f"asyncsched serve: warning: {host} can be reached from other machines and there is no token: "
              f"anyone who reaches it can use the API; pass --token or set {TOKEN_VARIABLE}", file=sys.stderr)
    what = "read-only view of" if registry is None else f"tasks {', '.join(registry.names()) or '(none)'} with"
    address = f"[{host}]" if ":" in host else host
    ready = f"asyncsched serve: {what} {db} at http://{address}:{port}{PREFIX}/ (Ctrl-C stops)"
    stopped_by: list[signal.Signals] = []

    async def on_signals(app: web.Application) -> None:
        loop = asyncio.get_running_loop()

        def stop(signum: signal.Signals) -> None:
            stopped_by.append(signum)
            for each in signal.SIGINT, signal.SIGTERM:  # a second one: Python's own handling
                loop.remove_signal_handler(each)
            raise web.GracefulExit

        for signum in signal.SIGINT, signal.SIGTERM:
            loop.add_signal_handler(signum, stop, signum)

    app.on_startup.append(on_signals)
    try:
        web.run_app(app, host=host, port=port, print=lambda _: print(ready, flush=True), loop=new_event_loop(),
                    access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_GRACE)
    except OSError as exc:  # the address is taken, or not this machine's
        raise ConfigurationError(f"cannot serve on {address}:{port}: {exc.strerror or exc}") from None
    return stopped_by[0] if stopped_by else signal.SIGINT  # else a KeyboardInterrupt that came before the loop ran


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
