"""`commlab sim collective --nccl-version V`: NCCL's choice and predicted time per size on a preset system.

    commlab sim collective --nccl-version 2.27.7 --system dgx-h100 --nodes 4 --op allgather --size 1M:1G
    commlab sim collective --nccl-version 2.27.7 --topology cluster:nodes=2,gpu=h100,nic=ndr --size 1G
    commlab sim collective --nccl-version 2.7.5 --system azure-nd-a100-v4 --nodes 2 --size 1M,1G

The system is a node preset (`--system`, see `commlab.sim.network.systems`) times `--nodes`, or a
`cluster:` topology spec (its gpu, nic, gpus_per_node and nodes; one NIC per GPU). The output is
nccl-tests' table with NCCL's pick and NCCL's own modelled time beside the prediction.
"""

from __future__ import annotations

import argparse
import json

from commlab.errors import invalid
from commlab.shared.ops import op_info
from commlab.sim.network.nccl_model import VERSIONS, NcclModel, check_version
from commlab.sim.network.systems import SYSTEMS, NodePreset, system
from commlab.sim.network.topology import cluster
from commlab.sim.network.topology_io import _builder_arguments
from commlab.sim.network.units import parse_sizes

NCCL_VERSION_HELP = (
    f"model NCCL's own algorithm choice and cost, version one of {', '.join(VERSIONS)}; needs --system "
    "(with --nodes) or a cluster: --topology"
)


def add_nccl_arguments(parser: argparse.ArgumentParser) -> None:
    """The NCCL-model options of `commlab sim collective`."""
    parser.add_argument("--nccl-version", default=None, help=NCCL_VERSION_HELP)
    parser.add_argument(
        "--system", default=None, help=f"node preset for --nccl-version: {', '.join(SYSTEMS)}"
    )
    parser.add_argument("--nodes", type=int, default=1, help="nodes of --system (default 1)")
    parser.add_argument(
        "--collnet", action="store_true", help="with --nccl-version: a CollNet (SHARP) plugin is enabled"
    )
    parser.add_argument(
        "--no-nvls", action="store_true", help="with --nccl-version: NVLink SHARP off (NCCL_NVLS_ENABLE=0)"
    )
    parser.add_argument(
        "--nccl-algo",
        default=None,
        help="with --nccl-version: NCCL_ALGO as NCCL reads it, e.g. Ring,Tree or ^NVLS (default: all)",
    )
    parser.add_argument(
        "--nccl-proto",
        default=None,
        help="with --nccl-version: NCCL_PROTO as NCCL reads it, e.g. Simple or ^LL128 (default: all)",
    )
    parser.add_argument(
        "--gpus-per-thread",
        type=int,
        default=1,
        help="with --nccl-version: GPUs one host thread drives (nccl-tests -g; default 1: a process per GPU)",
    )


def model_from_args(args: argparse.Namespace) -> NcclModel:
    """The NcclModel that --nccl-version, --system/--nodes or a cluster: --topology describe."""
    version = check_version(args.nccl_version)
    if args.system:
        preset, nodes = system(args.system), args.nodes
    elif args.topology and args.topology.strip().lower().startswith("cluster"):
        _, _, params = args.topology.partition(":")
        kwargs = _builder_arguments(cluster, params, args.topology)
        gpus = kwargs.get("gpus_per_node", 8)
        nic = kwargs.get("nic", "hdr")
        preset = NodePreset(
            f"cluster-{kwargs.get('gpu', 'a100')}", kwargs.get("gpu", "a100"), gpus, nic, gpus
        )
        nodes = kwargs["nodes"]
    else:
        raise invalid(
            "topology",
            args.topology,
            f"--system with one of {', '.join(SYSTEMS)}, or a cluster:... topology, for --nccl-version",
        )
    return NcclModel.of(
        preset,
        nodes,
        version=version,
        collnet=args.collnet,
        nvls=not args.no_nvls,
        algorithms=args.nccl_algo,
        protocols=args.nccl_proto,
        gpus_per_thread=args.gpus_per_thread,
    )


def run(args: argparse.Namespace) -> int:
    """Print NCCL's pick and the predicted time for every size (or JSON with --json)."""
    model = model_from_args(args)
    itemsize = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}.get(args.dtype, 4)
    info = op_info(args.op)
    predictions = []
    for size in parse_sizes(args.size):
        count = info.count(size, itemsize, model.nranks)
        nbytes = info.total_bytes(count, itemsize, model.nranks)
        predictions.append(model.predict(args.op, nbytes))
    if args.json:
        rows = [
            {
                "op": p.op,
                "nbytes": p.nbytes,
                "ranks": p.nranks,
                "time": p.time,
                "algbw": p.algbw,
                "busbw": p.busbw,
                "algorithm": p.algorithm,
                "protocol": p.protocol,
                "nccl_time": p.nccl_time,
            }
            for p in predictions
        ]
        summary = {"system": model.system.name, "nodes": model.nodes, "nccl_version": model.version}
        settings = {"nvls": model.nvls, "nccl_algo": model.algorithms, "nccl_proto": model.protocols}
        summary.update({k: v for k, v in settings.items() if v not in (None, True)})  # only what was set
        if model.gpus_per_thread != 1:
            summary["gpus_per_thread"] = model.gpus_per_thread
        print(json.dumps({"model": summary, "results": rows}, indent=2))
        return 0
    print(
        f"# commlab sim collective: {args.op} on {model.nodes} x {model.system.name} "
        f"({model.nranks} ranks), NCCL {model.version} model"
        + "".join(
            f", {name}={value}"
            for name, value in (
                ("NCCL_NVLS_ENABLE", None if model.nvls else 0),
                ("NCCL_ALGO", model.algorithms),
                ("NCCL_PROTO", model.protocols),
            )
            if value is not None
        )
    )
    print(
        f"#{'size':>11} {'count':>11} {'type':>8}  {'nccl algorithm':<20} {'time':>10} {'algbw':>7} "
        f"{'busbw':>7} {'nccl own':>10}"
    )
    units = f"#{'(B)':>11} {'(elements)':>11} {'':>8}  {'':<20} {'(us)':>10} {'(GB/s)':>7} {'(GB/s)':>7}"
    print(f"{units} {'(us)':>10}")
    for p in predictions:
        choice = f"{p.algorithm}/{p.protocol}"
        print(
            f"{p.nbytes:>12} {p.nbytes // itemsize:>11} {args.dtype:>8}  {choice:<20} {p.time * 1e6:>10.2f} "
            f"{p.algbw / 1e9:>7.2f} {p.busbw / 1e9:>7.2f} {p.nccl_time * 1e6:>10.2f}"
        )
    return 0
