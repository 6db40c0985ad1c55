"""What benchmarks/pipeline.py and benchmarks/tensor.py share: spawning gloo ranks, the machine, tables."""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

import commlab

ROOT = Path(__file__).resolve().parent.parent
RANK_TIMEOUT_S = 300.0


def machine() -> dict:
    """What the figures were measured on; load averages too, since the machine may be shared."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commlab": commlab.__version__,
        "commit": commit or None,
        "load_average_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _rank_main(rank: int, world: int, store: str, out: str, fn: Callable, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world,
        timeout=timedelta(seconds=RANK_TIMEOUT_S),
    )  # fmt: skip
    try:
        result = fn(*args)
        if rank == 0:
            Path(out).write_bytes(pickle.dumps(result))
    finally:
        commlab.release()
        dist.destroy_process_group()


def spawn(fn: Callable, world: int, *args: Any) -> Any:
    """Run fn(*args) on `world` fresh gloo ranks (one thread each); return rank 0's result."""
    with tempfile.TemporaryDirectory(prefix="commlab-bench-") as tmpdir:
        store, out = os.path.join(tmpdir, "store"), os.path.join(tmpdir, "result.pkl")
        os.environ["OMP_NUM_THREADS"] = "1"
        torch_mp.start_processes(
            _rank_main, args=(world, store, out, fn, args), nprocs=world, start_method="spawn"
        )
        return pickle.loads(Path(out).read_bytes())


def slowest(seconds: float) -> float:
    """The largest of every rank's value (a parallel step takes as long as its slowest rank)."""
    value = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item()


def timed(fn: Callable[[], Any]) -> float:
    """Seconds of one call started together on every rank, as the slowest rank saw it."""
    dist.barrier()
    start = time.perf_counter()
    fn()
    return slowest(time.perf_counter() - start)


def table(headers: list[str], rows: list[list], title: str) -> None:
    """Print a right-aligned table under a title line."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
