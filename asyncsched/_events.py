"""Fan-out of status events to any number of consumers.

Events published during one turn of the event loop are delivered together, at
the end of that turn (``loop.call_soon``): one hand-over per consumer and
turn, not one per event. A consumer sees only events published after it
subscribed.

Policy: every consumer has its own bounded buffer. Publishing never waits, so a
slow consumer never slows the scheduler or the other consumers. When a
consumer's buffer is full the *oldest* event in it is dropped and counted in
:attr:`EventStream.dropped`; the events it does see are still in order, for
each task and overall.

A consumer may ask for some kinds of event only (``kinds``): it gets only
those. The scheduler looks in :attr:`EventHub.wanted` before it publishes an
event, so a kind that no consumer wants costs nothing.

What is published, buffered and dropped is the event's fields in a plain tuple
(a ``RawEvent``); the :class:`~asyncsched.Event` object is built when a stream
hands it out, or when a listener is called. An event that is dropped, or
filtered out, is never built.

An :class:`EventListener` is the other kind of consumer, for the package's own
live displays: a function called with each delivered list of events, so
nothing is buffered and every event is seen. It costs the run less than a
stream (no event outlives its delivery, which spares the garbage collector),
but it runs inside the scheduler: it must be quick and must not raise.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from types import TracebackType
from typing import Any, Protocol

from ._errors import ConfigurationError
from ._models import Event, Status

__all__ = ["DEFAULT_EVENT_BUFFER", "EventHub", "EventListener", "EventStream", "Kinds", "RawEvent"]

Kinds = frozenset[type[Event]] | None
"""The kinds of event a consumer gets; None for every kind."""
RawEvent = tuple[type[Event], str, str, Status, float, "int | None", "str | None", "float | None", int,
                 "dict[str, Any] | None"]
"""An event as published: its kind, then its fields in order (see :class:`~asyncsched.Event`)."""

DEFAULT_EVENT_BUFFER = 10_000
"""Events buffered for one consumer before the oldest are dropped."""


class EventStream(AsyncIterator[Event]):
    """Live events, from the moment it was created until it or its scheduler is closed.

    Use ``async for event in stream`` and close it with ``aclose()`` (or
    ``async with``). A stream that is simply dropped is unsubscribed when it is
    garbage collected.
    """

    def __init__(self, hub: EventHub, batch_id: str | None, maxlen: int, kinds: Kinds = None) -> None:
        self.batch_id = batch_id
        self.kinds = kinds
        self.dropped = 0
        self._buffer: deque[RawEvent] = deque(maxlen=maxlen)
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._hub = hub

    def _push(self, events: list[RawEvent]) -> None:
        buffer = self._buffer
        over = len(buffer) + len(events) - (buffer.maxlen or 0)
        if over > 0:
            self.dropped += over
        buffer.extend(events)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _end(self) -> None:
        self._closed = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        while not self._buffer:
            if self._closed:
                raise StopAsyncIteration
            if self._waiter is not None:
                raise ConfigurationError("another task is already waiting on this EventStream: each consumer "
                                         "needs a stream of its own (call events() once per consumer)")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return _build(self._buffer.popleft())

    async def aclose(self) -> None:
        """Stop receiving events; what is buffered is discarded. Idempotent."""
        self._hub._unsubscribe(self)
        self._buffer.clear()
        self._end()

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()


class EventListener:
    """Calls a function with each delivered list of events, until :meth:`close`; see :meth:`EventHub.listen`."""

    __slots__ = ("__weakref__", "_callback", "_hub", "batch_id", "kinds")

    def __init__(self, hub: EventHub, callback: Callable[[list[Event]], None], batch_id: str | None,
                 kinds: Kinds = None) -> None:
        self.batch_id = batch_id
        self.kinds = kinds
        self._callback = callback
        self._hub = hub

    def _push(self, events: list[RawEvent]) -> None:
        self._callback([_build(raw) for raw in events])

    def _end(self) -> None:
        pass

    def close(self) -> None:
        """Deliver the events published so far, then stop the calls. Idempotent."""
        self._hub.deliver()
        self._hub._unsubscribe(self)


class _Subscriber(Protocol):
    batch_id: str | None
    kinds: Kinds

    def _push(self, events: list[RawEvent]) -> None: ...

    def _end(self) -> None: ...


class EventHub:
    """Publishes each event to every live :class:`EventStream` and :class:`EventListener`.

    Streams are held through weak references, so one the user drops is
    unsubscribed when it is collected.
    """

    def __init__(self, maxlen: int = DEFAULT_EVENT_BUFFER) -> None:
        self._refs: list[weakref.ref[_Subscriber]] = []
        self.wanted: frozenset[type[Event]] = frozenset()
        """The kinds of event some consumer would get: ``kind in hub.wanted`` before publishing an event."""
        self._maxlen = maxlen
        self._pending: list[RawEvent] = []  # published this turn of the loop, not delivered yet

    def subscribe(self, batch_id: str | None = None, maxlen: int | None = None,
                  kinds: Iterable[type[Event]] | None = None) -> EventStream:
        stream = EventStream(self, batch_id, maxlen or self._maxlen, _kinds(kinds))
        self._add(stream)
        return stream

    def listen(self, callback: Callable[[list[Event]], None], batch_id: str | None = None,
               kinds: Iterable[type[Event]] | None = None) -> EventListener:
        """Call ``callback(events)`` with the events from now on, a turn of the loop's worth at a time
        (while the listener lives)."""
        listener = EventListener(self, callback, batch_id, _kinds(kinds))
        self._add(listener)
        return listener

    def _add(self, subscriber: _Subscriber) -> None:
        self.deliver()  # what was published before it subscribed is not its to see
        self._set([*self._refs, weakref.ref(subscriber, self._forget)])

    def _forget(self, ref: weakref.ref[_Subscriber]) -> None:
        self._set([r for r in self._refs if r is not ref])

    def _unsubscribe(self, subscriber: _Subscriber) -> None:
        self._set([r for r in self._refs if r() is not subscriber])

    def _set(self, refs: list[weakref.ref[_Subscriber]]) -> None:
        self._refs = refs
        wanted: set[type[Event]] = set()
        for ref in refs:
            subscriber = ref()
            if subscriber is not None:
                wanted |= _ALL_KINDS if subscriber.kinds is None else subscriber.kinds
        self.wanted = frozenset(wanted)

    def publish(self, kind: type[Event], batch_id: str, key: str, status: Status, timestamp: float,
                pid: int | None = None, message: str | None = None, progress: float | None = None,
                attempt: int = 1, data: dict[str, Any] | None = None) -> None:
        """Queue an event of ``kind`` with these fields for delivery at the end of this turn of the loop.

        Never waits. Each consumer gets only the kinds it asked for; check
        :attr:`wanted` first to publish no event that nobody would get.
        """
        if not self._refs:
            return
        pending = self._pending
        if not pending:
            asyncio.get_running_loop().call_soon(self.deliver)
        pending.append((kind, batch_id, key, status, timestamp, pid, message, progress, attempt, data))

    def deliver(self) -> None:
        """Hand the events published so far to every consumer now (else it happens at the end of the turn)."""
        events, self._pending = self._pending, []
        if not events:
            return
        for ref in self._refs:
            subscriber = ref()
            if subscriber is None:
                continue
            batch_id, kinds = subscriber.batch_id, subscriber.kinds
            mine = events
            if batch_id is not None:
                mine = [e for e in mine if e[1] == batch_id]
            if kinds is not None:
                mine = [e for e in mine if e[0] in kinds]
            if mine:
                try:
                    subscriber._push(mine)
                except Exception as exc:  # a broken listener must not cost the others their events
                    asyncio.get_running_loop().call_exception_handler(
                        {"message": "an event listener failed", "exception": exc})

    def close(self) -> None:
        """Deliver what is pending, then end every stream once it has handed out what it holds."""
        self.deliver()
        refs = self._refs
        self._set([])
        for ref in refs:
            stream = ref()
            if stream is not None:
                stream._end()


def _build(raw: RawEvent) -> Event:
    return raw[0](*raw[1:])


_ALL_KINDS = frozenset(Event.__subclasses__())
"""The kinds of event: what a consumer of every kind wants."""


def _kinds(kinds: Iterable[type[Event]] | None) -> Kinds:
    if kinds is None:
        return None
    if isinstance(kinds, type):
        raise ConfigurationError(f"kinds is a list of event classes, such as kinds=[{kinds.__name__}]; "
                                 f"got the class {kinds.__name__} itself")
    chosen = frozenset(kinds)
    for kind in chosen:
        if not (isinstance(kind, type) and issubclass(kind, Event) and kind is not Event):
            raise ConfigurationError(f"kinds are event classes such as TaskStarted or TaskReported, got {kind!r}")
    return chosen
