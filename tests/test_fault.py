"""Fail fast: a peer that dies in the middle of training turns into a clear error on the survivors."""

from __future__ import annotations

import os
import threading
import time

import torch
import torch.distributed as dist

import commlab
from commlab.errors import CollectiveTimeoutError, TransportError


def die_or_reduce(delay: float = 0.5) -> tuple[str, float]:
    """Rank 1 answers, then its process exits; rank 0 starts an allreduce that rank 1 will never join."""
    if dist.get_rank() == 1:
        threading.Timer(delay, os._exit, args=(17,)).start()
        return ("exiting", 0.0)
    start = time.monotonic()
    try:
        commlab.all_reduce(torch.ones(1 << 16), algorithm="ring", timeout=10)
    except (CollectiveTimeoutError, TransportError) as error:
        return (f"{type(error).__name__}: {error}", time.monotonic() - start)
    return ("no error", time.monotonic() - start)


def test_survivor_of_a_dead_peer_gets_a_clear_error_within_the_timeout(rank_pools):
    (message, elapsed), _ = rank_pools(2).run(die_or_reduce, breaks_group=True)
    assert message != "no error"
    assert "all_reduce" in message and "rank 1" in message, message
    assert elapsed < 12.0, elapsed
