"""pymvm: a minimal KVM microVM monitor whose data planes live in vhost back-ends."""

import sys as _sys

# asyncio (structlog.stdlib and pymvm's modules import it at their top) stays pending until
# first used (pymvm.lazy): `pymvm run` with no control API never uses it (its main thread
# waits in vmm.VirtualMachine.wait); with one, the API's loop loads it.
if "asyncio" not in _sys.modules:
    from .lazy import defer_import as _defer_import

    _defer_import("asyncio")

# inspect (with ast, dis, tokenize, linecache) as well: dataclasses imports it at its top but
# uses it only to write a docstring for a dataclass that has none (pymvm's have theirs); and
# copy, which dataclasses uses only in asdict()/astuple() (its import looks for Jython's
# org.python.core on every sys.path entry).
for _name in ("inspect", "copy"):
    if _name not in _sys.modules:
        from .lazy import defer_import as _defer_import

        _defer_import(_name)

# structlog stays pending too (pymvm.logging): until it runs, the loggers pymvm's modules get
# from `structlog.get_logger()` write its JSON lines themselves, so `pymvm run` starts its
# vCPUs before structlog and the standard library it imports are loaded. When it runs, it
# probes optional pretty-printers (rich, better_exceptions, colorama) and integrations
# (twisted, greenlet): pymvm logs JSON lines and uses none of them, and where they are
# installed (schemathesis brings rich) the probe alone costs a noticeable part of a start-up.
# They are hidden while structlog runs only: a later `import rich` by anyone else works.
if "structlog" not in _sys.modules:
    from .lazy import defer_import as _defer_import

    _structlog = _defer_import(
        "structlog", hidden=("rich", "better_exceptions", "colorama", "twisted", "greenlet"))
    from .logging import get_logger as _get_logger

    _structlog.get_logger = _get_logger  # type: ignore[attr-defined]  # its own replaces it
