"""How the ranks of a SharedMemoryTransport exchange their setup data before the segment exists.

Setting the transport up takes three small collective exchanges: an allgather of int64 rows (process
ids, start times, host ids), a broadcast of the segment's token from rank 0, and an allgather of flags
(mapped? may read every peer's memory?). Once the segment is mapped, everything else travels through
it. A setup channel carries those three exchanges over something the ranks already share:

- `GroupChannel`: a registered torch.distributed gloo group (`SharedMemoryTransport(group)`).
- `BackendChannel`: a raw c10d Backend object that torch never registered (the torch backend's own
  private `ProcessGroupGloo`), with the group's rank, size and global ranks given explicitly, since
  `torch.distributed`'s functions cannot name such a backend.

Each exchange returns a `dist.Work` the transport waits on with its timeout.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist

from commlab.collectives.transport import _ALL_GATHER, _group_timeout
from commlab.errors import CommlabError, invalid


class SetupChannel(Protocol):
    """The group a transport is set up over: who this rank is, and two collective exchanges."""

    rank: int
    size: int
    global_ranks: list[int]  # rank r of the group is global rank global_ranks[r] (for the host map)
    timeout: float  # seconds a setup exchange (and, by default, a collective) may take

    def allgather(self, out: torch.Tensor, send: torch.Tensor) -> dist.Work:
        """Every rank's `send` into `out`, rank r's at block r."""
        ...

    def broadcast(self, tensor: torch.Tensor) -> dist.Work:
        """Group rank 0's `tensor` into every rank's."""
        ...

    def describe(self) -> str:
        """The group, for error messages."""
        ...


class GroupChannel:
    """Setup over a registered torch.distributed gloo group (None: the default group)."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise CommlabError(
                "the shared-memory transport sets up over torch.distributed: initialize it first"
            )
        self.group = group if group is not None else dist.group.WORLD
        if str(dist.get_backend(self.group)).lower() != "gloo":
            raise invalid("group", dist.get_backend(self.group), "a gloo process group")
        self.rank = dist.get_rank(self.group)
        self.size = dist.get_world_size(self.group)
        if self.rank < 0:
            raise CommlabError("this process is not a member of the group it was asked to communicate in")
        self.global_ranks = [dist.get_global_rank(self.group, r) for r in range(self.size)]
        self.timeout = _group_timeout(self.group, "cpu")

    def allgather(self, out: torch.Tensor, send: torch.Tensor) -> dist.Work:
        return _ALL_GATHER(out, send, group=self.group, async_op=True)

    def broadcast(self, tensor: torch.Tensor) -> dist.Work:
        return dist.broadcast(tensor, self.global_ranks[0], group=self.group, async_op=True)

    def describe(self) -> str:
        return str(self.group)


class BackendChannel:
    """Setup over a c10d Backend object (e.g. a private `ProcessGroupGloo`): its own ranks, 0..size-1.

    `global_ranks`: the group's ranks in the world (for the host map of $COMMLAB_HOSTS or torchrun's
    LOCAL_WORLD_SIZE); default 0..size-1.
    """

    def __init__(
        self,
        backend: torch._C._distributed_c10d.Backend,
        rank: int,
        size: int,
        timeout: float,
        global_ranks: list[int] | None = None,
    ) -> None:
        if not isinstance(size, int) or size < 1:
            raise invalid("size", size, "a positive number of ranks")
        if not isinstance(rank, int) or not 0 <= rank < size:
            raise invalid("rank", rank, f"a rank of 0..{size - 1}")
        if not timeout > 0:
            raise invalid("timeout", timeout, "a positive number of seconds")
        ranks = list(range(size)) if global_ranks is None else list(global_ranks)
        if len(ranks) != size:
            raise invalid("global_ranks", ranks, f"{size} ranks, one per rank of the group")
        self.backend = backend
        self.rank = rank
        self.size = size
        self.global_ranks = ranks
        self.timeout = float(timeout)

    def allgather(self, out: torch.Tensor, send: torch.Tensor) -> dist.Work:
        return self.backend.allgather([list(out.chunk(self.size))], [send])

    def broadcast(self, tensor: torch.Tensor) -> dist.Work:
        options = dist.BroadcastOptions()
        options.rootRank = 0
        return self.backend.broadcast([tensor], options)

    def describe(self) -> str:
        return f"the {self.size}-rank group of global ranks {self.global_ranks}"
