"""The compute of a transformer training step, op by op: FLOPs and bytes per op, timed by a roofline.

A layer's forward is a list of ops (QKV, attention scores, softmax + dropout, attention over values,
output projection, MLP, norms and residuals) and the tensor-parallel collectives between them, per TP rank
for one microbatch. Backward costs twice the forward (activation and weight gradients; collectives
mirrored: allreduce stays allreduce, allgather and reduce-scatter swap). Recomputation adds the whole
forward (full) or the core attention (selective) before a layer's backward. An op takes
max(flops / (peak x efficiency of its kind), bytes / (HBM bandwidth x memory efficiency)) plus a fixed
per-kernel overhead; `Efficiency` holds those constants, one set for every model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from commlab.errors import invalid
from commlab.sim.network import Accelerator
from commlab.sim.training.workload import Layout, ModelSpec, padded_vocab

BF16 = 2  # bytes per activation and weight element


@dataclass(frozen=True)
class Efficiency:
    """Fractions of peak the step's kernels and collectives reach, and fixed costs: one set for all models.

    Not fitted per model; see docs/training_sim.md for where each value comes from.
    """

    matmul: float = 0.70  # dense GEMMs (QKV, projections, MLP, logits): fraction of peak bf16 FLOP/s
    attention: float = 0.50  # batched attention matmuls (q k^T, scores x v): small head dimension
    memory: float = 0.80  # elementwise kernels (norms, softmax, dropout, GeLU): fraction of HBM bandwidth
    kernel_overhead: float = 4e-6  # seconds per kernel: launch gap and tail (partial last wave)
    comm: float = 0.80  # fraction of link bandwidth collectives reach (NCCL: ~235 of 300 GB/s on NVLink3)
    comm_launch: float = 10e-6  # seconds per collective (kernel launch, NCCL set-up)
    comm_alpha: float = 1e-6  # seconds per message a rank posts
    reserved_memory: float = 3e9  # bytes per GPU not available to the model (CUDA context, NCCL, allocator)

    def __post_init__(self) -> None:
        for name in ("matmul", "attention", "memory", "comm"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise invalid(name, value, "a fraction in (0, 1]")
        for name in ("kernel_overhead", "comm_launch", "comm_alpha", "reserved_memory"):
            if getattr(self, name) < 0:
                raise invalid(name, getattr(self, name), "a number >= 0")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Op:
    """One kernel: its FLOPs and the bytes it reads and writes; `kind` picks its efficiency."""

    name: str
    kind: str  # "matmul", "attention" or "memory"
    flops: float
    bytes: float
    core_attention: bool = False  # recomputed under selective checkpointing

    def scaled(self, factor: float) -> Op:
        return Op(self.name, self.kind, self.flops * factor, self.bytes * factor, self.core_attention)

    def time(self, gpu: Accelerator, eff: Efficiency) -> float:
        """Roofline time plus the kernel overhead."""
        rate = {"matmul": eff.matmul, "attention": eff.attention, "memory": 1.0}[self.kind]
        compute = self.flops / (gpu.bf16_flops * rate) if self.flops else 0.0
        memory = self.bytes / (gpu.hbm_bandwidth * eff.memory)
        return max(compute, memory) + eff.kernel_overhead


@dataclass(frozen=True)
class Comm:
    """A tensor-parallel collective inside a layer: op and buffer bytes (total, as nccl-tests counts)."""

    name: str
    op: str  # "allreduce", "allgather", "reduce_scatter"
    nbytes: float


Item = Op | Comm
_MIRROR = {"allreduce": "allreduce", "allgather": "reduce_scatter", "reduce_scatter": "allgather"}


def _matmul(name: str, m: float, k: float, n: float, kind: str = "matmul", core: bool = False) -> Op:
    """An (m x k) @ (k x n) product: 2mkn FLOPs; reads both operands and writes the result."""
    return Op(name, kind, 2.0 * m * k * n, BF16 * (m * k + k * n + m * n), core)


def _elementwise(name: str, elements: float, bytes_per_element: float, core: bool = False) -> Op:
    return Op(name, "memory", 0.0, elements * bytes_per_element, core)


def layer_forward(model: ModelSpec, micro_batch: int, tp: int, sequence_parallel: bool) -> list[Item]:
    """One transformer layer's forward on one TP rank for one microbatch, in execution order.

    Without sequence parallelism each half (attention, MLP) ends in an allreduce of the b x s x h
    activations and the norms and dropouts run on the whole sequence on every TP rank; with it, an
    allgather opens and a reduce-scatter closes each half and those elementwise ops run on s / t.
    """
    b, s, h, f, t = micro_batch, model.seq_len, model.hidden, model.ffn_hidden, tp
    tokens = b * s
    rows = tokens / t if sequence_parallel else tokens  # elements of the replicated region, per h
    act = BF16 * tokens * h
    items: list[Item] = [_elementwise("layernorm 1", rows * h, 4)]
    if sequence_parallel and t > 1:
        items.append(Comm("allgather (attention input)", "allgather", act))
    items += [
        _matmul("qkv", tokens, h, 3 * h / t),
        *core_attention(model, micro_batch, tp),
        _matmul("output projection", tokens, h / t, h),
    ]
    if t > 1:
        items.append(
            Comm("reduce-scatter (attention)", "reduce_scatter", act)
            if sequence_parallel
            else Comm("allreduce (attention)", "allreduce", act)
        )
    items += [
        _elementwise("bias + dropout + residual", rows * h, 7),
        _elementwise("layernorm 2", rows * h, 4),
    ]
    if sequence_parallel and t > 1:
        items.append(Comm("allgather (MLP input)", "allgather", act))
    items += [
        _matmul("MLP up", tokens, h, f / t),
        _elementwise("bias + GeLU", tokens * f / t, 4),
        _matmul("MLP down", tokens, f / t, h),
    ]
    if t > 1:
        items.append(
            Comm("reduce-scatter (MLP)", "reduce_scatter", act)
            if sequence_parallel
            else Comm("allreduce (MLP)", "allreduce", act)
        )
    items.append(_elementwise("bias + dropout + residual", rows * h, 7))
    return items


def core_attention(model: ModelSpec, micro_batch: int, tp: int) -> list[Op]:
    """Attention between the qkv and output projections, on one TP rank (a / t heads).

    Softmax: q k^T and scores x v over the whole s x s square, causal or not (the simulator counts the
    square for decoders and encoders alike). Linear (Katharopoulos et al. 2020): the feature map on q and
    k, phi(K)^T V into the d x d state and phi(Q) against it, 2 s d^2 FLOPs per head each, and the
    normaliser; the same count for causal (prefix sums) and non-causal, the cost the paper gives for
    both; a chunked causal kernel's within-chunk products (2 x 2 s c d per head at chunk c) are left
    out, as the masked half of the softmax square is left in.
    """
    b, s, d, t = micro_batch, model.seq_len, model.head_dim, tp
    heads = b * model.heads / t  # (sequence, head) pairs on this rank
    if model.attention == "linear":
        return [
            _elementwise("feature map elu + 1", 2 * heads * s * d, 4, core=True),
            _matmul("linear attention state", heads * d, s, d, "attention", core=True),
            _matmul("linear attention output", heads * s, d, d, "attention", core=True),
            _elementwise("normaliser + division", heads * s * d, 6, core=True),
        ]
    return [
        _matmul("attention scores", heads * s, d, s, "attention", core=True),
        _elementwise("softmax + dropout", heads * s * s, 9, core=True),  # fused scale-mask-softmax, dropout
        _matmul("attention over values", heads * s, s, d, "attention", core=True),
    ]


def embedding_forward(model: ModelSpec, micro_batch: int, tp: int, sequence_parallel: bool) -> list[Item]:
    """The first stage's token (and position) lookup; vocab-parallel, so the result is summed over TP."""
    tokens, h = micro_batch * model.seq_len, model.hidden
    items: list[Item] = [_elementwise("embedding lookup + dropout", tokens * h, 7)]
    if tp > 1:
        op = "reduce_scatter" if sequence_parallel else "allreduce"
        items.append(Comm(f"{op.replace('_', '-')} (embedding)", op, BF16 * tokens * h))
    return items


def head_forward(model: ModelSpec, micro_batch: int, tp: int, sequence_parallel: bool) -> list[Item]:
    """The last stage's final norm, vocab-parallel logits and cross-entropy (three small allreduces of
    per-token maxima, sums and target logits)."""
    tokens, h = micro_batch * model.seq_len, model.hidden
    vocab = padded_vocab(model, tp) / tp
    items: list[Item] = [
        _elementwise("final layernorm", (tokens / tp if sequence_parallel else tokens) * h, 4)
    ]
    if sequence_parallel and tp > 1:
        items.append(Comm("allgather (logits input)", "allgather", BF16 * tokens * h))
    items += [_matmul("logits", tokens, h, vocab), _elementwise("cross-entropy", tokens * vocab, 12)]
    if tp > 1:
        items += [Comm(f"allreduce (cross-entropy {n})", "allreduce", 4 * tokens) for n in ("max", "sum")]
        items.append(Comm("allreduce (cross-entropy target)", "allreduce", 4 * tokens))
    return items


def backward_of(forward: list[Item], recompute: str = "none") -> list[Item]:
    """The backward of `forward`: reversed, compute doubled, collectives mirrored; preceded by the
    recomputed forward ("full": everything, "selective": the core attention ops, "none": nothing)."""
    if recompute == "full":
        redo: list[Item] = list(forward)
    elif recompute == "selective":
        redo = [i for i in forward if isinstance(i, Op) and i.core_attention]
    else:
        redo = []
    back: list[Item] = []
    for item in reversed(forward):
        if isinstance(item, Op):
            back.append(item.scaled(2.0))
        elif not item.name.startswith("allreduce (cross-entropy"):
            back.append(Comm(item.name + " backward", _MIRROR[item.op], item.nbytes))
    return [*(_recomputed(i) for i in redo), *back]


def _recomputed(item: Item) -> Item:
    if isinstance(item, Op):
        return Op("recompute " + item.name, item.kind, item.flops, item.bytes, item.core_attention)
    return Comm("recompute " + item.name, item.op, item.nbytes)


def flops_of(items: list[Item]) -> float:
    return sum(i.flops for i in items if isinstance(i, Op))


def model_flops(model: ModelSpec, layout: Layout) -> float:
    """FLOPs of one step without recomputation: 3 x forward (forward + 2x backward) of every layer and the
    logits over the unpadded vocabulary, for the whole global batch (the MFU numerator; the embedding
    lookup is no FLOPs)."""
    layer = flops_of(layer_forward(model, 1, 1, False))
    logits = (
        2.0 * model.seq_len * model.hidden * model.vocab
    )  # the real vocabulary: padding is not the model's
    return 3.0 * layout.global_batch * (model.layers * layer + logits)


def optimizer_bytes_per_parameter(fp32_grads: bool) -> float:
    """HBM traffic of a fused mixed-precision Adam step per parameter: read gradient, fp32 master, m, v;
    write master, m, v and the bf16 weight."""
    return (4 if fp32_grads else 2) + 12 + 12 + 2


def load_efficiency(path: str) -> Efficiency:
    """Efficiency constants from a TOML file: any of Efficiency's fields, the rest at their defaults."""
    from dataclasses import fields
    from pathlib import Path

    import tomllib

    file = Path(path)
    if not file.is_file():
        raise invalid("efficiency", path, "an existing TOML file")
    with file.open("rb") as handle:
        data = tomllib.load(handle)
    known = [f.name for f in fields(Efficiency)]
    for key in data:
        if key not in known:
            raise invalid(f"{path}: key", key, known)
    return Efficiency(**data)
