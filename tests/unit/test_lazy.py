"""pymvm.lazy: a pending module runs on first use, not on `import` (issue 15)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pymvm.lazy import defer_import, is_pending, load_without


@pytest.fixture
def package(tmp_path: Path, monkeypatch):
    """A package `lazypkg` whose import is counted in `lazycount.runs`, and which imports
    the optional `lazyopt` the way asyncio imports ssl."""
    (tmp_path / "lazycount.py").write_text("runs = 0\n")
    pkg = tmp_path / "lazypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "import lazycount\nlazycount.runs += 1\nVALUE = 42\n"
        "try:\n    import lazyopt\nexcept ImportError:\n    lazyopt = None\n")
    (tmp_path / "lazyopt.py").write_text("")
    (tmp_path / "lazybroken.py").write_text("raise RuntimeError('broken on purpose')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield sys.modules
    for name in ("lazycount", "lazypkg", "lazyopt", "lazybroken"):
        sys.modules.pop(name, None)


def test_an_import_statement_binds_a_pending_module_without_running_it(package) -> None:
    defer_import("lazypkg")
    import lazycount
    import lazypkg

    assert is_pending("lazypkg") and lazycount.runs == 0
    assert lazypkg.VALUE == 42  # the first name it does not have yet runs it, once
    assert lazycount.runs == 1 and not is_pending("lazypkg")
    from lazypkg import VALUE  # noqa: F401
    assert lazycount.runs == 1


def test_defer_import_leaves_an_imported_module_as_it_is(package) -> None:
    import lazypkg

    assert defer_import("lazypkg") is lazypkg and not is_pending("lazypkg")


def test_load_without_hides_a_module_only_while_it_loads(package) -> None:
    defer_import("lazypkg")
    module = load_without("lazypkg", hidden=("lazyopt",))
    assert module.lazyopt is None  # its optional import failed while hidden
    import lazyopt  # importable again afterwards

    assert lazyopt is not None and sys.modules["lazyopt"] is lazyopt


def test_load_without_hides_an_imported_module_and_gives_the_same_one_back(package) -> None:
    import lazyopt

    module = load_without("lazypkg", hidden=("lazyopt",))
    assert module.lazyopt is None  # hidden although imported before
    assert sys.modules["lazyopt"] is lazyopt  # the same module afterwards, not a new one


def test_a_pending_module_that_fails_to_load_is_removed_like_a_failed_import(package) -> None:
    broken = defer_import("lazybroken")
    with pytest.raises(RuntimeError, match="on purpose"):
        broken.anything  # noqa: B018
    assert "lazybroken" not in sys.modules


def test_defer_import_of_a_missing_module_raises_module_not_found() -> None:
    with pytest.raises(ModuleNotFoundError):
        defer_import("pymvm_no_such_module")


def test_load_pending_runs_every_pending_module(package) -> None:
    import lazycount

    defer_import("lazypkg")
    from pymvm.lazy import load_pending

    load_pending()
    assert not is_pending("lazypkg") and lazycount.runs == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_a_process_that_drops_privileges_can_still_use_asyncio_afterwards() -> None:
    # The back-ends drop to `nobody`, who may not read the interpreter's files: a module
    # still pending then could never load (the built-in back-end died so, before the fix).
    code = ("import sys, pymvm, pymvm.lazy\n"
            "assert pymvm.lazy.is_pending('asyncio'), 'asyncio should be pending here'\n"
            "from pymvm import sandbox\n"
            "sandbox.drop_privileges('nobody')\n"
            "import asyncio\n"
            "print(asyncio.run(asyncio.sleep(0, 'served')))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert done.stdout.splitlines()[-1] == b"served"


def test_defer_import_hides_its_modules_whenever_the_pending_module_runs(package) -> None:
    lazypkg = defer_import("lazypkg", hidden=("lazyopt",))
    assert lazypkg.lazyopt is None  # run by a plain attribute access, lazyopt hidden then
    import lazyopt

    assert lazyopt is not None and sys.modules["lazyopt"] is lazyopt


def test_when_loaded_hooks_run_once_the_module_has_run_or_at_once_if_it_is_not_pending(package) -> None:
    from pymvm.lazy import when_loaded

    seen = []
    defer_import("lazypkg")
    when_loaded("lazypkg", lambda m: seen.append(("first", m.VALUE, is_pending("lazypkg"))))
    assert seen == []
    import lazypkg

    assert lazypkg.VALUE == 42
    # The hook ran after the module's code and before anyone else could use it.
    assert seen == [("first", 42, True)] and not is_pending("lazypkg")
    when_loaded("lazypkg", lambda m: seen.append(("later", m.VALUE)))
    assert seen[-1] == ("later", 42)


def test_a_thread_waits_for_a_pending_module_that_another_thread_is_running(package, tmp_path) -> None:
    import threading

    (tmp_path / "lazyslow.py").write_text(
        "import time, lazycount\nlazycount.runs += 1\nlazycount.started.set()\n"
        "time.sleep(0.3)\nVALUE = 7\n")
    import lazycount

    lazycount.started = threading.Event()
    slow = defer_import("lazyslow")
    results = {}
    first = threading.Thread(target=lambda: results.setdefault("first", slow.VALUE))
    first.start()
    assert lazycount.started.wait(10)
    results["second"] = slow.VALUE  # while the first thread runs it: waits, never half-made
    first.join(10)
    assert results == {"first": 7, "second": 7} and lazycount.runs == 1
    sys.modules.pop("lazyslow", None)


def test_a_pending_module_sees_itself_partly_initialized_while_it_runs(package, tmp_path) -> None:
    (tmp_path / "lazyself.py").write_text(
        "import sys\ntry:\n    sys.modules['lazyself'].LATER\nexcept AttributeError as e:\n"
        "    SEEN = str(e)\nLATER = 1\n")
    module = defer_import("lazyself")
    assert module.LATER == 1 and "partially initialized" in module.SEEN
    sys.modules.pop("lazyself", None)
