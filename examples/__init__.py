"""Examples of asyncsched, runnable from the repository root (``python -m examples.NAME``)."""
