"""Task functions of the mixed-fault benchmark (a module of their own, so they pickle)."""

from __future__ import annotations

import os
import time


def crash() -> None:
    os._exit(1)


def hang() -> None:
    time.sleep(3600)


def fail() -> None:
    raise RuntimeError("planned failure")


def work() -> str:
    time.sleep(0.01)
    return "ok"
