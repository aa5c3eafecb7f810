"""A Celery app with asyncsched's generic task, for Celery's own command line and for ``python -m``.

Start a worker with either of::

    python -m asyncsched.backends.celery_worker --broker URL --backend URL [--concurrency N]
    celery -A asyncsched.backends.celery_worker --broker URL --result-backend URL worker --loglevel INFO

Workers of an app of your own need the task registered on it: call
``CeleryBackend.register_task(app)`` where the app is defined.
"""

from __future__ import annotations

import sys

from ._celery import celery_worker_main, make_app

__all__ = ["app"]

app = make_app()

if __name__ == "__main__":
    sys.exit(celery_worker_main(sys.argv[1:]))
