"""`commlab sim train` (simulate one training step) and `commlab plan` (rank parallel layouts).

    commlab sim train --model gpt-175b --gpus 1024 --cluster dgx-a100 --tp 8 --pp 8 --dp 16 \\
        --micro-batch 1 --global-batch 1536 --checkpoint selective [--trace step.json] [--json]
    commlab plan --model gpt-175b --gpus 1024 --cluster dgx-a100 [--top 10] [--global-batch 1536] [--json]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from commlab.errors import invalid
from commlab.shared.attention import ATTENTIONS
from commlab.shared.layout import CHECKPOINT_MODES
from commlab.shared.pipeline_order import SCHEDULES
from commlab.sim.network import FIDELITIES
from commlab.sim.training.clusters import CLUSTERS, cluster_spec
from commlab.sim.training.compute import Efficiency, load_efficiency
from commlab.sim.training.memory import MemoryReport
from commlab.sim.training.planner import Progress, plan_layouts
from commlab.sim.training.step import simulate_training
from commlab.sim.training.step_trace import write_training_trace
from commlab.sim.training.workload import (
    MODEL_PRESETS,
    ZERO_STAGES,
    Layout,
    ModelSpec,
    check_layout,
    model_spec,
)

GB = 1e9
MODEL_HELP = f"a preset ({', '.join(MODEL_PRESETS)}) or a TOML file with layers, hidden, heads, ..."


def _model(args: argparse.Namespace) -> ModelSpec:
    spec = model_spec(args.model, seq_len=args.seq, vocab=args.vocab)
    changes = {"attention": args.attention} if args.attention else {}
    if args.encoder:
        changes["causal"] = False
    return replace(spec, **changes) if changes else spec


def _efficiency(args: argparse.Namespace) -> Efficiency:
    return load_efficiency(args.efficiency) if args.efficiency else Efficiency()


def _layout(args: argparse.Namespace, model: ModelSpec, gpus_per_node: int) -> Layout:
    tp, pp = args.tp, args.pp
    if args.gpus is None and args.dp is None:
        raise invalid("gpus", None, "a number of GPUs (or --dp, with --tp and --pp)")
    gpus = args.gpus if args.gpus is not None else args.dp * tp * pp
    dp = args.dp if args.dp is not None else max(1, gpus // (tp * pp))  # check_layout names a mismatch
    schedule = args.schedule or ("interleaved" if args.virtual_stages > 1 else "1f1b")
    batch = args.global_batch if args.global_batch is not None else dp * args.micro_batch * max(pp, 1)
    layout = Layout(
        dp=dp,
        tp=tp,
        pp=pp,
        micro_batch=args.micro_batch,
        global_batch=batch,
        virtual_stages=args.virtual_stages,
        schedule=schedule,
        zero=args.zero,
        checkpoint=args.checkpoint,
        sequence_parallel=args.sequence_parallel,
        fp32_grads=args.fp32_grads,
    )
    check_layout(model, layout, gpus, gpus_per_node)
    return layout


def _memory_lines(mem: MemoryReport) -> list[str]:
    verdict = (
        f"fits (headroom {mem.headroom / GB:.1f} GB)"
        if mem.fits
        else f"OUT OF MEMORY by {-mem.headroom / GB:.1f} GB"
    )
    return [
        f"memory per GPU        (fullest: pipeline rank {mem.stage}, {mem.parameters / 1e9:.2f}B parameters)",
        f"  weights             {mem.weights / GB:9.2f} GB",
        f"  gradients           {mem.gradients / GB:9.2f} GB",
        f"  optimizer states    {mem.optimizer / GB:9.2f} GB",
        f"  activations         {mem.activations / GB:9.2f} GB",
        f"  reserved            {mem.reserved / GB:9.2f} GB",
        f"  total               {mem.total / GB:9.2f} GB of {mem.capacity / GB:.0f} GB: {verdict}",
    ]


def _train(args: argparse.Namespace) -> int:
    spec = cluster_spec(args.cluster)
    model = _model(args)
    layout = _layout(args, model, spec.gpus_per_node)
    result = simulate_training(model, layout, spec, _efficiency(args), fidelity=args.fidelity)
    if args.trace:
        write_training_trace(result, args.trace)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    r = result
    billions = model.parameter_count() / 1e9
    print(
        f"# commlab sim train: {model.name} ({billions:.1f}B parameters, seq {model.seq_len}, "
        f"vocab {model.vocab}, {'decoder' if model.causal else 'encoder'}, {model.attention} attention) "
        f"on {layout.gpus} GPUs"
    )
    print(f"# cluster {spec.describe()}")
    print(
        f"# layout {layout.describe()}, schedule {layout.schedule}, global batch {layout.global_batch} "
        f"({layout.microbatches} microbatches per replica), fidelity {args.fidelity}"
    )
    print(f"step time             {r.step_time:9.3f} s")
    print(f"tokens/s              {r.tokens_per_second:9.0f}")
    print(f"MFU / HFU             {r.mfu * 100:8.1f}% / {r.hfu * 100:.1f}%")
    print(f"model FLOPs per step  {r.model_flops:9.3e}")
    print(f"pipeline bubble       {r.bubble * 100:8.1f}%")
    print(f"{'communication':<22}{'total (s)':>10} {'exposed (s)':>12} {'overlapped (s)':>15}")
    for name, c in r.comm.items():
        if c.total > 0:
            print(f"  {name.replace('_', ' '):<20}{c.total:>10.3f} {c.exposed:>12.3f} {c.overlapped:>15.3f}")
    print(f"optimizer step        {r.tail['optimizer']:9.3f} s")
    for line in _memory_lines(r.memory):
        print(line)
    return 0


def _plan(args: argparse.Namespace) -> int:
    spec = cluster_spec(args.cluster)
    model = _model(args)
    bars: dict[str, Progress] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in bars:
            for bar in bars.values():
                bar.close()
            bars[stage] = Progress(total, stage)
        bars[stage].update(done + 1)

    micro = tuple(int(x) for x in args.micro_batches.split(",") if x.strip())
    checkpoints = tuple(x.strip() for x in args.checkpoints.split(",") if x.strip())
    for mode in checkpoints:
        if mode not in CHECKPOINT_MODES:
            raise invalid("checkpoints", mode, CHECKPOINT_MODES)
    result = plan_layouts(
        model,
        args.gpus,
        spec,
        args.global_batch,
        args.top,
        _efficiency(args),
        args.fidelity,
        micro,
        checkpoints,
        progress,
    )
    for bar in bars.values():
        bar.close()
    if args.json:
        out = {
            "model": model.to_dict(),
            "gpus": args.gpus,
            "cluster": spec.name,
            "enumerated": result.enumerated,
            "fitting": result.fitting,
            "simulated": result.simulated,
            "seconds": result.seconds,
            "layouts": [{**e.result.to_dict(), "reasons": e.reasons()} for e in result.entries],
        }
        print(json.dumps(out, indent=2))
        return 0
    batch = result.entries[0].result.layout.global_batch if result.entries else args.global_batch
    print(
        f"# commlab plan: {model.name} on {args.gpus} GPUs of {spec.name}, global batch {batch}: "
        f"{result.enumerated} layouts, {result.fitting} fit in memory, {result.simulated} simulated "
        f"({result.seconds:.1f} s)"
    )
    if not result.entries:
        near = result.smallest_oom
        extra = f"; the closest needs {near.total / GB:.1f} GB of {near.capacity / GB:.0f} GB" if near else ""
        print(f"no layout fits in memory{extra}")
        return 1
    print(f"{'#':>3} {'layout':<38} {'step (s)':>9} {'tokens/s':>10} {'MFU':>6}  reasons")
    for i, entry in enumerate(result.entries, 1):
        r = entry.result
        print(
            f"{i:>3} {r.layout.describe():<38} {r.step_time:>9.3f} {r.tokens_per_second:>10.0f} "
            f"{r.mfu * 100:>5.1f}%  {entry.reasons()}"
        )
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument(
        "--cluster", default="dgx-a100", help=f"one of {', '.join(CLUSTERS)} (default dgx-a100)"
    )
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default: the model's)")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the model's)")
    parser.add_argument(
        "--attention", choices=ATTENTIONS, default=None, help="softmax or linear (default: the model's)"
    )
    parser.add_argument(
        "--encoder", action="store_true", help="a bidirectional encoder (causal = false; bert-* presets are)"
    )
    parser.add_argument("--efficiency", default=None, help="TOML file overriding the efficiency constants")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def add_train_parser(simsub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `commlab sim train` on the `commlab sim` subparsers."""
    train = simsub.add_parser("train", help="simulate one training step under DP x TP x PP")
    _common(train)
    train.add_argument("--gpus", type=int, default=None, help="GPUs in all (default dp x tp x pp)")
    train.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    train.add_argument("--pp", type=int, default=1, help="pipeline stages (default 1)")
    train.add_argument("--dp", type=int, default=None, help="data-parallel size (default gpus / (tp x pp))")
    train.add_argument("--micro-batch", type=int, default=1, help="sequences per microbatch (default 1)")
    train.add_argument(
        "--global-batch", type=int, default=None, help="sequences per step (default dp x micro-batch x pp)"
    )
    train.add_argument("--virtual-stages", type=int, default=1, help="model chunks per GPU (interleaving)")
    train.add_argument(
        "--schedule", choices=SCHEDULES, default=None, help="default 1f1b (interleaved if v > 1)"
    )
    train.add_argument(
        "--checkpoint", choices=CHECKPOINT_MODES, default="none", help="activation checkpointing"
    )
    train.add_argument("--sequence-parallel", action="store_true", help="Megatron sequence parallelism")
    train.add_argument("--zero", type=int, choices=ZERO_STAGES, default=0, help="ZeRO stage (default 0)")
    train.add_argument("--fp32-grads", action="store_true", help="fp32 main gradients (18 bytes/parameter)")
    train.add_argument("--fidelity", choices=("auto", *FIDELITIES), default="auto", help="collective timing")
    train.add_argument("--trace", default=None, help="write a Chrome/Perfetto trace of the step here")
    train.set_defaults(run=_train)
    return train


def add_plan_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `commlab plan` on the top-level subparsers."""
    parser = sub.add_parser("plan", help="rank every parallel layout of a model that fits on a cluster")
    _common(parser)
    parser.add_argument("--gpus", type=int, required=True, help="GPUs in all")
    parser.add_argument("--global-batch", type=int, default=None, help="sequences per step (default: gpus)")
    parser.add_argument("--top", type=int, default=10, help="layouts to print (default 10)")
    parser.add_argument(
        "--micro-batches", default="1,2,4,8", help="microbatch sizes to try (default 1,2,4,8)"
    )
    parser.add_argument(
        "--checkpoints", default=",".join(CHECKPOINT_MODES), help="checkpointing modes to try (default all)"
    )
    parser.add_argument(
        "--fidelity",
        choices=("auto", *FIDELITIES),
        default="analytic",
        help="collective timing (default analytic)",
    )
    parser.set_defaults(run=_plan)
    return parser
