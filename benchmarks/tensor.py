"""Tensor-parallel benchmarks, measured (not asserted): bytes a TP step moves against the formula, and
training throughput of 2-way TP and 2-stage PP against 2-way DP on the same model.

    python benchmarks/tensor.py                             # both parts, a couple of minutes on 2 cores
    python benchmarks/tensor.py --parts bytes --tp 2,4
    python benchmarks/tensor.py --parts throughput --preset small --trials 5 --json tensor.json

bytes       One training step of a TP GPT: the bytes the layers hand to collectives (counted in
            commlab.parallel.tensor.TRAFFIC) against 4 x ((4L + 2) B T d + 3 B T): per block two
            activations forward (attention-out, MLP-down) and two backward (qkv, MLP-up), the embedding
            (forward) and the tied head (backward), and the cross-entropy's row maxima, sums and target
            logits. Also the bytes this rank actually sent on the TP group's transport, against the
            bandwidth-optimal 2(p-1)/p of an allreduce's buffer. Full recompute adds one activation per
            block (torch stops recomputing once backward has what it needs); sequence parallelism turns
            each allreduce into a reduce-scatter and an allgather (same bytes sent) and adds the norms'
            gradients.
throughput  Tokens/s of one step (forward, backward, AdamW) on 2 gloo ranks: 1 rank alone, 2-way DP with
            commlab's DataParallel and with torch's DistributedDataParallel (the peer), 2-way TP (plain
            and with sequence parallelism), and a 2-stage 1F1B pipeline (--micro-batches); layouts
            interleaved, median of --trials.

Ranks are started here (no launcher needed); rank processes use one thread each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from parallel_ranks import machine, spawn, table, timed

from commlab.models import GPT, GPTConfig
from commlab.parallel import DataParallel, Mesh, Pipeline, tensor_parallel_layers
from commlab.parallel import tensor as tensor_module
from commlab.parallel.sequence import sequence_parallel_layers


class CountingTransport:
    """A transport that counts the bytes this rank sends, delegating everything else."""

    def __init__(self, inner: object) -> None:
        self.inner, self.sent = inner, 0

    def post(self, sends: list, recvs: list) -> list:
        self.sent += sum(m.tensor.numel() * m.tensor.element_size() for m in sends)
        return self.inner.post(sends, recvs)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


VARIANTS = ("none", "full", "sequence")  # plain TP, TP + full recompute, TP + sequence parallelism


def formula_bytes(config: GPTConfig, batch: int, variant: str, tp: int) -> tuple[int, float]:
    """(bytes handed to collectives, bytes a rank must send at least) for one training step."""
    tokens, d, layers = batch * config.seq_len, config.d_model, config.n_layer
    activations = 4 * (4 * layers + 2 + (layers if variant == "full" else 0)) * tokens * d
    small = 4 * 3 * tokens  # cross-entropy: row maxima, exp-sums and target logits
    ring = 2 * (tp - 1) / tp  # an allreduce sends 2(p-1)/p of its buffer; reduce-scatter or allgather half
    if variant != "sequence":
        return activations + small, ring * (activations + small)
    norms = 4 * (2 * layers + 1) * d  # the norms' gradients, summed over TP after backward
    # each allreduce becomes a reduce-scatter (input counted) and an allgather (output counted)
    return 2 * activations + small + norms, ring * (activations + small + norms)


def bytes_rank(preset: str, batch: int, variant: str) -> dict:
    """On every rank (the world is one TP group): one step's collective payload and bytes sent."""
    mesh = Mesh(dp=1, pp=1, tp=dist.get_world_size())
    config = GPTConfig.preset(preset, checkpoint="full" if variant == "full" else "none")
    layers = (sequence_parallel_layers if variant == "sequence" else tensor_parallel_layers)(mesh.tp_group)
    torch.manual_seed(0)
    pipe = Pipeline(GPT(config, layers), mesh)
    tokens = torch.randint(0, config.vocab_size, (batch, config.seq_len + 1))
    pipe.train_step(tokens[:, :-1], tokens[:, 1:])  # warm-up (the first call checks arguments across ranks)
    counter = CountingTransport(mesh.tp_group.transport)
    mesh.tp_group.transport = counter
    before = dict(tensor_module.TRAFFIC)
    pipe.train_step(tokens[:, :-1], tokens[:, 1:])
    mesh.tp_group.transport = counter.inner
    return {k: tensor_module.TRAFFIC[k] - before[k] for k in before} | {"sent": counter.sent}


def bench_bytes(args: argparse.Namespace) -> dict:
    config = GPTConfig.preset(args.preset)
    rows, printed = [], []
    for tp in args.tp:
        for variant in VARIANTS:
            got = spawn(bytes_rank, tp, args.preset, args.batch_size, variant)
            payload = got["all_reduce"] + got["all_gather"] + got["reduce_scatter"]
            want, optimal = formula_bytes(config, args.batch_size, variant, tp)
            rows.append(
                dict(tp=tp, variant=variant, **got, payload=payload, formula=want, optimal_sent=optimal)
            )
            printed.append([
                tp, variant, f"{got['all_reduce']:,}", f"{got['reduce_scatter']:,}", f"{got['all_gather']:,}",
                f"{want:,}", f"{payload / want:.3f}", f"{got['sent']:,}", f"{optimal:,.0f}",
                f"{got['sent'] / optimal:.3f}",
            ])  # fmt: skip
    table(
        ["tp", "variant", "allreduce B", "reduce-scatter B", "allgather B", "formula B", "ratio", "sent B",
         "optimal sent B", "ratio"],
        printed,
        f"Bytes per TP training step, GPT --preset {args.preset} (L={config.n_layer}, d={config.d_model}, "
        f"T={config.seq_len}, V={config.vocab_size}), batch {args.batch_size}; variant: none (plain TP), "
        "full (recompute), sequence (sequence parallel)",
    )  # fmt: skip
    return {"preset": args.preset, "batch": args.batch_size, "rows": rows}


def throughput_rank(preset: str, batch: int, steps: int, trials: int, micro: int) -> dict:
    """On both ranks: every layout, interleaved per trial; returns tokens/s per layout (rank 0)."""
    rank = dist.get_rank()
    config = GPTConfig.preset(preset)
    meshes = {"dp": Mesh(dp=2), "tp": Mesh(tp=2), "pp": Mesh(pp=2), "sp": Mesh(tp=2)}
    tokens = torch.randint(0, config.vocab_size, (batch, config.seq_len + 1), generator=torch.Generator())
    x, y = tokens[:, :-1], tokens[:, 1:]

    def plain_step(model: torch.nn.Module, opt: torch.optim.Optimizer, xs, ys) -> None:
        model(xs, ys)[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def pipeline_step(pipe: Pipeline, opt: torch.optim.Optimizer) -> None:
        pipe.train_step(x, y)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def build(layout: str):
        torch.manual_seed(0)
        if layout == "1 rank":
            model = GPT(config)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            return lambda: plain_step(model, opt, x, y) if rank == 0 else None
        if layout.startswith("dp"):
            model = GPT(config)
            if "torch" in layout:
                model = torch.nn.parallel.DistributedDataParallel(model)
            else:
                model = DataParallel(model, group=meshes["dp"].dp_group)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            half = slice(rank * batch // 2, (rank + 1) * batch // 2)
            return lambda: plain_step(model, opt, x[half], y[half])
        mesh = meshes["sp" if "sequence" in layout else layout[:2]]
        factory = sequence_parallel_layers if "sequence" in layout else tensor_parallel_layers
        model = GPT(config, factory(mesh.tp_group))
        pipe = Pipeline(model, mesh, micro_batches=micro if layout.startswith("pp") else 1)
        opt = torch.optim.AdamW(pipe.parameters(), lr=1e-3)
        return lambda: pipeline_step(pipe, opt)

    layouts = ["1 rank", "dp 2 (commlab)", "dp 2 (torch DDP)", "tp 2", "tp 2 + sequence parallel"]
    layouts.append(f"pp 2 (1F1B, m={micro})")
    steps_of = {name: build(name) for name in layouts}
    for step in steps_of.values():
        timed(step)  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in layouts}
    for _ in range(trials):
        for name, step in steps_of.items():
            seconds[name].append(timed(lambda step=step: [step() for _ in range(steps)]) / steps)
    return {name: batch * config.seq_len / statistics.median(s) for name, s in seconds.items()}


def bench_throughput(args: argparse.Namespace) -> dict:
    rates = spawn(
        throughput_rank, 2, args.preset, args.batch_size, args.steps, args.trials, args.micro_batches
    )
    base = rates["dp 2 (commlab)"]
    table(
        ["layout", "tokens/s", "vs dp 2 (commlab)"],
        [[name, f"{rate:,.0f}", f"{rate / base:.2f}"] for name, rate in rates.items()],
        f"Training throughput on 2 gloo ranks, GPT --preset {args.preset}, batch {args.batch_size}, "
        f"median of {args.trials} trials of {args.steps} steps",
    )
    return {"preset": args.preset, "batch": args.batch_size, "tokens_per_s": rates}


def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", default="bytes,throughput", help="bytes, throughput (comma-separated)")
    parser.add_argument("--preset", default="small", help="GPT preset (default: small)")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per step (default: 32)")
    parser.add_argument("--tp", type=int_list, default=[2, 4], help="TP sizes for the bytes part")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed trial (throughput)")
    parser.add_argument("--trials", type=int, default=5, help="interleaved trials, median (throughput)")
    parser.add_argument("--micro-batches", type=int, default=4, help="microbatches of the 2-stage pipeline")
    parser.add_argument("--json", metavar="PATH", help="write the results and the machine to PATH")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    unknown = set(parts) - {"bytes", "throughput"}
    if unknown:
        parser.error(f"--parts {sorted(unknown)} not accepted; accepted: bytes, throughput")
    record = {"machine": machine()}
    print(f"machine: {record['machine']['cpu']}, {record['machine']['usable_cpus']} CPUs", flush=True)
    if "bytes" in parts:
        record["bytes"] = bench_bytes(args)
    if "throughput" in parts:
        record["throughput"] = bench_throughput(args)
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2, default=str) + "\n")
        print(f"\nwrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
