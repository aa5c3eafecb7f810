"""Run attempts on a Dask distributed cluster.

Data flow (everything here runs on the scheduler's event loop; Dask's async
Client lives on the same loop, so there are no thread hops)::

    submit(attempt) --cloudpickle (fn, args)--> client.submit(run_on_dask, payload, topic, tag, pure=False)
                                                    |
                                                    v  Dask worker: _remote.run_on_dask
    _on_event <-- subscribe_topic(topic) <-- log_event(topic, STARTED / REPORTED)
       | TaskStarted: the timeout starts now        |
       | TaskReported                               v
       v                                        result: pickle of (ok, value, started, finished, pid)
    emit(...)                   _run() <--------- await future
                                   |
                                   v
                                Outcome

What Dask cannot do is reported honestly: cancelling a Dask future does not
stop a task that is already running. A timed-out attempt is recorded
``timed_out`` at once; with ``kill_on_timeout=True`` the worker running it is
restarted (through its nanny), which stops the task but also every other task
on that worker. The timeout counts from the start the worker reports, which
its event loop sends: a task that holds the GIL from its first instant (a long
C call) delays that report until it ends; it is then recorded ``timed_out``
when its result shows it ran past its timeout, and nothing stopped it. A
worker that dies (``os._exit``, segfault, lost host) is Dask's to handle: it
reschedules the task elsewhere up to
``distributed.scheduler.allowed-failures`` times, then reports ``KilledWorker``,
which is recorded ``crashed``.

Starting with an ``address`` opens a client, bounded by ``connect_timeout``:
Dask alone keeps retrying an address where nothing listens, or a host name
that does not resolve, for ``distributed.comm.timeouts.connect`` (30 s), and
waits without end on a listener that never answers its handshake. A start
that fails raises :class:`BackendUnreachableError` and closes that client
again: it leaves no task, connection or Dask default client behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import pickle
import time
import uuid
from dataclasses import dataclass
from typing import Any

import cloudpickle
import dask.config
from dask.utils import parse_timedelta
from distributed import Client, Future, KilledWorker

from .._backend import Backend, Emit, report_data, unreadable_result
from .._errors import BackendUnreachableError, ClosedError, ConfigurationError
from .._models import Attempt, Outcome, Status, TaskReported, TaskStarted, is_seconds
from .._worker import error_info
from ._remote import REPORTED, STARTED, end_dask_worker, run_on_dask

__all__ = ["DEFAULT_CAPACITY", "DEFAULT_CONNECT_TIMEOUT", "DaskBackend"]

DEFAULT_CAPACITY = 16
"""Attempts in flight when ``capacity`` is not given: set it to the cluster's number of threads."""

DEFAULT_CONNECT_TIMEOUT = 10.0
"""Seconds :meth:`DaskBackend.start` waits for the scheduler at ``address`` when ``connect_timeout`` is not given."""

CANCEL_WAIT = 2.0
"""Seconds to wait for the scheduler to forget a timed-out attempt before its worker is restarted."""

RESTART_WAIT = 10.0
"""Seconds to wait for a worker's restart to be sent: a scheduler that stops answering does not hold up aclose()."""

_FORGET_TOPIC = lambda topic, dask_scheduler: (  # noqa: E731 - a lambda goes by value: the scheduler need not import us
    getattr(getattr(dask_scheduler, "_broker", None), "_topics", None) or {}).pop(topic, None) and None
"""Run on the Dask scheduler as a backend closes: drop its topic, or the scheduler keeps the last events of every
backend that ever ran, report() data and all (its private store of events: where it is not, nothing is done)."""

_WHAT_TO_DO = ("check that a Dask scheduler runs there and that this machine can reach its host and port (or, if it "
               "is still starting, give DaskBackend a longer connect_timeout)")

logger = logging.getLogger(__name__)


def _last_failure(exc: BaseException) -> OSError | None:
    """Why Dask's last try to connect failed (refused, a name that does not resolve), when the timeout cut into its
    wait before the next one: the innermost error of ``exc``'s chain that is not a timeout."""
    found, seen = None, set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and not isinstance(current, TimeoutError):
            found = current
        current = current.__cause__ or current.__context__
    return found


@dataclass(slots=True)
class _Running:
    """The parent's record of one attempt on the cluster."""

    attempt: Attempt
    emit: Emit
    deadline: asyncio.Timeout | None = None
    worker: str | None = None
    pid: int | None = None


class DaskBackend(Backend):
    """Runs each attempt as one Dask task: ``DaskBackend(address="tcp://host:8786")`` or ``DaskBackend(client=c)``.

    A ``client`` must be asynchronous (``await Client(..., asynchronous=True)``)
    on the scheduler's loop; it stays open after :meth:`aclose`. With an
    ``address`` the backend opens and closes its own client. ``capacity`` is
    how many attempts run at once, usually the cluster's total threads.

    ``connect_timeout`` (seconds, with ``address``) bounds the start: when no
    Dask scheduler answers at ``address`` within it (nothing listens there, the
    host does not resolve or cannot be reached, a listener that is not a Dask
    scheduler), :meth:`start` raises :class:`BackendUnreachableError` naming the
    address. Dask retries meanwhile, so a scheduler that is still starting is
    waited for: give more time when it starts with the batch.

    ``kill_on_timeout=True`` restarts the worker running a timed-out attempt.
    That is costly: it restarts the whole worker process, with every other
    task it was running (Dask reschedules those), and needs workers started
    under a nanny (the default of ``dask worker``). Without it a timed-out task
    runs on in the background, its result discarded.
    """

    def __init__(self, address: str | None = None, *, client: Client | None = None,
                 kill_on_timeout: bool = False, capacity: int = DEFAULT_CAPACITY,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT) -> None:
        if (address is None) == (client is None):
            raise ConfigurationError("DaskBackend needs either address= or client=, not both")
        if client is not None and not client.asynchronous:
            raise ConfigurationError("DaskBackend needs an asynchronous client: Client(..., asynchronous=True)")
        if capacity < 1:
            raise ConfigurationError(f"capacity must be at least 1, got {capacity!r}")
        if not (is_seconds(connect_timeout) and connect_timeout > 0):
            raise ConfigurationError(f"connect_timeout must be a positive number of seconds, got {connect_timeout!r}")
        self.address = address
        self.client = client
        self.kill_on_timeout = kill_on_timeout
        self.capacity = capacity
        self.connect_timeout = connect_timeout
        self._owns_client = client is None
        self._topic = f"asyncsched-{uuid.uuid4().hex}"
        self._tags = (f"{n:x}" for n in itertools.count())
        self._running: dict[str, _Running] = {}
        self._attempts: set[asyncio.Future[Outcome]] = set()
        self._restarts: set[asyncio.Future[None]] = set()
        self._closed = False
        self._subscribed: str | None = None  # the id of the scheduler that sends this backend's events

    async def start(self) -> None:
        """Open the client (with ``address``), or raise :class:`BackendUnreachableError` after ``connect_timeout``.
        A backend that was closed raises ClosedError: the client it opened is closed."""
        if self._closed:
            raise ClosedError("this DaskBackend was closed; create a new one")
        if self.client is None:
            self.client = await self._connect()
        self._subscribe(self.client)

    def _subscribe(self, client: Client) -> None:
        """Have the scheduler send this backend's events, once per scheduler: Dask's client does not subscribe
        again when it reconnects to a scheduler restarted at the same address, whose events would then be lost,
        and with them the starts that set the timeouts."""
        self._subscribed = client.scheduler_info().get("id")  # the client's cached identity: no request
        client.subscribe_topic(self._topic, self._on_event)

    async def _connect(self) -> Client:
        """A client connected to ``address`` within ``connect_timeout``; a client that did not connect is closed.

        Dask gives up on its own after ``distributed.comm.timeouts.connect``:
        a longer ``connect_timeout`` is passed on to it, or it would end the
        wait early. A shorter one leaves Dask's timeouts of the running client
        (connecting to workers, reconnecting) as they are.
        """
        assert self.address is not None
        timeout = self.connect_timeout
        dask_timeout = parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), "s")
        client = Client(self.address, asynchronous=True, timeout=max(timeout, dask_timeout))  # it starts at once
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                await client
        except BaseException as exc:
            # Dask closes it only after some errors: neither when the wait is cancelled nor on a bad address
            await self._close_failed(client)
            if deadline.expired():
                last = _last_failure(exc)
                why = f" (last error: {type(last).__name__}: {last})" if last is not None else ""
                raise BackendUnreachableError(f"could not reach the Dask scheduler at {self.address} within "
                                              f"{timeout:g}s{why}; {_WHAT_TO_DO}") from exc
            if isinstance(exc, OSError | MemoryError):  # a listener that hangs up, or speaks first (an HTTP,
                # SSH or SMTP server: Dask reads its banner as a frame's length), a TLS handshake refused, Dask's
                # own timeout
                raise BackendUnreachableError(f"could not connect to a Dask scheduler at {self.address} "
                                              f"({type(exc).__name__}: {exc}); {_WHAT_TO_DO}") from exc
            if isinstance(exc, ValueError):  # an address Dask cannot read: an unknown scheme, no port
                raise ConfigurationError(f"DaskBackend cannot use the address {self.address!r} ({exc}); give the "
                                         "Dask scheduler's address with its port, such as tcp://host:8786") from exc
            if isinstance(exc, TypeError) and self.address.startswith("tls://"):  # no ssl_context: a Client's
                raise ConfigurationError(f"DaskBackend cannot open {self.address!r} on its own ({exc}): pass "
                                         "client=Client(address, security=..., asynchronous=True)") from exc
            raise
        return client

    @staticmethod
    async def _close_failed(client: Client) -> None:
        try:
            await client.close()
        except Exception:  # the start's own error is the one to raise
            logger.warning("asyncsched: could not close the Dask client that did not connect", exc_info=True)

    def submit(self, attempt: Attempt, emit: Emit) -> asyncio.Future[Outcome]:
        if self.client is not None and self.client.status in ("closing", "closed"):  # Dask gave up reconnecting
            raise BackendUnreachableError(
                f"the Dask client is closed: it lost the scheduler{f' at {self.address}' if self.address else ''} "
                "for longer than Dask waits to reconnect; once the cluster is back, run the batch on a new Scheduler "
                "(and a new DaskBackend)")
        run = asyncio.ensure_future(self._run(attempt, emit))
        self._attempts.add(run)
        run.add_done_callback(self._attempts.discard)
        return run

    def _on_event(self, event: tuple[float, Any]) -> None:
        kind, tag, *rest = event[1]
        running = self._running.get(tag)
        if running is None:
            return  # an attempt that already ended: timed out, cancelled
        attempt = running.attempt
        if kind == STARTED:
            timestamp, running.pid, running.worker = rest
            if attempt.timeout is not None and running.deadline is not None:
                running.deadline.reschedule(asyncio.get_running_loop().time() + attempt.timeout)
            running.emit(TaskStarted(attempt.batch_id, attempt.key, Status.RUNNING, timestamp, running.pid,
                                     attempt=attempt.number))
        elif kind == REPORTED:
            timestamp, message, progress = pickle.loads(rest[0])
            running.emit(TaskReported(attempt.batch_id, attempt.key, Status.RUNNING, timestamp, running.pid,
                                      message, progress, attempt.number, report_data(rest[1]) or None))

    async def _run(self, attempt: Attempt, emit: Emit) -> Outcome:
        client = self.client
        assert client is not None, "start() was not called"
        try:
            payload = cloudpickle.dumps((attempt.fn, attempt.args))
        except Exception as exc:
            name, text, tb, _ = error_info(exc)
            return Outcome(Status.FAILED, error=f"the task could not be pickled: {text}", traceback=tb,
                           error_type=name, retryable=False)
        tag = next(self._tags)
        running = self._running[tag] = _Running(attempt, emit)
        if client.scheduler_info().get("id") != self._subscribed:  # reconnected to another scheduler
            self._subscribe(client)
        future: Future[bytes] | None = None
        try:
            future = client.submit(run_on_dask, payload, self._topic, tag, pure=False)
            async with asyncio.timeout(None) as running.deadline:  # set when the attempt starts
                blob = await future
        except TimeoutError:
            assert future is not None
            return self._timed_out(running, future)
        except KilledWorker as exc:
            return Outcome(Status.CRASHED, error=f"the Dask worker running it died: {exc}", pid=running.pid,
                           error_type="distributed.KilledWorker")
        except Exception as exc:  # the cluster lost the task: scheduler restarted, client disconnected, ...
            name, text, tb, _ = error_info(exc)
            return Outcome(Status.CRASHED, error=f"Dask lost the task: {text}", traceback=tb, pid=running.pid,
                           error_type=name)
        finally:
            del self._running[tag]
            if future is not None and not future.done():
                await client.cancel([future])
        try:
            ok, value, started, finished, pid = pickle.loads(blob)
        except BaseException as exc:  # e.g. its class cannot be imported here, or a reducer calls sys.exit()
            return unreadable_result(exc, pid=running.pid)
        timeout = attempt.timeout
        if timeout is not None and finished - started > timeout:  # its start came too late to time it out
            return Outcome(Status.TIMED_OUT, error=f"timed out after {timeout:g}s; it ran {finished - started:.1f}s, "
                           "to its end: its Dask worker could not report its start while it held the GIL",
                           error_type="TimeoutError", pid=pid, started_at=started, finished_at=finished)
        if ok:
            return Outcome(Status.COMPLETED, value=value, pid=pid, started_at=started, finished_at=finished)
        return Outcome.from_error(value, pid=pid, started_at=started, finished_at=finished)

    def _timed_out(self, running: _Running, future: Future[bytes]) -> Outcome:
        timeout = running.attempt.timeout
        if self.kill_on_timeout and running.worker is not None:
            restart = asyncio.ensure_future(self._restart(future, running.worker))
            self._restarts.add(restart)
            restart.add_done_callback(self._restarts.discard)
            how = f"its Dask worker {running.worker} is being restarted"
        else:
            how = "Dask cannot stop a running task: it runs on in the background (kill_on_timeout=True restarts " \
                  "its worker)"
        return Outcome(Status.TIMED_OUT, error=f"timed out after {timeout:g}s; {how}", pid=running.pid,
                       error_type="TimeoutError", finished_at=time.time())

    async def _restart(self, future: Future[bytes], worker: str) -> None:
        """Cancel the attempt's key, then end its worker process (and the processes it started) at once; the
        worker's nanny starts a new one.

        The cancel travels on the client's batched stream: wait until the
        scheduler has applied it, or Dask could hand the task to another worker
        when this one dies. (``Client.restart_workers`` is not used: it first
        waits seconds for the stuck task to let the worker close.)
        """
        client = self.client
        assert client is not None
        try:
            async with asyncio.timeout(CANCEL_WAIT):
                await client.cancel([future])
                while future.key in (await client.processing([worker])).get(worker, ()):
                    pass
        except Exception:  # timed out, or the worker has left meanwhile (processing() raises KeyError): end it anyway
            pass
        try:
            async with asyncio.timeout(RESTART_WAIT):
                await client.run(end_dask_worker, workers=[worker], on_error="ignore")
        except Exception:  # the worker may be gone already, the scheduler may not answer: the timed-out outcome stands
            logger.warning("asyncsched: could not restart Dask worker %s", worker, exc_info=True)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for run in self._attempts:
            run.cancel()  # each cancels its Dask future
        await asyncio.gather(*self._attempts, *self._restarts, return_exceptions=True)
        client = self.client
        if client is None:
            return
        with contextlib.suppress(Exception):  # the client may be closed: Dask gave up reconnecting to a lost cluster
            client.unsubscribe_topic(self._topic)
        with contextlib.suppress(Exception):  # a cluster that runs no function for clients keeps it, as before
            async with asyncio.timeout(CANCEL_WAIT):
                await client.run_on_scheduler(_FORGET_TOPIC, self._topic)
        if self._owns_client:
            await client.close()
