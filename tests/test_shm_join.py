"""The shared-memory transport's setup through the group's Store: it is not collective, so it adds no wait
gloo would not have. Two groups first used in opposite orders on different ranks, point-to-point between
two ranks of a 4-rank group while the others idle, and a peer that dies before its first call (a clear
error within the call's timeout, not a hang). Every group here is fresh (`dist.new_group`), so each
transport is made by the code under test, not found in commlab's cache from an earlier test.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import commlab
from commlab.collectives import shm_segment as seg
from commlab.errors import CollectiveTimeoutError, TransportError
from commlab.parallel.p2p import PointToPoint

pytestmark = pytest.mark.skipif(not os.path.isdir(seg.SHM_DIR), reason="needs /dev/shm")

TIMEOUT_S = 30.0  # every wait below; a regression is a clear error in this time, never a hang


def _transport_name(group: dist.ProcessGroup) -> str:
    return type(commlab.communicator(group).transport).__name__


def opposite_orders() -> dict:
    """Ranks 0, 1 first exchange a message on the 4-rank group `pipe`, then all-reduce in their pair
    group; ranks 2, 3 first all-reduce in theirs, then exchange on `pipe`. Under a setup collective over
    `pipe` (as before), rank 0 would wait there for rank 2, which waits for rank 0 in the pair group:
    both time out. Gloo alone needs no such wait, and neither may the transport's setup.

    The messages: 300 KB (read from the sender's memory, cma, where allowed) and 40 bytes (the ring).
    """
    os.environ.pop("COMMLAB_SHM", None)  # the default: shared memory on one host
    rank, world = dist.get_rank(), dist.get_world_size()
    pipe = dist.new_group(list(range(world)))
    pairs = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    pair = pairs[rank % 2]  # 0 with 2, 1 with 3: each pair group joins one early and one late rank
    peer = rank ^ 1  # on `pipe`: 0 <-> 1, 2 <-> 3

    def exchange() -> list[float]:
        link = PointToPoint(commlab.communicator(pipe), timeout=TIMEOUT_S)
        got = []
        for micro_batch, numel in enumerate((75_000, 10)):
            link.send(torch.full((numel,), float(rank)), peer, micro_batch, "activation")
            theirs = link.recv((numel,), torch.float32, torch.device("cpu"), peer, micro_batch, "activation")
            got.append(float(theirs.sum()) / numel)
        link.flush()
        return got

    def reduce() -> float:
        values = torch.full((1000,), float(rank + 1))
        commlab.all_reduce(values, group=pair, timeout=TIMEOUT_S)
        return float(values[0])

    if rank < 2:
        exchanged, reduced = exchange(), reduce()
    else:
        reduced, exchanged = reduce(), exchange()
    found = {
        "exchanged": exchanged,
        "reduced": reduced,
        "transports": [_transport_name(g) for g in (pipe, pair)],
    }
    commlab.release(pipe)
    commlab.release(pair)
    return found


def test_groups_first_used_in_opposite_orders(rank_pools):
    for rank, found in enumerate(rank_pools(4).run(opposite_orders)):
        peer = rank ^ 1
        assert found["exchanged"] == [float(peer), float(peer)], found
        assert found["reduced"] == float((rank % 2 + 1) + (rank % 2 + 3)), found  # ranks r and r + 2
        assert found["transports"] == ["SharedMemoryTransport"] * 2, found


def point_to_point_in_a_bigger_group() -> dict:
    """Ranks 1 and 2 of a fresh 4-rank group exchange messages (small, and long enough for cma) both
    ways, while ranks 0 and 3 have not made the group's communicator at all; afterwards every rank makes
    it (so every rank has joined) and nothing of the segment is left in /dev/shm."""
    os.environ.pop("COMMLAB_SHM", None)
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(world)))
    found: dict = {"got": []}
    if rank in (1, 2):
        link = PointToPoint(commlab.communicator(group), timeout=TIMEOUT_S)
        peer = 3 - rank
        for micro_batch, numel in enumerate((3, 100_000, 17)):
            mine = torch.arange(numel, dtype=torch.float32) * (rank + 1)
            link.send(mine, peer, micro_batch, "activation")
            theirs = link.recv((numel,), torch.float32, torch.device("cpu"), peer, micro_batch, "activation")
            found["got"].append(torch.equal(theirs, torch.arange(numel, dtype=torch.float32) * (peer + 1)))
        link.flush()
    dist.barrier()  # ranks 0 and 3 were idle until here (the world group is gloo's own, not commlab's)
    transport = commlab.communicator(group).transport
    found["transport"] = type(transport).__name__
    dist.barrier()  # every rank has joined: the last one unlinked the segment
    makers = [f"{seg.PREFIX}{pid}-" for pid in transport.pids]
    found["left"] = [n for n in os.listdir(seg.SHM_DIR) if any(n.startswith(m) for m in makers)]
    commlab.release(group)
    return found


def test_point_to_point_between_two_ranks_of_four_while_the_others_idle(rank_pools):
    for rank, found in enumerate(rank_pools(4).run(point_to_point_in_a_bigger_group)):
        assert found["got"] == ([True] * 3 if rank in (1, 2) else []), found
        assert found["transport"] == "SharedMemoryTransport", found
        assert found["left"] == [], found


# ----- a peer that dies before its first call: its own processes, since that breaks a pool's group -----


def _dies_before_first_call(rank: int, store: str, results: mp.Queue) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.pop("COMMLAB_SHM", None)
    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
        )
        if rank == 1:
            os._exit(3)  # before any commlab call: it never joins the shared-memory transport
        start = time.monotonic()
        try:
            commlab.all_reduce(torch.ones(1000), timeout=3.0)
            outcome = "no error"
        except (CollectiveTimeoutError, TransportError) as error:
            outcome = f"{type(error).__name__}: {error}"
        transport = type(commlab.communicator().transport).__name__
        results.put((outcome, time.monotonic() - start, transport))
    except BaseException as error:
        results.put((f"failed: {error}\n{traceback.format_exc()}", 0.0, ""))
    results.close()
    results.join_thread()
    os._exit(0)  # the group's other member is gone: skip gloo's teardown


def test_peer_that_dies_before_its_first_call_is_a_clear_error_within_the_timeout():
    context = mp.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory(prefix="commlab-shm-test-") as tmp:
        procs = [
            context.Process(target=_dies_before_first_call, args=(r, os.path.join(tmp, "store"), results))
            for r in range(2)
        ]
        for proc in procs:
            proc.start()
        try:
            outcome, elapsed, transport = results.get(timeout=120)
        except queue.Empty:
            outcome, elapsed, transport = "no answer from rank 0 within 120 s", 0.0, ""
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    # rank 0 made the segment and exited without its atexit (as a crash): the next sweep removes it
    swept = [path for path in seg.sweep_stale() if f"{seg.PREFIX}{procs[0].pid}-" in path]
    assert transport == "SharedMemoryTransport", (transport, outcome)
    assert len(swept) == 1, swept
    assert outcome.startswith("CollectiveTimeoutError"), outcome
    assert "all_reduce" in outcome and "rank 1 never joined" in outcome, outcome
    # the call's 3 s deadline, checked every CHECK_S (50 ms); the rest is slack for a loaded machine
    assert elapsed < 3.0 + 10.0, elapsed


def test_default_is_shared_memory():
    from commlab.collectives.shm import shm_enabled

    assert shm_enabled({}) and not shm_enabled({"COMMLAB_SHM": "0"})
