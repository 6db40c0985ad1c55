"""A transformer training step under DP x TP x PP: its compute, its collectives, their overlap and memory.

One data-parallel replica is simulated (every replica runs the same schedule). Each pipeline rank runs
the forward and backward tasks its schedule orders (`pipeline.py`); a task is the op list of
`compute.py` for its model chunk, with the tensor-parallel collectives in line (they block the compute
stream, as in Megatron-LM). Activations and gradients cross stage boundaries point to point (each
TP rank sends its 1/t slice over its own NIC; without sequence parallelism the receiver allgathers them).
Data-parallel gradient buckets are reduced on a separate stream as the last microbatch's backward fills
them; the step ends after the tied-embedding gradient sync, the optimizer and, under ZeRO, the parameter
allgather. Collectives are timed by the network simulator on the cluster topology (`CollectiveTimer`).

Ranks follow commlab.parallel.Mesh (`commlab.shared.layout`): rank = (dp_rank x pp + pp_rank) x tp +
tp_rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from commlab.shared.layout import rank_at
from commlab.sim.network import Profile
from commlab.sim.training.clusters import ClusterSpec, CollectiveTimer, cluster_spec
from commlab.sim.training.compute import (
    BF16,
    Efficiency,
    Item,
    Op,
    backward_of,
    embedding_forward,
    flops_of,
    head_forward,
    layer_forward,
    model_flops,
    optimizer_bytes_per_parameter,
)
from commlab.sim.training.memory import MemoryReport, memory_of, stage_parameters
from commlab.sim.training.pipeline import PipelineRun, run_pipeline, schedule_order
from commlab.sim.training.workload import Layout, ModelSpec, check_layout, padded_vocab

Segment = tuple[bool, str, float]  # (is a collective, name, seconds)


@dataclass
class CommTime:
    """Seconds of one kind of communication on the critical rank, and how much of it the step waits for."""

    total: float = 0.0
    exposed: float = 0.0

    @property
    def overlapped(self) -> float:
        return max(self.total - self.exposed, 0.0)


@dataclass
class TrainingResult:
    """A simulated step: its time and where it goes, FLOPs, utilization and the fullest GPU's memory."""

    model: ModelSpec
    layout: Layout
    cluster: str
    peak_flops: float
    step_time: float
    pipeline_time: float
    bubble: float
    model_flops: float
    hardware_flops: float
    comm: dict[str, CommTime]
    memory: MemoryReport
    tail: dict[str, float]  # seconds after the pipeline: data-parallel wait, embedding sync, optimizer...
    run: PipelineRun | None = field(default=None, repr=False)
    templates: dict | None = field(default=None, repr=False)
    sends: list[float] = field(default_factory=list, repr=False)  # transfer seconds, stage k -> k + 1
    buckets: list[list[tuple[float, float]]] = field(default_factory=list, repr=False)  # DP, per pp rank

    @property
    def gpus(self) -> int:
        return self.layout.gpus

    @property
    def tokens_per_second(self) -> float:
        return self.layout.global_batch * self.model.seq_len / self.step_time

    @property
    def mfu(self) -> float:
        """Model FLOPs (no recomputation) / (step time x GPUs x peak)."""
        return self.model_flops / (self.step_time * self.gpus * self.peak_flops)

    @property
    def hfu(self) -> float:
        """Hardware FLOPs (recomputation included) / (step time x GPUs x peak)."""
        return self.hardware_flops / (self.step_time * self.gpus * self.peak_flops)

    def to_dict(self) -> dict:
        return {
            "model": self.model.to_dict(),
            "layout": self.layout.to_dict(),
            "cluster": self.cluster,
            "gpus": self.gpus,
            "step_time_s": self.step_time,
            "pipeline_time_s": self.pipeline_time,
            "tokens_per_s": self.tokens_per_second,
            "mfu": self.mfu,
            "hfu": self.hfu,
            "bubble_fraction": self.bubble,
            "model_flops": self.model_flops,
            "hardware_flops": self.hardware_flops,
            "communication_s": {
                k: {"total": v.total, "exposed": v.exposed, "overlapped": v.overlapped}
                for k, v in self.comm.items()
            },
            "tail_s": self.tail,
            "memory_bytes": self.memory.to_dict(),
        }


def mesh_rank(dp_rank: int, pp_rank: int, tp_rank: int, layout: Layout) -> int:
    """Global rank of a mesh coordinate of `layout` (`commlab.shared.layout`: the runtime Mesh's order)."""
    return rank_at(dp_rank, pp_rank, tp_rank, layout.pp, layout.tp)


def _segments(
    items: list[Item], gpu, eff: Efficiency, timer: CollectiveTimer, group: tuple[int, ...]
) -> list:
    """Items timed, consecutive compute ops merged into one segment."""
    out: list[Segment] = []
    for item in items:
        if isinstance(item, Op):
            seconds = item.time(gpu, eff)
            if out and not out[-1][0]:
                out[-1] = (False, out[-1][1], out[-1][2] + seconds)
            else:
                out.append((False, "compute", seconds))
        else:
            out.append((True, item.name, timer.collective(item.op, group, item.nbytes)))
    return out


@dataclass(frozen=True)
class _Parts:
    """Forward and backward items of one layer, the embedding and the output head."""

    layer: tuple[list[Item], list[Item]]
    embedding: tuple[list[Item], list[Item]]
    head: tuple[list[Item], list[Item]]

    @classmethod
    def of(cls, model: ModelSpec, layout: Layout) -> _Parts:
        b, t, sp = layout.micro_batch, layout.tp, layout.sequence_parallel
        layer = layer_forward(model, b, t, sp)
        emb = embedding_forward(model, b, t, sp)
        head = head_forward(model, b, t, sp)
        return cls(
            (layer, backward_of(layer, layout.checkpoint)), (emb, backward_of(emb)), (head, backward_of(head))
        )

    def chunk(self, k: int, stages: int, layers: int, part: int) -> list:
        """Virtual stage k's forward (part 0) or backward (part 1) items, or segments, in order."""
        middle = list(self.layer[part]) * layers
        first = list(self.embedding[part]) if k == 0 else []
        last = list(self.head[part]) if k == stages - 1 else []
        return first + middle + last if part == 0 else last + middle + first


@dataclass
class StageCosts:
    """What every virtual stage costs per microbatch, and the step's fixed tail, before any scheduling."""

    forward: list[float]  # seconds per virtual stage (compute + in-line TP collectives)
    backward: list[float]
    sends: list[float]  # point-to-point seconds from virtual stage k to k + 1 (and back)
    templates: dict  # virtual stage -> (forward segments, backward segments)
    flops_per_microbatch: float  # hardware FLOPs of one microbatch through all stages, per TP rank
    chunk_parameters: list[float]  # parameters per virtual stage, per TP rank
    optimizer: float  # seconds of the slowest rank's optimizer step
    zero_allgather: float  # seconds of the parameter allgather after the step under ZeRO
    embedding_sync: float  # seconds of the tied-embedding gradient allreduce (first and last stage)


def make_timer(cluster: ClusterSpec, gpus: int, eff: Efficiency, fidelity: str = "auto") -> CollectiveTimer:
    """A collective timer whose software costs come from `eff`."""
    profile = Profile(alpha=eff.comm_alpha, launch=eff.comm_launch, efficiency=eff.comm, name="training")
    return CollectiveTimer(cluster, gpus, profile, fidelity)


def tp_group(pp_rank: int, layout: Layout) -> tuple[int, ...]:
    return tuple(mesh_rank(0, pp_rank, j, layout) for j in range(layout.tp))


def dp_group(pp_rank: int, layout: Layout) -> tuple[int, ...]:
    return tuple(mesh_rank(r, pp_rank, 0, layout) for r in range(layout.dp))


def stage_costs(
    model: ModelSpec, layout: Layout, spec: ClusterSpec, eff: Efficiency, timer: CollectiveTimer
) -> StageCosts:
    """Time every virtual stage's forward and backward, the transfers between stages and the tail."""
    gpu, p, tp, stages = spec.gpu, layout.pp, layout.tp, layout.virtual_pipeline
    layers = model.layers // stages
    items = _Parts.of(model, layout)
    # Every TP group sits alike (TP is innermost and divides a node), so one group times them all.
    group = tp_group(0, layout)
    timed = _Parts(
        *(
            (_segments(f, gpu, eff, timer, group), _segments(b, gpu, eff, timer, group))
            for f, b in (items.layer, items.embedding, items.head)
        )
    )
    forward, backward, templates = [], [], {}
    flops = 0.0
    for k in range(stages):
        flops += flops_of(items.chunk(k, stages, layers, 0)) + flops_of(items.chunk(k, stages, layers, 1))
        templates[k] = (timed.chunk(k, stages, layers, 0), timed.chunk(k, stages, layers, 1))
        forward.append(sum(s[2] for s in templates[k][0]))
        backward.append(sum(s[2] for s in templates[k][1]))
    # Each TP rank sends its 1/t slice over its own NIC; without sequence parallelism the receiver
    # allgathers the whole activation over TP (Megatron-LM's scatter-gather optimization).
    act_bytes = BF16 * layout.micro_batch * model.seq_len * model.hidden
    sends = []
    for k in range(stages - 1):
        src, dst = mesh_rank(0, k % p, 0, layout), mesh_rank(0, (k + 1) % p, 0, layout)
        seconds = timer.send(src, dst, act_bytes / tp)
        if tp > 1 and not layout.sequence_parallel:
            seconds += timer.collective("allgather", tp_group((k + 1) % p, layout), act_bytes)
        sends.append(seconds)
    chunk_params = [
        stage_parameters(model, layout, model.layers // stages, k == 0, k == stages - 1)
        for k in range(stages)
    ]
    per_rank = [sum(chunk_params[d::p]) for d in range(p)]
    shard = 1 / layout.dp if layout.zero >= 1 else 1.0
    traffic = optimizer_bytes_per_parameter(layout.fp32_grads) / (gpu.hbm_bandwidth * eff.memory)
    optimizer = max(per_rank) * shard * traffic
    gather = 0.0
    if layout.zero >= 1 and layout.dp > 1:
        gather = max(timer.collective("allgather", dp_group(d, layout), 2.0 * per_rank[d]) for d in range(p))
    emb_sync = 0.0
    if p > 1 and model.tied_embeddings:
        table = padded_vocab(model, tp) * model.hidden / tp * _grad_bytes(layout)
        ends = (mesh_rank(0, 0, 0, layout), mesh_rank(0, p - 1, 0, layout))
        emb_sync = timer.collective("allreduce", ends, table)
    return StageCosts(forward, backward, sends, templates, flops, chunk_params, optimizer, gather, emb_sync)


def _grad_bytes(layout: Layout) -> float:
    return 4.0 if layout.fp32_grads else 2.0


def lower_bound(costs: StageCosts, layout: Layout) -> float:
    """A step time no schedule beats: a rank's own work, after the first microbatch's forward reaches it
    and before the last one's backward leaves the stages in front of it, plus the fixed tail. Exact for
    1F1B on uniform stages without transfers."""
    p, m = layout.pp, layout.microbatches
    best = 0.0
    lead = 0.0
    for d in range(p):
        busy = m * sum(costs.forward[k] + costs.backward[k] for k in range(d, layout.virtual_pipeline, p))
        best = max(best, lead + busy)
        lead += costs.forward[d] + costs.backward[d]
    return best + costs.optimizer + costs.zero_allgather + costs.embedding_sync


def _data_parallel(run: PipelineRun, costs: StageCosts, layout: Layout, timer: CollectiveTimer) -> tuple:
    """Gradient buckets per pipeline rank, reduced one after another on the communication stream as the
    last backward of each chunk fills them. Returns (end of each rank's gradients, busy seconds, spans)."""
    p, v = layout.pp, layout.virtual_stages
    op = "allreduce" if layout.zero == 0 else "reduce_scatter"
    ends, busy_of, spans_of = [], [], []
    for d in range(p):
        free, busy, spans = 0.0, 0.0, []
        group = dp_group(d, layout)
        for c in range(v if layout.dp > 1 else 0):
            start, end = run.last_backward(d, c)
            total = costs.chunk_parameters[c * p + d] * _grad_bytes(layout)
            buckets = max(1, math.ceil(total / layout.bucket_bytes))
            seconds = timer.collective(op, group, total / buckets)
            for j in range(buckets):
                begin = max(free, start + (j + 1) / buckets * (end - start))
                free = begin + seconds
                spans.append((begin, free))
                busy += seconds
        ends.append(max(run.ends[d][-1], free))
        busy_of.append(busy)
        spans_of.append(spans)
    return ends, busy_of, spans_of


def simulate_training(
    model: ModelSpec,
    layout: Layout,
    cluster: str | ClusterSpec = "dgx-a100",
    efficiency: Efficiency | None = None,
    fidelity: str = "auto",
    timer: CollectiveTimer | None = None,
    separate_p2p: bool = True,
    keep_timeline: bool = True,
    costs: StageCosts | None = None,
) -> TrainingResult:
    """Simulate one training step of `model` split by `layout` on `cluster` (a preset name or spec).

    `fidelity` times the collectives ("auto": flow up to 64 ranks per group, analytic above); a `timer`
    shared across calls reuses its cache (the planner does). `separate_p2p` runs the pipeline a second
    time with free transfers, to tell the schedule's bubble from waiting on point-to-point messages.
    """
    eff = efficiency or Efficiency()
    spec = cluster_spec(cluster)
    check_layout(model, layout, None, spec.gpus_per_node)
    timer = timer or make_timer(spec, layout.gpus, eff, fidelity)
    costs = costs or stage_costs(model, layout, spec, eff, timer)
    p, v, m = layout.pp, layout.virtual_stages, layout.microbatches
    stages = layout.virtual_pipeline
    orders = [schedule_order(layout.schedule, d, p, m, v) for d in range(p)]
    run = run_pipeline(orders, costs.forward, costs.backward, costs.sends, costs.sends, m)
    makespan = run.makespan
    free = [0.0] * len(costs.sends)
    ideal = run_pipeline(orders, costs.forward, costs.backward, free, free, m) if separate_p2p else run

    grads_end, dp_busy, buckets = _data_parallel(run, costs, layout, timer)
    grads_done = max(grads_end)
    critical = max(range(p), key=lambda d: grads_end[d])
    tail = {
        "data_parallel_wait": grads_done - makespan,
        "embedding_sync": costs.embedding_sync,
        "optimizer": costs.optimizer,
        "zero_allgather": costs.zero_allgather,
    }
    step = grads_done + costs.embedding_sync + costs.optimizer + costs.zero_allgather

    mine = range(critical, stages, p)
    tp_total = m * sum(s[2] for k in mine for seg in costs.templates[k] for s in seg if s[0])
    edges = {e for k in mine for e in (k - 1, k) if 0 <= e < stages - 1}
    p2p_total = m * sum(
        costs.sends[e] for e in edges
    )  # the critical rank's incoming activations and gradients
    comm = {
        "tensor_parallel": CommTime(tp_total, tp_total),
        "pipeline_p2p": CommTime(p2p_total, max(makespan - ideal.makespan, 0.0)),
        "data_parallel": CommTime(dp_busy[critical], tail["data_parallel_wait"]),
        "embedding_sync": CommTime(costs.embedding_sync, costs.embedding_sync),
        "zero_allgather": CommTime(costs.zero_allgather, costs.zero_allgather),
    }
    return TrainingResult(
        model=model,
        layout=layout,
        cluster=spec.name,
        peak_flops=spec.gpu.bf16_flops,
        step_time=step,
        pipeline_time=makespan,
        bubble=ideal.bubble_fraction(),
        model_flops=model_flops(model, layout),
        hardware_flops=costs.flops_per_microbatch * m * layout.dp * layout.tp,
        comm=comm,
        memory=memory_of(model, layout, spec, eff, orders),
        tail=tail,
        run=run if keep_timeline else None,
        templates=costs.templates if keep_timeline else None,
        sends=costs.sends,
        buckets=buckets,
    )
