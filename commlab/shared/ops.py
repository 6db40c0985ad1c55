"""The collective op table: one row per op with the facts every layer needs about it.

Like nccl-tests' per-collective struct: whether the op has a root, whether its buffer is `world_size`
blocks (reduce-scatter's input, allgather's output: the bytes count the whole buffer), whether it reduces,
and its busbw factor (busbw = algbw x factor; nccl-tests' definition: allreduce 2(p-1)/p,
reduce-scatter, allgather and all-to-all (p-1)/p, broadcast and reduce 1). The schedule IR, `commlab
bench`, calibration and the simulator all read this table.
"""

from __future__ import annotations

from dataclasses import dataclass

from commlab.errors import invalid


@dataclass(frozen=True)
class OpInfo:
    """One collective op. `ring_transfers`: how many times each byte crosses the ring's busiest link, per
    (p-1)/p (allreduce 2, reduce-scatter and allgather 1; 0 for broadcast and reduce, whose factor is 1)."""

    name: str
    rooted: bool
    blocked: bool
    reduces: bool
    ring_transfers: int

    def bus_factor(self, world_size: int) -> float:
        """busbw / algbw at `world_size` ranks."""
        p = world_size
        return self.ring_transfers * (p - 1) / p if self.ring_transfers else 1.0

    def count(self, nbytes: int, itemsize: int, world_size: int) -> int:
        """Elements per rank's block for a buffer of about `nbytes` (at least 1), as nccl-tests sizes it."""
        per = nbytes // itemsize
        return max(1, per // world_size if self.blocked else per)

    def total_bytes(self, count: int, itemsize: int, world_size: int) -> int:
        """Bytes of the whole buffer holding `count` elements per block."""
        return count * itemsize * (world_size if self.blocked else 1)


OP_TABLE: dict[str, OpInfo] = {
    "allreduce": OpInfo("allreduce", rooted=False, blocked=False, reduces=True, ring_transfers=2),
    "reduce_scatter": OpInfo("reduce_scatter", rooted=False, blocked=True, reduces=True, ring_transfers=1),
    "allgather": OpInfo("allgather", rooted=False, blocked=True, reduces=False, ring_transfers=1),
    "broadcast": OpInfo("broadcast", rooted=True, blocked=False, reduces=False, ring_transfers=0),
    "reduce": OpInfo("reduce", rooted=True, blocked=False, reduces=True, ring_transfers=0),
    # a rank's input is world_size blocks, one per peer (the IR's buffer is p x p of them: schedule.py)
    "alltoall": OpInfo("alltoall", rooted=False, blocked=True, reduces=False, ring_transfers=1),
}
OPS = tuple(OP_TABLE)
ROOTED_OPS = tuple(name for name, info in OP_TABLE.items() if info.rooted)
BLOCKED_OPS = tuple(name for name, info in OP_TABLE.items() if info.blocked)
SIGNATURE_INTS = 8
"""The integers of one call's signature, which every rank's argument check compares (op, reduction, dtype,
count, root, algorithm, segments, pieces: `collectives.communicator.encode_signature`); the simulator prices
gloo's check as a ring allgather of this many int64 per rank."""


def op_info(op: str) -> OpInfo:
    """The table's row for `op`, else InvalidArgumentError naming the ops."""
    if op not in OP_TABLE:
        raise invalid("op", op, OPS)
    return OP_TABLE[op]


def bus_factor(op: str, world_size: int) -> float:
    """nccl-tests' busbw / algbw: 2(p-1)/p for allreduce, (p-1)/p for reduce-scatter/allgather, else 1."""
    return op_info(op).bus_factor(world_size)
