"""How the ranks of a SharedMemoryTransport find their segment: through the group's Store, or collectively.

`join_segment` (what `SharedMemoryTransport(group)` and so `commlab.communicator()` use) is not collective:
a rank takes a number from the group's c10d Store (`add`); the first makes the segment and names it under
a key, every later one waits for that key (the maker is not waiting for anything, so this wait is short and
has a timeout) and maps the file. No rank waits for another to *join*: a rank that has not joined yet is
waited for only by the transfers and argument checks that need it, as gloo would (see shm.py). The key
carries the maker's host identity, so a rank on another host (or with another /dev/shm) finds out at once,
says so under its own key (peers waiting for it raise instead of timing out) and raises.

The collective setup (the torch backend's, where torch makes group creation collective anyway) takes three
small collective exchanges: an allgather of int64 rows (process
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

import atexit
import hashlib
import mmap
import os
from datetime import timedelta
from typing import Protocol

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from commlab.collectives import shm_segment as seg
from commlab.collectives.transport import _ALL_GATHER, _group_timeout
from commlab.errors import CollectiveTimeoutError, CommlabError, TransportError, invalid

SETUP_FAILED = "shared-memory transport setup failed"  # the maker could not make it: every rank keeps gloo
_GENERATIONS: dict[str, int] = {}  # transports this process made per group name (the Store key's run part)
_MADE: dict[str, int] = {}  # segments this process made (path: pid), unlinked at exit if still there


@atexit.register
def _unlink_made() -> None:
    """A segment some rank never joined is still named: its maker removes it when it exits."""
    for path, pid in _MADE.items():
        if pid == os.getpid():  # not in a forked child
            seg.unlink(path)


def host_tag() -> str:
    """This host's identity (host name and boot id) as 14 hex digits."""
    return hashlib.blake2b(seg.host_identity(), digest_size=7).hexdigest()


def group_store(group: dist.ProcessGroup) -> tuple[dist.Store, str]:
    """The Store of a registered `group` and this transport's key prefix in it.

    The group's store is torch's own prefix store of that group; the prefix counts the transports this
    process made over the group, so every rank must make them in the same order (as gloo's own setup of a
    group requires its calls to be)."""
    try:
        store = distributed_c10d._get_process_group_store(group)
    except (KeyError, AttributeError, RuntimeError) as error:
        what = f"the shared-memory transport found no c10d Store for group {group}"
        raise CommlabError(f"{what}: {error}") from error
    name = str(getattr(group, "group_name", id(group)))
    generation = _GENERATIONS.get(name, 0)
    _GENERATIONS[name] = generation + 1
    return store, f"commlab-shm/{generation}"


def absent_key(prefix: str, rank: int) -> str:
    """Where rank `rank` says why it could not join (read by peers waiting for it)."""
    return f"{prefix}/absent/{rank}"


def join_segment(
    store: dist.Store, prefix: str, rank: int, nbytes: int, timeout: float, group: str
) -> tuple[mmap.mmap, str]:
    """Make (first rank here) or map (every later one) the `nbytes` segment named under `prefix`.

    Returns the mapping and the file's path. Raises TransportError with SETUP_FAILED in its message when
    the maker could not make it (every rank then reads the same answer and keeps gloo), TransportError
    when this rank cannot map it (another host: the host map or COMMLAB_SHM=0 must say so), and
    CollectiveTimeoutError when the maker names nothing within `timeout` seconds (it died while making it).
    """
    name_key = f"{prefix}/segment"
    if int(store.add(f"{prefix}/members", 1)) == 1:
        seg.sweep_stale()
        path = seg.segment_path(os.getpid(), seg.new_token())
        try:
            mm = seg.create(path, nbytes)
        except OSError as error:
            reason = f"rank {rank} could not create a {nbytes}-byte segment: {error}"
            store.set(name_key, f"error {reason}")
            raise TransportError(f"{SETUP_FAILED}: {reason}") from error
        _MADE[path] = os.getpid()
        store.set(name_key, f"{host_tag()} {path}")
        return mm, path
    try:
        store.wait([name_key], timedelta(seconds=timeout))
    except RuntimeError as error:
        raise CollectiveTimeoutError(
            f"joining the shared-memory transport of {group}: the rank that makes its segment did not "
            f"name it within {timeout:g} s (it exited?): {error}"
        ) from error
    host, detail = store.get(name_key).decode().split(" ", 1)
    if host == "error":
        raise TransportError(f"{SETUP_FAILED}: {detail}")
    why = ""
    if host != host_tag():
        why = "it runs on another host than the rank that made the group's segment"
    else:
        try:
            return seg.attach(detail, nbytes), detail
        except (OSError, TransportError) as error:
            why = f"it could not map the group's segment {detail} ({error})"
    store.set(absent_key(prefix, rank), why)
    raise TransportError(
        f"rank {rank} of {group} cannot use the shared-memory transport: {why}. Give the host map "
        "($COMMLAB_HOSTS or LOCAL_WORLD_SIZE) so that commlab keeps gloo between hosts, or set COMMLAB_SHM=0"
    )


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
        return f"the gloo group of global ranks {self.global_ranks}"


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
