"""Run attempts on Celery workers, with Redis as the result backend.

Celery runs only registered tasks, so asyncsched registers one generic task,
``asyncsched.run``, that imports ``module:qualname`` and calls it with JSON
arguments (:func:`asyncsched.backends._remote.run_by_name`). Data flow::

    submit(attempt) --one publisher thread--> send_task("asyncsched.run", [target, args, kwargs],
                                                        task_id=prefix+n, time_limit=timeout)
                                                    |
                                                    v  Celery worker (prefork child)
                      STARTED, ASYNCSCHED_REPORT: update_state(...)   SUCCESS / FAILURE / REVOKED
                                                    |
                                                    v  Redis result backend: SET key + PUBLISH key
    _listen(): one PSUBSCRIBE on prefix* (redis.asyncio, on the scheduler's loop)
       + a fallback MGET of every pending key after a reconnect and every SWEEP_INTERVAL
       v
    _on_meta -> emit(TaskStarted / TaskReported) or the attempt's future gets its Outcome

Publishing is blocking in kombu, so it runs in one dedicated thread; nothing
else leaves the loop, and nothing polls one task at a time.

Faults, mapped to Celery's own mechanisms:

* timeout: Celery's hard time limit (``time_limit``): the worker kills the
  child running the task. The backend also gives up ``TIME_LIMIT_GRACE``
  seconds past the limit, for workers whose pool cannot enforce it.
* cancellation: ``revoke(terminate=True, signal="SIGKILL")``.
* a child that dies (``os._exit``, segfault): the task is sent again once
  (``retry_on_worker_lost``, falling back on ``reject_on_worker_lost``); when it
  dies again it is recorded ``crashed``.
* a whole worker lost: the message was not acknowledged (``acks_late``), so
  the broker delivers it again (with Redis, after its visibility timeout).

Servers that cannot be reached fail with :class:`~asyncsched.BackendUnreachableError`,
which names the server and its URL, within a bounded time:

* at start: the broker and the result backend are both tried; the start fails
  when either does not answer (the result backend within ``SOCKET_TIMEOUT``;
  the broker as a send would be, under Celery's ``task_publish_retry_policy``:
  4 tries over 0.6 s by default, each connection bounded by ``SOCKET_TIMEOUT``).
* a send while the broker (or the result backend, which Celery subscribes to
  for each sent task) cannot be reached: the attempt fails once that policy is
  spent; the sends queued behind it fail with it at once, so a batch does not
  try each of its tasks in turn.
* a revoke (cancellation, or a time limit the worker did not enforce) is
  published under the same publish retry policy: kombu's own broadcast would
  retry for ever while the broker cannot be reached, holding up every send
  behind it and the backend's closing.
* the result backend lost: the listener reconnects for up to
  ``RECONNECT_TIMEOUT``; then the attempts waiting for a result fail (and are
  revoked), and so does each attempt submitted until it is back.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import functools
import inspect
import logging
import re
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio
from celery import Celery
from celery.backends.redis import RedisBackend
from celery.exceptions import TaskRevokedError
from kombu.exceptions import EncodeError, KombuError, OperationalError
from kombu.utils.url import maybe_sanitize_url

from .._backend import Backend, Emit
from .._errors import BackendUnreachableError, ClosedError, ConfigurationError, TaskDefinitionError
from .._models import Attempt, Outcome, Status, TaskReported, TaskStarted
from .._worker import error_info
from ._remote import REPORT_STATE, run_by_name

__all__ = ["DEFAULT_CAPACITY", "TASK_NAME", "CeleryBackend", "celery_worker_main", "make_app", "register_task"]

TASK_NAME = "asyncsched.run"
"""The name of the one generic task that every asyncsched Celery worker registers."""
DEFAULT_CAPACITY = 16
"""Attempts in flight when ``capacity`` is not given: set it to the workers' total concurrency."""
REDELIVERIES = 1
"""Times a task whose worker child died is sent again before it is recorded ``crashed``."""
TIME_LIMIT_GRACE = 5.0
"""Seconds past an attempt's time limit after which the backend records it timed out itself."""
SWEEP_INTERVAL = 5.0
"""Seconds between fallback reads of every pending result, in case a published message was missed."""
RECONNECT_DELAY = 0.5
RECONNECT_TIMEOUT = 30.0
"""Seconds the result backend may stay unreachable before the attempts waiting for their results fail."""
SOCKET_TIMEOUT = 5.0
"""Seconds to open a connection to the broker or the result backend, or to wait for one of its replies, before it
counts as unreachable (``socket_connect_timeout`` and ``socket_timeout`` of redis-py and of kombu's Redis transport)."""
REVOKE_EXPIRES = 1.0
"""Seconds a revoke broadcast stays valid for the workers (Celery's default broadcast timeout)."""
CANCEL_RETRY = 0.1
"""Seconds between two cancellations of the listener when the first is lost."""
STORE_RETRIES = 120
STORE_RETRY_MAX_SLEEP = 1.0
"""A worker that cannot store a task's state (its start, a report, its result) tries again, up to STORE_RETRIES
times, each after a random wait of at most STORE_RETRY_MAX_SLEEP seconds: about a minute, past RECONNECT_TIMEOUT."""

_FINAL_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
_REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)
_RETRY_POLICY_KEYS = ("max_retries", "interval_start", "interval_step", "interval_max")
_FAILURES = {"TimeLimitExceeded": Status.TIMED_OUT, "WorkerLostError": Status.CRASHED, "Terminated": Status.CANCELLED}

logger = logging.getLogger(__name__)


def register_task(app: Celery) -> Any:
    """Register the generic task on ``app`` (idempotent) and return it."""
    if TASK_NAME in app.tasks:
        return app.tasks[TASK_NAME]
    return app.task(run_by_name, name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True,
                    retry_on_worker_lost=True, max_retries=REDELIVERIES, default_retry_delay=0)


def make_app(broker_url: str | None = None, backend_url: str | None = None) -> Celery:
    """A Celery app configured for asyncsched: JSON only, late acks, one task per child at a time.

    Its workers keep trying to store a state while the result backend cannot be reached (STORE_RETRIES), the
    child waiting meanwhile: by default Celery gives up at once, and the task's message is acknowledged all the
    same, so a task that ended, or that was taken and could not store its start, was lost for good.
    """
    app = Celery("asyncsched", broker=broker_url, backend=backend_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        result_expires=3600,
        broker_connection_retry_on_startup=True,
        result_backend_always_retry=True,
        result_backend_max_retries=STORE_RETRIES,
        result_backend_max_sleep_between_retries_ms=int(STORE_RETRY_MAX_SLEEP * 1000),
    )
    register_task(app)
    return app


def _client_options(conf: Any) -> dict[str, Any]:
    """The settings a ``CeleryBackend`` adds to the app it makes (not to workers, nor to an ``app=`` passed in).

    Connections and replies of the broker and of the result backend are bounded by
    ``SOCKET_TIMEOUT`` (kombu's Redis transport and Celery's Redis backend default to
    waiting for ever, or 120 s). Celery subscribes to the result of each task it sends
    (asyncsched reads results on its own subscription, but ``send_task`` does it
    anyway): with the result backend lost, that subscription retries 20 times a second
    apart before the send fails, so it gets the publish retry policy instead.
    """
    return {
        "broker_transport_options": {**conf.broker_transport_options, **_socket_timeouts()},
        "redis_socket_connect_timeout": SOCKET_TIMEOUT,
        "redis_socket_timeout": SOCKET_TIMEOUT,
        "result_backend_transport_options": {**conf.result_backend_transport_options,
                                             "retry_policy": dict(conf.task_publish_retry_policy)},
    }


def _check_urls(app: Celery) -> None:
    """Raise ConfigurationError, naming the URL without its password, when ``app``'s broker has a scheme kombu has
    no transport for, or its result backend cannot be made (an unknown scheme, ...) or is not Redis.

    Nothing is connected to: each would fail later, at the first send or when a worker starts, with kombu's
    or Celery's own error (``KeyError: 'No such transport: redsi'``, ``No module named 'redsi'``).
    """
    try:
        with app.connection_for_write() as connection:
            connection.get_transport_cls()
    except (KeyError, ImportError) as exc:  # KeyError: kombu's "No such transport"
        name = _broker_name(app)
        if isinstance(exc, KeyError):
            reason, advice = (exc.args[0] if exc.args else _reason(exc)), "check its scheme"
        else:
            reason, advice = _reason(exc), "install what its transport needs"
        raise ConfigurationError(f"the Celery broker URL {name} cannot be used ({reason}): {advice}") from exc
    url = app.conf.result_backend
    name = _hidden(url) if isinstance(url, str) else str(url)
    try:
        backend = app.backend
    except Exception as exc:  # the backend's class cannot be found or imported, or refuses the URL
        scheme = url.partition("://")[0].partition("+")[0] if isinstance(url, str) else None
        if isinstance(exc, ModuleNotFoundError) and scheme and exc.name == scheme:  # Celery took it for a module
            reason = f"no result backend has the scheme {scheme!r}"
        else:
            reason = _reason(exc).replace(url, name) if isinstance(url, str) else _reason(exc)
        raise ConfigurationError(f"the Celery result backend URL {name} cannot be used ({reason}): CeleryBackend "
                                 "needs a Redis result backend, redis://") from exc
    if not isinstance(backend, RedisBackend):
        raise ConfigurationError("CeleryBackend streams results over Redis pub/sub: the app's result backend "
                                 f"must be redis://, got {name!r}")


def celery_worker_main(argv: Sequence[str] | None = None) -> int:
    """``asyncsched celery-worker --broker URL --backend URL [--concurrency N]``: a Celery worker for asyncsched.

    The same as ``celery -A asyncsched.backends.celery_worker --broker URL
    --result-backend URL worker --loglevel INFO [--concurrency N]``. Any other
    option goes to ``celery worker`` as it is (``--queues``, ``--without-mingle``, ...).
    """
    parser = argparse.ArgumentParser(prog="asyncsched celery-worker",
                                     description="Start a Celery worker that runs asyncsched tasks; other options "
                                     "are passed to `celery worker`.")
    parser.add_argument("--broker", required=True, help="broker URL, e.g. redis://127.0.0.1:6379/0")
    parser.add_argument("--backend", required=True, help="Redis result backend URL, e.g. redis://127.0.0.1:6379/1")
    parser.add_argument("--concurrency", type=int, help="child processes (default: one per core)")
    parser.add_argument("--hostname", help="node name (default: celery@%%h)")
    parser.add_argument("--loglevel", default="INFO")
    options, rest = parser.parse_known_args(argv)
    app = make_app(options.broker, options.backend)
    try:
        _check_urls(app)
    except ConfigurationError as exc:
        print(f"asyncsched celery-worker: error: {exc}", file=sys.stderr)
        return 2
    worker_argv = ["worker", f"--loglevel={options.loglevel}", *rest]
    if options.concurrency:
        worker_argv.append(f"--concurrency={options.concurrency}")
    if options.hostname:
        worker_argv.append(f"--hostname={options.hostname}")
    return _run_worker(app, worker_argv)


def _run_worker(app: Celery, argv: list[str]) -> int:
    """Run ``celery worker`` for ``app`` and return its exit status.

    This is ``app.worker_main(argv)`` less what it loses: Celery's worker exits
    with status 1 after an unrecoverable error, which ``worker_main`` drops (it
    returned as after a clean stop), and a bad option is one line, status 2,
    where ``worker_main`` raises click's exception.
    """
    import click
    from celery.bin.celery import celery as celery_command

    option = next(param for param in celery_command.params if param.name == "app")
    option.default = app  # as app.start() does: the command's --app is this app
    try:
        code = celery_command.main(args=argv, standalone_mode=False)
    except click.ClickException as exc:
        message = " ".join(exc.format_message().split())  # Celery's own can take several lines
        print(f"asyncsched celery-worker: error: {message}", file=sys.stderr)
        return exc.exit_code
    except SystemExit as exit_:
        code = exit_.code
    finally:
        option.default = None
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


def target_of(fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[str, list[Any], dict[str, Any]]:
    """``("module:qualname", args, kwargs)`` for a function a worker can import, unwrapping partials.

    A bound method is refused, but for a class method of the class that defines it (which its name finds
    bound the same way): by name, a worker would find the plain function and call it without its instance.
    """
    kwargs: dict[str, Any] = {}
    while isinstance(fn, functools.partial):
        args = fn.args + args
        kwargs = {**fn.keywords, **kwargs}
        fn = fn.func
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if inspect.ismethod(fn):
        owner = fn.__self__
        if not isinstance(owner, type) or (owner.__module__, f"{owner.__qualname__}.{fn.__name__}") != (
                module, qualname):
            what = "the class" if isinstance(owner, type) else "the instance"
            raise TaskDefinitionError(f"{fn!r} is a bound method: Celery runs functions by name, and {what} it is "
                                      "bound to cannot travel with it; use a module-level function")
    if not module or not qualname or "<" in qualname or module == "__main__":
        raise TaskDefinitionError(f"{fn!r} cannot be imported by name in a Celery worker: define it at module "
                                  "level in a module the workers can import")
    return f"{module}:{qualname}", list(args), kwargs


@dataclass(slots=True)
class _Pending:
    """The parent's record of one attempt sent to Celery."""

    attempt: Attempt
    emit: Emit
    future: asyncio.Future[Outcome]
    started_at: float | None = None
    pid: int | None = None
    deadline: asyncio.TimerHandle | None = None


class CeleryBackend(Backend):
    """Runs each attempt as one Celery task: ``CeleryBackend(broker_url=..., backend_url=...)`` or ``(app=app)``.

    The result backend must be Redis: results and progress stream back over its
    pub/sub. Start workers with ``asyncsched celery-worker --broker URL --backend
    URL``; workers of an existing ``app`` need the generic task registered on it
    with ``CeleryBackend.register_task(app)`` where the app is defined.
    Arguments and results travel as JSON, so tuples come back as lists, and a
    failed task's exception keeps its type name, message and traceback but is
    not rebuilt. ``capacity`` is how many attempts run at once, usually the
    workers' total concurrency.

    A broker or result backend that cannot be reached fails the start, or the
    attempts that need it, with :class:`~asyncsched.BackendUnreachableError`
    within a bounded time (see the module's documentation): never a wait for
    ever. The app it makes bounds its connections by ``SOCKET_TIMEOUT``; an
    ``app`` passed in keeps its own settings for sending (set
    ``broker_transport_options={"socket_connect_timeout": ..., "socket_timeout": ...}``
    on it for the same bounds), and its start is bounded all the same.
    """

    register_task = staticmethod(register_task)

    def __init__(self, broker_url: str | None = None, backend_url: str | None = None, *, app: Celery | None = None,
                 capacity: int = DEFAULT_CAPACITY) -> None:
        if app is None and (broker_url is None or backend_url is None):
            raise ConfigurationError("CeleryBackend needs broker_url= and backend_url=, or app=")
        if app is not None and (broker_url is not None or backend_url is not None):
            raise ConfigurationError("CeleryBackend takes either app= or the URLs, not both")
        if capacity < 1:
            raise ConfigurationError(f"capacity must be at least 1, got {capacity!r}")
        self._owns_app = app is None
        if app is None:
            app = make_app(broker_url, backend_url)
            app.conf.update(_client_options(app.conf))
        self.app = app
        _check_urls(self.app)
        register_task(self.app)
        self.capacity = capacity
        self._prefix = f"asyncsched-{uuid.uuid4().hex[:12]}-"
        keyprefix = self.app.backend.task_keyprefix  # the result of task i is at keyprefix + i
        self._keyprefix: str = keyprefix.decode() if isinstance(keyprefix, bytes) else keyprefix
        self._backend_url: str = self.app.conf.result_backend
        self._broker_name: str = _broker_name(self.app)
        self._backend_name: str = _hidden(self._backend_url)
        self._submitted = 0  # the number of the next send
        self._unsent: tuple[int, str, BaseException] | None = None  # the sends before this number fail: why
        self._lost: tuple[str, BaseException] | None = None  # the result backend is lost: why
        self._pending: dict[str, _Pending] = {}
        self._revoking: list[str] = []
        self._forgotten: list[str] = []  # the keys of results read to their end, to delete from the result backend
        self._deleter: asyncio.Task[None] | None = None
        self._publisher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="asyncsched-celery-publish")
        self._redis: redis.asyncio.Redis | None = None
        self._pubsub: Any = None
        self._listener: asyncio.Task[None] | None = None
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to the result backend and try the broker: raise BackendUnreachableError when either cannot be
        reached (both are tried at once; the module's documentation gives the bounds). A backend that was closed
        raises ClosedError: its publisher thread is shut down."""
        if self._closed:
            raise ClosedError("this CeleryBackend was closed; create a new one")
        broker = asyncio.get_running_loop().run_in_executor(None, self._reach_broker)
        self._redis = redis.asyncio.Redis.from_url(self._backend_url, socket_connect_timeout=SOCKET_TIMEOUT,
                                                   socket_timeout=SOCKET_TIMEOUT)
        try:
            try:
                await self._redis.ping()
                self._pubsub = await self._subscribe()
            except (redis.RedisError, OSError) as exc:  # RedisError: also a listener that does not speak Redis
                backend_error: BaseException | None = exc
            else:
                backend_error = None
            broker_error = await broker
            if broker_error is not None or backend_error is not None:
                raise self._unreachable_at_start(broker_error, backend_error)
        except BaseException:
            broker.add_done_callback(_read_outcome)  # maybe left to its thread: what it raises is not logged as lost
            if self._pubsub is not None:
                pubsub, self._pubsub = self._pubsub, None
                await pubsub.aclose()
            client, self._redis = self._redis, None
            await client.aclose()
            raise
        self._listener = asyncio.ensure_future(self._listen())
        self._listener.add_done_callback(self._on_listener_done)

    def _reach_broker(self) -> BaseException | None:
        """In a thread: connect to the broker as a send would (under the publish retry policy); the error, if any."""
        policy = self.app.conf.task_publish_retry_policy or {}
        with self.app.connection_for_write(transport_options=_socket_timeouts()) as connection:
            try:
                connection.ensure_connection(**{k: policy[k] for k in _RETRY_POLICY_KEYS if k in policy})
            except (KombuError, *connection.connection_errors, *connection.channel_errors) as exc:
                error: BaseException = exc
                return error
        return None

    def _unreachable_at_start(self, broker: BaseException | None,
                              backend: BaseException | None) -> BackendUnreachableError:
        found = [f"the Celery {what} {url} cannot be reached ({_reason(exc)})"
                 for what, url, exc in (("broker", self._broker_name, broker),
                                        ("result backend", self._backend_name, backend)) if exc is not None]
        advice = ("check that they run and that their URLs are right" if len(found) == 2 else
                  "check that it runs and that its URL is right")
        error = BackendUnreachableError(f"{' and '.join(found)}: {advice}")
        error.__cause__ = broker or backend
        return error

    def _on_listener_done(self, listener: asyncio.Task[None]) -> None:
        """A listener that died of a bug must not leave attempts waiting forever: they fail with its error."""
        if listener.cancelled() or listener.exception() is None:
            return
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(listener.exception())  # type: ignore[arg-type]

    async def _subscribe(self) -> Any:
        assert self._redis is not None
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.psubscribe(f"{self._keyprefix}{self._prefix}*")
        except BaseException:
            await pubsub.aclose()
            raise
        return pubsub

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        pending, self._pending = self._pending, {}
        for task_id, left in pending.items():
            if left.deadline is not None:
                left.deadline.cancel()
            left.future.cancel()
            self._revoking.append(task_id)
        self._flush_revokes()
        if self._listener is not None:
            # redis-py can swallow a cancellation that races with the timeout of its own read
            # (its get_message returns None instead), so ask again until the listener has ended.
            while not self._listener.done():
                self._listener.cancel()
                await asyncio.wait([self._listener], timeout=CANCEL_RETRY)
        if self._deleter is not None:  # the last results read: deleted, or given up with the result backend
            await asyncio.wait([self._deleter], timeout=SOCKET_TIMEOUT)
            self._deleter.cancel()
            await asyncio.wait([self._deleter])
        if self._pubsub is not None:
            await self._pubsub.aclose()
        if self._redis is not None:
            await self._redis.aclose()
        if self._owns_app:
            self._publisher.submit(self.app.close)
        await asyncio.get_running_loop().run_in_executor(None, self._publisher.shutdown)

    # -- submitting ------------------------------------------------------------------------

    def submit(self, attempt: Attempt, emit: Emit) -> asyncio.Future[Outcome]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Outcome] = loop.create_future()
        try:
            target, args, kwargs = target_of(attempt.fn, attempt.args)
        except TaskDefinitionError as exc:
            future.set_result(Outcome(Status.FAILED, error=f"TaskDefinitionError: {exc}",
                                      error_type="asyncsched.TaskDefinitionError", retryable=False))
            return future
        if self._lost is not None:  # its result could not be read: fail it now rather than after the send
            future.set_result(_unreachable_outcome(*self._lost))
            return future
        number = self._submitted
        self._submitted += 1
        task_id = f"{self._prefix}{number:x}"
        self._pending[task_id] = _Pending(attempt, emit, future)
        future.add_done_callback(functools.partial(self._on_done, task_id))
        sent = loop.run_in_executor(self._publisher, functools.partial(
            self._send, number, task_id, [target, args, kwargs], attempt.timeout))
        sent.add_done_callback(functools.partial(self._on_sent, task_id))
        return future

    def _send(self, number: int, task_id: str, call: list[Any], time_limit: float | None) -> None:
        """In the publisher thread: send one task, unless a send that failed for a server that cannot be reached
        was still being tried when this one was submitted. Raises BackendUnreachableError for such a server."""
        unsent = self._unsent
        if unsent is not None and number < unsent[0]:
            raise BackendUnreachableError(unsent[1]) from unsent[2]
        try:
            self.app.send_task(TASK_NAME, args=call, task_id=task_id, time_limit=time_limit, serializer="json")
        except Exception as exc:
            if isinstance(exc, OperationalError):  # kombu's error for a broker connection lost or refused
                what, url, reason = "broker", self._broker_name, _reason(exc)
            elif isinstance(exc, RuntimeError) and isinstance(exc.__cause__, _REDIS_ERRORS):
                # Celery's subscription to the task's result gave up reconnecting to the result backend
                what, url, reason = "result backend", self._backend_name, _reason(exc.__cause__)
            else:
                raise
            message = (f"the Celery {what} {url} cannot be reached ({reason}): the task was not sent; "
                       f"check that the {what} runs")
            self._unsent = (self._submitted, message, exc)
            raise BackendUnreachableError(message) from exc

    def _on_sent(self, task_id: str, sent: asyncio.Future[Any]) -> None:
        exc = None if sent.cancelled() else sent.exception()
        if isinstance(exc, BackendUnreachableError):
            self._finish(task_id, _unreachable_outcome(str(exc), exc.__cause__ or exc, error_info(exc)[2]))
        elif exc is not None:  # arguments that are not JSON, ...
            name, text, tb, _ = error_info(exc)
            self._finish(task_id, Outcome(Status.FAILED, error=f"the task could not be sent to Celery: {text}",
                                          traceback=tb, error_type=name,
                                          retryable=not isinstance(exc, EncodeError)))  # it would fail again

    def _on_done(self, task_id: str, future: asyncio.Future[Outcome]) -> None:
        pending = self._pending.pop(task_id, None)
        if pending is None:
            return
        if pending.deadline is not None:
            pending.deadline.cancel()
        if future.cancelled():
            self._revoke(task_id)

    def _finish(self, task_id: str, outcome: Outcome) -> None:
        pending = self._pending.get(task_id)
        if pending is not None and not pending.future.done():
            pending.future.set_result(outcome)

    def _revoke(self, task_id: str) -> None:
        """Revoke ``task_id`` and kill the child running it, batching the revokes of one loop iteration."""
        if not self._revoking:
            asyncio.get_running_loop().call_soon(self._flush_revokes)
        self._revoking.append(task_id)

    def _flush_revokes(self) -> None:
        ids, self._revoking = self._revoking, []
        if ids:
            self._publisher.submit(self._send_revokes, ids)

    def _send_revokes(self, ids: list[str]) -> None:
        """In the publisher thread: the broadcast of ``app.control.revoke(ids, terminate=True, signal="SIGKILL")``.

        Celery publishes it with kombu's default retry policy, which retries for ever while the broker cannot be
        reached; this is the same message under the publish retry policy, so a lost broker fails it in bounded time.
        """
        mailbox = self.app.control.mailbox
        message = {"method": "revoke", "arguments": {"task_id": ids, "terminate": True, "signal": "SIGKILL"},
                   "destination": None, "pattern": None, "matcher": None}
        try:
            with self.app.producer_or_acquire() as producer:
                producer.publish(message, exchange=mailbox.exchange.name, declare=[mailbox.exchange],
                                 headers={"clock": mailbox.clock.forward(), "expires": time.time() + REVOKE_EXPIRES},
                                 serializer=mailbox.serializer, retry=True,
                                 retry_policy=self.app.conf.task_publish_retry_policy)
        except Exception as exc:  # the broker is lost: a worker running one of them, or taking it later, runs it
            logger.warning("asyncsched: could not revoke %d Celery tasks through %s (%s): a worker that runs one of "
                           "them now, or takes it once the broker is back, still runs it", len(ids),
                           self._broker_name, _reason(exc))
        # A worker keeps the broadcast in memory, and only one that is up now hears it: the mark, in the result
        # backend, is what a worker that takes the task later checks before it runs it (see run_by_name). It is
        # what backend.mark_as_revoked() stores, less its publish, and with SET EX where Celery's Redis backend
        # calls the deprecated SETEX.
        backend = self.app.backend
        revoked = backend.prepare_exception(TaskRevokedError("revoked by asyncsched"))
        try:
            with backend.client.pipeline() as pipe:
                for task_id in ids:
                    meta = {"status": "REVOKED", "result": revoked, "traceback": None, "children": [],
                            "date_done": None, "task_id": task_id}
                    pipe.set(backend.get_key_for_task(task_id), backend.encode(meta), ex=backend.expires)
                pipe.execute()
        except _REDIS_ERRORS as exc:  # the result backend is lost: a worker that is up heard the broadcast
            logger.debug("asyncsched: could not mark %d tasks revoked in %s (%s)", len(ids), self._backend_name,
                         _reason(exc))

    def _expire(self, task_id: str) -> None:
        pending = self._pending.get(task_id)
        if pending is None:
            return
        self._finish(task_id, Outcome(
            Status.TIMED_OUT, error=f"timed out after {pending.attempt.timeout:g}s; no result within the timeout and "
            f"{TIME_LIMIT_GRACE:g}s more: the worker did not enforce the time limit or was lost; the task was revoked",
            error_type="TimeoutError", pid=pending.pid))
        self._revoke(task_id)

    # -- results and progress --------------------------------------------------------------

    async def _listen(self) -> None:
        """Dispatch every published state; read what may have been missed after a reconnect and now and then.

        While the result backend cannot be reached, try again every RECONNECT_DELAY; past RECONNECT_TIMEOUT, fail
        the attempts that wait for a result, and those submitted until it is back.
        """
        swept = time.monotonic()
        lost_at: float | None = None
        while not self._closed:
            try:
                if self._pubsub is None:
                    self._pubsub = await self._subscribe()
                    await self._sweep()
                    if lost_at is not None:
                        logger.warning("asyncsched: the Celery result backend %s is back", self._backend_name)
                    lost_at, self._lost = None, None
                message = await self._pubsub.get_message(timeout=SWEEP_INTERVAL)
                if message is not None and message["type"] == "pmessage":
                    self._dispatch(message["channel"], message["data"])
                if self._pending and time.monotonic() - swept >= SWEEP_INTERVAL:
                    swept = time.monotonic()
                    await self._sweep()
            except _REDIS_ERRORS as exc:
                now = time.monotonic()
                if lost_at is None:
                    lost_at = now
                    logger.warning("asyncsched: lost the Celery result backend %s (%s); reconnecting for up to %gs",
                                   self._backend_name, _reason(exc), RECONNECT_TIMEOUT)
                elif self._lost is None and now - lost_at >= RECONNECT_TIMEOUT:
                    self._give_up(exc, now - lost_at)
                pubsub, self._pubsub = self._pubsub, None
                if pubsub is not None:
                    await pubsub.aclose()
                await asyncio.sleep(RECONNECT_DELAY)

    def _give_up(self, exc: BaseException, seconds: float) -> None:
        """The result backend has been lost too long: fail (and revoke) every attempt waiting for its result."""
        message = (f"the Celery result backend {self._backend_name} cannot be reached ({_reason(exc)}) for "
                   f"{seconds:.0f}s: the attempt is given up, as its result cannot be read (and revoked, in case a "
                   "worker runs it); check that the result backend runs")
        logger.warning("asyncsched: %s", message)
        self._lost = (message, exc)
        for task_id, pending in list(self._pending.items()):
            if not pending.future.done():
                pending.future.set_result(_unreachable_outcome(message, exc))
                self._revoke(task_id)

    async def _sweep(self) -> None:
        """One MGET of every pending result: the fallback for a missed message."""
        assert self._redis is not None
        ids = list(self._pending)
        if not ids:
            return
        for task_id, payload in zip(ids, await self._redis.mget([self._keyprefix + i for i in ids]), strict=True):
            if payload is not None:
                self._dispatch(self._keyprefix + task_id, payload, swept=True)

    def _dispatch(self, channel: bytes | str, payload: bytes | str, *, swept: bool = False) -> None:
        key = channel.decode() if isinstance(channel, bytes) else channel
        task_id = key[len(self._keyprefix):]
        pending = self._pending.get(task_id)
        if pending is None:
            return  # finished, cancelled, or another client's
        try:
            meta = self.app.backend.decode(payload)
        except Exception:
            logger.warning("asyncsched: unreadable Celery result for %s", task_id, exc_info=True)
            return
        state, result = meta.get("status"), meta.get("result")
        attempt = pending.attempt
        if state == "STARTED" and isinstance(result, dict) and result.get("started_at") != pending.started_at:
            pending.started_at, pending.pid = result.get("started_at"), result.get("pid")
            if attempt.timeout is not None:
                if pending.deadline is not None:
                    pending.deadline.cancel()  # sent again after its worker was lost
                pending.deadline = asyncio.get_running_loop().call_later(
                    attempt.timeout + TIME_LIMIT_GRACE, self._expire, task_id)
            pending.emit(TaskStarted(attempt.batch_id, attempt.key, Status.RUNNING, pending.started_at or time.time(),
                                     pending.pid, attempt=attempt.number))
        elif state == REPORT_STATE and not swept and isinstance(result, dict):
            pending.emit(TaskReported(attempt.batch_id, attempt.key, Status.RUNNING, result["timestamp"],
                                      result.get("pid"), result.get("message"), result.get("progress"),
                                      attempt.number, result.get("data") or None))
        elif state in _FINAL_STATES:
            self._finish(task_id, self._outcome(pending, state, result, meta.get("traceback")))
            self._forget(key)

    def _forget(self, key: str) -> None:
        """Delete a result that has been read to its end from the result backend (Celery keeps it for
        ``result_expires``): one DEL at a time, of every key read meanwhile."""
        self._forgotten.append(key)
        if self._deleter is None or self._deleter.done():
            self._deleter = asyncio.ensure_future(self._delete_forgotten())

    async def _delete_forgotten(self) -> None:
        await asyncio.sleep(0)  # the results read in the same loop iteration go in the same DEL
        while self._forgotten and self._redis is not None:
            keys, self._forgotten = self._forgotten, []
            try:
                await self._redis.delete(*keys)
            except _REDIS_ERRORS as exc:  # they expire after result_expires all the same
                logger.debug("asyncsched: could not delete %d results from the Celery result backend %s (%s)",
                             len(keys), self._backend_name, _reason(exc))

    @staticmethod
    def _outcome(pending: _Pending, state: str, result: Any, traceback: str | None) -> Outcome:
        if state == "SUCCESS" and isinstance(result, dict) and "ok" in result:
            pid, started_at, finished_at = result.get("pid"), result.get("started_at"), result.get("finished_at")
            if result["ok"]:
                return Outcome(Status.COMPLETED, value=result.get("value"), pid=pid, started_at=started_at,
                               finished_at=finished_at)
            name, text, tb = result["value"]
            return Outcome.from_error((name, text, tb, None), pid=pid, started_at=started_at,
                                      finished_at=finished_at)
        if state == "REVOKED":
            return Outcome(Status.CANCELLED, error="the task was revoked",
                           error_type="celery.exceptions.TaskRevokedError", pid=pending.pid)
        exc_type = result.get("exc_type", "Exception") if isinstance(result, dict) else "Exception"
        exc_message = result.get("exc_message") if isinstance(result, dict) else result
        if isinstance(exc_message, list | tuple):
            exc_message = ", ".join(map(str, exc_message))
        status = _FAILURES.get(exc_type, Status.FAILED)
        if status is Status.TIMED_OUT:
            error = f"timed out after {pending.attempt.timeout:g}s; Celery killed the child running it"
        elif status is Status.CRASHED:
            error = f"the Celery worker child running it died ({REDELIVERIES + 1} times): {exc_message}"
        else:
            error = f"{exc_type}: {exc_message}"
        return Outcome(status, error=error, traceback=traceback, error_type=exc_type, pid=pending.pid)


def _socket_timeouts() -> dict[str, float]:
    return {"socket_connect_timeout": SOCKET_TIMEOUT, "socket_timeout": SOCKET_TIMEOUT}


def _broker_name(app: Celery) -> str:
    """The broker's URL for messages, without its password."""
    url = app.conf.broker_write_url or app.conf.broker_url
    if isinstance(url, str):
        return _hidden(url)
    with app.connection_for_write() as connection:  # a list of URLs, or Celery's default: as kombu shows it
        return str(connection.as_uri())


def _hidden(url: str) -> str:
    """``url`` without its password (also a URL kombu cannot parse, whose port is not a number, say)."""
    try:
        return str(maybe_sanitize_url(url))
    except ValueError:
        return re.sub(r"(://[^/@]*?:)[^/@]*@", r"\1**@", url)


def _reason(exc: BaseException) -> str:
    return str(exc).strip() or type(exc).__name__


def _read_outcome(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _unreachable_outcome(message: str, cause: BaseException, traceback: str | None = None) -> Outcome:
    """A failed attempt whose broker or result backend cannot be reached: retryable, as the server may come back."""
    error = BackendUnreachableError(message)
    error.__cause__ = cause
    return Outcome(Status.FAILED, error=message, traceback=traceback, error_type="asyncsched.BackendUnreachableError",
                   exception=error)
