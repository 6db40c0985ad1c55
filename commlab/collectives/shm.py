"""The transport over shared memory, for the ranks of a torch.distributed group that share one host.

One segment per transport (see `shm_segment`) holds a ring buffer for every ordered pair of ranks. A
message is a 16-byte header (tag, byte count) and its payload, padded to 16 bytes, streamed through the
ring: the sender copies as much as there is room for (in pieces of at most COPY_BYTES, publishing each) and
the receiver copies out what has arrived, so a message of any length passes through a ring of any size.
Each ring has two counters, each written by one side only: `head` (bytes written, by the sender) and
`tail` (bytes consumed, by the receiver). A send is complete once its last byte is in the ring (eager), a
receive once its last byte is in the receiving tensor. Messages between a pair are matched in order, and
each header's tag and size are checked against the posted receive (a mismatch raises TransportError).

Messages of CMA_MIN_BYTES or more travel as a descriptor (tag, size, the sender's address) instead, and
the receiver copies the bytes straight out of the sender's memory (`cma`, process_vm_readv: one copy
instead of two); the send completes when the receiver has passed the descriptor. Each receiver probes
whether it may read a peer's memory once both have joined and writes its answer beside the pair's tail
(`Layout.can_read_word`); a long send waits for that answer (it waits for the receiver anyway) and goes
through the ring where the answer is no. The receiver tells the two forms apart by the header.

A receive may reduce on receipt (`Message.reduce`, `reduces_on_receipt`): the bytes are added into the
receiving tensor instead of stored in it. From a ring the reduction reads the ring itself (no copy out);
from a descriptor the receiver reads the sender's memory in pieces of REDUCE_PIECE_BYTES into a scratch
that stays in cache and adds each piece while it is there, so the reduction reads one operand from
cache instead of a whole message's scratch from DRAM (and no scratch is written back). The piece size
is measured (benchmarks/shm_bandwidth.py): smaller pieces pay a system call and a torch add per piece
(~6 us each), larger ones fall out of the caches.

A bound program (executor.BoundProgram) prepares its steps once (`prepare`: the messages checked, the
transfer objects made) and starts them each call (`start`, with the call's reducer), as MPI's persistent
requests do; `post` checks and makes them afresh, for one-off transfers.

Progress happens in the calling thread: posting and every wait move every posted transfer as far as the
rings allow (as an MPI progress engine does), so a wait never blocks a transfer another step needs.
Waiting polls the counters: on the main thread a short spin (none when the host runs more ranks than it has
cores), then `sched_yield` between polls, then naps that double from NAP_MIN_S to NAP_MAX_S; a worker
thread naps at once (spinning there would hold the GIL against the training loop). So a message that
arrives quickly costs no system call, and a long wait costs little CPU. While waiting it checks, every
CHECK_S, that the peers it waits for still run (their state word in the segment, and /proc) and raises
TransportError naming a dead or failed peer; past the deadline it raises CollectiveTimeoutError naming
the transfer. After a failure the transport is unusable (as a gloo group is after a timeout) and marks
itself FAILED in the segment, so its peers stop waiting at once.

Ordering: x86-64 keeps stores in order and loads in order, so payload bytes written before a counter are
visible before it; a locked instruction (a lock acquire) after each copy also orders the non-temporal
stores that large memcpys use.

`SharedMemoryTransport(group)` is not collective: each rank joins the group's segment through the group's
c10d Store on its own (`shm_setup.join_segment`) and writes its process id into the segment; a peer that
has not joined yet is simply a peer whose messages have not arrived, waited for only by the transfers
and argument checks that need it, with their deadline (the error then says the peer never joined). So a
program whose ranks first use their groups in different orders, or that sends between two ranks of a
bigger group, waits for nothing gloo would not wait for. `SharedMemoryTransport.over_backend` sets up
collectively over a raw c10d Backend instead (the torch backend's private gloo, made at group creation;
see `shm_setup`). After setup nothing travels over the group or backend. `communicator()` picks the
transport for a gloo group on one host unless $COMMLAB_SHM=0 (see `shm_enabled`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import mmap
import os
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist

from commlab.collectives import cma as cma_module
from commlab.collectives import futex
from commlab.collectives import shm_segment as seg
from commlab.collectives.cost import CostModel
from commlab.collectives.hosts import host_map_from_env
from commlab.collectives.shm_setup import (
    SETUP_FAILED,
    BackendChannel,
    GroupChannel,
    SetupChannel,
    absent_key,
    group_store,
    join_segment,
)
from commlab.collectives.transport import Message, TorchRequest
from commlab.errors import CollectiveTimeoutError, CommlabError, TransportError, invalid

SHM_ENV = "COMMLAB_SHM"  # 1: use shared memory within a host for gloo groups, 0: never
DEFAULT_ON = True  # what communicator() does when $COMMLAB_SHM is unset (see docs/design.md)

COPY_BYTES = 1 << 20  # a sender publishes its progress at least every this many bytes
SPIN_S = 50e-6  # the main thread polls without pause this long, when cores are not oversubscribed
YIELD_S = 50e-6  # then yields the processor between polls this long (when not oversubscribed)
NAP_MIN_S = 20e-6  # without futexes: naps between polls, doubling from this...
NAP_MAX_S = 1e-3  # ...to this
CHECK_S = 0.05  # how often a waiting rank checks that its peers still run
MAX_GATHER = seg.GATHER_WORDS - 1
CMA_ENV = "COMMLAB_SHM_CMA"  # 0: every message through the rings, even where cma works
CMA_MIN_BYTES = 64 << 10  # messages this long or longer are read from the sender's memory (see cma)
REDUCE_PIECE_BYTES = 1 << 20  # a reducing cma receive reads and adds this much at a time (in cache)

_memmove = ctypes.memmove  # a plain memcpy with the GIL released; torch's copy_ costs more per call

SHM_COST_MODEL = CostModel(alpha=10e-6, beta=1 / 5e9, gamma=1 / 4e9)
"""Python-driven shared memory: about 10 us per message, two 10 GB/s copies per byte, 4 GB/s reduction."""


class NotOneHostError(CommlabError):
    """The ranks of a group are not all on one host, so they cannot share memory."""


def shm_enabled(environ: dict[str, str] | None = None, default: bool = DEFAULT_ON) -> bool:
    """Whether $COMMLAB_SHM allows the shared-memory transport ('1' on, '0' off, unset: `default`).

    `communicator()` passes DEFAULT_ON; the torch backend passes True (its setup is collective anyway).
    """
    value = (environ if environ is not None else os.environ).get(SHM_ENV, "").strip()
    if value == "":
        return default
    if value not in ("0", "1"):
        raise invalid(SHM_ENV, value, "'1' (shared memory within a host) or '0' (never)")
    return value == "1"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def default_ring_bytes(size: int) -> int:
    """Ring bytes per ordered pair: at most 32 MiB in all, 64 KiB to 8 MiB each, a power of two."""
    pairs = max(size * (size - 1), 1)
    ring = 1 << 16
    while ring * 2 <= min(8 << 20, (32 << 20) // pairs):
        ring *= 2
    return ring


class _Transfer:
    """One posted send or receive: the bytes, the peer, the tag, and how far it has got."""

    __slots__ = (
        "address", "cma", "data", "done", "footprint", "header", "nbytes", "peer", "reduce", "release",
        "tag", "transport", "wants_cma",
    )  # fmt: skip

    def __init__(
        self,
        transport: SharedMemoryTransport,
        tensor: torch.Tensor,
        peer: int,
        tag: int,
        cma: bool,
        reduce: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    ) -> None:
        self.transport = transport
        self.data = tensor  # kept alive until the transfer completes
        self.address = tensor.data_ptr()
        self.nbytes = tensor.numel() * tensor.element_size()
        # a send: it may travel as a descriptor (the receiver then reads the bytes from the sender's memory)
        # if the receiver says it can read this rank; a receive: set when the header says it came so
        self.wants_cma = cma
        self.peer = peer
        self.tag = tag
        self.reset(reduce)

    def reset(self, reduce: Callable[[torch.Tensor, torch.Tensor], None] | None) -> None:
        """The transfer as first posted (and a prepared one again at each start: `prepare`).

        `reduce`: a receive that reduces into `data` instead of overwriting it."""
        self.cma = self.wants_cma
        self.footprint = -(-self.nbytes // 16) * 16  # payload bytes in the ring, padded (0 for a descriptor)
        self.header = False
        self.done = 0  # footprint bytes moved
        self.release = 0  # a cma send: the tail the receiver must pass (it has read the bytes); then 0
        self.reduce = reduce

    @property
    def complete(self) -> bool:
        return self.header and self.done == self.footprint and self.release == 0

    def wait(self, timeout: float) -> None:
        self.transport.wait_all(
            [self], time.monotonic() + timeout, lambda _: f"transfer with rank {self.peer}"
        )


def _reduce_marker(tensor: torch.Tensor, incoming: torch.Tensor) -> None:
    """Stands for the call's reducer in a prepared receive until `start` gives the real one."""
    raise AssertionError("a prepared reducing receive ran without the call's reducer")


class _Prepared:
    """A step's transfers made once (`SharedMemoryTransport.prepare`): receives first, then sends."""

    __slots__ = ("flags", "recvs", "reduces", "transfers")

    def __init__(self, transfers: list[_Transfer], recvs: int, fused: list[bool]) -> None:
        self.transfers = transfers
        self.recvs = recvs
        self.flags = fused + [False] * (len(transfers) - recvs)  # per transfer: reduces on receipt
        self.reduces = any(fused)


class SharedMemoryTransport:
    """Point-to-point through shared memory between the ranks of a gloo `group` on one host.

    `group`: the torch.distributed group (default: the world), which must use gloo; `timeout`: default
    seconds per collective (default: the group's); `ring_bytes`: ring size per ordered pair of ranks (a
    multiple of 16, at least 4096; default `default_ring_bytes`); `cma`: read long messages from the
    sender's memory where the OS allows (default: yes unless $COMMLAB_SHM_CMA=0); `channel`: set up
    collectively over it instead of joining through `group`'s Store (see `shm_setup`; `over_backend` makes
    one). Joining raises TransportError on a rank that cannot map the group's segment (another host);
    the collective setup raises NotOneHostError if the ranks are on several hosts. `close()` releases
    the segment (also at garbage collection).
    """

    device_type = "cpu"
    backend = "shm"  # no shipped calibration: `auto` prices algorithms with cost_model
    cost_model = SHM_COST_MODEL
    piece_bytes = 0  # copies run on the caller's thread: slices add messages, not overlap
    reduces_on_receipt = True  # a receive may carry Message.reduce (see the module docstring)
    _reduce_pieces: dict[torch.dtype, torch.Tensor] | None = None  # scratch of _read_and_reduce, per dtype
    max_tag = (1 << 62) - 1

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        timeout: float | None = None,
        ring_bytes: int | None = None,
        cma: bool | None = None,
        *,
        channel: SetupChannel | None = None,
    ) -> None:
        joining = channel is None
        if channel is None:
            channel = GroupChannel(group)
        elif group is not None:
            raise invalid("group", group, "None when a setup channel is given (the channel names the group)")
        self.group: dist.ProcessGroup | None = getattr(channel, "group", None)  # None over a raw Backend
        self.rank = channel.rank
        self.size = channel.size
        if timeout is not None and not timeout > 0:
            raise invalid("timeout", timeout, "a positive number of seconds, or None for the group's own")
        ring = default_ring_bytes(self.size) if ring_bytes is None else ring_bytes
        if not isinstance(ring, int) or ring < 4096 or ring % 16:
            raise invalid("ring_bytes", ring_bytes, "an integer >= 4096 and a multiple of 16, or None")
        self.global_ranks = list(channel.global_ranks)
        self.hosts = host_map_from_env(self.global_ranks)
        self.default_timeout = float(timeout) if timeout is not None else channel.timeout
        self.layout = seg.Layout(self.size, ring)
        self._index_pairs()
        spare = self.size <= _cores()  # spinning or yielding only helps where every rank has a core
        self.spin, self.yield_s = (SPIN_S, YIELD_S) if spare else (0.0, 0.0)
        self._broken: str | None = None
        self._gathers = 0
        self._fence = threading.Lock()
        self._sends: dict[int, deque[_Transfer]] = {}
        self._recvs: dict[int, deque[_Transfer]] = {}
        self._heads = [0] * self.size  # my sends' head counters (I am their only writer)
        self._posted = [0] * self.size  # messages posted to each peer, ever (for `discard`)
        self._consumed = [0] * self.size  # messages from each peer whose header this rank has read
        self._hold_receives = False  # while the argument check is open: receives wait (see `discard`)
        self._tails = [0] * self.size  # my receives' tail counters
        self._mm: mmap.mmap | None = None
        self._pid = os.getpid()
        self._known_pids = [0] * self.size
        self._unprobed = set(range(self.size)) - {self.rank}  # peers not yet told if this rank can read them
        want_cma = (os.environ.get(CMA_ENV, "1") != "0") if cma is None else bool(cma)
        self.cma = want_cma and cma_module.AVAILABLE  # this rank reads peers' memory where they allow
        self._store: dist.Store | None = None
        self._prefix = ""
        self._path = ""
        self._unlinked = False
        if joining:
            self._store, self._prefix = group_store(channel.group)
            self._mm, self._path = join_segment(
                self._store, self._prefix, self.rank, self.layout.total_bytes, self.default_timeout,
                channel.describe(),
            )  # fmt: skip
            self._map_views()
        else:
            self._setup(channel)
            self._unlinked = True  # rank 0 unlinked it once every rank had mapped it
        self._join()

    @classmethod
    def over_backend(
        cls,
        backend: torch._C._distributed_c10d.Backend,
        rank: int,
        size: int,
        timeout: float,
        global_ranks: list[int] | None = None,
        ring_bytes: int | None = None,
        cma: bool | None = None,
    ) -> SharedMemoryTransport:
        """The transport of the ranks of a c10d `backend` (not a registered group), set up over it.

        Collective over the backend. `rank`, `size`: this rank's and the group's, as the backend knows
        them; `timeout`: seconds per setup exchange and default per collective; `global_ranks`: the
        group's ranks in the world, for the host map (default 0..size-1).
        """
        channel = BackendChannel(backend, rank, size, timeout, global_ranks)
        return cls(timeout=timeout, ring_bytes=ring_bytes, cma=cma, channel=channel)

    # ----- setup and teardown -----

    def _group_call(self, what: str, work: dist.Work) -> None:
        try:
            TorchRequest(work).wait(self.default_timeout)
        except (CollectiveTimeoutError, TransportError) as error:
            raise type(error)(f"setting up the shared-memory transport ({what}): {error}") from error

    def _setup(self, channel: SetupChannel) -> None:
        """Collectively: gather pids and host ids over the channel, make or map the segment, unlink it."""
        me = os.getpid()
        host = int.from_bytes(hashlib.blake2b(seg.host_identity(), digest_size=7).digest(), "little")
        mine = torch.tensor([me, seg.start_time(me) or 0, host], dtype=torch.int64)
        table = torch.zeros(3 * self.size, dtype=torch.int64)
        self._group_call("gathering process ids", channel.allgather(table, mine))
        rows = table.view(self.size, 3).tolist()
        if len({row[2] for row in rows}) > 1:
            raise NotOneHostError(
                f"the ranks of {channel.describe()} are on more than one host: no shared memory"
            )
        pids = [row[0] for row in rows]

        def path_of(token: int) -> str:
            return seg.segment_path(pids[0], token)

        nbytes = self.layout.total_bytes
        token = torch.zeros(1, dtype=torch.int64)
        failure = ""
        if self.rank == 0:
            seg.sweep_stale()
            try:
                token[0] = seg.new_token()
                self._mm = seg.create(path_of(int(token[0])), nbytes)
                self._map_views()
            except OSError as error:
                token[0], failure = -1, f"rank 0 could not create a {nbytes}-byte segment: {error}"
        self._group_call("agreeing on the segment", channel.broadcast(token))
        if self.rank != 0 and int(token[0]) > 0:
            try:
                self._mm = seg.attach(path_of(int(token[0])), nbytes)
                self._map_views()
            except (OSError, TransportError) as error:
                failure = f"rank {self.rank} could not map the segment: {error}"
        ok = torch.tensor([0 if failure or int(token[0]) <= 0 else 1], dtype=torch.int64)
        oks = torch.zeros(self.size, dtype=torch.int64)
        try:
            self._group_call("mapping the segment", channel.allgather(oks, ok))
        finally:
            if self.rank == 0 and int(token[0]) > 0:
                seg.unlink(path_of(int(token[0])))  # every rank has it mapped (or gave up): nothing to leak
        if not bool(oks.all()):
            bad = [r for r, v in enumerate(oks.tolist()) if not v]
            raise TransportError(
                f"shared-memory transport setup failed on ranks {bad}" + (f": {failure}" if failure else "")
            )
        self._path = path_of(int(token[0]))

    def _map_views(self) -> None:
        """Views of the mapped segment; this rank's base address (for the cma probe), pid and start time
        go into its status line."""
        assert self._mm is not None
        self._words = np.frombuffer(self._mm, dtype=np.int64)
        self._ints = np.frombuffer(self._mm, dtype=np.int32)
        self._bytes = torch.frombuffer(self._mm, dtype=torch.uint8)
        self._base_address = self._bytes.data_ptr()
        layout, words = self.layout, self._words
        words[layout.base_word(self.rank)] = self._base_address
        words[layout.pid_word(self.rank)] = self._pid
        words[layout.started_word(self.rank)] = seg.start_time(self._pid) or 0

    def _join(self) -> None:
        """Raise this rank's joined flag (after its status line), unlink the file once every rank has
        joined, and answer the cma question for the peers already there."""
        words, layout = self._words, self.layout
        with self._fence:
            pass
        words[layout.joined_word(self.rank)] = 1
        with self._fence:  # store, fence, load: of two ranks joining last, at least one sees both flags
            pass
        self._unlink_if_all_joined()
        for peer in range(self.size):
            if peer != self.rank:
                self._probe(peer)

    def _joined(self, rank: int) -> bool:
        return bool(self._words[self.layout.joined_word(rank)])

    def _unlink_if_all_joined(self) -> None:
        if not self._unlinked and all(self._joined(r) for r in range(self.size)):
            seg.unlink(self._path)  # every rank has it mapped: the name is no longer needed
            self._unlinked = True

    def _probe(self, peer: int) -> None:
        """Once `peer` has joined: say, beside the tail of the ring peer -> this rank, whether this rank
        can read `peer`'s memory. A real read through the permission check (ptrace rules, containers) a
        message would meet: the peer's base address, from the peer's own memory, against its copy here."""
        if peer not in self._unprobed or not self._joined(peer):
            return
        layout, words = self.layout, self._words
        ok = False
        if self.cma:
            word = layout.base_word(peer)
            remote_base = int(words[word])
            probe = np.zeros(1, dtype=np.int64)
            pid = int(words[layout.pid_word(peer)])
            got = cma_module.read(pid, remote_base + word * 8, probe.ctypes.data, 8)
            ok = got == 8 and int(probe[0]) == remote_base
        self._unprobed.discard(peer)
        self._publish(layout.can_read_word(peer, self.rank), seg.CAN_READ if ok else seg.CANNOT_READ, peer)

    @property
    def pids(self) -> list[int]:
        """Each rank's process id (0 for a rank that has not joined yet)."""
        if self._mm is not None:
            self._known_pids = [int(self._words[self.layout.pid_word(r)]) for r in range(self.size)]
        return self._known_pids

    def close(self) -> None:
        """Mark this rank CLOSED in the segment and unmap it; later posts raise TransportError."""
        if self._mm is None:
            return
        if os.getpid() != self._pid:  # a forked child (a data loader worker): not this rank
            self._mm = None
            return
        self._unlink_if_all_joined()  # else a rank may still join: its maker unlinks it at exit at the latest
        self.pids  # noqa: B018 (kept for messages after close)
        self._words[self.layout.status_word(self.rank)] = seg.CLOSED if self._broken is None else seg.FAILED
        if self._broken is None:
            self._broken = "the transport was closed"
        self._ring_all()
        mm, self._mm = self._mm, None
        del self._words, self._ints, self._bytes
        self._sends.clear()
        self._recvs.clear()
        with contextlib.suppress(BufferError):  # a view still referenced: the mapping goes with it
            mm.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def _fail(self, reason: str) -> None:
        """Make the transport unusable and tell the peers (so they stop waiting for this rank)."""
        self._broken = reason
        if self._mm is not None:
            self._words[self.layout.status_word(self.rank)] = seg.FAILED
            self._ring_all()

    def _ring_all(self) -> None:
        for peer in range(self.size):
            if peer != self.rank:
                self._ring(peer)

    def _index_pairs(self) -> None:
        """Every counter and ring offset of this rank's pairs, looked up once (the hot path indexes lists
        instead of recomputing the layout's offsets: a few microseconds per call)."""
        layout, rank, peers = self.layout, self.rank, range(self.size)
        self._ring_bytes = layout.ring_bytes
        self._out_head = [layout.head_word(rank, p) for p in peers]  # my rings to each peer
        self._out_tail = [layout.tail_word(rank, p) for p in peers]
        self._out_ring = [layout.ring_offset(rank, p) for p in peers]
        self._out_can_read = [layout.can_read_word(rank, p) for p in peers]
        self._in_head = [layout.head_word(p, rank) for p in peers]  # each peer's ring to me
        self._in_tail = [layout.tail_word(p, rank) for p in peers]
        self._in_ring = [layout.ring_offset(p, rank) for p in peers]
        self._sleeping = [layout.waiting_word(p) for p in peers]

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise TransportError(
                f"the shared-memory transport (rank {self.rank}) is unusable: {self._broken}"
            )

    # ----- posting and progress -----

    def post(self, sends: list[Message], recvs: list[Message]) -> list[_Transfer]:
        """Queue the receives and sends of one step and move what can move now (small sends complete)."""
        self._check_usable()
        out = [self._transfer(m, False, m.reduce) for m in recvs]
        out += [self._transfer(m, True, None) for m in sends]
        self._queue(out, len(recvs))
        self._progress()
        return out

    def _transfer(self, m: Message, sending: bool, reduce: Callable | None) -> _Transfer:
        """A checked transfer of message `m` (ValueError-style errors name the bad argument)."""
        tensor = m.tensor
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise invalid(
                "tensor", f"{tensor.device} contiguous={tensor.is_contiguous()}", "contiguous CPU tensors"
            )
        if not 0 <= m.peer < self.size or m.peer == self.rank:
            raise invalid("peer", m.peer, f"another rank of 0..{self.size - 1}")
        cma = sending and self.cma and tensor.numel() * tensor.element_size() >= CMA_MIN_BYTES
        if reduce is not None and tensor.dim() != 1:
            raise invalid("tensor", f"{tensor.dim()}-d", "a 1-d tensor for a reducing receive")
        return _Transfer(self, tensor, m.peer, m.tag, cma, reduce)

    def _queue(self, transfers: list[_Transfer], recvs: int) -> None:
        """Append transfers (the first `recvs` receives, then sends) to their peers' queues."""
        for index, transfer in enumerate(transfers):
            peer = transfer.peer
            queues = self._recvs if index < recvs else self._sends
            queue = queues.get(peer)
            if queue is None:
                queue = queues[peer] = deque()
            queue.append(transfer)
            if index >= recvs:
                self._posted[peer] += 1

    # ----- persistent steps: checked once, started each call (the executor's bound programs) -----

    def prepare(
        self, sends: list[Message], recvs: list[Message], fused: list[bool] | None = None
    ) -> _Prepared:
        """A step's transfers checked and made once, for `start` to run again each call.

        `fused[i]`: receive i reduces into its tensor (with the reducer given to `start`) instead of
        overwriting it. What a call then costs is resetting and queueing its transfers: no argument
        checks, no new objects (as MPI's persistent requests do for the MPI transport).
        """
        fused = fused or [False] * len(recvs)
        if len(fused) != len(recvs):
            raise invalid("fused", len(fused), f"one flag per receive ({len(recvs)})")
        marker = _reduce_marker
        transfers = [
            self._transfer(m, False, marker if f else None) for m, f in zip(recvs, fused, strict=True)
        ]
        transfers += [self._transfer(m, True, None) for m in sends]
        return _Prepared(transfers, len(recvs), list(fused))

    def start(
        self, step: _Prepared, reducer: Callable[[torch.Tensor, torch.Tensor], None] | None = None
    ) -> list[_Transfer]:
        """Queue a prepared step's transfers afresh and move what can move now; wait with `wait_all`."""
        self._check_usable()
        if reducer is None and step.reduces:
            raise invalid("reducer", None, "the call's reduction, for a step with reducing receives")
        transfers = step.transfers
        for transfer, fused in zip(transfers, step.flags, strict=True):
            transfer.reset(reducer if fused else None)
        self._queue(transfers, step.recvs)
        self._progress()
        return transfers

    def release(self, step: _Prepared) -> None:
        """Forget a prepared step (its tensors are no longer held)."""
        step.transfers, step.flags = [], []

    def _progress(self) -> bool:
        """Move every queued transfer as far as the rings allow; whether anything moved."""
        if self._unprobed:  # a peer's long sends wait for this rank's answer (see `_probe`)
            for peer in list(self._unprobed):
                self._probe(peer)
        moved = False
        for queue in self._sends.values():
            while queue:
                moved |= self._push(queue[0])
                if not queue[0].complete:
                    break
                queue.popleft()
        if self._hold_receives:
            return moved
        for queue in self._recvs.values():
            while queue:
                moved |= self._pull(queue[0])
                if not queue[0].complete:
                    break
                queue.popleft()
        return moved

    def _push(self, t: _Transfer) -> bool:
        """Write what fits of a send into its ring; publish the head after each piece."""
        words, ring, peer = self._words, self._ring_bytes, t.peer
        head = self._heads[peer]
        tail_at = self._out_tail[peer]
        base = self._out_ring[peer]
        free = ring - (head - int(words[tail_at]))
        if t.cma and not t.header:  # a descriptor if the receiver can read this rank: wait for its answer
            answer = int(words[self._out_can_read[peer]])
            if answer == 0:
                return False
            t.cma = answer == seg.CAN_READ
            if t.cma:
                t.footprint = 0
        if t.cma:
            return self._push_descriptor(t, head, free, base)
        moved = False
        if not t.header:
            if free < 16:
                return False
            at = (base + head % ring) // 8
            words[at] = t.tag
            words[at + 1] = t.nbytes
            head += 16
            free -= 16
            t.header = moved = True
        pieces = 0
        while t.done < t.footprint:
            if free <= 0:
                free = ring - (head - int(words[tail_at]))
                if free <= 0:
                    break
            n = min(free, t.footprint - t.done, COPY_BYTES)
            data = min(n, t.nbytes - t.done)
            if data > 0:
                self._copy_in(base, head % ring, t.address + t.done, data)
            t.done += n
            head += n
            free -= n
            moved, pieces = True, pieces + 1
            self._publish(self._out_head[peer], head, peer)
        if moved:
            if not pieces:  # only the header went: publish it
                self._publish(self._out_head[peer], head, peer)
            self._heads[peer] = head
        return moved

    def _push_descriptor(self, t: _Transfer, head: int, free: int, base: int) -> bool:
        """A cma send: post [tag, -1 - bytes][address, 0]; complete once the receiver's tail passes it."""
        words, ring = self._words, self._ring_bytes
        if t.header:
            if int(words[self._out_tail[t.peer]]) < t.release:
                return False
            t.release = 0
            return True
        if free < 32:
            return False
        at = (base + head % ring) // 8
        words[at] = t.tag
        words[at + 1] = -1 - t.nbytes
        at = (base + (head + 16) % ring) // 8
        words[at] = t.address
        words[at + 1] = 0
        head += 32
        self._publish(self._out_head[t.peer], head, t.peer)
        self._heads[t.peer] = head
        t.header, t.release = True, head
        return True

    def _pull_descriptor(self, t: _Transfer, tail: int, avail: int, base: int) -> bool:
        """A cma receive (header checked): read the bytes from the sender's memory, pass the descriptor."""
        words, ring = self._words, self._ring_bytes
        if avail < 32:
            return False
        self._consumed[t.peer] += 1
        address = int(words[(base + (tail + 16) % ring) // 8])
        if t.reduce is None:
            self._read_peer(t.peer, address, t.address, t.nbytes)
        else:
            self._read_and_reduce(t, address)
        tail += 32
        self._publish(self._in_tail[t.peer], tail, t.peer)
        self._tails[t.peer] = tail
        t.header = True
        return True

    def _check_header(self, t: _Transfer, tag: int, code: int) -> None:
        """The header's tag and size (`code`: bytes, or -1 - bytes for a descriptor) must be the receive's."""
        if tag == t.tag and (code == t.nbytes or code == -1 - t.nbytes):
            return
        self._fail("a message did not match its receive")
        nbytes = -1 - code if code < 0 else code
        raise TransportError(
            f"rank {self.rank} received {nbytes} bytes with tag {tag} from rank {t.peer}, "
            f"expected {t.nbytes} bytes with tag {t.tag}: the ranks run different collectives"
        )

    def _read_peer(self, peer: int, remote: int, local: int, nbytes: int) -> None:
        """Copy `nbytes` at `remote` in rank `peer`'s memory to `local` (process_vm_readv: one copy)."""
        pid = int(self._words[self.layout.pid_word(peer)])
        while nbytes > 0:
            got = cma_module.read(pid, remote, local, nbytes)
            if got <= 0:
                error = ctypes.get_errno()
                self._fail(f"reading rank {peer}'s memory failed")
                what = "exited" if error == errno.ESRCH else f"could not be read: {os.strerror(error)}"
                raise TransportError(f"rank {peer} (pid {pid}) {what}")
            remote, local, nbytes = remote + got, local + got, nbytes - got

    def _read_and_reduce(self, t: _Transfer, remote: int) -> None:
        """Reduce the peer's bytes at `remote` into t.data, a piece at a time through a cached scratch."""
        dtype = t.data.dtype
        size = t.data.element_size()
        if self._reduce_pieces is None:
            self._reduce_pieces = {}  # this transport's own (made on first use, kept)
        piece = self._reduce_pieces.get(dtype)
        if piece is None:
            piece = self._reduce_pieces[dtype] = torch.empty(REDUCE_PIECE_BYTES // size, dtype=dtype)
        local, step, total = piece.data_ptr(), piece.numel(), t.data.numel()
        for start in range(0, total, step):
            count = min(step, total - start)
            self._read_peer(t.peer, remote + start * size, local, count * size)
            t.reduce(t.data[start : start + count], piece[:count])

    def _pull(self, t: _Transfer) -> bool:
        """Copy out what has arrived of a receive; publish the tail after each piece."""
        words, ring, peer = self._words, self._ring_bytes, t.peer
        tail = self._tails[peer]
        head_at = self._in_head[peer]
        tail_at = self._in_tail[peer]
        base = self._in_ring[peer]
        avail = int(words[head_at]) - tail
        if t.cma:
            return self._pull_descriptor(t, tail, avail, base)
        moved = False
        if not t.header:
            if avail < 16:
                return False
            at = (base + tail % ring) // 8
            code = int(words[at + 1])
            self._check_header(t, int(words[at]), code)
            if code < 0:  # a descriptor: the bytes are read from the sender's memory
                t.cma, t.footprint = True, 0
                return self._pull_descriptor(t, tail, avail, base)
            self._consumed[t.peer] += 1
            tail += 16
            avail -= 16
            t.header = moved = True
        pieces = 0
        while t.done < t.footprint:
            if avail <= 0:
                avail = int(words[head_at]) - tail
                if avail <= 0:
                    break
            n = min(avail, t.footprint - t.done, COPY_BYTES)
            data = min(n, t.nbytes - t.done)
            if data > 0 and t.reduce is None:
                self._copy_out(base, tail % ring, t.address + t.done, data)
            elif data > 0:
                self._reduce_out(t, base + tail % ring, data)
            t.done += n
            tail += n
            avail -= n
            moved, pieces = True, pieces + 1
            self._publish(tail_at, tail, t.peer)
        if moved:
            if not pieces:  # only the header was consumed: publish it
                self._publish(tail_at, tail, t.peer)
            self._tails[t.peer] = tail
        return moved

    def _copy_in(self, base: int, at: int, src: int, n: int) -> None:
        """memcpy n bytes from address `src` into the ring at `base`, position `at` (wrapping)."""
        ring = self._ring_bytes
        first = min(n, ring - at)
        _memmove(self._base_address + base + at, src, first)
        if first < n:
            _memmove(self._base_address + base, src + first, n - first)

    def _copy_out(self, base: int, at: int, dst: int, n: int) -> None:
        """memcpy n bytes from the ring at `base`, position `at` (wrapping), to address `dst`."""
        ring = self._ring_bytes
        first = min(n, ring - at)
        _memmove(dst, self._base_address + base + at, first)
        if first < n:
            _memmove(dst + first, self._base_address + base, n - first)

    def _reduce_out(self, t: _Transfer, at: int, n: int) -> None:
        """Reduce n bytes of the ring from segment offset `at` (wrapping) into t.data, past t.done.

        Ring positions and piece ends are multiples of 16 bytes (only a message's last piece ends
        sooner, on an element), so both parts of a wrapped piece hold whole elements.
        """
        ring, size, dtype = self._ring_bytes, t.data.element_size(), t.data.dtype
        ring_start = self._in_ring[t.peer]
        first = min(n, ring_start + ring - at)
        element = t.done // size
        t.reduce(t.data[element : element + first // size], self._bytes[at : at + first].view(dtype))
        if first < n:
            element += first // size
            rest = self._bytes[ring_start : ring_start + n - first].view(dtype)
            t.reduce(t.data[element : element + (n - first) // size], rest)

    def _publish(self, word: int, value: int, peer: int) -> None:
        """Store a counter between two fences and ring `peer`'s doorbell if it sleeps.

        The first fence makes the bytes the counter covers visible before it; the second orders the
        store before the load of the peer's sleeping flag (the peer stores its flag, fences, then
        re-reads the counters: one of the two sides sees the other's store, so no wake-up is lost).
        """
        with self._fence:
            pass
        self._words[word] = value
        with self._fence:
            pass
        if self._words[self._sleeping[peer]]:
            self._ring(peer)

    def _ring(self, peer: int) -> None:
        """Change `peer`'s doorbell and wake it (a system call, made only when the peer sleeps)."""
        at = self.layout.doorbell_offset(peer) // 4
        self._ints[at] = (int(self._ints[at]) + 1) & 0x7FFFFFFF
        if futex.AVAILABLE:
            futex.wake(self._base_address + self.layout.doorbell_offset(peer))

    # ----- waiting -----

    def wait_all(self, requests: list[_Transfer], deadline: float, describe: Callable[[int], str]) -> None:
        """Progress until every request is complete; raise on a dead or failed peer or past `deadline`."""
        for request in requests:
            if not request.complete:
                break
        else:  # all done already (small sends, and receives that arrived while posting): no poll to set up
            return
        self._check_usable()
        self._poll(
            self._progress,
            lambda: all(r.complete for r in requests),
            deadline,
            lambda: [(i, r.peer) for i, r in enumerate(requests) if not r.complete],
            describe,
        )

    def _poll(
        self,
        step: Callable[[], bool],
        done: Callable[[], bool],
        deadline: float,
        waiting_for: Callable[[], list[tuple[int, int]]],
        describe: Callable[[int], str],
    ) -> None:
        """Call `step` until `done()`, backing off while nothing moves (see the module docstring)."""
        step()
        if done():
            return
        now = time.monotonic()
        main = threading.current_thread() is threading.main_thread()
        spin = self.spin if main else 0.0
        yields = self.yield_s if main else 0.0
        idle_since, next_check = now, now + CHECK_S
        nap = NAP_MIN_S
        while True:
            if step():
                idle_since, nap = time.monotonic(), NAP_MIN_S
            if done():
                return
            now = time.monotonic()
            if now > next_check:
                self._check_peers(waiting_for(), describe)
                next_check = now + CHECK_S
            if now > deadline:
                index, peer = waiting_for()[0]
                self._fail("a transfer timed out")
                who = (
                    f"peer pid {self.pids[peer]}"
                    if self._joined(peer)
                    else f"rank {peer} never joined the group's shared-memory transport: it has not "
                    "made its communicator of this group, or exited before"
                )
                raise CollectiveTimeoutError(f"{describe(index)} timed out (rank {self.rank}; {who})")
            idle = now - idle_since
            if idle < spin:
                continue
            if idle < spin + yields:
                os.sched_yield()
            elif futex.AVAILABLE:
                self._sleep(min(CHECK_S, deadline - now) + 1e-4, step, done)
            else:
                time.sleep(nap)
                nap = min(nap * 2, NAP_MAX_S)

    def _sleep(self, timeout: float, step: Callable[[], bool], done: Callable[[], bool]) -> None:
        """Sleep on this rank's doorbell until a peer rings it (or `timeout`), unless work arrived.

        The flag is raised before the last look at the rings, and a peer reads it after publishing
        (see `_publish`), so a peer either sees the flag and rings, or this look sees its counter.
        """
        bell = self.layout.doorbell_offset(self.rank)
        expected = int(self._ints[bell // 4])
        flag = self.layout.waiting_word(self.rank)
        self._words[flag] = 1
        with self._fence:
            pass
        try:
            if step() or done():
                return
            futex.wait(self._base_address + bell, expected, timeout)
        finally:
            self._words[flag] = 0

    def _check_peers(self, waiting: list[tuple[int, int]], describe: Callable[[int], str]) -> None:
        """Raise TransportError if a peer waited for has failed, closed or exited."""
        layout, words = self.layout, self._words
        for index, peer in waiting:
            state = int(words[layout.status_word(peer)])
            pid = int(words[layout.pid_word(peer)])
            reason = None
            if state == seg.FAILED:
                reason = "gave up (its own transfer failed or timed out)"
            elif state == seg.CLOSED:
                reason = "closed its transport"
            elif not self._joined(peer):
                reason = self._absent(peer)
            elif not seg.is_alive(pid, int(words[layout.started_word(peer)])):
                reason = "exited"
            if reason is not None:
                self._fail(f"rank {peer} {reason}")
                raise TransportError(f"{describe(index)} failed: rank {peer} (pid {pid}) {reason}")

    def _absent(self, peer: int) -> str | None:
        """Why `peer`, not joined yet, cannot join (it said so in the Store); None if it said nothing."""
        if self._store is None:
            return None
        key = absent_key(self._prefix, peer)
        try:
            if not self._store.check([key]):
                return None
            return "cannot join the shared-memory transport: " + self._store.get(key).decode()
        except RuntimeError:  # the store is gone (its host rank exited): only the deadline is left
            return None

    # ----- the argument check beside the first step (see Communicator) -----

    def signature_exchange(self, width: int) -> SignatureExchange:
        """The call signature through the gather slots, overlapped with the call's first step."""
        return SignatureExchange(self, width)

    def discard(self, requests: list[_Transfer] | None, deadline: float) -> None:
        """Undo a call's posted transfers after the ranks found they disagree (collective: every rank).

        While the check was open no receive read the rings (`_hold_receives`), but sends went out. The
        ranks gather how many messages each has ever posted to each peer; each drops its queued receives
        and skips, unread, every message a peer sent it that it has not read, while its own sends are
        streamed until the peers have skipped them. Then the rings are empty and in step again.
        """
        self._check_usable()
        self._hold_receives = False
        for queue in self._recvs.values():
            queue.clear()
        sent = torch.tensor(self._posted, dtype=torch.int64)
        table = torch.zeros(self.size * self.size, dtype=torch.int64)
        self.allgather_int64(sent, table, deadline)
        targets = table.view(self.size, self.size)[:, self.rank].tolist()
        skipping = [0] * self.size  # payload bytes of the message being skipped, still to pass

        def step() -> bool:
            moved = self._progress()
            for peer in range(self.size):
                if peer != self.rank:
                    moved |= self._skip(peer, targets[peer], skipping)
            return moved

        def done() -> bool:
            return not any(self._sends.values()) and all(
                skipping[p] == 0 and self._consumed[p] >= targets[p]
                for p in range(self.size)
                if p != self.rank
            )

        def waiting() -> list[tuple[int, int]]:
            return [(p, p) for p in range(self.size) if p != self.rank and self._consumed[p] < targets[p]]

        self._poll(
            step, done, deadline, waiting, lambda p: f"dropping the mismatched call's data from rank {p}"
        )

    def _skip(self, peer: int, target: int, skipping: list[int]) -> bool:
        """Pass, unread, what has arrived of the messages from `peer` up to its `target`-th."""
        words, ring = self._words, self._ring_bytes
        tail = self._tails[peer]
        head_at, tail_at, base = self._in_head[peer], self._in_tail[peer], self._in_ring[peer]
        moved = False
        while True:
            avail = int(words[head_at]) - tail
            if skipping[peer]:
                n = min(avail, skipping[peer])
                if n <= 0:
                    break
                tail += n
                skipping[peer] -= n
            elif self._consumed[peer] < target and avail >= 16:
                at = (base + tail % ring) // 8
                code = int(words[at + 1])
                if code < 0:  # a cma descriptor: 32 bytes, passing it releases the sender
                    if avail < 32:
                        break
                    tail += 32
                else:
                    tail += 16
                    skipping[peer] = -(-code // 16) * 16
                self._consumed[peer] += 1
            else:
                break
            moved = True
        if moved:
            self._tails[peer] = tail
            self._publish(tail_at, tail, peer)
        return moved

    # ----- control data -----

    def allgather_int64(self, send: torch.Tensor, out: torch.Tensor, deadline: float) -> None:
        """Every rank's `send` (int64) into `out` (rank r's at block r) through the segment's slots.

        Each rank writes up to 31 values and then a sequence number into its slot of this round's parity
        and waits for every peer's sequence number: one round per 31 values, no messages. Slots alternate
        by parity, and a rank can start round n + 2 only after every peer has finished round n + 1, so a
        slot is never rewritten while a peer still reads it.
        """
        self._check_usable()
        width = send.numel()
        if out.numel() != width * self.size:
            raise invalid("out", out.numel(), f"{width} x {self.size} elements (send's times the ranks)")
        values = send.cpu().numpy().reshape(-1)
        table = out.numpy().reshape(self.size, width)
        for start in range(0, max(width, 1), MAX_GATHER):
            end = min(start + MAX_GATHER, width)
            table[:, start:end] = self._gather_round(values[start:end], deadline)

    def _gather_round(self, values: np.ndarray, deadline: float) -> np.ndarray:
        """One round of allgather_int64: every rank's (at most MAX_GATHER) values, rank by rank."""
        width = values.size
        self._gather_start(values)
        return self._gather_finish(width, deadline)

    def _gather_start(self, values: np.ndarray | tuple[int, ...]) -> None:
        """Write this rank's values and the next sequence number into its slot; wake sleeping peers."""
        sequence = self._gathers + 1
        words, layout = self._words, self.layout
        mine = layout.gather_word(self.rank, sequence % 2)
        words[mine + 1 : mine + 1 + len(values)] = values
        words[mine] = sequence
        with self._fence:
            pass
        for peer in range(self.size):
            if peer != self.rank and words[self._sleeping[peer]]:
                self._ring(peer)

    def _gather_finish(self, width: int, deadline: float) -> np.ndarray:
        """Wait for every rank's slot of the round `_gather_start` opened; their values, rank by rank."""
        sequence = self._gathers + 1
        parity = sequence % 2
        words, layout = self._words, self.layout
        slots = [layout.gather_word(r, parity) for r in range(self.size)]

        def arrived() -> bool:
            return all(int(words[s]) >= sequence for s in slots)

        def waiting() -> list[tuple[int, int]]:
            return [(r, r) for r in range(self.size) if int(words[slots[r]]) < sequence]

        self._poll(self._progress, arrived, deadline, waiting, lambda r: f"allgather with rank {r}")
        gathered = np.stack([words[s + 1 : s + 1 + width] for s in slots])
        self._gathers = sequence
        return gathered

    def __repr__(self) -> str:
        return f"SharedMemoryTransport(rank {self.rank} of {self.size}, ring {self.layout.ring_bytes} bytes)"


class SignatureExchange:
    """Every rank's call signature through the gather slots, beside the call's first step.

    `start` writes this rank's slot (no message) and holds the receives: step 0's sends go out at once,
    but no receive reads a ring until `finish` has seen every rank's signature agree, so a message of a
    disagreeing peer is never taken for this rank's own (`discard` drops such messages instead).

    Why plain Python on a memoryview and the mmap: the check runs on every call, and a numpy operation
    on a few words costs about a microsecond, while indexing a memoryview or slicing the mmap costs tens
    of nanoseconds. The signature is packed into bytes once per distinct call; a call then writes it
    with one slice assignment and its sequence number with one store, and compares each rank's slot
    with one bytes comparison: about 3 + 3p such operations when the peers are already there.
    """

    def __init__(self, transport: SharedMemoryTransport, width: int) -> None:
        if width > MAX_GATHER:
            raise invalid("width", width, f"at most {MAX_GATHER} values")
        self.transport = transport
        self.width = width
        size, layout = transport.size, transport.layout
        assert transport._mm is not None
        self._mm = transport._mm
        self._view = memoryview(transport._mm).cast("q")  # the segment as int64 words
        self._slots = [[layout.gather_word(r, parity) for r in range(size)] for parity in (0, 1)]
        peers = [r for r in range(size) if r != transport.rank]
        self._peer_states = [(r, layout.status_word(r)) for r in peers]
        self._peer_flags = [(r, layout.waiting_word(r)) for r in peers]
        self._last: tuple[int, ...] | None = None
        self._mine = b""  # this rank's signature, packed
        self._rows: list[list[int]] | None = None

    def start(self, signature: tuple[int, ...]) -> None:
        transport = self.transport
        transport._check_usable()
        if signature != self._last:
            self._mine = np.array(signature, dtype=np.int64).tobytes()
            self._last = signature
        sequence = transport._gathers + 1
        word = self._slots[sequence % 2][transport.rank]
        self._mm[word * 8 + 8 : word * 8 + 8 + len(self._mine)] = self._mine
        self._view[word] = sequence  # after the values: a peer that sees the sequence sees them
        with transport._fence:
            pass
        transport._hold_receives = True

    def finish(self, deadline: float, first: list[_Transfer] | None = None) -> bool:
        """Whether every rank's signature equals this one's, waiting for them until `deadline`.

        `first`: step 0's transfers, posted since `start`. Sleeping peers are woken here rather than in
        `start`, so a peer waiting for this rank wakes once, to this rank's signature and step 0's data
        together (woken at `start` it would find the slot, miss the data and sleep again). A peer that
        step 0 already sent to was woken by that send if it slept (the slot was written before).
        """
        transport, view = self.transport, self._view
        sent = {t.peer for t in first if t.header} if first else ()  # (receives are held: sends only)
        for peer, flag in self._peer_flags:
            if view[flag] and peer not in sent:
                transport._ring(peer)
        sequence = transport._gathers + 1
        slots = self._slots[sequence % 2]
        try:
            for word in slots:
                if view[word] < sequence:
                    self._wait(slots, sequence, deadline)
                    break
            transport._gathers = sequence
        except BaseException:
            transport._hold_receives = False
            raise
        for peer, state in self._peer_states:
            if view[state] == seg.FAILED:
                self._stop_if_a_peer_gave_up(peer, sequence)
        mm, mine, n = self._mm, self._mine, len(self._mine)
        for word in slots:
            if mm[word * 8 + 8 : word * 8 + 8 + n] != mine:
                self._rows = [
                    np.frombuffer(mm[w * 8 + 8 : w * 8 + 8 + n], dtype=np.int64).tolist() for w in slots
                ]
                return False
        transport._hold_receives = False  # the executor's wait moves the held receives
        return True

    def _wait(self, slots: list[int], sequence: int, deadline: float) -> None:
        """Wait (the transport's poll: spin, yield, sleep; dead peers; deadline) for every slot."""
        view = self._view

        def arrived() -> bool:
            return all(view[word] >= sequence for word in slots)

        def waiting() -> list[tuple[int, int]]:
            return [(r, r) for r, word in enumerate(slots) if view[word] < sequence]

        transport = self.transport
        transport._poll(transport._progress, arrived, deadline, waiting, self._describe)

    @staticmethod
    def _describe(rank: int) -> str:
        return f"the argument check with rank {rank}"

    def _stop_if_a_peer_gave_up(self, peer: int, sequence: int) -> None:
        """Raise if `peer` gave up in this call after writing its slot (a timeout in this very check).

        Its first step may have been sent: stop rather than take its data for a call it abandoned. A peer
        that has moved on to the next call has written the next round's slot, and one that closed after
        finishing its part of this call did not give up.
        """
        transport = self.transport
        if self._view[self._slots[(sequence + 1) % 2][peer]] <= sequence:
            transport._hold_receives = False
            transport._check_peers([(peer, peer)], lambda p: f"the argument check with rank {p}")

    def rows(self) -> list[list[int]]:
        assert self._rows is not None
        return self._rows


def shared_memory_transport(group: dist.ProcessGroup | None) -> SharedMemoryTransport | None:
    """The shared-memory transport of a gloo `group` unless $COMMLAB_SHM=0 or its ranks are on several hosts.

    Not collective: this rank joins the group's segment through the group's Store (see shm_setup), and
    every rank reaches the same answer from the same facts: None for a group of one rank, a non-gloo
    group, a host map ($COMMLAB_HOSTS, LOCAL_WORLD_SIZE) of several hosts, no /dev/shm, or a segment its
    maker could not make (a full /dev/shm: a warning says so). A rank that finds itself on another host
    than the segment raises TransportError (the host map must say so).
    """
    if not shm_enabled() or not dist.is_available() or not dist.is_initialized():
        return None  # the caller's TorchTransport says what is missing
    group = group if group is not None else dist.group.WORLD
    if str(dist.get_backend(group)).lower() != "gloo" or dist.get_world_size(group) < 2:
        return None
    global_ranks = [dist.get_global_rank(group, r) for r in range(dist.get_world_size(group))]
    return _one_host_or_none(global_ranks, lambda: SharedMemoryTransport(group))


def backend_shared_memory_transport(
    backend: torch._C._distributed_c10d.Backend,
    rank: int,
    size: int,
    timeout: float,
    global_ranks: list[int] | None = None,
) -> SharedMemoryTransport | None:
    """The shared-memory transport of a raw c10d `backend`'s ranks if they share a host, else None.

    As `shared_memory_transport`, but set up over the backend (`over_backend`) and not consulting
    $COMMLAB_SHM (the caller decides). Collective over the backend; every rank gets the same answer.
    """
    if size < 2:
        return None
    ranks = list(range(size)) if global_ranks is None else list(global_ranks)
    return _one_host_or_none(
        ranks, lambda: SharedMemoryTransport.over_backend(backend, rank, size, timeout, ranks)
    )


def _one_host_or_none(
    global_ranks: list[int], make: Callable[[], SharedMemoryTransport]
) -> SharedMemoryTransport | None:
    """`make()` unless the host map says several hosts, there is no /dev/shm, the ranks turn out to be on
    several hosts, or the segment could not be made (warned); every rank decides alike."""
    hosts = host_map_from_env(global_ranks)
    if hosts is not None and hosts.num_hosts > 1:
        return None
    if not os.path.isdir(seg.SHM_DIR):
        return None
    try:
        return make()
    except NotOneHostError:
        return None
    except TransportError as error:  # every rank learned it in setup: all fall back together
        if SETUP_FAILED not in str(error):
            raise
        warnings.warn(f"commlab: no shared memory ({error}); using gloo", RuntimeWarning, stacklevel=3)
        return None
