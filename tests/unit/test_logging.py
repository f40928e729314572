"""pymvm.logging: the lines written before structlog is loaded are structlog's (issue 15).

`import pymvm` leaves structlog pending; the loggers of ``structlog.get_logger()`` then write
the configured JSON lines themselves. The same script runs in two interpreters: one where
structlog is pending (pymvm's loggers), one where structlog was imported before pymvm (its
own loggers, as before). Their stderr must be the same bytes but for the timestamps' values.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Each call's lines go to stderr; "MARK <what>" lines on stdout say whether structlog ran.
SCRIPT = r'''
import sys
if sys.argv[1] == "structlog-first":
    import structlog
import pymvm, pymvm.lazy, structlog, structlog.contextvars
from pymvm import logging as pl
pl.configure(sys.argv[2])
def mark(what):
    print("MARK", what, "pending" if pymvm.lazy.is_pending("structlog") else "loaded", flush=True)
log = structlog.get_logger()
mark("start")
log.info("plain")
log.info("values", s="x", i=1, f=1.5, big=2**70, t=True, n=None, l=[1, "a", None],
         d={"k": [1, {"z": 0.1}]}, u="h\u00e9llo \u2603 \ud83d\ude00", q='quote"\\back\nline')
log.debug("filtered at info", x=1)
log.warning("warning", reason="why")
log.warn("warn alias")
log.msg("msg alias")
log.error("error")
log.critical("critical")
log.fatal("fatal alias")
log.log(30, "log method", n=3)
log.log(10, "log filtered")
log.info("level and timestamp keys", level="mine", timestamp="mine", event_extra=1)
log.info(None, only="values")
structlog.contextvars.bind_contextvars(vm_id="vm-1", vcpu=0)
log.info("with contextvars", vm_id="overrides the contextvar")
log.info("with contextvars only")
bound = log.bind(device="virtio-mmio:1", irq=5)
bound.info("bound", extra="e")
bound.bind(irq=6, more=[1]).warning("rebound")
structlog.get_logger(peer=7).info("initial values", x=1)
structlog.contextvars.unbind_contextvars("vcpu")
log.info("one contextvar unbound")
mark("plain")
log.info("%s interpolated %d", "args", 2)
mark("args")
log.info("not plain json", path=__import__("pathlib").Path("/x"))
mark("repr")
try:
    raise ValueError("boom")
except ValueError:
    log.exception("failed", step=1)
log.info("after", k="v")
bound.info("bound after")
mark("end")
'''

TIMESTAMP = re.compile(r'"timestamp": "(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z)"')


def run_script(mode: str, level: str) -> tuple[list[str], list[str]]:
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode, level], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines(), done.stderr.splitlines()


# Two bound contextvars come out in the order of the context's hash map, which depends on
# the ContextVar objects' addresses: it varies from one run of structlog to the next.
CONTEXTVARS = ("vm_id", "vcpu")


def normalized(lines: list[str]) -> list[object]:
    """The lines with the timestamps' values left out; a line with both contextvars as its
    (key, value) pairs, with those two pairs in one order."""
    out: list[object] = []
    for line in lines:
        assert len(TIMESTAMP.findall(line)) == 1, line  # structlog's ISO UTC stamp, once
        line = TIMESTAMP.sub('"timestamp": "T"', line)
        pairs = json.loads(line, object_pairs_hook=list)
        at = [i for i, (k, _) in enumerate(pairs) if k in CONTEXTVARS]
        if len(at) < 2 or at[1] != at[0] + 1:  # not both merged from the context
            out.append(line)
            continue
        pairs[at[0]:at[1] + 1] = sorted(pairs[at[0]:at[1] + 1])
        out.append(pairs)
    return out


@pytest.mark.parametrize("level", ["info", "warning", "debug"])
def test_lines_written_before_structlog_loads_are_the_bytes_structlog_writes(level: str) -> None:
    marks, lines = run_script("pymvm-first", level)
    # structlog runs for what is left to it (interpolation, a repr, an exception), unless
    # the level filters the call out anyway.
    later = "pending" if level == "warning" else "loaded"
    assert marks == ["MARK start pending", "MARK plain pending", f"MARK args {later}",
                     f"MARK repr {later}", "MARK end loaded"]
    ref_marks, ref_lines = run_script("structlog-first", level)
    assert all(m.endswith("loaded") for m in ref_marks)
    assert normalized(lines) == normalized(ref_lines)
    events = [json.loads(line).get("event") for line in lines]
    assert ("plain" in events) == (level != "warning") and "failed" in events
    assert ("filtered at info" in events) == (level == "debug")
    assert any('"exception": "Traceback' in line for line in lines)


def test_the_comparison_sees_a_line_that_differs() -> None:
    # normalized() keeps everything but the timestamp's value and the order of the two
    # contextvars: any other change of key order, value or spacing shows.
    a = '{"event": "x", "level": "info", "timestamp": "2026-01-01T00:00:00.000001Z"}'
    b = '{"level": "info", "event": "x", "timestamp": "2026-01-01T00:00:00.000002Z"}'
    assert normalized([a]) == normalized([a.replace("000001", "000009")])
    assert normalized([a]) != normalized([b])
    assert normalized([a]) != normalized([a.replace('": "x"', '":"x"')])
    c = ('{"event": "x", "vm_id": "v", "vcpu": 0, "level": "info", '
         '"timestamp": "2026-01-01T00:00:00Z"}')
    d = c.replace('"vm_id": "v", "vcpu": 0', '"vcpu": 0, "vm_id": "v"')
    assert normalized([c]) == normalized([d])
    assert normalized([c]) != normalized([c.replace('"vcpu": 0', '"vcpu": 1')])
