"""Guest images for tests and examples: the microVM kernel and a busybox initramfs.

Both are built from packages installed on the host and cached outside the repository
(see `cache.cache_root`).
"""

from pymvm.images.cache import ImageError, cache_root

__all__ = ["ImageError", "cache_root"]
