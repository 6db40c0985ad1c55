"""Ping-pong between two ranks: the shared-memory transport's latency, bandwidth and CPU cost per message.

    python benchmarks/shm_latency.py [--sizes 8,4K,1M,16M] [--repeats 5] [--iters 200]

Variants, interleaved in every repetition (median of --repeats samples): `shm` (the transport as shipped:
spin, yield, then a futex sleep), `shm-naps` (the same with futexes off, $COMMLAB_SHM_FUTEX=0: naps of
20 us-1 ms instead), and `gloo` (torch.distributed send/recv, what commlab's messages use without shared
memory). Per variant and size it prints the one-way time, the bandwidth, and the CPU seconds each rank
spends per message (process time / messages: 1.0 means a rank's core was busy the whole time, i.e.
spinning), which shows what the synchronisation costs besides the copies.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from commlab.bench.config import parse_size


def _rank(rank: int, store: str, args: argparse.Namespace, futex_on: bool, out: mp.Queue) -> None:
    os.environ["COMMLAB_SHM_FUTEX"] = "1" if futex_on else "0"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=120))  # fmt: skip
    from commlab.collectives.shm import SharedMemoryTransport
    from commlab.collectives.transport import Message

    transport = SharedMemoryTransport()
    peer = 1 - rank
    results = {}
    for size in args.sizes:
        x = torch.zeros(max(size // 4, 1))
        iters = max(2, min(args.iters, int(args.iters * (1 << 16) / max(size, 1 << 16))))

        def shm(tag: int, x: torch.Tensor = x) -> None:
            order = ("send", "recv") if rank == 0 else ("recv", "send")
            for what in order:
                message = [Message(x, peer, tag)]
                requests = transport.post(message, []) if what == "send" else transport.post([], message)
                transport.wait_all(requests, time.monotonic() + 60, str)

        def gloo(tag: int, x: torch.Tensor = x) -> None:
            if rank == 0:
                dist.send(x, peer)
                dist.recv(x, peer)
            else:
                dist.recv(x, peer)
                dist.send(x, peer)

        samples: dict[str, list[tuple[float, float]]] = {"shm": [], "gloo": []}
        for _ in range(args.repeats):
            for name, once in (("shm", shm), ("gloo", gloo)):
                once(0)
                dist.barrier()
                wall, cpu = time.perf_counter(), time.process_time()
                for i in range(iters):
                    once(i)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                samples[name].append((wall / iters / 2, cpu / iters / 2))
        results[size] = {
            name: (statistics.median(w for w, _ in s), statistics.median(c for _, c in s))
            for name, s in samples.items()
        }
    out.put((rank, results))
    transport.close()
    dist.barrier()
    dist.destroy_process_group()


def run(args: argparse.Namespace, futex_on: bool) -> dict:
    context = mp.get_context("spawn")
    out = context.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [context.Process(target=_rank, args=(r, store, args, futex_on, out)) for r in range(2)]
        for proc in procs:
            proc.start()
        got = dict(out.get(timeout=1800) for _ in procs)
        for proc in procs:
            proc.join(60)
    return got


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="8,4K,1M,16M")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=200, help="round trips per sample for <= 64 KiB")
    args = parser.parse_args()
    args.sizes = [parse_size(s) for s in args.sizes.split(",")]
    with_futex, with_naps = run(args, True), run(args, False)
    print(f"# ping-pong, 2 ranks, one-way time (median of {args.repeats}); cpu = CPU s per message / wall s")
    print(f"# load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"# {'size':>9} {'variant':>9} {'one-way us':>11} {'GB/s':>7} {'cpu rank0':>9} {'cpu rank1':>9}")
    for size in args.sizes:
        rows = [
            ("shm", with_futex, "shm"),
            ("shm-naps", with_naps, "shm"),
            ("gloo", with_futex, "gloo"),
        ]
        for label, doc, key in rows:
            wall0, cpu0 = doc[0][size][key]
            _, cpu1 = doc[1][size][key]
            print(
                f"  {size:>9} {label:>9} {wall0 * 1e6:>11.1f} {size / wall0 / 1e9:>7.3f}"
                f" {cpu0 / wall0:>9.2f} {cpu1 / wall0:>9.2f}"
            )


if __name__ == "__main__":
    sys.exit(main())
