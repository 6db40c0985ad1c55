"""Memory per GPU of a training step: weights, gradients, optimizer states and activations.

Parameters: mixed-precision Adam keeps a bf16 weight (2 bytes), a gradient (2 bytes, or 4 for fp32 main
gradients) and fp32 master weight, momentum and variance (12 bytes): 16 or 18 bytes per parameter. ZeRO
stage 1 shards the 12 over the data-parallel group, stage 2 the gradients too.

Activations per layer and microbatch (Korthikanti et al. 2022, "Reducing Activation Recomputation in
Large Transformer Models", sec. 4), bytes, with s sequence, b microbatch, h hidden, a heads, t TP:
  none:                 s b h (10 + 24/t + 5 a s / (h t))      (t = 1: s b h (34 + 5 a s / h))
  none + sequence par.: s b h (34 + 5 a s / h) / t
  selective:            s b h (10 + 24/t)                      (+ sequence parallel: 34 s b h / t)
  full:                 2 s b h per layer input                (+ sequence parallel: / t)
Linear attention keeps no s x s scores: its 5 a s / (h t) term becomes (4 + 2 d / s) / t, the feature
maps phi(Q), phi(K) (2 s b h bytes each) and the d x d state per head (2 b h d bytes).
Full recomputation also needs one layer's activations while that layer's backward runs. The first stage
holds the embedding dropout's mask (s b h bytes per microbatch, / t with sequence parallelism), the last
the output layer's 4 s b h / t (1 + V / h) for one microbatch. How many microbatches are in flight comes
from the pipeline schedule (`commlab.sim.training.pipeline`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from commlab.sim.training.pipeline import peak_in_flight, schedule_order
from commlab.sim.training.workload import Layout, ModelSpec, padded_vocab

if TYPE_CHECKING:
    from commlab.sim.training.clusters import ClusterSpec
    from commlab.sim.training.compute import Efficiency


def layer_activation_bytes(
    model: ModelSpec, micro_batch: int, tp: int, checkpoint: str, sequence_parallel: bool
) -> float:
    """Bytes one layer keeps for its backward, per microbatch, on one TP rank (Korthikanti's formulas)."""
    s, b, h, t = model.seq_len, micro_batch, model.hidden, tp
    sbh = s * b * h
    if checkpoint == "full":
        return 2 * sbh / (t if sequence_parallel else 1)
    core = core_attention_bytes(model, micro_batch, tp)  # what selective recomputation drops
    if sequence_parallel:
        return sbh * 34 / t + (0 if checkpoint == "selective" else core)
    if checkpoint == "selective":
        return sbh * (10 + 24 / t)
    return sbh * (10 + 24 / t) + core


def core_attention_bytes(model: ModelSpec, micro_batch: int, tp: int) -> float:
    """Bytes attention's core keeps per layer on one TP rank: softmax's scores, dropout mask and
    probabilities, 5 a s^2 b / t; linear attention's feature maps and state, (4 s b h + 2 b h d) / t."""
    s, b, h, t = model.seq_len, micro_batch, model.hidden, tp
    if model.attention == "linear":
        return (4 * s * b * h + 2 * b * h * model.head_dim) / t
    return 5 * model.heads * s * s * b / t


def recompute_working_bytes(model: ModelSpec, micro_batch: int, tp: int, sequence_parallel: bool) -> float:
    """Under full recomputation: one layer's full activations, live while that layer's backward runs."""
    return layer_activation_bytes(model, micro_batch, tp, "none", sequence_parallel)


def embedding_activation_bytes(model: ModelSpec, micro_batch: int, tp: int, sequence_parallel: bool) -> float:
    """The first stage's embedding dropout mask (one byte per element), per microbatch in flight."""
    return model.seq_len * micro_batch * model.hidden / (tp if sequence_parallel else 1)


def head_activation_bytes(model: ModelSpec, micro_batch: int, tp: int) -> float:
    """The last stage's output layer (final norm, logits, cross-entropy): 4 s b h / t (1 + V / h)."""
    s, b, h = model.seq_len, micro_batch, model.hidden
    return 4 * s * b * h / tp * (1 + padded_vocab(model, tp) / h)


def bytes_per_parameter(layout: Layout) -> tuple[float, float, float]:
    """(weight, gradient, optimizer) bytes per parameter on one GPU, after ZeRO sharding."""
    grad = 4.0 if layout.fp32_grads else 2.0
    optimizer = 12.0 / layout.dp if layout.zero >= 1 else 12.0
    if layout.zero >= 2:
        grad /= layout.dp
    return 2.0, grad, optimizer


@dataclass
class MemoryReport:
    """The fullest GPU's memory in bytes: what it holds, its HBM capacity, the reserve and the verdict."""

    stage: int
    parameters: float
    weights: float
    gradients: float
    optimizer: float
    activations: float
    capacity: float
    reserved: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.reserved

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    @property
    def headroom(self) -> float:
        """Capacity minus total (negative when it does not fit)."""
        return self.capacity - self.total

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(total=self.total, fits=self.fits, headroom=self.headroom)
        return data


def stage_parameters(
    model: ModelSpec, layout: Layout, layers_on_device: int, first: bool, last: bool
) -> float:
    """Parameters one TP rank of a pipeline stage holds: its layers, the embedding on the first stage,
    the output head on the last (with tied embeddings the last stage keeps its own copy of the table when
    pp > 1, as Megatron-LM does)."""
    t = layout.tp
    per_layer = model.layer_parameters() / t
    params = layers_on_device * per_layer
    table = padded_vocab(model, t) * model.hidden / t
    positions = model.seq_len * model.hidden if model.position_embedding else 0
    if first:
        params += table + positions
    if last:
        params += model.head_parameters() - (0 if model.tied_embeddings else model.vocab * model.hidden)
        if not model.tied_embeddings or not first:
            params += table
    return params


def memory_report(
    model: ModelSpec, layout: Layout, activations: dict[int, float], hbm_bytes: float, reserved: float
) -> MemoryReport:
    """The report of the fullest pipeline rank among those in `activations` (rank -> peak bytes)."""
    p = layout.pp
    layers = model.layers // p
    weight_b, grad_b, opt_b = bytes_per_parameter(layout)
    best: MemoryReport | None = None
    for stage, acts in sorted(activations.items()):
        params = stage_parameters(model, layout, layers, stage == 0, stage == p - 1)
        report = MemoryReport(
            stage, params, params * weight_b, params * grad_b, params * opt_b, acts, hbm_bytes, reserved
        )
        if best is None or report.total > best.total:
            best = report
    assert best is not None, "no pipeline rank to report"
    return best


def activation_peaks(
    model: ModelSpec, layout: Layout, orders: list[list] | None = None, ranks: list[int] | None = None
) -> dict[int, float]:
    """Peak activation bytes of pipeline ranks (default all): in-flight microbatches per the schedule
    order times each chunk's bytes, plus the transient ones (full recomputation's working layer, the
    output layer on the last rank)."""
    p, v, stages = layout.pp, layout.virtual_stages, layout.virtual_pipeline
    b, t, sp = layout.micro_batch, layout.tp, layout.sequence_parallel
    per_layer = layer_activation_bytes(model, b, t, layout.checkpoint, sp)
    layers = model.layers // stages
    peaks = {}
    for d in range(p) if ranks is None else ranks:
        order = orders[d] if orders else schedule_order(layout.schedule, d, p, layout.microbatches, v)
        chunk = [per_layer * layers for _ in range(v)]
        if d == 0:
            chunk[0] += embedding_activation_bytes(model, b, t, sp)
        peak = peak_in_flight(order, chunk)
        if layout.checkpoint == "full":
            peak += recompute_working_bytes(model, b, t, sp)
        if d == p - 1:
            peak += head_activation_bytes(model, b, t)
        peaks[d] = peak
    return peaks


def memory_of(
    model: ModelSpec, layout: Layout, cluster: ClusterSpec, eff: Efficiency, orders: list[list] | None = None
) -> MemoryReport:
    """The fullest GPU's memory. Without `orders` only the first and last pipeline ranks are examined
    (the first holds the most microbatches in flight, the last the output layer): enough for pruning."""
    ranks = None if orders else sorted({0, layout.pp - 1})
    peaks = activation_peaks(model, layout, orders, ranks)
    return memory_report(model, layout, peaks, cluster.gpu.hbm_bytes, eff.reserved_memory)
