"""The collectives' correctness suite on the MPI transport, run under `mpiexec -n N` by tests/test_mpi.py.

    mpiexec -n 4 python -m tests.mpi_suite [--reduced | --quick]

Every collective x algorithm x dtype x reduction x size is compared with MPI's own collective (Allreduce,
Reduce_scatter_block, Allgather, Bcast, Reduce) on the same data (`--reduced`: four dtypes and three
sizes; `--quick`: two dtypes); then large sliced messages, layouts, numpy arrays, async handles,
sub-communicators, argument mismatches, an absent peer and (2 ranks) an unchecked size mismatch. Rank 0
prints one line `MPI_SUITE {json}` with every rank's failures; the exit status is 0 whenever the suite
itself ran.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch
from mpi4py import MPI

import commlab
from commlab.collectives.algorithms import algorithms_for
from commlab.collectives.mpi import MPITransport
from commlab.errors import CollectiveMismatchError, CollectiveTimeoutError, CommlabError, InvalidArgumentError
from tests.test_collectives import DTYPES, make_data, reduce_ops_for

MPI_OPS = {"sum": MPI.SUM, "avg": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN, "prod": MPI.PROD}
# dtypes MPI reduces natively; float16 and bfloat16 are referenced in float64 (exact for small integers)
NATIVE = {torch.float32, torch.float64, torch.int32, torch.int64, torch.uint8, torch.int8}
KINDS = ("allreduce", "reduce_scatter", "allgather", "broadcast", "reduce")


def _as_numpy(x: torch.Tensor) -> np.ndarray:
    return (x if x.dtype in NATIVE else x.to(torch.float64)).numpy().copy()


def reference(comm, kind: str, x: torch.Tensor, op: str, root: int) -> torch.Tensor:
    """What MPI's own collective computes on `x` (cast back to x's dtype)."""
    world = comm.Get_size()
    send = _as_numpy(x.reshape(-1))
    if kind == "allreduce":
        out = np.empty_like(send)
        comm.Allreduce(send, out, op=MPI_OPS[op])
    elif kind == "reduce":
        out = np.empty_like(send)
        comm.Reduce(send, out, op=MPI_OPS[op], root=root)
    elif kind == "reduce_scatter":
        out = np.empty(send.size // world, dtype=send.dtype)
        comm.Reduce_scatter_block(send, out, op=MPI_OPS[op])
    elif kind == "allgather":
        out = np.empty(send.size * world, dtype=send.dtype)
        comm.Allgather(send, out)
    else:
        out = send
        comm.Bcast(out, root=root)
    ref = torch.from_numpy(out)
    if op == "avg":
        ref = ref / world
    return ref.to(x.dtype)


def run_commlab(kind: str, x: torch.Tensor, op: str, root: int, algorithm: str, world: int, rank: int):
    if kind == "allreduce":
        out = x.clone()
        commlab.all_reduce(out, op=op, algorithm=algorithm)
    elif kind == "reduce":
        out = x.clone()
        commlab.reduce(out, root, op=op, algorithm=algorithm)
        assert rank == root or torch.equal(out, x), "reduce changed a non-root rank's tensor"
    elif kind == "reduce_scatter":
        out = torch.full((x.numel() // world,), 77, dtype=x.dtype)
        commlab.reduce_scatter(out, x, op=op, algorithm=algorithm)
    elif kind == "allgather":
        out = torch.full((x.numel() * world,), 77, dtype=x.dtype)
        commlab.all_gather(out, x, algorithm=algorithm)
    else:
        out = x.clone() if rank == root else torch.full_like(x, 77)
        commlab.broadcast(out, root, algorithm=algorithm)
    return out


def against_mpi(comm, sizes: list[int], dtypes: list[torch.dtype], full_ops: bool) -> list[str]:
    """Every op x algorithm x dtype x size against MPI's collective; the failures, described."""
    rank, world = comm.Get_rank(), comm.Get_size()
    failures = []
    for kind in KINDS:
        for dtype in dtypes:
            reducing = kind in ("allreduce", "reduce_scatter", "reduce")
            for op in reduce_ops_for(dtype, full_ops) if reducing else ["-"]:
                for size in sizes:
                    root = (size + 1) % world
                    numel = size * world if kind == "reduce_scatter" else size
                    x = make_data((numel,), dtype, op, 1000 * rank + size + world)
                    ref = reference(comm, kind, x, op, root)
                    for algorithm in ["auto", *algorithms_for(kind)]:
                        got = run_commlab(kind, x, op, root, algorithm, world, rank).reshape(-1)
                        if kind == "reduce" and rank != root:
                            continue
                        if not torch.equal(got, ref.reshape(-1)):
                            bad = int((got != ref.reshape(-1)).sum())
                            failures.append(
                                f"{kind} {algorithm} {dtype} op={op} n={size} root={root}: {bad} wrong"
                            )
    return failures


def sliced(comm) -> list[str]:
    """Chunks sliced into pieces (a communicator with 16 KiB pieces), every op and algorithm, odd sizes."""
    rank, world = comm.Get_rank(), comm.Get_size()
    root = 1 % world
    small_pieces = commlab.Communicator(MPITransport(comm), piece_bytes=1 << 14)
    failures = []
    for kind in KINDS:
        numel = 100_003 * (world if kind == "reduce_scatter" else 1)
        x = torch.randn(numel, generator=torch.Generator().manual_seed(rank))
        ref = reference(comm, kind, x, "sum", root).reshape(-1)
        for algorithm in algorithms_for(kind):
            out = on_communicator(small_pieces, kind, x, algorithm, world, root)
            if kind == "reduce" and rank != root:
                continue
            if not torch.allclose(out, ref, rtol=1e-5, atol=1e-5):
                failures.append(f"sliced {kind} {algorithm}: max error {float((out - ref).abs().max())}")
    return failures


def on_communicator(comm, kind: str, x: torch.Tensor, algorithm: str, world: int, root: int) -> torch.Tensor:
    """One collective on an explicit commlab communicator; its result."""
    if kind == "allreduce":
        out = x.clone()
        commlab.all_reduce(out, group=comm, algorithm=algorithm)
    elif kind == "reduce_scatter":
        out = torch.empty(x.numel() // world)
        commlab.reduce_scatter(out, x, group=comm, algorithm=algorithm)
    elif kind == "allgather":
        out = torch.empty(x.numel() * world)
        commlab.all_gather(out, x, group=comm, algorithm=algorithm)
    elif kind == "broadcast":
        out = x.clone()
        commlab.broadcast(out, root, group=comm, algorithm=algorithm)
    else:
        out = x.clone()
        commlab.reduce(out, root, group=comm, algorithm=algorithm)
    return out


def layouts_numpy_async(comm) -> list[str]:
    """Non-contiguous tensors, zero elements, numpy arrays in place, async handles on the worker thread."""
    rank, world = comm.Get_rank(), comm.Get_size()
    total = sum(range(1, world + 1))
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10) * (rank + 1)
    strided = base[:, ::3]
    expected = strided * total / (rank + 1)
    commlab.all_reduce(strided)
    torch.testing.assert_close(strided, expected)
    empty = torch.empty(0, 3)
    commlab.all_reduce(empty)
    array = np.full(1001, rank + 1, dtype=np.float64)
    commlab.all_reduce(array, op="sum")
    assert (array == total).all(), "numpy all_reduce did not update the array in place"
    gathered = np.zeros(world * 3, dtype=np.int32)
    commlab.all_gather(gathered, np.full(3, rank, dtype=np.int32))
    assert (gathered == np.repeat(np.arange(world), 3)).all(), gathered
    tensors = [torch.full((50_000,), float(rank + i)) for i in range(4)]
    works = [
        commlab.all_reduce(t, algorithm=a, async_op=True)
        for t, a in zip(tensors, ["ring", "tree", "halving_doubling", "direct"], strict=True)
    ]
    last = torch.full((10,), float(rank))
    commlab.all_reduce(last)  # a sync call queued behind the async ones
    assert all(w.is_completed() for w in works), "a sync call returned before earlier async work finished"
    for i, (work, tensor) in enumerate(zip(works, tensors, strict=True)):
        assert work.wait(timeout=60) is True
        assert torch.equal(tensor, torch.full((50_000,), float(sum(r + i for r in range(world)))))
    return []


def sub_communicators(comm) -> list[str]:
    """Collectives on a Split communicator; src/dst are COMM_WORLD ranks, as in torch.distributed."""
    rank = comm.Get_rank()
    sub = comm.Split(rank % 2, rank)
    members = [r for r in range(comm.Get_size()) if r % 2 == rank % 2]
    x = torch.full((1000,), float(rank))
    commlab.all_reduce(x, group=sub, algorithm="ring")
    assert torch.equal(x, torch.full((1000,), float(sum(members)))), (x[:3], members)
    y = torch.full((7,), float(rank))
    commlab.broadcast(y, src=members[-1], group=sub)
    assert torch.equal(y, torch.full((7,), float(members[-1])))
    outsider = next((r for r in range(comm.Get_size()) if r not in members), None)
    if outsider is not None:
        try:
            commlab.broadcast(y, src=outsider, group=sub)
        except InvalidArgumentError as error:
            assert "a rank of this group" in str(error), error
        else:
            raise AssertionError("a src outside the sub-communicator was accepted")
    return []


def mismatches(comm) -> list[str]:
    """Rank 1 disagrees on one argument at a time: every rank raises CollectiveMismatchError naming it."""
    rank = comm.Get_rank()
    odd = rank == 1
    failures = []
    cases = {
        "elements": lambda: commlab.all_reduce(torch.ones(10 + odd)),
        "dtype": lambda: commlab.all_reduce(torch.ones(10, dtype=torch.float64 if odd else torch.float32)),
        "reduce op": lambda: commlab.all_reduce(torch.ones(10), op="max" if odd else "sum"),
        "algorithm": lambda: commlab.all_reduce(torch.ones(10), algorithm="tree" if odd else "ring"),
        "root": lambda: commlab.broadcast(torch.ones(10), src=1 if odd else 0),
        "collective": lambda: (
            commlab.broadcast(torch.ones(10_000), src=0, algorithm="direct")
            if odd
            else commlab.reduce(torch.ones(10_000), dst=0, algorithm="direct")
        ),
        # long messages (MPI's rendezvous protocol) already posted when the ranks learn they disagree
        "algorithm, long": lambda: commlab.all_reduce(
            torch.ones(100_000), algorithm="halving_doubling" if odd else "ring"
        ),
    }
    for case, call in cases.items():
        field = case.split(",")[0]
        try:
            call()
        except CollectiveMismatchError as error:
            if field not in str(error) or "rank 1" not in str(error):
                failures.append(f"mismatch {case}: message {error}")
        else:
            failures.append(f"mismatch {case}: no error on rank {rank}")
    # the data a mismatched call had posted was drained: the next calls run as if nothing happened
    for numel in (10, 100_000):
        tensor = torch.full((numel,), float(rank + 1))
        commlab.all_reduce(tensor, algorithm="ring")
        want = comm.Get_size() * (comm.Get_size() + 1) / 2
        if not bool((tensor == want).all()):
            failures.append(f"after the mismatches: all_reduce of {numel} gave {tensor[:3].tolist()}")
    return failures


def replays(comm) -> list[str]:
    """Repeated blocking calls replay their kept call (persistent requests started again): each repeat sees
    its inputs anew, and a rank that changes an argument while the other replays is caught on both."""
    rank, world = comm.Get_rank(), comm.Get_size()
    communicator = commlab.communicator(None)
    failures = []
    base = float(sum(range(world)))
    for numel in (10, 100_000):  # eager and rendezvous messages
        tensor, block, gathered = torch.zeros(numel), torch.zeros(numel), torch.zeros(world * numel)
        for i in range(3):
            tensor.fill_(rank + i)
            commlab.all_reduce(tensor, algorithm="ring")
            if not bool((tensor == base + world * i).all()):
                failures.append(f"replayed all_reduce {numel} call {i}: {tensor[:3].tolist()}")
            block.fill_(rank * 10 + i)
            commlab.all_gather(gathered, block)
            want = torch.tensor([r * 10.0 + i for r in range(world)]).repeat_interleave(numel)
            if not torch.equal(gathered, want):
                failures.append(f"replayed all_gather {numel} call {i}: {gathered[::numel].tolist()}")
    if not communicator._replays:
        failures.append("no call was kept for replay")
    if world > 1:
        for numel in (10, 100_000):
            tensor = torch.ones(numel)
            commlab.all_reduce(tensor, algorithm="ring")
            try:
                commlab.all_reduce(tensor, algorithm="halving_doubling" if rank == 1 else "ring")
            except CollectiveMismatchError as error:
                if "algorithm" not in str(error):
                    failures.append(f"mismatch on replay {numel}: message {error}")
            else:
                failures.append(f"mismatch on replay {numel}: no error on rank {rank}")
            tensor.fill_(1.0)
            commlab.all_reduce(tensor, algorithm="ring")  # the drained mismatch leaves the replay usable
            if not bool((tensor == world).all()):
                failures.append(f"replay after a mismatch {numel}: {tensor[:3].tolist()}")
    return failures


def absent_peer(comm) -> list[str]:
    """Rank 1 joins late; rank 0 must time out within its timeout, naming the collective and the peer."""
    rank = comm.Get_rank()
    private = commlab.Communicator(MPITransport(comm))  # a timeout leaves a communicator unusable
    if rank == 1:
        time.sleep(1.5)
    if rank > 1:
        return []
    start = time.monotonic()
    try:
        commlab.all_reduce(torch.ones(1000), algorithm="ring", group=private, timeout=0.5)
    except CollectiveTimeoutError as error:
        elapsed = time.monotonic() - start
        if rank == 0 and ("all_reduce" not in str(error) or "timeout 0.5 s" not in str(error) or elapsed > 3):
            return [f"absent peer: {error} after {elapsed:.1f} s"]
        return []
    except CommlabError as error:
        return [] if rank == 1 else [f"absent peer: {type(error).__name__}: {error}"]
    return [] if rank == 1 else ["absent peer: no error"]


def late_transport(comm) -> list[str]:
    """Rank 1 makes its transport late: rank 0's making one times out with a clear error (no crash)."""
    rank = comm.Get_rank()
    outcome = []
    if rank == 0:
        try:
            MPITransport(comm, timeout=0.5)
            outcome = ["late transport: no error on rank 0"]
        except CollectiveTimeoutError as error:
            if "every rank of the communicator must create it" not in str(error):
                outcome = [f"late transport: {error}"]
    else:
        time.sleep(1.5)
        # its duplication meets rank 0's abandoned one; what follows may time out
        with contextlib.suppress(CollectiveTimeoutError):
            MPITransport(comm, timeout=1.0)
    comm.Barrier()
    return outcome


def unchecked_mismatch(comm) -> list[str]:
    """With the argument check off, sizes that differ end in an error (MPI_ERR_TRUNCATE or a timeout)."""
    rank = comm.Get_rank()
    private = commlab.Communicator(MPITransport(comm), check=False)
    try:
        commlab.all_reduce(torch.ones(1000 + 500 * rank), algorithm="ring", group=private, timeout=1)
    except CommlabError as error:
        if rank == 0 and "truncat" not in str(error).lower():
            return [f"unchecked mismatch: rank 0 got {type(error).__name__}: {error}"]
        return []
    return ["unchecked mismatch: no error"]


def main() -> None:
    quick = "--quick" in sys.argv
    reduced = "--reduced" in sys.argv
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    torch.set_num_threads(1)
    sizes = [1, 67, 1000] if reduced else [0, 1, 5, 67, 1000]
    dtypes = DTYPES
    if quick:
        dtypes = [torch.float32, torch.int64]
    elif reduced:
        dtypes = [torch.float32, torch.bfloat16, torch.int64, torch.uint8]
    parts = [
        ("against MPI", lambda: against_mpi(comm, sizes, dtypes, full_ops=not quick)),
        ("sliced", lambda: sliced(comm)),
        ("layouts, numpy, async", lambda: layouts_numpy_async(comm)),
        ("sub-communicators", lambda: sub_communicators(comm)),
        ("mismatches", lambda: mismatches(comm) if world > 1 else []),
        ("replays", lambda: replays(comm)),
        ("absent peer", lambda: absent_peer(comm) if world > 1 else []),
        ("unchecked mismatch", lambda: unchecked_mismatch(comm) if world == 2 else []),
        ("late transport", lambda: late_transport(comm) if world == 2 else []),
    ]
    only = [a.removeprefix("--only=") for a in sys.argv if a.startswith("--only=")]
    if only:  # e.g. --only=mismatches: one part, for work on it
        parts = [(name, part) for name, part in parts if name in only]
    failures, timings = [], {}
    for name, part in parts:
        start = time.monotonic()
        try:
            failures += [f"{name}: {f}" for f in part()]
        except Exception as error:  # report and go on: one broken part must not hide the others
            failures.append(f"{name}: {type(error).__name__}: {error}\n{traceback.format_exc()}")
        timings[name] = round(time.monotonic() - start, 2)
    everything = comm.gather(failures, root=0)
    if rank == 0:
        report = {"world_size": world, "failures": [f for per_rank in everything for f in per_rank]}
        print("MPI_SUITE " + json.dumps({**report, "seconds": timings}), flush=True)


if __name__ == "__main__":
    main()
