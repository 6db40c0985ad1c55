"""Shared fixtures: spawned gloo rank pools, one per world size, reused across the session."""

from __future__ import annotations

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
