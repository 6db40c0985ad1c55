"""The transport over MPI (mpi4py): nonblocking sends and receives on zero-copy views of CPU tensors.

`MPITransport(comm)` works on any intra-communicator (COMM_WORLD, a `Split` or `Create` result). It
duplicates it once (nonblocking, within the timeout) so commlab's tags never meet the program's own
messages. Tensors are handed to MPI as raw bytes at their address (`MPI.buffer.fromaddress`), so every
dtype travels, bfloat16 included, without a copy; numpy arrays are accepted too. Waits poll `Testall`
until a deadline: on the main thread a short spin (none when ranks outnumber cores), then `sched_yield`,
then short naps; a worker thread (asynchronous collectives beside a training loop) naps at once, so it
never holds the GIL or a core against the thread doing the compute. A message longer than its receive
raises TransportError (MPI_ERR_TRUNCATE), a peer that never answers raises CollectiveTimeoutError.

A communicator's repeated calls use persistent requests (`prepare`: MPI_Send_init/Recv_init once per
bound program; `start`: one MPI_Startall per step), and its argument check is a `SignatureExchange`:
persistent sends of the call's signature to every peer, started beside the first step; a disagreement
is undone by `discard` (cancel, count, drop) on every rank.

mpi4py is imported only when an MPI transport is made (importing `mpi4py.MPI` initializes MPI).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from commlab.collectives.cost import CostModel
from commlab.collectives.hosts import HostMap, host_map_from_env
from commlab.collectives.transport import DEFAULT_TIMEOUT_S, Message
from commlab.errors import CollectiveTimeoutError, CommlabError, TransportError, invalid

SPIN_S = 1e-3  # the main thread polls without pause this long (as MPI's own waits do), then yields
YIELD_S = 10e-3  # it yields the processor between polls until this long, then naps NAP_S between polls
NAP_S = 50e-6

_ABANDONED: list[Any] = []
"""Transfers a failed call left in flight, with their buffers: kept for the life of the process, since
a late message may still land (a transport or communicator that is garbage collected must not free them)."""

MPI_COST_MODEL = CostModel(alpha=25e-6, beta=1 / 4e9, gamma=1 / 4e9)
"""Python-driven MPI on one host: about 25 us per message, 4 GB/s copies, 4 GB/s reduction."""


def _mpi() -> Any:
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise CommlabError(
            "the MPI transport needs mpi4py and an MPI library: pip install 'commlab[mpi]' "
            "(mpi4py and the mpich wheel)"
        ) from error
    return MPI


def is_mpi_comm(obj: object) -> bool:
    """Whether `obj` is an mpi4py communicator (without importing mpi4py if the program has not)."""
    import sys

    module = sys.modules.get("mpi4py.MPI")
    return module is not None and isinstance(obj, module.Comm)


def comm_key(comm: Any) -> tuple[str, int]:
    """A hashable identity of an mpi4py communicator (its handle)."""
    return ("mpi", int(comm.handle))


def _bytes_of(MPI: Any, data: torch.Tensor | np.ndarray) -> Any:
    """A zero-copy byte view of a contiguous CPU tensor or numpy array, as an MPI buffer spec."""
    if isinstance(data, torch.Tensor):
        if data.device.type != "cpu" or not data.is_contiguous():
            where = f"{data.device} contiguous={data.is_contiguous()}"
            raise invalid("tensor", where, "contiguous CPU tensors")
        nbytes = data.numel() * data.element_size()
        return [MPI.buffer.fromaddress(data.data_ptr() if nbytes else 0, nbytes), MPI.BYTE]
    if isinstance(data, np.ndarray):
        if not data.flags.c_contiguous:
            raise invalid("array", "a non-contiguous array", "C-contiguous numpy arrays")
        return [data.reshape(-1).view(np.uint8), MPI.BYTE]
    raise invalid("message", type(data).__name__, "a torch.Tensor or a numpy.ndarray")


def _default_spin() -> float:
    """SPIN_S, or 0 when this host runs more ranks than it has cores (spinning would starve a peer).

    The local rank count comes from the launcher (MPICH's hydra: MPI_LOCALNRANKS; Open MPI:
    OMPI_COMM_WORLD_LOCAL_SIZE); without one, spin.
    """
    local = os.environ.get("MPI_LOCALNRANKS") or os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE")
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return 0.0 if local and int(local) > cores else SPIN_S


class MPIRequest:
    """One posted MPI transfer; keeps its buffer alive until it completes."""

    __slots__ = ("buffer", "is_recv", "peer", "request", "transport")

    def __init__(
        self, request: Any, buffer: object, transport: MPITransport, peer: int = -1, is_recv: bool = False
    ) -> None:
        self.request = request
        self.buffer = buffer
        self.transport = transport
        self.peer = peer
        self.is_recv = is_recv

    def wait(self, timeout: float) -> None:
        """Block until done or `timeout` seconds pass (CollectiveTimeoutError)."""
        self.transport.wait_all([self], time.monotonic() + timeout, lambda _: "transfer")


class PersistentStep:
    """A step's transfers as persistent MPI requests (Recv_init/Send_init: receives first), started
    together by one Startall per call; keeps its tensors alive. `abandoned`: a timeout left it active."""

    __slots__ = ("abandoned", "handles", "peers", "recvs", "statuses", "tensors")

    def __init__(self, handles: list, peers: list[int], recvs: int, tensors: list) -> None:
        self.handles = handles
        self.peers = peers
        self.recvs = recvs  # the first `recvs` handles are receives
        self.tensors = tensors
        self.statuses: list = []
        self.abandoned = False

    def __len__(self) -> int:
        return len(self.handles)


class MPITransport:
    """Point-to-point over an mpi4py intra-communicator (CPU tensors and numpy arrays).

    `comm`: the communicator (default MPI.COMM_WORLD); `timeout`: the default seconds per collective;
    `duplicate`: work on a private duplicate of `comm` (default) or on `comm` itself; `spin`: seconds a
    wait polls before it starts yielding the processor (default SPIN_S, 0 when ranks outnumber cores).
    """

    device_type = "cpu"
    backend = "mpi"  # names the calibrated profile `auto` uses (commlab/profiles/mpi.json)
    cost_model = MPI_COST_MODEL
    piece_bytes = 0  # no slicing: MPI progresses only inside MPI calls, so slices add messages, not overlap

    def __init__(
        self,
        comm: Any = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        duplicate: bool = True,
        spin: float | None = None,
    ) -> None:
        MPI = _mpi()
        self._MPI = MPI
        if comm is None:
            comm = MPI.COMM_WORLD
        if not isinstance(comm, MPI.Intracomm) or comm == MPI.COMM_NULL:
            raise invalid("comm", type(comm).__name__, "an mpi4py Intracomm (not COMM_NULL)")
        if not timeout > 0:
            raise invalid("timeout", timeout, "a positive number of seconds")
        level = MPI.Query_thread()
        if level < MPI.THREAD_SERIALIZED:
            raise CommlabError(
                f"MPI was initialized with thread level {level}; commlab runs asynchronous collectives on a "
                "worker thread and needs MPI_THREAD_SERIALIZED or MPI_THREAD_MULTIPLE (mpi4py's default; "
                "set mpi4py.rc.thread_level = 'multiple' before importing mpi4py.MPI)"
            )
        self.user_comm = comm
        self.default_timeout = float(timeout)
        self.spin = _default_spin() if spin is None else float(spin)
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        world = MPI.COMM_WORLD.Get_group()
        self.global_ranks = list(comm.Get_group().Translate_ranks(list(range(self.size)), world))
        self.max_tag = int(comm.Get_attr(MPI.TAG_UB))
        self.comm = self._duplicate(comm) if duplicate else comm
        self.hosts = host_map_from_env(self.global_ranks) or self._processor_hosts()

    def _processor_hosts(self) -> HostMap:
        """Ranks grouped by MPI_Get_processor_name (the host name), gathered once within the timeout."""
        name = self._MPI.Get_processor_name().encode()
        send = torch.tensor([int.from_bytes(hashlib.blake2b(name, digest_size=7).digest(), "little")])
        out = torch.zeros(self.size, dtype=torch.int64)
        self.allgather_int64(send, out, time.monotonic() + self.default_timeout)
        return HostMap.from_labels(out.tolist())

    def _duplicate(self, comm: Any) -> Any:
        """MPI_Comm_idup, waited for with the default timeout (every rank of `comm` must make one)."""
        duplicate, request = comm.Idup()
        deadline = time.monotonic() + self.default_timeout
        try:
            self.wait_all([MPIRequest(request, None, self)], deadline, lambda _: "communicator duplication")
        except CollectiveTimeoutError as error:
            raise CollectiveTimeoutError(
                f"making the MPI transport: {error}; every rank of the communicator must create it"
            ) from None
        return duplicate

    def post(self, sends: list[Message], recvs: list[Message]) -> list[MPIRequest]:
        """Post the receives, then the sends; the requests come back in that order."""
        MPI = self._MPI
        comm = self.comm
        mask = self.max_tag
        requests = []
        try:
            for m in recvs:
                buffer = _bytes_of(MPI, m.tensor)
                request = comm.Irecv(buffer, m.peer, m.tag % (mask + 1))
                requests.append(MPIRequest(request, m.tensor, self, m.peer, True))
            for m in sends:
                buffer = _bytes_of(MPI, m.tensor)
                requests.append(
                    MPIRequest(comm.Isend(buffer, m.peer, m.tag % (mask + 1)), m.tensor, self, m.peer)
                )
        except MPI.Exception as error:
            raise TransportError(f"MPI could not post a transfer: {error.Get_error_string()}") from error
        return requests

    def prepare(
        self, sends: list[Message], recvs: list[Message], fused: list[bool] | None = None
    ) -> PersistentStep:
        """Persistent requests for a step that repeats (MPI_Recv_init/Send_init; see executor.BoundProgram).

        Their tags are fixed, so every call of a program reuses them: messages between a pair with one
        tag match in the order they are sent, and calls on a communicator run one at a time in one order
        on every rank, so a call's message never meets another call's receive. `fused` must not flag a
        receive: MPI's land whole, in scratch (the MPI transport does not reduce on receipt).
        """
        if fused and any(fused):
            raise invalid("fused", fused, "no reducing receives (MPITransport.reduces_on_receipt is False)")
        MPI = self._MPI
        comm, modulus = self.comm, self.max_tag + 1
        try:
            handles = [comm.Recv_init(_bytes_of(MPI, m.tensor), m.peer, m.tag % modulus) for m in recvs]
            handles += [comm.Send_init(_bytes_of(MPI, m.tensor), m.peer, m.tag % modulus) for m in sends]
        except MPI.Exception as error:
            raise TransportError(
                f"MPI could not make a persistent request: {error.Get_error_string()}"
            ) from error
        peers = [m.peer for m in recvs] + [m.peer for m in sends]
        step = PersistentStep(handles, peers, len(recvs), [m.tensor for m in recvs + sends])
        step.statuses = [MPI.Status() for _ in handles]
        return step

    def start(self, step: PersistentStep, reducer: object = None) -> PersistentStep:
        """Start a prepared step's transfers (one MPI_Startall); wait for them with `wait_all`.
        (`reducer` is for transports that reduce on receipt; MPI's receives land in scratch.)"""
        if step.abandoned:
            raise TransportError("a transfer of this step timed out earlier: the MPI transport is unusable")
        try:
            self._MPI.Prequest.Startall(step.handles)
        except self._MPI.Exception as error:
            raise TransportError(f"MPI could not start a step: {error.Get_error_string()}") from error
        return step

    def release(self, step: PersistentStep) -> None:
        """Free a prepared step's requests (left alone if a timeout left them active)."""
        if step.abandoned:
            return
        for handle in step.handles:
            if handle != self._MPI.REQUEST_NULL:
                handle.Free()
        step.handles = []

    def wait_all(
        self, requests: list[MPIRequest] | PersistentStep, deadline: float, describe: Callable[[int], str]
    ) -> None:
        """Poll until every request is done; past `deadline` raise, keeping unfinished buffers alive."""
        MPI = self._MPI
        if isinstance(requests, PersistentStep):
            handles, statuses = requests.handles, requests.statuses
        else:
            handles = [r.request for r in requests]
            statuses = [MPI.Status() for _ in handles]
        try:
            if MPI.Request.Testall(handles, statuses):
                return
            now = time.monotonic()
            if threading.current_thread() is threading.main_thread():
                spin_until, yield_until = now + self.spin, now + YIELD_S
            else:  # a worker thread naps at once: spinning would hold the GIL against the main thread
                spin_until = yield_until = now
            while not MPI.Request.Testall(handles, statuses):
                now = time.monotonic()
                if now > deadline:
                    self._give_up(requests, handles, describe)
                if now > yield_until:
                    time.sleep(NAP_S)
                elif now > spin_until:
                    os.sched_yield()
        except MPI.Exception as error:
            raise self._failure(error, handles, statuses, describe) from error

    def _failure(
        self, error: Any, handles: list, statuses: list, describe: Callable[[int], str]
    ) -> TransportError:
        """A TransportError naming the failed transfer and MPI's reason (from its status if there is one)."""
        MPI = self._MPI
        index, reason = 0, error.Get_error_string()
        if error.Get_error_class() == MPI.ERR_IN_STATUS:
            for i, status in enumerate(statuses):
                code = status.Get_error()
                if code not in (MPI.SUCCESS, MPI.ERR_PENDING):
                    index, reason = i, MPI.Get_error_string(code)
                    break
        else:
            index = next((i for i, h in enumerate(handles) if h != MPI.REQUEST_NULL), 0)
        return TransportError(f"{describe(index)} failed: {reason}")

    def allgather_int64(self, send: torch.Tensor, out: torch.Tensor, deadline: float) -> None:
        """Every rank's `send` (int64) into `out` by MPI_Iallgather (for the argument check)."""
        MPI = self._MPI
        try:
            request = self.comm.Iallgather([send.numpy(), MPI.INT64_T], [out.numpy(), MPI.INT64_T])
        except MPI.Exception as error:
            raise TransportError(f"MPI could not start an allgather: {error.Get_error_string()}") from error
        self.wait_all([MPIRequest(request, (send, out), self)], deadline, lambda _: "allgather")

    def _give_up(
        self, requests: list[MPIRequest] | PersistentStep, handles: list, describe: Callable[[int], str]
    ) -> None:
        """Keep unfinished transfers (and their buffers) alive, and raise a timeout naming the first.

        A late message may still land in its buffer, so the buffer must outlive the collective; after a
        timeout the communicator is unusable, as a gloo group is.
        """
        stuck = [i for i, h in enumerate(handles) if not self._completed(h)] or [0]
        if isinstance(requests, PersistentStep):
            requests.abandoned = True
            _ABANDONED.append(requests)
        else:
            _ABANDONED.extend(requests[i] for i in stuck)
        raise CollectiveTimeoutError(f"{describe(stuck[0])} timed out (MPI rank {self.rank})")

    def abandon(self, requests: list[MPIRequest] | PersistentStep) -> None:
        """Keep a call's unfinished transfers, and their buffers, for good (a failed call left them)."""
        if isinstance(requests, PersistentStep):
            if any(not self._completed(h) for h in requests.handles):
                requests.abandoned = True
                _ABANDONED.append(requests)
        else:
            _ABANDONED.extend(r for r in requests if not self._completed(r.request))

    # ----- the argument check beside the first step (see Communicator) -----

    def signature_exchange(self, width: int) -> SignatureExchange:
        """Persistent sends of this rank's call signature to every peer and receives of theirs."""
        return SignatureExchange(self, width)

    def discard(self, requests: list[MPIRequest] | PersistentStep | None, deadline: float) -> None:
        """Undo a call's posted first step after the ranks found they disagree (collective: every rank).

        The transfers were posted before the disagreement was known, so some messages may have no
        matching receive: each rank cancels its unmatched receives, the ranks tell each other how many
        messages they sent to whom (one MPI_Ialltoall), and each receives and drops the messages no
        receive took. Then no message of the call is left in MPI to meet a later call's receive.
        """
        MPI = self._MPI
        if isinstance(requests, PersistentStep):
            items = list(zip(requests.handles, requests.peers, range(len(requests.handles)), strict=True))
            items = [(h, p, i < requests.recvs) for h, p, i in items]
        else:
            items = [(r.request, r.peer, r.is_recv) for r in requests or []]
        sent = np.zeros(self.size, dtype=np.int64)
        taken = np.zeros(self.size, dtype=np.int64)
        for handle, peer, is_recv in items:
            if is_recv and not self._completed(handle):
                handle.Cancel()
            if not is_recv:
                sent[peer] += 1
        for handle, peer, is_recv in items:
            if is_recv:
                status = MPI.Status()
                self._finish_one(handle, status, deadline, "a cancelled receive")
                if not status.Is_cancelled():
                    taken[peer] += 1
        incoming = np.zeros(self.size, dtype=np.int64)
        try:
            request = self.comm.Ialltoall([sent, MPI.INT64_T], [incoming, MPI.INT64_T])
        except MPI.Exception as error:
            raise TransportError(f"MPI could not start an alltoall: {error.Get_error_string()}") from error
        self._finish_one(request, MPI.Status(), deadline, "counting unmatched messages")
        for peer in range(self.size):
            for _ in range(int(incoming[peer] - taken[peer])):
                self._drop_one(peer, deadline)
        for handle, _, is_recv in items:
            if not is_recv:
                self._finish_one(handle, MPI.Status(), deadline, "a send of the mismatched call")

    def _completed(self, handle: Any) -> bool:
        """Whether a request is complete (one that completed with an error counts), without freeing it."""
        try:
            return bool(handle.Get_status())
        except self._MPI.Exception:
            return True

    def _finish_one(self, handle: Any, status: Any, deadline: float, what: str) -> None:
        """Wait for one request by `deadline`; an error it completes with (a truncation) is ignored."""
        MPI = self._MPI
        while True:
            try:
                if handle.Test(status):
                    return
            except MPI.Exception:
                return
            if time.monotonic() > deadline:
                raise CollectiveTimeoutError(f"{what} timed out (MPI rank {self.rank})")
            time.sleep(NAP_S)

    def _drop_one(self, peer: int, deadline: float) -> None:
        """Receive and drop the next message from `peer` (any tag), waiting until `deadline`."""
        MPI = self._MPI
        status = MPI.Status()
        while True:
            message = self.comm.Improbe(peer, MPI.ANY_TAG, status)
            if message is not None:
                junk = bytearray(max(status.Get_count(MPI.BYTE), 1))
                message.Recv([junk, MPI.BYTE])
                return
            if time.monotonic() > deadline:
                raise CollectiveTimeoutError(f"dropping an unmatched message from rank {peer} timed out")
            time.sleep(NAP_S)

    def __repr__(self) -> str:
        return f"MPITransport(rank {self.rank} of {self.size})"


SIGNATURE_TAG = 0  # the argument check's tag (data tags start above the check's range; see Communicator)


class SignatureExchange:
    """Every rank's call signature to every other rank, as persistent MPI requests on one tag.

    `start(signature)` writes this rank's signature and starts the sends and receives (one Startall);
    `finish(deadline)` waits for them and says whether every rank's equals this one's. The exchange is
    posted beside the call's first step, so it costs no round trip of its own; every rank sends to and
    receives from every other, so every rank sees any difference, whatever the schedules.
    """

    def __init__(self, transport: MPITransport, width: int) -> None:
        self.transport = transport
        self.width = width
        self.mine = np.zeros(width, dtype=np.int64)
        self.table = np.zeros((transport.size, width), dtype=np.int64)
        peers = [r for r in range(transport.size) if r != transport.rank]
        sends = [Message(torch.from_numpy(self.mine), p, SIGNATURE_TAG) for p in peers]
        recvs = [Message(torch.from_numpy(self.table[p]), p, SIGNATURE_TAG) for p in peers]
        self.step = transport.prepare(sends, recvs)
        self._last: tuple[int, ...] | None = None
        self._expected = b""

    def start(self, signature: tuple[int, ...]) -> None:
        if signature != self._last:
            self.mine[:] = signature
            self.table[self.transport.rank] = self.mine
            self._expected = self.mine.tobytes() * self.transport.size
            self._last = signature
        self.transport.start(self.step)

    def finish(self, deadline: float, first: Any = None) -> bool:
        """Wait for every rank's signature; whether all agree (the rows are in `table`). (`first`, step
        0's requests, is for transports that need it.)"""
        self.transport.wait_all(self.step, deadline, self._describe)
        return self.table.tobytes() == self._expected

    def _describe(self, index: int) -> str:
        peer = self.step.peers[index]
        return f"the argument check with rank {peer}"

    def rows(self) -> list[list[int]]:
        return self.table.tolist()
