"""pymvm: a minimal KVM microVM monitor whose data planes live in vhost back-ends."""

import sys as _sys

# asyncio (structlog.stdlib and pymvm's modules import it at their top) stays pending until
# first used: `pymvm run` starts the vCPUs first and its event loop after (pymvm.lazy).
if "asyncio" not in _sys.modules:
    from .lazy import defer_import as _defer_import

    _defer_import("asyncio")

# structlog probes optional pretty-printers (rich, better_exceptions, colorama) and
# integrations (twisted, greenlet) when it is imported. pymvm logs JSON lines and uses none
# of them, and where they are installed (schemathesis brings rich) the probe alone costs
# `pymvm run` a noticeable part of its start-up. Hide them for the duration of that import
# only: a later `import rich` by anyone else works as usual.
if "structlog" not in _sys.modules:
    _hidden = [name for name in ("rich", "better_exceptions", "colorama", "twisted", "greenlet")
               if name not in _sys.modules]
    for _name in _hidden:
        _sys.modules[_name] = None  # type: ignore[assignment]  # makes `import _name` fail
    try:
        import structlog as _structlog  # noqa: F401
    finally:
        for _name in _hidden:
            if _sys.modules.get(_name, 0) is None:
                del _sys.modules[_name]
