"""Builds the guest agent (agent/pymvm-agent.c, protocol in docs/agent.md) as a static binary
for the test initramfs, cached under ``<cache>/agent/<key>/pymvm-agent``; the key hashes the
source, the compiler's version and the flags, so an edited agent is rebuilt."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import structlog

from pymvm.images.cache import ImageError, cache_root

AGENT_SOURCE = Path(__file__).with_name("agent") / "pymvm-agent.c"
GUEST_PATH = "/sbin/pymvm-agent"
AGENT_PORT = 1024  # the vsock port /init starts the agent on (pymvm.agent_port=N overrides)
CFLAGS = ("-static", "-O2", "-Wall", "-Wextra", "-Werror", "-s")

log = structlog.get_logger()


class AgentBuildError(ImageError):
    """The guest agent could not be compiled."""


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise AgentBuildError("no C compiler to build the guest agent: install it with "
                              "`apt-get install gcc libc6-dev`")
    return cc


def agent_key(source: bytes, cc: str) -> str:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    h = hashlib.sha256()
    for part in (source, version.encode(), " ".join(CFLAGS).encode()):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:16]


def build_agent(cache_dir: Path | None = None, source: Path = AGENT_SOURCE) -> Path:
    """The static agent binary (built once per source/compiler, then reused)."""
    cc = _compiler()
    try:
        text = source.read_bytes()
    except OSError as e:
        raise AgentBuildError(f"guest agent source {source} cannot be read: {e.strerror}") from None
    key = agent_key(text, cc)
    out = cache_root(cache_dir) / "agent" / key / "pymvm-agent"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".pymvm-agent.{os.getpid()}.tmp")
    result = subprocess.run([cc, *CFLAGS, "-o", str(tmp), str(source)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        first = next((line for line in result.stderr.splitlines() if "error" in line),
                     result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "")
        hint = (" (static glibc missing: `apt-get install libc6-dev`)"
                if "cannot find -lc" in result.stderr else "")
        raise AgentBuildError(f"compiling the guest agent failed: {first}{hint}")
    tmp.replace(out)
    log.info("agent_built", path=str(out), size=out.stat().st_size)
    return out
