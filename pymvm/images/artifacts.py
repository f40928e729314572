"""What `@microvm-kernel` and `@test-initramfs` name, without importing the image builders.

`pymvm build-kernel` and `pymvm build-initramfs` record each artifact they build (or find in
the cache) in ``<cache>/artifacts/<name>.json``: its path, and the size and modification time
of every file it was built from. `pymvm run` resolves `@name` from that record with a few
stat calls; a changed input, or no record, sends it back to the builders' own check (which
hashes the inputs), so a stale artifact is never used.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from .cache import cache_root


def _signature(path: Path) -> list[int]:
    # Whole seconds: the nested test host sees this file system through 9p, whose times have
    # no sub-second part, and a record written there must still match here (and back).
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns // 1_000_000_000]


def _record_path(name: str, cache_dir: Path | None) -> Path:
    return cache_root(cache_dir) / "artifacts" / f"{name}.json"


def record_artifact(name: str, artifact: Path, inputs: Iterable[Path],
                    cache_dir: Path | None = None) -> None:
    """Remember that ``artifact`` is ``@name`` as long as ``inputs`` are unchanged."""
    try:
        record = {"path": str(artifact),
                  "inputs": {str(p): _signature(Path(p)) for p in inputs}}
        path = _record_path(name, cache_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(path)
    except OSError:
        pass  # a cache that cannot be written only costs the next run the full check


def fresh_artifact(name: str, cache_dir: Path | None = None) -> Path | None:
    """The recorded ``@name`` if it exists and none of its inputs changed, else None."""
    try:
        record = json.loads(_record_path(name, cache_dir).read_text())
        artifact = Path(record["path"])
        if not artifact.is_file():
            return None
        for input_path, signature in record["inputs"].items():
            if _signature(Path(input_path)) != signature:
                return None
        return artifact
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
