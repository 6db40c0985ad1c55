"""`commlab bench`: nccl-tests-style sweeps of one collective, commlab's algorithms beside the native one.

    commlab bench allreduce -b 8 -e 64M -f 2 --algorithm all --backend gloo -n 4 --check

Launched on its own, it starts `-n` ranks itself (gloo: one process per rank on a local TCP rendezvous;
mpi: `mpiexec -n N`); under torchrun or mpiexec it runs in the ranks it finds. Rank 0 prints the
nccl-tests table (size, count, type, redop, root, time, algbw, busbw, #wrong) plus the native collective's
time and busbw and the ratio native time / commlab time, and an average busbw footer; `--json FILE` keeps
every row and sample with the machine description, `--plot FILE.png` draws busbw against size.

Modules: this one (the configuration and the command line), `launch` (starting ranks), `worker` (what
every rank runs: buffers, timing, the data check), `report` (table, JSON, plot, machine description).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, field

from commlab.errors import CommlabError, invalid

OPS = ("allreduce", "reduce_scatter", "allgather", "broadcast", "reduce")
BACKENDS = ("gloo", "mpi")
DTYPES = ("float32", "float64", "float16", "bfloat16", "int32", "int64", "uint8", "int8")
REDUCE_OPS = ("sum", "avg", "max", "min", "prod")
UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
CONFIG_ENV = "COMMLAB_BENCH_CONFIG"  # how a launcher hands the configuration to the ranks it starts


@dataclass
class BenchConfig:
    """One sweep: an op over sizes min_bytes, min_bytes*factor, ... up to max_bytes, for some algorithms."""

    op: str = "allreduce"
    min_bytes: int = 8
    max_bytes: int = 64 << 20
    factor: int = 2
    algorithms: list[str] = field(default_factory=lambda: ["auto"])
    backend: str = "gloo"
    ranks: int = 4
    dtype: str = "float32"
    redop: str = "sum"
    root: int = 0
    iters: int = 20
    warmup: int = 5
    repeats: int = 5  # timed samples per row, interleaved across algorithms; the median is reported
    sample_seconds: float = 0.0  # > 0: fewer iterations per sample where a call is slow (see worker)
    check: bool = True  # count wrong elements (#wrong) against locally computed expected values
    arg_check: bool = True  # commlab's cross-rank argument check on every call (its default)
    native: bool = True
    json_path: str | None = None
    plot_path: str | None = None
    progress: bool = True
    timeout: float = 600.0  # seconds for any one collective

    def sizes(self) -> list[int]:
        """The swept sizes in bytes: min_bytes times powers of factor, up to max_bytes."""
        sizes, size = [], self.min_bytes
        while size <= self.max_bytes:
            sizes.append(size)
            if self.factor == 1:
                break
            size *= self.factor
        return sizes

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> BenchConfig:
        return cls(**json.loads(os.environ[CONFIG_ENV]))


def parse_size(text: str) -> int:
    """Bytes from '8', '4K', '64M', '1G' (binary units)."""
    value = text.strip().upper().removesuffix("B")
    try:
        scale = UNITS.get(value[-1:], 1)
        number = int(float(value[:-1]) * scale) if scale > 1 else int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not accepted; accepted: a byte count like 8, 4K, 64M, 1G"
        ) from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not accepted; accepted: a size of at least 1 byte")
    return number


def count_at_least(minimum: int):
    """An argparse type: an integer >= `minimum`, with an error naming what is accepted."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is not accepted; accepted: an integer >= {minimum}")
        return value

    return parse


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
    parser.add_argument("--no-native", dest="native", action="store_false", help="skip the native one")
    parser.add_argument("--json", dest="json_path", metavar="FILE", help="write every row as JSON")
    parser.add_argument("--plot", dest="plot_path", metavar="FILE.png", help="draw busbw against size")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for one collective (600)")
    parser.set_defaults(run=main)


def config_from_args(args: argparse.Namespace, launched: str | None) -> BenchConfig:
    """Validate the arguments into a BenchConfig (`launched`: the launcher found, if any)."""
    from commlab.bench.launch import backend_for
    from commlab.collectives.algorithms import algorithms_for

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
        native=args.native,
        json_path=args.json_path,
        plot_path=os.path.abspath(args.plot_path) if args.plot_path else None,
        progress=args.progress,
        timeout=args.timeout,
    )


def main(args: argparse.Namespace) -> int:
    """`commlab bench`: run in the ranks of a launcher already running, or launch ranks and wait."""
    from commlab.bench.launch import detect_launcher, launch
    from commlab.bench.worker import run_worker

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
        run_worker(config)
        return 0
    return launch(config)
