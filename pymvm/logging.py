"""structlog setup: JSON lines on stderr (the guest console owns stdout).

structlog and the standard library it imports (logging, inspect, traceback, pickle, uuid,
platform...) are not loaded before `pymvm run` starts its vCPUs (issue 15). The pymvm package
makes structlog a pending module (pymvm.lazy) whose ``get_logger`` is :func:`get_logger`
here (structlog's own replaces it when structlog runs): until structlog runs, the logger it returns writes the lines of the configuration
below itself, with structlog's own ``merge_contextvars`` and the same dict, timestamp and
``json.dumps`` as structlog's processors, so the same bytes (tests/unit/test_logging.py
compares them). Whatever it does not render itself (an exception, a value ``json`` cannot
encode, positional arguments, another configuration, none at all) loads structlog and goes
to structlog's own logger, as every call does once structlog has run.
"""

from __future__ import annotations

import json as _json
import os
import sys
import types
from typing import Any

import structlog
import structlog.contextvars  # with structlog pending: this submodule alone

from . import lazy

try:  # what the datetime module re-exports (the module itself runs a pure-Python copy first)
    from _datetime import UTC
    from _datetime import datetime as _datetime
except ImportError:  # pragma: no cover  (a Python without the C module)
    from datetime import UTC
    from datetime import datetime as _datetime

# structlog's filtering loggers: method -> (level, the level's name that its processors get).
_METHODS = {"debug": (10, "debug"), "info": (20, "info"), "msg": (20, "info"),
            "warning": (30, "warning"), "warn": (30, "warning"), "error": (40, "error"),
            "critical": (50, "critical"), "fatal": (50, "critical")}
_LEVEL_NAMES = {10: "debug", 20: "info", 30: "warning", 40: "error", 50: "critical"}
_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}

# (minimum level, stream) while structlog is pending and configure() chose JSON lines: the
# loggers below write them themselves. None otherwise: they hand every call to structlog.
_direct: tuple[int, Any] | None = None
_pending_config: tuple[str, bool, Any] | None = None


def configure(level: str = "info", *, json: bool = True, stream=None) -> None:
    """JSON lines to ``stream``, or to whatever ``sys.stderr`` is when each line is written."""
    global _direct, _pending_config
    if json and level.lower() in _LEVELS and lazy.is_pending("structlog"):
        if _pending_config is None:
            lazy.when_loaded("structlog", _configure_loaded_structlog)
        _pending_config = (level, json, stream)
        _direct = (_LEVELS[level.lower()], stream)
        return
    _configure_structlog(level, json, stream)


def _configure_loaded_structlog(module: types.ModuleType) -> None:
    """structlog has run: it gets the configuration, and every logger hands its calls to it."""
    global _direct, _pending_config
    config, _pending_config = _pending_config, None
    _direct = None
    if config is not None:
        _configure_structlog(*config)


def _configure_structlog(level: str, json: bool, stream) -> None:
    import logging

    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=lambda *args: LineLogger(stream),
        cache_logger_on_first_use=False,
    )


class _NotPlainJson(Exception):
    pass


def _refuse(obj: object) -> object:
    raise _NotPlainJson


def render(method: str, context: dict, event: Any, kw: dict) -> str:
    """The line structlog writes for ``log.<method>(event, **kw)`` of a logger bound to
    ``context`` in the configuration above; raises _NotPlainJson for a value json.dumps
    cannot encode (structlog writes its repr(): left to structlog)."""
    event_dict = context.copy()  # structlog's BoundLoggerBase._process_event
    event_dict.update(**kw)
    if event is not None:
        event_dict["event"] = event
    structlog.contextvars.merge_contextvars(None, method, event_dict)
    event_dict["level"] = method  # add_log_level
    event_dict["timestamp"] = _datetime.now(tz=UTC).isoformat().replace("+00:00", "Z")
    return _json.dumps(event_dict, default=_refuse)  # format_exc_info: no exc_info; JSONRenderer


def _load_structlog() -> types.ModuleType:
    return lazy.load_without("structlog", ())


class PendingLogger:
    """What ``structlog.get_logger()`` returns while structlog is pending."""

    __slots__ = ("_args", "_bound", "_context", "_logger")

    def __init__(self, args: tuple, context: dict, bound: bool) -> None:
        self._args = args
        self._context = context
        self._bound = bound  # made by bind(): structlog's would be a bound logger, not a proxy
        self._logger: Any = None

    def _structlog_logger(self) -> Any:
        if self._logger is None:
            module = _load_structlog()
            if self._bound:
                self._logger = module.get_logger(*self._args).bind(**self._context)
            else:
                self._logger = module.get_logger(*self._args, **self._context)
        return self._logger

    def _write(self, level: int, name: str, event: Any, args: tuple, kw: dict) -> bool:
        """True when this call is done: filtered out or written here."""
        direct = _direct
        if direct is None:
            return False
        if level < direct[0]:
            return True  # structlog's filtering loggers do nothing either, arguments unread
        if args or "exc_info" in kw:
            return False
        try:
            line = render(name, self._context, event, kw)
        except _NotPlainJson:
            return False
        LineLogger(direct[1]).msg(line)
        return True

    def log(self, level: int, event: Any, *args: Any, **kw: Any) -> Any:
        if level in _LEVEL_NAMES and self._write(level, _LEVEL_NAMES[level], event, args, kw):
            return None
        return self._structlog_logger().log(level, event, *args, **kw)

    def exception(self, event: Any, *args: Any, **kw: Any) -> Any:
        direct = _direct
        if direct is not None and 40 < direct[0]:
            return None
        return self._structlog_logger().exception(event, *args, **kw)

    def bind(self, **new_values: Any) -> Any:
        if _direct is not None:
            return PendingLogger(self._args, {**self._context, **new_values}, True)
        return self._structlog_logger().bind(**new_values)

    def __getattr__(self, name: str) -> Any:  # new(), unbind(), ainfo()...: structlog's
        return getattr(self._structlog_logger(), name)

    def __repr__(self) -> str:
        return f"<PendingLogger(context={self._context!r})>"


def _log_method(method: str, level: int, name: str):
    def log_method(self: PendingLogger, event: Any, *args: Any, **kw: Any) -> Any:
        if self._write(level, name, event, args, kw):
            return None
        return getattr(self._structlog_logger(), method)(event, *args, **kw)

    log_method.__name__ = method
    return log_method


for _method, (_level, _name) in _METHODS.items():
    setattr(PendingLogger, _method, _log_method(_method, _level, _name))


def get_logger(*args: Any, **initial_values: Any) -> PendingLogger:
    """``structlog.get_logger`` while structlog is pending (see the module's doc)."""
    return PendingLogger(args, initial_values, False)


class LineLogger:
    """Writes each log line with one write(2), so that the JSON lines of the VMM and of its
    back-end processes, which share stderr, never interleave mid-line (PrintLogger's text
    stream splits lines longer than its buffer into several writes).

    ``stream=None`` follows ``sys.stderr`` as it is at each write (tests swap it). Logging
    never raises: a line for a closed or vanished stream is dropped.
    """

    def __init__(self, stream=None) -> None:
        self._stream = stream

    def msg(self, message: str) -> None:
        stream = self._stream if self._stream is not None else sys.stderr
        data = (message + "\n").encode("utf-8", "backslashreplace")
        try:
            fd = stream.fileno()
        except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
            fd = None
        try:
            if fd is None:
                stream.write(data.decode("utf-8"))
                stream.flush()
                return
            stream.flush()  # whatever was printed before goes first
        except (OSError, ValueError):  # closed, or its reader went away
            return
        view = memoryview(data)
        while view:  # a pipe or terminal may take less than all of it
            try:
                view = view[os.write(fd, view):]
            except InterruptedError:
                continue
            except OSError:
                return  # stderr is gone: nothing to log to

    log = debug = info = warn = warning = error = critical = exception = fatal = failure = msg
