"""Where built guest images live, and the images package's exception root."""

import os
from pathlib import Path


class ImageError(Exception):
    """A guest image (kernel, initramfs) could not be found or built."""


def cache_root(cache_dir: Path | None = None) -> Path:
    """The image cache: an explicit dir, else $PYMVM_CACHE_DIR, else $XDG_CACHE_HOME/pymvm."""
    if cache_dir is not None:
        return Path(cache_dir)
    if env := os.environ.get("PYMVM_CACHE_DIR"):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "pymvm"
