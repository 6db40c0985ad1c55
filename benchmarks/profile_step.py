"""Where one commlab allreduce spends its time, phase by phase, next to the native collective.

    python benchmarks/profile_step.py --backend mpi -n 2 --sizes 4K,1M,16M [--algorithm auto]

Starts its own ranks (mpiexec, or local gloo processes). Each rank times every call's phases by wrapping
the executor's functions: the argument check (a native allgather), posting a step's transfers (views,
gathers into scratch, the transport's post), waiting for them (the transfer itself), applying the
reductions, and the rest (argument validation, planning, Python between phases). Rank 0 prints the
median per phase over --calls calls, rank 0's view; the native collective's median time is the reference.
The check is a call's first wait for its peers (on MPI and shared memory it is waited for right after
step 0 is posted), so its column also holds whatever time rank 0 spends waiting for the slowest peer to
arrive: the skew between ranks, which load makes large.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict

PHASES = ("check", "post", "wait", "apply", "other")


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def instrument(totals: dict[str, float]) -> None:
    """Wrap the executor's post/apply, the transports' waits and the argument check with timers."""
    from commlab.collectives import communicator, executor, mpi, shm, transport

    inside_check = [False]

    def timed(phase: str, fn):
        def wrapper(*args, **kwargs):
            if inside_check[0]:  # the check's own waits belong to the check
                return fn(*args, **kwargs)
            inside_check[0] = phase == "check"
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[phase] += time.perf_counter() - start
                inside_check[0] = False

        return wrapper

    executor._post = timed("post", executor._post)
    executor._apply = timed("apply", executor._apply)
    executor.wait_all = timed("wait", executor.wait_all)  # gloo: the generic per-request wait
    mpi.MPITransport.wait_all = timed("wait", mpi.MPITransport.wait_all)
    transport.wait_all = executor.wait_all
    communicator.Communicator.check_signature = timed("check", communicator.Communicator.check_signature)
    for module in (mpi, shm):  # the check beside the first step: starting it and waiting for it
        module.SignatureExchange.start = timed("check", module.SignatureExchange.start)
        module.SignatureExchange.finish = timed("check", module.SignatureExchange.finish)
    shm.SharedMemoryTransport.wait_all = timed("wait", shm.SharedMemoryTransport.wait_all)


def rank_main(args: argparse.Namespace) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    import commlab

    torch.set_num_threads(1)
    if args.backend == "mpi":
        from mpi4py import MPI

        world = MPI.COMM_WORLD
        rank, size, barrier = world.Get_rank(), world.Get_size(), world.Barrier
        group = world

        def native(x: torch.Tensor) -> None:
            world.Allreduce(MPI.IN_PLACE, x.numpy())

    else:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank, size, barrier, group = dist.get_rank(), dist.get_world_size(), dist.barrier, None

        def native(x: torch.Tensor) -> None:
            dist.all_reduce(x)

    totals: dict[str, float] = defaultdict(float)
    instrument(totals)
    comm = commlab.communicator(group)
    if rank == 0:
        print(
            f"# allreduce float32 on {size} {args.backend} ranks: median over {args.calls} calls (us), rank 0"
        )
        print(
            f"# {'size':>9} {'algorithm':>20} {'native':>8} {'commlab':>8}  "
            + " ".join(f"{p:>7}" for p in PHASES)
        )
    for size_bytes in (parse_size(s) for s in args.sizes.split(",")):
        x = torch.ones(size_bytes // 4)
        resolved = args.algorithm
        if resolved == "auto":
            from commlab.collectives.tuning import resolve

            resolved = resolve(
                "allreduce", "auto", size, size_bytes, comm.cost_model, comm.piece_bytes
            ).algorithm
        phases = defaultdict(list)
        native_times, totals_list = [], []
        for _ in range(args.warmup):
            commlab.all_reduce(x, group=comm, algorithm=args.algorithm)
            native(x)
        for _ in range(args.calls):
            barrier()
            start = time.perf_counter()
            native(x)
            native_times.append(time.perf_counter() - start)
            barrier()
            totals.clear()
            start = time.perf_counter()
            commlab.all_reduce(x, group=comm, algorithm=args.algorithm)
            total = time.perf_counter() - start
            totals_list.append(total)
            for phase in PHASES[:-1]:
                phases[phase].append(totals.get(phase, 0.0))
            phases["other"].append(total - sum(totals.get(p, 0.0) for p in PHASES[:-1]))
        if rank == 0:
            cells = " ".join(f"{statistics.median(phases[p]) * 1e6:>7.1f}" for p in PHASES)
            print(
                f"  {size_bytes:>9} {resolved:>20} {statistics.median(native_times) * 1e6:>8.1f}"
                f" {statistics.median(totals_list) * 1e6:>8.1f}  {cells}",
                flush=True,
            )
    if args.backend != "mpi":
        dist.destroy_process_group()  # stop gloo's threads before interpreter exit


def launch(args: argparse.Namespace) -> int:
    here = os.path.abspath(__file__)
    argv = [sys.executable, here, "--rank-main", *sys.argv[1:]]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if args.backend == "mpi":
        from commlab.bench.launch import find_mpiexec

        return subprocess.call([find_mpiexec(), "-n", str(args.ranks), *argv], env=env)
    from commlab.bench.launch import free_port, wait_for

    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(args.ranks))
    procs = [
        subprocess.Popen(argv, env=dict(env, RANK=str(r)), stdout=None if r == 0 else subprocess.DEVNULL)
        for r in range(args.ranks)
    ]
    return wait_for(procs)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["gloo", "mpi"], default="mpi")
    parser.add_argument("-n", "--ranks", type=int, default=2)
    parser.add_argument("--sizes", default="4K,64K,1M,16M")
    parser.add_argument("--algorithm", default="auto")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_main:
        rank_main(args)
        return 0
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
