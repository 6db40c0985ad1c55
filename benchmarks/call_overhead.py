"""Python CPU time of one commlab call outside its waits, on MPI, with the argument check on and off.

    mpiexec -n 2 python benchmarks/call_overhead.py [--bytes 4096] [--algorithm recursive_doubling]

Rank 0 times `commlab.all_reduce` with `time.thread_time` (CPU time of the calling thread: a rank that
is preempted on a loaded machine does not count the time it waits for a core) and subtracts the CPU time
spent inside the MPI transport's waits, so what is left is the call path's own Python: validation,
planning, posting, reductions, the argument check's bookkeeping. Check on and off are interleaved, the
median of --repeats samples is printed, with MPI_Allreduce's CPU time per call for scale (its own
polling included: it waits inside the call). Run it on two trees (PYTHONPATH) to compare versions.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from mpi4py import MPI

import commlab
from commlab.collectives import mpi


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bytes", type=int, default=4096)
    parser.add_argument("--algorithm", default="recursive_doubling")
    parser.add_argument("--calls", type=int, default=300, help="calls per sample")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    world = MPI.COMM_WORLD
    waiting = [0.0]
    wait_all = mpi.MPITransport.wait_all

    def timed_wait(self, *rest):
        start = time.thread_time()
        try:
            return wait_all(self, *rest)
        finally:
            waiting[0] += time.thread_time() - start

    mpi.MPITransport.wait_all = timed_wait
    tensor = torch.ones(args.bytes // 4)
    out = torch.empty_like(tensor)
    variants = {
        "check on": lambda: commlab.all_reduce(tensor, algorithm=args.algorithm, check=True),
        "check off": lambda: commlab.all_reduce(tensor, algorithm=args.algorithm, check=False),
        "MPI_Allreduce": lambda: world.Allreduce(tensor.numpy(), out.numpy()),
    }
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
            f"# {args.bytes} bytes, {args.algorithm}, {world.Get_size()} ranks: CPU us per call outside waits"
        )
        for name, values in samples.items():
            print(
                f"  {name:>14} {statistics.median(values):8.1f}"
                f"  (samples {min(values):.1f}-{max(values):.1f})"
            )


if __name__ == "__main__":
    main()
