"""Standard-library modules pymvm loads on first use instead of at import (issue 15).

`pymvm run` of a VM without a control API never uses asyncio, so asyncio, which structlog
and pymvm's own modules import at their top, is made *pending* when pymvm is imported:
`import asyncio` then binds a module whose code has not run yet, and the first access to
one of its names (``asyncio.run``, ``from asyncio import Future``) runs it, if it comes.
importlib.util.LazyLoader cannot do this: the interpreter reads
``__spec__`` of a module on every `import` statement, and any attribute access loads a
LazyLoader module. A pending module has its import metadata (``__spec__``, ``__path__``...)
from the start and loads only for a name it does not have yet.

A pending module runs once, in the first thread that needs it; another thread that needs it
meanwhile waits until it has run (a thread that reaches it again while running it, through a
circular import, sees it partly initialized, as with any module).
"""

from __future__ import annotations

import _thread
import importlib
import importlib.util
import sys
import types
from collections.abc import Callable, Iterable

_lock = _thread.RLock()  # held while a pending module runs
_running: dict[str, int] = {}  # pending modules whose code runs now -> the thread running it
_hidden: dict[str, tuple[str, ...]] = {}  # defer_import(hidden=...)
_on_load: dict[str, list[Callable[[types.ModuleType], None]]] = {}


class PendingModule(types.ModuleType):
    """A module whose code runs on the first access to a name it does not have yet."""

    def __getattr__(self, attr: str):
        if _load(self):
            return getattr(self, attr)
        raise AttributeError(f"partially initialized module {self.__name__!r} has no attribute "
                             f"{attr!r} (most likely due to a circular import)")


def _load(module: types.ModuleType) -> bool:
    """Run a pending module's code (or wait while another thread runs it). False when this
    thread is running it already: it is partly initialized for this thread."""
    if type(module) is not PendingModule:
        return True
    spec = module.__spec__
    assert spec is not None and spec.loader is not None
    with _lock:
        if type(module) is not PendingModule:  # another thread ran it meanwhile
            return True
        if _running.get(spec.name) == _thread.get_ident():
            return False
        _running[spec.name] = _thread.get_ident()
        hide = [h for h in _hidden.pop(spec.name, ()) if h not in sys.modules]
        for h in hide:
            sys.modules[h] = None  # type: ignore[assignment]  # makes `import h` fail
        try:
            try:
                spec.loader.exec_module(module)
            except BaseException:
                # As a failed import does: the next `import` starts afresh.
                if sys.modules.get(spec.name) is module:
                    del sys.modules[spec.name]
                _on_load.pop(spec.name, None)
                raise
            for hook in _on_load.pop(spec.name, ()):
                hook(module)
        finally:
            module.__class__ = types.ModuleType  # from now on an ordinary module
            del _running[spec.name]
            for h in hide:
                if h in sys.modules and sys.modules[h] is None:
                    del sys.modules[h]
    return True


def defer_import(name: str, *, hidden: Iterable[str] = ()) -> types.ModuleType:
    """Put ``name`` into sys.modules as a pending module and return it; a module that is
    already imported (or pending) is returned as it is. The modules ``hidden`` cannot be
    imported while its code runs (as with :func:`load_without`), whenever that is."""
    if (module := sys.modules.get(name)) is not None:
        return module
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"no module named {name!r}", name=name)
    module = importlib.util.module_from_spec(spec)  # metadata only: its code has not run
    module.__class__ = PendingModule
    if hidden:
        _hidden[name] = tuple(hidden)
    sys.modules[name] = module
    return module


def when_loaded(name: str, hook: Callable[[types.ModuleType], None]) -> None:
    """Call ``hook(module)`` right after pending module ``name`` has run, before any other
    thread can use it; at once if ``name`` is not pending."""
    with _lock:  # a thread running it holds the lock until its hooks have run
        if type(sys.modules.get(name)) is PendingModule:
            _on_load.setdefault(name, []).append(hook)
            return
    hook(importlib.import_module(name))


def is_pending(name: str) -> bool:
    """True while ``name`` is a pending module whose code has not run yet."""
    return type(sys.modules.get(name)) is PendingModule


def load_pending() -> None:
    """Load every pending module now: for a process about to lose the right to read the
    interpreter's files (privileges dropped) or to open files at all (a seccomp filter)."""
    for module in list(sys.modules.values()):
        _load(module)


def load_without(name: str, hidden: Iterable[str]) -> types.ModuleType:
    """Run module ``name`` now (import it, or load it if pending) while the modules ``hidden``
    cannot be imported, even one already imported; afterwards each is as it was (absent, or
    the same module object: whoever imported it before keeps it). Modules that bind an
    optional import to None when it fails (asyncio and aiohttp do for ``ssl``) keep that None
    for good; a module that had already run is left as it is. Not thread-safe for the hidden
    modules: for a process's start-up."""
    absent = object()
    saved = {h: sys.modules.get(h, absent) for h in hidden}
    for h in saved:
        sys.modules[h] = None  # type: ignore[assignment]  # makes `import h` fail
    try:
        module = importlib.import_module(name)
        _load(module)
        return module
    finally:
        for h, before in saved.items():
            if h in sys.modules and sys.modules[h] is None:
                if before is absent:
                    del sys.modules[h]
                else:  # the module, or None for one that was blocked on purpose
                    sys.modules[h] = before  # type: ignore[assignment]
