"""Unmodified torch.distributed client programs, run on backend "commlab" and on "gloo" for comparison.

Each program runs on every rank of a group the runner (`on_backend`) creates with `init_process_group`
and returns plain tensors (CPU, detached) that the test compares across the two backends. The programs
use only public torch APIs (DDP, FSDP2, DeviceMesh, DTensor, tensor parallel, distributed checkpoint):
they do not know which backend they run on.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

STEPS = 3


def on_backend(backend: str, store: str, program, *args, timeout_s: float = 60.0, **kwargs):
    """Init the default group on `backend` (file store `store`), run `program`, tear the group down."""
    import commlab

    dist.init_process_group(
        backend,
        init_method=f"file://{store}",
        rank=int(os.environ["COMMLAB_TEST_RANK"]),
        world_size=int(os.environ["COMMLAB_TEST_WORLD"]),
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        _commlab_calls()
        torch.manual_seed(0)
        return program(*args, **kwargs)
    finally:
        commlab.release()
        dist.destroy_process_group()


def _model(width: int = 8) -> nn.Module:
    torch.manual_seed(1)  # the same initial weights on every rank and backend
    return nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width))


def _batch(step: int, width: int = 8) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 * step + dist.get_rank())  # each rank its own data
    return torch.randn(4, width, generator=generator)


def _commlab_calls() -> dict[str, int]:
    """Ops this process ran through commlab's schedules in the program (empty on gloo), every group."""
    from commlab.torch_backend.process_group import CALLS

    calls = dict(CALLS)
    CALLS.clear()
    return calls


def ddp(hook: bool, no_sync: bool) -> dict:
    """DDP training: optional fp16-compress comm hook, an accumulation step under no_sync()."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(_model(), bucket_cap_mb=0.0005)  # several buckets
    if hook:
        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(STEPS):
        if no_sync:
            with model.no_sync():
                model(_batch(step + 50)).square().mean().backward()
        model(_batch(step)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return {"params": [p.detach().clone() for p in model.parameters()], "calls": _commlab_calls()}


def fsdp2(reshard_after_forward: bool) -> dict:
    """FSDP2 (fully_shard per layer and root): parameters after STEPS steps, gathered."""
    from torch.distributed.fsdp import fully_shard

    model = _model()
    for layer in (model[0], model[2]):
        fully_shard(layer, reshard_after_forward=reshard_after_forward)
    fully_shard(model, reshard_after_forward=reshard_after_forward)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(STEPS):
        model(_batch(step)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return {
        "params": [p.full_tensor().detach().clone() for p in model.parameters()],
        "calls": _commlab_calls(),
    }


def fsdp_tp(dp: int, tp: int) -> dict:
    """2D DeviceMesh: tensor parallel (colwise then rowwise Linear) inside FSDP2 over the dp dimension."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
    model = _model()
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(STEPS):
        generator = torch.Generator().manual_seed(100 * step + mesh["dp"].get_local_rank())
        model(torch.randn(4, 8, generator=generator)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return {
        "params": [p.full_tensor().detach().clone() for p in model.parameters()],
        "calls": _commlab_calls(),
    }


def redistribute() -> dict:
    """DTensor: Shard(0) -> Replicate -> Shard(1) -> Partial -> Replicate on a 1-D mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    full = torch.arange(48, dtype=torch.float32).reshape(8, 6)
    sharded = distribute_tensor(full, mesh, [Shard(0)])
    replicated = sharded.redistribute(mesh, [Replicate()])
    columns = replicated.redistribute(mesh, [Shard(1)])
    partial = DTensor.from_local(full * (dist.get_rank() + 1), mesh, [Partial()])
    summed = partial.redistribute(mesh, [Replicate()])
    scattered = partial.redistribute(mesh, [Shard(0)])
    tensors = [replicated, columns, summed, scattered]
    return {
        "tensors": [t.to_local().clone() for t in tensors],
        "calls": _commlab_calls(),
    }


def checkpoint(directory: str) -> dict:
    """torch.distributed.checkpoint: save an FSDP2 model's sharded state, load it into a fresh model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import fully_shard

    model = fully_shard(_model())
    model(_batch(0)).square().mean().backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    dcp.save(model.state_dict(), checkpoint_id=directory)
    torch.manual_seed(7)
    fresh = fully_shard(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)))
    state = fresh.state_dict()
    dcp.load(state, checkpoint_id=directory)
    fresh.load_state_dict(state)
    saved = [p.full_tensor().detach().clone() for p in model.parameters()]
    loaded = [p.full_tensor().detach().clone() for p in fresh.parameters()]
    return {"saved": saved, "loaded": loaded, "calls": _commlab_calls()}


def subgroup(backend: str) -> dict:
    """Collectives on a group of ranks 0 and 1 (`new_group(backend=...)`) beside the default group."""
    group = dist.new_group([0, 1], backend=backend)
    result = {"name": None, "tensors": []}
    if dist.get_rank() in (0, 1):
        result["name"] = group._get_backend_name()
        t = torch.arange(4, dtype=torch.float32) * (dist.get_rank() + 1)
        dist.all_reduce(t, group=group)
        gathered = torch.empty(8)
        dist.all_gather_into_tensor(gathered, t, group=group)
        b = torch.full((3,), float(dist.get_rank()))
        dist.broadcast(b, src=1, group=group)
        result["tensors"] = [t, gathered, b]
    everyone = torch.ones(2)
    dist.all_reduce(everyone)  # the default group still works beside it
    result["tensors"].append(everyone)
    return result


REDUCE_OPS = ("SUM", "AVG", "MAX", "MIN", "PRODUCT", "PREMUL_SUM")


def reduce_ops(dtype_name: str) -> dict:
    """all_reduce, reduce_scatter_tensor and reduce with every ReduceOp (PREMUL_SUM: factor 0.5)."""
    dtype = getattr(torch, dtype_name)
    rank = dist.get_rank()
    results = {}
    for name in REDUCE_OPS:
        if name == "AVG" and not dtype.is_floating_point:
            continue
        op = dist.ReduceOp.PREMUL_SUM(0.5) if name == "PREMUL_SUM" else getattr(dist.ReduceOp, name)
        t = (torch.arange(6) % 3 + rank + 1).to(dtype)
        try:
            dist.all_reduce(t, op=op)
            big = (torch.arange(6 * dist.get_world_size()) % 5 + rank).to(dtype)
            out = torch.empty(6, dtype=dtype)
            dist.reduce_scatter_tensor(out, big, op=op)
            mine = (torch.arange(5) + 2 * rank + 1).to(dtype)
            reduced = mine.clone()
            # only the root's tensor is defined afterwards (gloo uses the others' as scratch)
            dist.reduce(reduced, dst=0, op=op)
            results[name] = [t, out, reduced if rank == 0 else mine]
        except (RuntimeError, ValueError) as error:  # gloo refuses PREMUL_SUM: recorded, not compared
            results[name] = f"{type(error).__name__}"
    return results


def uneven_all_to_all() -> dict:
    """all_to_all_single with uneven splits (rank r sends r + d + 1 rows of 3 to rank d) and even."""
    rank, p = dist.get_rank(), dist.get_world_size()
    send = [rank + d + 1 for d in range(p)]
    receive = [s + rank + 1 for s in range(p)]
    x = torch.arange(sum(send) * 3, dtype=torch.float64).reshape(-1, 3) + 1000 * rank
    y = torch.empty(sum(receive), 3, dtype=torch.float64)
    dist.all_to_all_single(y, x, receive, send)
    even_in = torch.arange(4 * p, dtype=torch.int32) + 100 * rank
    even_out = torch.empty_like(even_in)
    dist.all_to_all_single(even_out, even_in)
    outs = [torch.empty(2, dtype=torch.bfloat16) for _ in range(p)]
    dist.all_to_all(outs, [torch.full((2,), float(rank * p + d), dtype=torch.bfloat16) for d in range(p)])
    return {"tensors": [y, even_out, *outs], "calls": _commlab_calls()}


def unsupported() -> list[str]:
    """Ops the commlab backend refuses: each must raise at once with a message naming the op."""
    messages = []
    for call in (
        lambda: dist.all_reduce(torch.ones(2, dtype=torch.int32), op=dist.ReduceOp.BAND),
        lambda: dist.all_reduce(torch.ones(2, dtype=torch.bool)),
        lambda: dist.all_gather_coalesced(
            [[torch.empty(1) for _ in range(dist.get_world_size())]], [torch.ones(1)]
        ),
    ):
        try:
            call()
        except Exception as error:
            messages.append(f"{type(error).__name__}: {error}")
        else:
            messages.append("no error")
    t = torch.ones(2)
    dist.all_reduce(t)  # the group still works afterwards
    messages.append(str(t.tolist()))
    return messages


def objects() -> dict:
    """Object collectives: all_gather_object and broadcast_object_list (commlab's allgather and broadcast,
    of uint8 byte tensors and int64 sizes), gather_object and scatter_object_list (the inner gloo)."""
    rank, p = dist.get_rank(), dist.get_world_size()
    mine = {"rank": rank, "items": list(range(rank + 2)), "name": "x" * (3 * rank + 1)}
    gathered = [None] * p
    dist.all_gather_object(gathered, mine)
    broadcast = [mine, rank] if rank == 1 else [None, None]
    dist.broadcast_object_list(broadcast, src=1)
    at_root = [None] * p if rank == 0 else None
    dist.gather_object(mine, at_root, dst=0)
    received = [None]
    dist.scatter_object_list(received, [f"to {r}" for r in range(p)] if rank == 0 else None, src=0)
    return {
        "gathered": gathered,
        "broadcast": broadcast,
        "at_root": at_root,
        "received": received,
        "calls": _commlab_calls(),
    }
