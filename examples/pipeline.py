"""Train a GPT (or a ViT) with pipeline parallelism over all ranks: examples/train_3d.py with --pp
defaulting to the world size.

    torchrun --standalone --nproc-per-node 2 examples/pipeline.py                       # GPT, 2 stages, 1F1B
    torchrun --standalone --nproc-per-node 4 examples/pipeline.py --schedule gpipe --micro-batches 8
    torchrun --standalone --nproc-per-node 4 examples/pipeline.py --pp 2                # dp 2 x pp 2

The blocks are split into stages balanced by parameter count (embedding on the first, head and loss on
the last); each step runs --micro-batches microbatches (default 2 x pp) with the GPipe or 1F1B schedule,
activations and gradients passing between stages point-to-point. Same flags and output as
examples/ddp.py, plus --tp, --pp, --dp, --schedule (see train_3d.py --help).
"""

from train_3d import main

if __name__ == "__main__":
    main(doc=__doc__, default_axis="pp")
