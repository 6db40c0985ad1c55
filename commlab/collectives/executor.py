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

The posting order does not depend on timing, so compilation also lays out scratch: each step's region is
live from its posting to its completion and regions live at once never overlap. The caller passes a
scratch tensor of at least `plan.scratch_numel` elements (the communicator keeps one and reuses it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

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
    """One message of a step: peer, per-pair ordinal (the tag offset), element ranges and where it lands."""

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
def compile_program(schedule: Schedule, rank: int, numel: int, window: int = DEFAULT_WINDOW) -> Program:
    """Turn rank `rank`'s steps into element ranges, tags, dependencies and scratch for a `numel` buffer."""
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
        for recv in step.recvs:
            ordinal = received.get(recv.peer, 0)
            received[recv.peer] = ordinal + 1
            writes.update(recv.chunks)
            ranges = _merge(bounds, recv.chunks)
            size = sum(e - s for s, e in ranges)
            direct = not recv.reduce and len(ranges) <= 1
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


def _post(
    step: ProgramStep, buffer: torch.Tensor, scratch: torch.Tensor, transport: Transport, tag_base: int
):
    """Post a step's receives and sends (gathering scattered sends into scratch first)."""
    recvs = [Message(_region(buffer, scratch, r), r.peer, tag_base + r.ordinal) for r in step.recvs]
    sends = []
    for send in step.sends:
        payload = _region(buffer, scratch, send)
        if send.scratch_offset >= 0:
            torch.cat([buffer[s:e] for s, e in send.ranges], out=payload)
        sends.append(Message(payload, send.peer, tag_base + send.ordinal))
    return transport.post(sends, recvs)


def _apply(step: ProgramStep, buffer: torch.Tensor, scratch: torch.Tensor, reducer: Reducer) -> None:
    """After a step's transfers: reduce (or copy) what landed in scratch into the buffer."""
    for recv in step.recvs:
        if recv.scratch_offset < 0:
            continue
        at = recv.scratch_offset
        for start, end in recv.ranges:
            part = scratch[at : at + end - start]
            if recv.reduce:
                reducer(buffer[start:end], part)
            else:
                buffer[start:end].copy_(part)
            at += end - start


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
    `label` names the collective in errors (a callable is called only when one happens).
    """
    if scratch is None or scratch.numel() < plan.scratch_numel:
        scratch = buffer.new_empty(plan.scratch_numel)
    wait = getattr(transport, "wait_all", wait_all)
    steps = plan.steps
    count = len(steps)
    in_flight: list = [None] * count
    posted = 0
    for k in range(count):
        while posted < count and posted - k < plan.window and steps[posted].after < k:
            in_flight[posted] = _post(steps[posted], buffer, scratch, transport, tag_base)
            posted += 1
        step = steps[k]
        requests, in_flight[k] = in_flight[k], None
        if requests:
            try:
                wait(requests, deadline, functools.partial(_describe_request, step))
            except (CollectiveTimeoutError, TransportError) as error:
                name = label() if callable(label) else label
                raise type(error)(f"{name}, rank {plan.rank}, step {k}: {error}") from error
            _apply(step, buffer, scratch, reducer)


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
