"""Checks before a large allocation: refuse an adapter that cannot fit, instead of letting the
allocator fail (or the machine swap) half-way through building it."""

from __future__ import annotations

import os

from deltatune.core.config import ConfigError

HEADROOM = 0.9
"""Share of the currently available host memory one adapter tensor may claim."""


def available_bytes() -> int | None:
    """Host memory available now (bytes), or None where the platform does not say."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_allocation(elements: int, *, bytes_per_element: int = 4, what: str, fix: str) -> None:
    """Raise ConfigError when `elements` values would not fit in the available host memory.

    Raises:
        ConfigError: names `what`, the bytes needed and available, and `fix`.
    """
    needed = elements * bytes_per_element
    available = available_bytes()
    if available is not None and needed > HEADROOM * available:
        raise ConfigError(
            f"{what} needs {needed / 2**30:,.2f} GiB of memory but {available / 2**30:,.2f} GiB is available; {fix}"
        )
