"""Masked-language-model data as in BERT (Devlin et al. 2019, sec. 3.1): which bytes to hide, and how.

Each sequence gets exactly round(0.15 x length) positions, chosen uniformly without replacement (the
count Google's create_pretraining_data.py uses). Each chosen position independently becomes [MASK] with
probability 0.8, a uniformly random byte with 0.1, or stays itself with 0.1. The targets hold the
original byte at chosen positions and IGNORE_INDEX elsewhere: the loss is taken on chosen positions only.

A fixed count per sequence makes the loss split-invariant: the mean over the masked positions of any set
of whole sequences of equal size is the mean of the per-shard means, so data-parallel ranks and pipeline
microbatches average to exactly the one-process loss. Batches are pure functions of (seed, step), as
lm_batch's are.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from commlab.errors import invalid
from commlab.models.data import _check_shard, mix_seed

IGNORE_INDEX = -100
MASK_FRACTION = 0.15  # of the positions of a sequence
MASK_PROB, RANDOM_PROB = 0.8, 0.1  # of the chosen positions; the remaining 0.1 keep their byte


def masked_count(seq_len: int, fraction: float = MASK_FRACTION) -> int:
    """Positions masked per sequence: round(fraction x seq_len), at least 1."""
    return max(1, round(fraction * seq_len))


def mask_tokens(
    tokens: Tensor, mask_id: int, generator: torch.Generator, random_vocab: int = 256,
    fraction: float = MASK_FRACTION,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """BERT's masking of token ids (B, T): (inputs with [MASK] / random / kept bytes, targets).

    random_vocab: random replacements are drawn uniformly from ids [0, random_vocab) (the bytes).
    """
    if tokens.dim() != 2:
        raise invalid("tokens.shape", tuple(tokens.shape), "(batch, seq_len)")
    if not 0.0 < fraction <= 1.0:
        raise invalid("fraction", fraction, "a float in (0, 1]")
    batch, seq_len = tokens.shape
    order = torch.rand(batch, seq_len, generator=generator).argsort(dim=1)[
        :, : masked_count(seq_len, fraction)
    ]
    chosen = torch.zeros(batch, seq_len, dtype=torch.bool).scatter_(1, order, True)
    decision = torch.rand(batch, seq_len, generator=generator)
    random_ids = torch.randint(0, random_vocab, (batch, seq_len), generator=generator)
    to_mask = chosen & (decision < MASK_PROB)
    to_random = chosen & (decision >= MASK_PROB) & (decision < MASK_PROB + RANDOM_PROB)
    inputs = torch.where(to_random, random_ids, tokens).masked_fill(to_mask, mask_id)
    return inputs, tokens.masked_fill(~chosen, IGNORE_INDEX)


def mlm_batch(
    split: np.ndarray | Tensor, step: int, global_batch: int, seq_len: int, mask_id: int, seed: int = 0,
    rank: int = 0, world: int = 1,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """This rank's rows of step `step`'s masked global batch: (inputs, targets), each (global_batch /
    world, seq_len). Windows at random offsets and their masks are drawn for the whole global batch from
    a generator seeded by (seed, step), so the rank shards stacked are the one-process batch."""
    local = _check_shard(global_batch, rank, world)
    data = torch.as_tensor(split)
    if not isinstance(seq_len, int) or seq_len < 1 or len(data) < seq_len:
        raise invalid("seq_len", seq_len, f"a positive int at most the split's length {len(data)}")
    generator = torch.Generator().manual_seed(mix_seed(seed, step))
    offsets = torch.randint(0, len(data) - seq_len + 1, (global_batch,), generator=generator)
    windows = data[offsets[:, None] + torch.arange(seq_len)].long()
    inputs, targets = mask_tokens(windows, mask_id, generator)
    rows = slice(rank * local, (rank + 1) * local)
    return inputs[rows], targets[rows]


def masked_accuracy(logits: Tensor, targets: Tensor) -> tuple[int, int]:
    """(correct argmax predictions, masked positions) of full-vocabulary logits (..., V) at the masked
    positions of targets (...)."""
    keep = targets != IGNORE_INDEX
    return int((logits[keep].argmax(-1) == targets[keep]).sum()), int(keep.sum())
