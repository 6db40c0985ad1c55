"""Training benchmarks, measured (not asserted): commlab's data parallel against torch's, side by side.

    python benchmarks/training.py                          # all four parts, a few minutes on 2 cores
    python benchmarks/training.py --parts ddp --trials 7   # one part, more trials
    python benchmarks/training.py --quick                  # a smoke run: fewer trials and steps

Parts (targets from issue 3 in brackets):
  ddp         tokens/s of commlab DataParallel vs torch.nn.parallel.DistributedDataParallel on the same GPT,
              data and gloo ranks, alternating step by step; median of --trials [ratio >= 0.95]
  checkpoint  activation memory, peak memory and step time of an 8-layer GPT with checkpoint none, full and
              selective, in one process [activation memory >= 2x lower for <= 40% more step time]
  zero        optimizer-state bytes per rank of ZeRO-1 (ZeroOptimizer + AdamW) vs plain AdamW [~ 1/DP]
  quality     the `make demo` GPT run (validation loss vs the unigram baseline) and the ViT on digits
              (test accuracy) [GPT clearly below the baseline; ViT >= 90%], run through examples/ddp.py

Ranks are started here (torch.multiprocessing, or torchrun for the quality runs), so no launcher is needed.
Prints one table per part and writes everything, with a description of the machine, to --json.

How memory is measured (CPU): torch.profiler's allocator events (profile_memory=True) give every
allocation and free of the CPU allocator. "activation memory" is the bytes allocated during forward and
still live when forward returns: exactly what autograd keeps for backward (plus the logits and loss).
"peak" is the highest live total over forward + backward, above the level before forward (so it includes
the gradients backward allocates). On CUDA the same two figures come from torch.cuda's allocator counters.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

import commlab
from commlab.models import GPT, ByteCorpus, GPTConfig, lm_batch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "ddp.py"
PARTS = ("ddp", "checkpoint", "zero", "quality")
MODES = ("none", "full", "selective")
RANK_TIMEOUT_S = 300


# ---------------------------------------------------------------------------------------------- helpers
def machine() -> dict:
    """What the figures were measured on (the machine may be shared: load averages are recorded too)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_bytes": memory,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commlab": commlab.__version__,
        "commit": commit or None,
        "load_average_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def spawn(fn, world: int, *args) -> dict:
    """Run fn(rank, world, store, out, *args) on `world` fresh processes in one gloo group.

    Rank 0 writes its result as JSON to `out`; returns it. Processes use one thread each.
    """
    with tempfile.TemporaryDirectory(prefix="commlab-bench-") as tmpdir:
        store, out = os.path.join(tmpdir, "store"), os.path.join(tmpdir, "result.json")
        os.environ["OMP_NUM_THREADS"] = "1"
        torch_mp.start_processes(fn, args=(world, store, out, *args), nprocs=world, start_method="spawn")
        return json.loads(Path(out).read_text())


def join_group(rank: int, world: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=RANK_TIMEOUT_S),
    )


def load_corpus() -> ByteCorpus:
    """The byte corpus, built once by rank 0 when a group exists (the others then read its cache)."""
    if dist.is_initialized() and dist.get_rank() != 0:
        dist.barrier()
        return ByteCorpus.from_stdlib()
    corpus = ByteCorpus.from_stdlib()
    if dist.is_initialized():
        dist.barrier()
    return corpus


def table(headers: list[str], rows: list[list], title: str) -> None:
    """Print a right-aligned table with a title line."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def mib(n: float) -> str:
    return f"{n / 2**20:,.2f}"


# ------------------------------------------------------------------------------ (a) DataParallel vs DDP
def ddp_rank(rank: int, world: int, store: str, out: str, opts: dict) -> None:
    """Each trial trains two fresh copies of one GPT, one per wrapper, alternating step by step.

    Alternating single steps (in alternating order) exposes both to the same background load, which
    matters on a shared machine. Each step starts after a barrier; its time is the slowest rank's.
    """
    from commlab.parallel import DataParallel

    join_group(rank, world, store)
    corpus = load_corpus()
    config = GPTConfig.preset(opts["preset"])
    torch.manual_seed(0)
    base = GPT(config)
    batch, seq_len = opts["batch_size"], config.seq_len
    names = ("commlab", "torch")

    def wrap(name: str, module: torch.nn.Module) -> torch.nn.Module:
        if name == "commlab":
            return DataParallel(module, bucket_mb=opts["bucket_mb"], algorithm=opts["algorithm"])
        return torch.nn.parallel.DistributedDataParallel(module, bucket_cap_mb=opts["bucket_mb"])

    trials = []
    for trial in range(opts["trials"]):
        models = {name: wrap(name, copy.deepcopy(base)) for name in names}
        optimizers = {name: torch.optim.AdamW(models[name].parameters(), lr=1e-3) for name in names}
        losses = {name: [] for name in names}
        times = {name: torch.zeros(opts["steps"], dtype=torch.float64) for name in names}
        for step in range(opts["warmup"] + opts["steps"]):
            x, y = lm_batch(corpus.train, step, batch, seq_len, 0, rank, world)
            for name in names if (step + trial) % 2 == 0 else names[::-1]:
                dist.barrier()
                start = time.perf_counter()
                _, loss = models[name](x, y)
                loss.backward()
                optimizers[name].step()
                optimizers[name].zero_grad(set_to_none=True)
                elapsed = time.perf_counter() - start
                losses[name].append(loss.item())
                if step >= opts["warmup"]:
                    times[name][step - opts["warmup"]] = elapsed
        rates = {}
        for name in names:
            dist.all_reduce(times[name], op=dist.ReduceOp.MAX)  # the slowest rank sets each step's pace
            rates[name] = opts["steps"] * batch * seq_len / times[name].sum().item()
        diff = max(abs(a - b) for a, b in zip(losses["commlab"], losses["torch"], strict=True))
        trials.append({**rates, "max_loss_diff": diff})
        if rank == 0:
            print(
                f"  trial {trial + 1}/{opts['trials']}: commlab {rates['commlab']:,.0f}  "
                f"torch {rates['torch']:,.0f} tokens/s",
                flush=True,
            )
    if rank == 0:
        params = sum(p.numel() for p in base.parameters())
        Path(out).write_text(json.dumps({"trials": trials, "parameters": params, "seq_len": seq_len}))
    commlab.release()
    dist.destroy_process_group()


def bench_ddp(args: argparse.Namespace) -> dict:
    opts = dict(
        preset=args.ddp_preset,
        batch_size=args.ddp_batch_size,
        steps=args.ddp_steps,
        warmup=3,
        trials=args.trials,
        bucket_mb=args.bucket_mb,
        algorithm=args.algorithm,
    )
    print(
        f"[ddp] {args.ddp_ranks} gloo ranks, GPT {args.ddp_preset}, global batch {args.ddp_batch_size}, "
        f"{args.ddp_steps} timed steps (after 3 warm-up) per trial, the two alternating step by step, "
        f"{args.trials} trials",
        flush=True,
    )
    raw = spawn(ddp_rank, args.ddp_ranks, opts)
    trials = raw["trials"]
    commlab_rates = [t["commlab"] for t in trials]
    torch_rates = [t["torch"] for t in trials]
    paired = statistics.median(t["commlab"] / t["torch"] for t in trials)
    of_medians = statistics.median(commlab_rates) / statistics.median(torch_rates)
    rows = [
        [name, f"{statistics.median(r):,.0f}", f"{min(r):,.0f}", f"{max(r):,.0f}"]
        for name, r in (
            ("commlab DataParallel", commlab_rates),
            ("torch DistributedDataParallel", torch_rates),
        )
    ]
    table(
        ["implementation", "median tokens/s", "min", "max"],
        rows,
        f"(a) data parallel throughput: GPT {args.ddp_preset} ({raw['parameters']:,} parameters), "
        f"{args.ddp_ranks} gloo ranks, bucket {args.bucket_mb:g} MiB, median of {len(trials)}",
    )
    max_diff = max(t["max_loss_diff"] for t in trials)
    print(
        f"ratio commlab / torch: {of_medians:.3f}x (ratio of medians), {paired:.3f}x (median of paired "
        f"trials); target >= 0.95x. Same losses step by step: max |difference| {max_diff:.2e}"
    )
    return {
        "config": {
            **opts,
            "ranks": args.ddp_ranks,
            "seq_len": raw["seq_len"],
            "parameters": raw["parameters"],
        },
        "trials": trials,
        "median_tokens_per_s": {
            "commlab": statistics.median(commlab_rates),
            "torch": statistics.median(torch_rates),
        },
        "ratio_of_medians": of_medians,
        "ratio_paired_median": paired,
        "max_loss_difference": max_diff,
        "target": ">= 0.95",
    }


# ------------------------------------------------------------------------ (b) activation checkpointing
@contextlib.contextmanager
def silenced_native_output() -> Iterator[None]:
    """Send file descriptors 1 and 2 to /dev/null: the profiler's C++ start/stop lines are noise here."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def cpu_allocations(fn) -> tuple[object, int, int]:
    """Run fn under the profiler; return (its result, net bytes still allocated, peak live bytes)."""
    from torch.profiler import ProfilerActivity, profile

    with silenced_native_output(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return result, live, peak


def step_memory(model: GPT, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> tuple[int, int]:
    """(activation bytes, peak bytes above the start) of one forward + backward."""
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        _, loss = model(x, y)
        activations = torch.cuda.memory_allocated(device) - before
        loss.backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device) - before
        return activations, peak
    loss, activations, forward_peak = cpu_allocations(lambda: model(x, y)[1])
    _, _, backward_peak = cpu_allocations(loss.backward)
    return activations, max(forward_peak, activations + backward_peak)


def checkpoint_run(args: argparse.Namespace, corpus: ByteCorpus, seq_len: int, device: torch.device) -> dict:
    """Memory once per mode, then step times of the three modes interleaved, on one model."""
    config = GPTConfig.preset(args.ckpt_preset, n_layer=args.ckpt_layers, seq_len=seq_len)
    torch.manual_seed(0)
    model = GPT(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = (t.to(device) for t in lm_batch(corpus.train, 0, args.ckpt_batch_size, seq_len))
    print(
        f"[checkpoint] GPT {args.ckpt_preset} x {args.ckpt_layers} layers, batch {args.ckpt_batch_size} "
        f"x {seq_len} tokens, {args.threads} thread(s) on {device}: {args.ckpt_rounds} interleaved rounds",
        flush=True,
    )

    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    memory, times = {}, {mode: [] for mode in MODES}
    for mode in MODES:
        model.set_checkpoint(mode)
        step()  # warm-up
        memory[mode] = step_memory(model, x, y, device)
    for _ in range(args.ckpt_rounds):
        for mode in MODES:
            model.set_checkpoint(mode)
            times[mode].append(step())
    base_act, base_time = memory["none"][0], statistics.median(times["none"])
    rows, modes = [], {}
    for mode in MODES:
        act, peak = memory[mode]
        t = statistics.median(times[mode])
        less, more = base_act / act, t / base_time
        meets = less >= 2.0 and more <= 1.4
        modes[mode] = {
            "activation_bytes": act,
            "peak_bytes": peak,
            "step_seconds_median": t,
            "step_seconds": times[mode],
            "activation_reduction": less,
            "time_ratio": more,
            "meets_target": meets,
        }
        verdict = "-" if mode == "none" else ("yes" if meets else "no")
        rows.append([mode, mib(act), f"{less:.2f}x", mib(peak), f"{t * 1e3:.1f}", f"{more:.2f}x", verdict])
    table(
        ["checkpoint", "activations MiB", "less", "peak MiB", "step ms", "time", "target met"],
        rows,
        f"(b) activation checkpointing: {config.n_layer}-layer GPT (d_model {config.d_model}, seq_len "
        f"{seq_len}, batch {args.ckpt_batch_size}), step = forward + backward + AdamW, median of "
        f"{args.ckpt_rounds}",
    )
    return {"config": {**vars(config), "batch_size": args.ckpt_batch_size}, "modes": modes}


def bench_checkpoint(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    corpus = load_corpus()
    runs = [checkpoint_run(args, corpus, seq_len, device) for seq_len in args.ckpt_seq_lens]
    print(
        "target: activation memory >= 2x lower for <= 1.4x step time. Activations: bytes allocated in "
        "forward and still live after it (allocator events from torch.profiler on CPU), i.e. what "
        "autograd saved for backward"
    )
    return {
        "device": str(device),
        "threads": args.threads,
        "runs": runs,
        "target": ">= 2x less, <= 1.4x time",
    }


# ------------------------------------------------------------------------------------------- (c) ZeRO-1
def zero_rank(rank: int, world: int, store: str, out: str, opts: dict) -> None:
    """One step of plain AdamW and of ZeRO-1 AdamW on the same GPT; record each rank's state bytes."""
    from commlab.parallel import ZeroOptimizer

    join_group(rank, world, store)
    config = GPTConfig.preset(opts["preset"])
    torch.manual_seed(0)
    model = GPT(config)
    x, y = lm_batch(
        torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1)),
        0,
        world,
        config.seq_len,
        0,
        rank,
        world,
    )

    def state_bytes(optimizer: torch.optim.Optimizer) -> int:
        return sum(
            v.numel() * v.element_size()
            for state in optimizer.state.values()
            for v in state.values()
            if isinstance(v, torch.Tensor)
        )

    plain = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(x, y)[1].backward()
    plain.step()
    plain_bytes = state_bytes(plain)
    del plain
    model.zero_grad(set_to_none=True)
    zero = ZeroOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-3)
    model(x, y)[1].backward()
    zero.step()
    per_rank = [None] * world
    dist.all_gather_object(per_rank, zero.local_state_bytes())
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        Path(out).write_text(json.dumps({"plain": plain_bytes, "zero": per_rank, "parameters": params}))
    commlab.release()
    dist.destroy_process_group()


def bench_zero(args: argparse.Namespace) -> dict:
    runs = []
    rows = []
    for world in args.zero_ranks:
        print(f"[zero] GPT {args.zero_preset} on {world} gloo ranks", flush=True)
        raw = spawn(zero_rank, world, {"preset": args.zero_preset})
        largest = max(raw["zero"])
        ratio = raw["plain"] / largest
        runs.append({"ranks": world, **raw, "reduction": ratio, "ideal": world})
        rows.append(
            [
                world,
                mib(raw["plain"]),
                mib(largest),
                mib(min(raw["zero"])),
                f"{ratio:.2f}x",
                f"{ratio / world:.1%}",
            ]
        )
    table(
        ["dp ranks", "AdamW state MiB", "ZeRO-1 max/rank", "min/rank", "reduction", "of ideal (DP)"],
        rows,
        f"(c) ZeRO-1 optimizer state per rank, AdamW on GPT {args.zero_preset} ({runs[0]['parameters']:,} "
        "parameters), after one step",
    )
    print("target: per-rank state ~ 1/DP of plain AdamW's")
    return {"preset": args.zero_preset, "runs": runs, "target": "~ 1/DP"}


# ------------------------------------------------------------------------------------------ (d) quality
def run_example(ranks: int, flags: list[str], label: str) -> dict:
    """torchrun examples/ddp.py on `ranks` ranks with --json; stream its output; return its record."""
    with tempfile.TemporaryDirectory(prefix="commlab-bench-") as tmpdir:
        out = os.path.join(tmpdir, "run.json")
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
            str(EXAMPLE), *flags, "--json", out,
        ]  # fmt: skip
        print(f"[quality] {label}: {' '.join(['torchrun', *command[3:-2]])}", flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        start = time.perf_counter()
        with subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                print(f"  | {line}", end="", flush=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{label}: examples/ddp.py exited with {proc.returncode}")
        record = json.loads(Path(out).read_text())
        record["launch_wall_seconds"] = time.perf_counter() - start
        record.pop("sample", None)
        return record


def bench_quality(args: argparse.Namespace) -> dict:
    extra = ["--steps", str(args.quality_steps)] if args.quality_steps else []
    gpt = run_example(
        args.quality_ranks, [*extra, "--sample-tokens", "0"], "GPT, the make demo configuration"
    )
    vit = run_example(args.quality_ranks, ["--model", "vit", *extra], "ViT on digits")
    rows = [
        [
            "GPT byte LM (demo)",
            "validation loss",
            f"{gpt['val_loss']:.3f} nats",
            f"unigram baseline {gpt['unigram_loss']:.3f} ({gpt['val_loss'] / gpt['unigram_loss']:.0%} of it)",
            f"{gpt['launch_wall_seconds']:.1f}",
        ],
        [
            "ViT digits",
            "test accuracy",
            f"{vit['test_accuracy']:.1%}",
            "target >= 90%",
            f"{vit['launch_wall_seconds']:.1f}",
        ],
    ]
    table(
        ["run", "metric", "value", "reference", "wall s"],
        rows,
        f"(d) quality on {args.quality_ranks} gloo ranks (default examples/ddp.py budgets"
        + (f", --steps {args.quality_steps})" if args.quality_steps else ")"),
    )
    return {"ranks": args.quality_ranks, "gpt": gpt, "vit": vit}


# ------------------------------------------------------------------------------------------------- main
def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of ints") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive ints, e.g. 2,4")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    add("--quick", action="store_true", help="smoke run: 3 trials, fewer steps, short quality runs")
    add("--json", default=str(ROOT / "out" / "training.json"), help="where to write the results")
    add("--trials", type=int, default=5, help="[ddp] interleaved trials per implementation (median)")
    add("--ddp-ranks", type=int, default=2, help="[ddp] gloo ranks")
    add("--ddp-preset", default="small", help="[ddp] GPT preset")
    add("--ddp-batch-size", type=int, default=32, help="[ddp] global batch (sequences)")
    add("--ddp-steps", type=int, default=20, help="[ddp] timed steps per run")
    add("--bucket-mb", type=float, default=25.0, help="[ddp] bucket size of both wrappers, MiB")
    add("--algorithm", default="auto", help="[ddp] commlab allreduce algorithm")
    add("--ckpt-preset", default="small", help="[checkpoint] GPT preset (its n_layer is replaced)")
    add("--ckpt-layers", type=int, default=8, help="[checkpoint] layers")
    add("--ckpt-seq-lens", type=int_list, default=[64, 256], help="[checkpoint] sequence lengths to run")
    add("--ckpt-batch-size", type=int, default=16, help="[checkpoint] batch (sequences)")
    add("--ckpt-rounds", type=int, default=7, help="[checkpoint] timed steps per mode, interleaved (median)")
    add("--threads", type=int, default=1, help="[checkpoint] torch threads")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="[checkpoint] cpu or cuda")
    add("--zero-ranks", type=int_list, default=[2, 4], help="[zero] data-parallel sizes to run")
    add("--zero-preset", default="small", help="[zero] GPT preset")
    add("--quality-ranks", type=int, default=4, help="[quality] ranks of the example runs")
    add("--quality-steps", type=int, help="[quality] override both runs' --steps (default: the example's)")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        parser.error(
            f"--parts {args.parts!r}: unknown {', '.join(unknown) or '(empty)'}; accepted: {', '.join(PARTS)}"
        )
    args.parts = [p for p in PARTS if p in parts]
    for name in ("trials", "ddp_ranks", "ddp_batch_size", "ddp_steps", "ckpt_layers", "ckpt_batch_size",
                 "ckpt_rounds", "threads", "quality_ranks"):  # fmt: skip
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive int")
    if args.ddp_batch_size % args.ddp_ranks:
        parser.error(
            f"--ddp-batch-size {args.ddp_batch_size} must be a multiple of --ddp-ranks {args.ddp_ranks}"
        )
    if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        parser.error(
            f"--device {args.device!r}: accepted: cpu" + (", cuda" if torch.cuda.is_available() else "")
        )
    if args.quick:
        args.trials, args.ddp_steps, args.ckpt_rounds = min(args.trials, 3), min(args.ddp_steps, 8), 3
        args.zero_ranks = args.zero_ranks[:1]
        args.ckpt_seq_lens = args.ckpt_seq_lens[:1]
        args.quality_steps = args.quality_steps or 40
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    record: dict = {"machine": machine(), "args": vars(args), "results": {}}
    print(
        f"commlab {commlab.__version__} training benchmarks on {record['machine']['cpu']} "
        f"({record['machine']['usable_cpus']} usable cpus), torch {torch.__version__}; parts: "
        f"{', '.join(args.parts)}",
        flush=True,
    )
    benches = {"ddp": bench_ddp, "checkpoint": bench_checkpoint, "zero": bench_zero, "quality": bench_quality}
    start = time.perf_counter()
    for part in args.parts:
        part_start = time.perf_counter()
        record["results"][part] = benches[part](args)
        record["results"][part]["seconds"] = time.perf_counter() - part_start
    record["machine"]["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    record["seconds"] = time.perf_counter() - start
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"\nwrote {path} ({record['seconds']:.0f}s)")


if __name__ == "__main__":
    main()
