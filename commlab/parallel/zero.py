"""ZeRO stage 1: optimizer states sharded across the data-parallel group.

Every rank keeps the full model, but only 1/p of the optimizer state. Parameters are laid out in one flat
buffer per dtype, padded to a multiple of p; rank r owns elements [r*n, (r+1)*n) of it. A step
reduce-scatters (averages) the flat gradients so each rank holds the mean gradient of its shard, runs the
wrapped torch optimizer on its shard alone, then all-gathers the updated shards into every replica.

The result equals plain data parallel for optimizers whose update of an element reads only that element's
gradient and state (SGD, Adam, AdamW, RMSprop, Adagrad, ...). Optimizers that use per-tensor norms (LAMB,
LARS) would see shard boundaries instead of tensors; use `clip_grad_norm_` for global-norm clipping.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from commlab.collectives.api import Group, all_gather, all_reduce, communicator, reduce_scatter
from commlab.errors import invalid
from commlab.parallel.flat import broadcast_tensors, check_algorithm, flatten, group_by_dtype


class _Shard:
    """The parameters of one dtype, their flat layout, and this rank's slice of it as a leaf tensor."""

    def __init__(self, params: list[nn.Parameter], world_size: int, rank: int) -> None:
        self.params = params
        self.flat = flatten([p.detach() for p in params], pad_to=world_size)
        self.shard_numel = self.flat.numel() // world_size
        self.start = rank * self.shard_numel
        self.master = nn.Parameter(self.flat[self.start : self.start + self.shard_numel].clone())
        self.grads = torch.zeros_like(self.flat)

    def gather_grads(self) -> None:
        """Copy each parameter's gradient (zeros where it has none) into the flat gradient buffer."""
        offset = 0
        for p in self.params:
            region = self.grads[offset : offset + p.numel()]
            if p.grad is None:
                region.zero_()
            else:
                region.copy_(p.grad.reshape(-1))
            offset += p.numel()

    def load_params(self) -> None:
        """Refresh the flat buffer and this rank's master slice from the model's parameters (the source of
        truth, so parameters loaded from a checkpoint after construction are not overwritten)."""
        offset = 0
        for p in self.params:
            self.flat[offset : offset + p.numel()].copy_(p.detach().reshape(-1))
            offset += p.numel()
        with torch.no_grad():
            self.master.copy_(self.flat[self.start : self.start + self.shard_numel])

    def scatter_params(self) -> None:
        """Copy the gathered flat parameters back into the model's parameters."""
        offset = 0
        with torch.no_grad():
            for p in self.params:
                p.copy_(self.flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()


class ZeroOptimizer:
    """Wraps `optimizer_class` (any torch optimizer) so each rank holds 1/p of its state (ZeRO-1).

    `algorithm` names the reduce-scatter and allgather algorithm (or "auto"). Use with a module that is
    not wrapped in DataParallel: `loss.backward()` leaves local gradients
    (repeated backwards accumulate, for gradient accumulation), `step()` averages and applies them.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        optimizer_class: type[torch.optim.Optimizer],
        group: Group = None,
        algorithm: str = "auto",
        **defaults: Any,
    ) -> None:
        params = list(params)
        if not params or not all(isinstance(p, torch.Tensor) for p in params):
            raise invalid("params", type(params).__name__, "a non-empty iterable of parameters (tensors)")
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
            raise invalid("optimizer_class", optimizer_class, "a torch.optim.Optimizer subclass")
        self.comm = communicator(group)
        self.algorithm = algorithm
        params = [p for p in params if p.requires_grad]
        check_algorithm(algorithm, ("reduce_scatter", "allgather"))
        broadcast_tensors(params, self.comm)
        self.shards = [
            _Shard(group_params, self.comm.size, self.comm.rank)
            for group_params in group_by_dtype(params).values()
        ]
        self.optimizer = optimizer_class([s.master for s in self.shards], **defaults)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The wrapped optimizer's param groups (set `lr` here for schedules)."""
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the model's gradients."""
        for shard in self.shards:
            for p in shard.params:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    def _reduce_grads(self) -> None:
        """Average the gradients across ranks; each rank keeps its shard's mean in `master.grad`."""
        for shard in self.shards:
            shard.gather_grads()
            mean = torch.empty_like(shard.master)
            reduce_scatter(mean, shard.grads, op="avg", group=self.comm, algorithm=self.algorithm)
            shard.master.grad = mean

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Average gradients now (if not already) and scale them to a global L2 norm <= max_norm.

        Returns the norm before clipping, the same on every rank. Call between backward and `step`.
        """
        if not all(s.master.grad is not None for s in self.shards):
            self._reduce_grads()
        squares = torch.zeros(1, dtype=torch.float64, device=self.shards[0].master.device)
        for shard in self.shards:
            squares += shard.master.grad.double().pow(2).sum()
        all_reduce(squares, group=self.comm)
        norm = math.sqrt(squares.item())
        if norm > max_norm:
            for shard in self.shards:
                shard.master.grad.mul_(max_norm / (norm + 1e-6))
        return norm

    @torch.no_grad()
    def step(self) -> None:
        """Average gradients (reduce-scatter), update this rank's shard, all-gather the parameters."""
        if not all(s.master.grad is not None for s in self.shards):
            self._reduce_grads()
        for shard in self.shards:
            shard.load_params()
        self.optimizer.step()
        for shard in self.shards:
            shard.master.grad = None
            all_gather(shard.flat, shard.master.detach(), group=self.comm, algorithm=self.algorithm)
            shard.scatter_params()

    def local_state_bytes(self) -> int:
        """Bytes of optimizer state held by this rank (the shard's moments, step counters, ...)."""
        return sum(
            value.numel() * value.element_size()
            for state in self.optimizer.state.values()
            for value in state.values()
            if isinstance(value, torch.Tensor)
        )

    def state_dict(self) -> dict[str, Any]:
        """This rank's optimizer shard, with the layout it belongs to (save one file per rank)."""
        return {
            "world_size": self.comm.size,
            "rank": self.comm.rank,
            "shard_numels": [s.shard_numel for s in self.shards],
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a shard saved by `state_dict` on the same rank of a group of the same size."""
        expected = (self.comm.size, self.comm.rank, [s.shard_numel for s in self.shards])
        found = (state.get("world_size"), state.get("rank"), state.get("shard_numels"))
        if found != expected:
            raise invalid(
                "state (world_size, rank, shard_numels)", found, f"{expected}, the layout of this optimizer"
            )
        self.optimizer.load_state_dict(state["optimizer"])
