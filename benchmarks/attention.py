"""Linear attention against softmax attention in a GPT, on CPU: forward + backward time and activation memory.

    python benchmarks/attention.py                          # GPT small, seq 1024 and 4096, 5 trials
    python benchmarks/attention.py --seq 512,1024,2048,4096 --trials 7 --json attention.json

The model is the GPT "small" preset (4 blocks, d_model 128, 4 heads of 32) with seq_len raised to each
length, batch --batch, fp32, --threads torch threads. Softmax attention is torch's
scaled_dot_product_attention (causal; on CPU its flash kernel keeps only the log-sum-exp per row, not
the n x n probabilities), linear attention commlab's chunked causal form (commlab/models/attention.py).
Each trial times one forward + backward of the loss for each variant in turn, the order alternating
between trials; the table gives the medians and linear / softmax. Activation memory: the bytes autograd
keeps for backward at their peak (ActivationMeter), measured once per variant; "n x n" is what an
attention that stores its probabilities (the textbook form) would keep for them alone,
4 bytes x batch x heads x n^2 x layers, for scale.
Measured, never asserted: the figures depend on the machine and its load (recorded in the JSON).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from parallel_ranks import machine

from commlab.models import GPT, GPTConfig
from commlab.parallel.memory import ActivationMeter

VARIANTS = ("softmax", "linear")


def build(attention: str, seq_len: int) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.preset("small", seq_len=seq_len, attention=attention))


def forward_backward(model: GPT, ids: torch.Tensor) -> float:
    """Seconds for one forward and backward of the next-token loss."""
    start = time.perf_counter()
    loss = model(ids[:, :-1], ids[:, 1:])[1]
    loss.backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def activation_bytes(model: GPT, ids: torch.Tensor) -> int:
    with ActivationMeter(list(model.parameters())) as meter:
        loss = model(ids[:, :-1], ids[:, 1:])[1]
    loss.backward()
    model.zero_grad(set_to_none=True)
    return meter.peak


def measure(seq_len: int, batch: int, trials: int) -> dict:
    models = {v: build(v, seq_len) for v in VARIANTS}
    ids = torch.randint(0, 256, (batch, seq_len + 1), generator=torch.Generator().manual_seed(1))
    for model in models.values():  # warm-up: allocator, kernels' first-call set-up
        forward_backward(model, ids)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for trial in range(trials):
        order = VARIANTS if trial % 2 == 0 else VARIANTS[::-1]
        for variant in order:
            times[variant].append(forward_backward(models[variant], ids))
    config = models["softmax"].config
    row = {"seq_len": seq_len, "batch": batch, "times_s": times}
    for variant in VARIANTS:
        row[f"{variant}_s"] = statistics.median(times[variant])
        row[f"{variant}_bytes"] = activation_bytes(models[variant], ids)
    row["time_ratio"] = row["linear_s"] / row["softmax_s"]
    row["memory_ratio"] = row["linear_bytes"] / row["softmax_bytes"]
    row["quadratic_probability_bytes"] = 4 * batch * config.n_head * seq_len**2 * config.n_layer
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq", default="1024,4096", help="comma-separated sequence lengths")
    parser.add_argument("--batch", type=int, default=1, help="sequences per forward (default: 1)")
    parser.add_argument("--trials", type=int, default=5, help="interleaved trials per length (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--json", metavar="PATH", help="write the rows and the machine description")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lengths = [int(s) for s in args.seq.split(",")]
    host = machine()
    mib = 2**20
    print(
        f"# GPT small (4 x d128, 4 heads), batch {args.batch}, fp32, {args.threads} thread(s): forward + "
        f"backward, median of {args.trials} interleaved trials; activation memory = autograd's saved bytes"
    )
    header = (
        f"{'seq':>6} {'softmax ms':>11} {'linear ms':>10} {'lin/soft':>9} "
        f"{'softmax MiB':>12} {'linear MiB':>11} {'lin/soft':>9} {'n x n MiB':>10}"
    )
    print(header)
    rows = []
    for seq_len in lengths:
        row = measure(seq_len, args.batch, args.trials)
        rows.append(row)
        print(
            f"{seq_len:>6} {row['softmax_s'] * 1e3:>11.1f} {row['linear_s'] * 1e3:>10.1f} "
            f"{row['time_ratio']:>9.2f} {row['softmax_bytes'] / mib:>12.1f} "
            f"{row['linear_bytes'] / mib:>11.1f} "
            f"{row['memory_ratio']:>9.2f} {row['quadratic_probability_bytes'] / mib:>10.1f}",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"machine": host, "args": vars(args), "rows": rows}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
