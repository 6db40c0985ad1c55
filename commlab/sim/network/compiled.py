"""A schedule compiled to arrays for the simulator: steps, matched messages and their chunks.

The k-th send from rank a to rank b is matched with the k-th receive on b from a (the schedule IR's rule),
here with one stable sort instead of a loop. Send and receive counts per pair are checked; that both ends
name the same chunks is the checker's job (`commlab.collectives.schedule.verify`), and the plan takes the
sender's chunk ids. A message's size in bytes depends on the buffer size, so the
plan keeps each message's chunk ids and `message_bytes` turns them into bytes for a given size.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from operator import attrgetter

import numpy as np

from commlab.collectives.schedule import Schedule, chunk_bounds
from commlab.errors import ScheduleError, invalid
from commlab.shared.ops import BLOCKED_OPS


@dataclass(frozen=True)
class CompiledSchedule:
    """Arrays of one schedule. Steps are numbered rank by rank; messages in (sender, receiver) order."""

    schedule: Schedule
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


def usable_bytes(schedule: Schedule, nbytes: int, itemsize: int) -> int:
    """`nbytes` rounded down to whole elements, and for blocked ops to a multiple of world_size elements
    (as nccl-tests rounds counts), so the buffer splits into the schedule's blocks."""
    if nbytes < 0:
        raise invalid("nbytes", nbytes, "a number of bytes >= 0")
    numel = nbytes // itemsize
    if schedule.op in BLOCKED_OPS:
        numel -= numel % schedule.world_size
    return numel * itemsize


def compile_schedule(schedule: Schedule) -> CompiledSchedule:
    """Match every send with its receive and lay the schedule out as arrays (raises on a mismatch)."""
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
    s_order = np.argsort(send_key, kind="stable")
    r_order = np.argsort(recv_key, kind="stable")
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

    msg_src_step = send_step[s_order]
    msg_dst_step = recv_step[r_order]
    m = len(sends)
    ends = np.concatenate([msg_src_step, msg_dst_step])
    owners = np.concatenate([np.arange(m), np.arange(m)])
    order = np.argsort(ends, kind="stable")
    step_msg_ptr = np.zeros(len(all_steps) + 1, np.int64)
    np.cumsum(np.bincount(ends, minlength=len(all_steps)), out=step_msg_ptr[1:])
    return CompiledSchedule(
        schedule=schedule,
        step_ptr=step_ptr,
        step_rank=step_rank,
        msg_src=step_rank[msg_src_step],
        msg_dst=step_rank[msg_dst_step],
        msg_src_step=msg_src_step,
        msg_dst_step=msg_dst_step,
        msg_send_pos=send_pos[s_order],
        msg_recv_pos=recv_pos[r_order],
        msg_reduce=recv_reduce[r_order],
        chunk_ptr=chunk_ptr,
        chunk_ids=chunk_ids,
        step_msg_ptr=step_msg_ptr,
        step_msgs=owners[order],
    )


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
