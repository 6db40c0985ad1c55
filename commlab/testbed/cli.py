"""`commlab testbed`: emulated hosts on this machine, built from a simulator topology (needs root).

    commlab testbed up --topology switch:n=2,bandwidth=200Mb/s [--ranks-per-host 2]
    commlab testbed status | check | down [--all]
    commlab testbed exec npu0 -- hostname
    commlab testbed run [--launcher mpi] -- commlab bench allreduce -b 1M -e 64M
    commlab testbed run --topology switch:n=2,bandwidth=200Mb/s -- python examples/ddp.py --steps 10

`up` leaves the testbed standing until `down`; `run --topology` builds one for the command alone and
removes it when the command ends, fails, or is interrupted. `--run ID` picks a run (default: the newest).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

from commlab.errors import TestbedError


def _command(args: argparse.Namespace) -> list[str]:
    command = list(args.program)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise TestbedError(f"commlab testbed {args.action}: give the command after --")
    return command


def _up(args: argparse.Namespace) -> int:
    from commlab.testbed.testbed import Testbed

    testbed = Testbed.up(args.topology, args.ranks_per_host, bucket=args.bucket_ms / 1e3)
    if args.json:
        print(json.dumps({"run": testbed.run, "plan": testbed.plan.to_dict()}, indent=1))
    else:
        print("\n".join(testbed.describe()))
        print(f"commlab testbed down --run {testbed.run}   # to remove it")
    return 0


def _down(args: argparse.Namespace) -> int:
    from commlab.testbed import testbed as tb

    deleted = tb.remove_all() if args.all else tb.remove_run(tb.load(args.run_id).run)
    print(f"removed {len(deleted)} namespaces" + (f": {', '.join(deleted)}" if deleted else ""))
    return 0


def _status(args: argparse.Namespace) -> int:
    from commlab.testbed import testbed as tb

    known = tb.runs()
    if args.run_id is None and not known:
        print(f"no testbed is up (none recorded in {tb.state_dir()})")
        return 0
    testbed = tb.load(args.run_id)
    if args.json:
        print(json.dumps({"run": testbed.run, "runs": known, "plan": testbed.plan.to_dict()}, indent=1))
        return 0
    print("\n".join(testbed.describe()))
    from commlab.testbed.system import namespaces

    missing = sorted(set(testbed.namespaces()) - set(namespaces()))
    if missing:
        print(
            f"namespaces missing (a crashed run?): {', '.join(missing)}; "
            "`commlab testbed down` removes the rest"
        )
    if len(known) > 1:
        print(f"other runs: {', '.join(r for r in known if r != testbed.run)}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from commlab.testbed import check
    from commlab.testbed import testbed as tb

    results = check.check(tb.load(args.run_id), seconds=args.seconds)
    if args.json:
        print(json.dumps(check.as_json(results), indent=1))
    else:
        print("\n".join(check.report(results)))
    return 0 if all(r.passed for r in results) else 1


def _exec(args: argparse.Namespace) -> int:
    from commlab.testbed import launch
    from commlab.testbed import testbed as tb

    return launch.execute(tb.load(args.run_id), args.host, _command(args), args.timeout)


def _run(args: argparse.Namespace) -> int:
    from commlab.testbed import launch
    from commlab.testbed import testbed as tb

    command = _command(args)
    if args.topology is None:
        testbed = tb.load(args.run_id)
        return launch.run(testbed, command, args.launcher, args.timeout, max_restarts=args.max_restarts)
    with tb.Testbed.up(args.topology, args.ranks_per_host, bucket=args.bucket_ms / 1e3) as testbed:
        return launch.run(testbed, command, args.launcher, args.timeout, max_restarts=args.max_restarts)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM tears down like Ctrl-C


def main(args: argparse.Namespace) -> int:
    """`commlab testbed ACTION`: SIGTERM is turned into Ctrl-C, so a testbed being built or used for one
    command is removed either way."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return args.action_run(args)
    except KeyboardInterrupt:
        print("commlab testbed: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `commlab testbed` on the CLI's subcommands."""
    from commlab.testbed import system
    from commlab.testbed.launch import DEFAULT_TIMEOUT, LAUNCHERS

    parser = sub.add_parser(
        "testbed",
        help="emulated hosts (network namespaces, bridges, tc) built from a topology; needs root",
        description=__doc__.split("\n\n")[0],
    )
    parser.set_defaults(run=main)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    def topology_args(p: argparse.ArgumentParser, required: bool) -> None:
        p.add_argument(
            "--topology",
            required=required,
            help="a topology spec or file, as `commlab sim` takes (hosts on switches: switch:n=4,"
            "bandwidth=1Gb/s; fat-tree:k=2; a file with 'nic' nodes for several ranks per host)",
        )
        p.add_argument(
            "--ranks-per-host",
            default="1",
            help="ranks on every host (1), or one count per host separated by commas ('3,1': uneven hosts)",
        )
        p.add_argument(
            "--bucket-ms",
            type=float,
            default=system.BUCKET_SECONDS * 1e3,
            help=f"each wire's tbf bucket in ms of its rate ({system.BUCKET_SECONDS * 1e3:g}; at least "
            f"{system.MIN_BUCKET_BYTES >> 10} KiB): what a message may send faster than the wire after idle",
        )

    def run_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--run", dest="run_id", help="the run id (default: the newest run)")

    up = actions.add_parser("up", help="build the emulated hosts and links of a topology")
    topology_args(up, True)
    up.add_argument("--json", action="store_true", help="print the plan as JSON")
    up.set_defaults(action_run=_up)

    down = actions.add_parser("down", help="remove a testbed (also a crashed run's leftovers)")
    run_arg(down)
    down.add_argument("--all", action="store_true", help="remove every testbed run and leftover namespace")
    down.set_defaults(action_run=_down)

    status = actions.add_parser("status", help="the hosts, addresses and links of a testbed")
    run_arg(status)
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(action_run=_status)

    check = actions.add_parser("check", help="measure every link's throughput and round trip")
    run_arg(check)
    check.add_argument("--seconds", type=float, default=1.0, help="TCP traffic per direction (1 s)")
    check.add_argument("--json", action="store_true", help="print JSON")
    check.set_defaults(action_run=_check)

    execute = actions.add_parser("exec", help="run a command on one emulated host")
    run_arg(execute)
    execute.add_argument("host", help="a hostname (npu0), a topology node, or an index")
    execute.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds (3600)")
    execute.add_argument("program", nargs=argparse.REMAINDER, help="-- CMD ARGS")
    execute.set_defaults(action_run=_exec)

    run = actions.add_parser("run", help="run a command on every host under torchrun or mpiexec")
    run_arg(run)
    topology_args(run, False)
    run.add_argument("--launcher", choices=LAUNCHERS, default="torchrun", help="torchrun (default) or mpi")
    run.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds (3600)")
    run.add_argument("--max-restarts", type=int, default=0, help="torchrun --max-restarts (0)")
    run.add_argument("program", nargs=argparse.REMAINDER, help="-- CMD ARGS")
    run.set_defaults(action_run=_run)
