"""The task of ``asyncsched demo``: a simulated HTTP request with a random delay and a random outcome.

It lives in the package so that worker processes can import it by name.
"""

from __future__ import annotations

import random
import time
from typing import Any

from ._worker import report

__all__ = ["DELAY", "TIMEOUT", "ServerError", "fetch"]

DELAY = (0.5, 3.0)
"""Seconds a simulated request takes, drawn uniformly."""
TIMEOUT = 3.5
"""The demo's task timeout: above every delay, so only a request that hangs times out."""
TIMEOUT_SHARE = 0.1
"""Share of requests that hang until the scheduler kills them."""
ERROR_SHARE = 0.15
"""Share of requests answered with a server error."""


class ServerError(Exception):
    """The simulated server answered with a 5xx status."""


def fetch(request_id: int) -> dict[str, Any]:
    """Simulate ``GET /items/<request_id>``: succeed with data, hang, or fail with a server error."""
    url = f"https://api.example.com/items/{request_id}"
    report(message=f"GET {url}", progress=0.0)
    draw = random.random()
    if draw < TIMEOUT_SHARE:
        time.sleep(10 * TIMEOUT)  # no answer: the scheduler's timeout kills this worker
    delay = random.uniform(*DELAY)
    time.sleep(delay / 2)
    report(message=f"GET {url}: waiting for the body", progress=0.5)
    time.sleep(delay / 2)
    if draw < TIMEOUT_SHARE + ERROR_SHARE:
        raise ServerError(f"503 Service Unavailable from {url}")
    return {"id": request_id, "url": url, "status": 200, "items": random.randint(1, 100),
            "latency": round(delay, 3)}
