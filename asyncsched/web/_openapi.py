"""The OpenAPI 3.1 description of the JSON API, served at ``{prefix}/api/openapi.json``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import __version__
from .._models import FINAL_STATUS_VALUES
from ._registry import NAME

if TYPE_CHECKING:
    from ._app import Limits

__all__ = ["openapi"]

_NUMBER_OR_NULL = {"type": ["number", "null"]}
_INT_OR_NULL = {"type": ["integer", "null"]}
_STRING_OR_NULL = {"type": ["string", "null"]}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


def _page(items: str, schema: str) -> dict[str, Any]:
    return {"type": "object", "required": [items, "total", "limit", "offset"], "properties": {
        items: {"type": "array", "items": _ref(schema)},
        "total": {"type": "integer", "description": "items matching, over all pages"},
        "limit": {"type": "integer"}, "offset": {"type": "integer"}}}


def openapi(prefix: str, limits: Limits, *, token: bool, cancel_wait: float) -> dict[str, Any]:
    """The description, for routes mounted under ``prefix``; a DELETE waits up to ``cancel_wait`` seconds."""
    page = [
        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "default": limits.default_page},
         "description": f"page size, capped to {limits.max_page}"},
        {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0, "default": 0}},
    ]
    batch_id = {"name": "batch_id", "in": "path", "required": True, "schema": {"type": "string"}}
    unauthorized = {"401": _error("missing or wrong bearer token")} if token else {}
    summary = _json(_ref("Batch"), "the batch's summary")
    paths: dict[str, Any] = {
        "/tasks": {"get": {
            "summary": "The names of the tasks that can be submitted",
            "responses": {"200": _json({"type": "object", "properties": {
                "tasks": {"type": "array", "items": {"type": "string"}},
                "read_only": {"type": "boolean"}}}, "the registered task names")}}},
        "/batches": {
            "get": {"summary": "Every batch with its counts, newest first", "parameters": page,
                    "responses": {"200": _json(_page("batches", "Batch"), "a page of batches"),
                                  "400": _error("a bad query parameter")}},
            "post": {
                "summary": "Submit a batch of a registered task; it runs in the background",
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("Submission")}}},
                "responses": {
                    "202": {**_json({"type": "object", "properties": {
                        "batch_id": {"type": "string"}, "state": {"type": "string"},
                        "expected": {"type": "integer"}, "url": {"type": "string"}}}, "the batch runs"),
                        "headers": {"Location": {"schema": {"type": "string"}, "description": "the batch's URL"}}},
                    "400": _error("malformed JSON, an unknown field or a field of the wrong type (named in 'field')"),
                    "403": _error("the server is read-only"),
                    "404": _error("unknown task: 'tasks' lists the known names"),
                    "409": _error("a batch of that id exists"),
                    "413": _error(f"a body over {limits.max_body} bytes or over {limits.max_inputs} inputs"),
                    "415": _error("the body is not sent as application/json")}}},
        "/batches/{batch_id}": {
            "parameters": [batch_id],
            "get": {"summary": "A batch's summary", "responses": {"200": summary, "404": _error("no such batch")}},
            "delete": {"summary": "Cancel a running batch: its running tasks are killed",
                       "description": "The answer waits until the batch has ended: its tasks are recorded as "
                                      "cancelled and its state is 'finished', as a GET then shows it. A batch that "
                                      f"takes more than {cancel_wait:g} seconds to end is answered as it stands "
                                      "then, not yet 'finished'.",
                       "responses": {"200": _json(_ref("Batch"), "the batch's summary, once it has ended"),
                                     "403": _error("the server is read-only"),
                                     "404": _error("no such batch"), "409": _error("the batch is not running")}}},
        "/batches/{batch_id}/results": {
            "parameters": [batch_id],
            "get": {"summary": "A page of a batch's results, oldest first",
                    "parameters": [{"name": "status", "in": "query",
                                    "schema": {"type": "string", "enum": FINAL_STATUS_VALUES}}, *page],
                    "responses": {"200": _json(_page("results", "Result"), "a page of results"),
                                  "400": _error("a bad query parameter"), "404": _error("no such batch")}}},
        "/events": {"get": {
            "summary": "Server-Sent Events: 'task' events (started, reported, retried, finished), 'batch' events "
                       "(running, finished) and 'reset' when a reconnect missed events",
            "description": "Every event has an id. Reconnect with the header Last-Event-ID to get what was missed "
                           f"(the latest {limits.event_backlog} events are kept); a 'reset' event says some are gone. "
                           "The stream needs the same Authorization header as the rest of the API: read it with "
                           "fetch() where EventSource cannot send the header.",
            "parameters": [{"name": "batch", "in": "query", "schema": {"type": "string"},
                            "description": "only this batch's events"},
                           {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"}}],
            "responses": {"200": {"description": "the stream", "content": {"text/event-stream": {}}}}}},
        "/openapi.json": {"get": {"summary": "This description",
                                  "responses": {"200": {"description": "OpenAPI 3.1"}}}},
    }
    every_route = {  # what any route may answer besides its own
        **unauthorized,
        "405": _error("a method the route does not take: the header Allow lists those it takes"),
        "421": _error("a Host header this server does not answer for (the server's allowed_hosts)"),
        "500": _error("the result store failed, e.g. a stored value of a type the server cannot import"),
        "503": _error("the scheduler is closed, or the batch could not start"),
    }
    for item in paths.values():
        for operation in item.values():
            if isinstance(operation, dict):
                operation["responses"].update(every_route)
    spec: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "asyncsched", "version": __version__,
                 "description": "Run registered tasks in batches on a pool of worker processes; follow them live."},
        "servers": [{"url": f"{prefix}/api"}],
        "paths": paths,
        "components": {"schemas": {
            "Error": {"type": "object", "required": ["error"], "properties": {
                "error": {"type": "string"}, "field": {"type": "string", "description": "the field that is wrong"},
                "tasks": {"type": "array", "items": {"type": "string"}, "description": "the known tasks, on a 404"},
                "state": {"type": "string", "description": "the batch's state, on a 409 of a DELETE"}}},
            "Submission": {"type": "object", "required": ["task", "inputs"], "additionalProperties": False,
                           "properties": {
                               "task": {"type": "string", "description": "a registered task's name"},
                               "inputs": {"type": "array", "minItems": 1, "maxItems": limits.max_inputs,
                                          "description": "one per task: an array gives positional arguments, an "
                                                         "object keyword arguments, any other value the argument"},
                               "timeout": {**_NUMBER_OR_NULL, "exclusiveMinimum": 0,
                                           "description": "seconds each task may run"},
                               "retries": {**_INT_OR_NULL, "minimum": 0},
                               "batch_id": {**_STRING_OR_NULL, "pattern": f"^{NAME.pattern}$"}}},
            "Batch": {"type": "object", "properties": {
                "batch_id": {"type": "string"}, "name": _STRING_OR_NULL,
                "state": {"type": "string", "enum": ["running", "finished", "unfinished"]},
                "total": {"type": "integer", "description": "tasks with a final result"},
                "expected": {**_INT_OR_NULL, "description": "tasks in the batch, when submitted through this API"},
                **{status: {"type": "integer"} for status in FINAL_STATUS_VALUES},
                "success_rate": {**_NUMBER_OR_NULL, "description": "completed over total; null while total is 0"},
                "created_at": _NUMBER_OR_NULL, "finished_at": _NUMBER_OR_NULL, "elapsed": _NUMBER_OR_NULL}},
            "Result": {"type": "object", "properties": {
                "batch_id": {"type": "string"}, "key": {"type": "string"}, "index": {"type": "integer"},
                "status": {"type": "string", "enum": FINAL_STATUS_VALUES}, "value": {},
                "error": _STRING_OR_NULL, "error_type": _STRING_OR_NULL, "traceback": _STRING_OR_NULL,
                "attempts": {"type": "integer"}, "pid": _INT_OR_NULL, "started_at": _NUMBER_OR_NULL,
                "finished_at": _NUMBER_OR_NULL, "duration": _NUMBER_OR_NULL, "message": _STRING_OR_NULL,
                "progress": _NUMBER_OR_NULL}},
        }},
    }
    if token:
        spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        spec["security"] = [{"bearer": []}]
    return spec
