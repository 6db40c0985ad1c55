"""Array-built schedules (`ArraySchedule`, `algorithms.vectorized`) against the object-built ones.

The object builders (`ring.py`, `tree.py`) are the definition. For every world size 1..64 the rows must
make the very same `Schedule` (step for step, transfer for transfer), so the symbolic checker's verdict
on both is one; the checker runs on the rows' schedules too (every size for the trees and chains, a
spread of sizes for the ring's O(p^2)-message ops, whose check costs O(p^3)); the simulator must
compile them to the same arrays and predict the same times, bit for bit, because it runs the same float
operations in the same order. The sweeps that find rendezvous rounds must agree with the round-by-round
walk. And `import commlab` must not import torch (the simulator's CLI
starts in a fraction of the time) while still registering the torch backend once torch is imported.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

from commlab.collectives.algorithms import ALGORITHMS, build_schedule
from commlab.collectives.algorithms.vectorized import ARRAY_BUILDERS, build_array_schedule, ring_rows
from commlab.collectives.array_schedule import ArraySchedule
from commlab.collectives.schedule import verify
from commlab.errors import ScheduleError
from commlab.sim.network import topology as topo
from commlab.sim.network.collective import simulate, simulate_collective
from commlab.sim.network.compiled import compile_schedule
from commlab.sim.network.engine import _rounds_by_sweeps, _rounds_by_walk, rendezvous_rounds
from commlab.sim.network.profile import Profile
from commlab.sim.network.topology import Topology

CASES = [
    (name, op, seg)
    for name in ARRAY_BUILDERS
    for op in ALGORITHMS[name].ops
    for seg in ((1, 3) if op in ALGORITHMS[name].pipelined_ops else (1,))
]


CHECKED = {*range(1, 17), 24, 31, 32, 33, 48, 63, 64}


def _root(op: str, p: int) -> int | None:
    return p // 3 if op in ("broadcast", "reduce") else None


@pytest.mark.parametrize(("name", "op", "segments"), CASES)
def test_rows_are_the_object_schedule_for_world_sizes_1_to_64(name, op, segments):
    # The ring's reduce-scatter and allgather are the two halves of its allreduce (one phase builder):
    # all sizes for the allreduce, the spread for its halves, keeps this test to seconds.
    sizes = CHECKED if op in ("reduce_scatter", "allgather") else range(1, 65)
    for p in sizes:
        rows = ARRAY_BUILDERS[name](op, p, _root(op, p), segments)
        made = rows.to_schedule()
        assert made == ALGORITHMS[name].build(op, p, _root(op, p), segments), (name, op, p, segments)
        assert rows.num_messages() == made.num_messages()
        if p in CHECKED or op in ("broadcast", "reduce") or name == "tree":
            assert verify(made).messages == rows.num_messages()


@pytest.mark.parametrize(("name", "op", "segments"), CASES)
def test_rows_compile_to_the_object_schedules_arrays(name, op, segments):
    for p in (1, 2, 3, 4, 7, 8, 16, 31, 33):
        obj = compile_schedule(ALGORITHMS[name].build(op, p, _root(op, p), segments))
        arr = compile_schedule(ARRAY_BUILDERS[name](op, p, _root(op, p), segments))
        for f in dataclasses.fields(obj):
            if f.name != "schedule":
                assert np.array_equal(getattr(obj, f.name), getattr(arr, f.name)), (name, op, p, f.name)


@pytest.mark.parametrize("fidelity", ["flow", "congestion"])
def test_simulated_times_equal_object_path(fidelity):
    # A 2:1 oversubscribed fat-tree, so that flows contend (the event-driven engine runs) in some cases;
    # a profile with alpha, gamma and efficiency so every cost term is exercised. Same arithmetic in the
    # same order: equal to the last bit.
    topology = Topology(topo.fat_tree(4, oversubscription=2))
    profile = Profile(2e-6, 1e-10, 5e-6, 0.9, "test")
    for name, op, segments in CASES:
        for p in (2, 5, 8, 16):
            root = _root(op, p)
            obj = ALGORITHMS[name].build(op, p, root, segments)
            arr = ARRAY_BUILDERS[name](op, p, root, segments)
            a = simulate(obj, topology, 1 << 20, fidelity=fidelity, profile=profile)
            b = simulate(arr, topology, 1 << 20, fidelity=fidelity, profile=profile)
            assert a.time == b.time, (name, op, p)
            assert np.array_equal(a.step_end, b.step_end)
            assert np.array_equal(a.link_bytes, b.link_bytes)


def test_simulate_collective_uses_rows_and_keeps_results():
    topology = Topology(topo.fat_tree(4))
    assert isinstance(build_array_schedule("allreduce", "ring", 16), ArraySchedule)
    assert not isinstance(build_array_schedule("allreduce", "halving_doubling", 16), ArraySchedule)
    result = simulate_collective("allreduce", "ring", topology, 1 << 24, fidelity="flow")
    reference = simulate(build_schedule("allreduce", "ring", 16), topology, 1 << 24, fidelity="flow")
    assert result.time == reference.time


def test_rendezvous_sweeps_agree_with_the_walk():
    gave_up = 0
    for name, entry in ALGORITHMS.items():
        if entry.topology_aware:
            continue
        for op in entry.ops:
            for p in (1, 2, 3, 6, 8, 13, 32):
                for segments in (1, 4) if op in entry.pipelined_ops else (1,):
                    plan = compile_schedule(build_schedule(op, name, p, _root(op, p), segments))
                    swept = _rounds_by_sweeps(plan)
                    if swept is None:  # a long chain of cross-rank waits: the walk is the answer
                        gave_up += 1
                        continue
                    for x, y in zip(swept, _rounds_by_walk(plan), strict=True):
                        assert np.array_equal(x, y), (name, op, p, segments)
    assert gave_up < 60  # most schedules converge in a few sweeps (the ring in one)


def test_rendezvous_rounds_still_reports_a_deadlock():
    # rank 0 sends at slot 0, rank 1 receives... and also sends back first: both wait for each other.
    rows = ArraySchedule(
        "allgather", "test", 2, 2,
        np.array([0, 1]), np.array([0, 1]), np.array([1, 0]), np.array([False, False]),
        np.array([0, 1, 2]), np.array([0, 1]),
    )  # fmt: skip
    plan = compile_schedule(rows)
    assert rendezvous_rounds(plan)[0].tolist() == [0, 1]
    swapped = dataclasses.replace(plan, msg_dst_step=plan.msg_dst_step[::-1].copy())
    # Each message now needs the other's later step first: no round ever moves anything.
    swapped = dataclasses.replace(
        swapped,
        step_msgs=np.array([1, 0, 0, 1]),
    )
    with pytest.raises(ScheduleError, match="deadlock"):
        rendezvous_rounds(swapped)


def test_array_schedule_rejects_bad_rows():
    good = ring_rows("allreduce", 4)
    with pytest.raises(ScheduleError, match="outside"):
        dataclasses.replace(good, dst=good.dst + 4)
    with pytest.raises(ScheduleError, match="itself"):
        dataclasses.replace(good, dst=good.src.copy())
    with pytest.raises(ScheduleError, match="chunk id"):
        dataclasses.replace(good, chunk_ids=good.chunk_ids + 4)
    with pytest.raises(ScheduleError, match="same transfers"):
        dataclasses.replace(good, slot=good.slot[:-1])


def test_import_commlab_defers_torch_but_registers_the_backend():
    code = (
        "import sys, commlab, commlab.cli\n"
        "assert 'torch' not in sys.modules, 'import commlab pulled in torch'\n"
        "import torch.distributed as dist\n"
        "assert 'COMMLAB' in dist.Backend._plugins\n"
        "assert callable(commlab.all_reduce)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
