"""The routes :func:`setup` mounts on an aiohttp app: the JSON API, live events and the dashboard.

Data flow::

    HTTP client or dashboard
        |  {prefix}/api/...  (Authorization: Bearer <token>, when a token is set)
        v
    _Api handlers --POST--> a background task per submitted batch: Scheduler.run(tasks)
        |        --DELETE-> Scheduler.cancel(batch_id)
        |        --GET----> Scheduler.batches() / stats() / results() (the store)
        |
        +--GET events--> EventLog.listen() <-- EventLog.publish_events() <-- the scheduler's EventHub

Nothing a client sends is code: a submission names a task of the
:class:`TaskRegistry` and gives JSON arguments. Bodies, batches and pages are
bounded by :class:`Limits`; store queries are parameterized by the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator
from dataclasses import dataclass, fields
from importlib import resources
from typing import Any, NamedTuple, NoReturn

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from .._errors import ClosedError, ConfigurationError, StoreError
from .._models import FINAL_STATUS_VALUES, Task, finite_json_float, is_seconds, no_json_constant, task_from_json
from .._scheduler import Scheduler
from .._store import MAX_PAGE, BatchInfo
from ._json import batch_json, result_json
from ._openapi import openapi
from ._registry import NAME, TaskRegistry
from ._sse import EventLog

__all__ = ["Limits", "setup"]

logger = logging.getLogger("asyncsched.web")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SUBMISSION_FIELDS = ("task", "inputs", "timeout", "retries", "batch_id")
STATIC = {  # the dashboard's files: served by name from this list only
    "app.js": "text/javascript",
    "style.css": "text/css",
    "index.html": "text/html",
}
CANCEL_WAIT = 10.0
"""Seconds a DELETE waits for the batch it cancelled to end (its tasks recorded, the store told); a batch that takes
longer is answered as it stands then, not yet finished."""
STREAM_GRACE = 1.0
"""Seconds the event streams have to write what they hold when the app stops; then the connection of a client
that takes no more (it reads nothing) is closed, rather than hold the server's shutdown for a minute or two."""
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True)
class Limits:
    """Bounds on what one client can ask of the server.

    >>> Limits(max_inputs=1000, max_page=200)  # doctest: +ELLIPSIS
    Limits(...)
    """

    max_body: int = 1 << 20
    """Bytes in a request body; more gets 413."""
    max_inputs: int = 10_000
    """Tasks in one submitted batch; more gets 413."""
    max_page: int = 1000
    """Results or batches in one page: a larger ``limit`` is capped to it."""
    default_page: int = 100
    """Page size when the request gives no ``limit``."""
    max_page_bytes: int = 16 << 20
    """JSON bytes of the results of one page: a page ends early, before ``limit``, once past it (it holds one
    result at least), so large stored values never make a response, or the server's memory, balloon."""
    event_backlog: int = 1000
    """Events kept for clients that reconnect with ``Last-Event-ID``."""
    heartbeat: float = 15.0
    """Seconds between keep-alive comments on an idle event stream."""
    write_timeout: float = 30.0
    """Seconds a write to an event stream may wait for its client to read; past it the connection is closed (the
    client reconnects, and catches up from the backlog or gets a ``reset``)."""

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            kind = float if field.name in ("heartbeat", "write_timeout") else int  # the others are counts
            if isinstance(value, bool) or not isinstance(value, kind | int) or not value > 0:
                what = "number" if kind is float else "integer"
                raise ConfigurationError(f"Limits.{field.name} must be a positive {what}, got {value!r}")
        if self.default_page > self.max_page:
            raise ConfigurationError(f"Limits.default_page ({self.default_page}) is over max_page ({self.max_page})")


def setup(app: web.Application, scheduler: Scheduler, *, registry: TaskRegistry | None,
          prefix: str = "/asyncsched", token: str | None = None, limits: Limits | None = None,
          allowed_hosts: Collection[str] | None = None) -> None:
    """Mount the JSON API, the events stream and the dashboard under ``prefix``, and run ``scheduler`` with ``app``.

    The scheduler is entered (``async with``) when the app starts and closed
    when it stops, through ``app.cleanup_ctx``; batches submitted over HTTP are
    cancelled then. ``registry`` names the tasks that clients may run; ``None``
    serves a read-only view of the scheduler's store. With a ``token``, every
    ``{prefix}/api/`` route needs ``Authorization: Bearer <token>``. With
    ``allowed_hosts`` (names or addresses, without port), an API request whose
    ``Host`` header names another host gets 421: a page that reaches a local
    server through DNS rebinding sends its own host name.
    """
    if not isinstance(prefix, str) or not re.fullmatch(r"(/[A-Za-z0-9_.~-]+)+", prefix):
        raise ConfigurationError(f"prefix must be a path like '/asyncsched' (no trailing slash), got {prefix!r}")
    if token is not None and (not isinstance(token, str) or not token or not token.isascii()):
        raise ConfigurationError("token must be a non-empty ASCII string, or None for no authentication")
    if registry is not None and not isinstance(registry, TaskRegistry):
        raise ConfigurationError(f"registry must be a TaskRegistry or None, got {type(registry).__name__}")
    if allowed_hosts is not None and (isinstance(allowed_hosts, str)
                                      or not all(isinstance(host, str) for host in allowed_hosts)):
        raise ConfigurationError(f"allowed_hosts must be a collection of host names, got {allowed_hosts!r}")
    api = _Api(scheduler, registry, token, limits or Limits(),
               None if allowed_hosts is None else frozenset(h.lower() for h in allowed_hosts))
    app.cleanup_ctx.append(api.lifecycle)
    app.on_shutdown.append(api.on_shutdown)
    router = app.router
    api.home = router.add_get(prefix, api.to_dashboard).resource  # its path gains the prefix of a sub-app
    router.add_get(f"{prefix}/", api.dashboard)
    router.add_get(f"{prefix}/static/{{name}}", api.static)
    routes: list[tuple[str, str, Handler]] = [
        ("GET", "/tasks", api.tasks),
        ("GET", "/batches", api.list_batches),
        ("POST", "/batches", api.submit),
        ("GET", "/batches/{batch_id}", api.get_batch),
        ("DELETE", "/batches/{batch_id}", api.cancel),
        ("GET", "/batches/{batch_id}/results", api.results),
        ("GET", "/events", api.events),
        ("GET", "/openapi.json", api.openapi),
    ]
    routes += [("HEAD", path, handler) for method, path, handler in routes  # for health checks; not for a stream
               if method == "GET" and path != "/events"]
    for method, path, handler in routes:
        router.add_route(method, f"{prefix}/api{path}", api.endpoint(handler))
    methods: dict[str, list[str]] = {}
    for method, path, _ in routes:
        methods.setdefault(path, []).append(method)
    for path, allowed in methods.items():  # errors in JSON too: another method of a route, a route that is not
        router.add_route("*", f"{prefix}/api{path}", api.endpoint(api.not_allowed(allowed)))
    router.add_route("*", f"{prefix}/api{{rest:(/.*)?}}", api.endpoint(api.not_found))


class _Refusal(Exception):
    """Ends a request with ``status`` and ``{"error": message, ...}``."""

    def __init__(self, status: int, message: str, extra: dict[str, Any]) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": message, **extra}


def _host_name(host: str) -> str:
    """The name or address of a ``Host`` header, without its port: ``[::1]:80`` is ``::1``."""
    if host.startswith("["):
        return host[1:host.find("]")].lower() if "]" in host else host.lower()
    return host.rpartition(":")[0].lower() if host.count(":") == 1 else host.lower()


def _fail(status: int, message: str, **extra: Any) -> NoReturn:
    raise _Refusal(status, message, extra)


class _Submission(NamedTuple):
    fn: Callable[..., Any]
    name: str
    inputs: list[Any]
    timeout: float | None
    retries: int | None
    batch_id: str


class _Job(NamedTuple):
    """A batch submitted over HTTP, while it runs."""

    task: asyncio.Task[None]
    expected: int


class _Api:
    def __init__(self, scheduler: Scheduler, registry: TaskRegistry | None, token: str | None, limits: Limits,
                 allowed_hosts: frozenset[str] | None) -> None:
        self.scheduler = scheduler
        self.registry = registry
        self.limits = limits
        self.home: web.AbstractResource | None = None  # the route of {prefix}: setup() adds it
        self.log = EventLog(limits.event_backlog)
        self.jobs: dict[str, _Job] = {}
        self._token = None if token is None else token.encode()
        self._allowed_hosts = allowed_hosts
        self._files: dict[str, bytes] = {}
        self._streams: dict[asyncio.Future[None], web.Request] = {}  # the open event streams, by their ends

    @property
    def mounted(self) -> str:
        """The prefix as the app is mounted: a sub-app's own prefix before it."""
        assert self.home is not None
        return self.home.canonical

    # -- lifecycle -------------------------------------------------------------------------

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        async with self.scheduler:
            # Like the progress display, a listener of the hub: it sees every event, a loop turn's worth at a time.
            listener = self.scheduler._hub.listen(self.log.publish_events)
            try:
                yield
            finally:
                jobs = [job.task for job in self.jobs.values()]
                for task in jobs:
                    task.cancel()  # each records its running tasks as cancelled
                await asyncio.gather(*jobs, return_exceptions=True)
                listener.close()
                self.log.close()

    async def on_shutdown(self, app: web.Application) -> None:
        self.log.close()  # event streams end after what they hold, so the server need not wait for them...
        streams = dict(self._streams)
        if streams:  # ... unless a client reads nothing: a write to it would wait, and the server with it
            await asyncio.wait(streams, timeout=STREAM_GRACE)
            for request in streams.values():
                transport = request.transport
                if transport is not None and transport.get_write_buffer_size():
                    transport.abort()  # the waiting write (or the end of the response) returns at once

    # -- auth and input --------------------------------------------------------------------

    def endpoint(self, handler: Handler) -> Handler:
        """``handler`` behind the token, when there is one, with its refusals answered in JSON."""
        expected = self._token

        async def answer(request: web.Request) -> web.StreamResponse:
            allowed = self._allowed_hosts
            if allowed is not None and _host_name(request.host) not in allowed:
                return web.json_response({"error": f"this server answers for {', '.join(sorted(allowed))}, not for "
                                          f"the Host {request.host!r}"}, status=421)
            if expected is not None:
                scheme, _, given = request.headers.get("Authorization", "").partition(" ")
                if not (hmac.compare_digest(given.strip().encode("utf-8", "replace"), expected)
                        and scheme.lower() == "bearer"):  # a scheme is case-insensitive (RFC 9110)
                    return web.json_response({"error": "this API needs the header 'Authorization: Bearer <token>'"},
                                             status=401, headers={"WWW-Authenticate": 'Bearer realm="asyncsched"'})
            try:
                return await handler(request)
            except _Refusal as refusal:
                return web.json_response(refusal.body, status=refusal.status)
            except StoreError as exc:  # e.g. a stored value of a type this process cannot import
                logger.error("%s %s: %s", request.method, request.path, exc)
                return web.json_response({"error": f"the result store failed: {exc}"}, status=500)
            except ClosedError as exc:  # closed by the host app, or by another app it also served
                return web.json_response({"error": str(exc)}, status=503)

        return answer

    async def _body(self, request: web.Request) -> Any:
        if request.content_type != "application/json":
            _fail(415, "the body must be JSON, sent with 'Content-Type: application/json'")
        limit = self.limits.max_body
        if request.content_length is not None and request.content_length > limit:
            _fail(413, f"the body is over the limit of {limit} bytes")
        body = bytearray()
        try:
            async for chunk in request.content.iter_chunked(1 << 16):
                body += chunk
                if len(body) > limit:
                    _fail(413, f"the body is over the limit of {limit} bytes")
        except RequestPayloadError as exc:  # e.g. a Content-Encoding the body is not in
            _fail(400, f"the body cannot be read: {exc}")
        try:
            return json.loads(body, parse_constant=no_json_constant, parse_float=finite_json_float)
        except (ValueError, RecursionError) as exc:
            _fail(400, f"the body is not valid JSON: {exc}")

    def _page(self, request: web.Request) -> tuple[int, int]:
        """``limit`` (capped to ``max_page``) and ``offset`` from the query."""
        limit = min(_query_int(request, "limit", self.limits.default_page, 1), self.limits.max_page)
        return limit, _query_int(request, "offset", 0, 0)

    # -- batches ---------------------------------------------------------------------------

    def _running(self) -> dict[str, int | None]:
        """The running batches, each with its size when known."""
        return {**self.scheduler.running(), **{batch_id: job.expected for batch_id, job in self.jobs.items()}}

    def _summary(self, info: BatchInfo, running: dict[str, int | None],
                 before: dict[str, int | None] | None = None) -> dict[str, Any]:
        """``running``: the batches running now; ``before``: those running before ``info`` was read, so that a
        batch that ended in between shows running, not "unfinished" (its row says no end yet)."""
        if before is not None and not info.finished_at:
            running = before | running
        state = "running" if info.batch_id in running else "finished" if info.finished_at else "unfinished"
        return batch_json(info, state, running.get(info.batch_id))

    async def _batch(self, batch_id: str) -> BatchInfo:
        info = await self.scheduler.batch(batch_id)
        if info is None:
            _fail(404, f"no batch {batch_id!r}")
        return info

    async def list_batches(self, request: web.Request) -> web.Response:
        limit, offset = self._page(request)
        before = self._running()
        batches, total = await self.scheduler.batch_page(limit, offset)  # newest first
        running = self._running()
        return web.json_response({
            "batches": [self._summary(info, running, before) for info in batches],
            "total": total, "limit": limit, "offset": offset,
        })

    async def get_batch(self, request: web.Request) -> web.Response:
        before = self._running()
        info = await self._batch(request.match_info["batch_id"])
        return web.json_response(self._summary(info, self._running(), before))

    async def submit(self, request: web.Request) -> web.Response:
        if self.registry is None:
            _fail(403, "this server is read-only: it was started without a task registry")
        submission = self._submission(await self._body(request))
        batch_id = submission.batch_id
        if batch_id in self.jobs:
            _fail(409, f"batch {batch_id!r} is running")
        tasks = [task_from_json(submission.fn, value, timeout=submission.timeout, retries=submission.retries)
                 for value in submission.inputs]
        began = asyncio.get_running_loop().create_future()
        job = asyncio.create_task(self._run(batch_id, submission.name, tasks, began),
                                  name=f"asyncsched.web batch {batch_id}")
        self.jobs[batch_id] = _Job(job, len(tasks))
        await asyncio.wait([job, began], return_when=asyncio.FIRST_COMPLETED)
        if not began.done():  # the batch could not begin
            exc = job.exception()
            if isinstance(exc, ConfigurationError):  # the store has a batch of that id; its advice is run()'s
                _fail(409, f"batch {batch_id!r} already exists: submit it under another batch_id")
            _fail(503, f"the batch could not start: {type(exc).__name__}: {exc}")
        location = f"{self.mounted}/api/batches/{batch_id}"
        return web.json_response({"batch_id": batch_id, "state": "running", "expected": len(tasks),
                                  "url": location}, status=202, headers={"Location": location})

    def _submission(self, body: Any) -> _Submission:
        """The checked fields of a submission; 400, 404 or 413 naming what is wrong."""
        assert self.registry is not None
        if not isinstance(body, dict):
            _fail(400, f"the body must be a JSON object with the fields {list(SUBMISSION_FIELDS)}")
        unknown = sorted(set(body) - set(SUBMISSION_FIELDS))
        if unknown:
            _fail(400, f"unknown field {unknown[0]!r}; the fields are {list(SUBMISSION_FIELDS)}",
                  field=unknown[0])
        name = body.get("task")
        if not isinstance(name, str):
            _fail(400, "field 'task' must be the name of a registered task", field="task",
                  tasks=self.registry.names())
        fn = self.registry.get(name)
        if fn is None:
            _fail(404, f"unknown task {name!r}", field="task", tasks=self.registry.names())
        inputs = body.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            _fail(400, "field 'inputs' must be a non-empty array, one JSON value per task",
                  field="inputs")
        if len(inputs) > self.limits.max_inputs:
            _fail(413,
                  f"field 'inputs' has {len(inputs)} tasks, over the limit of {self.limits.max_inputs}",
                  field="inputs")
        timeout = body.get("timeout")
        if timeout is not None and not (is_seconds(timeout) and timeout > 0):  # an int past a float's range too
            _fail(400, f"field 'timeout' must be a positive number of seconds or null, got {timeout!r}",
                  field="timeout")
        retries = body.get("retries")
        if retries is not None and (isinstance(retries, bool) or not isinstance(retries, int) or retries < 0):
            _fail(400, f"field 'retries' must be a non-negative integer or null, got {retries!r}",
                  field="retries")
        batch_id = body.get("batch_id")
        if batch_id is None:
            batch_id = uuid.uuid4().hex[:12]
        elif not isinstance(batch_id, str) or not NAME.fullmatch(batch_id):
            _fail(400, f"field 'batch_id' must be 1 to 100 letters, digits or _.:- characters, and not . or .. "
                  f"(which no URL can hold), got {batch_id!r}", field="batch_id")
        return _Submission(fn, name, inputs, timeout, retries, batch_id)

    async def _run(self, batch_id: str, name: str, tasks: list[Task], began: asyncio.Future[None]) -> None:
        """Run a submitted batch; ``began`` is set once the store has recorded it."""

        def announce() -> None:
            if not began.done():
                began.set_result(None)
                self.log.publish_notice(batch_id, {"batch_id": batch_id, "state": "running", "expected": len(tasks)})

        def announcing() -> Iterator[Task]:  # the scheduler pulls the first task once the batch is recorded
            announce()
            yield from tasks

        try:
            await self.scheduler.run(announcing(), batch_id=batch_id, name=name)
            announce()  # cancelled before its first task was pulled: it began all the same
        except Exception:
            if not began.done():
                raise  # answered by submit()
            logger.exception("batch %s ended with an error", batch_id)
        finally:
            del self.jobs[batch_id]
        self.log.publish_notice(batch_id, {"batch_id": batch_id, "state": "finished"})

    async def cancel(self, request: web.Request) -> web.Response:
        batch_id = request.match_info["batch_id"]
        if self.registry is None:
            _fail(403, "this server is read-only: it was started without a task registry")
        info = await self._batch(batch_id)
        job = self.jobs.get(batch_id)
        if not self.scheduler.cancel(batch_id) and job is None:  # (a job still ending was cancelled just now)
            info = await self._batch(batch_id)  # as it is now that it has ended
            _fail(409, f"batch {batch_id!r} is not running", state=self._summary(info, {})["state"])
        with contextlib.suppress(TimeoutError):  # bounded; should the request be cancelled, only the wait ends
            async with asyncio.timeout(CANCEL_WAIT):
                await self.scheduler.wait_ended(batch_id)  # the batch is over and written, whoever runs it
                if job is not None:  # then its task ends, and the batch leaves self.jobs
                    await asyncio.wait([job.task])
        return web.json_response(self._summary(await self._batch(batch_id), self._running()))

    # -- results ---------------------------------------------------------------------------

    async def results(self, request: web.Request) -> web.Response:
        batch_id = request.match_info["batch_id"]
        status = request.query.get("status") or None
        if status is not None and status not in FINAL_STATUS_VALUES:
            _fail(400, f"query parameter 'status' must be one of {FINAL_STATUS_VALUES}, got {status!r}",
                  field="status")
        limit, offset = self._page(request)
        stats = await self.scheduler.stats(batch_id)
        if stats.total == 0:
            await self._batch(batch_id)  # 404 when there is no such batch
        texts: list[str] = []  # each result as JSON
        size, ask = 0, 1  # the first result tells how many more the byte budget may hold
        while True:
            rows = await self.scheduler.results(batch_id, status=status, limit=ask, offset=offset + len(texts))
            for row in rows:
                texts.append(json.dumps(result_json(row)))  # ASCII: as many bytes as characters
                size += len(texts[-1])
            left = limit - len(texts)
            if len(rows) < ask or not left or size >= self.limits.max_page_bytes:
                break
            ask = min(left, max(1, (self.limits.max_page_bytes - size) * len(texts) // size))
        total = stats.total if status is None else getattr(stats, status)
        return web.Response(text=f'{{"results": [{", ".join(texts)}], "total": {total}, "limit": {limit}, '
                                 f'"offset": {offset}}}', content_type="application/json")

    # -- events ----------------------------------------------------------------------------

    async def events(self, request: web.Request) -> web.StreamResponse:
        batch_id = request.query.get("batch") or None
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        listener = self.log.listen(batch_id, request.headers.get("Last-Event-ID"))
        ended = asyncio.get_running_loop().create_future()
        self._streams[ended] = request
        try:
            await response.prepare(request)
            await response.write(b"retry: 1000\n\n")
            while (chunk := await listener.next_chunk(self.limits.heartbeat)) is not None:
                async with asyncio.timeout(self.limits.write_timeout):
                    await response.write(chunk)
        except ConnectionError:  # the client went away: reset (or lost while a write waited for it to read)
            pass
        except TimeoutError:  # it reads nothing: what it holds and its connection go
            if request.transport is not None:
                request.transport.abort()
        finally:
            self.log.forget(listener)
            del self._streams[ended]
            ended.set_result(None)
        return response

    # -- the rest --------------------------------------------------------------------------

    def not_allowed(self, methods: list[str]) -> Handler:
        async def refuse(request: web.Request) -> web.Response:
            return web.json_response({"error": f"{request.method} is not allowed on {request.path}; "
                                      f"it takes {', '.join(methods)}"}, status=405,
                                     headers={"Allow": ", ".join(methods)})

        return refuse

    async def not_found(self, request: web.Request) -> NoReturn:
        _fail(404, f"no route {request.path}; {self.mounted}/api/openapi.json lists them")

    async def tasks(self, request: web.Request) -> web.Response:
        return web.json_response({"tasks": [] if self.registry is None else self.registry.names(),
                                  "read_only": self.registry is None})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi(self.mounted, self.limits, token=self._token is not None,
                                         cancel_wait=CANCEL_WAIT))

    async def to_dashboard(self, request: web.Request) -> web.Response:
        raise web.HTTPFound(f"{self.mounted}/")

    async def dashboard(self, request: web.Request) -> web.Response:
        return self._file("index.html")

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC or name == "index.html":
            raise web.HTTPNotFound()
        return self._file(name)

    def _file(self, name: str) -> web.Response:
        body = self._files.get(name)
        if body is None:
            body = self._files[name] = resources.files(__package__).joinpath("static", name).read_bytes()
        return web.Response(body=body, content_type=STATIC[name], charset="utf-8", headers=SECURITY_HEADERS)


def _query_int(request: web.Request, name: str, default: int, minimum: int) -> int:
    text = request.query.get(name)
    if text is None or text == "":
        return default
    if text.isascii() and text.isdigit():  # not int()'s " 5", "1_0" or other scripts' digits
        value = int(text)
        if minimum <= value <= MAX_PAGE:
            return value
    _fail(400, f"query parameter {name!r} must be an integer of at least {minimum} and at most {MAX_PAGE}, "
          f"got {text!r}", field=name)
