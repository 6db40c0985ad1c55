"""Does the simulator predict this machine? Measured collectives against the calibrated simulator.

    python benchmarks/sim_vs_measured.py [--quick] [--backend gloo,mpi] [--ranks 2,3,4]
        [--profile-gloo FILE] [--profile-mpi FILE] [--json out.json] [--plot out.png] [--report out.md]

1. Calibration: unless a profile is given per backend, it runs `commlab calibrate -n max(ranks)` first
   (a separate run: the validation never fits on its own data).
2. Measurement: for every backend and world size it launches the ranks, which time commlab's own
   execution (check=False) of every algorithm of allreduce, reduce_scatter and allgather at every size:
   `repeats` interleaved samples (the first algorithm rotates), a sample being the slowest rank's mean
   time per call; the median sample is kept. Algorithms whose schedules coincide at a world size (on 2
   ranks ring, direct and halving-doubling send the same messages) run the same program: it is timed
   once for all of them, so noise cannot make one of two identical programs look faster than the other.
3. Prediction: the same schedule (same segments and slices) simulated on `local:p` with the calibrated
   profile (flow fidelity).
Reported: per case the measured and predicted time and the relative error; the median and max absolute
error at sizes >= 64 KiB over the validated algorithms (ring, tree and halving_doubling allreduce, ring
reduce_scatter and allgather); the auto hit rate: in how many (backend, op, world size, size) cases the
algorithm auto picks under the profile is within 10% of the fastest one measured (and the same for the
choice of the fitted formulas alone, ignoring the algorithm times the profile measured in its own run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

VALIDATED = {
    "allreduce": ("ring", "tree", "halving_doubling"),
    "reduce_scatter": ("ring",),
    "allgather": ("ring",),
}
CONFIG_ENV = "COMMLAB_SIM_VS_MEASURED"
TARGET_MEDIAN, TARGET_MAX, TARGET_HIT = 0.10, 0.25, 0.90
ERROR_FROM = 64 << 10


@dataclass
class Config:
    backend: str = "gloo"
    sizes: list[int] = field(default_factory=lambda: [4 << 10 << 2 * i for i in range(7)])
    repeats: int = 5
    sample_seconds: float = 0.05
    profile: str = ""
    output: str = ""
    timeout: float = 300.0


def _algorithms(op: str) -> tuple[str, ...]:
    from commlab.collectives.algorithms import algorithms_for

    return algorithms_for(op, topology_aware=False)  # measured on one host: the flat algorithms


# ------------------------------------------------------------------------------------------ rank side


def _join(config: Config):
    """(communicator, rank, world, barrier, max_all) of the configured backend."""
    import torch

    import commlab

    torch.set_num_threads(1)
    if config.backend == "mpi":
        from mpi4py import MPI

        from commlab.collectives.mpi import MPITransport

        world = MPI.COMM_WORLD
        comm = commlab.Communicator(
            MPITransport(world, timeout=config.timeout), check=False, profile=config.profile
        )

        def wait(request) -> None:
            while not request.Test():
                time.sleep(50e-6)

        def max_all(values):
            out = values.clone()
            wait(world.Iallreduce(MPI.IN_PLACE, out.numpy(), op=MPI.MAX))
            return out

        return comm, world.Get_rank(), world.Get_size(), lambda: wait(world.Ibarrier()), max_all, lambda: None
    from datetime import timedelta

    import torch.distributed as dist

    from commlab.collectives.transport import TorchTransport

    dist.init_process_group("gloo", timeout=timedelta(seconds=config.timeout))
    comm = commlab.Communicator(TorchTransport(), check=False, profile=config.profile)

    def gloo_max(values):
        out = values.clone()
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
        return out

    def close() -> None:
        commlab.release()
        dist.destroy_process_group()

    return comm, dist.get_rank(), dist.get_world_size(), dist.barrier, gloo_max, close


def _call(op: str, algorithm: str, comm, count: int, world: int):
    import torch

    import commlab

    if op == "allreduce":
        work = torch.zeros(count)
        return lambda: commlab.all_reduce(work, algorithm=algorithm, group=comm)
    if op == "reduce_scatter":
        src, out = torch.zeros(count * world), torch.zeros(count)
        return lambda: commlab.reduce_scatter(out, src, algorithm=algorithm, group=comm)
    src, out = torch.zeros(count), torch.zeros(count * world)
    return lambda: commlab.all_gather(out, src, algorithm=algorithm, group=comm)


def worker(config: Config) -> None:
    """Time every algorithm of every op at every size on these ranks; rank 0 writes the rows."""
    import torch

    from commlab.collectives.algorithms import build_schedule
    from commlab.collectives.tuning import choose, resolve

    comm, rank, world, barrier, max_all, close = _join(config)
    rows = []
    for size in config.sizes:
        variants = []
        for op in VALIDATED:
            count = size // 4 // world if op != "allreduce" else size // 4
            nbytes = count * 4 * (world if op != "allreduce" else 1)
            model = comm.cost_model_for(torch.float32)
            for algorithm in _algorithms(op):
                choice = resolve(op, algorithm, world, nbytes, model, comm.piece_bytes)
                schedule = build_schedule(op, algorithm, world, segments=choice.segments)
                variants.append(
                    {"op": op, "algorithm": algorithm, "nbytes": nbytes, "segments": choice.segments,
                     "pieces": choice.pieces, "call": _call(op, algorithm, comm, count, world),
                     "program": (op, schedule.num_chunks, schedule.steps, choice.pieces)}
                )  # fmt: skip
            auto = resolve(op, "auto", world, nbytes, model, comm.piece_bytes)
            formulas = choose(op, world, nbytes, dataclasses.replace(model, measured=None))
            for v in variants[-len(_algorithms(op)) :]:
                v["auto"], v["auto_formulas"] = auto.algorithm, formulas.algorithm
        # Algorithms whose schedules coincide here (ring, direct, halving-doubling... on 2 ranks) are one
        # program: it is timed once and its samples stand for each of them.
        first = {}
        for i, v in enumerate(variants):
            first.setdefault(v["program"], i)
        timed = sorted(first.values())
        warm = torch.zeros(len(variants), dtype=torch.float64)
        for i in timed:
            barrier()
            variants[i]["call"]()
            start = time.perf_counter()
            variants[i]["call"]()
            warm[i] = time.perf_counter() - start
        warm = max_all(warm)
        iters = [max(1, min(50, int(config.sample_seconds / max(float(w), 1e-7)))) for w in warm]
        samples = torch.zeros(config.repeats, len(variants), dtype=torch.float64)
        for rep in range(config.repeats):
            for shift in range(len(timed)):
                i = timed[(rep + shift) % len(timed)]
                barrier()
                start = time.perf_counter()
                for _ in range(iters[i]):
                    variants[i]["call"]()
                samples[rep, i] = (time.perf_counter() - start) / iters[i]
        samples = max_all(samples)
        for i, v in enumerate(variants):
            samples[:, i], iters[i] = samples[:, first[v["program"]]], iters[first[v["program"]]]
            keys = ("op", "algorithm", "nbytes", "segments", "pieces", "auto", "auto_formulas")
            row = {k: v[k] for k in keys}
            row.update(backend=config.backend, world_size=world, size=size, iters=iters[i])
            row["samples_s"] = samples[:, i].tolist()
            row["measured_s"] = statistics.median(row["samples_s"])
            rows.append(row)
        if rank == 0:
            print(f"  {config.backend} {world} ranks {size} B done", file=sys.stderr, flush=True)
    if rank == 0:
        with open(config.output, "w") as out:
            json.dump(rows, out)
    barrier()
    close()


# ------------------------------------------------------------------------------------------ launcher side


def launch(config: Config, ranks: int) -> list[dict]:
    """Run the worker on `ranks` ranks of `config.backend`; the rows rank 0 wrote."""
    from commlab.bench.launch import find_mpiexec, free_port, wait_for

    env = dict(os.environ, OMP_NUM_THREADS="1")
    env[CONFIG_ENV] = json.dumps(asdict(config))
    command = [sys.executable, os.path.abspath(__file__), "--worker"]
    if config.backend == "mpi":
        procs = [subprocess.Popen([find_mpiexec(), "-n", str(ranks), *command], env=env)]
    else:
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(ranks))
        procs = [
            subprocess.Popen(
                command, env=dict(env, RANK=str(r), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(ranks))
            )
            for r in range(ranks)
        ]
    code = wait_for(procs)
    if code:
        raise SystemExit(f"{config.backend} ranks failed with exit status {code}")
    with open(config.output) as rows:
        return json.load(rows)


def calibrate(backend: str, ranks: int, quick: bool, path: str) -> None:
    """`commlab calibrate` into `path` (its report goes to stderr)."""
    command = [
        sys.executable,
        "-m",
        "commlab.cli",
        "calibrate",
        "--backend",
        backend,
        "-n",
        str(ranks),
        "-o",
        path,
    ]
    if quick:
        command.append("--quick")
    else:
        command += ["--dtypes", "float32"]
    print(f"calibrating {backend} on {ranks} ranks: {' '.join(command[2:])}", file=sys.stderr, flush=True)
    result = subprocess.run(
        command, stdout=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1")
    )
    sys.stderr.write(result.stdout)
    if result.returncode:
        raise SystemExit(f"calibration of {backend} failed with exit status {result.returncode}")


def predict(rows: list[dict], profile_path: str) -> None:
    """Add the simulator's prediction (flow fidelity on local:p) to every row."""
    from commlab.collectives.algorithms import build_schedule
    from commlab.collectives.schedule import subdivide
    from commlab.sim import Topology
    from commlab.sim.network.collective import simulate
    from commlab.sim.network.profile import Profile
    from commlab.sim.network.topology import local

    profile = Profile.load(profile_path)
    topologies: dict[int, Topology] = {}
    for row in rows:
        p = row["world_size"]
        topology = topologies.setdefault(p, Topology(local(p)))
        schedule = subdivide(
            build_schedule(row["op"], row["algorithm"], p, None, row["segments"]), row["pieces"]
        )
        result = simulate(
            schedule, topology, row["nbytes"], dtype="float32", fidelity="flow", profile=profile
        )
        row["predicted_s"] = result.time
        row["error"] = result.time / row["measured_s"] - 1


def summarize(rows: list[dict]) -> dict:
    """Error statistics of the validated cases at sizes >= 64 KiB, and the auto hit rate."""
    validated = [r for r in rows if r["algorithm"] in VALIDATED[r["op"]]]
    large = [abs(r["error"]) for r in validated if r["size"] >= ERROR_FROM]
    summary: dict = {
        "cases": len(validated),
        "cases_from_64KiB": len(large),
        "median_abs_error": statistics.median(large) if large else None,
        "max_abs_error": max(large) if large else None,
    }
    per_backend = {}
    for backend in sorted({r["backend"] for r in rows}):
        errs = [abs(r["error"]) for r in validated if r["backend"] == backend and r["size"] >= ERROR_FROM]
        per_backend[backend] = {"median_abs_error": statistics.median(errs), "max_abs_error": max(errs)}
    summary["per_backend"] = per_backend
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["backend"], r["op"], r["world_size"], r["size"]), []).append(r)
    summary["auto_cases"] = len(groups)
    for field_name, label in (("auto", "auto"), ("auto_formulas", "auto_formulas")):
        hits, misses = 0, []
        for key, group in groups.items():
            best = min(group, key=lambda r: r["measured_s"])
            chosen = next(r for r in group if r["algorithm"] == group[0].get(field_name, group[0]["auto"]))
            if chosen["measured_s"] <= 1.1 * best["measured_s"]:
                hits += 1
            else:
                misses.append(
                    {"case": list(key), "auto": chosen["algorithm"], "best": best["algorithm"],
                     "slower_by": chosen["measured_s"] / best["measured_s"] - 1}
                )  # fmt: skip
        summary[f"{label}_hit_rate"] = hits / len(groups) if groups else None
        summary[f"{label}_misses"] = misses
    return summary


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| backend | op | algorithm | ranks | size | measured (us) | predicted (us) | error |",
        "|" + "---|" * 8,
    ]
    for r in rows:
        if r["algorithm"] not in VALIDATED[r["op"]]:
            continue
        lines.append(
            f"| {r['backend']} | {r['op']} | {r['algorithm']} | {r['world_size']} | {_fmt(r['size'])} | "
            f"{r['measured_s'] * 1e6:.1f} | {r['predicted_s'] * 1e6:.1f} | {r['error'] * 100:+.1f}% |"
        )
    return lines


def _fmt(size: int) -> str:
    for unit, scale in (("M", 1 << 20), ("K", 1 << 10)):
        if size >= scale:
            return f"{size // scale}{unit}"
    return str(size)


def summary_lines(summary: dict) -> list[str]:
    def pct(x):
        return "n/a" if x is None else f"{x * 100:.1f}%"

    lines = [
        f"- prediction error at sizes >= 64 KiB ({summary['cases_from_64KiB']} cases): median "
        f"{pct(summary['median_abs_error'])} (target <= 10%), "
        f"max {pct(summary['max_abs_error'])} (target <= 25%)"
    ]
    for backend, stats in summary["per_backend"].items():
        lines.append(
            f"  - {backend}: median {pct(stats['median_abs_error'])}, max {pct(stats['max_abs_error'])}"
        )
    lines.append(
        f"- auto within 10% of the best measured algorithm: {pct(summary['auto_hit_rate'])} of "
        f"{summary['auto_cases']} cases (target >= 90%); ranking by the fitted formulas alone (the "
        f"profile's algorithm times ignored): {pct(summary.get('auto_formulas_hit_rate'))}"
    )
    for miss in summary["auto_misses"]:
        backend, op, p, size = miss["case"]
        lines.append(
            f"  - miss: {backend} {op} {p} ranks {_fmt(size)}: auto {miss['auto']}, best {miss['best']} "
            f"({miss['slower_by'] * 100:.0f}% slower)"
        )
    return lines


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = sorted({r["backend"] for r in rows})
    worlds = sorted({r["world_size"] for r in rows})
    fig, axes = plt.subplots(
        len(backends) * 3, len(worlds), figsize=(4.2 * len(worlds), 3.2 * 3 * len(backends)), squeeze=False
    )
    for bi, backend in enumerate(backends):
        for oi, op in enumerate(VALIDATED):
            for wi, p in enumerate(worlds):
                ax = axes[bi * 3 + oi][wi]
                for ci, algorithm in enumerate(VALIDATED[op]):
                    sel = [r for r in rows if (r["backend"], r["op"], r["algorithm"], r["world_size"]) ==
                           (backend, op, algorithm, p)]  # fmt: skip
                    if not sel:
                        continue
                    x = [r["size"] for r in sel]
                    color = f"C{ci}"
                    ax.plot(
                        x,
                        [r["measured_s"] * 1e3 for r in sel],
                        "o-",
                        color=color,
                        label=f"{algorithm} measured",
                    )
                    ax.plot(
                        x,
                        [r["predicted_s"] * 1e3 for r in sel],
                        "x--",
                        color=color,
                        label=f"{algorithm} predicted",
                    )
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_title(f"{backend} {op}, {p} ranks", fontsize=9)
                ax.set_xlabel("bytes")
                ax.set_ylabel("ms")
                ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=40)  # about 120 KB: a figure to glance at, the numbers are in the report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="fewer sizes and ranks (about 2 minutes)")
    parser.add_argument("--backend", default="gloo,mpi", help="gloo, mpi or gloo,mpi (default both)")
    parser.add_argument("--ranks", default=None, help="world sizes (default 2,3,4; quick 2,4)")
    parser.add_argument("--repeats", type=int, default=None, help="samples per case; median (5; quick 3)")
    parser.add_argument("--profile-gloo", default=None, help="gloo calibration (default: calibrate first)")
    parser.add_argument("--profile-mpi", default=None, help="mpi calibration (default: calibrate first)")
    parser.add_argument("--json", default=None, help="write every row and the summary here")
    parser.add_argument("--plot", default=None, help="write predicted vs measured (PNG) here")
    parser.add_argument("--report", default=None, help="write a markdown report here")
    args = parser.parse_args(argv)
    if args.worker:
        worker(Config(**json.loads(os.environ[CONFIG_ENV])))
        return 0
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    for b in backends:
        if b not in ("gloo", "mpi"):
            parser.error(f"--backend {b!r} is not accepted; accepted: gloo, mpi")
    ranks = [int(x) for x in (args.ranks or ("2,4" if args.quick else "2,3,4")).split(",")]
    sizes = [64 << 10, 1 << 20, 8 << 20] if args.quick else [4 << 10 << 2 * i for i in range(7)] + [64 << 20]
    sizes = sorted(set(sizes))
    repeats = args.repeats or (3 if args.quick else 5)
    started = time.monotonic()
    rows: list[dict] = []
    profiles = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in backends:
            given = getattr(args, f"profile_{backend}")
            path = given or os.path.join(tmp, f"calibration-{backend}.json")
            if not given:
                calibrate(backend, max(ranks), args.quick, path)
            profiles[backend] = os.path.abspath(path)
            for p in ranks:
                print(f"measuring {backend} on {p} ranks", file=sys.stderr, flush=True)
                config = Config(backend, sizes, repeats, 0.02 if args.quick else 0.05, profiles[backend],
                                os.path.join(tmp, f"rows-{backend}-{p}.json"))  # fmt: skip
                backend_rows = launch(config, p)
                predict(backend_rows, profiles[backend])
                rows += backend_rows
        if args.json:
            calibrations = {b: json.loads(Path(path).read_text()) for b, path in profiles.items()}
    summary = summarize(rows)
    elapsed = time.monotonic() - started
    command = "python benchmarks/sim_vs_measured.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [*table(rows), "", *summary_lines(summary), "", f"({elapsed:.0f} s; `{command.strip()}`)"]
    print("\n".join(lines))
    if args.json:
        from commlab.bench.report import machine_description

        with open(args.json, "w") as out:
            json.dump(
                {"machine": machine_description(), "summary": summary, "rows": rows, "profiles": calibrations,
                 "command": command, "seconds": elapsed}, out, indent=1,
            )  # fmt: skip
    if args.plot:
        plot(rows, args.plot)
    if args.report:
        from commlab.bench.report import machine_description

        m = machine_description()
        head = [
            "# Simulator vs measured on this machine (generated by benchmarks/sim_vs_measured.py)",
            "",
            f"Machine: {m['host']}, {m['cpu']}, {m['logical_cores']} cores, load {m['load_average']}, "
            f"torch {m['torch']}, {m['time']}. Command: `{command.strip()}` ({elapsed:.0f} s).",
            "",
            "Measured: commlab's own execution (check=False), median of interleaved samples, slowest rank. "
            "Predicted: the same schedule on `local:p` with the calibrated profile, flow fidelity.",
            "",
            "## Summary",
            "",
        ]
        with open(args.report, "w") as out:
            out.write(
                "\n".join(head + summary_lines(summary) + ["", "## Every case", ""] + table(rows)) + "\n"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
