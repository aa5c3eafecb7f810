"""An existing aiohttp service that embeds asyncsched: its own routes, plus the scheduler's API and dashboard.

    python -m examples.web_service            # then open http://127.0.0.1:8080/asyncsched/

The service has its own routes (``/`` and ``/notes``). ``setup()`` adds the
scheduler to the app's lifecycle, so its worker processes start and stop with
the app, and mounts the JSON API, the live events and the dashboard under
``/asyncsched``. Only the tasks of ``registry`` can be run through HTTP, with
JSON arguments. The same registry serves standalone, with results kept in
SQLite::

    asyncsched serve --db notes.db --tasks examples.web_service

Run it as a module from the repository's root, as above: the worker processes
import the task functions by their module's name.
"""

from __future__ import annotations

import os
import time

from aiohttp import web

from asyncsched import Scheduler, report
from asyncsched.web import TaskRegistry, setup

registry = TaskRegistry()


@registry.task("word_count")
def word_count(text: str) -> int:
    """Count the words of a text; an empty text is an error."""
    report(message=f"counting the words of {text[:60]}", progress=0.5)
    if not text.strip():
        raise ValueError("the text is empty")
    return len(text.split())


@registry.task("slow_square")
def slow_square(n: float, seconds: float = 0.5) -> float:
    """Square a number, slowly, reporting progress on the way."""
    for step in range(4):
        report(message=f"squaring {n}: step {step + 1} of 4", progress=step / 4)
        time.sleep(seconds / 4)
    return n * n


# -- the service's own routes ---------------------------------------------------------------

NOTES = web.AppKey("notes", list[str])


async def home(request: web.Request) -> web.Response:
    return web.Response(text="The notes service. Its batches: /asyncsched/\n")


async def list_notes(request: web.Request) -> web.Response:
    return web.json_response(request.app[NOTES])


async def add_note(request: web.Request) -> web.Response:
    note = await request.text()
    request.app[NOTES].append(note)
    return web.json_response({"notes": len(request.app[NOTES])}, status=201)


def build_app(scheduler: Scheduler, *, token: str | None = None) -> web.Application:
    """The service's app, with ``scheduler`` embedded under ``/asyncsched``."""
    app = web.Application()
    app[NOTES] = []
    app.router.add_get("/", home)
    app.router.add_get("/notes", list_notes)
    app.router.add_post("/notes", add_note)
    setup(app, scheduler, registry=registry, token=token)
    return app


if __name__ == "__main__":
    # The app owns SIGINT and SIGTERM: it stops the scheduler (and its workers) in its cleanup.
    scheduler = Scheduler(workers=2, timeout=30, store=os.environ.get("NOTES_DB", "notes.db"))
    web.run_app(build_app(scheduler, token=os.environ.get("ASYNCSCHED_TOKEN")), host="127.0.0.1", port=8080)
