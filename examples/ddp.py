"""Train a GPT (or a BERT encoder) on the standard library's bytes, or a ViT on digits, with commlab's
DataParallel.

    torchrun --standalone --nproc-per-node 4 examples/ddp.py              # GPT, 4 gloo ranks
    torchrun --standalone --nproc-per-node 4 examples/ddp.py --zero       # ZeRO-1 optimizer instead
    torchrun --standalone --nproc-per-node 2 examples/ddp.py --model vit  # ViT on 8x8 digits
    torchrun --standalone --nproc-per-node 4 examples/ddp.py --model bert # masked language model
    torchrun --standalone --nproc-per-node 4 examples/ddp.py --attention linear  # linear attention
    python examples/ddp.py --steps 50                                     # one process, no torchrun

Gradients are averaged by commlab's bucketed allreduce, overlapped with backward (DataParallel), or
reduce-scattered into a sharded optimizer (--zero). Rank 0 prints step, loss and tokens/s, the validation
loss next to the unigram (byte-frequency) baseline every --eval-every steps, and a text sample at the end.
BERT reports the masked-token accuracy and MLM loss on held-out bytes beside the unigram baseline's (the
most frequent byte, the byte frequencies) at the same masked positions.
The defaults are the `make demo` run: about a minute on 4 ranks sharing 2 CPU cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import commlab
from commlab.collectives.algorithms import algorithms_for
from commlab.models import (
    BERT,
    GPT,
    ByteCorpus,
    ShardedBatchSampler,
    ViT,
    lm_batch,
    load_digits_images,
    mlm_batch,
)
from commlab.models.gpt import CHECKPOINT_MODES
from commlab.parallel import DataParallel, ZeroOptimizer
from commlab.parallel.checkpoint import Layout
from commlab.parallel.faults import fault_point

from common import (
    CONFIGS,
    DEFAULTS,
    PRESETS,
    Checkpoints,
    MaskedLMScore,
    add_attention_flag,
    add_checkpoint_flags,
    barrier,
    bert_summary,
    checkpoint_flag_error,
    collective_fault,
    init_distributed,
    lr_at,
    mean_over_ranks,
    preset_help,
    rank_and_world,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--model", default="gpt", choices=sorted(DEFAULTS), help="what to train (default: gpt)")
    add("--preset", help=preset_help())
    add_attention_flag(add)
    add("--steps", type=int, help="optimizer steps (gpt: 250, vit: 600, bert: 300)")
    add("--batch-size", type=int, help="global batch in sequences/images per step (gpt, bert: 32; vit: 64)")
    add(
        "--grad-accum",
        "--micro-batches",
        dest="grad_accum",
        type=int,
        default=1,
        help="micro-batches per rank per step; gradients accumulate locally between them (default: 1)",
    )
    add("--lr", type=float, help="peak learning rate of AdamW (gpt, bert: 3e-3; vit: 2e-3)")
    add("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    add("--warmup", type=int, help="linear warm-up steps before the cosine decay (default: steps/15)")
    add("--clip", type=float, default=1.0, help="global gradient-norm clip, 0 for none (default: 1)")
    add("--checkpoint", default="none", choices=CHECKPOINT_MODES, help="activation checkpointing")
    add("--zero", action="store_true", help="ZeRO-1: shard AdamW's state across ranks (no DataParallel)")
    add("--bucket-mb", type=float, default=25.0, help="DataParallel gradient bucket size in MiB")
    add(
        "--algorithm",
        default="auto",
        help="commlab algorithm of the gradient collectives: auto (cheapest by cost model) or a name from "
        "`commlab algorithms` that runs the gradient collectives (DataParallel: allreduce; ZeRO-1: "
        "reduce-scatter and allgather)",
    )
    add(
        "--backend",
        default="gloo",
        choices=["gloo", "nccl", "mpi"],
        help="transport: torch.distributed gloo or nccl (under torchrun), or mpi (under mpiexec)",
    )
    add("--seed", type=int, default=0, help="seed of the weights and the data stream")
    add(
        "--eval-every",
        type=int,
        help="evaluate every this many steps; 0: only at the end (gpt: 50, vit: 200, bert: 100)",
    )
    add("--eval-batches", type=int, default=8, help="validation batches (of --batch-size) per evaluation")
    add("--log-every", type=int, help="progress line every this many steps (default: steps/10)")
    add("--sample-tokens", type=int, default=300, help="bytes of text to sample at the end (gpt), 0: none")
    add("--json", metavar="PATH", help="write the run's configuration and results to PATH (rank 0)")
    add_checkpoint_flags(add)
    add("--save-model", metavar="PATH", help="write the final model state_dict to PATH (rank 0)")
    return parser


def parse_args(argv: list[str] | None, world: int, rank: int) -> argparse.Namespace:
    """Parse and check the flags; a bad value stops every rank with one message (printed by rank 0)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, value in DEFAULTS[args.model].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.warmup is None:
        args.warmup = args.steps // 15
    if args.log_every is None:
        args.log_every = max(1, args.steps // 10)

    def fail(message: str) -> None:
        if rank == 0:
            parser.error(message)
        sys.exit(2)

    presets = PRESETS[args.model]
    if args.preset not in presets:
        fail(f"--preset {args.preset!r} is not a {args.model} preset; accepted: {', '.join(presets)}")
    for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_batches"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} {getattr(args, name)} must be a positive int")
    for name in ("eval_every", "warmup", "sample_tokens"):
        if getattr(args, name) < 0:
            fail(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 0")
    if not args.lr > 0 or not math.isfinite(args.lr):
        fail(f"--lr {args.lr} must be a positive number")
    if args.weight_decay < 0 or args.clip < 0:
        fail("--weight-decay and --clip must be >= 0")
    if message := checkpoint_flag_error(args):
        fail(message)
    if not args.bucket_mb > 0:
        fail(f"--bucket-mb {args.bucket_mb} must be a positive number of MiB")
    # The algorithm runs DataParallel's gradient allreduce, or ZeRO-1's reduce-scatter and allgather.
    ops = ("reduce_scatter", "allgather") if args.zero else ("allreduce",)
    usable = [a for a in algorithms_for(ops[0]) if all(a in algorithms_for(op) for op in ops[1:])]
    if args.algorithm != "auto" and args.algorithm not in usable:
        what = "ZeRO-1's reduce-scatter and allgather" if args.zero else "DataParallel's allreduce"
        fail(f"--algorithm {args.algorithm!r} cannot run {what}; accepted: {', '.join(['auto', *usable])}")
    if args.batch_size % (world * args.grad_accum):
        fail(
            f"--batch-size {args.batch_size} must be a multiple of world size x --grad-accum = "
            f"{world} x {args.grad_accum} = {world * args.grad_accum}"
        )
    if args.backend == "nccl" and not torch.cuda.is_available():
        fail("--backend nccl needs CUDA GPUs, and torch sees none; use --backend gloo")
    return args


class Trainer:
    """What the GPT and ViT runs share: wrapping, the optimizer, one step with accumulation, logging."""

    def __init__(self, module: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> None:
        self.module, self.args, self.device = module, args, device
        self.rank, self.world = rank_and_world()
        hyper = dict(lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
        if args.zero:
            self.model = module  # ZeroOptimizer averages the gradients itself, in step()
            self.optimizer = ZeroOptimizer(
                module.parameters(), torch.optim.AdamW, algorithm=args.algorithm, **hyper
            )
        else:
            self.model = DataParallel(module, bucket_mb=args.bucket_mb, algorithm=args.algorithm)
            self.optimizer = torch.optim.AdamW(self.model.parameters(), **hyper)
        # Resume and save (--checkpoint-dir): the data stream is a pure function of the step and every
        # rank's RNG state is restored, so a resumed run continues bit for bit from its last save.
        layout = Layout.data_parallel(self.rank, self.world)
        self.checkpoints = Checkpoints(args, self.model, self.optimizer, layout)

    def step(self, step: int, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One optimizer step over this rank's share of the global batch; returns its mean loss."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, self.args)
        accum = self.args.grad_accum
        total = torch.zeros((), device=self.device)
        for k, (x, y) in enumerate(zip(inputs.chunk(accum), targets.chunk(accum), strict=True)):
            last = k == accum - 1
            sync = contextlib.nullcontext() if last or self.args.zero else self.model.no_sync()
            with sync:
                _, loss = self.model(x.to(self.device), y.to(self.device))
                (loss / accum).backward()
            total += loss.detach() / accum
        if self.args.clip > 0:
            if self.args.zero:
                self.optimizer.clip_grad_norm_(self.args.clip)
            else:
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.args.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def train(self, batch_at, evaluate, units: str, per_sample: int) -> dict:
        """Run every step; log progress and evaluate on schedule. Returns timing and the evaluations.

        Throughput counts training time only: evaluations are left out of the intervals.
        """
        args = self.args
        first = self.checkpoints.resume()
        log_loss = torch.zeros((), device=self.device)
        logged_steps, train_time, rates, history = 0, 1e-9, [], []
        interval_start, eval_time = time.perf_counter(), 0.0
        for step in range(first, args.steps):
            fault_point("step", step, self.rank)
            inputs, targets = batch_at(step)
            with collective_fault(list(self.module.parameters()), step, self.rank):
                log_loss += self.step(step, inputs, targets)
            logged_steps += 1
            done = step + 1
            if done % args.log_every == 0 or done == args.steps:
                loss = mean_over_ranks(log_loss / logged_steps, self.device)
                elapsed = time.perf_counter() - interval_start - eval_time
                train_time += elapsed
                rate = logged_steps * args.batch_size * per_sample / elapsed
                rates.append(rate)
                if self.rank == 0:
                    print(
                        f"step {done:>5}/{args.steps}  loss {loss:6.3f}  lr {lr_at(step, args):.2e}  "
                        f"{rate:>9,.0f} {units}/s",
                        flush=True,
                    )
                log_loss.zero_()
                logged_steps = 0
                interval_start, eval_time = time.perf_counter(), 0.0
            self.checkpoints.after_step(done)
            if (args.eval_every and done % args.eval_every == 0) or done == args.steps:
                eval_start = time.perf_counter()
                history.append({"step": done, **evaluate(done)})
                eval_time += time.perf_counter() - eval_start
        if not history:  # resumed from a checkpoint of the last step: nothing left to train
            history.append({"step": args.steps, **evaluate(args.steps)})
        extra = {"model_state": self.module.state_dict()} if args.save_model else {}
        return {
            **extra,
            "train_seconds": train_time,
            "rate_per_s": (args.steps - first) * args.batch_size * per_sample / train_time,
            "rate_median_per_s": sorted(rates)[len(rates) // 2] if rates else 0.0,
            "evals": history,
        }


def run_gpt(args: argparse.Namespace, device: torch.device) -> dict:
    rank, world = rank_and_world()
    if rank == 0:  # build the corpus cache once, before the other ranks read it
        corpus = ByteCorpus.from_stdlib()
    barrier()
    if rank != 0:
        corpus = ByteCorpus.from_stdlib()
    unigram = corpus.unigram_loss()
    config = CONFIGS["gpt"].preset(args.preset, checkpoint=args.checkpoint, attention=args.attention)
    seq_len = config.seq_len
    torch.manual_seed(args.seed)
    module = GPT(config).to(device)
    trainer = Trainer(module, args, device)
    if rank == 0:
        describe(args, world, sum(p.numel() for p in module.parameters()), f"{config}")
        print(
            f"data: {len(corpus.train):,} train / {len(corpus.val):,} validation bytes of the standard "
            f"library; {args.batch_size * seq_len:,} tokens per step; unigram baseline {unigram:.3f} nats",
            flush=True,
        )

    def batch_at(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return lm_batch(corpus.train, step, args.batch_size, seq_len, args.seed, rank, world)

    @torch.no_grad()
    def evaluate(step: int) -> dict:
        module.eval()
        total = torch.zeros((), device=device)
        for k in range(args.eval_batches):
            x, y = lm_batch(corpus.val, k, args.batch_size, seq_len, args.seed + 1, rank, world)
            total += module(x.to(device), y.to(device))[1]
        module.train()
        loss = mean_over_ranks(total / args.eval_batches, device)
        if rank == 0:
            print(
                f"  validation loss {loss:.3f} nats ({loss / math.log(2):.2f} bits/byte), unigram baseline "
                f"{unigram:.3f}: {loss / unigram:.0%} of it",
                flush=True,
            )
        return {"val_loss": loss}

    result = trainer.train(batch_at, evaluate, "tokens", seq_len)
    result.update(val_loss=result["evals"][-1]["val_loss"], unigram_loss=unigram)
    if rank == 0 and args.sample_tokens:
        module.eval()
        prompt = ByteCorpus.encode("def ").to(device)[None]
        generator = torch.Generator(device=device).manual_seed(args.seed)
        out = module.generate(prompt, args.sample_tokens, temperature=0.8, generator=generator)
        text = ByteCorpus.decode(out[0].cpu())
        print(f"sample (temperature 0.8):\n{'-' * 60}\n{text}\n{'-' * 60}", flush=True)
        result["sample"] = text
    return result


def run_vit(args: argparse.Namespace, device: torch.device) -> dict:
    rank, world = rank_and_world()
    config = CONFIGS["vit"].preset(args.preset, checkpoint=args.checkpoint, attention=args.attention)
    data = load_digits_images(config.image_size)
    if (config.in_channels, config.num_classes) != (1, 10):
        raise commlab.InvalidArgumentError(
            f"--preset {args.preset!r} is not for digits; it needs in_channels=1, num_classes=10"
        )
    torch.manual_seed(args.seed)
    module = ViT(config).to(device)
    trainer = Trainer(module, args, device)
    sampler = ShardedBatchSampler(len(data.train_labels), args.batch_size, rank, world, args.seed)
    if rank == 0:
        describe(args, world, sum(p.numel() for p in module.parameters()), f"{config}")
        print(
            f"data: scikit-learn digits at {config.image_size}x{config.image_size}, "
            f"{len(data.train_labels)} train / {len(data.test_labels)} test images",
            flush=True,
        )

    def batch_at(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.tensor(sampler.indices(step))
        return data.train_images[index], data.train_labels[index]

    @torch.no_grad()
    def evaluate(step: int) -> dict:
        module.eval()
        images, labels = data.test_images[rank::world].to(device), data.test_labels[rank::world].to(device)
        logits, loss = module(images, labels)
        correct = (logits.argmax(-1) == labels).sum().item()
        counts = torch.tensor([correct, len(labels), loss.item() * len(labels)], device=device)
        commlab.all_reduce(counts)
        module.train()
        accuracy, test_loss = counts[0].item() / counts[1].item(), counts[2].item() / counts[1].item()
        if rank == 0:
            print(
                f"  test accuracy {accuracy:.1%} ({int(counts[0])}/{int(counts[1])}), loss {test_loss:.3f}",
                flush=True,
            )
        return {"test_accuracy": accuracy, "test_loss": test_loss}

    result = trainer.train(batch_at, evaluate, "images", 1)
    result["test_accuracy"] = result["evals"][-1]["test_accuracy"]
    return result


def run_bert(args: argparse.Namespace, device: torch.device) -> dict:
    rank, world = rank_and_world()
    if rank == 0:  # build the corpus cache once, before the other ranks read it
        ByteCorpus.from_stdlib()
    barrier()
    corpus = ByteCorpus.from_stdlib()
    config = CONFIGS["bert"].preset(args.preset, checkpoint=args.checkpoint, attention=args.attention)
    seq_len, mask_id = config.seq_len, config.mask_id
    torch.manual_seed(args.seed)
    module = BERT(config).to(device)
    trainer = Trainer(module, args, device)
    if rank == 0:
        describe(args, world, sum(p.numel() for p in module.parameters()), f"{config}")
        print(
            f"data: {len(corpus.train):,} train / {len(corpus.val):,} validation bytes of the standard "
            f"library; {args.batch_size * seq_len:,} tokens per step, 15% masked (80% [MASK], 10% random, "
            f"10% kept), loss on masked bytes only",
            flush=True,
        )

    def batch_at(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return mlm_batch(corpus.train, step, args.batch_size, seq_len, mask_id, args.seed, rank, world)

    @torch.no_grad()
    def evaluate(step: int) -> dict:
        module.eval()
        score = MaskedLMScore(corpus)
        for k in range(args.eval_batches):
            x, y = mlm_batch(corpus.val, k, args.batch_size, seq_len, mask_id, args.seed + 1, rank, world)
            score.add(module(x.to(device))[0].cpu(), y)
        module.train()
        result = score.result()
        if rank == 0:
            print(score.describe(result), flush=True)
        return result

    result = trainer.train(batch_at, evaluate, "tokens", seq_len)
    result.update({k: v for k, v in result["evals"][-1].items() if k != "step"})
    return result


def describe(args: argparse.Namespace, world: int, n_params: int, config: str) -> None:
    sync = (
        "ZeRO-1 (reduce-scatter + allgather)"
        if args.zero
        else (f"DataParallel (bucket {args.bucket_mb:g} MiB, allreduce {args.algorithm})")
    )
    print(
        f"commlab {commlab.__version__}: {args.model} on {world} {args.backend} rank(s), {sync}", flush=True
    )
    print(f"model: {n_params:,} parameters, {config}", flush=True)
    print(
        f"training: {args.steps} steps, global batch {args.batch_size} in {args.grad_accum} micro-batch(es) "
        f"per rank, AdamW lr {args.lr:g} (warm-up {args.warmup}, cosine), clip {args.clip:g}, "
        f"checkpoint {args.checkpoint}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    env = os.environ  # torchrun sets WORLD_SIZE and RANK; MPICH's mpiexec sets PMI_SIZE and PMI_RANK
    world = int(env.get("WORLD_SIZE", env.get("PMI_SIZE", 1)))
    args = parse_args(argv, world, int(env.get("RANK", env.get("PMI_RANK", 0))))
    start = time.perf_counter()
    device = init_distributed(args.backend)
    try:
        result = {"gpt": run_gpt, "vit": run_vit, "bert": run_bert}[args.model](args, device)
        wall = time.perf_counter() - start
        if rank_and_world()[0] == 0:
            if args.model == "bert":
                summary = bert_summary(result)
            elif args.model == "gpt":
                verdict = "below" if result["val_loss"] < result["unigram_loss"] else "NOT below"
                summary = (
                    f"final validation loss {result['val_loss']:.3f}, {verdict} the unigram baseline "
                    f"{result['unigram_loss']:.3f}; {result['rate_per_s']:,.0f} tokens/s"
                )
            else:
                summary = (
                    f"final test accuracy {result['test_accuracy']:.1%}; {result['rate_per_s']:,.0f} images/s"
                )
            print(f"done in {wall:.1f}s: {summary}", flush=True)
            if args.save_model:
                torch.save(result.pop("model_state"), args.save_model)
            if args.json:
                record = {
                    "args": vars(args),
                    "world_size": rank_and_world()[1],
                    "wall_seconds": wall,
                    **result,
                }
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(record, indent=2, default=str) + "\n")
    finally:
        commlab.release()  # close commlab's communicators before their group goes (api.release)
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
