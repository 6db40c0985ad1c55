"""A schedule compiled to arrays for the simulator: steps, matched messages and their chunks.

The k-th send from rank a to rank b is matched with the k-th receive on b from a (the schedule IR's rule),
here with one stable sort instead of a loop. Send and receive counts per pair are checked; that both ends
name the same chunks is the checker's job (`commlab.collectives.schedule.verify`), and the plan takes the
sender's chunk ids. A message's size in bytes depends on the buffer size, so the
plan keeps each message's chunk ids and `message_bytes` turns them into bytes for a given size.

An `ArraySchedule` (the IR as rows of transfers) compiles without building step objects: its steps are the
distinct (rank, slot) pairs, and each row is its own message (`_compile_rows`), laid out in the very order
the object path gives, so both paths give equal arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from operator import attrgetter

import numpy as np

from commlab.collectives.array_schedule import ArraySchedule
from commlab.collectives.schedule import Schedule, chunk_bounds
from commlab.errors import ScheduleError, invalid
from commlab.shared.ops import BLOCKED_OPS
from commlab.shared.sorting import stable_argsort


@dataclass(frozen=True)
class CompiledSchedule:
    """Arrays of one schedule. Steps are numbered rank by rank; messages in (sender, receiver) order."""

    schedule: Schedule | ArraySchedule
    step_ptr: np.ndarray  # rank r's steps are step_ptr[r]:step_ptr[r+1]
    step_rank: np.ndarray
    msg_src: np.ndarray  # sending rank
    msg_dst: np.ndarray  # receiving rank
    msg_src_step: np.ndarray  # the sender's step holding the message
    msg_dst_step: np.ndarray  # the receiver's step holding it
    msg_send_pos: np.ndarray  # position among the sender step's sends (posting order)
    msg_recv_pos: np.ndarray  # position among the receiver step's receives
    msg_reduce: np.ndarray  # the receive adds into its chunks
    chunk_ptr: np.ndarray  # message m carries chunk_ids[chunk_ptr[m]:chunk_ptr[m+1]]
    chunk_ids: np.ndarray
    step_msg_ptr: np.ndarray  # step s touches messages step_msgs[step_msg_ptr[s]:step_msg_ptr[s+1]]
    step_msgs: np.ndarray

    @property
    def world_size(self) -> int:
        return self.schedule.world_size

    @property
    def num_steps(self) -> int:
        return len(self.step_rank)

    @property
    def num_messages(self) -> int:
        return len(self.msg_src)

    @property
    def step_index(self) -> np.ndarray:
        """Each step's index within its rank's list."""
        return np.arange(self.num_steps) - self.step_ptr[self.step_rank]

    def step_next(self) -> np.ndarray:
        """The step after each step on the same rank, or -1 for a rank's last step."""
        nxt = np.arange(1, self.num_steps + 1)
        nxt[self.step_ptr[1:][self.step_ptr[1:] > self.step_ptr[:-1]] - 1] = -1
        return nxt

    def chunk_bytes(self, nbytes: int, itemsize: int) -> np.ndarray:
        """Bytes of every chunk when the buffer (per rank, or total for blocked ops) is `nbytes`."""
        s = self.schedule
        numel = nbytes // itemsize
        if s.op == "alltoall":  # nbytes is a rank's input; the IR's buffer is p x p blocks of n/p
            numel *= s.world_size
        bounds = np.asarray(chunk_bounds(numel, s.num_chunks, s.num_blocks), np.int64)
        return (bounds[:, 1] - bounds[:, 0]) * itemsize

    def message_bytes(self, chunk_bytes: np.ndarray) -> np.ndarray:
        """Bytes of every message given the bytes of every chunk."""
        if self.num_messages == 0:
            return np.zeros(0, np.int64)
        if np.all(chunk_bytes == chunk_bytes[0]):
            return np.diff(self.chunk_ptr) * chunk_bytes[0]
        return np.add.reduceat(chunk_bytes[self.chunk_ids], self.chunk_ptr[:-1])


def usable_bytes(schedule: Schedule | ArraySchedule, nbytes: int, itemsize: int) -> int:
    """`nbytes` rounded down to whole elements, and for blocked ops to a multiple of world_size elements
    (as nccl-tests rounds counts), so the buffer splits into the schedule's blocks."""
    if nbytes < 0:
        raise invalid("nbytes", nbytes, "a number of bytes >= 0")
    numel = nbytes // itemsize
    if schedule.op in BLOCKED_OPS:
        numel -= numel % schedule.world_size
    return numel * itemsize


def compile_schedule(schedule: Schedule | ArraySchedule) -> CompiledSchedule:
    """Match every send with its receive and lay the schedule out as arrays (raises on a mismatch)."""
    if isinstance(schedule, ArraySchedule):
        return _compile_rows(schedule)
    p = schedule.world_size
    step_counts = np.fromiter((len(steps) for steps in schedule.steps), np.int64, p)
    step_ptr = np.zeros(p + 1, np.int64)
    np.cumsum(step_counts, out=step_ptr[1:])
    step_rank = np.repeat(np.arange(p), step_counts)
    all_steps = [step for steps in schedule.steps for step in steps]

    steps = np.arange(len(all_steps))
    sends = [s for step in all_steps for s in step.sends]
    send_step = np.repeat(steps, [len(step.sends) for step in all_steps])
    send_peer = np.fromiter(map(attrgetter("peer"), sends), np.int64, len(sends))
    send_chunks = list(map(attrgetter("chunks"), sends))
    send_count = np.fromiter(map(len, send_chunks), np.int64, len(sends))

    recvs = [r for step in all_steps for r in step.recvs]
    recv_step = np.repeat(steps, [len(step.recvs) for step in all_steps])
    recv_peer = np.fromiter(map(attrgetter("peer"), recvs), np.int64, len(recvs))
    recv_reduce = np.fromiter(map(attrgetter("reduce"), recvs), bool, len(recvs))

    send_pos = _position_in_group(send_step)
    recv_pos = _position_in_group(recv_step)
    send_key = step_rank[send_step] * p + send_peer
    recv_key = recv_peer * p + step_rank[recv_step]
    s_order = stable_argsort(send_key)
    r_order = stable_argsort(recv_key)
    if len(sends) != len(recvs) or not np.array_equal(send_key[s_order], recv_key[r_order]):
        raise ScheduleError(_mismatch(send_key, recv_key, p))

    chunk_ptr_sends = np.zeros(len(sends) + 1, np.int64)
    np.cumsum(send_count, out=chunk_ptr_sends[1:])
    chunk_flat = np.fromiter(chain.from_iterable(send_chunks), np.int64, int(chunk_ptr_sends[-1]))
    # Reorder the chunk lists into message order.
    counts = send_count[s_order]
    chunk_ptr = np.zeros(len(sends) + 1, np.int64)
    np.cumsum(counts, out=chunk_ptr[1:])
    starts = chunk_ptr_sends[:-1][s_order]
    offsets = np.arange(int(chunk_ptr[-1])) - np.repeat(chunk_ptr[:-1], counts)
    chunk_ids = chunk_flat[np.repeat(starts, counts) + offsets] if len(offsets) else chunk_flat[:0]

    return _assemble(
        schedule,
        step_ptr,
        step_rank,
        send_step[s_order],
        recv_step[r_order],
        send_pos[s_order],
        recv_pos[r_order],
        recv_reduce[r_order],
        chunk_ptr,
        chunk_ids,
    )


def _assemble(
    schedule: Schedule | ArraySchedule,
    step_ptr: np.ndarray,
    step_rank: np.ndarray,
    msg_src_step: np.ndarray,
    msg_dst_step: np.ndarray,
    msg_send_pos: np.ndarray,
    msg_recv_pos: np.ndarray,
    msg_reduce: np.ndarray,
    chunk_ptr: np.ndarray,
    chunk_ids: np.ndarray,
) -> CompiledSchedule:
    """The plan from its messages (in message order): each step's messages indexed both ways."""
    m, num_steps = len(msg_src_step), len(step_rank)
    ends = np.concatenate([msg_src_step, msg_dst_step])  # entry i < m is message i's send, i >= m its receive
    order = _stable_order(ends)
    if order is None:
        step_msgs = np.concatenate([np.arange(m), np.arange(m)])
    else:  # the message owning each entry, in place: the order's entries i >= m are message i - m
        step_msgs = order
        step_msgs[step_msgs >= m] -= m
    step_msg_ptr = np.zeros(num_steps + 1, np.int64)
    np.cumsum(np.bincount(ends, minlength=num_steps), out=step_msg_ptr[1:])
    return CompiledSchedule(
        schedule=schedule,
        step_ptr=step_ptr,
        step_rank=step_rank,
        msg_src=step_rank[msg_src_step],
        msg_dst=step_rank[msg_dst_step],
        msg_src_step=msg_src_step,
        msg_dst_step=msg_dst_step,
        msg_send_pos=msg_send_pos,
        msg_recv_pos=msg_recv_pos,
        msg_reduce=msg_reduce,
        chunk_ptr=chunk_ptr,
        chunk_ids=chunk_ids,
        step_msg_ptr=step_msg_ptr,
        step_msgs=step_msgs,
    )


def _stable_order(keys: np.ndarray) -> np.ndarray | None:
    """A stable sorting permutation of `keys`, or None when they are already sorted (no sort paid)."""
    if len(keys) < 2 or bool(np.all(keys[1:] >= keys[:-1])):
        return None
    return stable_argsort(keys)


def _take(values: np.ndarray, order: np.ndarray | None) -> np.ndarray:
    return values if order is None else values[order]


def _group_positions(group: np.ndarray, order: np.ndarray | None) -> np.ndarray:
    """Each element's position among the elements of its group (equal values), in array order, given
    `order = _stable_order(group)`."""
    positions = _position_in_group(_take(group, order))
    if order is None:
        return positions
    out = np.empty_like(positions)
    out[order] = positions
    return out


def _compile_rows(schedule: ArraySchedule) -> CompiledSchedule:
    """`compile_schedule` of the rows' Schedule, without building it (see the module docstring).

    Steps are numbered rank by rank, slots ascending; a row's position in its sender's step counts the
    rows before it with that sender and slot (likewise at the receiver); messages are ordered as the
    object path orders them: by (sender, receiver), then the sender's step and position.
    """
    p, s = schedule.world_size, schedule
    slots = int(s.slot.max()) + 1 if len(s.slot) else 1
    send_key, recv_key = s.src * slots + s.slot, s.dst * slots + s.slot
    distinct, index = _step_index(np.concatenate([send_key, recv_key]), p * slots)
    m = len(s.src)
    send_step, recv_step = index[:m], index[m:]
    step_rank = distinct // slots
    step_ptr = np.zeros(p + 1, np.int64)
    np.cumsum(np.bincount(step_rank, minlength=p), out=step_ptr[1:])
    enumeration = _stable_order(send_step)
    send_pos = _group_positions(send_step, enumeration)
    recv_pos = _group_positions(recv_step, _stable_order(recv_step))
    # Sends enumerated in (step, position) order, then stably by (sender, receiver): the object order.
    pair = _take(s.src * p + s.dst, enumeration)
    by_pair = _stable_order(pair)
    order = by_pair if enumeration is None else enumeration if by_pair is None else enumeration[by_pair]
    counts = np.diff(s.chunk_ptr)
    if order is None:
        chunk_ptr, chunk_ids = s.chunk_ptr, s.chunk_ids
    elif np.all(counts == 1):
        chunk_ptr, chunk_ids = s.chunk_ptr, s.chunk_ids[order]
    else:
        counts = counts[order]
        chunk_ptr = np.zeros(m + 1, np.int64)
        np.cumsum(counts, out=chunk_ptr[1:])
        offsets = np.arange(int(chunk_ptr[-1])) - np.repeat(chunk_ptr[:-1], counts)
        chunk_ids = s.chunk_ids[np.repeat(s.chunk_ptr[:-1][order], counts) + offsets]
    return _assemble(
        schedule,
        step_ptr,
        step_rank,
        _take(send_step, order),
        _take(recv_step, order),
        _take(send_pos, order),
        _take(recv_pos, order),
        _take(s.reduce, order),
        chunk_ptr,
        chunk_ids,
    )


def _step_index(keys: np.ndarray, bound: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct keys in [0, bound) and each key's index among them (a marking pass when the bound
    is small next to the number of keys, a sort otherwise: the pass costs O(bound))."""
    if bound > max(1 << 20, 4 * len(keys)):
        distinct, inverse = np.unique(keys, return_inverse=True)
        return distinct, inverse.astype(np.int64).ravel()
    present = np.zeros(bound, bool)
    present[keys] = True
    distinct = np.flatnonzero(present)
    rank = np.cumsum(present) - 1
    return distinct, rank[keys]


def _position_in_group(group: np.ndarray) -> np.ndarray:
    """For a non-decreasing array, each element's position within its run of equal values."""
    if len(group) == 0:
        return group
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    lengths = np.diff(np.r_[starts, len(group)])
    return np.arange(len(group)) - np.repeat(starts, lengths)


def _mismatch(send_key: np.ndarray, recv_key: np.ndarray, p: int) -> str:
    sends = dict(zip(*(a.tolist() for a in np.unique(send_key, return_counts=True)), strict=True))
    recvs = dict(zip(*(a.tolist() for a in np.unique(recv_key, return_counts=True)), strict=True))
    key = next(k for k in sorted(set(sends) | set(recvs)) if sends.get(k, 0) != recvs.get(k, 0))
    a, b = divmod(key, p)
    return (
        f"rank {a} sends {sends.get(key, 0)} messages to rank {b}, which receives {recvs.get(key, 0)} "
        "from it: every send needs its matching receive"
    )
