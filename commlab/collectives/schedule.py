"""The schedule IR: a collective algorithm written once, as data, for the runtime and the simulator.

A buffer of N elements is split into C logical chunks (for reduce-scatter and allgather the buffer is made
of one block per rank and every block is split alike). Each rank has an ordered list of steps; a step is a
set of sends and receives that run concurrently, and a rank starts step k+1 when its step k is complete.
The k-th send from rank a to rank b matches the k-th receive on b from a, and both name the same chunks.
Within a step a send carries the chunk's value from before the step; reducing receives are applied when
all of the step's transfers are done, so a step may send a chunk and reduce into it, but never overwrite it.

The symbolic checker (`simulate`, `verify`) runs a schedule without data, with rendezvous semantics (a
transfer happens only once both ends have reached the steps that hold it), and proves which ranks'
contributions every chunk holds at the end.

All-to-all fits this IR by its buffer: p x p blocks, block (s, d) = s * p + d holding what rank s sends to
rank d. Rank r starts with its row (blocks (r, d)) and must end with its column (blocks (s, r)); a message
keeps a chunk's index on every rank it passes, so every algorithm (direct, pairwise, Bruck) is a set of
transfers like any other, and the checker proves the result: chunk (s, r) on rank r must hold rank s's data,
which only rank s had. The runtime pays p times the input's memory for that layout (`api.all_to_all`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from commlab.errors import ScheduleError, invalid
from commlab.shared.ops import BLOCKED_OPS, OPS, ROOTED_OPS


@dataclass(frozen=True)
class Send:
    """Send the listed chunks, in order, to `peer`."""

    peer: int
    chunks: tuple[int, ...]


@dataclass(frozen=True)
class Recv:
    """Receive the listed chunks from `peer`; `reduce` adds them into the chunks, else overwrites them."""

    peer: int
    chunks: tuple[int, ...]
    reduce: bool


@dataclass(frozen=True)
class Step:
    """Transfers one rank runs concurrently; the rank moves on when all of them are done."""

    sends: tuple[Send, ...] = ()
    recvs: tuple[Recv, ...] = ()


def num_blocks(op: str, world_size: int) -> int:
    """Blocks of a schedule's buffer: p x p for all-to-all (block (s, d) goes from s to d), p for the
    blocked ops (reduce-scatter, allgather), else 1. Shared by `Schedule` and `ArraySchedule`."""
    if op == "alltoall":
        return world_size * world_size
    return world_size if op in BLOCKED_OPS else 1


@dataclass(frozen=True)
class Schedule:
    """A collective on `world_size` ranks: per-rank step lists over `num_chunks` chunks of the buffer.

    The buffer is `num_blocks` equal blocks (one per rank for reduce-scatter and allgather, else one), and
    each block is split evenly into `num_chunks // num_blocks` chunks; chunk c belongs to block
    c // chunks_per_block.
    """

    op: str
    algorithm: str
    world_size: int
    num_chunks: int
    steps: tuple[tuple[Step, ...], ...]
    root: int | None = None

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise invalid("op", self.op, OPS)
        if self.world_size < 1:
            raise invalid("world_size", self.world_size, "an integer >= 1")
        if len(self.steps) != self.world_size:
            raise ScheduleError(f"{self.world_size} ranks but step lists for {len(self.steps)}")
        if self.op in ROOTED_OPS and (self.root is None or not 0 <= self.root < self.world_size):
            raise invalid("root", self.root, f"a rank in 0..{self.world_size - 1}")
        if self.num_chunks < 1 or self.num_chunks % self.num_blocks:
            raise ScheduleError(
                f"num_chunks={self.num_chunks} must be a positive multiple of num_blocks={self.num_blocks}"
            )
        for rank, steps in enumerate(self.steps):
            for index, step in enumerate(steps):
                _check_step(self, rank, index, step)

    @property
    def num_blocks(self) -> int:
        return num_blocks(self.op, self.world_size)

    @property
    def chunks_per_block(self) -> int:
        return self.num_chunks // self.num_blocks

    def block_of(self, chunk: int) -> int:
        return chunk // self.chunks_per_block

    def block_chunks(self, block: int) -> range:
        return range(block * self.chunks_per_block, (block + 1) * self.chunks_per_block)

    def num_messages(self) -> int:
        return sum(len(step.sends) for steps in self.steps for step in steps)

    def __repr__(self) -> str:
        longest = max((len(s) for s in self.steps), default=0)
        root = "" if self.root is None else f", root={self.root}"
        return (
            f"Schedule({self.algorithm} {self.op}, world_size={self.world_size}, chunks={self.num_chunks}"
            f"{root}, max_steps={longest}, messages={self.num_messages()})"
        )


def _check_step(schedule: Schedule, rank: int, index: int, step: Step) -> None:
    """Structural checks of one step: peers and chunks in range, no chunk overwritten while in use."""
    where = f"rank {rank} step {index}"
    sent: set[int] = set()
    written: dict[int, bool] = {}  # chunk -> written by a copy receive
    for transfer in (*step.sends, *step.recvs):
        if not 0 <= transfer.peer < schedule.world_size or transfer.peer == rank:
            raise ScheduleError(f"{where}: peer {transfer.peer} is not another rank of {schedule.world_size}")
        if not transfer.chunks:
            raise ScheduleError(f"{where}: a transfer with {transfer.peer} names no chunks")
        for chunk in transfer.chunks:
            if not 0 <= chunk < schedule.num_chunks:
                raise ScheduleError(f"{where}: chunk {chunk} outside 0..{schedule.num_chunks - 1}")
    for send in step.sends:
        sent.update(send.chunks)
    for recv in step.recvs:
        for chunk in recv.chunks:
            if chunk in written and (written[chunk] or not recv.reduce):
                raise ScheduleError(f"{where}: chunk {chunk} is written by two receives, one overwriting")
            if not recv.reduce and chunk in sent:
                raise ScheduleError(f"{where}: chunk {chunk} is sent and overwritten in the same step")
            written[chunk] = not recv.reduce


def chunk_bounds(numel: int, num_chunks: int, num_blocks: int = 1) -> list[tuple[int, int]]:
    """Element ranges [start, end) per chunk: `num_blocks` equal blocks, each split as evenly as possible."""
    if numel % num_blocks:
        raise invalid("numel", numel, f"a multiple of num_blocks={num_blocks}")
    block = numel // num_blocks
    per_block = num_chunks // num_blocks
    base, extra = divmod(block, per_block)
    bounds = []
    for b in range(num_blocks):
        start = b * block
        for i in range(per_block):
            size = base + (1 if i < extra else 0)
            bounds.append((start, start + size))
            start += size
    return bounds


def subdivide(schedule: Schedule, pieces: int) -> Schedule:
    """The same schedule on `pieces` independent, contiguous slices of every block, interleaved step-major.

    Slice g of block b holds the block's chunks again, renumbered b*C*pieces + g*C + i (C chunks per block),
    so a message that names a contiguous run of chunks still names a contiguous run in every slice. Each
    step k becomes the steps (k, 0), ..., (k, pieces-1), each moving only its slice: one slice's reduction
    can then overlap the next slice's transfer (the executor posts ahead by data dependency). The checker
    proves the result like any other schedule.
    """
    if not isinstance(pieces, int) or isinstance(pieces, bool) or pieces < 1:
        raise invalid("pieces", pieces, "an integer >= 1")
    if pieces == 1:
        return schedule
    per_block = schedule.chunks_per_block

    def moved(chunks: tuple[int, ...], g: int) -> tuple[int, ...]:
        return tuple((c // per_block) * per_block * pieces + g * per_block + c % per_block for c in chunks)

    steps = tuple(
        tuple(
            Step(
                tuple(Send(s.peer, moved(s.chunks, g)) for s in step.sends),
                tuple(Recv(r.peer, moved(r.chunks, g), r.reduce) for r in step.recvs),
            )
            for step in rank_steps
            for g in range(pieces)
        )
        for rank_steps in schedule.steps
    )
    chunks = schedule.num_chunks * pieces
    return Schedule(schedule.op, schedule.algorithm, schedule.world_size, chunks, steps, schedule.root)


@dataclass
class ScheduleBuilder:
    """Collects transfers by time slot and freezes them into a Schedule (empty slots are dropped).

    Algorithms place each transfer at one slot on both ends, so every message is matched at equal slot
    indices on sender and receiver, which makes the result deadlock-free by construction.
    """

    op: str
    algorithm: str
    world_size: int
    num_chunks: int
    root: int | None = None
    _slots: list[dict[int, tuple[list[Send], list[Recv]]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._slots = [defaultdict(lambda: ([], [])) for _ in range(self.world_size)]

    def transfer(
        self, slot: int, src: int, dst: int, chunks: tuple[int, ...] | list[int], reduce: bool
    ) -> None:
        """At `slot`, `src` sends `chunks` to `dst`, which reduces them in (reduce=True) or overwrites."""
        chunks = tuple(chunks)
        self._slots[src][slot][0].append(Send(dst, chunks))
        self._slots[dst][slot][1].append(Recv(src, chunks, reduce))

    def build(self) -> Schedule:
        steps = tuple(
            tuple(Step(tuple(s), tuple(r)) for _, (s, r) in sorted(slots.items())) for slots in self._slots
        )
        return Schedule(self.op, self.algorithm, self.world_size, self.num_chunks, steps, self.root)


Holdings = list[list[frozenset[int] | None]]


@dataclass(frozen=True)
class CheckResult:
    """What the symbolic run found: each rank's chunks (the set of contributing ranks, None if unset)."""

    holdings: Holdings
    rounds: int  # rendezvous rounds until every rank finished: the latency-bound depth of the schedule
    messages: int


def initial_holdings(schedule: Schedule) -> Holdings:
    """What each rank's chunks hold before the collective, by the op's input convention."""
    p, c = schedule.world_size, schedule.num_chunks
    if schedule.op in ("allreduce", "reduce", "reduce_scatter"):
        return [[frozenset((r,))] * c for r in range(p)]
    if schedule.op == "allgather":
        return [[frozenset((r,)) if schedule.block_of(i) == r else None for i in range(c)] for r in range(p)]
    if schedule.op == "alltoall":  # rank r holds its row: blocks (r, d)
        return [
            [frozenset((r,)) if schedule.block_of(i) // p == r else None for i in range(c)] for r in range(p)
        ]
    root_data = frozenset((schedule.root,))
    return [[root_data if r == schedule.root else None] * c for r in range(p)]


def _match_messages(schedule: Schedule) -> tuple[list, list[list[list[int]]]]:
    """Pair the k-th send a->b with the k-th receive on b from a; raise on an unmatched or mismatched one."""
    sends: dict[tuple[int, int], list[tuple[int, Send]]] = defaultdict(list)
    recvs: dict[tuple[int, int], list[tuple[int, Recv]]] = defaultdict(list)
    for rank, steps in enumerate(schedule.steps):
        for index, step in enumerate(steps):
            for s in step.sends:
                sends[(rank, s.peer)].append((index, s))
            for r in step.recvs:
                recvs[(r.peer, rank)].append((index, r))
    messages = []  # (src, src_step, dst, dst_step, recv)
    step_messages = [[[] for _ in steps] for steps in schedule.steps]
    for pair in sorted(set(sends) | set(recvs)):
        src, dst = pair
        out, inn = sends.get(pair, []), recvs.get(pair, [])
        for k in range(max(len(out), len(inn))):
            if k >= len(inn):
                i, s = out[k]
                raise ScheduleError(
                    f"rank {src} step {i} sends chunks {s.chunks} to rank {dst}, "
                    "which has no matching receive"
                )
            if k >= len(out):
                j, r = inn[k]
                raise ScheduleError(
                    f"rank {dst} step {j} receives chunks {r.chunks} from rank {src}, which never sends them"
                )
            (i, s), (j, r) = out[k], inn[k]
            if s.chunks != r.chunks:
                raise ScheduleError(
                    f"mismatched message {k} from rank {src} to rank {dst}: step {i} sends chunks {s.chunks}"
                    f" but step {j} receives chunks {r.chunks}"
                )
            mid = len(messages)
            messages.append((src, i, dst, j, r))
            step_messages[src][i].append(mid)
            step_messages[dst][j].append(mid)
    return messages, step_messages


def simulate(schedule: Schedule) -> CheckResult:
    """Run the schedule without data; return what every chunk holds. Raises ScheduleError on deadlock."""
    messages, step_messages = _match_messages(schedule)
    p = schedule.world_size
    holdings = initial_holdings(schedule)
    position = [0] * p
    payloads: dict[int, tuple[frozenset[int], ...]] = {}
    finished = sum(1 for r in range(p) if not schedule.steps[r])
    rounds = 0
    while finished < p:
        # Transfer every message whose both ends are at the step that holds it (values from before the step).
        for mid, (src, i, dst, j, recv) in enumerate(messages):
            if mid not in payloads and position[src] == i and position[dst] == j:
                values = []
                for chunk in recv.chunks:
                    value = holdings[src][chunk]
                    if value is None:
                        raise ScheduleError(
                            f"rank {src} step {i} sends chunk {chunk}, which holds no data yet"
                        )
                    values.append(value)
                payloads[mid] = tuple(values)
        advanced = []
        for rank in range(p):
            steps = schedule.steps[rank]
            if position[rank] < len(steps) and all(
                m in payloads for m in step_messages[rank][position[rank]]
            ):
                advanced.append(rank)
        if not advanced:
            raise ScheduleError(
                f"deadlock: {_describe_stuck(schedule, position, step_messages, messages, payloads)}"
            )
        for rank in advanced:
            index = position[rank]
            for mid in step_messages[rank][index]:
                src, _, dst, _, recv = messages[mid]
                if dst == rank:
                    _apply(holdings[rank], recv, payloads[mid], rank, index)
            position[rank] += 1
            if position[rank] == len(schedule.steps[rank]):
                finished += 1
        rounds += 1
    return CheckResult(holdings, rounds, len(messages))


def _apply(chunks: list, recv: Recv, values: tuple[frozenset[int], ...], rank: int, index: int) -> None:
    for chunk, value in zip(recv.chunks, values, strict=True):
        if not recv.reduce:
            chunks[chunk] = value
            continue
        mine = chunks[chunk]
        if mine is None:
            raise ScheduleError(
                f"rank {rank} step {index} reduces into chunk {chunk}, which holds no data yet"
            )
        if mine & value:
            raise ScheduleError(
                f"rank {rank} step {index} reduces chunk {chunk}: contributions of ranks "
                f"{sorted(mine & value)}"
                " would be counted twice"
            )
        chunks[chunk] = mine | value


def _describe_stuck(schedule: Schedule, position, step_messages, messages, payloads) -> str:
    parts = []
    for rank in range(schedule.world_size):
        index = position[rank]
        if index >= len(schedule.steps[rank]):
            continue
        waiting = []
        for mid in step_messages[rank][index]:
            if mid in payloads:
                continue
            src, i, dst, j, _ = messages[mid]
            peer, peer_step = (dst, j) if src == rank else (src, i)
            waiting.append(f"rank {peer} step {peer_step} (it is at step {position[peer]})")
        parts.append(f"rank {rank} at step {index} waits for " + ", ".join(waiting))
    return "; ".join(parts)


def expected_holdings(schedule: Schedule) -> list[list[frozenset[int] | None]]:
    """The op's postcondition: what each chunk must hold at the end (None where anything is allowed)."""
    p, c = schedule.world_size, schedule.num_chunks
    everyone = frozenset(range(p))
    if schedule.op == "allreduce":
        return [[everyone] * c for _ in range(p)]
    if schedule.op == "reduce_scatter":
        return [[everyone if schedule.block_of(i) == r else None for i in range(c)] for r in range(p)]
    if schedule.op == "allgather":
        return [[frozenset((schedule.block_of(i),)) for i in range(c)] for _ in range(p)]
    if schedule.op == "broadcast":
        return [[frozenset((schedule.root,))] * c for _ in range(p)]
    if schedule.op == "alltoall":  # rank r ends with its column: block (s, r) holds rank s's data
        return [
            [
                frozenset((schedule.block_of(i) // p,)) if schedule.block_of(i) % p == r else None
                for i in range(c)
            ]
            for r in range(p)
        ]
    return [[everyone] * c if r == schedule.root else [None] * c for r in range(p)]


def verify(schedule: Schedule) -> CheckResult:
    """Prove the schedule computes its op: simulate it and compare with the postcondition."""
    result = simulate(schedule)
    want = expected_holdings(schedule)
    for rank in range(schedule.world_size):
        for chunk in range(schedule.num_chunks):
            need, have = want[rank][chunk], result.holdings[rank][chunk]
            if need is not None and have != need:
                got = "nothing" if have is None else f"ranks {sorted(have)}"
                raise ScheduleError(
                    f"{schedule.algorithm} {schedule.op} on {schedule.world_size} ranks is wrong: rank {rank}"
                    f" chunk {chunk} ends with {got}, expected ranks {sorted(need)}"
                )
    return result
