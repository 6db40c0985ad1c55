"""commlab's point-to-point transport over a c10d Backend object (the inner gloo the backend creates).

The torch backend cannot use `collectives.transport.TorchTransport`: that one calls `torch.distributed`'s
functions on a registered ProcessGroup, while the backend's own traffic runs on a private gloo Backend
that torch never sees (so its tags and its collectives never meet the program's). This transport posts
the executor's sends and receives on that Backend directly, with ranks of the group.
"""

from __future__ import annotations

import time

import torch

from commlab.collectives.hosts import host_map_from_env
from commlab.collectives.transport import Message, TorchRequest
from commlab.collectives.tuning import piece_bytes_for_host


class BackendTransport:
    """Point-to-point over one c10d Backend (`ProcessGroupGloo`): tagged sends and receives, group ranks."""

    def __init__(
        self,
        backend: torch._C._distributed_c10d.Backend,
        rank: int,
        size: int,
        timeout_s: float,
        global_ranks: list[int] | None = None,
    ) -> None:
        self.inner = backend
        self.rank = rank
        self.size = size
        self.global_ranks = list(range(size)) if global_ranks is None else list(global_ranks)
        self.backend = "gloo"  # for the calibrated profile auto ranks algorithms by
        self.device_type = "cpu"
        self.default_timeout = timeout_s
        self.piece_bytes = piece_bytes_for_host(size)
        # which ranks share a host ($COMMLAB_HOSTS or torchrun's LOCAL_WORLD_SIZE), for auto across hosts
        self.hosts = host_map_from_env(self.global_ranks)

    def post(self, sends: list[Message], recvs: list[Message]) -> list[TorchRequest]:
        """Post a step's receives, then its sends; the requests come back in that order."""
        requests = [TorchRequest(self.inner.recv([m.tensor], m.peer, m.tag)) for m in recvs]
        requests += [TorchRequest(self.inner.send([m.tensor], m.peer, m.tag)) for m in sends]
        return requests

    def allgather_int64(self, send: torch.Tensor, out: torch.Tensor, deadline: float) -> None:
        """Every rank's `send` into `out` (rank r's at block r) by gloo's own allgather (control data)."""
        work = self.inner.allgather([list(out.chunk(self.size))], [send])
        TorchRequest(work).wait(deadline - time.monotonic())

    def __repr__(self) -> str:
        return f"BackendTransport(gloo, rank {self.rank} of {self.size})"
