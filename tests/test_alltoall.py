"""commlab.all_to_all against torch.distributed.all_to_all_single on gloo: every algorithm, dtypes, odd and
uneven sizes, async; bad split sizes fail on every rank with a clear error. Pure data movement: bitwise."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import commlab
from commlab.collectives.algorithms import algorithms_for

DTYPES = ("float32", "float64", "bfloat16", "float16", "int64", "int32", "uint8", "int8")


def _input(dtype: torch.dtype, rows: int, width: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, width, generator=generator) * 50).to(dtype)


def matches_torch(dtype_name: str) -> list[str]:
    """Even and uneven splits, odd widths, every algorithm: commlab's output equals gloo's bit for bit."""
    dtype = getattr(torch, dtype_name)
    rank, p = dist.get_rank(), dist.get_world_size()
    failures = []
    cases = [(None, None, 3 * p, 7), ([(rank + 2 * d) % 3 for d in range(p)], None, 0, 5)]
    for send_rows, _, even_rows, width in cases:
        if send_rows is None:
            x = _input(dtype, even_rows, width, 10 + rank)
            receive_rows = None
            want = torch.empty_like(x)
            dist.all_to_all_single(want, x)
        else:
            receive_rows = [(s + 2 * rank) % 3 for s in range(p)]
            x = _input(dtype, sum(send_rows), width, 20 + rank)
            want = torch.empty(sum(receive_rows), width, dtype=dtype)
            dist.all_to_all_single(want, x, receive_rows, send_rows)
        for algorithm in ("auto", *algorithms_for("alltoall")):
            got = torch.full_like(want, 3)
            commlab.all_to_all(got, x, receive_rows, send_rows, algorithm=algorithm)
            if not torch.equal(got, want):
                failures.append(f"{dtype_name} {algorithm} splits={send_rows}")
    got = torch.empty_like(want)
    commlab.all_to_all(got, x, receive_rows, send_rows, async_op=True).wait()
    if not torch.equal(got, want):
        failures.append(f"{dtype_name} async")
    return failures


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_all_to_all_matches_torch(rank_pools, world_size):
    pool = rank_pools(world_size)
    for dtype_name in DTYPES if world_size == 3 else ("float32", "bfloat16"):
        for failures in pool.run(matches_torch, dtype_name):
            assert failures == []


def disagreeing_splits() -> str:
    """Rank 0 expects 2 rows from rank 1, which sends 1: every rank must raise, naming the pair."""
    rank = dist.get_rank()
    x = torch.zeros(2, 3)
    receive = [1, 2] if rank == 0 else [1, 1]
    out = torch.empty(sum(receive), 3)
    try:
        commlab.all_to_all(out, x, receive, [1, 1])
    except commlab.InvalidArgumentError as error:
        return str(error)
    return "no error"


def test_disagreeing_split_sizes_fail_on_every_rank(rank_pools):
    for message in rank_pools(2).run(disagreeing_splits):
        assert "rank 1 sends 3 elements to rank 0, which expects 6" in message


def bad_arguments() -> list[str]:
    messages = []
    for call in (
        lambda: commlab.all_to_all(torch.empty(3), torch.empty(3)),  # 3 rows on 2 ranks, no splits
        lambda: commlab.all_to_all(torch.empty(2), torch.empty(2), [1, 1], [1, 2]),
        lambda: commlab.all_to_all(torch.empty(2), torch.empty(2, dtype=torch.int32)),
    ):
        try:
            call()
        except commlab.InvalidArgumentError as error:
            messages.append(str(error))
    return messages


def test_bad_arguments_name_the_value(rank_pools):
    messages = rank_pools(2).run(bad_arguments)[0]
    assert "input.shape[0]=3" in messages[0] and "multiple of the world size 2" in messages[0]
    assert "input_split_sizes=[1, 2]" in messages[1] and "summing to input.shape[0] = 2" in messages[1]
    assert "differs from input.dtype" in messages[2]
