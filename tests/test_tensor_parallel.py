"""Tensor-parallel layers against their one-process references, in forward and in every gradient.

Every rank builds the reference layer (nn.Linear, nn.Embedding, F.cross_entropy) and the parallel one from
the same seed, runs both on the same input, and compares: outputs, the input's gradient, and its shard of
each parameter's gradient. In float64 at the bound of one forward and backward whose sums the allreduce
reorders (tests/numerics.py: about 9e-10), so the check holds whatever kernels the CPU gets.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from commlab.errors import InvalidArgumentError
from commlab.models import GPT, GPTConfig
from commlab.parallel import (
    ColumnParallelLinear,
    Mesh,
    Pipeline,
    RowParallelLinear,
    VocabParallelEmbedding,
    tensor_parallel_layers,
    vocab_parallel_cross_entropy,
)
from commlab.parallel import tensor as tp_module
from commlab.parallel.sequence import sequence_parallel_layers
from commlab.parallel.tensor import gather_from_tensor_parallel, scatter_to_tensor_parallel
from tests.numerics import float64, one_pass_tolerance

pytestmark = pytest.mark.numerics

TOLERANCE = one_pass_tolerance()
_MESHES: dict[tuple[int, int, int], Mesh] = {}


def mesh_of(dp: int, pp: int, tp: int) -> Mesh:
    """One mesh per layout per rank process (every rank creates the same groups in the same order)."""
    if (dp, pp, tp) not in _MESHES:
        _MESHES[(dp, pp, tp)] = Mesh(dp=dp, pp=pp, tp=tp)
    return _MESHES[(dp, pp, tp)]


def my_slice(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The part of a full tensor that a (possibly sharded) parameter holds."""
    shard = getattr(param, "shard_of", None)
    if shard is None:
        return full
    shape, dim, start = shard
    assert tuple(full.shape) == shape
    return full.narrow(dim, start, param.shape[dim])


def close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == want.dtype == torch.float64, what
    torch.testing.assert_close(got, want, rtol=TOLERANCE, atol=TOLERANCE, msg=what)


def inputs(*shape: int, seed: int = 7) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_()


def check_layer(parallel: nn.Module, reference: nn.Module, x: torch.Tensor, what: str) -> None:
    """Same output and gradients (input, each parameter's shard) under a random linear loss."""
    x_ref = x.detach().clone().requires_grad_(x.requires_grad)
    y, y_ref = parallel(x), reference(x_ref)
    close(y, y_ref, f"{what} output")
    weights = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(3))
    (y * weights).sum().backward()
    (y_ref * weights).sum().backward()
    if x.requires_grad:
        close(x.grad, x_ref.grad, f"{what} input grad")
    for (name, p), p_ref in zip(parallel.named_parameters(), reference.parameters(), strict=True):
        close(p, my_slice(p_ref, p), f"{what} {name}")
        close(p.grad, my_slice(p_ref.grad, p), f"{what} {name}.grad")


@float64()
def layers_match_references() -> int:
    """Runs on every rank: the whole world is one TP group."""
    tp = dist.get_world_size()
    group = mesh_of(1, 1, tp).tp_group
    for bias in (False, True):
        for gather in (False, True):
            torch.manual_seed(1)
            parallel = ColumnParallelLinear(12, 8 * tp, group, bias=bias, gather_output=gather)
            torch.manual_seed(1)
            reference = nn.Linear(12, 8 * tp, bias=bias)
            x = inputs(3, 5, 12)
            if gather:
                check_layer(parallel, reference, x, f"column bias={bias} gathered")
            else:  # compare this rank's block of output features
                check_layer(
                    nn.Sequential(parallel, _Gather(group)), reference, x, f"column bias={bias} split"
                )
        for parallel_input in (False, True):
            torch.manual_seed(2)
            parallel = RowParallelLinear(4 * tp, 6, group, bias=bias, input_is_parallel=parallel_input)
            torch.manual_seed(2)
            reference = nn.Linear(4 * tp, 6, bias=bias)
            x = inputs(2, 4 * tp)
            front = _Scatter(group) if parallel_input else nn.Identity()
            check_layer(
                nn.Sequential(front, parallel), reference, x, f"row bias={bias} split={parallel_input}"
            )
    torch.manual_seed(3)
    embedding = VocabParallelEmbedding(10 * tp, 6, group)
    torch.manual_seed(3)
    reference = nn.Embedding(10 * tp, 6)
    ids = torch.randint(0, 10 * tp, (4, 9), generator=torch.Generator().manual_seed(4))
    check_layer(embedding, reference, ids, "embedding")
    # Cross-entropy: this rank's vocabulary shard of the logits against F.cross_entropy on all of them.
    logits = inputs(16, 10 * tp, seed=5)
    targets = torch.randint(0, 10 * tp, (16,), generator=torch.Generator().manual_seed(6))
    shard = logits.detach().chunk(tp, dim=-1)[dist.get_rank()].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(shard, targets, group)
    reference_loss = F.cross_entropy(logits, targets)
    close(loss, reference_loss, "cross-entropy")
    (loss * 2.5).backward()
    (reference_loss * 2.5).backward()
    close(shard.grad, logits.grad.chunk(tp, dim=-1)[dist.get_rank()], "cross-entropy grad")
    return tp


class _Gather(nn.Module):
    def __init__(self, group) -> None:
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gather_from_tensor_parallel(x, self.group)


class _Scatter(_Gather):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return scatter_to_tensor_parallel(x, self.group)


@pytest.mark.parametrize("world_size", [2, 4])
def test_parallel_layers_match_their_references(rank_pools, world_size):
    assert rank_pools(world_size).run(layers_match_references) == [world_size] * world_size


def gpt_block_collectives(checkpoint: str, sequence_parallel: bool = False) -> dict[str, int]:
    """Bytes handed to each kind of collective by one training step of a TP GPT (pp 1, dp 1)."""
    mesh = mesh_of(1, 1, dist.get_world_size())
    layers = (sequence_parallel_layers if sequence_parallel else tensor_parallel_layers)(mesh.tp_group)
    torch.manual_seed(0)
    pipeline = Pipeline(GPT(GPTConfig.preset("tiny", checkpoint=checkpoint), layers), mesh)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    pipeline.train_step(x, x)  # warm: the first call of a group runs the argument check
    before = dict(tp_module.TRAFFIC)
    pipeline.train_step(x, x)
    return {k: tp_module.TRAFFIC[k] - before[k] for k in before}


def test_tensor_parallel_gpt_allreduces_twice_per_block_each_way(rank_pools):
    tokens, d, layers = 2 * 16, 32, 2
    activation = tokens * d * 4
    # Per block 2 forward + 2 backward activations; embedding (forward) and tied head (backward) one each;
    # cross-entropy: N row maxima, then N sums and N target logits (two calls).
    expected = (4 * layers + 2) * activation + 3 * tokens * 4
    for traffic in rank_pools(2).run(gpt_block_collectives, "none"):
        assert traffic == {"all_reduce": expected, "all_gather": 0, "reduce_scatter": 0}
    # Full recompute repeats a block's forward in backward, but torch's non-reentrant checkpoint stops
    # once it has every tensor backward needs: the attention output's allreduce is redone, the MLP's not.
    for traffic in rank_pools(2).run(gpt_block_collectives, "full"):
        assert traffic["all_reduce"] == expected + layers * activation


def test_sequence_parallel_turns_each_allreduce_into_a_reduce_scatter_and_an_allgather(rank_pools):
    tokens, d, layers = 2 * 16, 32, 2
    activation = tokens * d * 4
    for traffic in rank_pools(2).run(gpt_block_collectives, "none", sequence_parallel=True):
        # per block 4 of each (2 forward, 2 backward); the embedding and the tied head one of each
        assert traffic["all_gather"] == traffic["reduce_scatter"] == (4 * layers + 2) * activation
        # the cross-entropy as before, plus the norm weights' gradients (2 per block + the final norm)
        assert traffic["all_reduce"] == 3 * tokens * 4 + (2 * layers + 1) * d * 4


def init_is_independent_of_tp() -> dict[str, torch.Tensor]:
    """This rank's parameters of a TP GPT, and the same-seed plain GPT's slices: must be equal."""
    group = mesh_of(1, 1, dist.get_world_size()).tp_group
    torch.manual_seed(11)
    sharded = GPT(GPTConfig.preset("tiny", tie_embeddings=False), tensor_parallel_layers(group))
    torch.manual_seed(11)
    plain = GPT(GPTConfig.preset("tiny", tie_embeddings=False))
    for (name, p), p_ref in zip(sharded.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(p, my_slice(p_ref, p)), name
    return {n: p.shape for n, p in sharded.named_parameters() if n.startswith(("tok", "lm", "blocks.0"))}


def test_initialization_does_not_depend_on_tp_size(rank_pools):
    shapes = rank_pools(2).run(init_is_independent_of_tp)[0]
    assert shapes["tok_embed.weight"] == (128, 32) and shapes["lm_head.weight"] == (128, 32)
    assert shapes["blocks.0.attn.qkv.weight"] == (48, 32)
    assert shapes["blocks.0.attn.out_proj.weight"] == (32, 16)
    assert shapes["blocks.0.mlp.fc_in.weight"] == (64, 32)


def bad_shards() -> list[str]:
    group = mesh_of(1, 1, dist.get_world_size()).tp_group
    messages = []
    for build in (
        lambda: ColumnParallelLinear(4, 5, group),
        lambda: RowParallelLinear(5, 4, group),
        lambda: VocabParallelEmbedding(7, 4, group),
    ):
        try:
            build()
            messages.append("no error")
        except InvalidArgumentError as error:
            messages.append(str(error))
    return messages


def test_dimensions_that_do_not_split_give_clear_errors(rank_pools):
    messages = rank_pools(2).run(bad_shards)[0]
    assert "no error" not in messages, messages
    assert "=5" in messages[0] and "multiple of TP size 2" in messages[0]
    assert "=7" in messages[2]
