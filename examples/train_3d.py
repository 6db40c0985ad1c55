"""Train a GPT or a BERT encoder on the standard library's bytes (or a ViT on digits) under any dp x pp x tp
layout.

    torchrun --standalone --nproc-per-node 8 examples/train_3d.py --tp 2 --pp 2        # dp 2 x pp 2 x tp 2
    torchrun --standalone --nproc-per-node 4 examples/train_3d.py --pp 2 --schedule gpipe
    torchrun --standalone --nproc-per-node 4 examples/train_3d.py --model vit --tp 2 --pp 2
    torchrun --standalone --nproc-per-node 4 examples/train_3d.py --model bert --tp 2 --pp 2
    torchrun --standalone --nproc-per-node 4 examples/train_3d.py --attention linear --tp 2 --pp 2
    mpiexec -n 4 python examples/train_3d.py --tp 2 --pp 2 --backend mpi               # on the MPI transport
    torchrun --max-restarts 3 --standalone --nproc-per-node 4 examples/train_3d.py --pp 2 \
        --checkpoint-dir ckpt --save-every 20                                          # resumes after a crash

Tensor parallel (--tp) splits every block's attention heads and MLP, and the vocabulary, Megatron-style
(--sequence-parallel also splits the activations between them along the sequence); pipeline parallel
(--pp) splits the blocks into stages and runs --micro-batches per step with --schedule gpipe or 1f1b;
data parallel (dp = world / (tp x pp)) averages gradients after the last microbatch. The
weights do not depend on the layout: every layout trains the same model as one process would. Rank 0
prints step, loss and tokens/s, the validation loss next to the unigram baseline every --eval-every steps,
and a text sample at the end, as examples/ddp.py does. examples/tensor_parallel.py and
examples/pipeline.py are this script with --tp or --pp defaulting to the world size.
"""

from __future__ import annotations

import argparse
import json
import math
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
from commlab.parallel import Mesh, Pipeline, tensor_parallel_layers
from commlab.parallel.checkpoint import Layout
from commlab.parallel.faults import fault_point
from commlab.parallel.mesh import check_model
from commlab.parallel.sequence import sequence_parallel_layers
from commlab.parallel.tensor import gather_from_tensor_parallel, is_tensor_parallel

from common import (
    CONFIGS,
    DEFAULTS,
    PRESETS,
    Checkpoints,
    MaskedLMScore,
    add_attention_flag,
    add_checkpoint_flags,
    bert_summary,
    checkpoint_flag_error,
    collective_fault,
    init_distributed,
    lr_at,
    preset_help,
    rank_and_world,
)


def positive_seconds(text: str) -> float:
    """--timeout's type: a finite number of seconds above 0."""
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def build_parser(doc: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model", default="gpt", choices=sorted(DEFAULTS), help="what to train (default: gpt)")
    add("--preset", help=preset_help())
    add_attention_flag(add)
    add("--tp", type=int, help="tensor-parallel size (default: 1; examples/tensor_parallel.py: world)")
    add("--pp", type=int, help="pipeline stages (default: 1; examples/pipeline.py: world)")
    add("--dp", type=int, help="data-parallel size (default: world / (tp x pp))")
    add("--schedule", default="1f1b", choices=["gpipe", "1f1b"], help="pipeline schedule (default: 1f1b)")
    add(
        "--sequence-parallel",
        action="store_true",
        help="split the activations between TP regions along the sequence too (GPT, BERT; tp > 1)",
    )
    add("--steps", type=int, help="optimizer steps (gpt: 250, vit: 600, bert: 300)")
    add("--batch-size", type=int, help="global batch in sequences/images per step (gpt, bert: 32; vit: 64)")
    add(
        "--micro-batches",
        "--grad-accum",
        dest="micro_batches",
        type=int,
        help="microbatches per data-parallel replica per step (default: 1, or 2 x pp with pipelining)",
    )
    add("--lr", type=float, help="peak learning rate of AdamW (gpt, bert: 3e-3; vit: 2e-3)")
    add("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    add("--warmup", type=int, help="linear warm-up steps before the cosine decay (default: steps/15)")
    add("--clip", type=float, default=1.0, help="global gradient-norm clip, 0 for none (default: 1)")
    add("--checkpoint", default="none", choices=CHECKPOINT_MODES, help="activation checkpointing")
    add("--bucket-mb", type=float, default=25.0, help="DataParallel gradient bucket size in MiB")
    add(
        "--algorithm",
        default="auto",
        help=f"commlab allreduce algorithm of DataParallel: auto, {', '.join(algorithms_for('allreduce'))}",
    )
    add("--backend", default="gloo", choices=["gloo", "mpi"], help="gloo (torchrun) or mpi (mpiexec)")
    add(
        "--timeout",
        type=positive_seconds,
        help="seconds a collective or pipeline receive waits for a peer before it raises (gloo; default 60)",
    )
    add("--seed", type=int, default=0, help="seed of the weights and the data stream")
    add("--eval-every", type=int, help="evaluate every this many steps; 0: only at the end")
    add("--eval-batches", type=int, default=8, help="validation batches (of --batch-size) per evaluation")
    add("--log-every", type=int, help="progress line every this many steps (default: steps/10)")
    add("--sample-tokens", type=int, default=300, help="bytes of text to sample at the end (gpt), 0: none")
    add("--json", metavar="PATH", help="write the run's configuration and results to PATH (rank 0)")
    add_checkpoint_flags(add)
    return parser


def parse_args(
    argv: list[str] | None, world: int, rank: int, doc: str, default_axis: str | None
) -> argparse.Namespace:
    """Parse and check the flags; a bad value stops every rank with one message (printed by rank 0)."""
    parser = build_parser(doc)
    args = parser.parse_args(argv)
    for name, value in DEFAULTS[args.model].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for axis in ("tp", "pp"):
        if getattr(args, axis) is None:
            setattr(args, axis, world if axis == default_axis else 1)

    def fail(message: str) -> None:
        if rank == 0:
            parser.error(message)
        sys.exit(2)

    for axis in ("tp", "pp", "dp"):
        value = getattr(args, axis)
        if value is not None and value < 1:
            fail(f"--{axis} {value} must be a positive int")
    if args.dp is None:
        if world % (args.tp * args.pp):
            fail(f"--tp x --pp = {args.tp} x {args.pp} must divide the world size {world}")
        args.dp = world // (args.tp * args.pp)
    if args.dp * args.pp * args.tp != world:
        fail(f"--dp x --pp x --tp = {args.dp} x {args.pp} x {args.tp} must equal the world size {world}")
    if args.micro_batches is None:
        args.micro_batches = 1 if args.pp == 1 else 2 * args.pp
    if args.warmup is None:
        args.warmup = args.steps // 15
    if args.log_every is None:
        args.log_every = max(1, args.steps // 10)
    presets = PRESETS[args.model]
    if args.preset not in presets:
        fail(f"--preset {args.preset!r} is not a {args.model} preset; accepted: {', '.join(presets)}")
    for name in ("steps", "batch_size", "micro_batches", "log_every", "eval_batches"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} {getattr(args, name)} must be a positive int")
    for name in ("eval_every", "warmup", "sample_tokens"):
        if getattr(args, name) < 0:
            fail(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 0")
    if not args.lr > 0 or not math.isfinite(args.lr) or args.weight_decay < 0 or args.clip < 0:
        fail("--lr must be a positive number, --weight-decay and --clip >= 0")
    usable = [a for a in algorithms_for("allreduce") if a in algorithms_for("broadcast")]
    if args.algorithm != "auto" and args.algorithm not in usable:
        fail(f"--algorithm {args.algorithm!r} is not accepted; accepted: {', '.join(['auto', *usable])}")
    if message := checkpoint_flag_error(args):
        fail(message)
    if args.batch_size % (args.dp * args.micro_batches):
        fail(
            f"--batch-size {args.batch_size} must be a multiple of dp x --micro-batches = "
            f"{args.dp} x {args.micro_batches} = {args.dp * args.micro_batches}"
        )
    if args.sequence_parallel and (args.model == "vit" or args.tp == 1):
        fail("--sequence-parallel needs --model gpt or bert and --tp > 1")
    config = CONFIGS[args.model].preset(args.preset, checkpoint=args.checkpoint, attention=args.attention)
    if args.sequence_parallel and config.seq_len % args.tp:
        fail(
            f"--sequence-parallel needs the sequence length {config.seq_len} to be a multiple of --tp "
            f"{args.tp}"
        )
    try:
        check_model(config, args.tp, args.pp)
    except commlab.InvalidArgumentError as error:
        fail(f"--preset {args.preset} does not split over tp {args.tp} x pp {args.pp}: {error}")
    args.config = config
    return args


class Trainer:
    """The pipeline (one stage, its TP shard, DataParallel over dp), AdamW, the step, logging."""

    def __init__(self, module: torch.nn.Module, mesh: Mesh, args: argparse.Namespace) -> None:
        self.mesh, self.args = mesh, args
        self.pipeline = Pipeline(
            module,
            mesh,
            args.micro_batches,
            args.schedule,
            bucket_mb=args.bucket_mb,
            algorithm=args.algorithm,
        )
        hyper = dict(lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
        self.optimizer = torch.optim.AdamW(self.pipeline.parameters(), **hyper)
        # --checkpoint-dir: one model and optimizer shard per (pp, tp) coordinate, RNG per rank.
        self.checkpoints = Checkpoints(args, self.pipeline.stage, self.optimizer, Layout.of(mesh))

    def mean(self, value: torch.Tensor | float | None) -> float:
        """The average over dp replicas of a value known on the last stage (its tp rank 0 reports it)."""
        mesh = self.mesh
        mine = float(value) if value is not None and mesh.is_last_stage and mesh.tp_rank == 0 else 0.0
        total = torch.tensor([mine / mesh.dp], dtype=torch.float64)
        commlab.all_reduce(total, group=mesh.world_group)
        return total.item()

    def step(self, step: int, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, self.args)
        loss = self.pipeline.train_step(inputs, targets)
        if self.args.clip > 0:
            self.pipeline.clip_grad_norm_(self.args.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return 0.0 if loss is None else loss.item()

    def train(self, batch_at, evaluate, units: str, per_sample: int) -> dict:
        """Run every step; log progress and evaluate on schedule (evaluation time left out of rates)."""
        args, rank = self.args, self.mesh.rank
        first = self.checkpoints.resume()
        log_loss, logged_steps, train_time, rates, history = 0.0, 0, 1e-9, [], []
        interval_start, eval_time = time.perf_counter(), 0.0
        for step in range(first, args.steps):
            fault_point("step", step, rank)
            with collective_fault(list(self.pipeline.parameters()), step, rank):
                log_loss += self.step(step, *batch_at(step))
            logged_steps += 1
            done = step + 1
            if done % args.log_every == 0 or done == args.steps:
                loss = self.mean(log_loss / logged_steps)
                elapsed = time.perf_counter() - interval_start - eval_time
                train_time += elapsed
                rate = logged_steps * args.batch_size * per_sample / elapsed
                rates.append(rate)
                if rank == 0:
                    print(
                        f"step {done:>5}/{args.steps}  loss {loss:6.3f}  lr {lr_at(step, args):.2e}  "
                        f"{rate:>9,.0f} {units}/s",
                        flush=True,
                    )
                log_loss, logged_steps = 0.0, 0
                interval_start, eval_time = time.perf_counter(), 0.0
            self.checkpoints.after_step(done)
            if (args.eval_every and done % args.eval_every == 0) or done == args.steps:
                eval_start = time.perf_counter()
                history.append({"step": done, **evaluate(done)})
                eval_time += time.perf_counter() - eval_start
        if not history:  # resumed from a checkpoint of the last step: nothing left to train
            history.append({"step": args.steps, **evaluate(args.steps)})
        return {
            "train_seconds": train_time,
            "rate_per_s": (args.steps - first) * args.batch_size * per_sample / train_time,
            "rate_median_per_s": sorted(rates)[len(rates) // 2] if rates else 0.0,
            "evals": history,
        }


def sample(trainer: Trainer, prompt: str, tokens: int, seed: int) -> str:
    """Generate through the pipeline: every rank runs the forward; replica 0's last stage (tp rank 0)
    samples each byte at temperature 0.8 and broadcasts it to all ranks for the next step."""
    mesh, pipeline = trainer.mesh, trainer.pipeline
    idx = ByteCorpus.encode(prompt)[None]
    source = mesh.rank_of(0, mesh.pp - 1, 0)
    generator = torch.Generator().manual_seed(seed)
    seq_len = trainer.args.config.seq_len
    pipeline.stage.eval()
    multiple = mesh.tp if trainer.args.sequence_parallel else 1  # the sequence splits tp ways
    for _ in range(tokens):
        context = idx[:, -seq_len:]
        length = context.shape[1]
        padded = torch.nn.functional.pad(context, (0, -length % multiple))  # causal: the end pad is unseen
        logits = pipeline.forward_only(padded, micro_batches=1)[0]
        nxt = torch.zeros(1, dtype=torch.long)
        if mesh.is_last_stage:
            logits = gather_from_tensor_parallel(logits[:, length - 1, :], mesh.tp_group)
            nxt = torch.multinomial((logits / 0.8).softmax(dim=-1), 1, generator=generator)[0]
        commlab.broadcast(nxt, source, group=mesh.world_group)
        idx = torch.cat((idx, nxt[None]), dim=1)
    pipeline.stage.train()
    return ByteCorpus.decode(idx[0])


def load_corpus(mesh: Mesh) -> ByteCorpus:
    """The standard-library byte corpus, its cache built once by rank 0 before the other ranks read it."""
    if mesh.rank == 0:
        ByteCorpus.from_stdlib()
    commlab.all_reduce(torch.zeros(1), group=mesh.world_group)  # a barrier on any transport
    return ByteCorpus.from_stdlib()


def token_model(args: argparse.Namespace, mesh: Mesh, model_class: type) -> tuple[int, Trainer]:
    """GPT or BERT on the mesh: the same full weights on every rank (seeded), each keeping its tp shard and
    pipeline stage; (the full model's parameter count, its Trainer)."""
    torch.manual_seed(args.seed)
    layers = (sequence_parallel_layers if args.sequence_parallel else tensor_parallel_layers)(mesh.tp_group)
    module = model_class(args.config, layers)
    return full_size(module, mesh), Trainer(module, mesh, args)


def run_gpt(args: argparse.Namespace, mesh: Mesh) -> dict:
    corpus = load_corpus(mesh)
    unigram = corpus.unigram_loss()
    config, seq_len = args.config, args.config.seq_len
    n_params, trainer = token_model(args, mesh, GPT)
    if mesh.rank == 0:
        describe(args, mesh, n_params, f"{config}", trainer)
        print(
            f"data: {len(corpus.train):,} train / {len(corpus.val):,} validation bytes of the standard "
            f"library; {args.batch_size * seq_len:,} tokens per step; unigram baseline {unigram:.3f} nats",
            flush=True,
        )

    def batch_at(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return lm_batch(corpus.train, step, args.batch_size, seq_len, args.seed, mesh.dp_rank, mesh.dp)

    def evaluate(step: int) -> dict:
        total = 0.0
        for k in range(args.eval_batches):
            x, y = lm_batch(corpus.val, k, args.batch_size, seq_len, args.seed + 1, mesh.dp_rank, mesh.dp)
            loss = trainer.pipeline.forward_only(x, y)[1]
            total += 0.0 if loss is None else loss.item()
        loss = trainer.mean(total / args.eval_batches)
        if mesh.rank == 0:
            print(
                f"  validation loss {loss:.3f} nats ({loss / math.log(2):.2f} bits/byte), unigram baseline "
                f"{unigram:.3f}: {loss / unigram:.0%} of it",
                flush=True,
            )
        return {"val_loss": loss}

    result = trainer.train(batch_at, evaluate, "tokens", seq_len)
    result.update(val_loss=result["evals"][-1]["val_loss"], unigram_loss=unigram)
    if args.sample_tokens:
        text = sample(trainer, "def ", args.sample_tokens, args.seed)
        if mesh.rank == 0:
            print(f"sample (temperature 0.8):\n{'-' * 60}\n{text}\n{'-' * 60}", flush=True)
        result["sample"] = text
    return result


def run_vit(args: argparse.Namespace, mesh: Mesh) -> dict:
    config = args.config
    data = load_digits_images(config.image_size)
    if (config.in_channels, config.num_classes) != (1, 10):
        raise commlab.InvalidArgumentError(
            f"--preset {args.preset!r} is not for digits; it needs in_channels=1, num_classes=10"
        )
    torch.manual_seed(args.seed)
    module = ViT(config, tensor_parallel_layers(mesh.tp_group))
    n_params = full_size(module, mesh)
    trainer = Trainer(module, mesh, args)
    sampler = ShardedBatchSampler(len(data.train_labels), args.batch_size, mesh.dp_rank, mesh.dp, args.seed)
    if mesh.rank == 0:
        describe(args, mesh, n_params, f"{config}", trainer)
        print(
            f"data: scikit-learn digits at {config.image_size}x{config.image_size}, "
            f"{len(data.train_labels)} train / {len(data.test_labels)} test images",
            flush=True,
        )

    def batch_at(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.tensor(sampler.indices(step))
        return data.train_images[index], data.train_labels[index]

    def evaluate(step: int) -> dict:
        images, labels = data.test_images[mesh.dp_rank :: mesh.dp], data.test_labels[mesh.dp_rank :: mesh.dp]
        trainer.pipeline.stage.eval()
        logits, loss = trainer.pipeline.forward_only(images, labels, micro_batches=1)
        trainer.pipeline.stage.train()
        counts = torch.zeros(3, dtype=torch.float64)
        if logits is not None and mesh.tp_rank == 0:
            counts += torch.tensor(
                [(logits.argmax(-1) == labels).sum().item(), len(labels), loss.item() * len(labels)]
            )
        commlab.all_reduce(counts, group=mesh.world_group)
        accuracy, test_loss = counts[0].item() / counts[1].item(), counts[2].item() / counts[1].item()
        if mesh.rank == 0:
            print(
                f"  test accuracy {accuracy:.1%} ({int(counts[0])}/{int(counts[1])}), loss {test_loss:.3f}",
                flush=True,
            )
        return {"test_accuracy": accuracy, "test_loss": test_loss}

    result = trainer.train(batch_at, evaluate, "images", 1)
    result["test_accuracy"] = result["evals"][-1]["test_accuracy"]
    return result


def run_bert(args: argparse.Namespace, mesh: Mesh) -> dict:
    corpus = load_corpus(mesh)
    config, seq_len = args.config, args.config.seq_len
    n_params, trainer = token_model(args, mesh, BERT)
    if mesh.rank == 0:
        describe(args, mesh, n_params, f"{config}", trainer)
        print(
            f"data: {len(corpus.train):,} train / {len(corpus.val):,} validation bytes of the standard "
            f"library; {args.batch_size * seq_len:,} tokens per step, 15% masked (80% [MASK], 10% random, "
            f"10% kept), loss on masked bytes only",
            flush=True,
        )

    def batch_at(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return mlm_batch(
            corpus.train, step, args.batch_size, seq_len, config.mask_id, args.seed, mesh.dp_rank, mesh.dp
        )

    def evaluate(step: int) -> dict:
        score = MaskedLMScore(corpus)
        trainer.pipeline.stage.eval()
        for k in range(args.eval_batches):
            x, y = mlm_batch(
                corpus.val, k, args.batch_size, seq_len, config.mask_id, args.seed + 1, mesh.dp_rank, mesh.dp
            )
            logits = trainer.pipeline.forward_only(x)[0]
            if logits is not None:  # the last stage: vocabulary shards, gathered; tp rank 0 counts
                logits = gather_from_tensor_parallel(logits, mesh.tp_group)
                if mesh.tp_rank == 0:
                    score.add(logits, y)
        trainer.pipeline.stage.train()
        result = score.result(group=mesh.world_group)
        if mesh.rank == 0:
            print(score.describe(result), flush=True)
        return result

    result = trainer.train(batch_at, evaluate, "tokens", seq_len)
    result.update({k: v for k, v in result["evals"][-1].items() if k != "step"})
    return result


def full_size(module: torch.nn.Module, mesh: Mesh) -> int:
    """Parameters of the whole model, from this rank's TP shards (before the pipeline cuts it)."""
    return sum(p.numel() * (mesh.tp if is_tensor_parallel(p) else 1) for p in module.parameters())


def describe(args: argparse.Namespace, mesh: Mesh, n_params: int, config: str, trainer: Trainer) -> None:
    stages = trainer.pipeline.stage.layers_per_stage
    pipeline = f", {args.schedule} over {args.micro_batches} micro-batches, blocks per stage {stages}"
    sequence = ", sequence parallel" if args.sequence_parallel else ""
    sync = f", DataParallel (bucket {args.bucket_mb:g} MiB, allreduce {args.algorithm})"
    print(
        f"commlab {commlab.__version__}: {args.model} on {mesh.world_size} {args.backend} rank(s), "
        f"{mesh.describe()}{sequence}" + (pipeline if mesh.pp > 1 else "") + (sync if mesh.dp > 1 else ""),
        flush=True,
    )
    print(f"model: {n_params:,} parameters, {config}", flush=True)
    print(
        f"training: {args.steps} steps, global batch {args.batch_size} in {args.micro_batches} "
        f"micro-batch(es) per replica, AdamW lr {args.lr:g} (warm-up {args.warmup}, cosine), "
        f"clip {args.clip:g}, checkpoint {args.checkpoint}",
        flush=True,
    )


def main(argv: list[str] | None = None, doc: str = __doc__, default_axis: str | None = None) -> None:
    """Run training; default_axis ('tp' or 'pp') defaults that axis to the whole world."""
    start = time.perf_counter()
    early = build_parser(doc).parse_known_args(argv)[0]
    backend = early.backend
    init_distributed(backend, early.timeout)
    rank, world = rank_and_world()
    args = parse_args(argv, world, rank, doc, default_axis)
    try:
        mesh = Mesh(dp=args.dp, pp=args.pp, tp=args.tp)
        result = {"gpt": run_gpt, "vit": run_vit, "bert": run_bert}[args.model](args, mesh)
        wall = time.perf_counter() - start
        if rank == 0:
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
            if args.json:
                record = {
                    "args": {k: v for k, v in vars(args).items() if k != "config"},
                    "layout": {"dp": args.dp, "pp": args.pp, "tp": args.tp},
                    "world_size": world,
                    "wall_seconds": wall,
                    **result,
                }
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(record, indent=2, default=str) + "\n")
    finally:
        commlab.release()  # close commlab's communicators before their group goes (api.release)
        if backend != "mpi":
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
