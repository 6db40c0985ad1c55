"""Flat buffers over many tensors: one collective per dtype instead of one per tensor."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from commlab.collectives.algorithms import ALGORITHMS
from commlab.collectives.api import Group, broadcast, communicator
from commlab.errors import invalid


def group_by_dtype(tensors: Iterable[torch.Tensor]) -> dict[tuple[torch.dtype, torch.device], list]:
    """Tensors grouped by (dtype, device), each group in the order given."""
    groups: dict[tuple[torch.dtype, torch.device], list] = {}
    for tensor in tensors:
        groups.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    return groups


def flatten(tensors: Sequence[torch.Tensor], pad_to: int = 1) -> torch.Tensor:
    """One new 1-D tensor holding `tensors` back to back, zero-padded to a multiple of `pad_to`."""
    numel = sum(t.numel() for t in tensors)
    padded = -(-numel // pad_to) * pad_to
    flat = torch.zeros(padded, dtype=tensors[0].dtype, device=tensors[0].device)
    offset = 0
    for tensor in tensors:
        flat[offset : offset + tensor.numel()].copy_(tensor.reshape(-1))
        offset += tensor.numel()
    return flat


def unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copy consecutive slices of `flat` back into `tensors` (the inverse of `flatten`)."""
    offset = 0
    for tensor in tensors:
        tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()


def check_algorithm(algorithm: str, ops: tuple[str, ...]) -> None:
    """Raise unless `algorithm` is "auto" or implements every op in `ops` (the collectives a wrapper uses)."""
    accepted = ["auto", *(n for n, a in ALGORITHMS.items() if all(a.supports(op) for op in ops))]
    if algorithm not in accepted:
        raise invalid("algorithm", algorithm, accepted)


def group_root(group: Group) -> int:
    """The global rank of the group's rank 0 (torch.distributed names broadcast sources globally)."""
    comm = communicator(group)
    return getattr(comm.transport, "global_ranks", range(comm.size))[0]


@torch.no_grad()
def broadcast_tensors(tensors: Iterable[torch.Tensor], group: Group = None) -> None:
    """Make every rank's `tensors` equal to rank 0's, one flat broadcast per dtype."""
    root = group_root(group)
    for chunk in group_by_dtype(tensors).values():
        flat = flatten(chunk)
        broadcast(flat, root, group=group)
        unflatten_into(flat, chunk)
