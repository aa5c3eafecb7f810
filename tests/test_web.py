"""The web API through aiohttp's test client: every route, status code and error, auth, events, cancel."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

import asyncsched.web._app
from asyncsched import (
    ClosedError,
    ConfigurationError,
    Scheduler,
    Status,
    StoreError,
    Task,
    TaskDefinitionError,
    TaskResult,
)
from asyncsched._models import TaskReported
from asyncsched._store import MemoryStore
from asyncsched.web import Limits, TaskRegistry, setup
from asyncsched.web._sse import EventLog

from . import faults, tasks
from .util import SlowToBegin, SlowToEnd, wait_gone

API = "/asyncsched/api"
TOKEN = "s3cret-token"
LIMITS = Limits(max_body=4096, max_inputs=50, max_page=10, default_page=5, event_backlog=40)

REGISTRY = TaskRegistry()
REGISTRY.add("square", tasks.square)
REGISTRY.add("add", tasks.add)
REGISTRY.add("say", tasks.say)
REGISTRY.add("odd_values", tasks.odd_values)
REGISTRY.add("hang", faults.hang)

Client = TestClient[web.Request, web.Application]


async def make_client(aiohttp_client: AiohttpClient, *, registry: TaskRegistry | None = REGISTRY,
                      token: str | None = None, scheduler: Scheduler | None = None,
                      allowed_hosts: frozenset[str] | None = None, limits: Limits = LIMITS) -> Client:
    app = web.Application()
    setup(app, scheduler or Scheduler(workers=2), registry=registry, token=token, limits=limits,
          allowed_hosts=allowed_hosts)
    return await aiohttp_client(app)


@pytest.fixture
async def client(aiohttp_client: AiohttpClient) -> Client:
    return await make_client(aiohttp_client)


def strict_json(text: str) -> Any:
    """``text`` parsed as JSON proper: ``NaN`` and ``Infinity``, which ``json`` accepts by default, are not."""
    def refuse(name: str) -> NoReturn:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


# -- reading Server-Sent Events -------------------------------------------------------------

@dataclass
class Sse:
    id: str  # "" when the event has none
    event: str
    data: Any


async def read_event(response: ClientResponse) -> Sse:
    """The next event of a stream (comments and field-less blocks skipped)."""
    fields: dict[str, str] = {}
    while True:
        line = await response.content.readline()
        if not line:
            raise EOFError("the event stream ended")
        text = line.decode().rstrip("\n")
        if text.startswith(":"):
            continue
        if text:
            name, _, value = text.partition(":")
            fields[name] = value.removeprefix(" ")
        elif "data" in fields:
            return Sse(fields.get("id", ""), fields.get("event", "message"), strict_json(fields["data"]))
        else:
            fields = {}


async def events_until(response: ClientResponse, done: Callable[[list[Sse]], bool]) -> list[Sse]:
    seen: list[Sse] = []
    async with asyncio.timeout(30):
        while not done(seen):
            seen.append(await read_event(response))
    return seen


def batch_finished(seen: list[Sse]) -> bool:
    return bool(seen) and seen[-1].event == "batch" and seen[-1].data["state"] == "finished"


async def submit(client: Client, **body: Any) -> dict[str, Any]:
    response = await client.post(f"{API}/batches", json=body)
    assert response.status == 202, await response.text()
    answer: dict[str, Any] = await response.json()
    return answer


async def run_batch(client: Client, batch_id: str, **body: Any) -> list[Sse]:
    """Submit a batch and return its events, up to its end."""
    events = await client.get(f"{API}/events", params={"batch": batch_id})
    try:
        await submit(client, batch_id=batch_id, **body)
        return await events_until(events, batch_finished)
    finally:
        events.close()


async def get_json(client: Client, path: str, status: int = 200, **kw: Any) -> Any:
    response = await client.get(f"{API}{path}", **kw)
    text = await response.text()
    assert response.status == status, text
    return strict_json(text)


# -- submitting and reading batches ---------------------------------------------------------

async def test_a_submitted_batch_runs_in_the_background(client: Client) -> None:
    events = await client.get(f"{API}/events", params={"batch": "b1"})
    response = await client.post(f"{API}/batches", json={"task": "square", "inputs": [1, 2, [3]], "batch_id": "b1"})
    assert response.status == 202
    answer = await response.json()
    assert answer == {"batch_id": "b1", "state": "running", "expected": 3, "url": f"{API}/batches/b1"}
    assert response.headers["Location"] == f"{API}/batches/b1"
    await events_until(events, batch_finished)
    events.close()
    summary = await get_json(client, "/batches/b1")
    assert summary["state"] == "finished" and summary["name"] == "square"
    assert {k: summary[k] for k in ("batch_id", "total", "completed", "failed", "timed_out", "crashed",
                                    "cancelled", "success_rate")} == {
        "batch_id": "b1", "total": 3, "completed": 3, "failed": 0, "timed_out": 0, "crashed": 0, "cancelled": 0,
        "success_rate": 1.0}
    assert summary["finished_at"] >= summary["created_at"] and summary["elapsed"] >= 0
    results = await get_json(client, "/batches/b1/results")
    assert sorted(r["value"] for r in results["results"]) == [1, 4, 9]
    assert (results["total"], results["limit"], results["offset"]) == (3, 5, 0)
    first = results["results"][0]
    assert set(first) >= {"key", "status", "value", "error", "attempts", "pid", "started_at", "finished_at",
                          "duration", "message", "progress", "batch_id", "index", "traceback", "error_type"}
    assert first["status"] == "completed" and first["attempts"] == 1 and first["pid"] > 0


async def test_inputs_follow_the_cli_rule(client: Client) -> None:
    await run_batch(client, "rule", task="add", inputs=[[1, 2], {"a": 3, "b": 4}, 5, {"a": 1, "c": 2}])
    page = await get_json(client, "/batches/rule/results")
    by_key = {r["key"]: r for r in page["results"]}
    assert [by_key[k]["value"] for k in "012"] == [3, 7, 5]
    assert by_key["3"]["status"] == "failed" and "unexpected keyword argument 'c'" in by_key["3"]["error"]


async def test_timeout_and_retries_apply_to_every_task(client: Client) -> None:
    events = await run_batch(client, "tr", task="hang", inputs=[[]], timeout=0.3, retries=1)
    assert [e.data["type"] for e in events if e.event == "task"].count("retried") == 1
    (result,) = (await get_json(client, "/batches/tr/results"))["results"]
    assert result["status"] == "timed_out" and result["attempts"] == 2


async def test_batches_are_listed_newest_first_with_counts(client: Client) -> None:
    for batch_id in ("first", "second"):
        await run_batch(client, batch_id, task="say", inputs=[["ok"], ["bad", True]])
    page = await get_json(client, "/batches")
    assert [b["batch_id"] for b in page["batches"]] == ["second", "first"]
    assert (page["total"], page["limit"], page["offset"]) == (2, 5, 0)
    assert page["batches"][0]["completed"] == 1 and page["batches"][0]["failed"] == 1
    assert page["batches"][0]["success_rate"] == 0.5
    assert [b["batch_id"] for b in (await get_json(client, "/batches?limit=1&offset=1"))["batches"]] == ["first"]


async def test_results_filter_by_status_and_pages_are_capped(client: Client) -> None:
    inputs = [["fine"]] * 12 + [["broken", True]] * 3
    await run_batch(client, "mix", task="say", inputs=inputs)
    failed = await get_json(client, "/batches/mix/results?status=failed")
    assert failed["total"] == 3 and {r["status"] for r in failed["results"]} == {"failed"}
    assert all("ValueError: broken" in r["error"] for r in failed["results"])
    capped = await get_json(client, "/batches/mix/results?limit=1000")
    assert capped["limit"] == 10 and len(capped["results"]) == 10 and capped["total"] == 15
    rest = await get_json(client, "/batches/mix/results?limit=10&offset=10")
    assert len(rest["results"]) == 5
    assert not (await get_json(client, "/batches/mix/results?status=crashed"))["results"]


async def test_values_that_json_cannot_carry_are_shown_by_repr(client: Client) -> None:
    await run_batch(client, "odd", task="odd_values", inputs=[[]])
    (result,) = (await get_json(client, "/batches/odd/results"))["results"]
    assert result["value"] == {"tuple": [1, 2], "set": "{3}", "nan": "nan", "4": "int key"}


async def test_numbers_json_cannot_carry_are_null_in_events_and_results(aiohttp_client: AiohttpClient) -> None:
    store = MemoryStore()  # results and events from any backend, store or custom code
    scheduler = Scheduler(workers=1, store=store)
    client = await make_client(aiohttp_client, scheduler=scheduler)
    events = await client.get(f"{API}/events")
    scheduler._hub.publish(TaskReported, "odd", "0", Status.RUNNING, math.inf, progress=math.nan)
    reported = await read_event(events)
    assert (reported.data["timestamp"], reported.data["progress"]) == (None, None)
    events.close()
    epoch = reported.id.split("-")[0]
    resumed = await client.get(f"{API}/events", headers={"Last-Event-ID": f"{epoch}-0"})
    assert (await read_event(resumed)).data == reported.data  # a reconnect replays it just as well
    resumed.close()
    await store.begin_batch("odd")
    store.add(TaskResult("odd", "0", Status.COMPLETED, started_at=1.0, finished_at=math.inf, progress=-math.inf))
    await store.end_batch("odd")
    (result,) = (await get_json(client, "/batches/odd/results"))["results"]
    assert (result["started_at"], result["finished_at"], result["duration"], result["progress"]) == (
        1.0, None, None, None)


class Unprintable:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


async def test_values_that_cannot_be_printed_are_described_not_fatal(aiohttp_client: AiohttpClient) -> None:
    # An int past str()'s limit on digits, or an object whose repr() raises, in report() data or in a value:
    # each is described, where it used to end every event stream that met it (and its replays) and fail the page.
    store = MemoryStore()
    scheduler = Scheduler(workers=1, store=store)
    client = await make_client(aiohttp_client, scheduler=scheduler)
    events = await client.get(f"{API}/events")
    huge = 10 ** 5000
    odd: dict[Any, Any] = {"n": huge, "thing": Unprintable(), huge: "key", "items": [huge, (Unprintable(),)]}
    scheduler._hub.publish(TaskReported, "odd", "0", Status.RUNNING, 1.0, data=odd)
    scheduler._hub.publish(TaskReported, "odd", "1", Status.RUNNING, 2.0, message="next")
    reported, following = await read_event(events), await read_event(events)
    assert reported.data["data"] == {
        "n": "<int of 16610 bits, too long to show>", "thing": "<Unprintable object: repr() failed: RuntimeError>",
        "<int of 16610 bits, too long to show>": "key",
        "items": ["<int of 16610 bits, too long to show>", ["<Unprintable object: repr() failed: RuntimeError>"]]}
    assert following.data["message"] == "next"
    events.close()
    await store.begin_batch("odd")
    store.add(TaskResult("odd", "0", Status.COMPLETED, value=huge))
    store.add(TaskResult("odd", "1", Status.COMPLETED, value=Unprintable()))
    store.add(TaskResult("odd", "2", Status.COMPLETED, value=2 ** 4097))  # long, but printable
    await store.end_batch("odd")
    page = await get_json(client, "/batches/odd/results")
    assert [r["value"] for r in page["results"]] == [
        "<int of 16610 bits, too long to show>", "<Unprintable object: repr() failed: RuntimeError>", 2 ** 4097]


async def test_a_scheduler_closed_under_the_app_is_answered_in_json(aiohttp_client: AiohttpClient) -> None:
    scheduler = Scheduler(workers=1)
    client = await make_client(aiohttp_client, scheduler=scheduler)
    await scheduler.aclose()  # by the host app, or by another app that served it too and stopped
    for method, path in [("GET", "/batches"), ("GET", "/batches/x"), ("GET", "/batches/x/results"),
                         ("DELETE", "/batches/x")]:
        response = await client.request(method, f"{API}{path}")
        assert (response.status, response.content_type) == (503, "application/json"), (method, path)
        assert "this Scheduler is closed" in (await response.json())["error"]


class Unreadable(MemoryStore):
    """A store whose results this process cannot read, as a SQLite store's value of a type it cannot import."""

    async def results(self, *, batch_id: str | None = None, status: Status | str | None = None,
                      limit: int | None = None, offset: int = 0) -> list[TaskResult]:
        raise StoreError(f"the value of task '0' of batch {batch_id!r} cannot be unpickled here")


async def test_a_store_error_is_answered_in_json(aiohttp_client: AiohttpClient) -> None:
    store = Unreadable()
    client = await make_client(aiohttp_client, scheduler=Scheduler(workers=1, store=store))
    await store.begin_batch("b")
    response = await client.get(f"{API}/batches/b/results")
    assert response.status == 500 and response.content_type == "application/json"
    assert (await response.json())["error"] == ("the result store failed: the value of task '0' of batch 'b' "
                                                "cannot be unpickled here")


async def test_a_batch_with_no_result_yet_has_no_success_rate(aiohttp_client: AiohttpClient) -> None:
    store = MemoryStore()
    client = await make_client(aiohttp_client, scheduler=Scheduler(workers=1, store=store))
    await store.begin_batch("b")
    summary = await get_json(client, "/batches/b")
    assert (summary["total"], summary["success_rate"]) == (0, None)  # not 0.0, which says every task failed


async def test_task_messages_reach_the_api_as_plain_text(client: Client) -> None:
    message = "<script>alert('x')</script> & \"quotes\""
    events = await run_batch(client, "msg", task="say", inputs=[[message]])
    assert any(e.data.get("message") == message for e in events if e.data.get("type") == "reported")
    (result,) = (await get_json(client, "/batches/msg/results"))["results"]
    assert result["message"] == message and result["value"] == message


# -- bad input ------------------------------------------------------------------------------

BAD_SUBMISSIONS: list[tuple[Any, int, str, str | None]] = [
    ([1, 2], 400, "must be a JSON object", None),
    ({"task": "square", "inputs": [1], "priority": 3}, 400, "unknown field 'priority'", "priority"),
    ({"inputs": [1]}, 400, "'task' must be the name", "task"),
    ({"task": 7, "inputs": [1]}, 400, "'task' must be the name", "task"),
    ({"task": "nope", "inputs": [1]}, 404, "unknown task 'nope'", "task"),
    ({"task": "square"}, 400, "'inputs' must be a non-empty array", "inputs"),
    ({"task": "square", "inputs": {"n": 1}}, 400, "'inputs' must be a non-empty array", "inputs"),
    ({"task": "square", "inputs": []}, 400, "'inputs' must be a non-empty array", "inputs"),
    ({"task": "square", "inputs": [1] * 51}, 413, "over the limit of 50", "inputs"),
    ({"task": "square", "inputs": [1], "timeout": "5"}, 400, "'timeout' must be a positive number", "timeout"),
    ({"task": "square", "inputs": [1], "timeout": 0}, 400, "'timeout' must be a positive number", "timeout"),
    ({"task": "square", "inputs": [1], "timeout": True}, 400, "'timeout' must be a positive number", "timeout"),
    ({"task": "square", "inputs": [1], "timeout": 10**400}, 400, "'timeout' must be a positive number", "timeout"),
    ({"task": "square", "inputs": [1], "retries": -1}, 400, "'retries' must be a non-negative integer", "retries"),
    ({"task": "square", "inputs": [1], "retries": 1.5}, 400, "'retries' must be a non-negative integer", "retries"),
    ({"task": "square", "inputs": [1], "batch_id": "a/b"}, 400, "'batch_id' must be", "batch_id"),
    ({"task": "square", "inputs": [1], "batch_id": 12}, 400, "'batch_id' must be", "batch_id"),
    ({"task": "square", "inputs": [1], "batch_id": ".."}, 400, "not . or .. (which no URL can hold)", "batch_id"),
]


@pytest.mark.parametrize(("body", "status", "error", "field"), BAD_SUBMISSIONS)
async def test_bad_submissions_say_what_is_wrong(client: Client, body: Any, status: int, error: str,
                                                 field: str | None) -> None:
    response = await client.post(f"{API}/batches", json=body)
    assert response.status == status
    answer = await response.json()
    assert error in answer["error"]
    assert answer.get("field") == field
    if status == 404:
        assert answer["tasks"] == ["add", "hang", "odd_values", "say", "square"]
    assert (await get_json(client, "/batches"))["total"] == 0  # nothing was started


@pytest.mark.parametrize(("data", "content_type", "status", "error"), [
    (b'{"task": "square", "inputs": [1]', "application/json", 400, "not valid JSON"),
    (b'{"task": "square", "inputs": [NaN]}', "application/json", 400, "NaN is not JSON"),
    (b'{"task": "square", "inputs": [1e400]}', "application/json", 400, "1e400 is past the range of a float"),
    (b"[" * 100_000, "application/json", 413, "over the limit of 4096 bytes"),
    (b"[" * 3000 + b"]" * 3000, "application/json", 413, "over the limit"),
    (b'{"task": "square", "inputs": [1]}', "text/plain", 415, "Content-Type: application/json"),
])
async def test_bad_bodies_are_refused(client: Client, data: bytes, content_type: str, status: int,
                                      error: str) -> None:
    response = await client.post(f"{API}/batches", data=data, headers={"Content-Type": content_type})
    assert response.status == status
    assert error in (await response.json())["error"]


async def test_a_body_nested_too_deep_to_parse_is_refused(aiohttp_client: AiohttpClient) -> None:
    # how deep json.loads() goes depends on the Python version: 2,000 levels fail on 3.11, not on 3.13
    client = await make_client(aiohttp_client, limits=Limits(max_body=1 << 17))
    response = await client.post(f"{API}/batches", data=b"[" * 50_000 + b"]" * 50_000,
                                 headers={"Content-Type": "application/json"})
    assert response.status == 400
    assert "not valid JSON" in (await response.json())["error"]


async def test_a_body_not_in_its_content_encoding_is_refused(client: Client) -> None:
    response = await client.post(f"{API}/batches", data=b"xx", headers={"Content-Type": "application/json",
                                                                       "Content-Encoding": "gzip"})
    assert response.status == 400
    assert "the body cannot be read: " in (await response.json())["error"]


async def test_a_chunked_body_over_the_limit_is_refused(client: Client) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b" " * 1000

    response = await client.post(f"{API}/batches", data=chunks(), headers={"Content-Type": "application/json"})
    assert response.status == 413


async def test_a_page_of_big_results_ends_early_and_paging_on_from_what_came_gets_the_rest(
        aiohttp_client: AiohttpClient) -> None:
    client = await make_client(aiohttp_client, limits=Limits(max_body=1 << 17, max_page=10, default_page=10,
                                                             max_page_bytes=3000))
    await run_batch(client, "big", task="say", inputs=["x" * 500] * 8)  # about 1,300 bytes a result (value, message)
    keys: list[str] = []
    while len(keys) < 8:
        page = await get_json(client, f"/batches/big/results?offset={len(keys)}")
        assert page["total"] == 8 and page["limit"] == 10 and 1 <= len(page["results"]) <= 3, page
        keys += [result["key"] for result in page["results"]]
    assert sorted(keys) == [str(n) for n in range(8)]  # each once, oldest first as they finished


async def test_a_batch_id_that_exists_is_a_conflict(client: Client) -> None:
    await run_batch(client, "once", task="square", inputs=[1])
    response = await client.post(f"{API}/batches", json={"task": "square", "inputs": [1], "batch_id": "once"})
    assert response.status == 409
    assert (await response.json())["error"] == "batch 'once' already exists: submit it under another batch_id"


async def test_a_running_batch_id_is_a_conflict(client: Client) -> None:
    events = await client.get(f"{API}/events", params={"batch": "busy"})
    await submit(client, task="hang", inputs=[[]], batch_id="busy")
    response = await client.post(f"{API}/batches", json={"task": "square", "inputs": [1], "batch_id": "busy"})
    assert response.status == 409
    assert "is running" in (await response.json())["error"]
    assert (await client.delete(f"{API}/batches/busy")).status == 200
    await events_until(events, batch_finished)
    events.close()


@pytest.mark.parametrize(("path", "status", "error"), [
    ("/batches/nope", 404, "no batch 'nope'"),
    ("/batches/nope/results", 404, "no batch 'nope'"),
    ("/batches?limit=0", 400, "'limit' must be an integer of at least 1"),
    ("/batches?limit=ten", 400, "'limit' must be an integer"),
    *((f"/batches?limit={text}", 400, "'limit' must be an integer") for text in ("%205", "1_0", "%D9%A3", "+5")),
    ("/batches?offset=-1", 400, "'offset' must be an integer of at least 0"),
    ("/batches/x/results?offset=9223372036854775808", 400, "'offset' must be an integer of at least 0 and at most "
                                                         "9223372036854775807"),
    ("/batches?limit=9223372036854775808", 400, "'limit' must be an integer of at least 1 and at most"),
    ("/batches/x/results?status=running", 400, "'status' must be one of"),
])
async def test_bad_queries(client: Client, path: str, status: int, error: str) -> None:
    assert error in (await get_json(client, path, status))["error"]


@pytest.mark.parametrize(("method", "path", "status", "error"), [
    ("PUT", "/batches", 405, "PUT is not allowed on /asyncsched/api/batches; it takes GET, POST, HEAD"),
    ("PATCH", "/batches/x", 405, "PATCH is not allowed on /asyncsched/api/batches/x; it takes GET, DELETE, HEAD"),
    ("POST", "/events", 405, "POST is not allowed on /asyncsched/api/events; it takes GET"),
    ("HEAD", "/events", 405, ""),  # a stream: nothing to tell of it but by reading it
    ("GET", "/nope", 404, "no route /asyncsched/api/nope; /asyncsched/api/openapi.json lists them"),
    ("GET", "/batches/a/b", 404, "no route /asyncsched/api/batches/a/b"),
    ("DELETE", "", 404, "no route /asyncsched/api;"),
])
async def test_an_unknown_route_or_method_is_answered_in_json(client: Client, method: str, path: str, status: int,
                                                              error: str) -> None:
    response = await client.request(method, f"{API}{path}")
    assert (response.status, response.content_type) == (status, "application/json")
    if method == "HEAD":
        assert response.headers["Allow"] == "GET"
        return
    assert error in (await response.json())["error"]
    if status == 405:
        assert response.headers["Allow"] == error.rpartition("it takes ")[2]


async def test_head_answers_as_get_without_the_body(client: Client) -> None:
    for path in ("/tasks", "/batches", "/openapi.json"):
        response = await client.head(f"{API}{path}")
        assert (response.status, response.content_type, await response.read()) == (200, "application/json", b"")


# -- cancel ---------------------------------------------------------------------------------

async def test_delete_cancels_a_running_batch_and_kills_its_tasks(client: Client) -> None:
    events = await client.get(f"{API}/events", params={"batch": "doomed"})
    await submit(client, task="hang", inputs=[[]] * 40, batch_id="doomed")
    seen = await events_until(events, lambda seen: sum(e.data.get("type") == "started" for e in seen) == 2)
    pids = {e.data["pid"] for e in seen if e.data.get("type") == "started"}
    assert (await get_json(client, "/batches/doomed"))["state"] == "running"
    response = await client.delete(f"{API}/batches/doomed")
    assert response.status == 200
    summary = await response.json()
    assert summary["state"] == "finished" and summary["total"] >= 2
    assert summary["cancelled"] == summary["total"] and summary["success_rate"] == 0
    assert all(wait_gone(pid) for pid in pids)
    rest = await events_until(events, batch_finished)
    assert {e.data["status"] for e in rest if e.data.get("type") == "finished"} == {"cancelled"}
    events.close()
    again = await client.delete(f"{API}/batches/doomed")
    assert again.status == 409 and (await again.json())["state"] == "finished"
    assert (await client.delete(f"{API}/batches/nope")).status == 404


async def test_a_batch_cancelled_before_its_first_task_was_submitted_all_the_same(
        aiohttp_client: AiohttpClient) -> None:
    store = SlowToBegin()
    scheduler = Scheduler(workers=1, store=store)
    client = await make_client(aiohttp_client, scheduler=scheduler)
    events = await client.get(f"{API}/events", params={"batch": "early"})
    posted = asyncio.ensure_future(client.post(f"{API}/batches", json={"task": "square", "inputs": [1],
                                                                       "batch_id": "early"}))
    await store.entered.wait()
    assert scheduler.cancel("early")  # what a DELETE does, here before the batch's first task is pulled
    store.release.set()
    response = await posted
    assert response.status == 202, await response.text()
    seen = await events_until(events, batch_finished)
    assert [e.data["state"] for e in seen] == ["running", "finished"]
    events.close()
    summary = await get_json(client, "/batches/early")
    assert (summary["state"], summary["total"]) == ("finished", 0)


async def test_a_batch_run_by_the_host_app_is_shown_and_can_be_cancelled(aiohttp_client: AiohttpClient) -> None:
    scheduler = Scheduler(workers=2)
    client = await make_client(aiohttp_client, scheduler=scheduler)
    events = await client.get(f"{API}/events")
    batch = [Task(faults.hang) for _ in range(3)]
    hosted = asyncio.ensure_future(scheduler.run(batch, batch_id="host"))
    await events_until(events, lambda seen: any(e.data.get("type") == "started" for e in seen))
    summary = await get_json(client, "/batches/host")
    assert (summary["state"], summary["expected"]) == ("running", 3)  # a list: its size is known
    assert (await client.delete(f"{API}/batches/host")).status == 200
    cancelled = await hosted
    assert cancelled.cancelled == 3
    events.close()


async def test_delete_answers_the_ended_state_of_a_batch_run_by_the_host_app(aiohttp_client: AiohttpClient) -> None:
    scheduler = Scheduler(workers=2)
    client = await make_client(aiohttp_client, scheduler=scheduler)
    events = await client.get(f"{API}/events", params={"batch": "hosted"})
    batch = [Task(faults.hang) for _ in range(3)]
    hosted = asyncio.ensure_future(scheduler.run(batch, batch_id="hosted"))
    await events_until(events, lambda seen: any(e.data.get("type") == "started" for e in seen))
    response = await client.delete(f"{API}/batches/hosted")
    assert response.status == 200
    answered = await response.json()
    assert (answered["state"], answered["total"], answered["cancelled"]) == ("finished", 3, 3)
    assert answered["finished_at"] is not None
    assert await get_json(client, "/batches/hosted") == answered  # what GET shows once the run is over
    summary = await hosted
    assert summary.cancelled == 3
    events.close()


async def hang_on(client: Client, scheduler: Scheduler, batch_id: str) -> asyncio.Future[Any]:
    """A batch of one hanging task run by the host app on ``scheduler``, once its task has started."""
    events = await client.get(f"{API}/events", params={"batch": batch_id})
    hosted = asyncio.ensure_future(scheduler.run([Task(faults.hang)], batch_id=batch_id))
    await events_until(events, lambda seen: any(e.data.get("type") == "started" for e in seen))
    events.close()
    return hosted


async def test_delete_answers_a_batch_slow_to_end_as_it_stands_after_a_bounded_wait(
        aiohttp_client: AiohttpClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(asyncsched.web._app, "CANCEL_WAIT", 0.05)
    store = SlowToEnd()
    scheduler = Scheduler(workers=1, store=store)
    client = await make_client(aiohttp_client, scheduler=scheduler)
    hosted = await hang_on(client, scheduler, "slow")
    response = await client.delete(f"{API}/batches/slow")  # the store ends the batch only once released
    assert response.status == 200 and (await response.json())["state"] != "finished"
    store.release.set()
    summary = await hosted
    assert summary.cancelled == 1
    assert (await get_json(client, "/batches/slow"))["state"] == "finished"


async def test_a_delete_while_another_one_ends_the_batch_waits_as_that_one_does(
        aiohttp_client: AiohttpClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(asyncsched.web._app, "CANCEL_WAIT", 0.05)
    store = SlowToEnd()
    client = await make_client(aiohttp_client, scheduler=Scheduler(workers=1, store=store))
    events = await client.get(f"{API}/events", params={"batch": "twice"})
    await submit(client, task="hang", inputs=[[]], batch_id="twice")
    await events_until(events, lambda seen: any(e.data.get("type") == "started" for e in seen))
    assert (await client.delete(f"{API}/batches/twice")).status == 200
    await store.entered.wait()  # the batch is ending: the store holds its end
    again = await client.delete(f"{API}/batches/twice")  # it was answered 409 "not running", state "unfinished"
    assert again.status == 200 and (await again.json())["state"] == "running", await again.text()
    store.release.set()
    await events_until(events, batch_finished)
    events.close()
    assert (await get_json(client, "/batches/twice"))["state"] == "finished"


@pytest.mark.parametrize("route", ["/batches/ending", "/batches"])
@pytest.mark.parametrize(("ends", "shown"), [("after its row is read", "running"), ("before", "finished")])
async def test_a_batch_that_ends_while_it_is_read_is_not_shown_unfinished(
        aiohttp_client: AiohttpClient, monkeypatch: pytest.MonkeyPatch, gate: Callable[[], str], route: str,
        ends: str, shown: str) -> None:
    registry = TaskRegistry()
    registry.add("wait_for_file", tasks.wait_for_file)
    scheduler = Scheduler(workers=1)
    client = await make_client(aiohttp_client, scheduler=scheduler, registry=registry)
    api = client.app.on_shutdown[-1].__self__  # type: ignore[attr-defined]  # the _Api
    release = gate()
    await submit(client, task="wait_for_file", inputs=[release], batch_id="ending")
    read_batch, read_page = scheduler.batch, scheduler.batch_page

    async def end_it() -> None:  # once its row is read, as it was then: running, no end recorded
        job = api.jobs["ending"]
        await asyncio.to_thread(Path(release).touch)
        await asyncio.wait([job.task])

    async def batch(batch_id: str) -> Any:
        if ends == "before":
            await end_it()
        info = await read_batch(batch_id)
        if ends != "before":
            await end_it()
        return info

    async def batch_page(*args: Any) -> Any:
        if ends == "before":
            await end_it()
        page = await read_page(*args)
        if ends != "before":
            await end_it()
        return page

    monkeypatch.setattr(scheduler, "batch", batch)
    monkeypatch.setattr(scheduler, "batch_page", batch_page)
    answer = await get_json(client, route)
    state = answer if route != "/batches" else answer["batches"][0]
    # as it was when its row was read ("unfinished" says it was abandoned), or finished, as its row says
    assert state["state"] == shown


async def test_a_client_that_leaves_while_its_delete_waits_leaves_nothing_behind(
        aiohttp_client: AiohttpClient, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SlowToEnd()
    scheduler = Scheduler(workers=1, store=store)
    client = await make_client(aiohttp_client, scheduler=scheduler)
    waiting, left = asyncio.Event(), asyncio.Event()
    wait_ended = scheduler.wait_ended

    async def noted(batch_id: str) -> None:
        waiting.set()
        try:
            await wait_ended(batch_id)
        finally:
            left.set()

    monkeypatch.setattr(scheduler, "wait_ended", noted)
    hosted = await hang_on(client, scheduler, "left")
    deleting = asyncio.ensure_future(client.delete(f"{API}/batches/left"))
    await waiting.wait()
    deleting.cancel()  # the client leaves: the test server cancels the handler of its request
    with pytest.raises(asyncio.CancelledError):
        await deleting
    async with asyncio.timeout(10):
        await left.wait()
    assert not store.release.is_set()  # the wait ended with the request, before the batch did
    store.release.set()
    summary = await hosted
    assert summary.cancelled == 1
    assert (await get_json(client, "/batches/left"))["state"] == "finished"


# -- events ---------------------------------------------------------------------------------

async def test_events_arrive_in_order_with_ids(client: Client) -> None:
    events = await run_batch(client, "ordered", task="say", inputs=[[f"m{i}"] for i in range(6)])
    assert events[0].event == "batch" and events[0].data == {"batch_id": "ordered", "state": "running",
                                                             "expected": 6}
    numbers = [int(e.id.rsplit("-", 1)[1]) for e in events if e.id]
    assert len(numbers) == len(events) and numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    for key in map(str, range(6)):
        kinds = [e.data["type"] for e in events if e.event == "task" and e.data["key"] == key]
        assert kinds == ["started", "reported", "finished"]
    finished = [e.data for e in events if e.data.get("type") == "finished"]
    assert {f["status"] for f in finished} == {"completed"} and all(f["pid"] for f in finished)


async def test_a_reconnect_with_last_event_id_catches_up(client: Client) -> None:
    full = await run_batch(client, "catch", task="square", inputs=list(range(5)))
    assert len(full) > 8
    middle = full[4].id
    resumed = await client.get(f"{API}/events", params={"batch": "catch"}, headers={"Last-Event-ID": middle})
    replay = [await read_event(resumed) for _ in full[5:]]
    assert [(e.id, e.data) for e in replay] == [(e.id, e.data) for e in full[5:]]
    resumed.close()


async def test_a_reconnect_that_missed_too_much_gets_a_reset(client: Client) -> None:
    full = await run_batch(client, "long", task="square", inputs=list(range(25)))  # 52 events, backlog 40
    epoch = full[0].id.split("-")[0]
    for stale in (full[0].id, "deadbeef-3", "garbage", f"{epoch}-\u00b2", f"{epoch}-{'9' * 5000}", f"{epoch}-999"):
        resumed = await client.get(f"{API}/events", headers={"Last-Event-ID": stale})
        reset = await read_event(resumed)
        assert reset.event == "reset" and reset.id == full[-1].id == reset.data["last_event_id"]
        resumed.close()


async def test_a_listener_too_far_behind_is_ended_after_what_it_holds() -> None:
    log = EventLog(backlog=3)
    slow = log.listen(None, None)
    for n in range(8):
        log.publish_notice("b", {"n": n})
    held = await slow.next_chunk(heartbeat=30)
    assert held is not None and held.count(b"event: batch") == 6  # twice the backlog, then it ends
    assert await slow.next_chunk(heartbeat=30) is None
    resumed = log.listen(None, f"{log.epoch}-6")  # its client reconnects and catches up
    assert (await resumed.next_chunk(heartbeat=30) or b"").count(b"event: batch") == 2


async def test_event_streams_end_when_the_app_stops(aiohttp_client: AiohttpClient) -> None:
    client = await make_client(aiohttp_client)
    events = await client.get(f"{API}/events")
    assert events.headers["Content-Type"] == "text/event-stream"
    async with asyncio.timeout(10):  # the server does not wait for the stream to end on its own
        await client.server.close()
        with pytest.raises(EOFError):
            await read_event(events)


@contextlib.asynccontextmanager
async def served(app: web.Application) -> AsyncIterator[web.AppRunner]:
    """``app`` served on 127.0.0.1 as ``web.run_app`` serves it (a test client's server also cancels the handler
    of a request whose client left); the test may clean the runner up itself."""
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield runner
    finally:
        if runner.server is not None:
            await runner.cleanup()


def stalled_stream(runner: web.AppRunner) -> socket.socket:
    """An events stream whose client reads nothing (with a small receive buffer, so that it soon stalls)."""
    host, port = runner.addresses[0][:2]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, port))
    sock.sendall(f"GET {API}/events HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    return sock


def read_to_the_end(sock: socket.socket) -> bool:
    """Read what the server sent, up to the end of the connection (True) or 10 s of silence (False)."""
    sock.settimeout(10)
    try:
        while sock.recv(1 << 16):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


async def stall(runner: web.AppRunner, scheduler: Scheduler) -> None:
    """Publish events until the server waits for a stalled stream's client to read."""
    assert runner.server is not None
    async with asyncio.timeout(10):
        while not any(connection.writing_paused for connection in runner.server.connections):
            for n in range(10):
                scheduler._hub.publish(TaskReported, "b", str(n), Status.RUNNING, 1.0, message="x" * 65536)
            await asyncio.sleep(0.01)


async def test_a_client_that_vanishes_while_its_stream_waits_is_not_an_error(
        caplog: pytest.LogCaptureFixture) -> None:
    scheduler = Scheduler(workers=1)
    app = web.Application()
    setup(app, scheduler, registry=None, limits=Limits(event_backlog=1000))  # its stream is not ended meanwhile
    log = app.on_shutdown[-1].__self__.log  # type: ignore[attr-defined]  # the _Api's EventLog
    forgotten, forget = asyncio.Event(), log.forget

    def forgetting(listener: Any) -> None:  # the handler forgets its listener as it ends: any error follows at once
        forget(listener)
        forgotten.set()

    log.forget = forgetting
    async with served(app) as runner:
        sock = stalled_stream(runner)
        await stall(runner, scheduler)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset: the write that waits fails with ConnectionError, not ConnectionResetError
        async with asyncio.timeout(10):
            await forgotten.wait()
        await asyncio.sleep(0)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def test_a_client_that_reads_nothing_is_cut_off_and_then_disconnected() -> None:
    scheduler = Scheduler(workers=1)
    app = web.Application()
    setup(app, scheduler, registry=None, limits=Limits(event_backlog=10, write_timeout=0.2))
    log = app.on_shutdown[-1].__self__.log  # type: ignore[attr-defined]  # the _Api's EventLog
    forgotten, forget = asyncio.Event(), log.forget

    def forgetting(listener: Any) -> None:  # the handler forgets its listener as it ends
        forget(listener)
        forgotten.set()

    log.forget = forgetting
    async with served(app) as runner:
        sock = stalled_stream(runner)
        try:
            await stall(runner, scheduler)  # a write waits for the client
            for _ in range(20):  # and its stream falls 20 events behind: cut off
                log.publish_notice("b", {"state": "running"})
            assert not log._listeners  # it takes no more events from the moment it is cut off
            async with asyncio.timeout(10):
                await forgotten.wait()  # a write that waited write_timeout for it: its connection is closed
            assert await asyncio.to_thread(read_to_the_end, sock)  # the server closed it
        finally:
            sock.close()


async def test_a_client_that_reads_nothing_does_not_hold_up_the_shutdown() -> None:
    scheduler = Scheduler(workers=1)
    app = web.Application()
    setup(app, scheduler, registry=None, limits=Limits(event_backlog=1000))
    async with served(app) as runner:
        sock = stalled_stream(runner)
        try:
            await stall(runner, scheduler)
            async with asyncio.timeout(10):  # aiohttp waits a minute for a handler, then a minute more
                await runner.cleanup()
        finally:
            sock.close()


# -- auth -----------------------------------------------------------------------------------

API_ROUTES = [("GET", "/tasks"), ("GET", "/batches"), ("POST", "/batches"), ("GET", "/batches/x"),
              ("DELETE", "/batches/x"), ("GET", "/batches/x/results"), ("GET", "/events"), ("GET", "/openapi.json")]


async def test_with_allowed_hosts_a_request_for_another_host_is_refused(aiohttp_client: AiohttpClient) -> None:
    client = await make_client(aiohttp_client, allowed_hosts=frozenset({"localhost", "127.0.0.1", "::1"}))
    for host in ("127.0.0.1:8080", "localhost", "LOCALHOST:1", "[::1]:8080"):
        assert (await client.get(f"{API}/batches", headers={"Host": host})).status == 200, host
    for method, path in API_ROUTES:  # a page of evil.example whose name now points at 127.0.0.1
        response = await client.request(method, f"{API}{path}", headers={"Host": "evil.example:8080"})
        assert response.status == 421, (method, path)
        assert "not for the Host 'evil.example:8080'" in (await response.json())["error"]
    with pytest.raises(ConfigurationError, match="allowed_hosts"):
        setup(web.Application(), Scheduler(workers=1), registry=None, allowed_hosts="localhost")


async def test_with_a_token_every_api_route_needs_it(aiohttp_client: AiohttpClient) -> None:
    client = await make_client(aiohttp_client, token=TOKEN)
    for method, path in API_ROUTES:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                        {"Authorization": f"Basic {TOKEN}"}):
            response = await client.request(method, f"{API}{path}", headers=headers)
            assert response.status == 401, (method, path, headers)
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert "Authorization: Bearer" in (await response.json())["error"]
    good = {"Authorization": f"Bearer {TOKEN}"}
    assert (await client.get(f"{API}/batches", headers=good)).status == 200
    for scheme in ("bearer", "BEARER"):  # a scheme is case-insensitive
        assert (await client.get(f"{API}/batches", headers={"Authorization": f"{scheme} {TOKEN}"})).status == 200
    answer = await client.post(f"{API}/batches", json={"task": "square", "inputs": [2], "batch_id": "t"},
                               headers=good)
    assert answer.status == 202
    events = await client.get(f"{API}/events", headers={**good, "Last-Event-ID": f"{'0' * 8}-0"})
    assert (await read_event(events)).event == "reset"
    events.close()
    for path in ("/asyncsched/", "/asyncsched/static/app.js", "/asyncsched/static/style.css"):
        assert (await client.get(path)).status == 200  # the dashboard's files hold no data


# -- read-only, OpenAPI, dashboard ----------------------------------------------------------

async def test_without_a_registry_the_api_is_read_only(aiohttp_client: AiohttpClient) -> None:
    client = await make_client(aiohttp_client, registry=None)
    assert await get_json(client, "/tasks") == {"tasks": [], "read_only": True}
    response = await client.post(f"{API}/batches", json={"task": "square", "inputs": [1]})
    assert response.status == 403 and "read-only" in (await response.json())["error"]
    assert (await client.delete(f"{API}/batches/x")).status == 403
    assert (await get_json(client, "/batches"))["batches"] == []


async def test_openapi_describes_every_route(client: Client) -> None:
    spec = await get_json(client, "/openapi.json")
    assert spec["openapi"].startswith("3.1") and spec["servers"] == [{"url": API}]
    described = {(method.upper(), path) for path, item in spec["paths"].items() for method in item
                 if method != "parameters"}
    assert described == {(m, p.replace("/x", "/{batch_id}")) for m, p in API_ROUTES}
    assert spec["paths"]["/batches"]["post"]["responses"].keys() >= {"202", "400", "404", "409", "413"}
    for item in spec["paths"].values():  # what every route may answer, the checks before its handler
        for method, operation in item.items():
            if method != "parameters":
                assert operation["responses"].keys() >= {"405", "421", "500", "503"}
    assert "state" in spec["components"]["schemas"]["Error"]["properties"]  # a DELETE's 409 says it
    pattern = re.compile(spec["components"]["schemas"]["Submission"]["properties"]["batch_id"]["pattern"])
    assert [bool(pattern.match(name)) for name in ("b-1.x", ".", "..", "...", "a/b")] == [True, False, False, True,
                                                                                          False]
    assert "security" not in spec


async def test_the_dashboard_is_served_from_the_package(client: Client) -> None:
    redirect = await client.get("/asyncsched", allow_redirects=False)
    assert redirect.status == 302 and redirect.headers["Location"] == "/asyncsched/"
    page = await client.get("/asyncsched/")
    assert page.status == 200 and page.content_type == "text/html"
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert 'src="static/app.js"' in await page.text()
    script = await client.get("/asyncsched/static/app.js")
    assert script.content_type == "text/javascript" and "textContent" in await script.text()
    assert "innerHTML" not in await script.text()
    for missing in ("/asyncsched/static/index.html", "/asyncsched/static/nope.js",
                    "/asyncsched/static/..%2F_app.py", "/asyncsched/static/../_app.py"):
        assert (await client.get(missing)).status == 404, missing


# -- lifecycle ------------------------------------------------------------------------------

async def test_the_scheduler_starts_and_stops_with_the_app(aiohttp_client: AiohttpClient) -> None:
    scheduler = Scheduler(workers=2)
    client = await make_client(aiohttp_client, scheduler=scheduler)
    assert scheduler.backend.pool.pids  # type: ignore[attr-defined]  # started with the app
    events = await client.get(f"{API}/events", params={"batch": "left"})
    await submit(client, task="hang", inputs=[[]] * 2, batch_id="left")
    seen = await events_until(events, lambda seen: sum(e.data.get("type") == "started" for e in seen) == 2)
    events.close()
    await client.close()  # cancels the running batch and closes the scheduler
    assert scheduler.running() == {}
    assert all(wait_gone(e.data["pid"]) for e in seen if e.data.get("type") == "started")
    with pytest.raises(ClosedError):
        scheduler.events()


# -- the library side -----------------------------------------------------------------------

def test_a_registry_names_module_level_functions_once() -> None:
    registry = TaskRegistry()
    with pytest.raises(TaskDefinitionError, match="nested function"):
        @registry.task("nested")
        def nested(n: int) -> int:  # a worker could not load it
            return n

    assert registry.task("square")(tasks.square) is tasks.square
    assert registry.names() == ["square"] and list(registry) == ["square"] and len(registry) == 1
    assert registry.get("square") is tasks.square and registry.get("nope") is None
    with pytest.raises(ConfigurationError, match="already registered"):
        registry.add("square", tasks.double)
    for name in ("", "a b", "x" * 101, 3, ".", ".."):
        with pytest.raises(ConfigurationError, match="task name"):
            registry.add(name, tasks.double)  # type: ignore[arg-type]
    with pytest.raises(TaskDefinitionError, match="lambda"):
        registry.add("lambda", lambda: None)


async def test_in_a_sub_app_the_urls_it_gives_have_the_sub_app_s_prefix(aiohttp_client: AiohttpClient) -> None:
    service = web.Application()
    setup(service, Scheduler(workers=1), registry=REGISTRY, prefix="/jobs")
    root = web.Application()
    root.add_subapp("/svc", service)
    client = await aiohttp_client(root)
    answer = await client.post("/svc/jobs/api/batches", json={"task": "square", "inputs": [3], "batch_id": "sub"})
    assert answer.status == 202
    assert answer.headers["Location"] == (await answer.json())["url"] == "/svc/jobs/api/batches/sub"
    assert (await client.get(answer.headers["Location"])).status == 200
    home = await client.get("/svc/jobs", allow_redirects=False)
    assert home.headers["Location"] == "/svc/jobs/"
    assert (await (await client.get("/svc/jobs/api/openapi.json")).json())["servers"] == [{"url": "/svc/jobs/api"}]
    missing = await client.get("/svc/jobs/api/nothing")
    assert (await missing.json())["error"] == "no route /svc/jobs/api/nothing; /svc/jobs/api/openapi.json lists them"


def test_setup_refuses_bad_arguments() -> None:
    app = web.Application()
    scheduler = Scheduler(workers=1)
    for prefix in ("", "/", "api", "/a/", "/a b"):
        with pytest.raises(ConfigurationError, match="prefix"):
            setup(app, scheduler, registry=REGISTRY, prefix=prefix)
    with pytest.raises(ConfigurationError, match="token"):
        setup(app, scheduler, registry=REGISTRY, token="")
    with pytest.raises(ConfigurationError, match="registry"):
        setup(app, scheduler, registry={"square": tasks.square})  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="max_page"):
        Limits(max_page=0)
    for name in ("max_body", "max_inputs", "max_page", "default_page", "event_backlog"):
        with pytest.raises(ConfigurationError, match=rf"Limits\.{name} must be a positive integer, got 2\.5"):
            Limits(**{name: 2.5, "default_page": 1} if name == "max_page" else {name: 2.5})  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="heartbeat must be a positive number, got nan"):
        Limits(heartbeat=float("nan"))
    assert Limits(heartbeat=0.5).heartbeat == 0.5
    with pytest.raises(ConfigurationError, match="default_page"):
        Limits(max_page=5, default_page=10)


def test_the_core_never_imports_aiohttp() -> None:
    code = ("import sys, asyncsched; [getattr(asyncsched, name) for name in asyncsched.__all__]; "
            "assert 'aiohttp' not in sys.modules and 'asyncsched.web' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
