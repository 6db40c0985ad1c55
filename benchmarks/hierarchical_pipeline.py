"""Hierarchical allreduce pipelined over segments against the flat ring, across emulated hosts.

    sudo python -m commlab.cli testbed up --topology switch:n=2,bandwidth=1Gb/s --ranks-per-host 2
    python -m commlab.cli testbed run -- python benchmarks/hierarchical_pipeline.py [--sizes 16M,64M]

Every rank runs the schedules through commlab's executor on gloo (the host map from LOCAL_WORLD_SIZE):
the flat ring, hierarchical with 1 segment (the three phases one after another) and with 2, 4, 8 and 16
segments (segment s's cross-host phase beside segment s+1's reduce-scatter and s-1's allgather inside
the hosts). Variants are interleaved in every repeat; the median of the slowest rank's time is printed
with the busbw and the ratio to the ring (the issue's target: >= 1.4x at >= 16 MiB on 2 hosts x 2 ranks,
the wire-bound ideal being 1.5x). The result is checked against a local sum.
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from commlab.collectives.algorithms import build_schedule
from commlab.collectives.executor import REDUCERS, compile_program, execute
from commlab.collectives.hosts import host_map_from_env
from commlab.collectives.transport import TorchTransport


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="16M,64M", help="bytes per rank, comma-separated (K, M suffixes)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--segments", default="1,2,4,8,16")
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    hosts = host_map_from_env(range(world))
    transport = TorchTransport()
    variants = [("ring", 1)] + [("hierarchical", int(s)) for s in args.segments.split(",")]
    sizes = [
        int(s[:-1]) << {"K": 10, "M": 20}[s[-1]] if s[-1] in "KM" else int(s) for s in args.sizes.split(",")
    ]
    if rank == 0:
        print(f"# {world} ranks on {hosts}; median of {args.repeats} interleaved repeats (slowest rank)")
        print(
            f"{'size':>8} {'algorithm':>13} {'segments':>8} {'time (ms)':>10} {'busbw GB/s':>10} "
            f"{'x ring':>7}"
        )
    for nbytes in sizes:
        numel = nbytes // 4
        times = {v: [] for v in variants}
        calls = {}
        for name, segments in variants:
            schedule = build_schedule("allreduce", name, world, None, segments, hosts)
            plan = compile_program(schedule, rank, numel, 1)
            buffer = torch.full((numel,), float(rank + 1))
            scratch = torch.zeros(max(plan.scratch_numel, 1))
            calls[(name, segments)] = (plan, buffer, scratch, schedule)
        tag = 0
        for repeat in range(args.repeats + 1):  # the first round warms up (connections, page faults)
            for i in range(len(variants)):
                v = variants[(i + repeat) % len(variants)]
                plan, buffer, scratch, schedule = calls[v]
                buffer.fill_(float(rank + 1))
                dist.barrier()
                start = time.perf_counter()
                deadline = time.monotonic() + 300
                execute(plan, buffer, transport, REDUCERS["sum"], deadline, tag, schedule.algorithm, scratch)
                seconds = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
                tag += 1 << 20
                dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
                expected = world * (world + 1) / 2
                if not torch.all(buffer == expected):
                    raise RuntimeError(f"{v}: wrong result")
                if repeat:
                    times[v].append(float(seconds))
        ring = statistics.median(times[("ring", 1)])
        if rank == 0:
            for v in variants:
                t = statistics.median(times[v])
                busbw = nbytes / t * 2 * (world - 1) / world / 1e9
                print(
                    f"{nbytes >> 20:>5}MiB {v[0]:>13} {v[1]:>8} {t * 1e3:>10.1f} {busbw:>10.3f} "
                    f"{ring / t:>7.2f}"
                )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
