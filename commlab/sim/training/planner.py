"""`commlab plan`: enumerate a model's parallel layouts on a cluster, keep those that fit, rank by step time.

Every layout with dp x tp x pp = GPUs (TP inside a node and dividing the heads, pp dividing the layers),
each microbatch size that divides the batch, each checkpointing mode, sequence parallelism on and off,
1F1B or interleaved 1F1B with every virtual stage count that divides the layers, and ZeRO-1 as an
alternative where there is data parallelism. Layouts that do not fit in memory are dropped (cheap: no
timing). The rest are bounded below without scheduling (`training.lower_bound`) and simulated in order of
that bound until the bound exceeds the N-th best simulated step: the top N are exact, with far fewer
simulations than layouts. Collective times are cached across layouts in one `CollectiveTimer`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from commlab.errors import invalid
from commlab.shared.layout import CHECKPOINT_MODES
from commlab.sim.training.clusters import ClusterSpec, cluster_spec
from commlab.sim.training.compute import Efficiency
from commlab.sim.training.memory import MemoryReport, memory_of
from commlab.sim.training.step import (
    TrainingResult,
    lower_bound,
    make_timer,
    simulate_training,
    stage_costs,
)
from commlab.sim.training.workload import Layout, ModelSpec, check_layout

MICRO_BATCHES = (1, 2, 4, 8)
MAX_VIRTUAL_STAGES = 8


@dataclass
class PlanEntry:
    """A ranked layout: its simulation and the reasons it ranks where it does."""

    result: TrainingResult

    def reasons(self) -> str:
        r = self.result
        exposed = sum(c.exposed for c in r.comm.values())
        mem = r.memory
        return (
            f"bubble {r.bubble * 100:.1f}%, exposed comm {exposed / r.step_time * 100:.1f}% "
            f"(TP {r.comm['tensor_parallel'].exposed / r.step_time * 100:.1f}%), "
            f"memory {mem.total / 1e9:.1f} of {mem.capacity / 1e9:.0f} GB"
        )


@dataclass
class LayoutPlan:
    """The outcome: the top layouts, how many were enumerated, fit, were simulated, and the time taken."""

    entries: list[PlanEntry]
    enumerated: int
    fitting: int
    simulated: int
    seconds: float
    smallest_oom: MemoryReport | None = None  # the layout nearest to fitting, when none fits


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_layouts(
    model: ModelSpec,
    gpus: int,
    global_batch: int,
    gpus_per_node: int,
    micro_batches: tuple[int, ...] = MICRO_BATCHES,
    checkpoints: tuple[str, ...] = CHECKPOINT_MODES,
) -> Iterator[Layout]:
    """Every valid layout (check_layout passes) over the options the module docstring lists."""
    for tp in _divisors(min(gpus_per_node, gpus)):
        if model.heads % tp or gpus % tp or gpus_per_node % tp:
            continue
        for pp in _divisors(gpus // tp):
            if model.layers % pp:
                continue
            dp = gpus // (tp * pp)
            for mb in micro_batches:
                if global_batch % (mb * dp):
                    continue
                m = global_batch // (mb * dp)
                schedules = [("1f1b", 1)]
                if pp > 1 and m % pp == 0:
                    vs = [v for v in range(2, MAX_VIRTUAL_STAGES + 1) if model.layers % (pp * v) == 0]
                    schedules += [("interleaved", v) for v in vs]
                for schedule, v in schedules:
                    for checkpoint in checkpoints:
                        for sp in (False, True) if tp > 1 else (False,):
                            for zero in (0, 1) if dp > 1 else (0,):
                                yield Layout(dp, tp, pp, mb, global_batch, v, schedule, zero, checkpoint, sp)


class Progress:
    """A one-line progress bar on stderr (only on a terminal, once work has run a second)."""

    def __init__(self, total: int, label: str, enabled: bool | None = None) -> None:
        self.total, self.label, self.start = max(total, 1), label, time.monotonic()
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.shown = False

    def update(self, done: int, note: str = "") -> None:
        if self.enabled and time.monotonic() - self.start > 1:
            filled = int(30 * done / self.total)
            sys.stderr.write(
                f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total} {note:<30}"
            )
            sys.stderr.flush()
            self.shown = True

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\r" + " " * 100 + "\r")
            sys.stderr.flush()


def plan_layouts(
    model: ModelSpec,
    gpus: int,
    cluster: str | ClusterSpec = "dgx-a100",
    global_batch: int | None = None,
    top: int = 10,
    efficiency: Efficiency | None = None,
    fidelity: str = "analytic",
    micro_batches: tuple[int, ...] = MICRO_BATCHES,
    checkpoints: tuple[str, ...] = CHECKPOINT_MODES,
    progress: Callable[[str, int, int], None] | None = None,
) -> LayoutPlan:
    """The `top` fastest layouts of `model` on `gpus` GPUs of `cluster` that fit in memory."""
    began = time.monotonic()
    eff = efficiency or Efficiency()
    spec = cluster_spec(cluster)
    if gpus < 1:
        raise invalid("gpus", gpus, "an integer >= 1")
    if top < 1:
        raise invalid("top", top, "an integer >= 1")
    batch = global_batch or gpus
    layouts = list(enumerate_layouts(model, gpus, batch, spec.gpus_per_node, micro_batches, checkpoints))
    if not layouts:
        raise invalid("global_batch", batch, f"a batch that some microbatch size x dp divides on {gpus} GPUs")
    fitting, nearest = [], None
    for i, layout in enumerate(layouts):
        check_layout(model, layout, gpus, spec.gpus_per_node)
        report = memory_of(model, layout, spec, eff)
        if report.fits:
            fitting.append(layout)
        elif nearest is None or report.total < nearest.total:
            nearest = report
        if progress and i % 64 == 0:
            progress("memory", i, len(layouts))
    timer = make_timer(spec, gpus, eff, fidelity)
    bounded = []
    for i, layout in enumerate(fitting):
        costs = stage_costs(model, layout, spec, eff, timer)
        bounded.append((lower_bound(costs, layout), i, layout, costs))
        if progress and i % 16 == 0:
            progress("bounds", i, len(fitting))
    bounded.sort(key=lambda x: (x[0], x[1]))
    best: list[TrainingResult] = []
    simulated = 0
    for i, (bound, _, layout, costs) in enumerate(bounded):
        if len(best) >= top and bound >= best[top - 1].step_time:
            break
        result = simulate_training(
            model, layout, spec, eff, timer=timer, separate_p2p=False, keep_timeline=False, costs=costs
        )
        simulated += 1
        best.append(result)
        best.sort(key=lambda r: r.step_time)
        del best[top:]
        if progress:
            progress("simulate", i, len(bounded))
    # Re-run the winners with the p2p split, so their reasons tell bubble from transfer waits.
    entries = [
        PlanEntry(simulate_training(model, r.layout, spec, eff, timer=timer, keep_timeline=False))
        for r in best
    ]
    return LayoutPlan(entries, len(layouts), len(fitting), simulated, time.monotonic() - began, nearest)
