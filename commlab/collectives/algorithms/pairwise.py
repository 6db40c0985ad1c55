"""Pairwise exchange all-to-all: p-1 steps; at step k rank r sends its block for r+k and receives r-k's.

One message in and one out per step, every step the same size, so no rank is a hot spot and nothing waits
on a fan-in: MPICH's choice for long messages. The buffer layout is the IR's all-to-all layout (p x p
blocks, see `schedule`), so the schedule is proved like every other.

Cost (p ranks, n bytes of input per rank, b = n/p):
    alltoall   (p-1) (alpha + b beta)
"""

from __future__ import annotations

from commlab.collectives.cost import CostModel
from commlab.collectives.schedule import Schedule, ScheduleBuilder
from commlab.errors import invalid

NAME = "pairwise"
OPS = ("alltoall",)


def pairwise_alltoall(world_size: int) -> Schedule:
    """Step k-1 (k = 1..p-1): rank r sends block (r, r+k) to r+k and receives block (r-k, r) from r-k."""
    p = world_size
    builder = ScheduleBuilder("alltoall", NAME, p, p * p)
    for k in range(1, p):
        for r in range(p):
            d = (r + k) % p
            builder.transfer(k - 1, r, d, [r * p + d], reduce=False)
    return builder.build()


def build(op: str, world_size: int, root: int | None = None, segments: int = 1) -> Schedule:
    """The pairwise schedule (all-to-all is the only op it builds)."""
    if op != "alltoall":
        raise invalid("op", op, OPS)
    return pairwise_alltoall(world_size)


def cost(op: str, world_size: int, nbytes: float, model: CostModel, segments: int = 1) -> float:
    """Seconds for pairwise all-to-all: (p-1)(alpha + n/p beta)."""
    if op != "alltoall":
        raise invalid("op", op, OPS)
    p = world_size
    return model.time(p - 1, (p - 1) * nbytes / p)
