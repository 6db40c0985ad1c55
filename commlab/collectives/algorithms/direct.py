"""Direct algorithms: every rank exchanges with every other rank at once, in one step per phase.

Fewest steps of all (latency depth 1 or 2) but p-1 messages per rank per step, so they suit small p or
transports that overlap many messages well.

Cost (p ranks, n bytes; each step is p-1 messages per rank; `step` is the model's per-step cost):
    allreduce       2 step + 2(p-1) alpha + 2n(p-1)/p beta + n(p-1)/p gamma
    reduce_scatter  step + (p-1) alpha + n(p-1)/p beta + n(p-1)/p gamma
    allgather       step + (p-1) alpha + n(p-1)/p beta
    broadcast       step + (p-1) alpha + (p-1) n beta              (the root sends p-1 copies)
    reduce          step + (p-1) alpha + (p-1) n (beta + gamma)    (the root receives and adds p-1 buffers)
    alltoall        step + (p-1) alpha + n(p-1)/p beta             (n: a rank's input, p blocks of n/p)
"""

from __future__ import annotations

from commlab.collectives.cost import CostModel
from commlab.collectives.schedule import OPS, Schedule, ScheduleBuilder
from commlab.errors import invalid

NAME = "direct"


def _scatter_reduce(builder: ScheduleBuilder, world_size: int, slot: int) -> None:
    """Every rank r sends chunk q to rank q, which adds the p-1 contributions it receives."""
    for r in range(world_size):
        for q in range(world_size):
            if q != r:
                builder.transfer(slot, r, q, [q], reduce=True)


def _gather(builder: ScheduleBuilder, world_size: int, slot: int) -> None:
    """Every rank r sends its chunk r to every other rank."""
    for r in range(world_size):
        for q in range(world_size):
            if q != r:
                builder.transfer(slot, r, q, [r], reduce=False)


def direct_allreduce(world_size: int) -> Schedule:
    """Direct reduce-scatter (rank r sums chunk r) then direct allgather: two steps."""
    builder = ScheduleBuilder("allreduce", NAME, world_size, world_size)
    _scatter_reduce(builder, world_size, 0)
    _gather(builder, world_size, 1)
    return builder.build()


def direct_reduce_scatter(world_size: int) -> Schedule:
    """One step: rank r receives block r from everyone and adds it in."""
    builder = ScheduleBuilder("reduce_scatter", NAME, world_size, world_size)
    _scatter_reduce(builder, world_size, 0)
    return builder.build()


def direct_allgather(world_size: int) -> Schedule:
    """One step: rank r sends block r to everyone."""
    builder = ScheduleBuilder("allgather", NAME, world_size, world_size)
    _gather(builder, world_size, 0)
    return builder.build()


def direct_broadcast(world_size: int, root: int) -> Schedule:
    """One step: the root sends the buffer to every other rank."""
    builder = ScheduleBuilder("broadcast", NAME, world_size, 1, root)
    for q in range(world_size):
        if q != root:
            builder.transfer(0, root, q, [0], reduce=False)
    return builder.build()


def direct_reduce(world_size: int, root: int) -> Schedule:
    """One step: every other rank sends its buffer to the root, which adds the p-1 of them."""
    builder = ScheduleBuilder("reduce", NAME, world_size, 1, root)
    for q in range(world_size):
        if q != root:
            builder.transfer(0, q, root, [0], reduce=True)
    return builder.build()


def direct_alltoall(world_size: int) -> Schedule:
    """One step: rank r sends block (r, d) to every rank d (the IR's p x p block layout)."""
    p = world_size
    builder = ScheduleBuilder("alltoall", NAME, p, p * p)
    for r in range(p):
        for d in range(p):
            if d != r:
                builder.transfer(0, r, d, [r * p + d], reduce=False)
    return builder.build()


def build(op: str, world_size: int, root: int | None = None, segments: int = 1) -> Schedule:
    """The direct schedule for `op` (arguments already validated by the registry)."""
    if op == "allreduce":
        return direct_allreduce(world_size)
    if op == "reduce_scatter":
        return direct_reduce_scatter(world_size)
    if op == "allgather":
        return direct_allgather(world_size)
    if op == "broadcast":
        return direct_broadcast(world_size, root)
    if op == "reduce":
        return direct_reduce(world_size, root)
    if op == "alltoall":
        return direct_alltoall(world_size)
    raise invalid("op", op, OPS)


def cost(op: str, world_size: int, nbytes: float, model: CostModel, segments: int = 1) -> float:
    """Seconds for the direct `op` on p ranks moving n bytes (the formulas in this module's docstring)."""
    p, n = world_size, nbytes
    share = n * (p - 1) / p
    if op == "allreduce":
        return model.time(2 * (p - 1), 2 * share, share, steps=2)
    if op == "reduce_scatter":
        return model.time(p - 1, share, share, steps=1)
    if op == "allgather":
        return model.time(p - 1, share, steps=1)
    if op == "broadcast":
        return model.time(p - 1, (p - 1) * n, steps=1)
    if op == "reduce":
        return model.time(p - 1, (p - 1) * n, (p - 1) * n, steps=1)
    if op == "alltoall":
        return model.time(p - 1, share, steps=1)
    raise invalid("op", op, OPS)
