"""Load one of scripts/ (Python files without a .py suffix) or of bench/ as a module, for its
unit tests."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
BENCH = SCRIPTS.parent / "bench"


def load_script(name: str, module_name: str) -> types.ModuleType:
    """scripts/``name`` as the module ``module_name`` (registered in sys.modules, where a
    dataclass defined in it looks its module up)."""
    loader = importlib.machinery.SourceFileLoader(module_name, str(SCRIPTS / name))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    loader.exec_module(module)
    return module


def load_bench(filename: str, module_name: str) -> types.ModuleType:
    """bench/``filename`` as the module ``module_name``, with bench/ on sys.path while it runs
    (the benchmarks import each other's helpers by their bare names)."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(module_name, BENCH / filename)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))
