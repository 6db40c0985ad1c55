"""The shared-memory transport: every collective x algorithm x dtype against gloo's own on 2-4 ranks,
messages many times the ring, a dead peer, a timeout, a mismatch, automatic selection and cleanup.

Rings of 4 KiB make every message above 4080 bytes stream through its ring in pieces (and wrap around
it), so the small sizes here already test the streaming path.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import commlab
from commlab.collectives import shm_segment as seg
from commlab.collectives.shm import SharedMemoryTransport, shm_enabled
from commlab.collectives.transport import Message
from commlab.errors import (
    CollectiveMismatchError,
    CollectiveTimeoutError,
    InvalidArgumentError,
    TransportError,
)
from tests.test_collectives import DTYPES, check_against_torch

pytestmark = pytest.mark.skipif(not os.path.isdir(seg.SHM_DIR), reason="needs /dev/shm")


def small_ring() -> SharedMemoryTransport:
    return SharedMemoryTransport(ring_bytes=4096)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_every_collective_matches_torch_on_shared_memory(rank_pools, world_size):
    """Sizes 0, 67, 1001 elements: empty, odd, and (in 8-byte dtypes) two rings' worth."""
    results = rank_pools(world_size).run(
        check_against_torch, [0, 67, 1001], DTYPES, False, 30 + world_size, transport=small_ring
    )
    failures = [f for per_rank in results for f in per_rank]
    assert not failures, "\n".join(failures[:40])


def large_messages(numel: int, cma: bool) -> list[str]:
    """Allreduce, allgather and broadcast of ~1.2 MB per rank against gloo: read from the sender's memory
    (cma), or streamed through 64 KiB rings (cma off)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = commlab.Communicator(SharedMemoryTransport(ring_bytes=1 << 16, cma=cma))
    if not cma and comm.transport.cma:
        return ["cma=False was not honoured"]
    gen = torch.Generator().manual_seed(rank)
    x = torch.randint(-50, 50, (numel,), generator=gen).to(torch.float32)  # sums exact in float32
    failures = []
    for algorithm in ["ring", "direct", "halving_doubling", "tree", "auto"]:
        ref, got = x.clone(), x.clone()
        dist.all_reduce(ref)
        commlab.all_reduce(got, algorithm=algorithm, group=comm)
        if not torch.equal(got, ref):
            failures.append(f"allreduce {algorithm}: {int((got != ref).sum())} wrong")
    ref = torch.empty(numel * world)
    got = torch.full((numel * world,), 7.0)
    dist.all_gather_into_tensor(ref, x)
    commlab.all_gather(got, x, group=comm)
    if not torch.equal(got, ref):
        failures.append("allgather")
    got = x.clone()
    commlab.broadcast(got, 1, group=comm)
    ref = x.clone()
    dist.broadcast(ref, 1)
    if not torch.equal(got, ref):
        failures.append("broadcast")
    comm.transport.close()
    return failures


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("cma", [True, False])
def test_messages_many_times_the_ring(rank_pools, world_size, cma):
    results = rank_pools(world_size).run(large_messages, 300_007, cma)
    failures = [f for per_rank in results for f in per_rank]
    assert not failures, "\n".join(failures)


def reductions_on_one_buffer(numel: int) -> list[str]:
    """One tensor reduced again and again with a different reduction each call: its bound program (and
    the transport's prepared transfers, whose receives reduce on receipt) is the same every call, so each
    call must bring its own reducer. Integer-valued float32 inputs: every order of the sums is exact."""
    rank = dist.get_rank()
    comm = commlab.Communicator(SharedMemoryTransport(ring_bytes=1 << 16))
    x = torch.empty(numel)
    failures = []
    for call, op in enumerate(["sum", "max", "sum", "min", "prod", "max", "sum"]):
        gen = torch.Generator().manual_seed(call * 10 + rank)
        values = torch.randint(-3, 4, (numel,), generator=gen).to(torch.float32)
        x.copy_(values)  # the same storage every call
        for algorithm in ["ring", "recursive_doubling"]:
            ref = values.clone()
            dist.all_reduce(ref, op=getattr(dist.ReduceOp, "PRODUCT" if op == "prod" else op.upper()))
            x.copy_(values)
            commlab.all_reduce(x, op=op, algorithm=algorithm, group=comm)
            if not torch.equal(x, ref):
                failures.append(f"call {call} {op} {algorithm}: {int((x != ref).sum())} wrong")
    comm.transport.close()
    return failures


@pytest.mark.parametrize("numel", [1001, 100_003])  # through the rings; read from the sender (cma)
def test_reductions_change_on_one_buffer(rank_pools, numel):
    results = rank_pools(3).run(reductions_on_one_buffer, numel)
    failures = [f for per_rank in results for f in per_rank]
    assert not failures, "\n".join(failures)


def point_to_point() -> list[str]:
    """Empty, odd-sized and ring-wrapping messages straight through the transport, in both directions
    at once, every dtype's bytes intact (bfloat16 included)."""
    rank = dist.get_rank()
    peer = 1 - rank
    transport = SharedMemoryTransport(ring_bytes=4096)
    failures = []
    cases = [(0, torch.float32), (3, torch.bfloat16), (1001, torch.int8), (0, torch.int64)]
    cases += [(2500, torch.float64), (1, torch.uint8)]
    for tag, (numel, dtype) in enumerate(cases):
        mine = (torch.arange(numel) * (rank + 2) % 100).to(dtype)
        theirs = torch.full((numel,), 99).to(dtype)
        requests = transport.post([Message(mine, peer, tag)], [Message(theirs, peer, tag)])
        transport.wait_all(requests, time.monotonic() + 30, str)
        if not torch.equal(theirs, (torch.arange(numel) * (peer + 2) % 100).to(dtype)):
            failures.append(f"{numel} x {dtype}")
    transport.close()
    return failures


def test_point_to_point(rank_pools):
    failures = [f for per_rank in rank_pools(2).run(point_to_point) for f in per_rank]
    assert not failures, failures


def async_calls() -> list[float]:
    """Asynchronous calls run on the communicator's worker thread (which sleeps at once instead of
    spinning): several in flight, then a synchronous one queued behind them, all right."""
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = commlab.Communicator(SharedMemoryTransport())
    tensors = [torch.full((70_000,), float(rank + i)) for i in range(3)]  # 280 KB: the cma path
    works = [commlab.all_reduce(t, group=comm, async_op=True) for t in tensors]
    last = torch.full((5,), float(rank))
    commlab.all_reduce(last, group=comm)
    for work in works:
        work.wait(timeout=60)
    comm.close()
    comm.transport.close()
    expected = [float(sum(r + i for r in range(world))) for i in range(3)]
    assert [float(t[0]) for t in tensors] == expected and all(bool((t == t[0]).all()) for t in tensors)
    return last.tolist()


def test_async_calls(rank_pools):
    for last in rank_pools(3).run(async_calls):
        assert last == [3.0] * 5


def wide_gather_and_all_to_all() -> list[str]:
    """allgather_int64 wider than one slot (three rounds), and all_to_all with uneven split sizes (its
    sizes travel by allgather_int64) against gloo's all_to_all_single."""
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = commlab.Communicator(SharedMemoryTransport())
    failures = []
    send = torch.arange(70, dtype=torch.int64) + 1000 * rank
    out = torch.zeros(70 * world, dtype=torch.int64)
    comm.transport.allgather_int64(send, out, time.monotonic() + 30)
    if not torch.equal(out.view(world, 70), torch.stack([torch.arange(70) + 1000 * r for r in range(world)])):
        failures.append("allgather_int64 of 70 values")
    in_splits = [(rank + d) % 3 + 1 for d in range(world)]
    out_splits = [(s + rank) % 3 + 1 for s in range(world)]
    x = torch.arange(sum(in_splits), dtype=torch.float32) + 100 * rank
    got = torch.zeros(sum(out_splits))
    ref = torch.zeros(sum(out_splits))
    commlab.all_to_all(got, x, out_splits, in_splits, group=comm)
    dist.all_to_all_single(ref, x, out_splits, in_splits)
    if not torch.equal(got, ref):
        failures.append(f"all_to_all: {got.tolist()} != {ref.tolist()}")
    comm.transport.close()
    return failures


def test_wide_gather_and_all_to_all(rank_pools):
    failures = [f for per_rank in rank_pools(3).run(wide_gather_and_all_to_all) for f in per_rank]
    assert not failures, failures


def mismatch_and_timeout() -> tuple[str, str, str]:
    """A size mismatch (argument check on), then rank 0 alone in a call (timeout), then rank 1 told."""
    rank = dist.get_rank()
    comm = commlab.Communicator(SharedMemoryTransport(ring_bytes=4096), timeout=30)
    try:
        commlab.all_reduce(torch.ones(10 + rank), group=comm)
        mismatch = "no error"
    except CollectiveMismatchError as error:
        mismatch = str(error)
    if rank == 0:
        try:
            commlab.all_reduce(torch.ones(5), group=comm, timeout=1.0)
            outcome = "no error"
        except CollectiveTimeoutError as error:
            outcome = f"timeout: {error}"
    dist.barrier()  # rank 1 calls only after rank 0 gave up, and learns so at once
    if rank == 1:
        try:
            commlab.all_reduce(torch.ones(5), group=comm, timeout=30)
            outcome = "no error"
        except TransportError as error:
            outcome = f"transport: {error}"
    try:  # a failed transport stays failed
        commlab.all_reduce(torch.ones(5), group=comm, check=False)
        after = "no error"
    except TransportError as error:
        after = str(error)
    comm.transport.close()
    return mismatch, outcome, after


def test_mismatch_timeout_and_failed_peer(rank_pools):
    (m0, o0, a0), (m1, o1, a1) = rank_pools(2).run(mismatch_and_timeout)
    for mismatch in (m0, m1):
        assert "elements: rank 0: 10, rank 1: 11" in mismatch
    assert o0.startswith("timeout:") and "rank 1" in o0, o0
    assert o1.startswith("transport:") and "rank 0" in o1 and "gave up" in o1, o1
    assert "unusable" in a0 and "unusable" in a1


def mismatches_then_agreement(cma: bool) -> list[str]:
    """Disagreeing calls whose first step already sent data (streamed through 4 KiB rings or read by
    cma) raise CollectiveMismatchError on every rank; the data is dropped, so the next calls are right."""
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = commlab.Communicator(SharedMemoryTransport(ring_bytes=4096, cma=cma), timeout=30)
    odd = rank == 1
    cases = {
        "elements": lambda: commlab.all_reduce(torch.ones(50_000 + odd), algorithm="ring", group=comm),
        "algorithm": lambda: commlab.all_reduce(
            torch.ones(50_000), algorithm="direct" if odd else "ring", group=comm
        ),
        "collective": lambda: (
            commlab.broadcast(torch.ones(30_000), src=0, algorithm="direct", group=comm)
            if odd
            else commlab.reduce(torch.ones(30_000), dst=0, algorithm="direct", group=comm)
        ),
    }
    failures = []
    for field, call in cases.items():
        try:
            call()
            failures.append(f"{field}: no error on rank {rank}")
        except CollectiveMismatchError as error:
            if field not in str(error):
                failures.append(f"{field}: {error}")
    for numel in (10, 50_000):
        tensor = torch.full((numel,), float(rank + 1))
        commlab.all_reduce(tensor, algorithm="ring", group=comm)
        if not bool((tensor == world * (world + 1) / 2).all()):
            failures.append(f"after the mismatches, all_reduce of {numel}: {tensor[:3].tolist()}")
    comm.transport.close()
    return failures


@pytest.mark.parametrize("cma", [True, False])
def test_mismatch_drops_the_data_already_sent(rank_pools, cma):
    failures = [f for per_rank in rank_pools(3).run(mismatches_then_agreement, cma) for f in per_rank]
    assert not failures, failures


def unmatched_sizes() -> str:
    """Without the argument check, a message longer than its receive is caught by its header."""
    rank = dist.get_rank()
    comm = commlab.Communicator(SharedMemoryTransport(ring_bytes=4096), timeout=30, check=False)
    try:
        commlab.all_reduce(torch.ones(8 + 4 * rank), algorithm="direct", group=comm)
        outcome = "no error"
    except TransportError as error:
        outcome = str(error)
    comm.transport.close()
    return outcome


def test_unmatched_message_raises(rank_pools):
    outcomes = rank_pools(2).run(unmatched_sizes)
    assert any("different collectives" in o for o in outcomes), outcomes
    assert all(o != "no error" for o in outcomes), outcomes


def cleanup_and_selection(dead_pid: int) -> dict:
    """A stale segment of a dead creator is swept by the next transport; nothing stays in /dev/shm
    once every rank has joined the segment; close() marks the rank CLOSED; $COMMLAB_SHM selects (unset:
    on, checked in test_shm_join)."""
    rank = dist.get_rank()
    stale = seg.segment_path(dead_pid, 0xABC)
    if rank == 0:
        with open(stale, "wb") as out:
            out.write(b"x" * 64)
    dist.barrier()
    transport = SharedMemoryTransport()
    dist.barrier()  # the last rank to join unlinks the segment
    makers = [f"{seg.PREFIX}{pid}-" for pid in transport.pids]  # whichever rank made it
    ours = [n for n in os.listdir(seg.SHM_DIR) if any(n.startswith(m) for m in makers)]
    found = {"stale_left": os.path.exists(stale), "ours_left": ours}
    comm = commlab.Communicator(transport)
    values = torch.full((3,), float(rank))
    commlab.all_reduce(values, group=comm)
    found["sum"] = values.tolist()
    dist.barrier()
    transport.close()
    try:
        transport.post([], [])
        found["after_close"] = "no error"
    except TransportError as error:
        found["after_close"] = str(error)
    selected = {}
    for setting in ("1", "0"):
        os.environ["COMMLAB_SHM"] = setting
        group = dist.new_group(list(range(dist.get_world_size())))
        selected[setting] = type(commlab.communicator(group).transport).__name__
        commlab.release(group)
    os.environ["COMMLAB_SHM"] = "1"
    os.environ["COMMLAB_HOSTS"] = "2x1"  # emulated hosts: gloo between them, as before
    group = dist.new_group(list(range(dist.get_world_size())))
    selected["hosts"] = type(commlab.communicator(group).transport).__name__
    commlab.release(group)
    del os.environ["COMMLAB_SHM"], os.environ["COMMLAB_HOSTS"]
    found["selected"] = selected
    return found


def test_cleanup_and_selection(rank_pools):
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    dead_pid = int(child.stdout)  # exited and reaped: no such process (barring pid reuse)
    for found in rank_pools(2).run(cleanup_and_selection, dead_pid):
        assert not found["stale_left"], "the stale segment of a dead creator was not swept"
        assert found["ours_left"] == [], found["ours_left"]
        assert found["sum"] == [1.0, 1.0, 1.0]
        assert "closed" in found["after_close"]
        assert found["selected"] == {
            "1": "SharedMemoryTransport",
            "0": "TorchTransport",
            "hosts": "TorchTransport",
        }


def test_sweep_keeps_live_creators_segments():
    mine = seg.segment_path(os.getpid(), 0xDEF)
    with open(mine, "wb") as out:
        out.write(b"x")
    try:
        seg.sweep_stale()
        assert os.path.exists(mine)
    finally:
        seg.unlink(mine)


def test_env_switch_values():
    assert shm_enabled({"COMMLAB_SHM": "1"}) and not shm_enabled({"COMMLAB_SHM": "0"})
    with pytest.raises(InvalidArgumentError, match="COMMLAB_SHM"):
        shm_enabled({"COMMLAB_SHM": "yes"})


# ----- a rank that dies mid-collective: its own processes, since a dead rank breaks a pool's group -----


def _dying_rank(rank: int, store: str, results: mp.Queue) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
        )
        # 16 MB through 4 KiB rings (no cma): thousands of hand-offs between the two ranks, so rank 1
        # cannot finish its part in the 50 ms before it exits, whatever the load
        comm = commlab.Communicator(SharedMemoryTransport(ring_bytes=4096, cma=False), timeout=60)
        big = torch.ones(4_000_000)
        if rank == 1:
            commlab.all_reduce(big, group=comm, async_op=True)
            time.sleep(0.05)
            os._exit(3)  # no cleanup, no goodbye: as a crash
        start = time.monotonic()
        try:
            commlab.all_reduce(big, group=comm)
            results.put(("no error", 0.0))
        except (TransportError, CollectiveTimeoutError) as error:
            results.put((f"{type(error).__name__}: {error}", time.monotonic() - start))
    except BaseException as error:
        results.put((f"setup failed: {error}\n{traceback.format_exc()}", 0.0))
    results.close()
    results.join_thread()  # the answer is written before the exit below
    os._exit(0)  # the group's other member is gone: skip gloo's teardown


def test_dead_peer_raises_transport_error():
    context = mp.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory(prefix="commlab-shm-test-") as tmp:
        store = os.path.join(tmp, "store")
        procs = [context.Process(target=_dying_rank, args=(r, store, results)) for r in range(2)]
        for proc in procs:
            proc.start()
        try:
            message, _ = results.get(timeout=120)
        except queue.Empty:
            message = "no answer from rank 0 within 120 s"
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    # a TransportError, not a timeout: rank 0 noticed within its 60 s deadline that rank 1 is gone
    assert message.startswith("TransportError") and "rank 1" in message and "exited" in message, message


def test_needs_a_gloo_group():
    with pytest.raises(Exception, match="initialize"):
        SharedMemoryTransport()
