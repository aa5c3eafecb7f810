"""Small helpers shared by the tests."""

from __future__ import annotations

import os
import select

import psutil


def wait_gone(pid: int, timeout: float = 3.0) -> bool:
    """Wait, bounded, until process ``pid`` has ended (a zombie counts); True if it has.

    Waits on a pidfd, so it is woken by the exit itself and never reaps the process
    (reaping belongs to its parent).
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
