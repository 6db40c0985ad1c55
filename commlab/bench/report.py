"""The benchmark's output: the nccl-tests table, a progress bar, JSON with the machine, a busbw plot.

Columns as nccl-tests prints them (size, count, type, redop, root, time, algbw, busbw, #wrong), then the
algorithm, the native collective's time and busbw, and `ratio` = native time / commlab time (above 1:
commlab is faster). Sizes are bytes; for reduce_scatter and allgather `size` is the total and `count` the
elements per rank, as in nccl-tests. GB/s means 1e9 bytes/s.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import statistics
import sys
import time
from typing import Any

import commlab
from commlab.bench.config import BenchConfig

_TYPE_NAMES = {"float32": "float", "float64": "double", "float16": "half", "bfloat16": "bfloat16"}


def machine_description(backend_detail: str = "") -> dict[str, Any]:
    """Where the numbers were taken: host, processor, cores, memory, load, software versions."""
    import numpy
    import torch

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    memory = None
    with contextlib.suppress(ValueError, OSError, AttributeError):
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "memory_bytes": memory,
        "load_average": load,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "commlab": commlab.__version__,
        "transport": backend_detail,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def format_size(size: int) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


class Reporter:
    """Prints on rank 0 only (`enabled`); every rank may call it."""

    def __init__(self, config: BenchConfig, world: int, backend_detail: str, enabled: bool) -> None:
        self.config = config
        self.world = world
        self.backend_detail = backend_detail
        self.enabled = enabled
        self.bar = enabled and config.progress and sys.stderr.isatty()
        self._started = time.monotonic()

    def header(self) -> None:
        if not self.enabled:
            return
        c = self.config
        print(
            f"# commlab bench {c.op}: {self.world} ranks, backend {c.backend} ({self.backend_detail}), "
            f"dtype {c.dtype}, op {c.redop}, iters {c.iters}, warmup {c.warmup}, median of {c.repeats}, "
            f"argument check {'on' if c.arg_check else 'off'}"
        )
        print("#")
        print(
            f"# {'size':>10} {'count':>11} {'type':>8} {'redop':>6} {'root':>5} {'algorithm':>24}"
            f" {'time':>10} {'algbw':>7} {'busbw':>7} {'#wrong':>7}"
            f" {'native':>10} {'busbw':>7} {'ratio':>6}"
        )
        print(
            f"# {'(B)':>10} {'(elements)':>11} {'':>8} {'':>6} {'':>5} {'':>24}"
            f" {'(us)':>10} {'(GB/s)':>7} {'(GB/s)':>7} {'':>7} {'(us)':>10} {'(GB/s)':>7} {'':>6}"
        )
        sys.stdout.flush()

    def row(self, row: dict) -> None:
        if not self.enabled:
            return
        self._clear_bar()
        name = row["algorithm"]
        if name == "auto":
            name = f"auto ({row['resolved']})"
        native = "" if "native_time_us" not in row else (
            f" {row['native_time_us']:>10.1f} {row['native_busbw']:>7.3f} {row['ratio']:>6.2f}"
        )  # fmt: skip
        if not native:
            native = f" {'n/a':>10} {'':>7} {'':>6}"
        print(
            f"  {row['size']:>10} {row['count']:>11} {_TYPE_NAMES.get(row['type'], row['type']):>8}"
            f" {row['redop']:>6} {row['root']:>5} {name:>24} {row['time_us']:>10.1f} {row['algbw']:>7.3f}"
            f" {row['busbw']:>7.3f} {row['wrong']:>7}{native}"
        )
        sys.stdout.flush()

    def footer(self, rows: list[dict]) -> None:
        if not self.enabled or not rows:
            return
        print("#")
        names = list(dict.fromkeys(r["algorithm"] for r in rows))
        for name in names:
            busbw = [r["busbw"] for r in rows if r["algorithm"] == name]
            print(f"# Avg bus bandwidth    : {statistics.fmean(busbw):.4f} GB/s  ({name})")
        native = {r["size"]: r["native_busbw"] for r in rows if "native_busbw" in r}
        if native:
            print(f"# Avg bus bandwidth    : {statistics.fmean(native.values()):.4f} GB/s  (native)")
        wrong = sum(r["wrong"] for r in rows)
        print(f"# Out of bounds values : {wrong} {'OK' if wrong == 0 else 'FAILED'}")
        print("#")
        sys.stdout.flush()

    def progress(self, done: int, total: int, size: int | None) -> None:
        """A one-line bar on stderr (only on a terminal), redrawn per size."""
        if not self.bar:
            return
        width = 30
        filled = width * done // max(total, 1)
        elapsed = time.monotonic() - self._started
        what = f"size {format_size(size)}" if size is not None else "done"
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {what} {elapsed:.0f}s ")
        if size is None:
            sys.stderr.write("\n")
        sys.stderr.flush()

    def _clear_bar(self) -> None:
        if self.bar:
            sys.stderr.write("\r" + " " * 72 + "\r")
            sys.stderr.flush()

    def save(self, rows: list[dict]) -> None:
        """Write --json and --plot files (rank 0)."""
        if not self.enabled:
            return
        config = self.config
        if config.json_path:
            document = {
                "machine": machine_description(self.backend_detail),
                "config": {**vars(config), "world_size": self.world},
                "rows": rows,
            }
            with open(config.json_path, "w") as out:
                json.dump(document, out, indent=1)
        if config.plot_path:
            plot(rows, config, self.world, config.plot_path)


def plot(rows: list[dict], config: BenchConfig, world: int, path: str) -> None:
    """busbw against size, one line per algorithm and one for the native collective."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise commlab.CommlabError("--plot needs matplotlib: pip install matplotlib") from error
    figure, axes = plt.subplots(figsize=(8, 5))
    for name in dict.fromkeys(r["algorithm"] for r in rows):
        mine = [r for r in rows if r["algorithm"] == name]
        axes.plot([r["size"] for r in mine], [r["busbw"] for r in mine], marker="o", label=name)
    native = sorted({(r["size"], r["native_busbw"]) for r in rows if "native_busbw" in r})
    if native:
        axes.plot(*zip(*native, strict=True), marker="s", linestyle="--", color="black", label="native")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("size (bytes)")
    axes.set_ylabel("busbw (GB/s)")
    axes.set_title(f"{config.op}, {world} ranks, {config.backend}, {config.dtype}")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
