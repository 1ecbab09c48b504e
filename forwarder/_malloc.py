"""glibc malloc tuning for the forwarder's own process: at most :data:`MALLOC_ARENAS` malloc arena(s).

glibc gives each thread that allocates while another holds the main arena an arena of its own, up to 8 per core,
and keeps what is freed in each arena for reuse by that arena rather than returning it to the system. The
forwarder's worker threads (spool writes, SQLite, the pipe readers; request encoding did too, before it moved to the
event loop) each allocate chunk-sized buffers (~1 MiB of JSON, gzip output), so with the default the same bytes
end up reserved once per arena.
Measured (``bench/run_all.py --only a``, back to back): peak RSS 79.5-79.9 MiB with one arena against 87.1-88.0
MiB with glibc's default, for 4-5% fewer lines/s (within the run-to-run noise of ~5%, but in both pairs). In an
experiment where worker threads allocated chunk buffers concurrently (a write-behind spool, not kept), the 2 MiB
spool-full test (``tests/e2e/test_delivery_e2e.py``) grew by 36-60 MiB with the default, 27-45 MiB with two
arenas and 25-27 MiB with one. Nearly every allocation happens under the GIL, and threads keep glibc's lock-free
per-thread cache for small blocks. This is what ``MALLOC_ARENA_MAX=1`` does; a
``MALLOC_ARENA_MAX`` set in the environment is left to glibc.
"""

from __future__ import annotations

import ctypes
import os
from typing import Final

MALLOC_ARENAS: Final = 1
"""Arenas glibc may create for this process (the main one included)."""
M_ARENA_MAX: Final = -8
"""``mallopt`` parameter number of ``M_ARENA_MAX`` (glibc ``<malloc.h>``)."""


def limit_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Tell glibc to create at most ``arenas`` malloc arenas from now on (call it before starting threads).

    Returns:
        ``True`` if the limit was set; ``False`` (and nothing changed) when the C library is not glibc (musl has
        no arenas to limit), when ``mallopt`` is unavailable or refuses, or when ``MALLOC_ARENA_MAX`` is set in the
        environment (glibc applied it at start).
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        libc_version = os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError):
        return False
    if not libc_version or not libc_version.startswith("glibc"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_ARENA_MAX, arenas))
