"""The point-to-point interface the executor needs, and its implementation over torch.distributed.

A transport posts nonblocking sends and receives of contiguous tensors to and from peers (ranks of its own
group), tagged so concurrent messages between one pair cannot be confused, and waits for them with a
deadline. Gloo takes CPU tensors message by message; NCCL takes CUDA tensors as one batched group per step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from typing import NamedTuple, Protocol

import torch
import torch.distributed as dist

from commlab.collectives.hosts import host_map_from_env, most_local_ranks
from commlab.collectives.tuning import piece_bytes_for_host
from commlab.errors import CollectiveTimeoutError, CommlabError, TransportError

DEFAULT_TIMEOUT_S = 60.0  # a call's deadline unless the group, the communicator or the call sets one


class Message(NamedTuple):
    """One posted transfer: a contiguous tensor, the peer's rank in the group, and the tag.

    `reduce` (receives only, and only on a transport whose `reduces_on_receipt` is True): the incoming
    bytes are not stored in `tensor` but reduced into it, `reduce(tensor_part, incoming_part)`, as they
    arrive (see executor.compile_program's `fuse_reduce`).
    """

    tensor: torch.Tensor
    peer: int
    tag: int
    reduce: Callable[[torch.Tensor, torch.Tensor], None] | None = None


class Request(Protocol):
    def wait(self, timeout: float) -> None: ...


class Transport(Protocol):
    """What the executor runs on: ranks of one group exchanging tensors, with a default timeout.

    Optional, used when present: `wait_all(requests, deadline, describe)` (wait for a step's requests
    at once), `allgather_int64(send, out, deadline)` (a native allgather for the argument check),
    `max_tag`, `cost_model` and `piece_bytes` (see Communicator), `reduces_on_receipt` (receives
    may carry a `Message.reduce`).
    """

    rank: int
    size: int
    device_type: str
    default_timeout: float

    def post(self, sends: list[Message], recvs: list[Message]) -> list[Request]:
        """Post the receives and sends of one step; the requests come back receives first."""
        ...


class TorchRequest:
    """A torch.distributed Work with a wait that honours a timeout in seconds."""

    def __init__(self, work: dist.Work) -> None:
        self._work = work

    def wait(self, timeout: float) -> None:
        try:
            self._work.wait(timedelta(seconds=max(timeout, 1e-3)))
        except RuntimeError as error:
            text = str(error)
            if "imed out" in text or "timeout" in text.lower():
                raise CollectiveTimeoutError(text) from error
            raise TransportError(text) from error


class TorchTransport:
    """Point-to-point over a torch.distributed ProcessGroup (gloo: CPU tensors; NCCL: CUDA tensors)."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise CommlabError(
                "torch.distributed is not initialized: call torch.distributed.init_process_group() first "
                "(or launch with torchrun)"
            )
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.size = dist.get_world_size(self.group)
        if self.rank < 0:
            raise CommlabError("this process is not a member of the group it was asked to communicate in")
        self.global_ranks = [dist.get_global_rank(self.group, r) for r in range(self.size)]
        self.hosts = host_map_from_env(self.global_ranks)  # None: one host, unless the communicator says
        self.backend = str(dist.get_backend(self.group)).lower()
        self.device_type = "cuda" if self.backend == "nccl" else "cpu"
        self.default_timeout = _group_timeout(self.group, self.device_type)
        if self.device_type == "cpu":  # slices overlap only where each rank has cores to spare
            local = most_local_ranks() or self.size  # the busiest host's, alike on every rank (uneven hosts)
            self.piece_bytes = piece_bytes_for_host(min(local, self.size))

    def post(self, sends: list[Message], recvs: list[Message]) -> list[TorchRequest]:
        if self.backend == "nccl":
            ops = [dist.P2POp(dist.irecv, m.tensor, self.global_ranks[m.peer], self.group) for m in recvs]
            ops += [dist.P2POp(dist.isend, m.tensor, self.global_ranks[m.peer], self.group) for m in sends]
            works = dist.batch_isend_irecv(ops) if ops else []
            return [TorchRequest(w) for w in works]
        requests = [
            TorchRequest(dist.irecv(m.tensor, self.global_ranks[m.peer], self.group, tag=m.tag))
            for m in recvs
        ]
        requests += [
            TorchRequest(dist.isend(m.tensor, self.global_ranks[m.peer], self.group, tag=m.tag))
            for m in sends
        ]
        return requests

    def allgather_int64(self, send: torch.Tensor, out: torch.Tensor, deadline: float) -> None:
        """Every rank's `send` (int64) into `out`, rank r's at block r, by the backend's own collective.

        For control data (commlab's argument check): one native call costs less than the ceil(lg p)
        point-to-point rounds of a schedule.
        """
        work = _ALL_GATHER(out, send, group=self.group, async_op=True)
        TorchRequest(work).wait(deadline - time.monotonic())

    def __repr__(self) -> str:
        return f"TorchTransport({self.backend}, rank {self.rank} of {self.size})"


# torch >= 2.11 names it all_gather_single; all_gather_into_tensor is the older (now deprecated) name
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _group_timeout(group: dist.ProcessGroup, device_type: str) -> float:
    """The timeout set for the process group (init_process_group(timeout=...)), else DEFAULT_TIMEOUT_S.

    torch's own default (30 minutes for gloo) is far too long to notice a dead peer, so a group left at
    that default gets commlab's 60 s instead.
    """
    try:
        backend = group._get_backend(torch.device(device_type))
        seconds = backend.options._timeout.total_seconds()
    except (AttributeError, RuntimeError):
        return DEFAULT_TIMEOUT_S
    return DEFAULT_TIMEOUT_S if seconds == dist.default_pg_timeout.total_seconds() else seconds


def wait_all(requests: list[Request], deadline: float, describe: Callable[[int], str]) -> None:
    """Wait for every request until `deadline` (time.monotonic()); name the stuck transfer on failure."""
    for index, request in enumerate(requests):
        try:
            request.wait(deadline - time.monotonic())
        except CollectiveTimeoutError as error:
            raise CollectiveTimeoutError(f"{describe(index)} timed out ({error})") from error
        except TransportError as error:
            raise TransportError(f"{describe(index)} failed: {error}") from error
