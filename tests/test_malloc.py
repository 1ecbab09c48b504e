"""The glibc arena limit (:mod:`forwarder._malloc`), checked in a child interpreter with glibc's own report."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"), reason="malloc arenas are a glibc feature"
)

PROBE = r"""
import ctypes, sys, threading
from forwarder._malloc import limit_arenas
print(limit_arenas(2), flush=True)
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
barrier = threading.Barrier(6)
def worker():
    barrier.wait()  # all six allocate at the same time: each would get an arena of its own
    libc.malloc(1 << 16)  # never freed: the arena stays in use
    barrier.wait()
threads = [threading.Thread(target=worker) for _ in range(6)]
for t in threads: t.start()
for t in threads: t.join()
libc.malloc_stats()  # one "Arena N:" block per arena, on stderr
"""


def arenas(env: dict[str, str]) -> tuple[str, int]:
    """Run the probe; returns what ``limit_arenas`` returned and how many arenas glibc reports."""
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return proc.stdout.strip(), sum(line.startswith("Arena ") for line in proc.stderr.splitlines())


def test_six_allocating_threads_share_two_arenas() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    assert arenas(env) == ("True", 2)


def test_malloc_arena_max_in_the_environment_is_left_to_glibc() -> None:
    env = {**os.environ, "MALLOC_ARENA_MAX": "4"}
    assert arenas(env) == ("False", 4)
