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

from asyncsched import Scheduler, Task
from asyncsched._cli import main
from asyncsched.web._serve import build_app

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


@pytest.mark.parametrize(("argv", "error"), [
    (["--tasks", "no_such_module"], "cannot import module 'no_such_module'"),
    (["--tasks", "tests.tasks"], "module 'tests.tasks' has no TaskRegistry named 'registry'"),
    ([], "does not exist"),  # a read-only server needs an existing file
])
def test_serve_reports_bad_arguments_in_one_line(argv: list[str], error: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.db"
    assert main(["serve", "--db", os.fspath(missing), "--port", str(_free_port()), *argv]) == 2
    err = capsys.readouterr().err
    assert "asyncsched serve: error: " in err and error in err and "Traceback" not in err
    assert not missing.exists()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_serve_runs_a_module_s_tasks_until_sigterm(tmp_path: Path) -> None:
    port, db = _free_port(), os.fspath(tmp_path / "served.db")
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "asyncsched", "serve", "--db", db, "--tasks", "examples.web_service", "--port",
        str(port), "--workers", "2", cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "ASYNCSCHED_TOKEN": "t0ken"})
    assert server.stdout is not None and server.stderr is not None
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
                # On loopback it answers only for this machine's names (no DNS rebinding), token or not.
                async with session.get(f"{base}/batches", headers={"Host": f"evil.example:{port}"}) as response:
                    assert response.status == 421
                async with session.get(f"{base}/batches", headers={"Host": f"localhost:{port}"}) as response:
                    assert response.status == 200
            server.send_signal(signal.SIGTERM)
            _, err = await server.communicate()  # both pipes read to their end: none is left to the loop's close
            assert server.returncode == -signal.SIGTERM  # ended by it, as `run` is, once its workers are stopped
            assert err == b"asyncsched serve: terminated\n"
    finally:
        if server.returncode is None:
            server.kill()
            await server.wait()
    async with Scheduler(workers=1, store=db) as scheduler:  # the results are in the file
        assert (await scheduler.stats("served")).completed == 1


async def test_a_client_stalled_in_its_request_does_not_hold_up_the_end_of_serve(tmp_path: Path) -> None:
    port, db = _free_port(), os.fspath(tmp_path / "served.db")
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "asyncsched", "serve", "--db", db, "--tasks", "examples.web_service", "--port",
        str(port), "--workers", "1", cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert server.stdout is not None and server.stderr is not None
    try:
        async with asyncio.timeout(30):  # aiohttp's own grace for requests in progress is 60 s
            await server.stdout.readline()  # it listens
            _, stalled = await asyncio.open_connection("127.0.0.1", port)
            stalled.write(f"POST {API}/batches HTTP/1.1\r\nHost: localhost:{port}\r\nContent-Type: application/json"
                          "\r\nContent-Length: 100\r\n\r\n{\"task\"".encode())  # 7 bytes of the 100
            await stalled.drain()
            # the stalled request is in progress once this one is answered
            async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}{API}/batches") as got:
                assert got.status == 200
            server.send_signal(signal.SIGINT)
            _, err = await server.communicate()
            assert (server.returncode, err) == (130, b"asyncsched serve: interrupted\n")
            stalled.close()
    finally:
        if server.returncode is None:
            server.kill()
            await server.wait()
