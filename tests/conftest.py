"""Shared fixtures: spawned gloo rank pools, one per world size, reused across the session."""

from __future__ import annotations

import contextlib
import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

from tests.distributed import RankPool


@pytest.fixture(scope="session")
def rank_pools():
    """get(world_size) -> a RankPool of that size (started on first use, closed at session end)."""
    pools: dict[int, RankPool] = {}

    def get(world_size: int) -> RankPool:
        if world_size not in pools:
            pools[world_size] = RankPool(world_size)
        return pools[world_size]

    yield get
    for pool in pools.values():
        pool.close()


def _mapped_files() -> set[str]:
    """Paths of the files every live process has mapped (what /proc/PID/maps lists), as far as readable."""
    mapped: set[str] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/maps") as maps:
                fields = [line.split(None, 5) for line in maps]
        except OSError:  # the process ended, or is not ours to read
            continue
        mapped.update(f[5].strip() for f in fields if len(f) == 6)  # anonymous mappings have no path
    return mapped


@pytest.fixture(scope="session", autouse=True)
def remove_orphaned_mpich_segments():
    """MPICH leaves /dev/shm/mpich_shm_* behind when a test SIGKILLs an MPI rank (test_fault, the testbed's
    kill-host): at the session's end, remove the ones made during it that no live process still maps (so a
    concurrent MPI job elsewhere on the machine keeps its own)."""
    import glob
    import time

    start = time.time()
    yield
    pattern = "/dev/shm/mpich_shm_*"
    made = [p for p in glob.glob(pattern) if _ctime(p) >= start]
    if not made:
        return
    in_use = _mapped_files()
    for path in made:
        if path not in in_use:
            with contextlib.suppress(OSError):
                os.unlink(path)


def _ctime(path: str) -> float:
    try:
        return os.stat(path).st_ctime
    except OSError:
        return 0.0
