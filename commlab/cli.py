"""The `commlab` command. Subcommands: `algorithms` (more arrive with the benchmark and simulator)."""

from __future__ import annotations

import argparse
import json
import sys

from commlab import __version__


def _algorithms(args: argparse.Namespace) -> int:
    """Print every op with the algorithms that implement it and their cost formulas."""
    from commlab.collectives.algorithms import ALGORITHMS
    from commlab.collectives.schedule import OPS

    rows = []
    for op in OPS:
        for name, algorithm in ALGORITHMS.items():
            if op in algorithm.ops:
                rows.append(
                    {
                        "op": op,
                        "algorithm": name,
                        "pipelined": algorithm.pipelined,
                        "cost": algorithm.formula(op),
                    }
                )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["algorithm"]) for r in rows)
    current = None
    for row in rows:
        if row["op"] != current:
            current = row["op"]
            print(f"{current}")
        pipelined = " (pipelined)" if row["pipelined"] else ""
        print(f"  {row['algorithm']:<{width}}  {row['cost']}{pipelined}")
    return 0


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
    algorithms.set_defaults(run=_algorithms)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
