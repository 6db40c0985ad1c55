"""Data parallel training on commlab's collectives: bucketed gradient allreduce overlapped with backward.

`DataParallel(module)` broadcasts rank 0's parameters and buffers, then hooks every parameter: when a
gradient is accumulated during backward it is copied into its bucket, and each full bucket is averaged
across the group with an asynchronous `commlab.all_reduce` while backward goes on computing the gradients
of earlier layers. An autograd end-of-backward callback waits for every bucket and writes the averaged
gradients back, so `loss.backward(); optimizer.step()` works exactly as with one process.

Buckets are filled in reverse registration order (roughly the order backward produces gradients) and
launched strictly in bucket order on every rank, so all ranks issue the same collectives in the same order
even when some parameters get no gradient in a step (their slots count as zeros).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from commlab.collectives.api import Group, all_reduce, communicator
from commlab.collectives.communicator import Work
from commlab.errors import invalid
from commlab.parallel.flat import broadcast_tensors, check_algorithm


@dataclass
class Bucket:
    """A flat gradient buffer for consecutive parameters of one dtype and device."""

    params: list[nn.Parameter]
    offsets: list[int]
    buffer: torch.Tensor
    ready: set[int] = field(default_factory=set)
    work: Work | None = None

    def slot(self, index: int) -> torch.Tensor:
        """The region of the buffer that holds parameter `index`'s gradient, shaped like the parameter."""
        param = self.params[index]
        start = self.offsets[index]
        return self.buffer[start : start + param.numel()].view_as(param)


def build_buckets(params: list[nn.Parameter], bucket_bytes: int) -> list[Bucket]:
    """Split `params` (in the given order) into buckets of at most `bucket_bytes` (one parameter at least)."""
    buckets: list[Bucket] = []
    current: list[nn.Parameter] = []
    size = 0

    def close() -> None:
        offsets, total = [], 0
        for p in current:
            offsets.append(total)
            total += p.numel()
        buffer = torch.zeros(total, dtype=current[0].dtype, device=current[0].device)
        buckets.append(Bucket(list(current), offsets, buffer))

    for param in params:
        nbytes = param.numel() * param.element_size()
        same_kind = current and (current[0].dtype, current[0].device) == (param.dtype, param.device)
        if current and (not same_kind or size + nbytes > bucket_bytes):
            close()
            current, size = [], 0
        current.append(param)
        size += nbytes
    if current:
        close()
    return buckets


class DataParallel(nn.Module):
    """Replicates `module` over the ranks of `group`; gradients are averaged during backward.

    bucket_mb: gradient bucket size in MiB (smaller buckets start communicating earlier, larger ones
    pay the per-collective latency fewer times). algorithm: the commlab allreduce algorithm, or "auto".
    """

    def __init__(
        self,
        module: nn.Module,
        group: Group = None,
        bucket_mb: float = 25.0,
        algorithm: str = "auto",
        timeout: float | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise invalid("module", type(module).__name__, "a torch.nn.Module")
        if not isinstance(bucket_mb, (int, float)) or isinstance(bucket_mb, bool) or not bucket_mb > 0:
            raise invalid("bucket_mb", bucket_mb, "a positive number of MiB")
        self.module = module
        self.group = group
        self.algorithm = algorithm
        self.timeout = timeout
        self.comm = communicator(group)
        self.require_backward_grad_sync = True
        params = [p for p in module.parameters() if p.requires_grad]
        check_algorithm(algorithm, ("allreduce",))
        broadcast_tensors([*module.parameters(), *module.buffers()], group)
        self.buckets = build_buckets(list(reversed(params)), int(bucket_mb * (1 << 20)))
        self._slot_of = {
            id(p): (b, i) for b, bucket in enumerate(self.buckets) for i, p in enumerate(bucket.params)
        }
        self._next_launch = 0
        self._in_backward = False
        # The bucket layout is the same on every rank by construction, so the cross-rank argument check
        # runs on the first synced backward only (it would catch a rank wrapping a different model).
        self._checked = False
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params]

    def forward(self, *args, **kwargs):
        """Run the wrapped module (nothing to communicate in forward: parameters are already in sync)."""
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (no communication) inside the block; the next synced backward
        averages the accumulated sum, as torch's DistributedDataParallel.no_sync does."""
        previous = self.require_backward_grad_sync
        self.require_backward_grad_sync = False
        try:
            yield
        finally:
            self.require_backward_grad_sync = previous

    def _on_grad(self, param: nn.Parameter) -> None:
        """Post-accumulate hook: copy the gradient into its bucket; launch buckets that are complete."""
        if not self.require_backward_grad_sync or self.comm.size == 1:
            return
        if not self._in_backward:
            self._in_backward = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)
        b, i = self._slot_of[id(param)]
        bucket = self.buckets[b]
        if i in bucket.ready:
            raise RuntimeError(
                "a parameter received two gradients in one backward pass (a module used twice with "
                "reentrant checkpointing?); DataParallel needs one gradient per parameter per backward"
            )
        bucket.slot(i).copy_(param.grad)
        bucket.ready.add(i)
        self._launch_ready()

    def _launch_ready(self) -> None:
        """Start the allreduce of each complete bucket, in bucket order: every rank issues the same calls."""
        while self._next_launch < len(self.buckets):
            bucket = self.buckets[self._next_launch]
            if len(bucket.ready) < len(bucket.params):
                return
            self._launch(bucket)

    def _launch(self, bucket: Bucket) -> None:
        bucket.work = all_reduce(
            bucket.buffer,
            op="avg",
            group=self.comm,
            algorithm=self.algorithm,
            async_op=True,
            timeout=self.timeout,
            check=not self._checked,
        )
        self._next_launch += 1

    def _finish_backward(self) -> None:
        """End of backward: reduce the buckets still waiting (zeros for missing grads), wait, write back."""
        try:
            for bucket in self.buckets[self._next_launch :]:
                for i in set(range(len(bucket.params))) - bucket.ready:
                    bucket.slot(i).zero_()
                self._launch(bucket)
            for bucket in self.buckets:
                assert bucket.work is not None
                bucket.work.wait()
                for i, param in enumerate(bucket.params):
                    if param.grad is None:
                        param.grad = bucket.slot(i).clone()
                    else:
                        param.grad.copy_(bucket.slot(i))
            self._checked = True
        finally:
            for bucket in self.buckets:
                bucket.ready.clear()
                bucket.work = None
            self._next_launch = 0
            self._in_backward = False
