"""Every algorithm's schedules are proven correct by the symbolic checker, and the checker catches bugs."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from commlab.collectives.algorithms import ALGORITHMS, algorithms_for, build_schedule, get_algorithm
from commlab.collectives.algorithms.tree import double_binary_tree, inorder_tree, rooted_tree
from commlab.collectives.schedule import (
    OPS,
    ROOTED_OPS,
    Recv,
    Schedule,
    ScheduleBuilder,
    Send,
    Step,
    simulate,
    verify,
)
from commlab.errors import InvalidArgumentError, ScheduleError

CASES = [(name, op) for name, algorithm in ALGORITHMS.items() for op in algorithm.ops]
CASE_IDS = [f"{name}-{op}" for name, op in CASES]
FAST = settings(max_examples=12, deadline=None, derandomize=True, database=None)


def _is_pipelined(name: str, op: str) -> bool:
    return op in ALGORITHMS[name].pipelined_ops


def _max_steps(schedule: Schedule) -> int:
    return max(len(steps) for steps in schedule.steps)


# --- every op x algorithm is correct ------------------------------------------------------------------


@pytest.mark.parametrize(("name", "op"), CASES, ids=CASE_IDS)
@FAST
@given(data=st.data())
def test_verifies_for_random_sizes(name: str, op: str, data: st.DataObject) -> None:
    largest = 24 if op == "alltoall" else 64  # p x p chunks: the checker's time grows as p^3
    world_size = data.draw(st.integers(1, largest), label="world_size")
    root = data.draw(st.integers(0, world_size - 1), label="root") if op in ROOTED_OPS else None
    segments = data.draw(st.integers(1, 8), label="segments") if _is_pipelined(name, op) else 1
    schedule = build_schedule(op, name, world_size, root, segments)
    assert (schedule.op, schedule.algorithm, schedule.world_size, schedule.root) == (
        op,
        name,
        world_size,
        root,
    )
    verify(schedule)


@pytest.mark.parametrize(("name", "op"), CASES, ids=CASE_IDS)
def test_verifies_exhaustively_for_small_sizes(name: str, op: str) -> None:
    for world_size in range(1, 13):
        roots = range(world_size) if op in ROOTED_OPS else [None]
        for root in roots:
            for segments in (1, 2, 3) if _is_pipelined(name, op) else (1,):
                verify(build_schedule(op, name, world_size, root, segments))


@pytest.mark.parametrize(("name", "op"), CASES, ids=CASE_IDS)
def test_one_rank_has_no_steps(name: str, op: str) -> None:
    schedule = build_schedule(op, name, 1, 0 if op in ROOTED_OPS else None)
    assert schedule.steps == ((),)
    assert verify(schedule).rounds == 0


def test_blocked_ops_have_whole_blocks() -> None:
    for op in ("reduce_scatter", "allgather"):
        for name in algorithms_for(op):
            schedule = build_schedule(op, name, 6)
            assert schedule.num_blocks == 6 and schedule.num_chunks % 6 == 0


# --- step counts --------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", range(2, 20))
def test_ring_allreduce_takes_two_p_minus_one_steps_on_every_rank(world_size: int) -> None:
    schedule = build_schedule("allreduce", "ring", world_size)
    assert all(len(steps) == 2 * (world_size - 1) for steps in schedule.steps)
    assert simulate(schedule).rounds == 2 * (world_size - 1)
    for op in ("reduce_scatter", "allgather"):
        assert all(len(steps) == world_size - 1 for steps in build_schedule(op, "ring", world_size).steps)


@pytest.mark.parametrize("world_size", range(2, 20))
@pytest.mark.parametrize("op", ["broadcast", "reduce"])
def test_ring_chain_takes_p_plus_segments_minus_two_rounds(op: str, world_size: int) -> None:
    for segments in (1, 2, 5):
        schedule = build_schedule(op, "ring", world_size, world_size // 2, segments)
        assert simulate(schedule).rounds == world_size + segments - 2


@pytest.mark.parametrize("world_size", range(1, 40))
def test_bruck_takes_ceil_lg_p_rounds(world_size: int) -> None:
    schedule = build_schedule("allgather", "bruck", world_size)
    rounds = math.ceil(math.log2(world_size))
    assert _max_steps(schedule) == rounds
    assert simulate(schedule).rounds == rounds


@pytest.mark.parametrize("world_size", range(2, 40))
def test_rabenseifner_takes_two_lg_p_steps(world_size: int) -> None:
    schedule = build_schedule("allreduce", "halving_doubling", world_size)
    lg = world_size.bit_length() - 1
    folded = world_size != 1 << lg
    assert _max_steps(schedule) == 2 * lg + (2 if folded else 0)
    assert simulate(schedule).rounds == 2 * lg + (2 if folded else 0)
    if not folded:
        assert all(len(steps) == 2 * lg for steps in schedule.steps)
        for op in ("reduce_scatter", "allgather"):
            assert all(len(s) == lg for s in build_schedule(op, "halving_doubling", world_size).steps)


@pytest.mark.parametrize("world_size", range(2, 65, 3))
def test_double_tree_rounds_grow_with_segments_plus_lg_p(world_size: int) -> None:
    height = inorder_tree(world_size).height
    assert height == math.ceil(math.log2(world_size))
    for segments in (1, 2, 4, 8):
        rounds = simulate(build_schedule("allreduce", "tree", world_size, segments=segments)).rounds
        assert rounds == segments + 2 * height - 1
        assert rounds <= segments + 2 * math.ceil(math.log2(world_size))


@pytest.mark.parametrize("world_size", range(2, 33, 5))
def test_tree_broadcast_and_reduce_take_height_plus_segments_minus_one_rounds(world_size: int) -> None:
    height = inorder_tree(world_size).height
    for op in ("broadcast", "reduce"):
        for segments in (1, 3, 6):
            schedule = build_schedule(op, "tree", world_size, world_size - 1, segments)
            assert simulate(schedule).rounds == height + segments - 1


@pytest.mark.parametrize("world_size", range(2, 20))
def test_direct_takes_one_step_per_phase(world_size: int) -> None:
    assert _max_steps(build_schedule("allreduce", "direct", world_size)) == 2
    for op in ("reduce_scatter", "allgather"):
        assert _max_steps(build_schedule(op, "direct", world_size)) == 1
    for op in ROOTED_OPS:
        assert _max_steps(build_schedule(op, "direct", world_size, 0)) == 1


# --- balance and tree shape ---------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", range(2, 20))
@pytest.mark.parametrize("op", ["allreduce", "reduce_scatter", "allgather"])
def test_ring_is_balanced(op: str, world_size: int) -> None:
    schedule = build_schedule(op, "ring", world_size)
    sent = {sum(len(s.chunks) for step in steps for s in step.sends) for steps in schedule.steps}
    received = {sum(len(r.chunks) for step in steps for r in step.recvs) for steps in schedule.steps}
    assert sent == received and len(sent) == 1


@pytest.mark.parametrize("world_size", range(2, 65))
def test_trees_are_consistent_binary_trees(world_size: int) -> None:
    trees = [*double_binary_tree(world_size), rooted_tree(world_size, world_size // 3)]
    for tree in trees:
        assert tree.parent.count(None) == 1
        assert all(len(children) <= 2 for children in tree.children)
        assert len(tree.children[tree.root]) == 1
        for rank, up in enumerate(tree.parent):
            if up is not None:
                assert rank in tree.children[up] and tree.depth[rank] == tree.depth[up] + 1
    assert inorder_tree(world_size).root == 0
    assert rooted_tree(world_size, world_size // 3).root == world_size // 3


@pytest.mark.parametrize("world_size", range(2, 65))
def test_a_leaf_of_one_tree_is_inner_in_the_other(world_size: int) -> None:
    first, second = double_binary_tree(world_size)
    leaves = [{r for r in range(world_size) if not t.children[r]} for t in (first, second)]
    assert not leaves[0] & leaves[1]
    assert first.height == second.height


# --- the registry ----------------------------------------------------------------------------------


def test_registry_names_and_ops() -> None:
    flat = {"ring", "tree", "halving_doubling", "bruck", "recursive_doubling", "pairwise", "direct"}
    assert set(ALGORITHMS) == flat | {"hierarchical", "multiring"}
    assert algorithms_for("allgather") == (
        "ring",
        "halving_doubling",
        "bruck",
        "direct",
        "hierarchical",
        "multiring",
    )
    assert algorithms_for("allreduce", topology_aware=False) == (
        "ring", "tree", "halving_doubling", "recursive_doubling", "direct",
    )  # fmt: skip
    assert algorithms_for("broadcast")[-1] == "hierarchical"
    assert algorithms_for("alltoall") == ("bruck", "pairwise", "direct")  # no topology-aware one yet
    assert get_algorithm("tree").pipelined and get_algorithm("ring").pipelined
    assert not get_algorithm("halving_doubling").pipelined and not get_algorithm("bruck").pipelined
    for op in OPS:
        assert algorithms_for(op)


def test_build_schedule_is_memoized_and_ignores_segments_where_unused() -> None:
    assert build_schedule("allreduce", "ring", 5) is build_schedule("allreduce", "ring", 5)
    assert build_schedule("allreduce", "ring", 5, segments=7) is build_schedule("allreduce", "ring", 5)
    assert build_schedule("broadcast", "ring", 5, 1, 3).num_chunks == 3


def test_registry_errors_name_the_bad_value_and_what_is_accepted() -> None:
    with pytest.raises(InvalidArgumentError, match=r"algorithm='nope'.*'ring'.*'direct'"):
        get_algorithm("nope")
    with pytest.raises(InvalidArgumentError, match=r"'bruck' does not implement allreduce.*'ring'.*'tree'"):
        build_schedule("allreduce", "bruck", 4)
    with pytest.raises(
        InvalidArgumentError, match=r"'ring' does not implement alltoall.*'bruck'.*'pairwise'"
    ):
        build_schedule("alltoall", "ring", 4)
    with pytest.raises(InvalidArgumentError, match=r"op='gather'"):
        build_schedule("gather", "ring", 4)
    with pytest.raises(InvalidArgumentError, match=r"root=None.*0\.\.3"):
        build_schedule("broadcast", "ring", 4)
    with pytest.raises(InvalidArgumentError, match=r"root=4"):
        build_schedule("reduce", "tree", 4, 4)
    with pytest.raises(InvalidArgumentError, match=r"root=0.*no root"):
        build_schedule("allreduce", "ring", 4, 0)
    with pytest.raises(InvalidArgumentError, match=r"world_size=0"):
        build_schedule("allreduce", "ring", 0)
    with pytest.raises(InvalidArgumentError, match=r"segments=0"):
        build_schedule("allreduce", "tree", 4, segments=0)
    with pytest.raises(InvalidArgumentError, match=r"world_size=2\.0"):
        build_schedule("allreduce", "ring", 2.0)
    with pytest.raises(InvalidArgumentError, match=r"root=1\.0"):
        build_schedule("broadcast", "ring", 2, 1.0)


# --- the checker catches broken schedules -------------------------------------------------------------


def _schedule(op: str, world_size: int, num_chunks: int, steps, root: int | None = None) -> Schedule:
    return Schedule(op, "test", world_size, num_chunks, tuple(tuple(s) for s in steps), root)


def test_checker_catches_a_receive_with_no_send() -> None:
    steps = [[], [Step(recvs=(Recv(0, (0,), False),))]]
    with pytest.raises(ScheduleError, match=r"rank 1 step 0 receives chunks \(0,\) from rank 0, which never"):
        verify(_schedule("broadcast", 2, 1, steps, root=0))


def test_checker_catches_a_send_with_no_receive() -> None:
    steps = [[Step(sends=(Send(1, (0,)),))], []]
    with pytest.raises(
        ScheduleError, match=r"rank 0 step 0 sends chunks \(0,\) to rank 1, which has no matching"
    ):
        verify(_schedule("broadcast", 2, 1, steps, root=0))


def test_checker_catches_mismatched_chunks() -> None:
    steps = [[Step(sends=(Send(1, (0,)),))], [Step(recvs=(Recv(0, (0, 1), False),))]]
    with pytest.raises(ScheduleError, match=r"mismatched message 0 from rank 0 to rank 1.*\(0,\).*\(0, 1\)"):
        verify(_schedule("broadcast", 2, 2, steps, root=0))


def test_checker_catches_a_deadlock() -> None:
    # Both ranks receive first, then send: each waits for the other forever.
    steps = [
        [Step(recvs=(Recv(1, (1,), False),)), Step(sends=(Send(1, (0,)),))],
        [Step(recvs=(Recv(0, (0,), False),)), Step(sends=(Send(0, (1,)),))],
    ]
    with pytest.raises(ScheduleError, match=r"deadlock: rank 0 at step 0 waits for rank 1 step 1"):
        verify(_schedule("allgather", 2, 2, steps))


def test_checker_catches_a_double_counted_reduction() -> None:
    builder = ScheduleBuilder("allreduce", "test", 2, 1)
    builder.transfer(0, 0, 1, [0], reduce=True)
    builder.transfer(1, 0, 1, [0], reduce=True)
    with pytest.raises(ScheduleError, match=r"rank 1 step 1 reduces chunk 0: contributions of ranks \[0\]"):
        verify(builder.build())


def test_checker_catches_sending_a_chunk_with_no_data() -> None:
    builder = ScheduleBuilder("allgather", "test", 2, 2)
    builder.transfer(0, 0, 1, [1], reduce=False)  # rank 0 only holds block 0
    with pytest.raises(ScheduleError, match=r"rank 0 step 0 sends chunk 1, which holds no data yet"):
        verify(builder.build())


def test_checker_catches_reducing_into_a_chunk_with_no_data() -> None:
    builder = ScheduleBuilder("broadcast", "test", 3, 1, root=0)
    builder.transfer(0, 0, 1, [0], reduce=True)
    with pytest.raises(ScheduleError, match=r"rank 1 step 0 reduces into chunk 0, which holds no data"):
        verify(builder.build())


def test_checker_catches_a_missing_contribution() -> None:
    builder = ScheduleBuilder("allreduce", "test", 3, 1)
    builder.transfer(0, 0, 1, [0], reduce=True)  # rank 2's data never joins
    builder.transfer(1, 1, 0, [0], reduce=False)
    builder.transfer(1, 1, 2, [0], reduce=False)
    with pytest.raises(
        ScheduleError,
        match=r"test allreduce on 3 ranks is wrong: rank 0 chunk 0 ends with "
        r"ranks \[0, 1\], expected ranks \[0, 1, 2\]",
    ):
        verify(builder.build())


def test_checker_catches_overwriting_a_chunk_being_sent() -> None:
    builder = ScheduleBuilder("allgather", "test", 2, 2)
    builder.transfer(0, 0, 1, [0], reduce=False)
    builder.transfer(0, 1, 0, [0], reduce=False)
    with pytest.raises(ScheduleError, match=r"rank 0 step 0: chunk 0 is sent and overwritten"):
        builder.build()


def test_checker_accepts_sending_and_reducing_a_chunk_in_one_step() -> None:
    builder = ScheduleBuilder("allreduce", "test", 2, 1)
    builder.transfer(0, 0, 1, [0], reduce=True)
    builder.transfer(0, 1, 0, [0], reduce=True)
    assert verify(builder.build()).rounds == 1
