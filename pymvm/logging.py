"""structlog setup: JSON lines on stderr (the guest console owns stdout)."""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure(level: str = "info", *, json: bool = True, stream=None) -> None:
    """JSON lines to ``stream``, or to whatever ``sys.stderr`` is when each line is written."""
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
