"""Runs a schedule on a transport over a flat tensor: chunk slicing, scratch space and reductions.

A schedule is compiled once per (schedule, rank, element count) into a `Plan`: per step, the element ranges
each message covers, its tag, and where it lands (straight into the buffer for a contiguous overwrite, into
scratch for a reduction or a scattered chunk list). Executing a plan allocates one scratch buffer, posts each
step's transfers, waits with the collective's deadline, then applies the step's reductions.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from commlab.collectives.schedule import Schedule, chunk_bounds
from commlab.collectives.transport import Message, Transport, wait_all
from commlab.errors import CollectiveTimeoutError, TransportError

REDUCE_OPS = ("sum", "avg", "max", "min", "prod")

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
class TransferPlan:
    """One message of a step: peer, per-pair ordinal (the tag offset), element ranges and where it lands."""

    peer: int
    ordinal: int
    ranges: Ranges
    numel: int
    reduce: bool
    scratch_offset: int  # -1: the message is sent from / received into the buffer directly


@dataclass(frozen=True)
class StepPlan:
    sends: tuple[TransferPlan, ...]
    recvs: tuple[TransferPlan, ...]


@dataclass(frozen=True)
class Plan:
    """A schedule compiled for one rank and one buffer length."""

    rank: int
    numel: int
    steps: tuple[StepPlan, ...]
    scratch_numel: int
    tags_used: int  # the largest per-pair ordinal + 1: a collective needs this many tags


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
def compile_plan(schedule: Schedule, rank: int, numel: int) -> Plan:
    """Turn rank `rank`'s steps into element ranges, tags and scratch offsets for a `numel` buffer."""
    bounds = chunk_bounds(numel, schedule.num_chunks, schedule.num_blocks)
    sent: dict[int, int] = defaultdict(int)
    received: dict[int, int] = defaultdict(int)
    steps = []
    scratch_numel = 0
    for step in schedule.steps[rank]:
        offset = 0
        sends, recvs = [], []
        for recv in step.recvs:
            ranges = _merge(bounds, recv.chunks)
            size = sum(e - s for s, e in ranges)
            direct = not recv.reduce and len(ranges) <= 1
            recvs.append(
                TransferPlan(
                    recv.peer, received[recv.peer], ranges, size, recv.reduce, -1 if direct else offset
                )
            )
            received[recv.peer] += 1
            offset += 0 if direct else size
        for send in step.sends:
            ranges = _merge(bounds, send.chunks)
            size = sum(e - s for s, e in ranges)
            direct = len(ranges) <= 1
            sends.append(
                TransferPlan(send.peer, sent[send.peer], ranges, size, False, -1 if direct else offset)
            )
            sent[send.peer] += 1
            offset += 0 if direct else size
        scratch_numel = max(scratch_numel, offset)
        steps.append(StepPlan(tuple(sends), tuple(recvs)))
    tags = max([*sent.values(), *received.values(), 0])
    return Plan(rank, numel, tuple(steps), scratch_numel, tags)


def _region(buffer: torch.Tensor, scratch: torch.Tensor | None, transfer: TransferPlan) -> torch.Tensor:
    if transfer.scratch_offset >= 0:
        return scratch[transfer.scratch_offset : transfer.scratch_offset + transfer.numel]
    if not transfer.ranges:
        return buffer[:0]
    start, end = transfer.ranges[0]
    return buffer[start:end]


def execute(
    plan: Plan,
    buffer: torch.Tensor,
    transport: Transport,
    reducer: Reducer,
    deadline: float,
    tag_base: int = 0,
    label: str = "collective",
) -> None:
    """Run a compiled plan over the flat contiguous `buffer`, in place; every wait ends by `deadline`."""
    scratch = buffer.new_empty(plan.scratch_numel) if plan.scratch_numel else None
    for index, step in enumerate(plan.steps):
        sends, recvs, posted = [], [], []
        for recv in step.recvs:
            if recv.numel:
                recvs.append(Message(_region(buffer, scratch, recv), recv.peer, tag_base + recv.ordinal))
                posted.append(recv)
        for send in step.sends:
            if not send.numel:
                continue
            payload = _region(buffer, scratch, send)
            if send.scratch_offset >= 0:
                torch.cat([buffer[s:e] for s, e in send.ranges], out=payload)
            sends.append(Message(payload, send.peer, tag_base + send.ordinal))
        posted += [s for s in step.sends if s.numel]
        requests = transport.post(sends, recvs)
        try:
            wait_all(requests, deadline, functools.partial(_describe_request, posted, len(recvs)))
        except (CollectiveTimeoutError, TransportError) as error:
            raise type(error)(f"{label}, rank {plan.rank}, step {index}: {error}") from error
        for recv in step.recvs:
            if recv.scratch_offset < 0 or not recv.numel:
                continue
            piece = scratch[recv.scratch_offset : recv.scratch_offset + recv.numel]
            at = 0
            for start, end in recv.ranges:
                part = piece[at : at + end - start]
                if recv.reduce:
                    reducer(buffer[start:end], part)
                else:
                    buffer[start:end].copy_(part)
                at += end - start


def _describe(transfer: TransferPlan, is_recv: bool) -> str:
    what = (
        f"receive of {transfer.numel} elements from" if is_recv else f"send of {transfer.numel} elements to"
    )
    return f"{what} rank {transfer.peer}"


def _describe_request(posted: list[TransferPlan], num_recvs: int, index: int) -> str:
    """Name request `index` of a step (receives are posted first) for a timeout message."""
    return _describe(posted[index], index < num_recvs)
