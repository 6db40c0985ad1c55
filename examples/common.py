"""What the training examples share: per-model defaults, joining the group, the LR schedule, rank helpers,
checkpoint flags and automatic resume.

Imported by examples/ddp.py and examples/train_3d.py as a sibling module (scripts run from examples/).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
from collections.abc import Iterator
from datetime import timedelta

import torch
import torch.distributed as dist

import commlab
from commlab.models import (
    ATTENTIONS,
    BERT_PRESETS,
    GPT_PRESETS,
    VIT_PRESETS,
    BERTConfig,
    ByteCorpus,
    GPTConfig,
    ViTConfig,
)
from commlab.parallel.checkpoint import (
    CheckpointError,
    CheckpointManager,
    Layout,
    load_training,
    save_training,
)
from commlab.parallel.faults import fault_planned, fault_point

# Per-model defaults, tuned so `make demo` (4 ranks, 2 cores) ends well within 2 minutes.
DEFAULTS = {
    "gpt": dict(preset="small", steps=250, batch_size=32, lr=3e-3, eval_every=50),
    "vit": dict(preset="digits", steps=600, batch_size=64, lr=2e-3, eval_every=200),
    "bert": dict(preset="small", steps=300, batch_size=32, lr=3e-3, eval_every=100),
}
PRESETS = {"gpt": GPT_PRESETS, "vit": VIT_PRESETS, "bert": BERT_PRESETS}
CONFIGS = {"gpt": GPTConfig, "vit": ViTConfig, "bert": BERTConfig}


def preset_help() -> str:
    return "model shape; " + "; ".join(f"{m}: {', '.join(p)}" for m, p in PRESETS.items())


def add_attention_flag(add) -> None:
    """--attention softmax|linear (every model)."""
    add("--attention", default="softmax", choices=ATTENTIONS, help="softmax or linear attention (elu + 1)")


class MaskedLMScore:
    """A BERT evaluation's sums, beside the unigram baseline at the same masked positions: the baseline
    predicts the train split's most frequent byte everywhere and scores log p(byte) of its frequencies."""

    def __init__(self, corpus: ByteCorpus) -> None:
        self.log_p = torch.from_numpy(corpus.unigram_log_probs())
        self.mode = int(self.log_p.argmax())
        self.sums = torch.zeros(5, dtype=torch.float64)  # loss x count, correct, count, baseline ones

    def add(self, full_logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Count one batch from full-vocabulary logits (B, T, V) and targets (B, T)."""
        keep = targets != -100
        target, logits = targets[keep], full_logits[keep].double()
        nll = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
        correct = (logits.argmax(-1) == target).sum()
        base_correct = (target == self.mode).sum()
        base_nll = -self.log_p[target].sum()
        self.sums += torch.stack([nll, correct, keep.sum(), base_correct, base_nll]).double()

    def result(self, group=None) -> dict:
        """Sum over ranks (group: the ranks holding the counts) and return the scores."""
        commlab.all_reduce(self.sums, group=group)
        nll, correct, count, base_correct, base_nll = self.sums.tolist()
        return {
            "val_loss": nll / count,
            "masked_accuracy": correct / count,
            "unigram_loss": base_nll / count,
            "unigram_accuracy": base_correct / count,
            "masked_positions": int(count),
        }

    def describe(self, score: dict) -> str:
        ratio = score["masked_accuracy"] / max(score["unigram_accuracy"], 1e-12)
        return (
            f"  validation MLM loss {score['val_loss']:.3f} nats, masked-token accuracy "
            f"{score['masked_accuracy']:.1%} over {score['masked_positions']:,} masked bytes; unigram "
            f"baseline {score['unigram_loss']:.3f} nats, {score['unigram_accuracy']:.1%} (always "
            f"{chr(self.mode)!r}): accuracy {ratio:.2f}x the baseline's"
        )


def bert_summary(result: dict) -> str:
    score = result["evals"][-1]
    return (
        f"final masked-token accuracy {score['masked_accuracy']:.1%} = "
        f"{score['masked_accuracy'] / score['unigram_accuracy']:.2f}x the unigram baseline's "
        f"{score['unigram_accuracy']:.1%}; MLM loss {score['val_loss']:.3f} nats against the baseline's "
        f"{score['unigram_loss']:.3f}; {result['rate_per_s']:,.0f} tokens/s"
    )


def init_distributed(backend: str, timeout: float | None = None) -> torch.device:
    """Join the torchrun group (or MPI's COMM_WORLD), or make a one-rank group as a plain script.

    `timeout`: seconds every collective and pipeline receive of the group may wait (None: commlab's
    default, 60 s); a rank whose peer is gone raises after it, so torchrun can restart the group.
    """
    extra = {} if timeout is None else {"timeout": timedelta(seconds=timeout)}
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
            **extra,
        )
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, **extra)
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


def add_checkpoint_flags(add) -> None:
    """--checkpoint-dir, --save-every, --keep (both examples)."""
    add(
        "--checkpoint-dir",
        metavar="DIR",
        help="save training checkpoints here and resume from the newest complete one on start",
    )
    add("--save-every", type=int, default=0, help="checkpoint every this many steps (with --checkpoint-dir)")
    add("--keep", type=int, default=3, help="checkpoints kept in --checkpoint-dir (default: 3)")


def checkpoint_flag_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the checkpoint flags, or None."""
    if args.save_every < 0 or args.keep < 1:
        return f"--save-every {args.save_every} must be >= 0 and --keep {args.keep} >= 1"
    if args.save_every and not args.checkpoint_dir:
        return "--save-every needs --checkpoint-dir"
    return None


class Checkpoints:
    """--checkpoint-dir for a training loop: resume on start, save every --save-every steps.

    The data position is the number of global batches consumed (= the step): every example draws step k's
    global batch from (seed, k) alone and each rank takes its 1/dp of it, so a run resumed at step k, under
    any dp size, trains on exactly the global batches the saved run would have. The checkpoint records the
    global batch size and seed with it, and resuming with either changed is refused.
    """

    def __init__(self, args: argparse.Namespace, model, optimizer, layout: Layout) -> None:
        self.args, self.model, self.optimizer, self.layout = args, model, optimizer, layout
        self.manager = CheckpointManager(args.checkpoint_dir, keep=args.keep) if args.checkpoint_dir else None

    def data_state(self, step: int) -> dict:
        return {"position": step, "global_batch": self.args.batch_size, "seed": self.args.seed}

    def resume(self) -> int:
        """Load the newest complete checkpoint, if any; returns the step to start from (0 without one)."""
        rank = self.manager.comm.rank if self.manager else 0
        fault_point("start", 0, rank)
        if self.manager is None:
            return 0
        resumed = load_training(self.manager, self.model, self.optimizer, self.layout)
        if resumed is None:
            return 0
        step, extra = resumed
        data = extra.get("data", {})
        expected = self.data_state(step)
        for key in ("position", "global_batch", "seed"):
            if data.get(key) != expected[key]:
                raise CheckpointError(
                    f"checkpoint {self.manager.step_dir(step)} has data {key}={data.get(key)}, this run "
                    f"{expected[key]} (--batch-size and --seed must be those of the saved run)"
                )
        if rank == 0:
            print(f"resumed from {self.manager.step_dir(step)} (step {step})", flush=True)
        return step

    def after_step(self, done: int) -> None:
        """Save after `done` steps when --save-every says so."""
        if self.manager and self.args.save_every and done % self.args.save_every == 0:
            extra = {"data": self.data_state(done)}
            save_training(self.manager, done, self.model, self.optimizer, self.layout, extra)


@contextlib.contextmanager
def collective_fault(parameters: list[torch.nn.Parameter], step: int, rank: int) -> Iterator[None]:
    """COMMLAB_FAULT's `collective` phase for one step: a hook on the parameter whose gradient comes last
    in backward (the first: the embedding) kills the rank right after its gradient sync is launched."""
    if not fault_planned("collective"):
        yield
        return
    handle = parameters[0].register_post_accumulate_grad_hook(lambda _: fault_point("collective", step, rank))
    try:
        yield
    finally:
        handle.remove()
