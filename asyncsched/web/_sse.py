"""Server-Sent Events: the scheduler's events numbered, encoded once, kept for catch-up and fanned out.

Data flow::

    the scheduler's EventHub, a loop turn's events at a time (an EventListener: every event, in order)
        |  publish_events(); publish_notice() for the web layer's own batch events
        v
    EventLog: numbers each event; encodes it the first time a client needs it, once for all
        |                              |
        v                              v
    backlog (the latest N)     every Listener's pending events
        |                              |
        |  Last-Event-ID               v
        +---------------------> one GET {prefix}/api/events response each

Every event has an id ``<epoch>-<number>``: ``epoch`` is random for each log, so
an id from before a restart is recognised as such. A client that reconnects
with ``Last-Event-ID`` gets the events it missed from the backlog. When they are
no longer all there (or the id is from another epoch), it gets one ``reset``
event instead, which carries the latest id: it should then reload its state.

A listener that falls ``2 * backlog`` events behind (its connection is too slow) has
its stream ended after what it holds: its client reconnects and catches up from
the backlog, so a slow client never makes the server buffer without bound.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections import deque
from typing import Any

from .._models import Event, finite
from ._json import jsonable

__all__ = ["EventLog", "Listener"]

KEEP_ALIVE = b": keep-alive\n\n"

_KINDS = {"TaskStarted": "started", "TaskReported": "reported", "TaskRetried": "retried", "TaskFinished": "finished"}


class _Entry:
    """One numbered event, encoded the first time a client needs it (and then once for all of them)."""

    __slots__ = ("_chunk", "batch_id", "kind", "number", "payload")

    def __init__(self, number: int, batch_id: str, kind: str, payload: Event | dict[str, Any]) -> None:
        self.number = number
        self.batch_id = batch_id
        self.kind = kind
        self.payload = payload
        self._chunk: bytes | None = None

    def chunk(self, epoch: str) -> bytes:
        if self._chunk is None:
            payload = self.payload
            data = _event_json(payload) if isinstance(payload, Event) else payload
            text = json.dumps(data, separators=(",", ":"), allow_nan=False)
            self._chunk = f"id: {epoch}-{self.number}\nevent: {self.kind}\ndata: {text}\n\n".encode()
            self.payload = {}  # encoded: what it held (a report's data, say) is not kept twice
        return self._chunk


def _event_json(event: Event) -> dict[str, Any]:
    return {
        "type": _KINDS.get(type(event).__name__, "event"),
        "batch_id": event.batch_id,
        "key": event.key,
        "status": event.status.value,
        "timestamp": finite(event.timestamp),
        "pid": event.pid,
        "message": event.message,
        "progress": finite(event.progress),
        "attempt": event.attempt,
        "data": jsonable(event.data),
    }


class Listener:
    """One client's live events, waiting to be written."""

    def __init__(self, epoch: str, batch_id: str | None, limit: int) -> None:
        self.batch_id = batch_id
        self.ended = False
        self._epoch = epoch
        self._limit = limit
        self._pending: list[_Entry] = []
        self._wake = asyncio.Event()

    def push(self, entry: _Entry) -> bool:
        """Queue ``entry`` for this client, if it is of its batch; False once the stream has ended."""
        if self.ended or (self.batch_id is not None and entry.batch_id != self.batch_id and entry.kind != "reset"):
            return not self.ended
        self._pending.append(entry)
        if len(self._pending) >= self._limit:
            self.ended = True  # too far behind: it reconnects and catches up from the backlog
        self._wake.set()
        return not self.ended

    def end(self) -> None:
        self.ended = True
        self._wake.set()

    async def next_chunk(self, heartbeat: float) -> bytes | None:
        """What to write next: the pending events, a keep-alive comment after ``heartbeat`` idle
        seconds, or None once the stream has ended and everything was written."""
        if not self._pending and not self.ended:
            try:
                async with asyncio.timeout(heartbeat):
                    await self._wake.wait()
            except TimeoutError:
                return KEEP_ALIVE
        self._wake.clear()
        entries, self._pending = self._pending, []
        return b"".join(entry.chunk(self._epoch) for entry in entries) or None


class EventLog:
    """Numbers events, keeps the latest ``backlog`` of them, and hands each to every live listener."""

    def __init__(self, backlog: int) -> None:
        self.epoch = secrets.token_hex(4)
        self._backlog: deque[_Entry] = deque(maxlen=backlog)
        self._listeners: set[Listener] = set()
        self._last = 0
        self._closed = False

    @property
    def last_id(self) -> str:
        """The id of the latest event (``<epoch>-0`` before the first)."""
        return f"{self.epoch}-{self._last}"

    def _publish(self, batch_id: str, kind: str, payload: Event | dict[str, Any]) -> None:
        self._last += 1
        entry = _Entry(self._last, batch_id, kind, payload)
        self._backlog.append(entry)
        behind = [listener for listener in self._listeners if not listener.push(entry)]
        self._listeners.difference_update(behind)  # it holds its last events, and no more

    def publish_events(self, events: list[Event]) -> None:
        """Publish the scheduler's events as ``task`` events (an ``EventHub`` listener: quick, never raises)."""
        for event in events:
            self._publish(event.batch_id, "task", event)

    def publish_notice(self, batch_id: str, data: dict[str, Any]) -> None:
        """Publish a ``batch`` event."""
        self._publish(batch_id, "batch", data)

    def listen(self, batch_id: str | None, last_event_id: str | None) -> Listener:
        """A listener for the events from now on, after those missed since ``last_event_id``, if given."""
        listener = Listener(self.epoch, batch_id, 2 * (self._backlog.maxlen or 1))  # room for a full catch-up
        if self._closed:
            listener.end()
            return listener
        if last_event_id is not None:
            missed = self._since(last_event_id)
            if missed is None:
                listener.push(_Entry(self._last, "", "reset", {
                    "last_event_id": self.last_id, "reason": "events were missed: reload the state"}))
            else:
                for entry in missed:
                    listener.push(entry)
        self._listeners.add(listener)
        return listener

    def _since(self, last_event_id: str) -> list[_Entry] | None:
        """The backlog after ``last_event_id``, or None when some events after it are gone or it is not ours."""
        epoch, _, number = last_event_id.strip().partition("-")
        if epoch != self.epoch or not (number.isascii() and number.isdigit() and len(number) < 19) \
                or int(number) > self._last:
            return None
        after = int(number)
        oldest = self._backlog[0].number if self._backlog else self._last + 1
        if after + 1 < oldest:
            return None
        return [entry for entry in self._backlog if entry.number > after]

    def forget(self, listener: Listener) -> None:
        self._listeners.discard(listener)

    def close(self) -> None:
        """End every live stream (the app is shutting down); new listeners end at once."""
        self._closed = True
        for listener in self._listeners:
            listener.end()
        self._listeners.clear()
