"""Free disk and available memory: refuse a request that cannot fit before any work starts.

A job that outgrows the machine is otherwise stopped by the kernel (the OOM killer, or a
full disk half-way through): no message, and hours lost. Estimates are upper bounds made
from parameter bytes, so a refusal names the figures and the user can judge them.
"""

from __future__ import annotations

import os

from pat.errors import PatError
from pat.io import free_disk, human_bytes

__all__ = ["available_memory", "free_disk", "human_bytes", "check_fits"]


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (``MemAvailable``); None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits(request: str, *, disk: int, memory: int, where: str | os.PathLike, hint: str) -> None:
    """Raise :class:`PatError` if ``disk`` bytes do not fit under ``where`` or ``memory`` in RAM.

    Args:
        request: what was asked, as the user typed it, e.g. ``"--children 100000"``.
        disk: bytes the request would write.
        memory: bytes of RAM the request would hold at once.
        where: the path the request writes under; its file system's free space is checked.
        hint: how to make it fit, e.g. ``"use fewer children"``.
    """
    free, avail = free_disk(where), available_memory()
    if disk <= free and (avail is None or memory <= avail):
        return
    mem = f"{human_bytes(memory)} of memory ({human_bytes(avail)} available)" if avail is not None else \
        f"{human_bytes(memory)} of memory"
    raise PatError(f"{request} cannot fit: it needs about {human_bytes(disk)} of disk in {str(where)!r} "
                   f"({human_bytes(free)} free) and {mem}; {hint}.")
