"""Runs a schedule on a transport over a flat tensor: chunk slicing, scratch space, reductions, lookahead.

A schedule is compiled once per (schedule, rank, element count, window) into a `Program`: per step, the
element ranges each message covers, its tag, where it lands (straight into the buffer for a contiguous
overwrite, into scratch for a reduction or a scattered chunk list) and `after`, the last earlier step whose
completion it needs (it sends or overwrites chunks that step writes, or overwrites chunks that step sends).

Execution waits for the steps in order, applying each step's reductions when all its transfers are done,
and posts later steps as soon as their `after` step is complete, up to `window` steps ahead of the one
waited for. So the transfer of one step (or slice, see `schedule.subdivide`) overlaps the reduction of the
previous one. Posting earlier never breaks a schedule the checker accepted: messages match by tag, and
every step is still posted no later than when its predecessor completes.

A program is then bound to one buffer and scratch (`BoundProgram`): views, gathers and reductions are
made once, and a transport with persistent requests (MPI: `prepare`/`start`) makes them then too, so
`run` costs a few Python operations per step. `run` can also call a `verify` right after posting step 0
(the argument check that rides beside the first step; see Communicator).

On a transport that reduces on receipt (`reduces_on_receipt`, shared memory), a program compiled with
`fuse_reduce` lets a reducing receive land in the buffer itself: the transport reduces the incoming bytes
into the buffer range piece by piece as they arrive (a cache-sized piece read, then added while it is
still in cache), instead of the whole message going to scratch and being added after the wait. Such a
receive counts as an overwrite of its chunks for `after` (the reduction may run any time after posting),
and it is fused only where no other transfer of its step touches its chunks: a step that sends the chunks
it reduces into (recursive doubling's swap) must send them unreduced, and two reductions into one chunk
keep the schedule's order (so every rank adds in the same order, whatever the timing).

The posting order does not depend on timing, so compilation also lays out scratch: each step's region is
live from its posting to its completion and regions live at once never overlap. The caller passes a
scratch tensor of at least `plan.scratch_numel` elements (the communicator keeps one and reuses it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from commlab.collectives.schedule import Schedule, chunk_bounds
from commlab.collectives.transport import Message, Transport, wait_all
from commlab.errors import CollectiveTimeoutError, TransportError, invalid

REDUCE_OPS = ("sum", "avg", "max", "min", "prod")
DEFAULT_WINDOW = 3  # steps in flight at most: the one waited for and two posted ahead

Reducer = Callable[[torch.Tensor, torch.Tensor], None]


def _add(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.add_(src)


def _mul(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.mul_(src)


def _max(dst: torch.Tensor, src: torch.Tensor) -> None:
    torch.maximum(dst, src, out=dst)


def _min(dst: torch.Tensor, src: torch.Tensor) -> None:
    torch.minimum(dst, src, out=dst)


# avg is a sum followed by one division at the end (see api.py), so it reduces like sum.
REDUCERS: dict[str, Reducer] = {"sum": _add, "avg": _add, "prod": _mul, "max": _max, "min": _min}

Ranges = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class ProgramTransfer:
    """One message of a step: peer, per-pair ordinal (the tag offset), element ranges and where it lands.

    A receive with `reduce` and `scratch_offset` -1 is fused: the transport reduces it into its one
    buffer range on receipt (see `compile_program`'s `fuse_reduce`)."""

    peer: int
    ordinal: int
    ranges: Ranges
    numel: int
    reduce: bool
    scratch_offset: int  # -1: the message is sent from / received into the buffer directly


@dataclass(frozen=True)
class ProgramStep:
    """A step's messages (empty ones dropped), the step it must wait for before posting, and its scratch."""

    sends: tuple[ProgramTransfer, ...]
    recvs: tuple[ProgramTransfer, ...]
    after: int = -1  # the last earlier step that must be complete before this one is posted
    scratch_numel: int = 0


@dataclass(frozen=True)
class Program:
    """A schedule compiled for one rank and one buffer length."""

    rank: int
    numel: int
    steps: tuple[ProgramStep, ...]
    scratch_numel: int
    tags_used: int  # the largest per-pair ordinal + 1: a collective needs this many tags
    window: int = DEFAULT_WINDOW


def _merge(bounds: list[tuple[int, int]], chunks: tuple[int, ...]) -> Ranges:
    """The element ranges of a chunk list, adjacent ranges merged and empty ones dropped."""
    merged: list[tuple[int, int]] = []
    for chunk in chunks:
        start, end = bounds[chunk]
        if start == end:
            continue
        if merged and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return tuple(merged)


@functools.lru_cache(maxsize=512)
def compile_program(
    schedule: Schedule, rank: int, numel: int, window: int = DEFAULT_WINDOW, fuse_reduce: bool = False
) -> Program:
    """Turn rank `rank`'s steps into element ranges, tags, dependencies and scratch for a `numel` buffer.

    `fuse_reduce`: reducing receives into one contiguous range that no other transfer of their step
    touches land in the buffer, reduced on receipt by the transport (see the module docstring); only for
    a transport whose `reduces_on_receipt` is True.
    """
    if not isinstance(window, int) or window < 1:
        raise invalid("window", window, "an integer >= 1")
    bounds = chunk_bounds(numel, schedule.num_chunks, schedule.num_blocks)
    sent: dict[int, int] = {}
    received: dict[int, int] = {}
    last_write: dict[int, int] = {}  # chunk -> last step that receives into it
    last_read: dict[int, int] = {}  # chunk -> last step that sends it
    steps = []
    for index, step in enumerate(schedule.steps[rank]):
        offset = 0
        sends, recvs = [], []
        reads, writes, direct_writes = set(), set(), set()
        shared = _shared_chunks(step) if fuse_reduce else set()
        for recv in step.recvs:
            ordinal = received.get(recv.peer, 0)
            received[recv.peer] = ordinal + 1
            writes.update(recv.chunks)
            ranges = _merge(bounds, recv.chunks)
            size = sum(e - s for s, e in ranges)
            fused = fuse_reduce and recv.reduce and len(ranges) == 1 and shared.isdisjoint(recv.chunks)
            direct = (not recv.reduce and len(ranges) <= 1) or fused
            if direct:
                direct_writes.update(recv.chunks)
            if size:
                where = -1 if direct else offset
                recvs.append(ProgramTransfer(recv.peer, ordinal, ranges, size, recv.reduce, where))
                offset += 0 if direct else size
        for send in step.sends:
            ordinal = sent.get(send.peer, 0)
            sent[send.peer] = ordinal + 1
            reads.update(send.chunks)
            ranges = _merge(bounds, send.chunks)
            size = sum(e - s for s, e in ranges)
            direct = len(ranges) <= 1
            if size:
                sends.append(
                    ProgramTransfer(send.peer, ordinal, ranges, size, False, -1 if direct else offset)
                )
                offset += 0 if direct else size
        after = max(
            [last_write.get(c, -1) for c in reads | direct_writes]
            + [last_read.get(c, -1) for c in direct_writes]
            + [-1]
        )
        for chunk in writes:
            last_write[chunk] = index
        for chunk in reads:
            last_read[chunk] = index
        steps.append(ProgramStep(tuple(sends), tuple(recvs), after, offset))
    steps, scratch_numel = _lay_out_scratch(steps, window)
    tags = max([*sent.values(), *received.values(), 0])
    return Program(rank, numel, tuple(steps), scratch_numel, tags, window)


def _shared_chunks(step) -> set[int]:
    """Chunks that more than one transfer of a step touches (sent, or received more than once)."""
    seen: set[int] = set()
    shared: set[int] = set()
    for transfer in (*step.sends, *step.recvs):
        chunks = set(transfer.chunks)
        shared |= seen & chunks
        seen |= chunks
    return shared


def posting_order(steps: list[ProgramStep] | tuple[ProgramStep, ...], window: int) -> list[int]:
    """For each step, the index of the step being waited for when `execute` posts it (timing-independent)."""
    posted_at = [0] * len(steps)
    posted = 0
    for k in range(len(steps)):
        while posted < len(steps) and posted - k < window and steps[posted].after < k:
            posted_at[posted] = k
            posted += 1
    return posted_at


def _lay_out_scratch(steps: list[ProgramStep], window: int) -> tuple[list[ProgramStep], int]:
    """Give each step's scratch a base offset, disjoint from every step in flight with it (first fit)."""
    posted_at = posting_order(steps, window)
    live: list[tuple[int, int, int]] = []  # (start, end, last step index) of regions in use
    bases = []
    total = 0
    for index, step in enumerate(steps):
        live = [region for region in live if region[2] >= posted_at[index]]
        base = 0
        for start, end, _ in sorted(live):
            if base + step.scratch_numel <= start:
                break
            base = max(base, end)
        if step.scratch_numel:
            live.append((base, base + step.scratch_numel, index))
        bases.append(base)
        total = max(total, base + step.scratch_numel)
    laid_out = []
    for step, base in zip(steps, bases, strict=True):
        if base:
            step = ProgramStep(
                tuple(_shift(t, base) for t in step.sends),
                tuple(_shift(t, base) for t in step.recvs),
                step.after,
                step.scratch_numel,
            )
        laid_out.append(step)
    return laid_out, total


def _shift(transfer: ProgramTransfer, base: int) -> ProgramTransfer:
    if transfer.scratch_offset < 0:
        return transfer
    return ProgramTransfer(
        transfer.peer,
        transfer.ordinal,
        transfer.ranges,
        transfer.numel,
        transfer.reduce,
        transfer.scratch_offset + base,
    )


def _region(buffer: torch.Tensor, scratch: torch.Tensor, transfer: ProgramTransfer) -> torch.Tensor:
    if transfer.scratch_offset >= 0:
        return scratch[transfer.scratch_offset : transfer.scratch_offset + transfer.numel]
    start, end = transfer.ranges[0]
    return buffer[start:end]


class BoundStep:
    """A program step tied to one buffer and scratch: its messages (tags relative to the call's base),
    the gathers that fill scattered sends, the reductions to apply, and the transport's persistent
    handle of its transfers (None: posted afresh each call)."""

    __slots__ = ("applies", "describe", "fused", "gathers", "handle", "recvs", "sends", "step")

    def __init__(self, step: ProgramStep, buffer: torch.Tensor, scratch: torch.Tensor) -> None:
        self.step = step
        self.recvs = [Message(_region(buffer, scratch, r), r.peer, r.ordinal) for r in step.recvs]
        self.fused = [r.reduce and r.scratch_offset < 0 for r in step.recvs]  # reduced on receipt
        self.sends = [Message(_region(buffer, scratch, s), s.peer, s.ordinal) for s in step.sends]
        self.gathers = [
            (message.tensor, [buffer[a:b] for a, b in send.ranges])
            for send, message in zip(step.sends, self.sends, strict=True)
            if send.scratch_offset >= 0
        ]
        self.applies: list[tuple[torch.Tensor, torch.Tensor, bool]] = []
        for recv in step.recvs:
            if recv.scratch_offset < 0:
                continue
            at = recv.scratch_offset
            for start, end in recv.ranges:
                self.applies.append((buffer[start:end], scratch[at : at + end - start], recv.reduce))
                at += end - start
        self.describe = functools.partial(_describe_request, step)
        self.handle: Any = None


class BoundProgram:
    """A program bound to a buffer and a scratch tensor: every view, gather and reduction precomputed,
    so a call costs a few Python operations per step (see `run`).

    `persistent`: the transport's persistent requests (MPI's Send_init/Recv_init, started with
    Startall) are made here, with the tags of `tag_base`, and reused by every call; `release()` frees them.
    """

    def __init__(
        self,
        plan: Program,
        buffer: torch.Tensor,
        scratch: torch.Tensor,
        transport: Transport | None = None,
        tag_base: int = 0,
    ) -> None:
        self.plan = plan
        self.buffer, self.scratch = buffer, scratch
        self.steps = [BoundStep(step, buffer, scratch) for step in plan.steps]
        # the steps `run` posts right before it waits for each step (a static order: `posting_order`);
        # `posts_after_first`: the same without step 0, for a run that posts step 0 before its check
        posts: list[list[int]] = [[] for _ in plan.steps]
        for index, waited in enumerate(posting_order(plan.steps, plan.window)):
            posts[waited].append(index)
        self.posts = tuple(tuple(p) for p in posts)
        self.posts_after_first = (self.posts[0][1:], *self.posts[1:]) if posts else ()
        prepare = getattr(transport, "prepare", None) if transport is not None else None
        self.transport = transport if prepare is not None else None
        self.tag_base = tag_base
        self.released = False  # release() was called: a holder must bind anew
        if prepare is not None:
            for bound in self.steps:
                if bound.sends or bound.recvs:
                    bound.handle = prepare(
                        _tagged(bound.sends, tag_base), _tagged(bound.recvs, tag_base), bound.fused
                    )

    @property
    def persistent(self) -> bool:
        return self.transport is not None

    def release(self) -> None:
        """Free the transport's persistent requests (unless a timeout left them in flight); the program
        must not run after this."""
        self.released = True
        if self.transport is None:
            return
        for bound in self.steps:
            if bound.handle is not None:
                self.transport.release(bound.handle)
                bound.handle = None
        self.transport = None


def _tagged(messages: list[Message], tag_base: int) -> list[Message]:
    if not tag_base:
        return messages
    return [Message(m.tensor, m.peer, tag_base + m.tag) for m in messages]


def bind(plan: Program, buffer: torch.Tensor, scratch: torch.Tensor | None = None) -> BoundProgram:
    """`plan` bound to `buffer` (posted afresh each call); scratch is made if missing or short."""
    if scratch is None or scratch.numel() < plan.scratch_numel:
        scratch = buffer.new_empty(plan.scratch_numel)
    return BoundProgram(plan, buffer, scratch)


def _post(bound: BoundStep, transport: Transport, tag_base: int, persistent: bool, reducer: Reducer):
    """Post a step's receives and sends (gathering scattered sends into scratch first); None: the step
    has no transfers."""
    for payload, sources in bound.gathers:
        torch.cat(sources, out=payload)
    if persistent:
        return transport.start(bound.handle, reducer) if bound.handle is not None else None  # type: ignore[attr-defined]
    if not bound.sends and not bound.recvs:
        return None
    recvs = [
        Message(m.tensor, m.peer, tag_base + m.tag, reducer if fused else None)
        for m, fused in zip(bound.recvs, bound.fused, strict=True)
    ]
    return transport.post(_tagged(bound.sends, tag_base), recvs)


def run(
    bound: BoundProgram,
    transport: Transport,
    reducer: Reducer,
    deadline: float,
    tag_base: int = 0,
    label: str | Callable[[], str] = "collective",
    verify: Callable[[Any], None] | None = None,
) -> None:
    """Run a bound program in place; every wait ends by `deadline`.

    `tag_base` offsets the tags of transfers posted afresh (a persistent program has its own).
    `verify`, if given, is called with step 0's requests (None if it has none) right after step 0 is
    posted and before any wait or later posting: the argument check that rides beside the first step
    (see Communicator); it raises to abort the call. `label` names the collective in errors (a callable is
    called only when one happens).
    """
    in_flight: list = [None] * len(bound.steps)
    try:
        _run_steps(bound, transport, reducer, deadline, tag_base, label, verify, in_flight)
    except BaseException:
        abandon = getattr(transport, "abandon", None)
        if abandon is not None:  # transfers still in flight must keep their buffers (a late message lands)
            for requests in in_flight:
                if requests:
                    abandon(requests)
        raise


def _run_steps(
    bound: BoundProgram,
    transport: Transport,
    reducer: Reducer,
    deadline: float,
    tag_base: int,
    label: str | Callable[[], str],
    verify: Callable[[Any], None] | None,
    in_flight: list,
) -> None:
    persistent = bound.persistent
    wait = getattr(transport, "wait_all", wait_all)
    steps = bound.steps
    posts = bound.posts
    if verify is not None:
        if steps:
            in_flight[0] = _post(steps[0], transport, tag_base, persistent, reducer)
            posts = bound.posts_after_first
        verify(in_flight[0] if steps else None)
    for k, step in enumerate(steps):
        for index in posts[k]:
            in_flight[index] = _post(steps[index], transport, tag_base, persistent, reducer)
        requests = in_flight[k]
        if requests is not None:
            try:
                wait(requests, deadline, step.describe)
            except (CollectiveTimeoutError, TransportError) as error:
                name = label() if callable(label) else label
                raise type(error)(f"{name}, rank {bound.plan.rank}, step {k}: {error}") from error
            in_flight[k] = None
            for dst, src, reduce in step.applies:  # after the wait: reduce or copy what landed in scratch
                if reduce:
                    reducer(dst, src)
                else:
                    dst.copy_(src)


def execute(
    plan: Program,
    buffer: torch.Tensor,
    transport: Transport,
    reducer: Reducer,
    deadline: float,
    tag_base: int = 0,
    label: str | Callable[[], str] = "collective",
    scratch: torch.Tensor | None = None,
) -> None:
    """Run a compiled program over the flat contiguous `buffer`, in place; every wait ends by `deadline`.

    `scratch` (same dtype and device, at least `plan.scratch_numel` elements) is reused if given.
    `label` names the collective in errors (a callable is called only when one happens). Binds afresh:
    a caller that repeats a call keeps a `BoundProgram` and calls `run` (as the Communicator does).
    """
    run(bind(plan, buffer, scratch), transport, reducer, deadline, tag_base, label)


def _describe(transfer: ProgramTransfer, is_recv: bool) -> str:
    what = (
        f"receive of {transfer.numel} elements from" if is_recv else f"send of {transfer.numel} elements to"
    )
    return f"{what} rank {transfer.peer}"


def _describe_request(step: ProgramStep, index: int) -> str:
    """Name request `index` of a step (receives are posted first) for a timeout message."""
    if index < len(step.recvs):
        return _describe(step.recvs[index], True)
    return _describe(step.sends[index - len(step.recvs)], False)
