"""Schedule transforms for modelling multi-channel libraries: relabel ranks, run channels side by side.

NCCL splits a collective over channels, each a ring (or tree) through the ranks in its own order, so that
different channels leave a node through different NICs. `relabel` moves a schedule onto another rank order
and `merge_channels` runs several schedules over disjoint slices of the buffer as one Schedule, each
message at the round it would move in if its channel ran alone.
"""

from __future__ import annotations

from collections.abc import Sequence

from commlab.collectives.schedule import Recv, Schedule, ScheduleBuilder, Send, Step
from commlab.errors import invalid
from commlab.sim.network.compiled import compile_schedule
from commlab.sim.network.engine import rendezvous_rounds


def relabel(schedule: Schedule, order: Sequence[int]) -> Schedule:
    """The schedule where rank order[i] does what rank i did (order is a permutation of the ranks)."""
    p = schedule.world_size
    if sorted(order) != list(range(p)):
        raise invalid("order", list(order), f"a permutation of 0..{p - 1}")
    steps: list[tuple[Step, ...]] = [()] * p
    for role, rank in enumerate(order):
        steps[rank] = tuple(
            Step(
                tuple(Send(order[s.peer], s.chunks) for s in step.sends),
                tuple(Recv(order[r.peer], r.chunks, r.reduce) for r in step.recvs),
            )
            for step in schedule.steps[role]
        )
    root = None if schedule.root is None else order[schedule.root]
    return Schedule(schedule.op, schedule.algorithm, p, schedule.num_chunks, tuple(steps), root)


def merge_channels(channels: Sequence[Schedule]) -> Schedule:
    """One schedule running `channels` concurrently, channel c on the c-th slice of every block.

    Each channel's messages keep the rendezvous round they move in when the channel runs alone, and the
    merged schedule puts both ends of every message at that round (so it is deadlock-free by construction).
    """
    if not channels:
        raise invalid("channels", channels, "one or more schedules")
    first = channels[0]
    for c in channels[1:]:
        if (c.op, c.world_size, c.num_chunks, c.root) != (
            first.op,
            first.world_size,
            first.num_chunks,
            first.root,
        ):
            raise invalid("channels", c, "schedules of one op, world size, chunk count and root")
    count = len(channels)
    per_block = first.chunks_per_block
    builder = ScheduleBuilder(
        first.op, first.algorithm, first.world_size, first.num_chunks * count, first.root
    )
    for index, schedule in enumerate(channels):
        plan = compile_schedule(schedule)
        rounds, _, _ = rendezvous_rounds(plan)
        for m in range(plan.num_messages):
            chunks = plan.chunk_ids[plan.chunk_ptr[m] : plan.chunk_ptr[m + 1]].tolist()
            moved = [(c // per_block) * count * per_block + index * per_block + c % per_block for c in chunks]
            builder.transfer(
                int(rounds[m]), int(plan.msg_src[m]), int(plan.msg_dst[m]), moved, bool(plan.msg_reduce[m])
            )
    return builder.build()
