"""Tensor parallelism (Megatron-LM style) on commlab's collectives.

Four autograd functions move activations in and out of a TP region, in two conjugate pairs: each does
in backward what its partner does in forward (the transpose of its own forward).

    copy_to_tensor_parallel       forward: identity           backward: allreduce
    reduce_from_tensor_parallel   forward: allreduce          backward: identity
    scatter_to_tensor_parallel    forward: keep my last-dim slice   backward: allgather
    gather_from_tensor_parallel   forward: allgather          backward: keep my slice

A column-parallel linear keeps a block of output features (copy in), a row-parallel one a block of input
features (reduce out). In a transformer block, qkv and MLP-up are column-parallel, attention-out and
MLP-down row-parallel, so attention keeps whole heads and the block costs two allreduces forward and two
backward. The vocabulary is split too: VocabParallelEmbedding, logits on a vocabulary shard, and a
cross-entropy that never gathers the logits.

sequence.py adds sequence parallelism on top (reduce-scatter / allgather along the sequence).

Initialization does not depend on the TP size: each layer builds its full torch layer from the RNG and
keeps its slice, and marks the parameter `shard_of = (full_shape, dim, start)` so the models' init draws
the full tensor again and keeps the same slice.
"""

from __future__ import annotations

import weakref
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from commlab.collectives.api import Group, all_gather, all_reduce, communicator
from commlab.collectives.communicator import Communicator
from commlab.errors import invalid
from commlab.parallel.layers import Layers

# Bytes handed to TP collectives, by kind; benchmarks/tensor.py compares them with the formula.
TRAFFIC = {"all_reduce": 0, "all_gather": 0, "reduce_scatter": 0}
_CHECKED: weakref.WeakSet = weakref.WeakSet()  # communicators whose first TP collective was checked


def check_once(comm: Communicator) -> bool:
    """The argument check on a communicator's first TP collective (catches ranks with different models)."""
    if comm in _CHECKED:
        return False
    _CHECKED.add(comm)
    return True


def _all_reduce(x: Tensor, comm: Communicator, op: str = "sum") -> Tensor:
    out = x.contiguous().clone()
    if comm.size > 1:
        TRAFFIC["all_reduce"] += out.numel() * out.element_size()
        all_reduce(out, op=op, group=comm, check=check_once(comm))
    return out


def _gather_last_dim(x: Tensor, comm: Communicator) -> Tensor:
    if comm.size == 1:
        return x
    x = x.contiguous()
    out = torch.empty((comm.size, *x.shape), dtype=x.dtype, device=x.device)
    TRAFFIC["all_gather"] += out.numel() * out.element_size()
    all_gather(out, x, group=comm, check=check_once(comm))
    return torch.cat(out.unbind(0), dim=-1)


def _my_slice(x: Tensor, comm: Communicator) -> Tensor:
    if x.shape[-1] % comm.size:
        raise invalid("last dimension", x.shape[-1], f"a multiple of the TP size {comm.size}")
    return x.chunk(comm.size, dim=-1)[comm.rank].contiguous()


class CopyToTensorParallel(torch.autograd.Function):
    """Forward: identity (every TP rank reads the same input). Backward: allreduce the partial grads."""

    @staticmethod
    def forward(ctx, x: Tensor, comm: Communicator) -> Tensor:
        ctx.comm = comm
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return _all_reduce(grad, ctx.comm), None


class ReduceFromTensorParallel(torch.autograd.Function):
    """Forward: allreduce the partial outputs. Backward: identity (the sum's gradient reaches every term)."""

    @staticmethod
    def forward(ctx, x: Tensor, comm: Communicator) -> Tensor:
        return _all_reduce(x, comm)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class ScatterToTensorParallel(torch.autograd.Function):
    """Forward: keep this rank's slice of the last dimension. Backward: allgather the slices' grads."""

    @staticmethod
    def forward(ctx, x: Tensor, comm: Communicator) -> Tensor:
        ctx.comm = comm
        return _my_slice(x, comm)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return _gather_last_dim(grad, ctx.comm), None


class GatherFromTensorParallel(torch.autograd.Function):
    """Forward: allgather the last dimension's slices. Backward: keep this rank's slice of the grad."""

    @staticmethod
    def forward(ctx, x: Tensor, comm: Communicator) -> Tensor:
        ctx.comm = comm
        return _gather_last_dim(x, comm)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return _my_slice(grad, ctx.comm), None


def copy_to_tensor_parallel(x: Tensor, group: Group = None) -> Tensor:
    return CopyToTensorParallel.apply(x, communicator(group))


def reduce_from_tensor_parallel(x: Tensor, group: Group = None) -> Tensor:
    return ReduceFromTensorParallel.apply(x, communicator(group))


def scatter_to_tensor_parallel(x: Tensor, group: Group = None) -> Tensor:
    return ScatterToTensorParallel.apply(x, communicator(group))


def gather_from_tensor_parallel(x: Tensor, group: Group = None) -> Tensor:
    return GatherFromTensorParallel.apply(x, communicator(group))


def _shard(full: Tensor, dim: int, comm: Communicator) -> nn.Parameter:
    """This rank's contiguous block of `full` along `dim`, as a parameter marked with where it came from."""
    size = full.shape[dim]
    if size % comm.size:
        raise invalid(
            f"dimension {dim} of a {tuple(full.shape)} weight", size, f"a multiple of TP size {comm.size}"
        )
    length = size // comm.size
    param = nn.Parameter(full.detach().narrow(dim, comm.rank * length, length).clone())
    param.shard_of = (tuple(full.shape), dim, comm.rank * length)
    return param


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A's output features split across TP ranks: each rank computes a block of y.

    gather_output=False (as in a transformer, where a row-parallel layer follows) leaves y split.
    """

    def __init__(
        self, in_features: int, out_features: int, group: Group = None, bias: bool = False,
        gather_output: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.comm, self.gather_output = communicator(group), gather_output
        full = nn.Linear(in_features, out_features, bias=bias)  # the unsharded init, then my slice
        self.weight = _shard(full.weight, 0, self.comm)
        self.bias = _shard(full.bias, 0, self.comm) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(self.enter(x), self.weight, self.bias)
        return GatherFromTensorParallel.apply(y, self.comm) if self.gather_output else y

    def enter(self, x: Tensor) -> Tensor:
        """Into the TP region: every rank reads all of x (sequence parallelism gathers it instead)."""
        return CopyToTensorParallel.apply(x, self.comm)


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A's input features split: each rank multiplies its slice of x, then allreduce.

    input_is_parallel=True (after a column-parallel layer) takes x already split; False splits it here.
    The bias is whole on every rank and added once, after the sum.
    """

    def __init__(
        self, in_features: int, out_features: int, group: Group = None, bias: bool = False,
        input_is_parallel: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        self.comm, self.input_is_parallel = communicator(group), input_is_parallel
        full = nn.Linear(in_features, out_features, bias=bias)
        self.weight = _shard(full.weight, 1, self.comm)
        self.bias = nn.Parameter(full.bias.detach().clone()) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        if not self.input_is_parallel:
            x = ScatterToTensorParallel.apply(x, self.comm)
        y = self.leave(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias

    def leave(self, partial_sums: Tensor) -> Tensor:
        """Out of the TP region: sum the ranks' partial outputs (sequence parallelism reduce-scatters)."""
        return ReduceFromTensorParallel.apply(partial_sums, self.comm)


class VocabParallelEmbedding(nn.Module):
    """nn.Embedding with its rows (the vocabulary) split: each rank looks up the ids it holds, zeros
    elsewhere, and an allreduce assembles the embeddings."""

    def __init__(self, num_embeddings: int, embedding_dim: int, group: Group = None) -> None:
        super().__init__()
        self.comm = communicator(group)
        self.weight = _shard(nn.Embedding(num_embeddings, embedding_dim).weight, 0, self.comm)
        self.vocab_start = self.comm.rank * self.weight.shape[0]

    def forward(self, ids: Tensor) -> Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.leave(out.masked_fill(outside.unsqueeze(-1), 0.0))

    def leave(self, partial_sums: Tensor) -> Tensor:
        return ReduceFromTensorParallel.apply(partial_sums, self.comm)


class VocabParallelCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits split over the vocabulary, without gathering them.

    Two allreduces of N numbers each: the row maxima, then the sums of exp and the target logits. The
    gradient is (softmax - one_hot(target)) / N on each rank's own columns.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, comm: Communicator) -> Tensor:
        width = logits.shape[-1]
        row_max = _all_reduce(logits.detach().amax(dim=-1), comm, op="max")
        shifted = logits.detach() - row_max.unsqueeze(-1)
        local = targets - comm.rank * width
        mine = (local >= 0) & (local < width)
        index = local.clamp(0, width - 1)
        exp = shifted.exp()
        target_logit = shifted.gather(1, index.unsqueeze(1)).squeeze(1) * mine
        sums = _all_reduce(torch.stack((exp.sum(dim=-1), target_logit)), comm)
        ctx.save_for_backward(exp.div_(sums[0].unsqueeze(-1)), index, mine)
        return (sums[0].log() - sums[1]).mean()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        softmax, index, mine = ctx.saved_tensors
        out = softmax.clone()
        out.scatter_add_(1, index.unsqueeze(1), -mine.to(out.dtype).unsqueeze(1))
        return out.mul_(grad / softmax.shape[0]), None, None


def vocab_parallel_cross_entropy(logits: Tensor, targets: Tensor, group: Group = None) -> Tensor:
    """F.cross_entropy(full_logits, targets) from this rank's vocabulary shard of the logits (N, V/tp)."""
    return VocabParallelCrossEntropy.apply(logits, targets, communicator(group))


def vocab_parallel_tied_logits(x: Tensor, embedding: nn.Module) -> Tensor:
    """Logits on this rank's vocabulary shard from a head tied to a VocabParallelEmbedding."""
    return F.linear(CopyToTensorParallel.apply(x, embedding.comm), embedding.weight)


def tensor_parallel_layers(group: Group = None) -> Layers:
    """The model factories for TP over `group` (a mesh's tp_group); one rank: the plain layers."""
    comm = communicator(group)
    if comm.size == 1:
        return Layers()
    return Layers(
        column_linear=partial(ColumnParallelLinear, group=comm),
        row_linear=partial(RowParallelLinear, group=comm),
        embedding=partial(VocabParallelEmbedding, group=comm),
        tied_logits=vocab_parallel_tied_logits,
        cross_entropy=partial(vocab_parallel_cross_entropy, group=comm),
        gather_logits=partial(gather_from_tensor_parallel, group=comm),
    )


def is_tensor_parallel(param: Tensor) -> bool:
    """True for a TP shard (each rank holds different values); False for a replicated parameter."""
    return getattr(param, "shard_of", None) is not None
