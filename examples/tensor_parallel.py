"""Train a GPT (or a ViT) with Megatron-style tensor parallelism over all ranks: examples/train_3d.py with
--tp defaulting to the world size.

    torchrun --standalone --nproc-per-node 2 examples/tensor_parallel.py                # GPT, tp 2
    torchrun --standalone --nproc-per-node 4 examples/tensor_parallel.py --tp 2          # dp 2 x tp 2
    torchrun --standalone --nproc-per-node 2 examples/tensor_parallel.py --model vit --checkpoint full

Every block's attention heads and MLP are split across the ranks (two allreduces per block forward, two
backward), and so are the vocabulary, the embedding and the cross-entropy. Same flags and output as
examples/ddp.py, plus --tp, --pp, --dp, --schedule (see train_3d.py --help).
"""

from train_3d import main

if __name__ == "__main__":
    main(doc=__doc__, default_axis="tp")
