"""Translating torch's ProcessGroup arguments into commlab's: options, reductions, dtypes, tensor lists.

Pure functions, no communication: what each op of `process_group.CommlabProcessGroup` needs to turn
torch's calling convention (lists per device, *Options objects, ReduceOp with a PREMUL_SUM factor, dtypes
commlab does not reduce) into one commlab call, and to copy results back.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from commlab.collectives.communicator import DTYPES
from commlab.errors import InvalidArgumentError, UnsupportedOperationError

_RED = dist.ReduceOp.RedOpType
_REDUCTIONS = {_RED.SUM: "sum", _RED.AVG: "avg", _RED.MAX: "max", _RED.MIN: "min", _RED.PRODUCT: "prod"}


def option(opts: object, name: str, default: object) -> object:
    """`opts.name` of a torch *Options object (None or an attribute it lacks: `default`)."""
    if opts is None:
        return default
    if isinstance(opts, dist.ReduceOp | _RED) and name == "reduceOp":  # pg.allreduce(tensors, op)
        return opts
    return getattr(opts, name, default)


def reduction(label: str, op: object, dtype: torch.dtype) -> tuple[str, float | None]:
    """commlab's reduction name and the PREMUL_SUM factor (None for the others)."""
    kind = op.op if isinstance(op, dist.ReduceOp) else op
    if dtype not in DTYPES:
        accepted = ", ".join(str(d).replace("torch.", "") for d in DTYPES)
        raise UnsupportedOperationError(
            f"commlab backend: {label} on {dtype} is not supported; dtypes: {accepted}"
        )
    if kind == _RED.PREMUL_SUM:
        if not dtype.is_floating_point:
            raise UnsupportedOperationError(
                f"commlab backend: {label} with PREMUL_SUM on {dtype} (floats only)"
            )
        factor = op.factor
        if isinstance(factor, torch.Tensor):
            factor = factor.item()
        return "sum", float(factor)
    if kind in _REDUCTIONS:
        return _REDUCTIONS[kind], None
    raise UnsupportedOperationError(
        f"commlab backend: {label} with ReduceOp {kind} is not supported; accepted: SUM, AVG, MAX, MIN, "
        "PRODUCT, PREMUL_SUM"
    )


def one(label: str, items: list) -> object:
    if len(items) != 1:
        raise UnsupportedOperationError(
            f"commlab backend: {label} takes one tensor (list) per call, got {len(items)} (multi-device)"
        )
    return items[0]


def same_dtype(label: str, tensors: list[torch.Tensor]) -> torch.dtype:
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        raise InvalidArgumentError(
            f"commlab backend, {label}: tensors of several dtypes {sorted(map(str, dtypes))}"
        )
    if not tensors:
        raise InvalidArgumentError(f"commlab backend, {label}: no tensors")
    return tensors[0].dtype


def uniform(label: str, tensors: list[torch.Tensor], like: torch.Tensor) -> None:
    for t in tensors:
        if t.numel() != like.numel() or t.dtype != like.dtype:
            raise UnsupportedOperationError(
                f"commlab backend: {label} with tensors of unequal size or dtype ({t.numel()} x {t.dtype} "
                f"against {like.numel()} x {like.dtype}) is not supported"
            )


def movable(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as commlab moves it: itself for a dtype commlab knows, else its bytes (uint8), for ops
    that only move data (broadcast, gathers, all-to-all): bool, int16, complex travel as raw bytes."""
    if tensor.dtype in DTYPES:
        return tensor
    if not tensor.is_contiguous():
        raise UnsupportedOperationError(
            f"commlab backend: a non-contiguous {tensor.dtype} tensor cannot be moved as bytes"
        )
    return tensor.reshape(-1).view(torch.uint8)


def row_splits(tensor: torch.Tensor, moved: torch.Tensor, splits: list[int]) -> list[int] | None:
    """all_to_all_single's split sizes (rows of dim 0; empty: equal) in units of `moved` (movable's
    view: the tensor itself, or its bytes as one flat row each)."""
    if not splits:
        return None
    if moved is tensor:
        return list(splits)
    rows = tensor.shape[0] if tensor.dim() else 1
    per_row = moved.numel() // rows if rows else 0
    return [s * per_row for s in splits]


def unflatten(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Copy consecutive pieces of `flat` into `tensors` (in movable's units)."""
    start = 0
    for t in tensors:
        target = movable(t)
        n = target.numel()
        target.copy_(flat[start : start + n].view(target.shape))
        start += n
