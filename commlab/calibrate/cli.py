"""`commlab calibrate`'s command line: the arguments, their checks, running in a launcher's ranks or
launching them, and `--refit` (the package docstring describes the command)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from commlab.bench.config import count_at_least, parse_size
from commlab.bench.launch import backend_for, detect_launcher
from commlab.calibrate.config import BACKENDS, DTYPES, QUICK, CalibrateConfig
from commlab.collectives.calibration import Calibration
from commlab.errors import InvalidArgumentError, invalid


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `commlab calibrate` on the CLI's subcommands."""
    parser = sub.add_parser(
        "calibrate",
        help="measure this host's transport (latency, bandwidth, reduction) into a profile file",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--backend", choices=BACKENDS, default=None, help="gloo (default) or mpi")
    parser.add_argument("-n", "--ranks", type=count_at_least(2), default=4, help="ranks to launch (4)")
    parser.add_argument("-o", "--output", default=None, help="profile file (default commlab-<backend>.json)")
    parser.add_argument("-b", "--minbytes", type=parse_size, default=None, help="smallest message (8)")
    parser.add_argument(
        "-e", "--maxbytes", type=parse_size, default=None, help="largest message (64M; quick 1M)"
    )
    parser.add_argument(
        "-f", "--stepfactor", type=count_at_least(2), default=None, help="size multiplier (2; quick 4)"
    )
    parser.add_argument(
        "--repeats", type=count_at_least(1), default=None, help="samples per size and pass; median (3)"
    )
    parser.add_argument(
        "--passes", type=count_at_least(1), default=None, help="sweeps over all sizes; median (3; quick 1)"
    )
    parser.add_argument(
        "--sample-seconds", type=float, default=None, help="seconds per sample (0.04; quick 0.01)"
    )
    parser.add_argument(
        "--dtypes", default=None, help=f"reduction dtypes, comma-separated (default all: {','.join(DTYPES)})"
    )
    parser.add_argument("--quick", action="store_true", help="a coarse profile in seconds (for tests)")
    parser.add_argument(
        "--refit",
        metavar="PROFILE",
        default=None,
        help="measure nothing: fit the measurements stored in PROFILE again (after the fitting code "
        "changed) and write the result to -o (default: PROFILE itself)",
    )
    parser.add_argument(
        "--no-algorithms",
        dest="algorithms",
        action="store_false",
        help="do not time the algorithms themselves (then auto ranks them by the fitted formulas alone)",
    )
    parser.add_argument(
        "--algorithm-sizes",
        default=None,
        metavar="SIZES",
        help="total sizes at which the algorithms are timed, comma-separated (1K,64K,4M; default 1 KiB x "
        "4^i up to -e, quick 16^i)",
    )
    parser.add_argument("--json", action="store_true", help="print the profile instead of the report")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress output")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for any one call (300)")
    parser.set_defaults(run=main)


def config_from_args(args: argparse.Namespace, launched: str | None) -> CalibrateConfig:
    """Validate the arguments into a CalibrateConfig (`launched`: the launcher found, if any)."""
    backend = backend_for(args.backend, launched, "calibrate")
    values = dict(QUICK) if args.quick else {}
    for key, given in (
        ("min_bytes", args.minbytes),
        ("max_bytes", args.maxbytes),
        ("factor", args.stepfactor),
        ("repeats", args.repeats),
        ("passes", args.passes),
        ("sample_seconds", args.sample_seconds),
    ):
        if given is not None:
            values[key] = given
    if args.algorithm_sizes is not None:
        try:
            sizes = [parse_size(part) for part in args.algorithm_sizes.split(",") if part.strip()]
        except (argparse.ArgumentTypeError, ValueError) as error:
            raise invalid("--algorithm-sizes", args.algorithm_sizes, f"sizes like 64K,1M ({error})") from None
        if not sizes or sizes != sorted(set(sizes)):
            raise invalid("--algorithm-sizes", args.algorithm_sizes, "increasing sizes, e.g. 64K,1M,4M")
        values["timed_sizes"] = sizes
    if args.dtypes is not None:
        dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
        for name in dtypes:
            if name not in DTYPES:
                raise invalid("--dtypes", name, DTYPES)
        values["dtypes"] = dtypes
    config = CalibrateConfig(
        backend=backend,
        ranks=args.ranks,
        output=os.path.abspath(args.output or f"commlab-{backend}.json"),
        quick=args.quick,
        timeout=args.timeout,
        progress=args.progress,
        algorithms=args.algorithms,
        **values,
    )
    if config.max_bytes < config.min_bytes:
        raise invalid("-e/--maxbytes", config.max_bytes, f"at least -b/--minbytes = {config.min_bytes}")
    if len(config.sizes()) < 2:
        raise invalid("-b/-e/-f", (config.min_bytes, config.max_bytes), "a range of at least two sizes")
    if not config.sample_seconds > 0 or not config.timeout > 0:
        raise invalid("--sample-seconds/--timeout", (config.sample_seconds, config.timeout), "numbers > 0")
    return config


def main(args: argparse.Namespace) -> int:
    """`commlab calibrate`: run in the ranks of a launcher already running, or launch ranks and wait."""
    if args.refit is not None:
        return refit(args.refit, args.output or args.refit, args.json)
    from commlab.calibrate.worker import launch, run_worker  # imports torch: not at `commlab` start-up

    launched = detect_launcher()
    config = config_from_args(args, launched)
    config_json = args.json
    if launched:
        run_worker(config, print_json=config_json)
        return 0
    return launch(config, print_json=config_json)


def refit(source: str, output: str, print_json: bool = False) -> int:
    """Fit the measurements stored in the profile `source` again and save the result to `output`."""
    from commlab.calibrate.profile import build_calibration, report  # imports torch

    stored = Calibration.load(source)  # checks the file; its measurements are fitted again below
    if not stored.measurements.get("ring"):
        raise InvalidArgumentError(f"--refit {source}: the profile holds no measurements to fit")
    known = set(CalibrateConfig.__dataclass_fields__)
    settings = {k: v for k, v in stored.settings.items() if k in known}
    config = CalibrateConfig(backend=stored.backend, output=os.path.abspath(output), **settings)
    calibration = build_calibration(config, stored.measurements, stored.machine)
    calibration.save(config.output)
    print(json.dumps(calibration.to_dict(), indent=1) if print_json else report(calibration))
    print(f"profile refitted from {source}, written to {config.output}", file=sys.stderr)
    return 0
