"""All-to-all in the IR: direct, pairwise and Bruck schedules proved by the checker, their step and message
counts and cost formulas, and the checker catching a wrong all-to-all."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from commlab.collectives.algorithms import ALGORITHMS, algorithms_for, build_schedule
from commlab.collectives.algorithms.halving_doubling import bruck_alltoall_blocks
from commlab.collectives.cost import CostModel, ceil_log2
from commlab.collectives.schedule import Schedule, ScheduleBuilder, chunk_bounds, simulate, verify
from commlab.errors import ScheduleError

ALLTOALL = algorithms_for("alltoall")


@pytest.mark.parametrize("name", ALLTOALL)
@settings(max_examples=16, deadline=None, derandomize=True, database=None)
@given(world_size=st.integers(1, 16))
def test_alltoall_verifies(name: str, world_size: int) -> None:
    result = verify(build_schedule("alltoall", name, world_size))
    rank_steps = {len(steps) for steps in build_schedule("alltoall", name, world_size).steps}
    if world_size > 1:  # every rank takes the algorithm's number of steps
        want = {"direct": 1, "pairwise": world_size - 1, "bruck": ceil_log2(world_size)}[name]
        assert rank_steps == {want}
        assert result.rounds == want
    else:
        assert result.messages == 0


@pytest.mark.parametrize("world_size", [2, 3, 5, 8, 13, 16])
def test_bruck_sends_lg_p_messages_carrying_each_offsets_bits(world_size: int) -> None:
    schedule = build_schedule("alltoall", "bruck", world_size)
    for steps in schedule.steps:
        assert sum(len(step.sends) for step in steps) == ceil_log2(world_size)
        assert sum(len(s.chunks) for step in steps for s in step.sends) == bruck_alltoall_blocks(world_size)


@pytest.mark.parametrize("world_size", [2, 5, 8])
def test_direct_and_pairwise_send_each_block_once(world_size: int) -> None:
    for name in ("direct", "pairwise"):
        schedule = build_schedule("alltoall", name, world_size)
        for r, steps in enumerate(schedule.steps):
            sent = sorted(c for step in steps for s in step.sends for c in s.chunks)
            assert sent == [r * world_size + d for d in range(world_size) if d != r]


def test_alltoall_buffer_is_p_by_p_blocks() -> None:
    schedule = build_schedule("alltoall", "pairwise", 3)
    assert schedule.num_blocks == 9 and schedule.num_chunks == 9
    assert chunk_bounds(18, schedule.num_chunks, schedule.num_blocks)[4] == (8, 10)


def test_cost_formulas() -> None:
    """The formulas in the modules' docstrings, on a model without step cost or concurrency gain."""
    model = CostModel(alpha=1e-5, beta=1e-9)
    p, n = 8, 8e6  # n: a rank's input; p blocks of n/p
    block = n / p
    assert ALGORITHMS["pairwise"].cost("alltoall", p, n, model) == pytest.approx(
        (p - 1) * (1e-5 + block * 1e-9)
    )
    assert ALGORITHMS["direct"].cost("alltoall", p, n, model) == pytest.approx(
        (p - 1) * 1e-5 + (p - 1) * block * 1e-9
    )
    bruck = ALGORITHMS["bruck"].cost("alltoall", p, n, model)
    assert bruck == pytest.approx(3 * 1e-5 + 12 * block * 1e-9)  # offsets 1..7 have 12 set bits
    tiny = 64.0  # Bruck's fewer rounds win for small messages, its extra bytes lose for large ones
    assert ALGORITHMS["bruck"].cost("alltoall", p, tiny, model) < ALGORITHMS["pairwise"].cost(
        "alltoall", p, tiny, model
    )
    assert bruck > ALGORITHMS["pairwise"].cost("alltoall", p, n, model)


def test_checker_catches_a_block_delivered_to_the_wrong_rank() -> None:
    """Rank 0 sends its block for rank 2 to rank 1: rank 2 misses it, and verify says where."""
    builder = ScheduleBuilder("alltoall", "test", 3, 9)
    for r in range(3):
        for d in range(3):
            if d != r:
                target = 1 if (r, d) == (0, 2) else d
                builder.transfer(0, r, target, [r * 3 + d], reduce=False)
    with pytest.raises(ScheduleError, match=r"rank 2 chunk 2 ends with nothing, expected ranks \[0\]"):
        verify(builder.build())


def test_checker_catches_forwarding_a_block_not_yet_received() -> None:
    steps = [[], [], []]
    schedule = Schedule("alltoall", "test", 3, 9, tuple(tuple(s) for s in steps))
    simulate(schedule)  # nothing moves: legal, but not an all-to-all
    with pytest.raises(ScheduleError, match="expected ranks"):
        verify(schedule)
