"""Ring algorithms: every rank talks only to its neighbours, so each link carries the minimum of bytes.

Allreduce is a ring reduce-scatter followed by a ring allgather over p chunks: at reduce-scatter step t
rank r sends chunk (r-t-1) mod p to r+1, which adds it in, so rank r ends with the full sum of chunk r;
at allgather step t rank r forwards chunk (r-t) mod p. Broadcast and reduce are a chain through the ranks
(root, root+1, ..., root+p-1), pipelined over k segments so every link is busy at once.

Cost (p ranks, n bytes as in `commlab.collectives.cost`, k segments):
    allreduce       2(p-1) alpha + 2n(p-1)/p beta + n(p-1)/p gamma
    reduce_scatter  (p-1) alpha + n(p-1)/p beta + n(p-1)/p gamma
    allgather       (p-1) alpha + n(p-1)/p beta
    broadcast       (p+k-2) (alpha + (n/k) beta)
    reduce          (p+k-2) (alpha + (n/k) (beta + gamma))
"""

from __future__ import annotations

from commlab.collectives.cost import CostModel
from commlab.collectives.schedule import Schedule, ScheduleBuilder
from commlab.errors import invalid

NAME = "ring"
OPS = ("allreduce", "reduce_scatter", "allgather", "broadcast", "reduce")  # no all-to-all
PIPELINED_OPS = ("broadcast", "reduce")


def _reduce_scatter_steps(builder: ScheduleBuilder, world_size: int, first_slot: int) -> None:
    """p-1 steps after which rank r holds the full sum of chunk r (chunks are one per rank)."""
    p = world_size
    for t in range(p - 1):
        for r in range(p):
            builder.transfer(first_slot + t, r, (r + 1) % p, [(r - t - 1) % p], reduce=True)


def _allgather_steps(builder: ScheduleBuilder, world_size: int, first_slot: int) -> None:
    """p-1 steps that spread chunk r, held by rank r, to every rank."""
    p = world_size
    for t in range(p - 1):
        for r in range(p):
            builder.transfer(first_slot + t, r, (r + 1) % p, [(r - t) % p], reduce=False)


def ring_allreduce(world_size: int) -> Schedule:
    """Ring reduce-scatter then ring allgather over p chunks: 2(p-1) steps on every rank."""
    builder = ScheduleBuilder("allreduce", NAME, world_size, world_size)
    _reduce_scatter_steps(builder, world_size, 0)
    _allgather_steps(builder, world_size, world_size - 1)
    return builder.build()


def ring_reduce_scatter(world_size: int) -> Schedule:
    """p-1 ring steps; rank r ends with the full sum of block r."""
    builder = ScheduleBuilder("reduce_scatter", NAME, world_size, world_size)
    _reduce_scatter_steps(builder, world_size, 0)
    return builder.build()


def ring_allgather(world_size: int) -> Schedule:
    """p-1 ring steps; every rank ends with every rank's block."""
    builder = ScheduleBuilder("allgather", NAME, world_size, world_size)
    _allgather_steps(builder, world_size, 0)
    return builder.build()


def ring_broadcast(world_size: int, root: int, segments: int = 1) -> Schedule:
    """A chain root -> root+1 -> ... pipelined over `segments` chunks: p+segments-2 slots.

    The rank at chain position i forwards segment j at slot j+i, one slot after it received it.
    """
    p = world_size
    builder = ScheduleBuilder("broadcast", NAME, p, segments, root)
    for i in range(p - 1):
        for j in range(segments):
            builder.transfer(j + i, (root + i) % p, (root + i + 1) % p, [j], reduce=False)
    return builder.build()


def ring_reduce(world_size: int, root: int, segments: int = 1) -> Schedule:
    """The broadcast chain reversed: partial sums flow from root+p-1 down to the root, pipelined.

    The rank at chain position i (i >= 1) sends segment j to position i-1 at slot j+p-1-i, one slot after
    position i+1 added its partial sum in.
    """
    p = world_size
    builder = ScheduleBuilder("reduce", NAME, p, segments, root)
    for i in range(1, p):
        for j in range(segments):
            builder.transfer(j + p - 1 - i, (root + i) % p, (root + i - 1) % p, [j], reduce=True)
    return builder.build()


def build(op: str, world_size: int, root: int | None = None, segments: int = 1) -> Schedule:
    """The ring schedule for `op` (arguments already validated by the registry)."""
    if op == "allreduce":
        return ring_allreduce(world_size)
    if op == "reduce_scatter":
        return ring_reduce_scatter(world_size)
    if op == "allgather":
        return ring_allgather(world_size)
    if op == "broadcast":
        return ring_broadcast(world_size, root, segments)
    if op == "reduce":
        return ring_reduce(world_size, root, segments)
    raise invalid("op", op, OPS)


def cost(op: str, world_size: int, nbytes: float, model: CostModel, segments: int = 1) -> float:
    """Seconds for the ring `op` on p ranks moving n bytes (the formulas in this module's docstring)."""
    p, n, k = world_size, nbytes, segments
    share = n * (p - 1) / p
    if op == "allreduce":
        return model.time(2 * (p - 1), 2 * share, share)
    if op == "reduce_scatter":
        return model.time(p - 1, share, share)
    if op == "allgather":
        return model.time(p - 1, share)
    if p == 1:
        return 0.0
    if op == "broadcast":
        return (p + k - 2) * model.time(1, n / k)
    if op == "reduce":
        return (p + k - 2) * model.time(1, n / k, n / k)
    raise invalid("op", op, OPS)
