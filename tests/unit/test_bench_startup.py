"""bench/startup.py's floor: the modules, not pymvm's, that pymvm imports, read from
`-X importtime` and imported again by a bare interpreter (issue 15's evidence that CPython's
own share is larger than QEMU's whole start-up)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .script_loader import load_bench

# What `python -X importtime` writes: each module when its import finishes, its own imports
# (two spaces deeper) before it. pymvm.cli imports json and pymvm.config; pymvm.config
# imports tomllib and the bare submodule structlog.contextvars (its package pending).
IMPORTTIME = """\
import time: self [us] | cumulative | imported package
import time:       100 |        100 |   _io
import time:       300 |        400 | _frozen_importlib_external
import time:        50 |         50 |         re._parser
import time:        60 |        110 |       re
import time:        70 |        180 |     json.decoder
import time:        80 |        260 |   json
import time:        90 |         90 |       tomllib._parser
import time:        10 |        100 |     tomllib
import time:        20 |         20 |       contextvars
import time:        30 |         50 |     structlog.contextvars
import time:        40 |        190 |   pymvm.config
import time:        50 |        500 | pymvm.cli
import time:        10 |         10 | nt
"""


@pytest.fixture(scope="module")
def startup():
    return load_bench("startup.py", "bench_startup")


def test_imported_modules_are_read_in_the_order_they_finished(startup) -> None:
    assert startup.imported_modules(IMPORTTIME) == [
        "_io", "_frozen_importlib_external", "re._parser", "re", "json.decoder", "json",
        "tomllib._parser", "tomllib", "contextvars", "structlog.contextvars", "pymvm.config",
        "pymvm.cli", "nt"]


def test_dependency_imports_skip_pymvm_but_keep_what_its_modules_import(startup) -> None:
    # Each import brings its own (json brings re); pymvm's modules are replaced by their
    # imports; the bare submodule is replaced by its own imports, so that its package's
    # __init__ (which pymvm never ran) is not counted in the floor.
    assert startup.dependency_imports(IMPORTTIME) == [
        "_frozen_importlib_external", "json", "tomllib", "contextvars", "nt"]


def test_the_floor_reimports_what_pymvm_imported_and_lets_failed_imports_fail(startup, tmp_path) -> None:
    # A real run of a stand-in pymvm package whose modules import json and, inside a try,
    # nt (absent on Linux).
    package = tmp_path / "pymvm"
    package.mkdir()
    (package / "__init__.py").write_text("import json\n")
    (package / "mod.py").write_text("try:\n    import nt\nexcept ImportError:\n    pass\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-X", "importtime", "-S", "-c", "import pymvm.mod"],
                         capture_output=True, text=True, check=True, env=env, cwd=tmp_path).stderr
    assert {"pymvm", "pymvm.mod", "json", "nt"} <= set(startup.imported_modules(out))
    imports = startup.dependency_imports(out)
    assert "json" in imports and "nt" in imports
    assert not any(m == "pymvm" or m.startswith("pymvm.") for m in imports)
    argv = startup.floor_argv(sys.executable, imports)
    assert argv[:3] == [sys.executable, "-S", "-c"]
    again = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], capture_output=True,
                           text=True, check=True, env=env, cwd=tmp_path).stderr
    theirs = {m for m in startup.imported_modules(out) if not m.startswith("pymvm")}
    assert theirs <= set(startup.imported_modules(again))
    assert not any(m.startswith("pymvm") for m in startup.imported_modules(again))


def test_the_stack_floor_loads_tomllib_and_the_compiled_kvm_module_without_pymvm(startup) -> None:
    # The least a VMM on this stack loads before it reads its config and makes a KVM ioctl.
    argv = startup.stack_floor_argv(sys.executable)
    assert argv[:3] == [sys.executable, "-S", "-c"]
    out = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], capture_output=True,
                         text=True, check=True, cwd="/").stderr
    modules = startup.imported_modules(out)
    assert {"tomllib", "_cffi_backend", "_kvm_cffi"} <= set(modules)
    assert not any(m == "pymvm" or m.startswith("pymvm.") for m in modules)
    # The module it loads is pymvm's own build (the file under ROOT/pymvm/kvm).
    check = argv[-1] + "\nassert _kvm_cffi.__file__.startswith(sys.path[0]), _kvm_cffi.__file__"
    subprocess.run([*argv[:-1], check], check=True, cwd="/")
