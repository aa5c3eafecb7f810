"""`asyncsched serve`: the standalone server over a SQLite file, read-only or with a module's registry."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from pytest_aiohttp import AiohttpClient

from asyncsched import ConfigurationError, Scheduler, Task
from asyncsched.web._serve import build_app, load_registry

from . import tasks

ROOT = Path(__file__).parent.parent
API = "/asyncsched/api"


async def test_without_tasks_it_serves_a_read_only_view_of_a_database(tmp_path: Path,
                                                                      aiohttp_client: AiohttpClient) -> None:
    db = os.fspath(tmp_path / "results.db")
    async with Scheduler(workers=1, store=db) as scheduler:
        await scheduler.run([Task(tasks.square, n) for n in range(3)], batch_id="earlier", name="squares")
    client = await aiohttp_client(build_app(db, registry=None))
    home = await client.get("/", allow_redirects=False)
    assert home.headers["Location"] == "/asyncsched/"
    (batch,) = (await (await client.get(f"{API}/batches")).json())["batches"]
    assert (batch["batch_id"], batch["name"], batch["state"], batch["completed"]) == ("earlier", "squares",
                                                                                    "finished", 3)
    results = await (await client.get(f"{API}/batches/earlier/results")).json()
    assert sorted(r["value"] for r in results["results"]) == [0, 1, 4]
    refused = await client.post(f"{API}/batches", json={"task": "square", "inputs": [1]})
    assert refused.status == 403


def test_a_read_only_server_needs_an_existing_database(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="does not exist"):
        build_app(os.fspath(tmp_path / "missing.db"), registry=None)
    assert not (tmp_path / "missing.db").exists()


def test_the_registry_comes_from_a_module() -> None:
    assert load_registry("examples.web_service").names() == ["slow_square", "word_count"]
    with pytest.raises(ConfigurationError, match="cannot import module 'no_such_module'"):
        load_registry("no_such_module")
    with pytest.raises(ConfigurationError, match="has no TaskRegistry named 'registry'"):
        load_registry("tests.tasks")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_serve_runs_a_module_s_tasks_until_sigterm(tmp_path: Path) -> None:
    port, db = _free_port(), os.fspath(tmp_path / "served.db")
    code = ("import argparse, sys; from asyncsched.web._serve import serve_main; sys.exit(serve_main("
            f"argparse.Namespace(db={db!r}, tasks='examples.web_service', host='127.0.0.1', port={port}, "
            "token=None, workers=2)))")
    server = await asyncio.create_subprocess_exec(sys.executable, "-c", code, cwd=ROOT, stdout=subprocess.PIPE,
                                                  env={**os.environ, "ASYNCSCHED_TOKEN": "t0ken"})
    assert server.stdout is not None
    try:
        async with asyncio.timeout(30):
            ready = (await server.stdout.readline()).decode()
            assert f"at http://127.0.0.1:{port}/asyncsched/" in ready and "word_count" in ready
            base = f"http://127.0.0.1:{port}{API}"
            async with aiohttp.ClientSession(headers={"Authorization": "Bearer t0ken"}) as session:
                async with session.get(f"{base}/events", params={"batch": "served"}) as events:
                    async with session.post(f"{base}/batches", json={"task": "word_count", "inputs": ["a b c"],
                                                                     "batch_id": "served"}) as answer:
                        assert answer.status == 202
                    async for line in events.content:
                        if line.startswith(b"data:") and b'"state":"finished"' in line:
                            break
                async with session.get(f"{base}/batches/served/results") as response:
                    (result,) = (await response.json())["results"]
                    assert result["value"] == 3
            server.send_signal(signal.SIGTERM)
            assert await server.wait() == 0
    finally:
        if server.returncode is None:
            server.kill()
            await server.wait()
    async with Scheduler(workers=1, store=db) as scheduler:  # the results are in the file
        assert (await scheduler.stats("served")).completed == 1
