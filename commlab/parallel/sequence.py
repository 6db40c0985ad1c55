"""Sequence parallelism (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models") on top of tensor parallelism.

Under plain TP the activations between TP regions (norms, dropout, residual adds) are replicated on every
TP rank. Sequence parallelism splits them along the sequence instead, so they take 1/tp of the memory and
compute. Each TP region's boundaries change their pair of collectives:

    start of a region (column-parallel input)   forward: allgather the sequence   backward: reduce-scatter
    end of a region (row-parallel output)       forward: reduce-scatter           backward: allgather

An allreduce is a reduce-scatter followed by an allgather, so the bytes on the wire stay the same. The
embedding reduce-scatters its output and the head gathers its input. Norm weights see only their rank's
tokens, so their gradients are partial sums: `sync_sequence_parallel_grads` adds them over TP after
backward (Pipeline does it). Activations are (batch, sequence, features); the sequence length must be a
multiple of the TP size. GPT and BERT; not ViT: its class token would have to be gathered before its head.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from commlab.collectives.api import Group, all_gather, all_reduce, communicator, reduce_scatter
from commlab.collectives.communicator import Communicator
from commlab.errors import invalid
from commlab.parallel.flat import flatten, unflatten_into
from commlab.parallel.layers import Layers
from commlab.parallel.tensor import (
    TRAFFIC,
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    check_once,
    gather_from_tensor_parallel,
    is_tensor_parallel,
    vocab_parallel_cross_entropy,
)


def _gather_sequence(x: Tensor, comm: Communicator) -> Tensor:
    """(batch, t, ...) on each rank -> (batch, tp x t, ...), rank r's tokens at block r."""
    local = x.transpose(0, 1).contiguous()  # sequence first: each rank's block is contiguous
    out = torch.empty((comm.size * local.shape[0], *local.shape[1:]), dtype=x.dtype, device=x.device)
    TRAFFIC["all_gather"] += out.numel() * out.element_size()
    all_gather(out, local, group=comm, check=check_once(comm))
    return out.transpose(0, 1)


def _reduce_scatter_sequence(x: Tensor, comm: Communicator) -> Tensor:
    """(batch, T, ...) partial sums on each rank -> this rank's (batch, T / tp, ...) block of their sum."""
    if x.shape[1] % comm.size:
        raise invalid("sequence length", x.shape[1], f"a multiple of the TP size {comm.size}")
    full = x.transpose(0, 1).contiguous()
    out = torch.empty((full.shape[0] // comm.size, *full.shape[1:]), dtype=x.dtype, device=x.device)
    TRAFFIC["reduce_scatter"] += full.numel() * full.element_size()
    reduce_scatter(out, full, group=comm, check=check_once(comm))
    return out.transpose(0, 1)


class GatherFromSequenceParallel(torch.autograd.Function):
    """Forward: allgather the sequence shards. Backward: reduce-scatter (sum the ranks' partial grads,
    keep my tokens')."""

    @staticmethod
    def forward(ctx, x: Tensor, comm: Communicator) -> Tensor:
        ctx.comm = comm
        return _gather_sequence(x, comm)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return _reduce_scatter_sequence(grad, ctx.comm), None


class ReduceScatterToSequenceParallel(torch.autograd.Function):
    """Forward: reduce-scatter the partial outputs along the sequence. Backward: allgather the grads."""

    @staticmethod
    def forward(ctx, x: Tensor, comm: Communicator) -> Tensor:
        ctx.comm = comm
        return _reduce_scatter_sequence(x, comm)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return _gather_sequence(grad, ctx.comm), None


class SequenceParallelColumnLinear(ColumnParallelLinear):
    """ColumnParallelLinear whose input arrives split along the sequence (gathered on entry)."""

    sequence_parallel = True

    def enter(self, x: Tensor) -> Tensor:
        return GatherFromSequenceParallel.apply(x, self.comm)


class SequenceParallelRowLinear(RowParallelLinear):
    """RowParallelLinear whose output leaves split along the sequence (reduce-scattered)."""

    sequence_parallel = True

    def leave(self, partial_sums: Tensor) -> Tensor:
        return ReduceScatterToSequenceParallel.apply(partial_sums, self.comm)


class SequenceParallelEmbedding(VocabParallelEmbedding):
    """VocabParallelEmbedding whose output is reduce-scattered along the sequence."""

    sequence_parallel = True

    def leave(self, partial_sums: Tensor) -> Tensor:
        return ReduceScatterToSequenceParallel.apply(partial_sums, self.comm)


def sequence_parallel_tied_logits(x: Tensor, embedding: nn.Module) -> Tensor:
    """Vocabulary-shard logits of the whole sequence from sequence-split x and a tied embedding."""
    return F.linear(GatherFromSequenceParallel.apply(x, embedding.comm), embedding.weight)


def sequence_parallel_layers(group: Group = None) -> Layers:
    """Model factories for TP with sequence parallelism over `group` (GPT, BERT); one rank: the plain
    layers."""
    comm = communicator(group)
    if comm.size == 1:
        return Layers()
    return Layers(
        column_linear=partial(SequenceParallelColumnLinear, group=comm),
        row_linear=partial(SequenceParallelRowLinear, group=comm),
        embedding=partial(SequenceParallelEmbedding, group=comm),
        tied_logits=sequence_parallel_tied_logits,
        cross_entropy=partial(vocab_parallel_cross_entropy, group=comm),
        gather_logits=partial(gather_from_tensor_parallel, group=comm),
    )


def uses_sequence_parallel(module: nn.Module) -> bool:
    return any(getattr(m, "sequence_parallel", False) for m in module.modules())


@torch.no_grad()
def sync_sequence_parallel_grads(parameters: Iterable[nn.Parameter], group: Group) -> None:
    """Sum over TP the gradients of replicated parameters (norms), which saw only this rank's tokens."""
    grads = [p.grad for p in parameters if p.grad is not None and not is_tensor_parallel(p)]
    if not grads or communicator(group).size == 1:
        return
    flat = flatten(grads)
    TRAFFIC["all_reduce"] += flat.numel() * flat.element_size()
    all_reduce(flat, group=group, check=check_once(communicator(group)))
    unflatten_into(flat, grads)
