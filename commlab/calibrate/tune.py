"""`commlab tune --show`: the decision table of `algorithm="auto"` under a profile.

    commlab tune --show [--backend gloo|mpi] [--profile FILE] [--ranks 2,3,4,8 | --hosts 2x2,3,1]
                        [--op allreduce]

For every op and world size it sweeps message sizes (powers of two), asks the tuner which algorithm it
picks (`tuning.choose`, exactly what a call with algorithm="auto" resolves to) and prints the size ranges
over which each choice holds, and whether the profile's measured algorithm times or the fitted formulas
decided it (`--formulas`: the formulas' table even where measurements exist). `--hosts` takes host maps
instead of world sizes ('2x2' two hosts of two ranks; '3,1' hosts of 3 and 1 ranks; several separated by
';'): across hosts auto also weighs the topology-aware algorithms.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from commlab.collectives.algorithms import algorithms_for
from commlab.collectives.calibration import BACKENDS, Calibration, active_profile_path, as_calibration
from commlab.collectives.hosts import HostMap
from commlab.collectives.tuning import choose
from commlab.errors import CommlabError, invalid
from commlab.shared.ops import OPS

DTYPES = ("float32", "float64", "float16", "bfloat16", "int32", "int64", "uint8", "int8")


def decision_table(
    calibration: Calibration,
    op: str,
    world_size: int,
    dtype: str = "float32",
    max_bytes: int = 1 << 30,
    formulas: bool = False,
    hosts: HostMap | None = None,
) -> list[dict]:
    """[{min_bytes, max_bytes, algorithm, source}] over sizes 8 B..max_bytes (powers of two); source is
    'measured' (the profile's algorithm times decide) or 'formulas'; `formulas`: ignore the measurements;
    `hosts`: the ranks' host map (None: one host)."""
    model = calibration.cost_model(world_size, dtype, hosts)
    if formulas:
        model = dataclasses.replace(model, measured=None)
    rows: list[dict] = []
    size = 8
    while size <= max_bytes:
        choice = choose(op, world_size, size, model, hosts)
        across = hosts is not None and hosts.num_hosts > 1
        names = algorithms_for(op, topology_aware=across)
        measured = world_size > 1 and model.measured_choice(op, size, names) is not None
        source = "measured" if measured else "formulas"
        if rows and rows[-1]["algorithm"] == choice.algorithm and rows[-1]["source"] == source:
            rows[-1]["max_bytes"] = size
        else:
            rows.append(
                {"min_bytes": size, "max_bytes": size, "algorithm": choice.algorithm, "source": source}
            )
        size *= 2
    return rows


def _fmt(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size // scale} {unit}"
    return f"{size} B"


def _ranks(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or any(v < 2 for v in values):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not accepted; accepted: world sizes >= 2, like 2,3,4,8"
        )
    return values


def _host_maps(text: str) -> list[HostMap]:
    try:
        return [HostMap.parse(part) for part in text.split(";") if part.strip()]
    except CommlabError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def show(args: argparse.Namespace) -> int:
    if not args.show:
        print("commlab tune: nothing to do; accepted: --show (print auto's decision table)", file=sys.stderr)
        return 2
    if args.profile:
        calibration = as_calibration(args.profile)
    else:
        path = active_profile_path(args.backend)
        if path is None:
            raise CommlabError(f"no profile for backend {args.backend}: run commlab calibrate, or --profile")
        calibration = as_calibration(path)
    ops = [args.op] if args.op else list(OPS)
    if args.op and args.op not in OPS:
        raise invalid("--op", args.op, OPS)
    layouts = {str(h): h for h in args.hosts} if args.hosts else {f"{p} ranks": None for p in args.ranks}
    tables = {
        op: {
            label: decision_table(
                calibration,
                op,
                hosts.world_size if hosts else int(label.split()[0]),
                args.dtype,
                formulas=args.formulas,
                hosts=hosts,
            )
            for label, hosts in layouts.items()
        }
        for op in ops
    }
    if args.json:
        print(json.dumps({"profile": calibration.source, "dtype": args.dtype, "tables": tables}, indent=1))
        return 0
    measured = ",".join(str(p) for p in calibration.world_sizes)
    print(
        f"# algorithm='auto' under {calibration.source} ({calibration.backend}, "
        f"host {calibration.machine.get('hostname', '?')}, measured world sizes {measured}"
        + (f", across hosts {calibration.hosts}" if calibration.hosts else "")
        + f"), dtype {args.dtype}"
    )
    for op, per_size in tables.items():
        print(op)
        for label, rows in per_size.items():
            hosts = layouts[label]
            p = hosts.world_size if hosts else int(label.split()[0])
            note = (
                ""
                if p in calibration.levels
                else f" (priced with the {calibration.level(p).world_size}-rank fit)"
            )
            print(f"  {label}{note}")
            for row in rows:
                span = f"{_fmt(row['min_bytes'])} .. {_fmt(row['max_bytes'])}"
                print(f"    {span:>22}  {row['algorithm']:<20} ({row['source']})")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `commlab tune` on the CLI's subcommands."""
    parser = sub.add_parser("tune", help="show the algorithm auto picks per op, world size and size range")
    parser.add_argument("--show", action="store_true", help="print the decision table")
    parser.add_argument("--backend", choices=BACKENDS, default="gloo", help="whose active profile (gloo)")
    parser.add_argument("--profile", default=None, help="a calibration file (default: the active profile)")
    parser.add_argument("--ranks", type=_ranks, default=[2, 3, 4, 8], help="world sizes (2,3,4,8)")
    parser.add_argument(
        "--hosts",
        type=_host_maps,
        default=None,
        help="host maps instead of world sizes: '2x2' or '3,1', several separated by ';'",
    )
    parser.add_argument("--op", default=None, choices=OPS, help="one op (default: all)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="reduction dtype (float32)")
    parser.add_argument(
        "--formulas",
        action="store_true",
        help="rank by the fitted formulas alone, ignoring the profile's measured algorithm times",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(run=show)
