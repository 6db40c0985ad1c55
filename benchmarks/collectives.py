"""commlab's allreduce algorithms against the native collective, on gloo and MPI, 2 and 4 ranks.

    python benchmarks/collectives.py [--repeats 5] [--backends gloo,shm,mpi] [--ranks 2,4] [--json FILE]

Backend `shm` is gloo ranks with commlab on the shared-memory transport ($COMMLAB_SHM=1; the native
collective is still gloo's); `gloo` runs commlab on gloo itself ($COMMLAB_SHM=0).
For every (backend, ranks) it runs `commlab bench allreduce -b 4K -e 64M -f 4 --algorithm all` (every
algorithm and `auto`, the native collective timed in the same run, the variants interleaved in every
repetition, median of --repeats), and measures the machine's memcpy bandwidth as the physical reference.
It prints one table and the two targets of the performance work:
  1. at sizes >= 1 MiB the best commlab algorithm reaches >= 1.0x the native busbw;
  2. at 4 KiB to 64 KiB `algorithm="auto"` takes <= 2x the native time;
and, for `shm`, the targets of the shared-memory transport:
  3. at sizes >= 1 MiB the best commlab algorithm reaches >= 3x the native (gloo) busbw;
  4. at sizes >= 4 MiB the best commlab busbw is >= 0.5x one core's memcpy bandwidth;
every row also prints busbw as a fraction of memcpy, and the header the memcpy rate per core while every
core copies at once (the memory bus the ranks share; docs/design.md, the bound on this host). It
writes everything (every row and sample, the machine) to JSON. With the argument check on (the
default) every sweep also times `auto` with the check off, interleaved (`commlab bench
--check-off-row`), and prints the ratio (chk/off) and target
  5. at 4 KiB `auto` with the check takes <= 1.10x `auto` without it;
`--no-arg-check` times every commlab row without the check.
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

import torch

SMALL = (4 << 10, 64 << 10)  # the sizes of target 2
LARGE = 1 << 20  # targets 1 and 3 from this size up
SHM_MEMCPY_FROM = 4 << 20  # target 4 from this size up
CHECK_AT = 4 << 10  # target 5: the argument check's cost at this size
CHECK_OFF = "auto:check-off"  # commlab bench's row of auto with check=False (--check-off-row)


def _copy_samples(nbytes: int, repeats: int, ready=None) -> list[float]:
    """Seconds per copy of `nbytes` (one thread), `repeats` samples of 5 copies each; `ready`, if given,
    is a barrier waited at once the buffers are touched (so several processes copy together)."""
    torch.set_num_threads(1)
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    if ready is not None:
        ready.wait()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(5):
            dst.copy_(src)
        samples.append((time.perf_counter() - start) / 5)
    return samples


def memcpy_bandwidth(nbytes: int = 64 << 20, repeats: int = 7) -> dict:
    """Single-thread copy bandwidth (bytes copied / s; each byte is read once and written once)."""
    samples = _copy_samples(nbytes, repeats)
    return {"bytes": nbytes, "gbps": nbytes / statistics.median(samples) / 1e9, "samples_s": samples}


def _copy_at_once(nbytes: int, repeats: int, start, results) -> None:
    results.put(nbytes / statistics.median(_copy_samples(nbytes, repeats, start)) / 1e9)


def memcpy_all_cores(nbytes: int = 64 << 20, repeats: int = 7) -> dict:
    """Copy bandwidth per core while every core copies at once (one process per core).

    The ranks of a collective on one host copy and reduce at the same time, so this, not one core's
    memcpy, is the rate each of them can have when the memory bus is the limit (on the 2-core
    development VM each of two copies got ~0.66x of one alone)."""
    import multiprocessing

    cores = len(os.sched_getaffinity(0))
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(cores), context.Queue()
    workers = [
        context.Process(target=_copy_at_once, args=(nbytes, repeats, start, results)) for _ in range(cores)
    ]
    for worker in workers:
        worker.start()
    rates = [results.get(timeout=300) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    return {"cores": cores, "bytes": nbytes, "gbps_per_core": statistics.mean(rates), "rates": rates}


def run_bench(backend: str, ranks: int, args: argparse.Namespace) -> dict:
    """One `commlab bench` sweep; its JSON document."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.json")
        command = [
            sys.executable, "-m", "commlab.cli", "bench", "allreduce",
            "-b", args.min_bytes, "-e", args.max_bytes, "-f", str(args.factor),
            "--algorithm", "all", "--backend", "gloo" if backend == "shm" else backend, "-n", str(ranks),
            "--iters", str(args.iters), "--warmup", str(args.warmup), "--repeats", str(args.repeats),
            "--sample-seconds", str(args.sample_seconds), "--json", path, "--no-progress",
        ] + ([] if args.arg_check else ["--no-arg-check"]) + (
            ["--check-off-row"] if args.arg_check else []
        )  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS="1", COMMLAB_SHM="1" if backend == "shm" else "0")
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
        if done.returncode != 0:
            raise SystemExit(
                f"commlab bench failed ({backend}, {ranks} ranks):\n{done.stdout}\n{done.stderr}"
            )
        if args.verbose:
            print(done.stdout)
        with open(path) as source:
            return json.load(source)


def summarize(document: dict) -> list[dict]:
    """Per size: native time and busbw, the best algorithm's busbw, auto's time (and the ratios)."""
    rows = document["rows"]
    out = []
    for size in sorted({r["size"] for r in rows}):
        mine = [r for r in rows if r["size"] == size]
        auto = next(r for r in mine if r["algorithm"] == "auto")
        named = [r for r in mine if r["algorithm"] not in ("auto", CHECK_OFF)]
        off = next((r for r in mine if r["algorithm"] == CHECK_OFF), None)
        best = max(named, key=lambda r: r["busbw"])
        native_us = auto.get("native_time_us")
        native_busbw = auto.get("native_busbw")
        out.append(
            {
                "size": size,
                "native_us": native_us,
                "native_busbw": native_busbw,
                "best": best["algorithm"],
                "best_us": best["time_us"],
                "best_busbw": best["busbw"],
                "best_ratio": best["busbw"] / native_busbw if native_busbw else None,
                "auto": auto["resolved"],
                "auto_us": auto["time_us"],
                "auto_over_native_time": auto["time_us"] / native_us if native_us else None,
                "auto_check_off_us": off["time_us"] if off else None,
                "check_over_off": auto["time_us"] / off["time_us"] if off else None,
                "wrong": sum(r["wrong"] for r in mine),
            }
        )
    return out


def targets(backend: str, ranks: int, table: list[dict], memcpy_gbps: float) -> dict:
    large = [r["best_ratio"] for r in table if r["size"] >= LARGE and r["best_ratio"] is not None]
    of_memcpy = [r["best_busbw"] / memcpy_gbps for r in table if r["size"] >= SHM_MEMCPY_FROM]
    small = [
        r["auto_over_native_time"]
        for r in table
        if SMALL[0] <= r["size"] <= SMALL[1] and r["auto_over_native_time"] is not None
    ]
    worst_large, worst_small = (min(large) if large else None), (max(small) if small else None)
    check = [r["check_over_off"] for r in table if r["size"] == CHECK_AT and r["check_over_off"] is not None]
    return {
        "backend": backend,
        "ranks": ranks,
        "large_min_best_over_native_busbw": worst_large,
        "large_target_holds": worst_large is not None and worst_large >= 1.0,
        "small_max_auto_over_native_time": worst_small,
        "small_target_holds": worst_small is not None and worst_small <= 2.0,
        "large_min_best_over_memcpy": min(of_memcpy) if of_memcpy else None,
        "shm_busbw_target_holds": worst_large is not None and worst_large >= 3.0,
        "shm_memcpy_target_holds": bool(of_memcpy) and min(of_memcpy) >= 0.5,
        "check_over_off_4k": check[0] if check else None,
        "check_target_holds": bool(check) and check[0] <= 1.10,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backends", default="gloo,shm,mpi", help="of gloo, shm, mpi")
    parser.add_argument("--ranks", default="2,4")
    parser.add_argument("--min-bytes", default="4K")
    parser.add_argument("--max-bytes", default="64M")
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved samples per row (median)")
    parser.add_argument("--iters", type=int, default=20, help="calls per sample at most")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--sample-seconds", type=float, default=0.2, help="fewer calls per sample if slow")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per sweep")
    parser.add_argument("--json", default="out/collectives.json", help="where to write the results")
    parser.add_argument("--verbose", action="store_true", help="print every sweep's full table too")
    parser.add_argument(
        "--no-arg-check",
        dest="arg_check",
        action="store_false",
        help="commlab calls with check=False (no cross-rank argument check: one native allgather less)",
    )
    args = parser.parse_args()
    if args.repeats < 5:
        print("note: fewer than 5 repeats; medians of at least 5 are the standard here", file=sys.stderr)

    memcpy = memcpy_bandwidth()
    memcpy["all_cores"] = memcpy_all_cores()
    runs, summary = [], []
    for backend in args.backends.split(","):
        for ranks in (int(n) for n in args.ranks.split(",")):
            document = run_bench(backend, ranks, args)
            table = summarize(document)
            runs.append({"backend": backend, "ranks": ranks, "table": table, "bench": document})
            summary.append(targets(backend, ranks, table, memcpy["gbps"]))

    machine = runs[0]["bench"]["machine"] if runs else {}
    cpu, cores, load = machine.get("cpu", "?"), machine.get("logical_cores", "?"), machine.get("load_average")
    print(
        f"# allreduce float32 sum: commlab vs native, median of {args.repeats} interleaved samples; "
        f"{cpu}, {cores} cores, load {load}; commlab's argument check {'on' if args.arg_check else 'off'}"
    )
    print(f"# memcpy (1 thread, {memcpy['bytes'] >> 20} MiB): {memcpy['gbps']:.2f} GB/s")
    shared = memcpy["all_cores"]
    print(
        f"# memcpy with all {shared['cores']} cores copying at once: "
        f"{shared['gbps_per_core']:.2f} GB/s per core "
        f"({shared['gbps_per_core'] / memcpy['gbps']:.2f}x of one alone: the memory bus the ranks share)"
    )
    print(
        f"# {'backend':>7} {'ranks':>5} {'size':>9} {'native us':>10} {'native busbw':>12} {'best':>18}"
        f" {'busbw':>7} {'ratio':>6} {'/memcpy':>7} {'auto':>18} {'auto us':>9} {'auto/native':>11}"
        f" {'chk/off':>7} {'#wrong':>6}"
    )
    for run in runs:
        for r in run["table"]:
            ratio = f"{r['best_ratio']:.2f}" if r["best_ratio"] is not None else "n/a"
            over = f"{r['auto_over_native_time']:.2f}" if r["auto_over_native_time"] is not None else "n/a"
            checked = f"{r['check_over_off']:.2f}" if r["check_over_off"] is not None else "n/a"
            print(
                f"  {run['backend']:>7} {run['ranks']:>5} {r['size']:>9} {r['native_us'] or 0:>10.1f}"
                f" {r['native_busbw'] or 0:>12.3f} {r['best']:>18} {r['best_busbw']:>7.3f} {ratio:>6}"
                f" {r['best_busbw'] / memcpy['gbps']:>7.2f}"
                f" {r['auto']:>18} {r['auto_us']:>9.1f} {over:>11} {checked:>7} {r['wrong']:>6}"
            )
    print("#")
    print(
        "# targets: (1) best busbw >= 1.0x native at >= 1 MiB; (2) auto time <= 2x native at 4-64 KiB;"
        " (5) auto with the argument check <= 1.10x auto without it at 4 KiB (chk/off)"
    )
    for t in summary:
        large, small = t["large_min_best_over_native_busbw"], t["small_max_auto_over_native_time"]
        shown = ["n/a" if v is None else f"{v:.2f}" for v in (large, small)]
        print(
            f"# {t['backend']:>5} {t['ranks']} ranks: (1) worst best/native busbw {shown[0]} "
            f"{'holds' if t['large_target_holds'] else 'FAILS'}; (2) worst auto/native time {shown[1]} "
            f"{'holds' if t['small_target_holds'] else 'FAILS'}; (5) check/off at 4 KiB "
            f"{'n/a' if t['check_over_off_4k'] is None else format(t['check_over_off_4k'], '.2f')} "
            f"{'holds' if t['check_target_holds'] else 'FAILS'}"
        )
        if t["backend"] == "shm":
            of_memcpy = t["large_min_best_over_memcpy"]
            print(
                f"#   shm targets: (3) best/native busbw {shown[0]} >= 3: "
                f"{'holds' if t['shm_busbw_target_holds'] else 'FAILS'}; (4) best busbw / memcpy at >= 4 MiB "
                f"{'n/a' if of_memcpy is None else f'{of_memcpy:.2f}'} >= 0.5: "
                f"{'holds' if t['shm_memcpy_target_holds'] else 'FAILS'}"
            )
    document = {
        "machine": machine,
        "memcpy": memcpy,
        "arguments": vars(args),
        "targets": summary,
        "runs": runs,
    }
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as out:
            json.dump(document, out, indent=1)
        print(f"# written: {args.json}")


if __name__ == "__main__":
    main()
