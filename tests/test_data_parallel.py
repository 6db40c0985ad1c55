"""DataParallel and ZeroOptimizer against a single process on the full batch.

Each rank builds the model from a different seed (so the broadcast from rank 0 is tested), trains on its
shard of a global batch, and returns its losses and final parameters; the reference trains the rank-0 seed
on the whole batch in this process. Losses are averaged over ranks before comparing.

The runs are in float64 and compare at the optimizer's reordering bound (tests/numerics.py): AdamW turns
float32 summation-order differences into weight differences of up to ~lr, which made a float32 comparison
at 1e-6 pass or fail with the CPU's kernels (AVX-512). 3 AdamW steps at lr 1e-2, eps 1e-8 in float64:
2.7e-6; 3 SGD steps at lr 0.1, momentum 0.9: 2.7e-12. A bucket left unreduced or a micro-batch dropped
moves weights by ~lr, 1e-2 and more.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from commlab.errors import CollectiveMismatchError, InvalidArgumentError
from commlab.models import GPT, GPTConfig, ViT, ViTConfig
from commlab.parallel import DataParallel, ZeroOptimizer
from commlab.parallel.data import build_buckets
from tests.numerics import adam_tolerance, float64, sgd_tolerance

pytestmark = pytest.mark.numerics

STEPS = 3
GLOBAL_BATCH = 8
ADAMW = {"lr": 1e-2, "weight_decay": 0.1}  # eps: torch's default, 1e-8
SGD = {"lr": 0.1, "momentum": 0.9}
TOLERANCE = {"adamw": adam_tolerance(STEPS, ADAMW["lr"], 1e-8), "sgd": sgd_tolerance(STEPS, **SGD)}


def make_model(kind: str, seed: int, checkpoint: str = "none") -> nn.Module:
    torch.manual_seed(seed)
    if kind == "gpt":
        return GPT(GPTConfig.preset("tiny", checkpoint=checkpoint))
    return ViT(ViTConfig.preset("tiny", checkpoint=checkpoint))


def make_batches(kind: str, steps: int = STEPS, batch: int = GLOBAL_BATCH) -> list[tuple[torch.Tensor, ...]]:
    """A fixed list of global batches (inputs, targets)."""
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(steps):
        if kind == "gpt":
            tokens = torch.randint(0, 256, (batch, 33), generator=g)
            out.append((tokens[:, :-1], tokens[:, 1:]))
        else:
            out.append(
                (torch.randn(batch, 1, 8, 8, generator=g), torch.randint(0, 10, (batch,), generator=g))
            )
    return out


def shard(batch: tuple[torch.Tensor, ...], rank: int, world: int) -> tuple[torch.Tensor, ...]:
    n = batch[0].shape[0] // world
    return tuple(t[rank * n : (rank + 1) * n] for t in batch)


def make_optimizer(params, name: str) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, **SGD)
    return torch.optim.AdamW(params, **ADAMW)


@float64()
def reference(kind: str, optimizer: str = "adamw", checkpoint: str = "none") -> tuple[list[float], list]:
    """One process, full batches: the losses and final parameters every parallel run must reproduce."""
    model = make_model(kind, seed=0, checkpoint=checkpoint)
    opt = make_optimizer(model.parameters(), optimizer)
    losses = []
    for inputs, targets in make_batches(kind):
        _, loss = model(inputs, targets)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, [p.detach().clone() for p in model.parameters()]


@float64()
def train_data_parallel(
    kind: str, optimizer: str = "adamw", checkpoint: str = "none", bucket_mb: float = 0.01, micro: int = 1
) -> tuple[list[float], list]:
    """Runs on every rank: DataParallel training; returns rank-averaged losses and final parameters."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = DataParallel(make_model(kind, seed=rank, checkpoint=checkpoint), bucket_mb=bucket_mb)
    opt = make_optimizer(model.parameters(), optimizer)
    losses = []
    for batch in make_batches(kind):
        inputs, targets = shard(batch, rank, world)
        total = 0.0
        for m, (x, y) in enumerate(zip(inputs.chunk(micro), targets.chunk(micro), strict=True)):
            _, loss = model(x, y)
            loss = loss / micro
            if m < micro - 1:
                with model.no_sync():
                    loss.backward()
            else:
                loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad()
        mean = torch.tensor([total])
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    return losses, [p.detach().clone() for p in model.parameters()]


@float64()
def train_zero(kind: str, optimizer: str = "adamw") -> tuple[list[float], list, int, int]:
    """Runs on every rank: ZeRO-1 training; also returns this rank's and the unsharded state bytes."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model(kind, seed=rank)
    if optimizer == "adamw":
        opt = ZeroOptimizer(model.parameters(), torch.optim.AdamW, **ADAMW)
    else:
        opt = ZeroOptimizer(model.parameters(), torch.optim.SGD, **SGD)
    losses = []
    for batch in make_batches(kind):
        _, loss = model(*shard(batch, rank, world))
        loss.backward()
        opt.step()
        opt.zero_grad()
        mean = torch.tensor([loss.item()])
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    full = sum(p.numel() * p.element_size() * 2 for p in model.parameters())  # AdamW: exp_avg, exp_avg_sq
    return losses, [p.detach().clone() for p in model.parameters()], opt.local_state_bytes(), full


def assert_same(
    result: tuple[list[float], list], expected: tuple[list[float], list], optimizer: str = "adamw"
) -> None:
    """Losses and final float64 weights equal the reference within the optimizer's reordering bound."""
    losses, params = result[0], result[1]
    tol = TOLERANCE[optimizer]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected[0]), rtol=tol, atol=tol)
    for got, want in zip(params, expected[1], strict=True):
        assert got.dtype == want.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("world_size", [2, 4])
def test_gpt_data_parallel_matches_one_process(rank_pools, world_size):
    expected = reference("gpt")
    for result in rank_pools(world_size).run(train_data_parallel, "gpt"):
        assert_same(result, expected)


def test_vit_data_parallel_matches_one_process(rank_pools):
    expected = reference("vit", optimizer="sgd")
    for result in rank_pools(2).run(train_data_parallel, "vit", optimizer="sgd"):
        assert_same(result, expected, "sgd")


def test_checkpointed_data_parallel_matches_plain(rank_pools):
    expected = reference("gpt", checkpoint="none")
    for mode in ("full", "selective"):
        for result in rank_pools(2).run(train_data_parallel, "gpt", checkpoint=mode):
            assert_same(result, expected)


def test_gradient_accumulation_equals_the_large_batch(rank_pools):
    expected = reference("gpt")
    for result in rank_pools(2).run(train_data_parallel, "gpt", micro=2, bucket_mb=25.0):
        assert_same(result, expected)


@pytest.mark.parametrize("world_size", [2, 4])
def test_zero1_equals_data_parallel(rank_pools, world_size):
    expected = reference("gpt")
    for losses, params, local, full in rank_pools(world_size).run(train_zero, "gpt"):
        assert_same((losses, params), expected)
        # Each rank holds 1/p of the moments (+ padding and a step counter).
        assert local <= full / world_size + 64 * world_size, (local, full)


class Branchy(nn.Module):
    """A model whose second branch is used only on odd ranks: gradients exist on some ranks only."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.odd_only = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, use_branch: bool) -> torch.Tensor:
        y = self.shared(x)
        return self.odd_only(y) if use_branch else y


def train_branchy() -> list[torch.Tensor]:
    """Two steps where rank parity decides which parameters get gradients; returns the averaged grads."""
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DataParallel(Branchy(), bucket_mb=1e-5)  # one parameter per bucket
    grads = []
    for step in range(2):
        x = torch.full((2, 4), float(rank + step))
        model(x, use_branch=rank % 2 == 1).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad(set_to_none=True)
    return grads


def test_parameters_without_gradients_on_some_ranks(rank_pools):
    results = rank_pools(2).run(train_branchy)
    torch.manual_seed(0)
    model = Branchy()
    for step in range(2):
        expected = [torch.zeros_like(p) for p in model.parameters()]
        for rank in range(2):
            model.zero_grad(set_to_none=True)
            model(torch.full((2, 4), float(rank + step)), use_branch=rank % 2 == 1).sum().backward()
            for e, p in zip(expected, model.parameters(), strict=True):
                if p.grad is not None:
                    e += p.grad / 2
        for rank_result in results:
            for got, want in zip(rank_result[step], expected, strict=True):
                torch.testing.assert_close(got, want)


def test_buckets_respect_the_size_limit_and_keep_order():
    params = [nn.Parameter(torch.zeros(n)) for n in (10, 300, 5, 5, 1000)]
    buckets = build_buckets(params, bucket_bytes=1200)
    assert [[p.numel() for p in b.params] for b in buckets] == [[10], [300], [5, 5], [1000]]
    assert all(b.buffer.numel() == sum(p.numel() for p in b.params) for b in buckets)


def bad_wrapping() -> list[str]:
    messages = []
    for call in (
        lambda: DataParallel("model"),
        lambda: DataParallel(nn.Linear(2, 2), bucket_mb=0),
        lambda: DataParallel(nn.Linear(2, 2), bucket_mb="big"),
        lambda: ZeroOptimizer([], torch.optim.SGD, lr=0.1),
        lambda: ZeroOptimizer(nn.Linear(2, 2).parameters(), "adam", lr=0.1),
        lambda: DataParallel(nn.Linear(2, 2), algorithm="bruck"),
        lambda: ZeroOptimizer(nn.Linear(2, 2).parameters(), torch.optim.SGD, algorithm="tree", lr=0.1),
    ):
        try:
            call()
        except InvalidArgumentError as error:
            messages.append(str(error))
        else:
            messages.append("no error")
    return messages


def test_bad_arguments_are_clear_errors(rank_pools):
    (messages,) = rank_pools(1).run(bad_wrapping)
    assert "no error" not in messages, messages
    assert "torch.nn.Module" in messages[0]
    assert "bucket_mb" in messages[1] and "positive" in messages[1]
    assert "optimizer_class" in messages[4]
    assert "'bruck'" in messages[5] and "'ring'" in messages[5]
    assert "'tree'" in messages[6] and "'halving_doubling'" in messages[6]


def wrap_linear(out_features: int) -> str:
    try:
        DataParallel(nn.Linear(4, out_features))
    except CollectiveMismatchError as error:
        return str(error)
    return "no error"


def test_ranks_wrapping_different_models_get_a_clear_error(rank_pools):
    messages = rank_pools(2).run(wrap_linear, per_rank_kwargs=[{"out_features": 4}, {"out_features": 5}])
    for message in messages:
        assert "broadcast" in message and "20" in message and "25" in message, message
