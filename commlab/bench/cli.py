"""`commlab bench`'s command line: the arguments, their checks, and running in a launcher's ranks or
launching them (the package docstring describes the command)."""

from __future__ import annotations

import argparse
import os

from commlab.bench.config import (
    BACKENDS,
    DTYPES,
    REDUCE_OPS,
    BenchConfig,
    count_at_least,
    parse_size,
)
from commlab.bench.launch import backend_for, detect_launcher, launch
from commlab.collectives.algorithms import algorithms_for
from commlab.errors import CommlabError, invalid
from commlab.shared.ops import OPS


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `commlab bench` on the CLI's subcommands."""
    parser = sub.add_parser(
        "bench",
        help="nccl-tests-style sweep of one collective: commlab's algorithms against the native one",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("op", choices=OPS, help="the collective")
    parser.add_argument("-b", "--minbytes", type=parse_size, default=8, help="smallest size (default 8)")
    parser.add_argument("-e", "--maxbytes", type=parse_size, default=64 << 20, help="largest size (64M)")
    parser.add_argument("-f", "--stepfactor", type=count_at_least(1), default=2, help="size multiplier (2)")
    parser.add_argument(
        "--algorithm",
        default="auto",
        help="auto, an algorithm, a comma-separated list, or 'all' (auto and every algorithm of the op)",
    )
    parser.add_argument("--backend", choices=BACKENDS, default=None, help="gloo (default) or mpi")
    parser.add_argument("-n", "--ranks", type=count_at_least(1), default=4, help="ranks to launch (4)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--op", dest="redop", choices=REDUCE_OPS, default="sum", help="reduction (sum)")
    parser.add_argument(
        "-r", "--root", type=count_at_least(0), default=0, help="root of broadcast and reduce (0)"
    )
    parser.add_argument("--iters", type=count_at_least(1), default=20, help="calls per timed sample (20)")
    parser.add_argument("--warmup", type=count_at_least(0), default=5, help="untimed calls first (5)")
    parser.add_argument(
        "--repeats", type=count_at_least(1), default=5, help="timed samples per row; median (5)"
    )
    parser.add_argument(
        "--sample-seconds",
        type=float,
        default=0.0,
        help="cap a sample at about this many seconds by running fewer iterations (0: always --iters)",
    )
    parser.add_argument("--check", dest="check", action="store_true", default=True, help="count #wrong")
    parser.add_argument("--no-check", dest="check", action="store_false", help="skip the data check")
    parser.add_argument(
        "--no-arg-check", dest="arg_check", action="store_false", help="commlab calls with check=False"
    )
    parser.add_argument(
        "--check-off-row",
        action="store_true",
        help="also time auto with the argument check off, interleaved with the rest (row auto:check-off)",
    )
    parser.add_argument("--no-native", dest="native", action="store_false", help="skip the native one")
    parser.add_argument("--json", dest="json_path", metavar="FILE", help="write every row as JSON")
    parser.add_argument("--plot", dest="plot_path", metavar="FILE.png", help="draw busbw against size")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for one collective (600)")
    parser.set_defaults(run=main)


def config_from_args(args: argparse.Namespace, launched: str | None) -> BenchConfig:
    """Validate the arguments into a BenchConfig (`launched`: the launcher found, if any)."""
    backend = backend_for(args.backend, launched, "bench")
    known = algorithms_for(args.op)
    if args.algorithm == "all":
        algorithms = ["auto", *known]
    else:
        algorithms = [a.strip() for a in args.algorithm.split(",") if a.strip()]
        for name in algorithms:
            if name != "auto" and name not in known:
                raise invalid("--algorithm", name, ["auto", *known, "all"])
    if args.maxbytes < args.minbytes:
        raise invalid("-e/--maxbytes", args.maxbytes, f"at least -b/--minbytes = {args.minbytes}")
    if args.redop == "avg" and not args.dtype.startswith(("float", "bfloat")):
        raise invalid("--op", "avg", f"sum, max, min or prod for --dtype {args.dtype}")
    if args.timeout <= 0 or args.sample_seconds < 0:
        raise invalid("--timeout/--sample-seconds", (args.timeout, args.sample_seconds), "positive numbers")
    return BenchConfig(
        op=args.op,
        min_bytes=args.minbytes,
        max_bytes=args.maxbytes,
        factor=args.stepfactor,
        algorithms=algorithms,
        backend=backend,
        ranks=args.ranks,
        dtype=args.dtype,
        redop=args.redop,
        root=args.root,
        iters=args.iters,
        warmup=args.warmup,
        repeats=args.repeats,
        sample_seconds=args.sample_seconds,
        check=args.check,
        arg_check=args.arg_check,
        check_off_row=args.check_off_row,
        native=args.native,
        json_path=args.json_path,
        plot_path=os.path.abspath(args.plot_path) if args.plot_path else None,
        progress=args.progress,
        timeout=args.timeout,
    )


def main(args: argparse.Namespace) -> int:
    """`commlab bench`: run in the ranks of a launcher already running, or launch ranks and wait."""
    launched = detect_launcher()
    config = config_from_args(args, launched)
    if config.plot_path:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CommlabError("--plot needs matplotlib: pip install matplotlib") from None
    if config.json_path:
        config.json_path = os.path.abspath(config.json_path)
    if launched:
        from commlab.bench.worker import run_worker  # imports torch: only where a rank runs

        run_worker(config)
        return 0
    return launch(config)
