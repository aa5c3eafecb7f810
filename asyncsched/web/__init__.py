"""Embed a scheduler in an aiohttp app: a JSON API, live events over SSE and a dashboard.

``from asyncsched.web import TaskRegistry, setup``; it needs aiohttp, the
``web`` extra: ``pip install 'asyncsched[web]'``. The core package never
imports this one.
"""

from __future__ import annotations

try:
    import aiohttp  # noqa: F401 - fail here, with the fix, rather than deep inside
except ModuleNotFoundError as exc:  # pragma: no cover - the test extra installs it
    raise ImportError(f"asyncsched.web needs aiohttp ({exc}): pip install 'asyncsched[web]'") from exc

from ._app import Limits, setup
from ._registry import TaskRegistry

__all__ = ["Limits", "TaskRegistry", "setup"]
