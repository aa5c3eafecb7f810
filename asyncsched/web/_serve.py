"""``asyncsched serve``: the API and the dashboard as a server of their own, over a SQLite file."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import ipaddress
import os
import sys
from typing import Any

from aiohttp import web

from .._backend import Backend, Emit
from .._errors import ClosedError, ConfigurationError
from .._models import Attempt, Outcome
from .._scheduler import Scheduler
from ._app import setup
from ._registry import TaskRegistry

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "PREFIX", "build_app", "load_registry", "serve_main"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
PREFIX = "/asyncsched"
TOKEN_VARIABLE = "ASYNCSCHED_TOKEN"
"""The environment variable read for the token when ``--token`` is not given (a command line is visible to all)."""


class _NoBackend(Backend):
    """The backend of a read-only server: it runs nothing."""

    def submit(self, attempt: Attempt, emit: Emit) -> asyncio.Future[Outcome]:
        raise ClosedError("this server is read-only: it runs no task")

    async def aclose(self) -> None:
        pass


def load_registry(module_name: str) -> TaskRegistry:
    """The ``registry`` of module ``module_name``, imported as ``python -m`` would (the working directory first)."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigurationError(f"cannot import module {module_name!r}: {exc}") from None
    except Exception as exc:
        raise ConfigurationError(f"importing module {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    registry = getattr(module, "registry", None)
    if not isinstance(registry, TaskRegistry):
        raise ConfigurationError(f"module {module_name!r} has no TaskRegistry named 'registry' "
                                 "(registry = asyncsched.web.TaskRegistry(), at module level)")
    return registry


def build_app(db: str, *, registry: TaskRegistry | None, token: str | None = None,
              workers: int | str = "cpu") -> web.Application:
    """An app serving the scheduler's API and dashboard under ``/asyncsched``, with results in ``db``.

    Without a registry it is a read-only view of ``db``, which must exist.
    """
    if registry is None:
        if not os.path.isfile(db):
            raise ConfigurationError(f"{db} does not exist: without --tasks, serve shows an existing database")
        scheduler = Scheduler(backend=_NoBackend(), store=db, handle_sigterm=False)
    else:
        scheduler = Scheduler(workers, store=db, handle_sigterm=False)  # the server handles the signals
    app = web.Application()
    setup(app, scheduler, registry=registry, token=token)

    async def home(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"{PREFIX}/")

    app.router.add_get("/", home)
    return app


def serve_main(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM; ``args`` has ``db``, ``tasks``, ``host``, ``port``, ``token`` and ``workers``."""
    token = args.token if args.token is not None else os.environ.get(TOKEN_VARIABLE) or None
    registry = None if args.tasks is None else load_registry(args.tasks)
    app = build_app(args.db, registry=registry, token=token, workers=args.workers)
    if token is None and not _loopback(args.host):
        print(f"asyncsched serve: warning: {args.host} is reachable from other machines and there is no token: "
              f"anyone who reaches it can run the tasks of {args.tasks}; pass --token or set {TOKEN_VARIABLE}",
              file=sys.stderr)
    what = "read-only view of" if registry is None else f"tasks {', '.join(registry.names()) or '(none)'} with"
    host = f"[{args.host}]" if ":" in args.host else args.host
    ready = f"asyncsched serve: {what} {args.db} at http://{host}:{args.port}{PREFIX}/ (Ctrl-C stops)"
    try:
        web.run_app(app, host=args.host, port=args.port, print=lambda _: print(ready, flush=True), loop=_new_loop(),
                    access_log=None)
    except OSError as exc:  # the address is taken, or not ours
        raise ConfigurationError(f"cannot serve on {host}:{args.port}: {exc.strerror or exc}") from None
    return 0


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _new_loop() -> Any:
    """A uvloop loop when uvloop is installed, else an asyncio one."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
