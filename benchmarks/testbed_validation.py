"""The simulator judged on the emulated cluster: `commlab sim` predictions against `commlab bench` there.

    sudo python benchmarks/testbed_validation.py [--quick] [--out docs/testbed-validation.md]

For each emulated network (one switch, with 1 and with 2 ranks per
host; two switches joined by a 2:1 oversubscribed uplink; a fat-tree k=2 at 100 Mbit/s, whose two hosts
are four switches apart, 2 ranks per host), it
1. builds the testbed and runs `commlab testbed check` (every wire's TCP rate against the set rate);
2. measures allreduce (4 algorithms and auto, 4 sizes), reduce-scatter and allgather (every algorithm,
   2 sizes) with `commlab bench`'s own worker (`run_worker`) in 2 hosts' torchrun ranks, twice, in two
   separate launches, so the spread between the runs is shown beside the model's error;
3. predicts every case with `simulate_collective(..., fidelity="flow")` (what `commlab sim collective
   --topology <the testbed's topology file>` runs) under two profiles: "wire" (the topology's links at the
   efficiency the check measured, nothing else) and "host" (the same links plus this host's gloo software
   costs from the shipped calibration: alpha per message, gamma per byte reduced, launch per call).
It writes the table, the error statistics and a plot to docs/testbed-validation.md (+ .png) and the raw
numbers to benchmarks/results/testbed_validation.json. Run time about 10-15 minutes (2 shared cores).

Inside the ranks (started by this script through `commlab testbed run`) it runs as `--worker OUT.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TWO_SWITCHES = """name = "two switches, 2:1 uplink"
endpoints_forward = false
{nodes}
[[nodes]]
name = "sa"
kind = "switch"
[[nodes]]
name = "sb"
kind = "switch"
{links}
[[links]]
src = "sa"
dst = "sb"
bandwidth = "{uplink}"
latency = 0
"""


def two_switches(path: Path, hosts_per_switch: int, host_rate: str, uplink: str) -> str:
    nodes, links = [], []
    for side in "ab":
        for i in range(hosts_per_switch):
            nodes.append(f'[[nodes]]\nname = "{side}{i}"\nkind = "npu"')
            links.append(
                f'[[links]]\nsrc = "{side}{i}"\ndst = "s{side}"\nbandwidth = "{host_rate}"\nlatency = 0'
            )
    path.write_text(TWO_SWITCHES.format(nodes="\n".join(nodes), links="\n".join(links), uplink=uplink))
    return str(path)


ALLREDUCE = ["auto", "ring", "tree", "halving_doubling", "recursive_doubling"]
SIZES = {"allreduce": [1 << 20, 2 << 20, 4 << 20, 8 << 20], "reduce_scatter": [2 << 20, 8 << 20]}
SIZES["allgather"] = SIZES["reduce_scatter"]


# ------------------------------------------------------------------------------------------ in the ranks


def worker(out: str, quick: bool) -> None:
    """Every op's sweep with commlab bench's worker in the ranks torchrun started; rank 0 writes `out`."""
    from datetime import timedelta

    import torch.distributed as dist

    import commlab
    from commlab.bench.config import BenchConfig
    from commlab.bench.worker import run_worker
    from commlab.collectives.algorithms import algorithms_for

    dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for op, sizes in SIZES.items():
            sizes = sizes[:1] if quick else sizes
            algorithms = ALLREDUCE if op == "allreduce" else ["auto", *algorithms_for(op)]
            path = os.path.join(scratch, f"{op}.json")
            config = BenchConfig(
                op=op, min_bytes=sizes[0], max_bytes=sizes[-1], factor=4 if len(sizes) == 2 else 2,
                algorithms=algorithms, iters=1, warmup=1, repeats=2, native=False, json_path=path,
                progress=False, timeout=300,
            )  # fmt: skip
            run_worker(config)
            if dist.get_rank() == 0:
                results += json.loads(Path(path).read_text())["rows"]
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results))
    commlab.release()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ the driver


def cases(scratch: Path, quick: bool) -> list[dict]:
    uplink = two_switches(scratch / "two-switches.toml", 2, "400Mb/s", "400Mb/s")
    every = [
        {"name": "one switch, 4 hosts, 200 Mbit/s", "topology": "switch:n=4,bandwidth=200Mb/s", "rph": 1},
        {"name": "one switch, 2 hosts, 200 Mbit/s", "topology": "switch:n=2,bandwidth=200Mb/s", "rph": 2},
        {"name": "two switches (4 x 400 Mbit/s hosts, 400 Mbit/s uplink: 2:1)", "topology": uplink, "rph": 1},
        {"name": "fat-tree k=2 (4 switches between the hosts), 100 Mbit/s",
         "topology": "fat-tree:k=2,bandwidth=100Mb/s", "rph": 2},
    ]  # fmt: skip
    return every[:2] if quick else every


def measure(testbed, quick: bool, timeout: float, log: Path) -> list[dict]:
    """One launch of the worker on every host; its rows. A launch that fails is logged (`log`) and run
    once more: the number of retries is reported with the results."""
    for attempt in range(2):
        out = Path(tempfile.mkdtemp()) / "rows.json"
        command = ["python", str(Path(__file__).resolve()), "--worker", str(out)] + (
            ["--quick"] if quick else []
        )
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        env["COMMLAB_TESTBED_DIR"] = str(testbed.directory)
        argv = [sys.executable, "-m", "commlab.cli", "testbed", "run", "--run", testbed.run, "--timeout",
                str(timeout), "--", *command]  # fmt: skip
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout + 60, cwd=ROOT)
        with open(log, "a") as file:
            file.write(
                f"== {testbed.run} attempt {attempt}: exit {done.returncode}\n{done.stdout}\n{done.stderr}\n"
            )
        if done.returncode == 0:
            return json.loads(out.read_text())
        print(f"   launch failed (exit {done.returncode}); log in {log}", flush=True)
        RETRIES.append(done.returncode)
    raise RuntimeError(f"measurement failed twice; see {log}")


RETRIES: list[int] = []


def predict(topology_file: Path, rows: list[dict], profiles: dict) -> dict:
    from commlab.sim import simulate_collective
    from commlab.sim.network.topology_io import parse_topology

    topology = parse_topology(str(topology_file))
    predictions = {}
    for row in rows:
        algorithm = row["resolved"]
        key = (row["op"], row["algorithm"], row["size"])
        predictions[key] = {
            name: simulate_collective(row["op"], algorithm, topology, row["size"], profile=profile).time
            for name, profile in profiles.items()
        }
    return predictions


def _error(predicted: float, measured: float) -> float:
    return abs(predicted - measured) / measured


def statistics_of(report: dict) -> dict:
    """Median and max prediction error per profile, and the runs' spread, over the non-auto rows; and how
    often auto's pick was within 5% of the measured fastest algorithm."""
    errors: dict[str, list[float]] = {}
    spreads, auto_ok, auto_total = [], 0, 0
    for case in report["cases"]:
        best: dict[tuple, float] = {}
        for row in case["rows"]:
            mean = statistics.fmean(row["measured"])
            if row["algorithm"] == "auto":
                continue
            spreads.append(abs(row["measured"][0] - row["measured"][1]) / mean)
            for name, value in row["predicted"].items():
                errors.setdefault(name, []).append(_error(value, mean))
            key = (row["op"], row["size"])
            best[key] = min(best.get(key, float("inf")), mean)
        for row in case["rows"]:
            if row["algorithm"] != "auto":
                continue
            own = [r for r in case["rows"] if (r["op"], r["size"], r["algorithm"]) == (row["op"], row["size"],
                   row["resolved"])]  # fmt: skip
            auto_total += 1
            if not own:  # auto picked an algorithm not in the sweep: judge auto's own time instead
                own = [row]
            auto_ok += statistics.fmean(own[0]["measured"]) <= 1.05 * best[(row["op"], row["size"])]
    summary = {
        name: {"median": statistics.median(v), "max": max(v), "count": len(v)} for name, v in errors.items()
    }
    summary["spread"] = {"median": statistics.median(spreads), "max": max(spreads), "count": len(spreads)}
    summary["auto"] = {"within_5pct": auto_ok, "cases": auto_total}
    return summary


def write_report(report: dict, path: Path) -> None:
    """docs/testbed-validation.md: method, check, summary and every row; a PNG of predicted vs measured."""
    summary = statistics_of(report)
    report["summary"] = summary
    lines = [
        "# The simulator on the emulated cluster",
        "",
        "`python benchmarks/testbed_validation.py` (as root; raw numbers in "
        "`benchmarks/results/testbed_validation.json`). Each network is built by `commlab testbed`",
        "(namespaces, bridges, tbf-shaped veth pairs); `commlab bench`'s worker measures every case in",
        "torchrun ranks across the hosts (gloo), twice in two separate launches; `simulate_collective(...,",
        'fidelity="flow")` on the testbed\'s own topology file (what `commlab sim collective --topology',
        "FILE`",
        "runs) predicts it under two profiles: **wire** (the links at the efficiency `check` measured, no",
        "software cost) and **host** (the same links plus this host's gloo software costs from",
        "`commlab/profiles/gloo.json`: ping-pong alpha per message, gamma per byte reduced, launch per",
        "call).",
        "Error = |predicted - mean of the two runs| /",
        "mean; spread = |run 1 - run 2| / mean. Sizes are total bytes (the reduce-scatter input, the",
        "allgather output), all >= 1 MiB.",
        "",
        f"Machine: {report['machine']['cores']} cores shared with other work (load average at the start "
        f"{report['machine']['load'][0]:.1f}); total run time {report['seconds']:.0f} s.",
        "",
        "## Summary",
        "",
        "| | median | max | cases |",
        "|---|---|---|---|",
    ]
    for name in ("wire", "host", "spread"):
        s = summary[name]
        label = "spread between the two runs" if name == "spread" else f"prediction error, {name} profile"
        lines.append(f"| {label} | {s['median']:.1%} | {s['max']:.1%} | {s['count']} |")
    auto = summary["auto"]
    lines += [
        "",
        "| network | ranks/host | wire error median / max | host error median / max | spread median / max |",
        "|---|---|---|---|---|",
    ]
    signed = []
    for case in report["cases"]:
        rows = [r for r in case["rows"] if r["algorithm"] != "auto"]
        means = [statistics.fmean(r["measured"]) for r in rows]
        wire = [_error(r["predicted"]["wire"], m) for r, m in zip(rows, means, strict=True)]
        host = [_error(r["predicted"]["host"], m) for r, m in zip(rows, means, strict=True)]
        spread = [abs(r["measured"][0] - r["measured"][1]) / m for r, m in zip(rows, means, strict=True)]
        signed += [(r["predicted"]["host"] - m) / m for r, m in zip(rows, means, strict=True)]
        lines.append(
            f"| {case['name']} | {case['ranks_per_host']} | {statistics.median(wire):.1%} / "
            f"{max(wire):.1%} | "
            f"{statistics.median(host):.1%} / {max(host):.1%} | {statistics.median(spread):.1%} / "
            f"{max(spread):.1%} |"
        )
    host = summary["host"]
    met = host["median"] <= 0.05 and host["max"] <= 0.15
    lines += [
        "",
        "## Reading",
        "",
        "- The issue's targets (median <= 5%, max <= 15% at >= 1 MiB) are "
        f"**{'met' if met else 'not met'}**: "
        f"the host profile's median error is {host['median']:.1%}, its max {host['max']:.1%}. The "
        "predictions "
        f"are biased low (median signed error {statistics.median(signed):+.1%}): the measured "
        "collectives take "
        "longer than the wire alone allows, and the host's costs as calibrated on an idle local group add "
        "only a few percent of that.",
        "- The model error is of the size of the measurement's own spread (median "
        f"{summary['spread']['median']:.1%}, "
        f"max {summary['spread']['max']:.1%} between two runs of the same case): the 2 cores were "
        "shared with "
        "other work, and at 200-400 Mbit/s gloo's threads and the reductions of 4 ranks still compete for "
        "them. The slowest network (100 Mbit/s, the fat-tree) is the most wire-bound: there the spread is "
        "smallest and so is the error.",
        "- No delay topology: this kernel has no netem (CONFIG_NET_SCH_NETEM unset), so `commlab testbed` "
        "cannot add latency here (it says so and refuses). The latency-bound target was not judged.",
        "- A calibrated profile itself (`--profile commlab/profiles/gloo.json`) is not usable on a shaped "
        "wire: it prices every message by the local fit (its beta is the loopback's), whatever the "
        "topology's links say, and predicted 10-20x too fast in a first run; the host profile above takes "
        "only its scalar costs (alpha, gamma, launch) on top of the topology's links.",
        "",
        f"auto (which uses the local calibration, not the testbed's topology) picked an algorithm within 5% "
        f"of the measured fastest in {auto['within_5pct']} of {auto['cases']} cases.",
        "",
        "## Link check (`commlab testbed check`)",
        "",
        "| network | wire direction | set | measured | ratio |",
        "|---|---|---|---|---|",
    ]
    for case in report["cases"]:
        for r in case["check"]:
            lines.append(
                f"| {case['name']}, {case['ranks_per_host']}/host | {r['wire']} {r['direction']} | "
                f"{r['set'] * 8e-6:.0f} Mbit/s | {r['measured'] * 8e-6:.1f} Mbit/s | {r['ratio']:.1%} |"
            )
    lines += ["", "## Every case", ""]
    for case in report["cases"]:
        errs = [
            _error(r["predicted"]["wire"], statistics.fmean(r["measured"]))
            for r in case["rows"] if r["algorithm"] != "auto"
        ]  # fmt: skip
        lines += [
            f"### {case['name']}, {case['ranks_per_host']} rank(s) per host (`{case['spec']}`)",
            "",
            f"wire efficiency from the check {case['efficiency']:.1%}; wire-profile error median "
            f"{statistics.median(errs):.1%}, max {max(errs):.1%}.",
            "",
            "| op | size | algorithm | run 1 (ms) | run 2 (ms) | spread | wire (ms) | error "
            "| wire + host (ms) "
            "| error | #wrong |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in case["rows"]:
            mean = statistics.fmean(r["measured"])
            name = r["algorithm"] if r["algorithm"] != "auto" else f"auto ({r['resolved']})"
            w, c = r["predicted"]["wire"], r["predicted"]["host"]
            lines.append(
                f"| {r['op']} | {r['size'] >> 20} MiB | {name} | {r['measured'][0] * 1e3:.1f} | "
                f"{r['measured'][1] * 1e3:.1f} | {abs(r['measured'][0] - r['measured'][1]) / mean:.1%} | "
                f"{w * 1e3:.1f} | {_error(w, mean):.1%} | {c * 1e3:.1f} | {_error(c, mean):.1%} | "
                f"{r['wrong']} |"
            )
        lines.append("")
    plot_path = path.with_suffix(".png")
    if _plot(report, plot_path):
        lines += [f"![predicted against measured]({plot_path.name})", ""]
    path.write_text("\n".join(lines))


def _plot(report: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 5), sharey=True)
    for ax, name in zip(axes, ("wire", "host"), strict=True):
        for case in report["cases"]:
            rows = [r for r in case["rows"] if r["algorithm"] != "auto"]
            measured = [statistics.fmean(r["measured"]) * 1e3 for r in rows]
            predicted = [r["predicted"][name] * 1e3 for r in rows]
            ax.scatter(measured, predicted, s=14, label=f"{case['name']}, {case['ranks_per_host']}/host")
        low, high = ax.get_xlim()
        ax.plot([low, high], [low, high], "k--", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("measured on the testbed (ms)")
        ax.set_title(f"{name} profile")
    axes[0].set_ylabel("predicted by the flow simulator (ms)")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def host_costs(path: Path):
    """This host's gloo software costs from the shipped calibration, as plain Profile scalars: the
    ping-pong alpha per message, the 4-rank float32 gamma per byte reduced and launch per call.

    A calibrated profile itself (Profile.load) prices each message by the local fit alone, whatever the
    topology's links say (its beta is the loopback's), so on a shaped wire it predicts 10-20x too fast;
    the scalars keep the topology's links as the bandwidth and add the host's costs on top."""
    from commlab.sim.network.profile import Profile

    data = json.loads(path.read_text())
    level = data["levels"]["4"]
    alpha = data["pingpong"]["segments"][0]["alpha"]
    return Profile(alpha=alpha, gamma=level["gamma"]["float32"], launch=level["launch"], name="host")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="two networks, one size per op")
    parser.add_argument("--out", default=str(ROOT / "docs" / "testbed-validation.md"))
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "testbed_validation.json"))
    parser.add_argument("--timeout", type=float, default=400.0, help="seconds per measurement launch")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from --json")
    args = parser.parse_args()
    if args.report_only:
        write_report(json.loads(Path(args.json).read_text()), Path(args.out))
        return 0
    if args.worker:
        worker(args.worker, args.quick)
        return 0

    from commlab.sim.network.profile import Profile
    from commlab.testbed.check import check
    from commlab.testbed.testbed import Testbed

    host = host_costs(ROOT / "commlab" / "profiles" / "gloo.json")
    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp())
    report = {"cases": [], "machine": {"cores": os.cpu_count(), "load": os.getloadavg()}}
    for case in cases(scratch, args.quick):
        print(f"== {case['name']}, {case['rph']} rank(s) per host", flush=True)
        with Testbed.up(case["topology"], case["rph"], directory=scratch) as testbed:
            links = check(testbed, seconds=0.5, pings=20)
            efficiency = statistics.median(min(1.0, r.ratio) for r in links)
            for r in links:
                print(
                    f"   check wire {r.wire} {r.direction}: {r.ratio:.1%} of {r.set_rate * 8e-6:.0f} Mbit/s"
                )
            runs = []
            for attempt in range(2):
                t = time.monotonic()
                runs.append(measure(testbed, args.quick, args.timeout, Path(args.json).with_suffix(".log")))
                print(
                    f"   run {attempt + 1}: {len(runs[-1])} rows in {time.monotonic() - t:.0f} s", flush=True
                )
            profiles = {
                "wire": Profile(efficiency=efficiency, name="wire"),
                "host": Profile(host.alpha, host.gamma, host.launch, efficiency, "wire + host"),
            }
            predicted = predict(testbed.topology_file, runs[0], profiles)
            topology_text = testbed.topology_file.read_text()
        rows = []
        for first, second in zip(runs[0], runs[1], strict=True):
            key = (first["op"], first["algorithm"], first["size"])
            rows.append({
                "op": first["op"], "algorithm": first["algorithm"], "resolved": first["resolved"],
                "size": first["size"], "measured": [first["time_us"] * 1e-6, second["time_us"] * 1e-6],
                "wrong": first["wrong"] + second["wrong"], "predicted": predicted[key],
            })  # fmt: skip
        report["cases"].append({
            "name": case["name"], "ranks_per_host": case["rph"], "topology": topology_text,
            "spec": Path(case["topology"]).name if case["topology"].endswith(".toml") else case["topology"],
            "check": [
                {"wire": r.wire, "direction": r.direction, "set": r.set_rate, "measured": r.measured_rate,
                 "ratio": r.ratio} for r in links
            ],
            "efficiency": efficiency, "rows": rows,
        })  # fmt: skip
    report["seconds"] = time.monotonic() - started
    report["failed_launches"] = RETRIES
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    write_report(report, Path(args.out))
    print(f"wrote {args.out} and {args.json} in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
