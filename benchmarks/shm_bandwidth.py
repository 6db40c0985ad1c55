"""One core's rates for what a large shared-memory allreduce does, and the busbw bound they imply.

    python benchmarks/shm_bandwidth.py [--mib 8] [--repeats 7] [--pieces 64K,128K,256K,512K]

A rank of a large allreduce on the shared-memory transport copies (process_vm_readv from the peer's
buffer: `cma`) and reduces (torch `add_`). This times, on one thread, medians of interleaved trials over
`--mib` MiB of float32 (each in bytes of the message per second):
  memcpy          torch copy_ (the reference benchmarks/collectives.py divides busbw by)
  add             dst.add_(src), both in DRAM (what the executor does after a receive into scratch)
  cma             process_vm_readv of the message into a DRAM buffer (this process reading itself)
  cma+add         the unfused receive: cma into a DRAM scratch, then add it (two passes)
  fused <piece>   the fused receive: cma a piece into an L2-sized scratch, add it, next piece
  numpy <piece>   the same with numpy's add (less Python per piece than torch's)
and then the bound these rates put on busbw / memcpy for ring allreduce at p ranks (per rank: (p-1)/p of
the buffer received and reduced, (p-1)/p received into place), each rank on its own core, and with two
ranks per core (4 ranks on this 2-core machine: each rank's time doubles).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from commlab.bench.config import parse_size
from commlab.collectives import cma


def _timed(work: Callable[[], None], inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        work()
    return (time.perf_counter() - start) / inner


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mib", type=int, default=8, help="message size in MiB")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--pieces", default="64K,128K,256K,512K")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not cma.AVAILABLE:
        raise SystemExit("process_vm_readv is not available here")
    nbytes = args.mib << 20
    numel = nbytes // 4
    src = torch.rand(numel)
    dst = torch.rand(numel)
    scratch = torch.empty(numel)
    pid = os.getpid()

    def read(remote: int, local: int, n: int) -> None:
        if cma.read(pid, remote, local, n) != n:
            raise SystemExit(f"process_vm_readv failed: {os.strerror(ctypes.get_errno())}")

    def unfused() -> None:
        read(src.data_ptr(), scratch.data_ptr(), nbytes)
        dst.add_(scratch)

    def fused(piece_bytes: int) -> Callable[[], None]:
        piece = torch.empty(piece_bytes // 4)
        step = piece.numel()

        def work() -> None:
            for start in range(0, numel, step):
                count = min(step, numel - start)
                read(src.data_ptr() + start * 4, piece.data_ptr(), count * 4)
                dst[start : start + count].add_(piece[:count])

        return work

    def fused_numpy(piece_bytes: int) -> Callable[[], None]:
        piece = torch.empty(piece_bytes // 4).numpy()
        into = dst.numpy()
        step = piece.size

        def work() -> None:
            for start in range(0, numel, step):
                count = min(step, numel - start)
                read(src.data_ptr() + start * 4, piece.ctypes.data, count * 4)
                part = into[start : start + count]
                np.add(part, piece[:count], out=part)

        return work

    variants: dict[str, Callable[[], None]] = {
        "memcpy": lambda: scratch.copy_(src),
        "add": lambda: dst.add_(src),
        "cma": lambda: read(src.data_ptr(), scratch.data_ptr(), nbytes),
        "cma+add": unfused,
    }
    for text in args.pieces.split(","):
        variants[f"fused {text}"] = fused(parse_size(text))
        variants[f"numpy {text}"] = fused_numpy(parse_size(text))
    for work in variants.values():
        work()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, work in variants.items():
            samples[name].append(_timed(work, 3))
    gbps = {name: nbytes / statistics.median(times) / 1e9 for name, times in samples.items()}
    print(f"# {args.mib} MiB float32, one thread, median of {args.repeats}; load {os.getloadavg()[0]:.2f}")
    for name, rate in gbps.items():
        print(f"  {name:>14} {rate:7.2f} GB/s")
    best_fused = max((n for n in gbps if n.startswith(("fused", "numpy"))), key=gbps.__getitem__)
    memcpy = gbps["memcpy"]
    print("# ring allreduce bound, busbw / memcpy (busbw = 2(p-1)/p S / t; per rank (p-1)/p S reduced,")
    print("# (p-1)/p S copied into place): 2 / (memcpy/cma + memcpy/receive-and-reduce)")
    for label, reduce_rate in (("unfused", gbps["cma+add"]), (best_fused, gbps[best_fused])):
        one = 2 / (memcpy / gbps["cma"] + memcpy / reduce_rate)
        print(f"  {label:>14}: a core per rank {one:.2f}; two ranks per core {one / 2:.2f}")


if __name__ == "__main__":
    main()
