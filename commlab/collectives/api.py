"""The public collectives, shaped like torch.distributed's functions of the same names.

Each call validates its arguments, turns its tensors into one flat contiguous buffer (a view where possible,
a copy otherwise), picks the algorithm (`"auto"`: cheapest by cost formula) and runs the schedule on the
group's Communicator. `group` is a torch.distributed ProcessGroup, an mpi4py communicator or a
Communicator; None is torch.distributed's default group, or MPI.COMM_WORLD when torch.distributed is not
initialized and the program runs on MPI (it imported mpi4py.MPI). A ProcessGroup or MPI communicator gets
one Communicator, created on first use and kept in `_COMMUNICATORS`. Tensors may also be numpy arrays
(used in place through `torch.from_numpy`).
"""

from __future__ import annotations

import atexit
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from commlab.collectives.algorithms import ALGORITHMS
from commlab.collectives.communicator import DTYPES, Call, Communicator, Work, encode_signature
from commlab.collectives.executor import REDUCE_OPS
from commlab.collectives.mpi import MPITransport, comm_key, is_mpi_comm
from commlab.collectives.shm import SharedMemoryTransport, shared_memory_transport
from commlab.collectives.transport import TorchTransport
from commlab.collectives.tuning import Choice, resolve
from commlab.errors import InvalidArgumentError, UnsupportedOperationError, invalid

Group = dist.ProcessGroup | Communicator | Any | None  # Any: an mpi4py communicator

_COMMUNICATORS: dict[object, Communicator] = {}
_CHOICE_CACHE = 1024  # resolved calls kept per communicator

_TORCH_OPS = {
    dist.ReduceOp.SUM: "sum",
    dist.ReduceOp.AVG: "avg",
    dist.ReduceOp.MAX: "max",
    dist.ReduceOp.MIN: "min",
    dist.ReduceOp.PRODUCT: "prod",
}
DTYPE_NAMES = tuple(str(d).replace("torch.", "") for d in DTYPES)


def communicator(group: Group = None) -> Communicator:
    """The Communicator of a ProcessGroup or MPI communicator (None: the default), created once and reused."""
    if group is None and _MPI_DEFAULT:  # the common case of an MPI program, checked in few operations
        MPI, comm = _MPI_DEFAULT
        if not _dist_initialized() and not MPI.Is_finalized():
            return comm
        _MPI_DEFAULT.clear()
    if group is None and _DIST_DEFAULT and dist.group.WORLD is _DIST_DEFAULT[0]:  # torch's default group
        return _DIST_DEFAULT[1]
    if isinstance(group, Communicator):
        return group
    if group is None and _runs_on_mpi():
        MPI = sys.modules["mpi4py.MPI"]
        world = MPI.COMM_WORLD  # never freed: no reuse check needed
        key = comm_key(world)
        comm = _COMMUNICATORS.get(key)
        if comm is None:
            comm = _COMMUNICATORS[key] = Communicator(MPITransport(world))
        _MPI_DEFAULT[:] = [MPI, comm]
        return comm
    if is_mpi_comm(group):
        key = comm_key(group)
        comm = _COMMUNICATORS.get(key)
        if comm is None or _freed_and_reused(comm, group):
            comm = Communicator(MPITransport(group))
            _COMMUNICATORS[key] = comm
        return comm
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise invalid(
            "group", group, "None, a torch.distributed ProcessGroup, an mpi4py communicator or a Communicator"
        )
    key = group if group is not None else "default"
    comm = _COMMUNICATORS.get(key)
    if comm is None or (group is None and comm.transport.group is not dist.group.WORLD):
        comm = Communicator(shared_memory_transport(group) or TorchTransport(group))
        _COMMUNICATORS[key] = comm
    if group is None and comm.transport.group is not None:
        _DIST_DEFAULT[:] = [comm.transport.group, comm]
    return comm


def release(group: Group = None) -> None:
    """Close and forget the cached Communicator of `group` (None: of every group).

    Call it before `torch.distributed.destroy_process_group()` or `MPI.Finalize()`; it also runs at
    interpreter exit, so no process group outlives the interpreter through commlab's cache (gloo may abort a
    process whose group is destroyed during finalization: "terminate called without an active exception").
    """
    _MPI_DEFAULT.clear()
    _DIST_DEFAULT.clear()
    if group is None:
        comms = list(_COMMUNICATORS.values())
        _COMMUNICATORS.clear()
    elif isinstance(group, Communicator):
        comms = [group]
        for key in [k for k, c in _COMMUNICATORS.items() if c is group]:
            del _COMMUNICATORS[key]
    else:
        key = comm_key(group) if is_mpi_comm(group) else group
        owned = [
            k for k, c in _COMMUNICATORS.items() if k == key or getattr(c.transport, "group", None) is group
        ]
        comms = [_COMMUNICATORS.pop(k) for k in owned]
    for comm in comms:
        comm.close()
        if isinstance(comm.transport, SharedMemoryTransport):  # made here, so released here
            comm.transport.close()


atexit.register(release)


_MPI_DEFAULT: list = []  # [mpi4py.MPI, COMM_WORLD's Communicator] once `communicator(None)` found MPI's
_DIST_DEFAULT: list = []  # [torch's default group, its Communicator] while that group is the default


def _dist_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _freed_and_reused(comm: Communicator, group: Any) -> bool:
    """True if the cached communicator's MPI communicator was freed and its handle now names `group`."""
    cached = getattr(comm.transport, "user_comm", None)
    return cached is not group and cached == sys.modules["mpi4py.MPI"].COMM_NULL


def _runs_on_mpi() -> bool:
    """True when torch.distributed is not initialized but the program has initialized MPI (mpi4py)."""
    if _dist_initialized():
        return False
    MPI = sys.modules.get("mpi4py.MPI")
    return MPI is not None and MPI.Is_initialized() and not MPI.Is_finalized()


def parse_op(op: object) -> str:
    """A reduction name from a string ('sum', 'avg', 'max', 'min', 'prod') or a torch ReduceOp."""
    if isinstance(op, str) and op.lower() in REDUCE_OPS:
        return op.lower()
    for torch_op, name in _TORCH_OPS.items():
        try:
            if op == torch_op:
                return name
        except (TypeError, RuntimeError):
            break
    raise invalid("op", op, f"{', '.join(REDUCE_OPS)} or torch.distributed.ReduceOp.SUM/AVG/MAX/MIN/PRODUCT")


def _check_tensor(name: str, tensor: object, comm: Communicator) -> torch.Tensor:
    """The tensor (a numpy array becomes a tensor sharing its memory), checked for dtype and device."""
    if isinstance(tensor, np.ndarray):
        if not tensor.flags.writeable:
            raise invalid(name, "a read-only numpy array", "a writeable numpy array or a torch.Tensor")
        try:
            tensor = torch.from_numpy(tensor)
        except TypeError:
            raise invalid(f"{name}.dtype", str(tensor.dtype), DTYPE_NAMES) from None
    if not isinstance(tensor, torch.Tensor):
        raise invalid(name, type(tensor).__name__, "a torch.Tensor or a numpy array")
    if tensor.dtype not in DTYPES:
        raise invalid(f"{name}.dtype", str(tensor.dtype).replace("torch.", ""), DTYPE_NAMES)
    want = comm.transport.device_type
    if tensor.device.type != want:
        raise invalid(f"{name}.device", str(tensor.device), f"{want} tensors on this {comm.transport!r}")
    return tensor


def _check_reduce(op: object, dtype: torch.dtype) -> str:
    name = parse_op(op)
    if name == "avg" and not dtype.is_floating_point:
        floats = [n for n, d in zip(DTYPE_NAMES, DTYPES, strict=True) if d.is_floating_point]
        raise invalid("dtype", str(dtype).replace("torch.", ""), f"for op='avg': {', '.join(floats)}")
    return name


def _resolve_algorithm(
    comm: Communicator, algorithm: str, op: str, nbytes: int, dtype: torch.dtype = torch.float32
) -> Choice:
    """The algorithm, segments and pieces of a call, by the communicator's cost model (for the dtype)."""
    if not isinstance(algorithm, str):
        raise invalid("algorithm", algorithm, ["auto", *ALGORITHMS])
    return resolve(op, algorithm, comm.size, nbytes, comm.cost_model_for(dtype), comm.piece_bytes, comm.hosts)


def _group_rank(comm: Communicator, rank: int, name: str, group: Group) -> int:
    """Translate a global rank (torch.distributed's convention for src/dst) into the group's rank."""
    if not isinstance(rank, int) or isinstance(rank, bool):
        raise invalid(name, rank, "an integer rank")
    transport = comm.transport
    ranks = getattr(transport, "global_ranks", list(range(comm.size)))
    if rank not in ranks:
        raise invalid(name, rank, f"a rank of this group: {ranks}")
    return ranks.index(rank)


def _submit(
    comm: Communicator,
    label: str,
    op: str,
    reduce_op: str | None,
    buffer: torch.Tensor,
    algorithm: str,
    root: int | None,
    finish,
    async_op: bool,
    timeout: float | None,
    check: bool | None,
    nbytes: int | None = None,
    replay_key: tuple | None = None,
    before: Any = None,
) -> Work | None:
    """Resolve the algorithm for `nbytes` (default: the buffer's; the cost formulas' convention) and run.

    The resolved choice and the call's signature are kept per communicator, keyed by everything they
    depend on, so a repeated call skips the cost model. `replay_key`, `before`: a blocking call is kept
    for `Communicator.replay` under this key (see `_replay_key`).
    """
    if nbytes is None:
        nbytes = buffer.numel() * buffer.element_size()
    if not isinstance(algorithm, str):
        raise invalid("algorithm", algorithm, ["auto", *ALGORITHMS])
    key = (op, reduce_op, buffer.dtype, buffer.numel(), root, algorithm, nbytes)
    cached = comm.choices.get(key)
    if cached is None:
        choice = _resolve_algorithm(comm, algorithm, op, nbytes, buffer.dtype)
        name, segments, pieces = choice.algorithm, choice.segments, choice.pieces
        signature = encode_signature(
            op, reduce_op, buffer.dtype, buffer.numel(), root, _ALGORITHM_INDEX[name], segments, pieces
        )
        cached = (name, segments, pieces, signature)
        if len(comm.choices) >= _CHOICE_CACHE:
            comm.choices.clear()
        comm.choices[key] = cached
    name, segments, pieces, signature = cached
    call = Call(op, reduce_op, buffer, name, segments, root, label, finish, signature, pieces)
    return comm.run(call, async_op, timeout, check, replay_key, before)


def _replay_key(name: str, async_op: bool, arguments: tuple, *tensors: object) -> tuple | None:
    """The key a blocking call is kept under for replay, or None if it is not kept.

    Everything the call's checks, algorithm choice and buffers depend on: the collective, its plain
    arguments (reduction, algorithm, root: strings and ints only, so the key is hashable and compares by
    value) and each tensor's address, dtype and element count. Only contiguous CPU-or-device torch tensors
    are kept: their flat views cover exactly the memory the key names (an address names one device: CUDA
    shares one virtual address space with the host), so a repeat on any tensor with the same key works on
    the same memory (the kept call holds the first one's storage, so its address cannot be reused by
    another allocation meanwhile). Built in few operations: it is on every call's path.
    """
    if async_op:
        return None
    for argument in arguments:
        kind = type(argument)
        if kind is not str and kind is not int:
            return None
    key = (name, *arguments)
    for tensor in tensors:
        if not isinstance(tensor, torch.Tensor) or not tensor.is_contiguous():
            return None
        key += (tensor.data_ptr(), tensor.dtype, tensor.numel())
    return key


_ALGORITHM_INDEX = {name: index for index, name in enumerate(ALGORITHMS)}


def _flat_work(tensor: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A flat contiguous buffer over the tensor's elements: a view if possible (True), else a copy (False)."""
    if tensor.is_contiguous():
        return tensor.view(-1), True
    return tensor.contiguous().view(-1), False


def _private_copy(comm: Communicator, tensor: torch.Tensor, async_op: bool) -> torch.Tensor:
    """A flat copy of `tensor` that the schedule may overwrite: the communicator's staging buffer for a
    blocking call (no fresh allocation and its page faults per call), a clone for an async one (whose
    buffer must outlive the call)."""
    if async_op:
        return tensor.reshape(-1).clone()
    return comm.staging(tensor, tensor.numel()).copy_(tensor.reshape(-1))


def all_reduce(
    tensor: torch.Tensor,
    op: object = "sum",
    group: Group = None,
    algorithm: str = "auto",
    async_op: bool = False,
    timeout: float | None = None,
    check: bool | None = None,
) -> Work | None:
    """Reduce `tensor` across the group in place on every rank (op: sum, avg, max, min, prod)."""
    comm = communicator(group)
    key = _replay_key("all_reduce", async_op, (op, algorithm), tensor)
    if key is not None and comm.replay(key, timeout, check):
        return None
    tensor = _check_tensor("tensor", tensor, comm)
    reduce_op = _check_reduce(op, tensor.dtype)
    buffer, is_view = _flat_work(tensor)

    def finish() -> None:
        if reduce_op == "avg":
            buffer.div_(comm.size)
        if not is_view:
            tensor.copy_(buffer.view(tensor.shape))

    return _submit(
        comm,
        "all_reduce",
        "allreduce",
        reduce_op,
        buffer,
        algorithm,
        None,
        finish,
        async_op,
        timeout,
        check,
        replay_key=key,
    )


def reduce_scatter(
    output: torch.Tensor,
    input: torch.Tensor,
    op: object = "sum",
    group: Group = None,
    algorithm: str = "auto",
    async_op: bool = False,
    timeout: float | None = None,
    check: bool | None = None,
) -> Work | None:
    """Reduce `input` (world_size x output's elements) across ranks; rank r's output gets block r."""
    comm = communicator(group)
    key = _replay_key("reduce_scatter", async_op, (op, algorithm), output, input)
    if key is not None and comm.replay(key, timeout, check):
        return None
    output = _check_tensor("output", output, comm)
    input = _check_tensor("input", input, comm)
    reduce_op = _check_reduce(op, input.dtype)
    _check_pair(output, input, comm.size, "input", "output")
    buffer = _private_copy(comm, input, async_op)
    n = output.numel()
    block = buffer[comm.rank * n : (comm.rank + 1) * n]

    def finish() -> None:
        if reduce_op == "avg":
            block.div_(comm.size)
        output.copy_(block.view(output.shape))

    def before() -> None:  # a replay's private copy of the input (the schedule overwrites its buffer)
        buffer.copy_(input.view(-1))

    return _submit(
        comm,
        "reduce_scatter",
        "reduce_scatter",
        reduce_op,
        buffer,
        algorithm,
        None,
        finish,
        async_op,
        timeout,
        check,
        replay_key=key,
        before=before,
    )


def all_gather(
    output: torch.Tensor,
    input: torch.Tensor,
    group: Group = None,
    algorithm: str = "auto",
    async_op: bool = False,
    timeout: float | None = None,
    check: bool | None = None,
) -> Work | None:
    """Gather every rank's `input` into `output` (world_size x input's elements), rank r's at block r."""
    comm = communicator(group)
    key = _replay_key("all_gather", async_op, (algorithm,), output, input)
    if key is not None and comm.replay(key, timeout, check):
        return None
    output = _check_tensor("output", output, comm)
    input = _check_tensor("input", input, comm)
    _check_pair(input, output, comm.size, "output", "input")
    buffer, is_view = _flat_work(output)
    n = input.numel()
    block = buffer[comm.rank * n : (comm.rank + 1) * n]
    block.copy_(input.reshape(-1))

    def finish() -> None:
        if not is_view:
            output.copy_(buffer.view(output.shape))

    def before() -> None:  # a replay's copy of this rank's input into its block
        block.copy_(input.view(-1))

    return _submit(
        comm,
        "all_gather",
        "allgather",
        None,
        buffer,
        algorithm,
        None,
        finish,
        async_op,
        timeout,
        check,
        replay_key=key,
        before=before,
    )


def broadcast(
    tensor: torch.Tensor,
    src: int,
    group: Group = None,
    algorithm: str = "auto",
    async_op: bool = False,
    timeout: float | None = None,
    check: bool | None = None,
) -> Work | None:
    """Copy `tensor` from rank `src` (a global rank, as in torch.distributed) to every rank, in place."""
    comm = communicator(group)
    key = _replay_key("broadcast", async_op, (src, algorithm), tensor)
    if key is not None and comm.replay(key, timeout, check):
        return None
    tensor = _check_tensor("tensor", tensor, comm)
    root = _group_rank(comm, src, "src", group)
    buffer, is_view = _flat_work(tensor)

    def finish() -> None:
        if not is_view:
            tensor.copy_(buffer.view(tensor.shape))

    return _submit(
        comm,
        "broadcast",
        "broadcast",
        None,
        buffer,
        algorithm,
        root,
        finish,
        async_op,
        timeout,
        check,
        replay_key=key,
    )


def reduce(
    tensor: torch.Tensor,
    dst: int,
    op: object = "sum",
    group: Group = None,
    algorithm: str = "auto",
    async_op: bool = False,
    timeout: float | None = None,
    check: bool | None = None,
) -> Work | None:
    """Reduce `tensor` across ranks into rank `dst` (a global rank) in place; other ranks keep their input."""
    comm = communicator(group)
    tensor = _check_tensor("tensor", tensor, comm)
    reduce_op = _check_reduce(op, tensor.dtype)
    root = _group_rank(comm, dst, "dst", group)
    if comm.rank == root:
        buffer, is_view = _flat_work(tensor)
    else:  # partial sums pass through non-root ranks: work on a copy so their input stays intact
        buffer, is_view = _private_copy(comm, tensor, async_op), True

    def finish() -> None:
        if comm.rank != root:
            return
        if reduce_op == "avg":
            buffer.div_(comm.size)
        if not is_view:
            tensor.copy_(buffer.view(tensor.shape))

    return _submit(
        comm, "reduce", "reduce", reduce_op, buffer, algorithm, root, finish, async_op, timeout, check
    )


def _check_pair(
    small: torch.Tensor, large: torch.Tensor, world_size: int, large_name: str, small_name: str
) -> None:
    """The larger tensor must hold world_size times the smaller one's elements, in the same dtype."""
    if large.numel() != world_size * small.numel():
        raise InvalidArgumentError(
            f"{large_name} has {large.numel()} elements; accepted: world_size x {small_name}'s elements = "
            f"{world_size} x {small.numel()} = {world_size * small.numel()}"
        )
    if large.dtype != small.dtype:
        raise InvalidArgumentError(
            f"{large_name}.dtype={large.dtype} differs from {small_name}.dtype={small.dtype}; they must match"
        )


def all_to_all(
    output: torch.Tensor,
    input: torch.Tensor,
    output_split_sizes: list[int] | None = None,
    input_split_sizes: list[int] | None = None,
    group: Group = None,
    algorithm: str = "auto",
    async_op: bool = False,
    timeout: float | None = None,
    check: bool | None = None,
) -> Work | None:
    """Rank r sends slice d of `input` to rank d, which stores it as slice r of its `output`.

    Shaped like `torch.distributed.all_to_all_single`: slices run along dim 0, of equal size without split
    sizes, else of `input_split_sizes[d]` / `output_split_sizes[s]` rows. Every rank passes split sizes or
    none; with them the ranks first exchange their sizes (one small allgather), so a size that does not
    match its peer's is an InvalidArgumentError on every rank, and uneven slices run padded to the
    largest. The schedule's buffer is p x p blocks (the IR's all-to-all layout), p times a rank's input.
    """
    comm = communicator(group)
    output = _check_tensor("output", output, comm)
    input = _check_tensor("input", input, comm)
    if output.dtype != input.dtype:
        raise InvalidArgumentError(f"output.dtype={output.dtype} differs from input.dtype={input.dtype}")
    p, r = comm.size, comm.rank
    sends = _split_elements(input, input_split_sizes, p, "input")
    receives = _split_elements(output, output_split_sizes, p, "output")
    if input_split_sizes is None and output_split_sizes is None:
        if sends != receives:
            raise InvalidArgumentError(
                f"output has {output.numel()} elements and input {input.numel()}; without split sizes "
                "all_to_all needs them equal"
            )
        block = sends[0]
    else:
        block = _exchange_splits(comm, sends, receives)
    buffer = comm.staging(input, p * p * block) if not async_op else input.new_empty(p * p * block)
    rows = buffer.view(p, p, block) if block else buffer
    flat_in = input.reshape(-1)
    start = 0
    for d, n in enumerate(sends):
        if n:
            rows[r, d, :n].copy_(flat_in[start : start + n])
        start += n
    out_flat, is_view = _flat_work(output)

    def finish() -> None:
        begin = 0
        for s, n in enumerate(receives):
            if n:
                out_flat[begin : begin + n].copy_(rows[s, r, :n])
            begin += n
        if not is_view:
            output.copy_(out_flat.view(output.shape))

    nbytes = p * block * buffer.element_size()
    return _submit(
        comm,
        "all_to_all",
        "alltoall",
        None,
        buffer,
        algorithm,
        None,
        finish,
        async_op,
        timeout,
        check,
        nbytes,
    )


def _split_elements(tensor: torch.Tensor, splits: list[int] | None, p: int, name: str) -> list[int]:
    """Elements per peer: `splits` rows along dim 0 times a row's elements (None: equal slices)."""
    rows = tensor.shape[0] if tensor.dim() else 1
    row = tensor.numel() // rows if rows else 0
    if splits is None:
        if rows % p:
            raise invalid(f"{name}.shape[0]", rows, f"a multiple of the world size {p} (or pass split sizes)")
        return [rows // p * row] * p
    splits = list(splits)
    if len(splits) != p or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in splits):
        raise invalid(f"{name}_split_sizes", splits, f"{p} integers >= 0 (one per rank)")
    if sum(splits) != rows:
        raise invalid(f"{name}_split_sizes", splits, f"sizes summing to {name}.shape[0] = {rows}")
    return [s * row for s in splits]


def _exchange_splits(comm: Communicator, sends: list[int], receives: list[int]) -> int:
    """Allgather every rank's send and receive sizes, check each pair agrees, return the largest slice."""

    native = getattr(comm.transport, "allgather_int64", None)
    if native is None:
        raise UnsupportedOperationError(
            f"all_to_all with split sizes needs a transport with allgather_int64; {comm.transport!r} has none"
        )
    p = comm.size
    mine = torch.tensor([*sends, *receives], dtype=torch.int64, device=comm.transport.device_type)
    table = mine.new_zeros(p * 2 * p)
    native(mine, table, time.monotonic() + comm.timeout)
    rows = table.view(p, 2, p).tolist()
    bad = [
        f"rank {s} sends {rows[s][0][d]} elements to rank {d}, which expects {rows[d][1][s]}"
        for s in range(p)
        for d in range(p)
        if rows[s][0][d] != rows[d][1][s]
    ]
    if bad:
        raise InvalidArgumentError("all_to_all split sizes disagree: " + "; ".join(bad[:4]))
    return max(max(row[0]) for row in rows)
