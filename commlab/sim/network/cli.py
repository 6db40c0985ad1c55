"""`commlab sim collective` (simulate collectives on a modelled network) and `commlab sim topology`
(describe networks); `commlab.sim.cli` registers them under `commlab sim`.

    commlab sim collective --topology fat-tree:k=8 --op allreduce --algorithm ring,tree,halving_doubling \\
        --size 1K:1G --fidelity flow [--profile FILE] [--trace out.json] [--plot out.png] [--json]
    commlab sim collective --nccl-version 2.27.7 --system dgx-h100 --nodes 4 --op allgather --size 1M:1G
    commlab sim topology --topology cluster:nodes=2 [--plot topo.png] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from commlab.collectives.algorithms import algorithms_for
from commlab.errors import invalid
from commlab.shared.ops import OPS
from commlab.sim.network.collective import DTYPES, FIDELITIES, simulate_collective
from commlab.sim.network.engine import SimResult
from commlab.sim.network.nccl_cli import add_nccl_arguments
from commlab.sim.network.nccl_cli import run as run_nccl
from commlab.sim.network.plots import draw_topology, plot_busbw
from commlab.sim.network.profile import IDEAL, Profile
from commlab.sim.network.routing import ROUTINGS
from commlab.sim.network.topology import BUILDERS
from commlab.sim.network.topology_io import parse_topology
from commlab.sim.network.trace import write_trace
from commlab.sim.network.units import parse_sizes

TOPOLOGY_HELP = (
    f"a builder spec NAME[:key=value,...] with NAME one of {', '.join(BUILDERS)} "
    "(e.g. fat-tree:k=8, torus:dims=4x4x4, cluster:nodes=2,gpu=h100,nic=ndr), or a .toml/.yaml/.json file "
    "(ASTRA-sim network.yml files work too)"
)
_SHORT_TYPES = {"float32": "float", "float64": "double", "float16": "half", "bfloat16": "bfloat16"}


class _Progress:
    """A one-line progress bar on stderr, shown once work has run a couple of seconds (and only on a tty)."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, 0, time.monotonic()
        self.enabled = sys.stderr.isatty()

    def step(self, label: str) -> None:
        self.done += 1
        if self.enabled and time.monotonic() - self.start > 2:
            filled = int(30 * self.done / self.total)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} {label:<40}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and time.monotonic() - self.start > 2:
            sys.stderr.write("\r" + " " * 80 + "\r")


def _fmt_link(result: SimResult) -> tuple[str, str]:
    link, util = result.busiest_link()
    name = "-" if link is None else f"{link[0]}->{link[1]}"
    return name, "-" if util is None else f"{util * 100:.1f}%"


def _collective(args: argparse.Namespace) -> int:
    if args.nccl_version is not None:
        return run_nccl(args)
    if not args.topology:
        raise invalid("topology", args.topology, TOPOLOGY_HELP + " (required without --nccl-version)")
    topology = parse_topology(args.topology, args.routing)
    profile = Profile.load(args.profile) if args.profile else IDEAL
    sizes = parse_sizes(args.size)
    names = (
        [a.strip() for a in args.algorithm.split(",") if a.strip()]
        if args.algorithm
        else list(algorithms_for(args.op))
    )
    world = args.ranks or topology.num_ranks
    topology.check_world_size(world)
    results: dict[str, list[SimResult]] = {name: [] for name in names}
    progress = _Progress(len(sizes) * len(names))
    for name in names:
        for size in sizes:
            result = simulate_collective(
                args.op,
                name,
                topology,
                size,
                world_size=world,
                root=args.root,
                segments=args.segments,
                dtype=args.dtype,
                fidelity=args.fidelity,
                profile=profile,
            )
            results[name].append(result)
            progress.step(f"{name} {size} B")
    progress.close()
    flat = [r for name in names for r in results[name]]
    if args.trace:
        write_trace(flat, args.trace)
    if args.plot:
        title = f"{args.op} on {topology.name}, {world} ranks ({args.fidelity})"
        plot_busbw(results, args.plot, title)
    if args.json:
        summary = {"name": topology.name, "ranks": world, "routing": topology.routing}
        print(
            json.dumps(
                {"topology": summary, "profile": profile.to_dict(), "results": [r.to_dict() for r in flat]},
                indent=2,
            )
        )
        return 0
    itemsize = DTYPES[args.dtype]
    print(
        f"# commlab sim collective: {args.op} on {topology.name}, {world} ranks, fidelity {args.fidelity}, "
        f"routing {topology.routing}, profile {profile.name}"
    )
    header = (
        f"#{'size':>11} {'count':>11} {'type':>8}  {'algorithm':<17} {'time':>10} {'algbw':>7} {'busbw':>7}"
        f"  {'busiest link':<28} {'util':>6}"
    )
    print(header)
    print(f"#{'(B)':>11} {'(elements)':>11} {'':>8}  {'':<17} {'(us)':>10} {'(GB/s)':>7} {'(GB/s)':>7}")
    for size in sizes:
        for name in names:
            r = next(x for x in results[name] if x is not None and _matches(x, size, itemsize))
            link, util = _fmt_link(r)
            print(
                f"{r.nbytes:>12} {r.nbytes // itemsize:>11} {_SHORT_TYPES.get(args.dtype, args.dtype):>8}  "
                f"{name:<17} {r.time * 1e6:>10.2f} {r.algbw / 1e9:>7.2f} {r.busbw / 1e9:>7.2f}  "
                f"{link[:28]:<28} {util:>6}"
            )
    return 0


def _matches(result: SimResult, size: int, itemsize: int) -> bool:
    """Whether `result` is the run of requested `size` (its bytes may be rounded down to whole blocks)."""
    return result.nbytes <= size and size - result.nbytes < itemsize * max(result.world_size, 1)


def _topology(args: argparse.Namespace) -> int:
    topology = parse_topology(args.topology, args.routing)
    info = topology.summary(bisection=not args.no_bisection)
    if args.plot:
        draw_topology(topology, args.plot)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    bisection = info["bisection_bandwidth"]
    print(f"topology        {info['name']}")
    print(
        f"nodes           {info['nodes']} ({info['endpoints']} endpoints, {info['switches']} switches/NICs)"
    )
    print(f"ranks           {info['ranks']}")
    print(f"links           {info['links']} (one per direction)")
    print(
        f"link bandwidth  {info['min_link_bandwidth'] / 1e9:g} .. {info['max_link_bandwidth'] / 1e9:g} GB/s"
        " per direction"
    )
    print(f"diameter        {info['diameter_hops']} hops between ranks")
    if bisection is not None:
        print(
            f"bisection       {bisection / 1e9:g} GB/s (first half of the ranks to the second, "
            "placement order)"
        )
    return 0


def add_network_commands(simsub: argparse._SubParsersAction) -> None:
    """Register `commlab sim collective` and `commlab sim topology` on the `commlab sim` subparsers."""
    coll = simsub.add_parser("collective", help="simulate a collective over message sizes and algorithms")
    coll.add_argument("--topology", default=None, help=TOPOLOGY_HELP)
    coll.add_argument("--op", default="allreduce", choices=OPS, help="the collective (default allreduce)")
    coll.add_argument("--algorithm", default=None, help="comma-separated algorithms (default: all for --op)")
    coll.add_argument("--size", default="1K:1G", help="sizes: 1M, 1K,64K or MIN:MAX[:FACTOR] (default 1K:1G)")
    coll.add_argument("--fidelity", default="flow", choices=FIDELITIES, help="default flow")
    coll.add_argument("--dtype", default="float32", choices=list(DTYPES), help="default float32")
    coll.add_argument("--ranks", type=int, default=None, help="world size (default: every placed endpoint)")
    coll.add_argument("--root", type=int, default=None, help="root of broadcast/reduce (default 0)")
    coll.add_argument(
        "--segments", type=int, default=None, help="pipeline segments (default: best by formula)"
    )
    coll.add_argument("--routing", default="ecmp", choices=ROUTINGS, help="default ecmp")
    coll.add_argument(
        "--profile", default=None, help="software profile file: alpha, gamma, launch, efficiency"
    )
    coll.add_argument("--trace", default=None, help="write a Chrome/Perfetto trace JSON here")
    coll.add_argument("--plot", default=None, help="write a busbw-vs-size PNG here")
    coll.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_nccl_arguments(coll)
    coll.set_defaults(run=_collective)

    topo = simsub.add_parser("topology", help="summarize (and draw) a topology")
    topo.add_argument("--topology", required=True, help=TOPOLOGY_HELP)
    topo.add_argument("--routing", default="ecmp", choices=ROUTINGS, help="default ecmp")
    topo.add_argument("--plot", default=None, help="write a drawing of the topology (PNG) here")
    topo.add_argument(
        "--no-bisection", action="store_true", help="skip the bisection max-flow on huge graphs"
    )
    topo.add_argument("--json", action="store_true", help="print JSON instead of text")
    topo.set_defaults(run=_topology)
