"""Small helpers shared by the tests."""

from __future__ import annotations

import psutil


def wait_gone(pid: int, timeout: float = 3.0) -> bool:
    """Wait (bounded) for process ``pid`` to end; True when it is gone or a zombie."""
    try:
        process = psutil.Process(pid)
        process.wait(timeout=timeout)
    except psutil.NoSuchProcess:
        return True
    except psutil.TimeoutExpired:
        return process.status() == psutil.STATUS_ZOMBIE
    return True
