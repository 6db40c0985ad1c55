"""Simulator speed, measured (not asserted): how long each fidelity takes, and how that grows with ranks.

    python benchmarks/sim_speed.py                   # all parts, several minutes on 2 busy cores
    python benchmarks/sim_speed.py --trials 5        # median of more runs
    python benchmarks/sim_speed.py --quick           # smaller sizes, a smoke run
    python benchmarks/sim_speed.py --parts command   # whole `commlab sim collective` commands only

Parts (targets from issues 5 and 20 in brackets):
  command     whole commands, start-up included, each a fresh `python -m commlab.cli sim collective ...`
              process (wall and CPU seconds, median of --trials): ring allreduce 1 GiB on a k=16 fat-tree
              (1024 ranks), flow [<= 5 s]; tree allreduce 1 GiB on a k=64 fat-tree (65,536 ranks),
              congestion [<= 30 s] (with --big only: about a minute and ~5 GB a run today; its
              first run also stores the k=64 distance table, ~290 MB, in the route cache); the same commands
              at growing rank counts; and next to them the engine alone in this process (the schedule
              as rows and its simulation on a fresh Topology: no start-up, no topology parsing)
  flow        ring allreduce of 1 GiB on 1024 ranks of a k=16 fat-tree, flow fidelity [<= 10 s]; and the
              event-driven engine forced on (no contention-free fast path) at 128 ranks, with events/s
  congestion  double-binary-tree allreduce of 1 GiB on 16384 ranks of a k=32 fat-tree with 2:1 edge
              oversubscription, congestion fidelity [<= 10 s]
  analytic    ring allreduce on a 1,000,000-rank ring [< 1 s]
  growth      time per fidelity against ranks

What is timed: the simulation of an already built schedule on an already built topology (compiling the
schedule to arrays, routing its messages and running the engine: `simulate` on a fresh Topology), and for
flow also `simulate` of the same schedule at another size on the same Topology (compiled plan and routes
are reused, as in a size sweep: the engine alone). Building the schedule is the
collectives layer's job and is reported on its own line, as is building the networkx graph. No peer
simulator is installed (ASTRA-sim is C++ and not on PyPI), so this benchmark has no side-by-side column.
Writes everything, with a description of the machine, to --json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from commlab.collectives.algorithms import ALGORITHMS, vectorized
from commlab.sim.network import topology as topo
from commlab.sim.network.collective import simulate, simulate_collective
from commlab.sim.network.topology import Topology

GIB = 1 << 30


def machine() -> dict:
    """What the figures were measured on (the machine may be shared: load averages are recorded too)."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


@contextmanager
def no_gc():
    """Building millions of small objects: keep the cyclic collector from rescanning them all the time."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def timed(fn, trials: int) -> tuple[float, object]:
    """Median wall time of `trials` calls, and the last result."""
    times, result = [], None
    for _ in range(trials):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def build(op: str, algorithm: str, world: int, segments: int = 1):
    with no_gc():
        start = time.perf_counter()
        schedule = ALGORITHMS[algorithm].build(op, world, segments=segments)
        return schedule, time.perf_counter() - start


def fresh(graph) -> Topology:
    """A new Topology (no cached routes), so every trial pays for compiling and routing."""
    return Topology(graph)


def part_flow(trials: int, quick: bool) -> dict:
    k, world = (8, 128) if quick else (16, 1024)
    graph = topo.fat_tree(k)
    schedule, build_s = build("allreduce", "ring", world)
    t, result = timed(lambda: simulate(schedule, fresh(graph), GIB, fidelity="flow"), trials)
    warm = fresh(graph)
    simulate(schedule, warm, GIB, fidelity="flow")
    size = iter(range(1, 10**6))  # a different size each call: only the plan and routes are reused
    tw, _ = timed(lambda: simulate(schedule, warm, GIB - 4096 * next(size), fidelity="flow"), trials)
    out = {
        "case": f"ring allreduce 1 GiB, {world} ranks, fat-tree k={k}, flow",
        "schedule_build_s": build_s,
        "messages": schedule.num_messages(),
        "simulate_s": t,
        "simulate_another_size_s": tw,
        "events": result.events,
        "events_per_s": result.events / t,
        "events_per_s_another_size": result.events / tw,
        "busbw_GBps": result.busbw / 1e9,
    }
    # The event-driven engine itself, at a size it handles in seconds.
    small, _ = build("allreduce", "ring", 128)
    from commlab.sim.network.engine import routed_plan
    from commlab.sim.network.flow import run_flow

    topology = Topology(topo.fat_tree(8))
    routed = routed_plan(small, topology)
    plan = routed.plan
    msg_bytes = plan.message_bytes(plan.chunk_bytes(GIB, 4)).astype(float)
    from commlab.sim.network.profile import IDEAL

    te, timing = timed(lambda: run_flow(routed, msg_bytes, topology, IDEAL, events=True), trials)
    out["event_engine"] = {
        "case": "ring allreduce 1 GiB, 128 ranks, fat-tree k=8, flow, fast path off",
        "engine_s": te,
        "events": timing.events,
        "events_per_s": timing.events / te,
    }
    return out


def part_congestion(trials: int, quick: bool) -> dict:
    k, ratio, world = (16, 2, 2048) if quick else (32, 2, 16384)
    graph = topo.fat_tree(k, oversubscription=ratio)
    schedule, build_s = build("allreduce", "tree", world, segments=4)
    t, result = timed(lambda: simulate(schedule, fresh(graph), GIB, fidelity="congestion"), trials)
    return {
        "case": f"tree allreduce 1 GiB (4 segments), {world} ranks, fat-tree k={k} {ratio}:1, congestion",
        "schedule_build_s": build_s,
        "messages": schedule.num_messages(),
        "simulate_s": t,
        "rounds": result.events,
        "busbw_GBps": result.busbw / 1e9,
    }


def part_analytic(trials: int, quick: bool) -> dict:
    world = 100_000 if quick else 1_000_000
    start = time.perf_counter()
    with no_gc():
        graph = topo.ring(world)
    graph_s = time.perf_counter() - start
    start = time.perf_counter()
    topology = Topology(graph)
    topology_s = time.perf_counter() - start
    first, _ = timed(lambda: simulate_collective("allreduce", "ring", topology, GIB, fidelity="analytic"), 1)
    t, result = timed(
        lambda: simulate_collective("allreduce", "ring", topology, GIB, fidelity="analytic"), trials
    )
    return {
        "case": f"ring allreduce 1 GiB, {world} ranks, ring, analytic",
        "networkx_graph_build_s": graph_s,
        "topology_compile_s": topology_s,
        "first_call_s": first,
        "simulate_s": t,
        "busbw_GBps": result.busbw / 1e9,
    }


def part_growth(trials: int, quick: bool) -> list[dict]:
    rows = []
    flow_graph = topo.fat_tree(16)
    for world in (64, 128, 256) if quick else (128, 256, 512, 1024):
        schedule, build_s = build("allreduce", "ring", world)
        topology = Topology(flow_graph, placement=list(Topology(flow_graph).placement[:world]))
        t, result = timed(
            lambda s=schedule, tp=topology: simulate(s, Topology(tp.graph, tp.placement), GIB), trials
        )
        rows.append({"fidelity": "flow", "algorithm": "ring", "ranks": world, "simulate_s": t,
                     "build_s": build_s,
                     "events": result.events})  # fmt: skip
        t, result = timed(
            lambda s=schedule, tp=topology: simulate(
                s, Topology(tp.graph, tp.placement), GIB, fidelity="congestion"
            ),
            trials,
        )
        rows.append({"fidelity": "congestion", "algorithm": "ring", "ranks": world, "simulate_s": t,
                     "build_s": build_s, "events": result.events})  # fmt: skip
    congestion_graph = topo.fat_tree(32, oversubscription=2)
    base = Topology(congestion_graph)
    for world in (1024, 2048) if quick else (1024, 4096, 16384):
        schedule, build_s = build("allreduce", "tree", world, segments=4)
        placement = list(base.placement[:world])
        t, result = timed(
            lambda s=schedule, p=placement: simulate(
                s, Topology(congestion_graph, p), GIB, fidelity="congestion"
            ),
            trials,
        )
        rows.append({"fidelity": "congestion", "algorithm": "tree", "ranks": world, "simulate_s": t,
                     "build_s": build_s, "events": result.events})  # fmt: skip
    ring = Topology(topo.ring(4))
    for world in (10**3, 10**4, 10**5, 10**6):
        t, _ = timed(
            lambda w=world: __import__(
                "commlab.sim.network.analytic", fromlist=["analytic_time"]
            ).analytic_time("allreduce", "ring", w, GIB, ring.compiled.bandwidth[0], 1e-6),
            trials,
        )
        rows.append({"fidelity": "analytic", "algorithm": "ring", "ranks": world, "simulate_s": t})
    return rows


ROOT = Path(__file__).resolve().parent.parent
COMMAND_TIMEOUT_S = 900


def run_command(args: list[str]) -> tuple[float, float]:
    """(wall, CPU) seconds of one fresh `commlab` process (CPU: user + system of the child)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "commlab.cli", *args], check=True, env=env, cwd=ROOT,
                   stdout=subprocess.DEVNULL, timeout=COMMAND_TIMEOUT_S)  # fmt: skip
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def command_row(k: int, algorithm: str, fidelity: str, ranks: int | None, trials: int) -> dict:
    """Median wall and CPU seconds of `commlab sim collective` on a k-ary fat-tree, and the engine alone."""
    args = ["sim", "collective", "--topology", f"fat-tree:k={k}", "--algorithm", algorithm,
            "--size", "1G", "--fidelity", fidelity]  # fmt: skip
    if ranks is not None:
        args += ["--ranks", str(ranks)]
    runs = [run_command(args) for _ in range(trials)]
    graph = topo.fat_tree(k)
    world = ranks or Topology(graph).num_ranks

    def engine() -> object:
        """What the command does after start-up and parsing, from scratch: rows (rebuilt every trial, as
        in a new process), a fresh Topology (no cached routes), the simulation."""
        vectorized._cached_rows.cache_clear()
        topology = Topology(graph)
        return simulate_collective("allreduce", algorithm, topology, GIB, world_size=world, fidelity=fidelity)

    engine_s, result = timed(engine, trials)
    return {
        "command": "commlab " + " ".join(args),
        "ranks": world,
        "wall_s": statistics.median(w for w, _ in runs),
        "cpu_s": statistics.median(c for _, c in runs),
        "engine_s": engine_s,
        "messages": int(result.routed.plan.num_messages) if result.routed is not None else 0,
        "busbw_GBps": result.busbw / 1e9,
    }


def part_command(trials: int, quick: bool, big: bool = False) -> dict:
    rows = {"targets": [], "growth": []}
    rows["targets"].append(command_row(8 if quick else 16, "ring", "flow", None, trials))
    if big:
        rows["targets"].append(command_row(64, "tree", "congestion", None, trials))
    for ranks in (16, 64, 256) if quick else (64, 256, 1024):
        rows["growth"].append(command_row(16, "ring", "flow", ranks, trials))
    for k in (4, 8) if quick else (8, 16, 32):
        rows["growth"].append(command_row(k, "tree", "congestion", None, trials))
    if big:  # the 65,536-rank target is the growth series' last point: measured once, not twice
        rows["growth"].append(rows["targets"][-1])
    return rows


def print_commands(rows: dict) -> None:
    print("\n# whole commands (fresh process, start-up included) and the engine alone; medians")
    print(f"# {'ranks':>6} {'wall_s':>8} {'cpu_s':>8} {'engine_s':>9} {'messages':>10}  command")
    for row in rows["targets"] + rows["growth"]:
        print(f"  {row['ranks']:>6} {row['wall_s']:>8.2f} {row['cpu_s']:>8.2f} {row['engine_s']:>9.2f} "
              f"{row['messages']:>10}  {row['command']}")  # fmt: skip


PARTS = {
    "command": part_command,
    "flow": part_flow,
    "congestion": part_congestion,
    "analytic": part_analytic,
    "growth": part_growth,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated: {', '.join(PARTS)}")
    parser.add_argument("--trials", type=int, default=3, help="runs per figure; the median is reported")
    parser.add_argument("--quick", action="store_true", help="smaller cases, a smoke run")
    parser.add_argument("--json", default="sim_speed.json", help="where to write the figures")
    parser.add_argument("--big", action="store_true", help="also the 65,536-rank tree command (slow)")
    args = parser.parse_args(argv)
    report = {"machine": machine(), "trials": args.trials, "quick": args.quick}
    for name in args.parts.split(","):
        if name not in PARTS:
            parser.error(f"--parts: {name!r} is not accepted; accepted: {', '.join(PARTS)}")
        print(f"== {name}", flush=True)
        if name == "command":
            report[name] = part_command(args.trials, args.quick, args.big)
            print_commands(report[name])
            continue
        report[name] = PARTS[name](args.trials, args.quick)
        print(json.dumps(report[name], indent=2), flush=True)
    if "growth" in report:
        print("\n# growth: median seconds to simulate (schedule already built)")
        print(f"# {'fidelity':<11} {'algorithm':<9} {'ranks':>8} {'simulate_s':>11} {'events':>10}")
        for row in report["growth"]:
            print(f"  {row['fidelity']:<11} {row['algorithm']:<9} {row['ranks']:>8} "
                  f"{row['simulate_s']:>11.4f} "
                  f"{row.get('events', ''):>10}")  # fmt: skip
    report["machine"]["load_average_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
