"""What the training examples share: per-model defaults, joining the group, the LR schedule, rank helpers.

Imported by examples/ddp.py and examples/train_3d.py as a sibling module (scripts run from examples/).
"""

from __future__ import annotations

import argparse
import math
import os
from datetime import timedelta

import torch
import torch.distributed as dist

import commlab

# Per-model defaults, tuned so `make demo` (4 ranks, 2 cores) ends well within 2 minutes.
DEFAULTS = {
    "gpt": dict(preset="small", steps=250, batch_size=32, lr=3e-3, eval_every=50),
    "vit": dict(preset="digits", steps=600, batch_size=64, lr=2e-3, eval_every=200),
}


def init_distributed(backend: str) -> torch.device:
    """Join the torchrun group (or MPI's COMM_WORLD), or make a one-rank group as a plain script."""
    if backend == "mpi":
        # commlab's collectives with group=None run on MPI.COMM_WORLD once mpi4py.MPI is imported and
        # torch.distributed is not initialized: DataParallel, ZeroOptimizer and checkpoints follow.
        from mpi4py import MPI  # noqa: F401

        return torch.device("cpu")
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and restart != "0":
        # After a torchrun restart the rendezvous store still holds the dead workers' gloo addresses
        # (pytorch/pytorch#167288: "Connection refused" on every retry); a per-attempt key prefix avoids them.
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=timedelta(seconds=60),
        )
        dist.init_process_group(
            backend,
            store=dist.PrefixStore(f"commlab-attempt-{restart}", store),
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
        )
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up to --lr, then cosine decay to a tenth of it at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size, on whichever transport the run uses."""
    comm = commlab.communicator(None)
    return comm.rank, comm.size


def barrier() -> None:
    """Wait for every rank (a one-element commlab allreduce)."""
    commlab.all_reduce(torch.zeros(1))


def mean_over_ranks(value: torch.Tensor | float, device: torch.device) -> float:
    """The average of a scalar over all ranks (one small commlab allreduce)."""
    tensor = torch.as_tensor(value, dtype=torch.float64, device=device).reshape(1).clone()
    commlab.all_reduce(tensor, op="avg")
    return tensor.item()
