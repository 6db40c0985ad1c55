"""The `commlab` command. Subcommands: `algorithms` (more arrive with the benchmark and simulator)."""

from __future__ import annotations

import argparse
import json
import sys

from commlab import __version__
from commlab.bench.cli import add_parser as add_bench_parser
from commlab.calibrate.cli import add_parser as add_calibrate_parser
from commlab.calibrate.tune import add_parser as add_tune_parser
from commlab.collectives.algorithms import ALGORITHMS
from commlab.collectives.cost import DEFAULT_COST_MODEL
from commlab.collectives.schedule import OPS
from commlab.errors import CommlabError
from commlab.sim.cli import add_sim_parser
from commlab.sim.training.cli import add_plan_parser
from commlab.testbed.cli import add_parser as add_testbed_parser


def _algorithms(args: argparse.Namespace) -> int:
    """Print every op with the algorithms that implement it and their predicted time at one example size."""
    rows = []
    for op in OPS:
        for name, algorithm in ALGORITHMS.items():
            if algorithm.supports(op):
                seconds = algorithm.cost(op, args.ranks, args.bytes, DEFAULT_COST_MODEL)
                rows.append(
                    {
                        "op": op,
                        "algorithm": name,
                        "pipelined": op in algorithm.pipelined_ops,
                        "summary": algorithm.summary,
                        "predicted_us": round(seconds * 1e6, 3),
                    }
                )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["algorithm"]) for r in rows)
    model = DEFAULT_COST_MODEL
    print(
        f"predicted time: {args.ranks} ranks, {args.bytes} bytes, alpha={model.alpha * 1e6:g} us, "
        f"{1 / model.beta / 1e9:g} GB/s links (commlab.collectives.cost.DEFAULT_COST_MODEL)"
    )
    current = None
    for row in rows:
        if row["op"] != current:
            current = row["op"]
            print(current)
        pipelined = "  pipelined over segments" if row["pipelined"] else ""
        print(f"  {row['algorithm']:<{width}}  {row['predicted_us']:>10.1f} us{pipelined}")
    print("algorithms")
    for name, algorithm in ALGORITHMS.items():
        print(f"  {name:<{width}}  {algorithm.summary}")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not accepted; accepted: an integer >= 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="commlab", description="Collective communication for deep learning."
    )
    parser.add_argument("--version", action="version", version=f"commlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    algorithms = sub.add_parser(
        "algorithms", help="list every collective op and the algorithms that implement it"
    )
    algorithms.add_argument("--json", action="store_true", help="print JSON instead of a table")
    algorithms.add_argument("--ranks", type=_positive_int, default=8, help="world size of the example")
    algorithms.add_argument(
        "--bytes", type=_positive_int, default=1 << 20, help="message size of the example (bytes per rank)"
    )
    algorithms.set_defaults(run=_algorithms)
    add_bench_parser(sub)
    add_sim_parser(sub)
    add_plan_parser(sub)
    add_calibrate_parser(sub)
    add_tune_parser(sub)
    add_testbed_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except CommlabError as error:  # bad input, a bad file, a wrong schedule: one line, not a traceback
        print(f"commlab {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
