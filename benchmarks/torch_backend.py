"""Backend "commlab" against "gloo" under torch's own training loops, side by side (measured, not asserted).

    python benchmarks/torch_backend.py             # DDP, FSDP2 tokens/s and per-op busbw, 2 and 4 ranks
    python benchmarks/torch_backend.py --quick         # a smoke run: 2 trials, fewer steps
    python benchmarks/torch_backend.py --world 2 --trials 7
    python benchmarks/torch_backend.py --backends gloo commlab commlab-p2p   # + commlab without shared memory

Each rank process runs, per trial, every (part, backend) pair: `init_process_group(backend)` on a fresh
file store, the unmodified torch program, `destroy_process_group()`. The backend order alternates from
trial to trial, so both see the same drift of a shared machine; the table gives the median over trials
and the ratio commlab / gloo (targets from issue 19: DDP >= 1.0, FSDP2 >= 0.95). Backend `commlab` moves
its data through shared memory (the ranks share a host); `commlab-p2p` is the same backend with
$COMMLAB_SHM=0, over its private gloo's send/recv (given with --backends, it gets its own column and ratio).

Parts:
  ddp     torch DistributedDataParallel on commlab's GPT ('small' preset), SGD, global batch --batch windows
  fsdp2   fully_shard on every block and the root, same model and data
  ops     busbw (nccl-tests' definition) of dist.all_reduce, all_gather_into_tensor, reduce_scatter_tensor
          through the backend, at --op-bytes sizes; median of --op-iters calls per trial
tokens/s = global batch x seq_len x steps / (rank 0's wall time of the steps, between two barriers).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

import commlab
from commlab.bench.config import parse_size
from commlab.models import GPT, GPTConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from training import machine

BACKENDS = ("gloo", "commlab", "commlab-p2p")  # commlab-p2p: backend commlab with $COMMLAB_SHM=0
OPS = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor")
BUS_FACTOR = {"all_reduce": lambda p: 2 * (p - 1) / p, "all_gather_into_tensor": lambda p: (p - 1) / p}
BUS_FACTOR["reduce_scatter_tensor"] = BUS_FACTOR["all_gather_into_tensor"]
RANK_TIMEOUT_S = 120


def _batch(step: int, rank: int, rows: int, config: GPTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * step + rank)
    tokens = torch.randint(0, config.vocab_size, (rows, config.seq_len + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def _train(part: str, rank: int, world: int, args: argparse.Namespace) -> float:
    """tokens/s of `steps` timed steps (after one warm-up step) of `part` on the current default group."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    config = GPTConfig.preset("small")
    torch.manual_seed(0)
    model = GPT(config)
    if part == "ddp":
        model = DistributedDataParallel(model)
    else:
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    rows = args.batch // world

    def step(index: int) -> None:
        idx, targets = _batch(index, rank, rows, config)
        logits, _ = model(idx)
        (model.module if part == "ddp" else model).loss(logits, targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(0)
    dist.barrier()
    start = time.perf_counter()
    for index in range(1, args.steps + 1):
        step(index)
    dist.barrier()
    return args.batch * config.seq_len * args.steps / (time.perf_counter() - start)


def _op_busbw(op: str, nbytes: int, world: int, iters: int) -> float:
    """Median busbw (GB/s) of `iters` blocking calls of `op` moving `nbytes` (total for the gathers)."""
    count = max(world, nbytes // 4 // world * world)
    full, block = torch.ones(count), torch.ones(count // world)
    call = {
        "all_reduce": lambda: dist.all_reduce(full),
        "all_gather_into_tensor": lambda: dist.all_gather_into_tensor(full, block),
        "reduce_scatter_tensor": lambda: dist.reduce_scatter_tensor(block, full),
    }[op]
    call()
    times = []
    for _ in range(iters):
        dist.barrier()
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return count * 4 / statistics.median(times) * BUS_FACTOR[op](world) / 1e9


def _rank(rank: int, world: int, directory: str, args: argparse.Namespace) -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's renamed *_tensor collectives
    torch.set_num_threads(1)
    rows = []
    for trial in range(args.trials):
        order = args.backends if trial % 2 == 0 else args.backends[::-1]
        for backend in order:
            store = os.path.join(directory, f"store-{trial}-{backend}")
            os.environ["COMMLAB_SHM"] = "0" if backend == "commlab-p2p" else "1"  # read at group creation
            dist.init_process_group(
                backend.removesuffix("-p2p"),
                init_method=f"file://{store}",
                rank=rank,
                world_size=world,
                timeout=timedelta(seconds=RANK_TIMEOUT_S),
            )
            try:
                for part in args.parts:
                    if part == "ops":
                        for op in OPS:
                            for nbytes in args.op_bytes:
                                value = _op_busbw(op, nbytes, world, args.op_iters)
                                rows.append(
                                    {
                                        "trial": trial,
                                        "backend": backend,
                                        "part": op,
                                        "bytes": nbytes,
                                        "busbw_GBps": value,
                                    }
                                )
                    else:
                        value = _train(part, rank, world, args)
                        rows.append({"trial": trial, "backend": backend, "part": part, "tokens_per_s": value})
            finally:
                commlab.release()
                dist.destroy_process_group()
    if rank == 0:
        Path(directory, "rows.json").write_text(json.dumps(rows))


def run(world: int, args: argparse.Namespace) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="commlab-torch-backend-") as directory:
        torch_mp.spawn(_rank, args=(world, directory, args), nprocs=world, join=True)
        return json.loads(Path(directory, "rows.json").read_text())


def summarize(world: int, rows: list[dict], backends: list[str]) -> list[dict]:
    """Median per (part, size) and backend, and the ratio of each commlab variant to gloo."""
    table = []
    keys = sorted({(r["part"], r.get("bytes", 0)) for r in rows}, key=lambda k: (k[0] in OPS, k))
    for part, nbytes in keys:
        metric = "busbw_GBps" if part in OPS else "tokens_per_s"
        medians = {}
        for backend in backends:
            values = [
                r[metric]
                for r in rows
                if r["part"] == part and r.get("bytes", 0) == nbytes and r["backend"] == backend
            ]
            medians[backend] = statistics.median(values)
        table.append(
            {
                "world": world,
                "part": part,
                "bytes": nbytes or None,
                "metric": metric,
                **medians,
                **{f"{b} / gloo": medians[b] / medians["gloo"] for b in backends if b != "gloo"},
                "trials": len(values),
            }
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4])
    parser.add_argument(
        "--parts", nargs="+", default=["ddp", "fsdp2", "ops"], choices=["ddp", "fsdp2", "ops"]
    )
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per trial")
    parser.add_argument("--batch", type=int, default=16, help="global batch (windows of seq_len)")
    parser.add_argument("--op-bytes", type=parse_size, nargs="+", default=[64 << 10, 4 << 20])
    parser.add_argument("--op-iters", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 trials, 2 steps, 3 op calls")
    parser.add_argument("--backends", nargs="+", default=["gloo", "commlab"], choices=BACKENDS)
    parser.add_argument("--json", type=Path, default=Path("torch_backend.json"))
    args = parser.parse_args()
    if args.quick:
        args.trials, args.steps, args.op_iters = 2, 2, 3
    if "gloo" not in args.backends or len(set(args.backends)) < 2:
        parser.error("--backends: gloo and at least one of commlab, commlab-p2p (ratios are to gloo)")
    args.backends = list(dict.fromkeys(args.backends))
    description = machine()
    tables, samples = [], []
    for world in args.world:
        rows = run(world, args)
        samples += [{"world": world, **row} for row in rows]
        tables += summarize(world, rows, args.backends)
    print(
        f"# backend commlab vs gloo, median of {args.trials} interleaved trials; load average at start "
        f"{description['load_average_start']}"
    )
    variants = [b for b in args.backends if b != "gloo"]
    header = "".join(f"{b:>12}" for b in ["gloo", *variants])
    ratios = "".join(f"{b + '/gloo':>18}" for b in variants)
    print(f"# {'ranks':>5}  {'part':<24}{'size':>10}  {'metric':<12}{header}{ratios}")
    for row in tables:
        size = "" if row["bytes"] is None else str(row["bytes"])
        values = "".join(f"{row[b]:>12.3f}" for b in ["gloo", *variants])
        quotients = "".join(f"{row[f'{b} / gloo']:>18.2f}" for b in variants)
        print(f"  {row['world']:>5}  {row['part']:<24}{size:>10}  {row['metric']:<12}{values}{quotients}")
    description["load_average_end"] = os.getloadavg()
    args.json.write_text(
        json.dumps(
            {
                "machine": description,
                "args": {k: v for k, v in vars(args).items() if k != "json"},
                "rows": tables,
                "samples": samples,  # every trial, for the spread behind each median
            },
            indent=2,
            default=str,
        )
    )
    print(f"# wrote {args.json}")


if __name__ == "__main__":
    main()
