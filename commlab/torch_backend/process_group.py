"""`CommlabProcessGroup`: the ProcessGroup torch gets for backend "commlab", each op run by commlab.

torch.distributed's Python functions call the group's methods by name (`group.allreduce(...)`), and C++
clients (DDP's reducer) reach them through the ProcessGroup trampoline; every collective below runs
commlab's schedule for its op on the group's Communicator. Its transport: shared memory when every rank
of the group is on one host (`SharedMemoryTransport`, a segment per group, set up over `_native` while
the group is being made), unless $COMMLAB_SHM=0; else a private gloo Backend (`_data`) that carries only
commlab's traffic (`BackendTransport`). Ops the group does not define (gather, scatter, send, recv,
recv_anysource, monitored_barrier) and ops torch's C++ dispatcher issues itself (functional collectives,
used by DTensor) are served by a gloo Backend registered for the CPU device (`_native`): gloo's own
algorithms, on connections apart from commlab's, so the two never mix messages.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

import commlab.collectives.api as api
from commlab.collectives.communicator import Communicator, Work
from commlab.collectives.shm import SharedMemoryTransport, backend_shared_memory_transport, shm_enabled
from commlab.errors import InvalidArgumentError, UnsupportedOperationError
from commlab.torch_backend import config
from commlab.torch_backend.convert import (
    movable,
    one,
    option,
    reduction,
    row_splits,
    same_dtype,
    unflatten,
    uniform,
)
from commlab.torch_backend.name import BACKEND_NAME
from commlab.torch_backend.transport import BackendTransport
from commlab.torch_backend.work import CommlabWork

Launch = Callable[[bool], Work | None]  # starts commlab's call (async or not); its Work when async
CALLS: Counter[str] = (
    Counter()
)  # ops this process ran through commlab's schedules, every group (tests read it)


class CommlabProcessGroup(dist.ProcessGroup):
    """A torch.distributed ProcessGroup whose collectives run commlab's schedules (see the module doc)."""

    def __init__(
        self,
        store: dist.Store,
        rank: int,
        size: int,
        timeout: timedelta,
        global_ranks: list[int] | None = None,
    ) -> None:
        super().__init__(rank, size)
        self._group_name = ""
        self._group_desc = ""
        self.timeout_s = timeout.total_seconds()
        self._pid = os.getpid()  # shutdown in a forked child (a data loader worker) leaves the group be
        self._native = dist.ProcessGroupGloo(dist.PrefixStore("commlab/native", store), rank, size, timeout)
        self._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO, self._native)
        self._data: dist.ProcessGroupGloo | None = None
        # shared memory if allowed and every rank is on this host: set up over _native, which nothing
        # else uses before this constructor returns (every rank makes the group, so every rank sets up)
        transport = None
        if shm_enabled(default=True):
            transport = backend_shared_memory_transport(
                self._native, rank, size, self.timeout_s, global_ranks
            )
        if transport is None:
            self._data = dist.ProcessGroupGloo(dist.PrefixStore("commlab/data", store), rank, size, timeout)
            transport = BackendTransport(self._data, rank, size, self.timeout_s, global_ranks)
        self.communicator = Communicator(transport, timeout=self.timeout_s)

    # --- identity -------------------------------------------------------------------------------------
    def getBackendName(self) -> str:
        return BACKEND_NAME

    def getGroupName(self) -> str:
        return self._group_name

    def setGroupName(self, name: str) -> None:
        self._group_name = name

    def getGroupDesc(self) -> str:
        return self._group_desc

    def setGroupDesc(self, desc: str) -> None:
        self._group_desc = desc

    def shutdown(self) -> None:
        """Stop commlab's worker, release the shared-memory segment (this rank's mapping) and the gloo
        backends (destroy_process_group calls this). In a forked child of the rank (a data loader worker)
        it does nothing: the worker thread, the segment and the connections are the parent's."""
        if os.getpid() != self._pid:
            return
        self.communicator.close()
        transport = self.communicator.transport
        if isinstance(transport, SharedMemoryTransport):
            transport.close()
        for backend in (self._data, self._native):
            if backend is not None:
                with contextlib.suppress(RuntimeError):  # already shut down
                    backend.shutdown()

    # --- reductions -----------------------------------------------------------------------------------
    def allreduce(self, tensors: list[torch.Tensor], opts: object = None) -> CommlabWork:
        tensor = one("allreduce", tensors)
        op, factor = reduction("allreduce", option(opts, "reduceOp", dist.ReduceOp.SUM), tensor.dtype)

        def launch(async_op: bool) -> Work | None:
            if factor is not None:
                tensor.mul_(factor)
            return api.all_reduce(tensor, op, self.communicator, self._algorithm("allreduce"), async_op)

        return self._start("allreduce", [tensor], launch, opts)

    def allreduce_coalesced(self, tensors: list[torch.Tensor], opts: object = None) -> CommlabWork:
        dtype = same_dtype("allreduce_coalesced", tensors)
        op, factor = reduction("allreduce_coalesced", option(opts, "reduceOp", dist.ReduceOp.SUM), dtype)
        flat = torch.cat([t.reshape(-1) for t in tensors])
        if factor is not None:
            flat.mul_(factor)

        def launch(async_op: bool) -> Work | None:
            return api.all_reduce(flat, op, self.communicator, self._algorithm("allreduce"), async_op)

        return self._start("allreduce_coalesced", tensors, launch, opts, lambda: unflatten(flat, tensors))

    def reduce(self, tensors: list[torch.Tensor], opts: object = None) -> CommlabWork:
        tensor = one("reduce", tensors)
        op, factor = reduction("reduce", option(opts, "reduceOp", dist.ReduceOp.SUM), tensor.dtype)
        root = option(opts, "rootRank", 0)
        # PREMUL_SUM reduces a scaled copy, so ranks other than the root keep their input (as without it)
        source = tensor if factor is None else tensor * factor

        def launch(async_op: bool) -> Work | None:
            return api.reduce(
                source, self._global(root), op, self.communicator, self._algorithm("reduce"), async_op
            )

        def after() -> None:
            if source is not tensor and self.rank() == root:
                tensor.copy_(source)

        return self._start("reduce", [tensor], launch, opts, after)

    def reduce_scatter(
        self, outputs: list[torch.Tensor], inputs: list[list[torch.Tensor]], opts: object = None
    ) -> CommlabWork:
        output = one("reduce_scatter", outputs)
        pieces = one("reduce_scatter", inputs)
        uniform("reduce_scatter", pieces, output)
        flat = torch.cat([t.reshape(-1) for t in pieces])
        return self._reduce_scatter_flat("reduce_scatter", output, flat, opts, owned=True)

    def reduce_scatter_single(
        self, output: torch.Tensor, input: torch.Tensor, opts: object = None
    ) -> CommlabWork:
        return self._reduce_scatter_flat("reduce_scatter_tensor", output, input, opts, owned=False)

    _reduce_scatter_base = reduce_scatter_single

    def reduce_scatter_single_coalesced(
        self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: object = None
    ) -> CommlabWork:
        label = "reduce_scatter_tensor_coalesced"
        same_dtype(label, [*outputs, *inputs])
        p = self.size()
        sizes = [o.numel() for o in outputs]
        for o, i in zip(outputs, inputs, strict=True):
            if i.numel() != p * o.numel():
                raise InvalidArgumentError(
                    f"{label}: an input has {i.numel()} elements, not {p} x {o.numel()}"
                )
        flat = torch.cat([i.reshape(p, -1) for i in inputs], dim=1).reshape(-1)  # block r: every input's r
        out = flat.new_empty(sum(sizes))
        return self._reduce_scatter_flat(label, out, flat, opts, owned=True, outputs=outputs)

    reduce_scatter_tensor_coalesced = reduce_scatter_single_coalesced

    def _reduce_scatter_flat(
        self,
        label: str,
        output: torch.Tensor,
        flat: torch.Tensor,
        opts: object,
        owned: bool,
        outputs: list[torch.Tensor] | None = None,
    ) -> CommlabWork:
        op, factor = reduction(label, option(opts, "reduceOp", dist.ReduceOp.SUM), flat.dtype)
        if factor is not None:  # PREMUL_SUM: scale each rank's input, then sum
            flat = flat.mul_(factor) if owned else flat * factor

        def launch(async_op: bool) -> Work | None:
            return api.reduce_scatter(
                output, flat, op, self.communicator, self._algorithm("reduce_scatter"), async_op
            )

        after = None if outputs is None else (lambda: unflatten(output, outputs))
        return self._start(label, outputs or [output], launch, opts, after)

    # --- data movement --------------------------------------------------------------------------------
    def broadcast(self, tensors: list[torch.Tensor], opts: object = None) -> CommlabWork:
        tensor = one("broadcast", tensors)
        root = option(opts, "rootRank", 0)
        buffer = movable(tensor)

        def launch(async_op: bool) -> Work | None:
            return api.broadcast(
                buffer, self._global(root), self.communicator, self._algorithm("broadcast"), async_op
            )

        return self._start("broadcast", [tensor], launch, opts)

    def allgather(
        self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: object = None
    ) -> CommlabWork:
        out_list = one("allgather", outputs)
        tensor = one("allgather", inputs)
        uniform("allgather", out_list, tensor)
        flat = movable(tensor).new_empty(self.size() * tensor.numel())

        def launch(async_op: bool) -> Work | None:
            return api.all_gather(
                flat, movable(tensor), self.communicator, self._algorithm("allgather"), async_op
            )

        return self._start("allgather", out_list, launch, opts, lambda: unflatten(flat, out_list))

    def all_gather_single(
        self, output: torch.Tensor, input: torch.Tensor, opts: object = None
    ) -> CommlabWork:
        if output.dtype != input.dtype:
            raise InvalidArgumentError(
                f"all_gather_into_tensor: output {output.dtype} != input {input.dtype}"
            )
        out, inp = movable(output), movable(input)

        def launch(async_op: bool) -> Work | None:
            return api.all_gather(out, inp, self.communicator, self._algorithm("allgather"), async_op)

        return self._start("all_gather_into_tensor", [output], launch, opts)

    _allgather_base = all_gather_single

    def all_gather_single_coalesced(
        self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: object = None
    ) -> CommlabWork:
        label = "all_gather_into_tensor_coalesced"
        same_dtype(label, [*outputs, *inputs])
        p = self.size()
        flat_in = torch.cat([movable(t).reshape(-1) for t in inputs])
        flat_out = flat_in.new_empty(p * flat_in.numel())

        def launch(async_op: bool) -> Work | None:
            return api.all_gather(
                flat_out, flat_in, self.communicator, self._algorithm("allgather"), async_op
            )

        def after() -> None:  # block r of flat_out is every input of rank r, in order
            blocks = flat_out.view(p, -1)
            start = 0
            for o, i in zip(outputs, inputs, strict=True):
                n = movable(i).numel()
                movable(o).view(p, n).copy_(blocks[:, start : start + n])
                start += n

        return self._start(label, outputs, launch, opts, after)

    allgather_into_tensor_coalesced = all_gather_single_coalesced

    def all_to_all_single(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        output_split_sizes: list[int],
        input_split_sizes: list[int],
        opts: object = None,
    ) -> CommlabWork:
        out, inp = movable(output), movable(input)
        out_splits = row_splits(output, out, output_split_sizes)
        in_splits = row_splits(input, inp, input_split_sizes)

        def launch(async_op: bool) -> Work | None:
            return api.all_to_all(
                out, inp, out_splits, in_splits, self.communicator, self._algorithm("alltoall"), async_op
            )

        return self._start("all_to_all_single", [output], launch, opts)

    alltoall_base = all_to_all_single

    def alltoall(
        self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: object = None
    ) -> CommlabWork:
        same_dtype("all_to_all", [*outputs, *inputs])
        flat_in = torch.cat([movable(t).reshape(-1) for t in inputs])
        flat_out = flat_in.new_empty(sum(movable(t).numel() for t in outputs))
        in_splits = [movable(t).numel() for t in inputs]
        out_splits = [movable(t).numel() for t in outputs]

        def launch(async_op: bool) -> Work | None:
            return api.all_to_all(
                flat_out,
                flat_in,
                out_splits,
                in_splits,
                self.communicator,
                self._algorithm("alltoall"),
                async_op,
            )

        return self._start("all_to_all", outputs, launch, opts, lambda: unflatten(flat_out, outputs))

    def barrier(self, opts: object = None) -> CommlabWork:
        token = torch.zeros(1, dtype=torch.int32)

        def launch(async_op: bool) -> Work | None:
            return api.all_reduce(token, "sum", self.communicator, "auto", async_op)

        return self._start("barrier", [token], launch, opts)

    # --- ops the backend refuses rather than serve wrongly -------------------------------------------
    def allgather_coalesced(self, *args: object, **kwargs: object) -> CommlabWork:
        raise UnsupportedOperationError(
            "commlab backend: allgather_coalesced (a list of tensor lists) is not supported; use "
            "all_gather_into_tensor_coalesced (dist.all_gather_into_tensor under dist._coalescing_manager)"
        )

    # --- plumbing -------------------------------------------------------------------------------------
    def _algorithm(self, op: str) -> str:
        return config.settings().algorithm(op)

    def _global(self, root: int) -> int:
        """The global rank of group rank `root`: torch hands the group its own ranks, while commlab's API
        takes global ranks (torch.distributed's convention) and maps them back by the transport's list."""
        ranks = self.communicator.transport.global_ranks
        if not isinstance(root, int) or not 0 <= root < len(ranks):
            raise InvalidArgumentError(f"commlab backend: root {root!r} is not a rank of 0..{len(ranks) - 1}")
        return ranks[root]

    def _start(
        self,
        label: str,
        outputs: list[torch.Tensor],
        launch: Launch,
        opts: object,
        after: Callable[[], None] | None = None,
    ) -> CommlabWork:
        """Start commlab's call and return its torch Work; blocking calls (asyncOp=False) run inline."""
        CALLS[label] += 1
        self.communicator.check = config.settings().check
        work = CommlabWork(label, outputs, self.timeout_s)
        async_op = bool(option(opts, "asyncOp", True))
        try:
            pending = launch(async_op)
        except InvalidArgumentError as error:
            raise type(error)(f"commlab backend, {label}: {error}") from error
        if pending is None:
            work.finish(None, after)
        else:
            pending.add_done_callback(lambda error: work.finish(error, after))
        return work
