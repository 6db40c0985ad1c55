"""What the runtime and the simulator share (`commlab.shared`): both sides use the one definition.

The pipeline orders of the runtime (`parallel.pipeline.schedule_actions`, what `Pipeline` runs) and of
the training simulator (`sim.training.pipeline.schedule_order`, what it times) are compared element by
element for every pp <= 8, microbatches <= 32 and virtual stages <= 4; the mesh rank order of
`parallel.Mesh` against the simulator's `mesh_rank`; the busbw factors of `commlab bench` and the
simulator's `SimResult` against nccl-tests' definitions.
"""

from __future__ import annotations

import itertools
import math

import pytest

from commlab.collectives.algorithms import algorithms_for
from commlab.errors import InvalidArgumentError
from commlab.parallel.mesh import axis_groups, coordinates
from commlab.parallel.pipeline import SCHEDULES as RUNTIME_SCHEDULES
from commlab.parallel.pipeline import schedule_actions
from commlab.shared import ops
from commlab.shared.layout import CHECKPOINT_MODES, rank_at
from commlab.shared.pipeline_order import BACKWARD, FORWARD, SCHEDULES
from commlab.sim.network import Topology, ring, simulate_collective
from commlab.sim.training.pipeline import run_pipeline, schedule_order
from commlab.sim.training.step import mesh_rank
from commlab.sim.training.workload import Layout

MAX_PP, MAX_MICROBATCHES, MAX_VIRTUAL = 8, 32, 4


def _check_order(order: list[tuple[int, int, int]], microbatches: int, chunks: int) -> None:
    """Every (kind, microbatch, chunk) exactly once, and a chunk's forward before its backward."""
    expected = {(k, i, c) for k in (FORWARD, BACKWARD) for i in range(microbatches) for c in range(chunks)}
    assert len(order) == len(expected) and set(order) == expected
    position = {task: n for n, task in enumerate(order)}
    assert all(position[(FORWARD, i, c)] < position[(BACKWARD, i, c)] for _, i, c in order)


def test_runtime_and_simulator_run_the_same_pipeline_order():
    """The runtime's stages hold one model chunk each (gpipe, 1f1b); there the two orders must be the
    same sequence. With v > 1 chunks only the interleaved schedule applies, which the runtime does not
    run: its order (the shared one) must still be complete and deadlock-free in the simulation."""
    assert set(RUNTIME_SCHEDULES) < set(SCHEDULES)
    compared = 0
    for pp, m in itertools.product(range(1, MAX_PP + 1), range(1, MAX_MICROBATCHES + 1)):
        for schedule in RUNTIME_SCHEDULES:
            for stage in range(pp):
                runtime = schedule_actions(schedule, stage, pp, m)
                simulated = schedule_order(schedule, stage, pp, m, 1)
                assert [(FORWARD if k == "F" else BACKWARD, i, 0) for k, i in runtime] == simulated
                _check_order(simulated, m, 1)
                compared += 1
        for v in range(2, MAX_VIRTUAL + 1):
            if pp < 2 or m % pp:  # the interleaved schedule runs microbatches in groups of pp
                continue
            orders = [schedule_order("interleaved", rank, pp, m, v) for rank in range(pp)]
            for order in orders:
                _check_order(order, m, v)
            stages = pp * v
            run = run_pipeline(orders, [1.0] * stages, [2.0] * stages, [0.0] * stages, [0.0] * stages, m)
            assert run.makespan >= 3.0 * m * v  # a rank's own work; no deadlock (run_pipeline raises)
    assert compared == 2 * MAX_MICROBATCHES * sum(range(1, MAX_PP + 1))


def test_runtime_rejects_schedules_it_does_not_run():
    with pytest.raises(InvalidArgumentError, match="schedule"):
        schedule_actions("interleaved", 0, 2, 4)


def test_mesh_rank_order_is_the_runtimes():
    for dp, pp, tp in itertools.product((1, 2, 3), (1, 2, 4), (1, 2, 8)):
        layout = Layout(dp=dp, tp=tp, pp=pp, micro_batch=1, global_batch=dp * pp)
        groups = axis_groups(dp, pp, tp)
        for rank in range(dp * pp * tp):
            d, p, t = coordinates(rank, pp, tp)
            assert mesh_rank(d, p, t, layout) == rank_at(d, p, t, pp, tp) == rank
            assert [d * pp * tp + p * tp + j for j in range(tp)] in groups["tp"]
            assert [d * pp * tp + s * tp + t for s in range(pp)] in groups["pp"]
            assert [r * pp * tp + p * tp + t for r in range(dp)] in groups["dp"]


def test_axis_groups_partition_the_world_in_creation_order():
    """The grid slices give, per axis, world / size groups covering every rank once, ordered by the
    other coordinates (every rank must create them in one order)."""
    dp, pp, tp = 2, 3, 4
    groups = axis_groups(dp, pp, tp)
    for axis, size in (("dp", dp), ("pp", pp), ("tp", tp)):
        members = sorted(r for g in groups[axis] for r in g)
        assert members == list(range(dp * pp * tp)) and all(len(g) == size for g in groups[axis])
        assert groups[axis] == sorted(groups[axis]) and all(g == sorted(g) for g in groups[axis])


def test_checkpoint_modes_are_one_tuple():
    from commlab.models.gpt import CHECKPOINT_MODES as MODEL_MODES
    from commlab.sim.training.workload import CHECKPOINT_MODES as SIM_MODES

    assert MODEL_MODES is SIM_MODES is CHECKPOINT_MODES == ("none", "selective", "full")


@pytest.mark.parametrize("p", [1, 2, 3, 8, 64])
def test_bus_factors_are_nccl_tests(p):
    """nccl-tests (doc/PERFORMANCE.md): allreduce 2(n-1)/n, reduce-scatter, allgather and alltoall
    (n-1)/n, broadcast and reduce 1."""
    share = (p - 1) / p
    want = {"allreduce": 2 * share, "reduce_scatter": share, "allgather": share, "alltoall": share}
    for op in ops.OPS:
        assert ops.bus_factor(op, p) == want.get(op, 1.0)
    with pytest.raises(InvalidArgumentError, match="op"):
        ops.bus_factor("gather", p)


def test_simulator_busbw_uses_the_op_table():
    topology = Topology(ring(4))
    for op in ops.OPS:
        result = simulate_collective(op, algorithms_for(op)[0], topology, 1 << 20)
        assert math.isclose(result.busbw, result.algbw * ops.op_info(op).bus_factor(4), rel_tol=1e-12)


def test_op_table_counts_elements_as_bench_does():
    """A blocked op's buffer is world_size blocks of `count` elements; the others one buffer of count."""
    allgather, allreduce = ops.op_info("allgather"), ops.op_info("allreduce")
    assert allgather.count(1000, 4, 4) == 62 and allgather.total_bytes(62, 4, 4) == 992
    assert allreduce.count(1000, 4, 4) == 250 and allreduce.total_bytes(250, 4, 4) == 1000
    assert allgather.count(8, 4, 4) == 1  # never an empty buffer
    assert ops.ROOTED_OPS == ("broadcast", "reduce")
    assert ops.BLOCKED_OPS == ("reduce_scatter", "allgather", "alltoall")
