"""A few DataParallel training steps of a tiny GPT on either transport; rank 0 prints the losses.

    mpiexec -n 2 python -m tests.mpi_ddp --backend mpi
    torchrun --standalone --nproc-per-node 2 -m tests.mpi_ddp --backend gloo

tests/test_mpi.py runs both and checks that the losses agree: the same model, data and optimizer give
the same training whichever transport averages the gradients.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

import commlab
from commlab.models import GPT, GPTConfig
from commlab.parallel import DataParallel


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=["mpi", "gloo"], required=True)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.backend == "mpi":
        from mpi4py import MPI

        group = MPI.COMM_WORLD
        rank = group.Get_rank()
    else:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        group, rank = None, dist.get_rank()
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny"))
    ddp = DataParallel(model, group=group, bucket_mb=0.02)  # several buckets: overlap with backward
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(100 + rank)
    tokens = torch.randint(256, (4, 33), generator=data)  # one batch per rank, learnt by heart
    losses = []
    for _ in range(args.steps):
        _, loss = ddp(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mean = loss.detach().reshape(1).clone()
        commlab.all_reduce(mean, op="avg", group=group)
        losses.append(mean.item())
    if rank == 0:
        print("LOSSES " + json.dumps(losses), flush=True)
    commlab.release()  # close commlab's communicators before their group goes
    if args.backend != "mpi":
        import torch.distributed as dist

        dist.destroy_process_group()


if __name__ == "__main__":
    main()
