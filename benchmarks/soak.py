"""Soak test: thousands of random commlab collectives on 4 ranks, each checked against the native collective.

    python benchmarks/soak.py [--backend gloo|mpi] [--ranks 4] [--calls 2000] [--seed 0] [--timeout 30]
                              [--json out/soak-<backend>.json]

Every rank draws the same random sequence of calls (op, size, dtype, algorithm, reduction, root, async or
not) from a shared seed, runs each through commlab and through the transport's own collective on the same
data (gloo: torch.distributed's; mpi: MPI's on COMM_WORLD, the script restarting itself under `mpiexec -n
RANKS`), and counts mismatches and timeouts (a timeout is how a hang would show). Prints a summary per op.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import commlab
from commlab.collectives.algorithms import algorithms_for
from commlab.errors import CollectiveTimeoutError

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64]
TORCH_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
REDUCTIONS = list(TORCH_OPS)
OPS = ["allreduce", "reduce_scatter", "allgather", "broadcast", "reduce"]


def random_data(count: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        # Small integers in float dtypes: sums are exact, so any difference is a real error.
        return torch.randint(-8, 8, (count,), generator=g).to(dtype)
    return torch.randint(-1000, 1000, (count,), generator=g, dtype=dtype)


def draw(rng: random.Random, world: int) -> dict:
    """One random call: op, algorithm, dtype, reduction, element count, root, async or not."""
    op = rng.choice(OPS)
    return {
        "op": op,
        "algorithm": rng.choice(["auto", *algorithms_for(op)]),
        "dtype": rng.choice(DTYPES),
        "reduction": rng.choice(REDUCTIONS),
        "count": rng.choice([0, 1, 7, 100, 1023, 4096, 65537, rng.randint(1, 300_000)]),
        "root": rng.randrange(world),
        "async_op": rng.random() < 0.5,
    }


def output_for(call: dict, world: int) -> torch.Tensor:
    """An output buffer of the right size (filled with 77: a missed write shows)."""
    count = call["count"] * (world if call["op"] == "allgather" else 1)
    return torch.full((count,), 77, dtype=call["dtype"])


def run_commlab(call: dict, data: torch.Tensor, world: int, timeout: float) -> torch.Tensor:
    """The call through commlab; waits for an async call before returning (the native reference must not
    overlap commlab's point-to-point traffic on one gloo group)."""
    op, kwargs = (
        call["op"],
        {"algorithm": call["algorithm"], "async_op": call["async_op"], "timeout": timeout},
    )
    if op in ("allreduce", "broadcast", "reduce"):
        got = data.clone()
        if op == "allreduce":
            work = commlab.all_reduce(got, call["reduction"], **kwargs)
        elif op == "broadcast":
            work = commlab.broadcast(got, call["root"], **kwargs)
        else:
            work = commlab.reduce(got, call["root"], call["reduction"], **kwargs)
    else:
        got = output_for(call, world)
        if op == "allgather":
            work = commlab.all_gather(got, data, **kwargs)
        else:
            work = commlab.reduce_scatter(got, data, call["reduction"], **kwargs)
    if work is not None:
        work.wait()
    return got


def gloo_reference(call: dict, data: torch.Tensor, world: int) -> torch.Tensor:
    """What gloo's own collective (torch.distributed) computes on the same data."""
    op, reduction, root = call["op"], TORCH_OPS[call["reduction"]], call["root"]
    if op == "allgather":
        want = output_for(call, world)
        dist.all_gather_single(want, data)
    elif op == "reduce_scatter":
        want = output_for(call, world)
        dist.reduce_scatter_single(want, data, reduction)
    else:
        want = data.clone()
        if op == "allreduce":
            dist.all_reduce(want, reduction)
        elif op == "broadcast":
            dist.broadcast(want, root)
        else:
            dist.reduce(want, root, reduction)
    return want


def mpi_reference(call: dict, data: torch.Tensor, world: int) -> torch.Tensor:
    """What MPI's own collective (on MPI.COMM_WORLD) computes on the same data. float16 and bfloat16, which
    MPI cannot reduce, are reduced in float64 (exact: the data are small integers) and cast back."""
    from mpi4py import MPI

    comm, op, root = MPI.COMM_WORLD, call["op"], call["root"]
    wide = data.dtype in (torch.float16, torch.bfloat16)
    send = (data.double() if wide else data).numpy().copy()
    reduction = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}[call["reduction"]]
    if op == "allreduce":
        out = np.empty_like(send)
        comm.Allreduce(send, out, op=reduction)
    elif op == "reduce":
        out = send.copy()  # non-root ranks keep their data, as commlab's reduce does
        comm.Reduce(send, out if comm.Get_rank() == root else None, op=reduction, root=root)
    elif op == "reduce_scatter":
        out = np.empty(send.size // world, dtype=send.dtype)
        comm.Reduce_scatter_block(send, out, op=reduction)
    elif op == "allgather":
        out = np.empty(send.size * world, dtype=send.dtype)
        comm.Allgather(send, out)
    else:
        out = send
        comm.Bcast(out, root=root)
    return torch.from_numpy(out).to(data.dtype)


def one_call(
    rng: random.Random, rank: int, world: int, index: int, args: argparse.Namespace
) -> tuple[str, str]:
    """Draw and run call `index`; returns (op, outcome) with outcome ok, mismatch or timeout."""
    call = draw(rng, world)
    op = call["op"]
    data = random_data(
        call["count"] * (world if op == "reduce_scatter" else 1), call["dtype"], index * 1000 + rank
    )
    try:
        got = run_commlab(call, data, world, args.timeout)
    except CollectiveTimeoutError:
        return op, "timeout"
    want = (mpi_reference if args.backend == "mpi" else gloo_reference)(call, data, world)
    if op == "reduce" and rank != call["root"]:
        want = data  # torch leaves non-root buffers unspecified; commlab keeps them intact
    return op, "ok" if torch.equal(got, want) else "mismatch"


def run_calls(rank: int, world: int, args: argparse.Namespace) -> tuple[Counter, float]:
    """Every rank draws the same calls from the shared seed; returns its outcome counts and seconds."""
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    counts: Counter = Counter()
    start = time.perf_counter()
    for index in range(args.calls):
        op, outcome = one_call(rng, rank, world, index, args)
        counts[(op, outcome)] += 1
        if rank == 0 and (index + 1) % max(1, args.calls // 20) == 0:
            print(f"  {index + 1}/{args.calls} calls, {time.perf_counter() - start:.0f} s", flush=True)
    return counts, time.perf_counter() - start


def worker(rank: int, world: int, store: str, args: argparse.Namespace, results: mp.Queue) -> None:
    """A gloo rank (spawned by main)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    counts, seconds = run_calls(rank, world, args)
    results.put((rank, dict(counts), seconds))
    commlab.release()
    dist.destroy_process_group()


def run_gloo(args: argparse.Namespace) -> list[tuple[int, dict, float]]:
    context = mp.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [
            context.Process(target=worker, args=(r, args.ranks, f"{tmp}/store", args, results))
            for r in range(args.ranks)
        ]
        for p in procs:
            p.start()
        per_rank = [results.get(timeout=args.calls * args.timeout + 300) for _ in procs]
        for p in procs:
            p.join(timeout=30)
    return per_rank


def run_mpi_rank(args: argparse.Namespace) -> list[tuple[int, dict, float]] | None:
    """This MPI rank's share (under mpiexec); rank 0 gets every rank's results, the others None."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    counts, seconds = run_calls(comm.Get_rank(), comm.Get_size(), args)
    gathered = comm.gather((comm.Get_rank(), dict(counts), seconds), root=0)
    return gathered


def report(args: argparse.Namespace, per_rank: list[tuple[int, dict, float]]) -> int:
    """Print the summary table, write the JSON record; returns mismatches + timeouts."""
    total: Counter = Counter()
    for _, counts, _ in per_rank:
        total.update(counts)
    seconds = max(s for _, _, s in per_rank)
    ranks, native = len(per_rank), "MPI" if args.backend == "mpi" else "gloo"
    print(
        f"\n{args.calls} random collectives on {ranks} {args.backend} ranks in {seconds:.1f} s "
        f"(seed {args.seed}), each checked against {native}'s own collective"
    )
    print(f"{'op':>15} {'calls':>7} {'ok':>7} {'mismatch':>9} {'timeout':>8}   (summed over ranks)")
    for op in OPS:
        row = [total[(op, k)] for k in ("ok", "mismatch", "timeout")]
        print(f"{op:>15} {sum(row):>7} {row[0]:>7} {row[1]:>9} {row[2]:>8}")
    mismatches = sum(v for (_, k), v in total.items() if k == "mismatch")
    timeouts = sum(v for (_, k), v in total.items() if k == "timeout")
    print(f"mismatches {mismatches} (target 0), hangs/timeouts {timeouts} (target 0)")
    record = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "load_average": os.getloadavg(),
        },
        "torch": torch.__version__,
        "args": vars(args),
        "ranks": ranks,
        "seconds": seconds,
        "counts": {f"{op}/{k}": v for (op, k), v in total.items()},
        "mismatches": mismatches,
        "timeouts": timeouts,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return mismatches + timeouts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--backend", default="gloo", choices=["gloo", "mpi"], help="transport (default: gloo)"
    )
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=30.0, help="per-call timeout in seconds")
    parser.add_argument("--json", help="result file (default: out/soak-<backend>.json)")
    args = parser.parse_args()
    if args.ranks < 1 or args.calls < 1 or not args.timeout > 0:
        parser.error("--ranks and --calls must be >= 1 and --timeout > 0")
    args.json = args.json or f"out/soak-{args.backend}.json"
    if args.backend == "gloo":
        failures = report(args, run_gloo(args))
    elif "PMI_RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ:  # a rank under mpiexec
        per_rank = run_mpi_rank(args)
        failures = report(args, per_rank) if per_rank is not None else 0
    else:  # start the ranks: this script again under mpiexec
        from commlab.bench.launch import find_mpiexec

        command = [find_mpiexec(), "-n", str(args.ranks), sys.executable, __file__, *sys.argv[1:]]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        raise SystemExit(subprocess.call(command, env=env))
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
