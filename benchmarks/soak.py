"""Soak test: thousands of random commlab collectives on 4 gloo ranks, each checked against torch.distributed.

    python benchmarks/soak.py [--ranks 4] [--calls 2000] [--seed 0] [--timeout 30] [--json out/soak.json]

Every rank draws the same random sequence of calls (op, size, dtype, algorithm, reduction, root, async or
not) from a shared seed, runs each through commlab and through gloo's own collective on the same data, and
counts mismatches and timeouts (a timeout is how a hang would show). Prints a summary per op and overall.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import commlab
from commlab.collectives.algorithms import algorithms_for
from commlab.errors import CollectiveTimeoutError

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64]
TORCH_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
OPS = ["allreduce", "reduce_scatter", "allgather", "broadcast", "reduce"]


def random_data(count: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        # Small integers in float dtypes: sums are exact, so any difference is a real error.
        return torch.randint(-8, 8, (count,), generator=g).to(dtype)
    return torch.randint(-1000, 1000, (count,), generator=g, dtype=dtype)


def finish(work) -> None:
    """Wait for an async commlab call before the native reference runs on the same group: gloo's own
    collectives must not run concurrently with commlab's point-to-point traffic on one ProcessGroup."""
    if work is not None:
        work.wait()


def one_call(rng: random.Random, rank: int, world: int, index: int, timeout: float) -> tuple[str, str]:
    """Draw and run call `index`; returns (op, outcome) with outcome ok, mismatch or timeout."""
    op = rng.choice(OPS)
    algorithm = rng.choice(["auto", *algorithms_for(op)])
    dtype = rng.choice(DTYPES)
    reduction = rng.choice(list(TORCH_OPS))
    count = rng.choice([0, 1, 7, 100, 1023, 4096, 65537, rng.randint(1, 300_000)])
    root = rng.randrange(world)
    async_op = rng.random() < 0.5
    data = random_data(count * (world if op == "reduce_scatter" else 1), dtype, index * 1000 + rank)
    try:
        if op == "allreduce":
            got, want = data.clone(), data.clone()
            work = commlab.all_reduce(got, reduction, algorithm=algorithm, async_op=async_op, timeout=timeout)
            finish(work)
            dist.all_reduce(want, TORCH_OPS[reduction])
        elif op == "reduce_scatter":
            got, want = torch.empty(count, dtype=dtype), torch.empty(count, dtype=dtype)
            work = commlab.reduce_scatter(
                got, data, reduction, algorithm=algorithm, async_op=async_op, timeout=timeout
            )
            finish(work)
            dist.reduce_scatter_single(want, data, TORCH_OPS[reduction])
        elif op == "allgather":
            got, want = torch.empty(count * world, dtype=dtype), torch.empty(count * world, dtype=dtype)
            work = commlab.all_gather(got, data, algorithm=algorithm, async_op=async_op, timeout=timeout)
            finish(work)
            dist.all_gather_single(want, data)
        elif op == "broadcast":
            got, want = data.clone(), data.clone()
            work = commlab.broadcast(got, root, algorithm=algorithm, async_op=async_op, timeout=timeout)
            finish(work)
            dist.broadcast(want, root)
        else:
            got, want = data.clone(), data.clone()
            work = commlab.reduce(
                got, root, reduction, algorithm=algorithm, async_op=async_op, timeout=timeout
            )
            finish(work)
            dist.reduce(want, root, TORCH_OPS[reduction])
            if rank != root:
                want = data  # torch leaves non-root buffers unspecified; commlab keeps them intact
    except CollectiveTimeoutError:
        return op, "timeout"
    return op, "ok" if torch.equal(got, want) else "mismatch"


def worker(rank: int, world: int, store: str, args: argparse.Namespace, results: mp.Queue) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    rng = random.Random(args.seed)  # the same sequence on every rank
    counts: Counter = Counter()
    start = time.perf_counter()
    for index in range(args.calls):
        op, outcome = one_call(rng, rank, world, index, args.timeout)
        counts[(op, outcome)] += 1
        if rank == 0 and (index + 1) % max(1, args.calls // 20) == 0:
            print(f"  {index + 1}/{args.calls} calls, {time.perf_counter() - start:.0f} s", flush=True)
    flags = torch.tensor([counts[(op, "mismatch")] + counts[(op, "timeout")] for op in OPS])
    dist.all_reduce(flags)  # any rank's failure counts
    results.put((rank, dict(counts), time.perf_counter() - start))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=30.0, help="per-call timeout in seconds")
    parser.add_argument("--json", default="out/soak.json")
    args = parser.parse_args()
    if args.ranks < 1 or args.calls < 1:
        parser.error("--ranks and --calls must be >= 1")
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
    total: Counter = Counter()
    for _, counts, _ in per_rank:
        total.update(counts)
    seconds = max(s for _, _, s in per_rank)
    print(
        f"\n{args.calls} random collectives on {args.ranks} gloo ranks in {seconds:.1f} s (seed {args.seed})"
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
        },
        "torch": torch.__version__,
        "args": vars(args),
        "seconds": seconds,
        "counts": {f"{op}/{k}": v for (op, k), v in total.items()},
        "mismatches": mismatches,
        "timeouts": timeouts,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    if mismatches or timeouts:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
