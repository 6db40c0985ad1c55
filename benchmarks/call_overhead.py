"""Python CPU time of one commlab call outside its waits, on MPI or shared memory, check on and off.

    mpiexec -n 2 python benchmarks/call_overhead.py [--bytes 4096] [--algorithm recursive_doubling]
    mpiexec -n 2 python benchmarks/call_overhead.py --transport shm

`--transport shm`: the ranks (still started by mpiexec) make a gloo group and commlab runs on the
shared-memory transport; the CPU time inside its polls is subtracted, and gloo's allreduce is the
native row. So the check's own Python is measured on either transport, and CPU time makes the
comparison hold on a loaded machine, where wall-clock ratios do not.

Rank 0 times `commlab.all_reduce` with `time.thread_time` (CPU time of the calling thread: a rank that
is preempted on a loaded machine does not count the time it waits for a core) and subtracts the CPU time
spent inside the MPI transport's waits, so what is left is the call path's own Python: validation,
planning, posting, reductions, the argument check's bookkeeping. Check on and off are interleaved, the
median of --repeats samples is printed, with MPI_Allreduce's CPU time per call for scale (its own
polling included: it waits inside the call). Run it on two trees (PYTHONPATH) to compare versions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
from mpi4py import MPI

import commlab
from commlab.collectives import mpi, shm


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bytes", type=int, default=4096)
    parser.add_argument("--algorithm", default="recursive_doubling")
    parser.add_argument("--calls", type=int, default=300, help="calls per sample")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--transport", choices=["mpi", "shm"], default="mpi")
    args = parser.parse_args()
    torch.set_num_threads(1)
    world = MPI.COMM_WORLD
    waiting = [0.0]
    if args.transport == "shm":
        group = _shared_memory_group(world)
        waits = (shm.SharedMemoryTransport, "_poll")  # every wait of the transport goes through it
    else:
        group = None
        waits = (mpi.MPITransport, "wait_all")
    wait_all = getattr(*waits)

    def timed_wait(self, *rest):
        start = time.thread_time()
        try:
            return wait_all(self, *rest)
        finally:
            waiting[0] += time.thread_time() - start

    setattr(*waits, timed_wait)
    tensor = torch.ones(args.bytes // 4)
    out = torch.empty_like(tensor)
    kwargs = {"algorithm": args.algorithm, "group": group}
    variants = {
        "check on": lambda: commlab.all_reduce(tensor, check=True, **kwargs),
        "check off": lambda: commlab.all_reduce(tensor, check=False, **kwargs),
    }
    if args.transport == "shm":
        variants["gloo allreduce"] = lambda: dist.all_reduce(out)
    else:
        variants["MPI_Allreduce"] = lambda: world.Allreduce(tensor.numpy(), out.numpy())
    for call in variants.values():
        for _ in range(50):
            call()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, call in variants.items():
            world.Barrier()
            waiting[0] = 0.0
            start = time.thread_time()
            for _ in range(args.calls):
                call()
            spent = time.thread_time() - start - waiting[0]
            samples[name].append(spent / args.calls * 1e6)
    if world.Get_rank() == 0:
        print(
            f"# {args.bytes} bytes, {args.algorithm}, {world.Get_size()} ranks, {args.transport}: "
            f"CPU us per call outside waits; load {os.getloadavg()[0]:.2f}"
        )
        for name, values in samples.items():
            print(
                f"  {name:>14} {statistics.median(values):8.1f}"
                f"  (samples {min(values):.1f}-{max(values):.1f})"
            )
        on, off = statistics.median(samples["check on"]), statistics.median(samples["check off"])
        print(f"  check on / off {on / off:.2f}")
    if args.transport == "shm":
        commlab.release()
        dist.destroy_process_group()


def _shared_memory_group(world) -> dist.ProcessGroup:
    """A gloo group over the mpiexec ranks (a file store named by rank 0), with commlab on shared memory."""
    os.environ["COMMLAB_SHM"] = "1"
    path = world.bcast(tempfile.mktemp(prefix="commlab-call-overhead-") if world.Get_rank() == 0 else None)
    dist.init_process_group(
        "gloo", init_method=f"file://{path}", rank=world.Get_rank(), world_size=world.Get_size()
    )
    group = dist.group.WORLD
    if type(commlab.communicator(group).transport).__name__ != "SharedMemoryTransport":
        raise SystemExit("commlab did not pick the shared-memory transport (is /dev/shm there?)")
    return group


if __name__ == "__main__":
    main()
