"""Every allreduce algorithm on random data, checked against torch.distributed and timed.

    torchrun --standalone --nproc-per-node 4 examples/allreduce.py [--sizes 64K,1M,8M] [--iters 5]

Prints one row per (algorithm, size): median time, bus bandwidth (nccl-tests definition) and whether the
result equals gloo's own all_reduce on the same data.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import torch
import torch.distributed as dist

import commlab
from commlab.collectives.algorithms import algorithms_for

UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B")
    if text and text[-1] in UNITS:
        return int(float(text[:-1]) * UNITS[text[-1]])
    return int(text)


def timed(fn, iters: int) -> float:
    """Median seconds of `iters` calls, each started together on every rank."""
    times = []
    for _ in range(iters):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    # The slowest rank defines a collective's time.
    slowest = torch.tensor(times)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return statistics.median(slowest.tolist())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", default="64K,1M,8M", help="message sizes in bytes per rank (K, M, G suffixes)"
    )
    parser.add_argument("--iters", type=int, default=5, help="timed repetitions per row (median reported)")
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    args = parser.parse_args()

    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.backend == "nccl" else "cpu"
    if rank == 0:
        header = f"commlab {commlab.__version__}: allreduce on {world} ranks ({args.backend})"
        print(f"{header}, median of {args.iters}")
        print(f"{'algorithm':>18} {'size':>10} {'time (us)':>11} {'busbw (GB/s)':>13} {'correct':>8}")
    all_ok = True
    for size in (parse_size(s) for s in args.sizes.split(",")):
        count = size // 4
        data = torch.randn(count, generator=torch.Generator().manual_seed(rank)).to(device)
        expected = data.clone()
        dist.all_reduce(expected)
        # Timed calls reduce in place without allocating (values grow; time does not care).
        buffer = data.clone()
        native = f"{args.backend} native"
        for name in [native, "auto", *algorithms_for("allreduce")]:
            if name == native:
                fn = functools.partial(dist.all_reduce, buffer)
            else:
                fn = functools.partial(commlab.all_reduce, buffer, algorithm=name)
            if name == native:
                ok = True
            else:
                out = data.clone()
                commlab.all_reduce(out, algorithm=name)
                ok = torch.allclose(out, expected, rtol=1e-5, atol=1e-5)
            flags = torch.tensor([int(ok)])
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
            ok = bool(flags.item())
            all_ok &= ok
            buffer.copy_(data)
            seconds = timed(fn, args.iters)
            busbw = size / seconds * 2 * (world - 1) / world / 1e9
            if rank == 0:
                print(
                    f"{name:>18} {size:>10} {seconds * 1e6:>11.1f} {busbw:>13.3f} {'yes' if ok else 'NO':>8}"
                )
    commlab.release()  # close commlab's communicators before their group goes
    dist.destroy_process_group()
    if not all_ok:
        raise SystemExit("some algorithm disagreed with torch.distributed")


if __name__ == "__main__":
    main()
