"""The public surface: every name in ``__all__`` is importable, sorted, and nothing public is left out."""

from __future__ import annotations

import asyncsched
import asyncsched.backends
import asyncsched.web


def test_all_is_sorted_and_importable() -> None:
    assert asyncsched.__all__ == sorted(asyncsched.__all__)
    for name in asyncsched.__all__:
        assert getattr(asyncsched, name) is not None, name


def test_every_public_member_is_in_all() -> None:
    public = {name for name in dir(asyncsched) if not name.startswith("_")}
    modules = {"annotations", "importlib", "backends", "web", "TYPE_CHECKING", "Any"}
    assert public - modules - set(asyncsched.__all__) == set()


def test_public_classes_name_the_package_as_home() -> None:
    for name in asyncsched.__all__:
        member = getattr(asyncsched, name)
        if isinstance(member, type):
            assert member.__module__.startswith("asyncsched."), (name, member.__module__)


def test_errors_share_one_base() -> None:
    errors = [getattr(asyncsched, n) for n in asyncsched.__all__ if n.endswith("Error")]
    assert errors and all(issubclass(e, asyncsched.AsyncschedError) for e in errors)


def test_backends_package_exports_its_sorted_names() -> None:
    assert asyncsched.backends.__all__ == sorted(asyncsched.backends.__all__)


def test_web_package_exports_its_sorted_names() -> None:
    assert asyncsched.web.__all__ == sorted(asyncsched.web.__all__) == ["Limits", "TaskRegistry", "setup"]
    for name in asyncsched.web.__all__:
        assert getattr(asyncsched.web, name).__module__.startswith("asyncsched.web."), name


def test_the_scheduler_imports_only_the_seams() -> None:
    """The scheduler knows backends and stores through their interfaces: it imports no concrete one, not even lazily."""
    import ast
    import pathlib

    source = pathlib.Path(asyncsched.__file__).with_name("_scheduler.py").read_text()
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            imported |= {f"{'.' * node.level}{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
    forbidden = {"_local", "_pool", "_sqlite", "backends", "web", "aiosqlite", "MemoryStore", "SQLiteStore",
                 "ProcessBackend", "ExecutorBackend"}
    concrete = {name for name in imported if forbidden & set(name.split("."))}
    assert "._backend.Backend" in imported and "._store.Store" in imported
    assert concrete == set()
