"""The schedule IR as arrays: one row per transfer, for schedules with millions of transfers.

A `Schedule` holds one `Step` object per rank and step; a 1024-rank ring allreduce has 2 M of them and
takes tens of seconds to build. `ArraySchedule` holds the same schedule as the list of transfers a
`ScheduleBuilder` would be given, in the order it would be given them: per transfer its time slot, sender,
receiver, whether the receiver reduces, and its chunks (a CSR: transfer t carries
`chunk_ids[chunk_ptr[t]:chunk_ptr[t+1]]`). The builder's rules define the steps: a rank's steps are the
slots it takes part in, in slot order (empty slots dropped), and within a step its sends and its receives
keep the transfers' order. So `to_schedule()` (a `ScheduleBuilder` run over the rows) is the one meaning
of an `ArraySchedule`; the executor and the symbolic checker run that `Schedule`, and the simulator
compiles the arrays directly (`commlab.sim.network.compiled.compile_schedule`). Both ends of a transfer are
at one slot, so the transfer is the message the IR's matching rule pairs (the k-th send a->b with the k-th
receive on b from a), and the result is deadlock-free by construction, as with `ScheduleBuilder`.

Structural checks here are the vectorized cheap ones (ranks, chunk ids, sizes); the per-step rules (no
chunk overwritten while in use) are checked when the `Schedule` is made. The array builders
(`commlab.collectives.algorithms.vectorized`) are proved equal, transfer for transfer, to the object
builders by the tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from commlab.collectives.schedule import Schedule, ScheduleBuilder, num_blocks
from commlab.errors import ScheduleError, invalid
from commlab.shared.ops import OPS, ROOTED_OPS


@dataclass(frozen=True, eq=False)
class ArraySchedule:
    """A collective on `world_size` ranks over `num_chunks` chunks, as rows of transfers (see module)."""

    op: str
    algorithm: str
    world_size: int
    num_chunks: int
    slot: np.ndarray = field(repr=False)
    src: np.ndarray = field(repr=False)
    dst: np.ndarray = field(repr=False)
    reduce: np.ndarray = field(repr=False)
    chunk_ptr: np.ndarray = field(repr=False)
    chunk_ids: np.ndarray = field(repr=False)
    root: int | None = None

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise invalid("op", self.op, OPS)
        if self.world_size < 1:
            raise invalid("world_size", self.world_size, "an integer >= 1")
        if self.op in ROOTED_OPS and (self.root is None or not 0 <= self.root < self.world_size):
            raise invalid("root", self.root, f"a rank in 0..{self.world_size - 1}")
        if self.num_chunks < 1 or self.num_chunks % self.num_blocks:
            raise ScheduleError(
                f"num_chunks={self.num_chunks} must be a positive multiple of num_blocks={self.num_blocks}"
            )
        m = len(self.src)
        if not len(self.slot) == len(self.dst) == len(self.reduce) == m or len(self.chunk_ptr) != m + 1:
            raise ScheduleError("slot, src, dst, reduce and chunk_ptr must describe the same transfers")
        p = self.world_size
        if m and (self.src.min() < 0 or self.dst.min() < 0 or self.src.max() >= p or self.dst.max() >= p):
            raise ScheduleError(f"a transfer names a rank outside 0..{p - 1}")
        if np.any(self.src == self.dst):
            t = int(np.flatnonzero(self.src == self.dst)[0])
            raise ScheduleError(f"transfer {t}: rank {int(self.src[t])} sends to itself")
        if m and self.slot.min() < 0:
            raise ScheduleError("slots must be >= 0")
        if self.chunk_ptr[0] != 0 or np.any(np.diff(self.chunk_ptr) < 1):
            raise ScheduleError("every transfer must name one or more chunks")
        if self.chunk_ptr[-1] != len(self.chunk_ids):
            raise ScheduleError("chunk_ptr must end at len(chunk_ids)")
        ids = self.chunk_ids
        if len(ids) and (ids.min() < 0 or ids.max() >= self.num_chunks):
            raise ScheduleError(f"a chunk id is outside 0..{self.num_chunks - 1}")

    @property
    def num_blocks(self) -> int:
        return num_blocks(self.op, self.world_size)

    @property
    def chunks_per_block(self) -> int:
        return self.num_chunks // self.num_blocks

    def num_messages(self) -> int:
        return len(self.src)

    def chunks_of(self, transfer: int) -> tuple[int, ...]:
        return tuple(self.chunk_ids[self.chunk_ptr[transfer] : self.chunk_ptr[transfer + 1]].tolist())

    @cached_property
    def schedule(self) -> Schedule:
        """The `Schedule` these rows stand for (built once; the executor and the checker run it)."""
        builder = ScheduleBuilder(self.op, self.algorithm, self.world_size, self.num_chunks, self.root)
        ptr = self.chunk_ptr.tolist()
        ids = self.chunk_ids.tolist()
        columns = (self.slot, self.src, self.dst, self.reduce)
        for t, (slot, src, dst, reduce) in enumerate(zip(*(c.tolist() for c in columns), strict=True)):
            builder.transfer(slot, src, dst, ids[ptr[t] : ptr[t + 1]], reduce)
        return builder.build()

    def to_schedule(self) -> Schedule:
        """The object form (see `schedule`)."""
        return self.schedule

    @property
    def steps(self) -> tuple:
        """Per-rank step lists of the object form (built on first use)."""
        return self.schedule.steps

    def __repr__(self) -> str:
        root = "" if self.root is None else f", root={self.root}"
        return (
            f"ArraySchedule({self.algorithm} {self.op}, world_size={self.world_size}, "
            f"chunks={self.num_chunks}{root}, messages={self.num_messages()})"
        )


def single_chunk_rows(
    op: str,
    algorithm: str,
    world_size: int,
    num_chunks: int,
    slot: np.ndarray,
    src: np.ndarray,
    dst: np.ndarray,
    chunk: np.ndarray,
    reduce: np.ndarray | bool,
    root: int | None = None,
) -> ArraySchedule:
    """An ArraySchedule whose every transfer carries one chunk (`chunk[t]`)."""
    m = len(src)
    return ArraySchedule(
        op,
        algorithm,
        world_size,
        num_chunks,
        np.asarray(slot, np.int64),
        np.asarray(src, np.int64),
        np.asarray(dst, np.int64),
        np.broadcast_to(np.asarray(reduce, bool), (m,)).copy(),
        np.arange(m + 1, dtype=np.int64),
        np.asarray(chunk, np.int64),
        root,
    )
