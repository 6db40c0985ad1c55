"""What gloo's argument check costs per call: check off, native ring allgather, direct exchange.

    python benchmarks/check_cost.py                        # loopback, 2 and 4 ranks (COMMLAB_SHM=0)
    python benchmarks/check_cost.py --ranks --testbed switch:n=4,bandwidth=100Mb/s,latency=2ms \
        switch:n=2,bandwidth=100Mb/s,latency=2ms          # the delay network, 4 and 2 hosts (root)
    commlab testbed run -- python benchmarks/check_cost.py --calls 20   # on a testbed already up

Every rank runs `commlab.all_reduce` of --bytes (float32) on gloo's TCP transport (never shared memory)
in three modes, interleaved trial by trial in a rotating order: the check off, the check by gloo's
native allgather (a ring of p-1 round trips), the check by the direct exchange (one round of
point-to-point to and from every peer; `Communicator.check_exchange`). A sample is the wall time of
--calls calls after a barrier, divided by --calls; rank 0 prints the median of --repeats samples per
mode, each check's cost over the check off, and gloo's own all_reduce for scale. Which exchange the
runtime's rule picks for this group's host map is printed too. Under torchrun the script measures;
without it, it launches torchrun on this host for each of --ranks (loopback), then `commlab testbed run
--topology` for each --testbed. Run time: about 1.5 minutes loopback (2 cores), 1 minute both testbeds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

import commlab
from commlab.collectives.check_exchange import check_exchange_mode
from commlab.collectives.transport import TorchTransport

MODES = ("off", "native", "direct", "gloo")


def measure(args: argparse.Namespace) -> None:
    """One torchrun rank: the interleaved samples, printed by rank 0."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    comm = commlab.communicator()
    if not isinstance(comm.transport, TorchTransport):
        raise SystemExit(f"expected gloo's TCP transport, got {comm.transport!r} (set COMMLAB_SHM=0)")
    rule = check_exchange_mode(comm.hosts)
    tensor = torch.ones(args.bytes // 4)
    samples: dict[str, list[float]] = {mode: [] for mode in MODES}

    def sample(mode: str) -> float:
        if mode != "gloo":
            comm.check_exchange = "direct" if mode == "direct" else "native"
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.calls):
            if mode == "gloo":
                dist.all_reduce(tensor)
            else:
                commlab.all_reduce(tensor, algorithm=args.algorithm, check=mode != "off")
        return (time.perf_counter() - start) / args.calls

    for mode in MODES:  # warm-up: connections, plans, replay entries
        sample(mode)
    for trial in range(args.repeats):
        shift = trial % len(MODES)
        for mode in MODES[shift:] + MODES[:shift]:
            samples[mode].append(sample(mode))
    if dist.get_rank() == 0:
        median = {mode: statistics.median(values) for mode, values in samples.items()}
        off = median["off"]
        print(
            f"{dist.get_world_size()} ranks, hosts {comm.hosts.spec()} (rule picks {rule}), "
            f"{args.bytes} B all_reduce ({args.algorithm}), median of {args.repeats} x {args.calls} calls, "
            f"load {os.getloadavg()[0]:.2f}"
        )
        for mode in MODES:
            over = "" if mode in ("off", "gloo") else f"  check +{(median[mode] - off) * 1e6:9.1f} us"
            print(f"  {mode:7s} {median[mode] * 1e6:10.1f} us/call{over}")
        print(
            f"  direct/native check cost: {(median['direct'] - off) / max(median['native'] - off, 1e-12):.2f}"
        )
    commlab.release()
    dist.destroy_process_group()


def worker_args(args: argparse.Namespace, calls: int, repeats: int) -> list[str]:
    """The measuring ranks' command line."""
    return [os.path.abspath(__file__), "--bytes", str(args.bytes), "--algorithm", args.algorithm,
            "--calls", str(calls), "--repeats", str(repeats)]  # fmt: skip


def launch(args: argparse.Namespace) -> None:
    """Loopback: torchrun on this host for each of --ranks, gloo over TCP (COMMLAB_SHM=0); then each
    --testbed topology, built for the one command by `commlab testbed run --topology` (needs root)."""
    env = dict(os.environ, COMMLAB_SHM="0", OMP_NUM_THREADS="1")
    env.pop("COMMLAB_HOSTS", None)
    for ranks in args.ranks:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
        command += worker_args(args, args.calls, args.repeats)
        subprocess.run(command, env=env, check=True, timeout=600)
    for topology in args.testbed:
        command = [sys.executable, "-m", "commlab.cli", "testbed", "run", "--topology", topology, "--"]
        command += ["python", *worker_args(args, args.testbed_calls, args.repeats)]
        subprocess.run(command, env=env, check=True, timeout=600)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bytes", type=int, default=4096)
    parser.add_argument("--algorithm", default="auto")
    parser.add_argument("--calls", type=int, default=200, help="calls per sample (loopback, or in ranks)")
    parser.add_argument("--repeats", type=int, default=7, help="samples per mode (median)")
    parser.add_argument("--ranks", type=int, nargs="*", default=[2, 4], help="loopback rank counts")
    parser.add_argument(
        "--testbed",
        nargs="*",
        default=[],
        metavar="TOPOLOGY",
        help="also on these emulated clusters, e.g. switch:n=4,bandwidth=100Mb/s,latency=2ms (root)",
    )
    parser.add_argument("--testbed-calls", type=int, default=20, help="calls per sample on a testbed")
    args = parser.parse_args()
    if "RANK" in os.environ:
        measure(args)
    else:
        launch(args)


if __name__ == "__main__":
    main()
