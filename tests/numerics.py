"""Tolerances for "parallel run equals one process" checks, derived from the arithmetic, not from one CPU.

Every layout (data, tensor, pipeline parallel, ZeRO, gradient accumulation, checkpointing) computes the
same function as one process; it only adds floating-point sums up in another order: the allreduce's
order, tensor parallelism's split matmuls, micro-batch accumulation, and the blocking of the GEMM kernels
the CPU gets (AVX-512, AVX2 or the default ATen kernels, MKL's code path). Reordering a sum of n terms
changes it by at most 2 (n - 1) u sum|t_i| (Higham, *Accuracy and Stability of Numerical Algorithms*,
2nd ed., section 4.2), u the unit roundoff: 2^-24 in float32, 2^-53 in float64.

What an optimizer does with that difference decides whether a multi-step comparison can be tight:
- SGD with momentum mu and learning rate lr passes a gradient difference to the weights linearly: after S
  steps the weights differ by at most lr S / (1 - mu) times it.
- Adam divides each entry by sqrt(v) + eps: for an entry near zero the update moves by up to lr / eps
  times the gradient's difference (1e6 for lr 1e-2, eps 1e-8). In float32 with n ~ 1e3 summands that is
  about lr itself, so a float32 multi-step AdamW comparison can hold at no tolerance tighter than the
  learning rate: a test at 1e-6 passes or fails depending on the CPU's kernels (it failed on AVX-512).

So the multi-step equivalence tests run in float64 (`float64()`), where the same bound is 2^29 times
smaller, and compare at the bounds below. Real bugs (a bucket not reduced, a missed micro-batch, a wrong
average, a shard out of place) move weights by ~lr = 1e-2..1e-1, at least three orders of magnitude above
every bound here. Only where the order of operations is really the same (the same process, same kernels,
same micro-batch order) do the tests compare bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}
# The longest sums in the test models: a reduction over batch x sequence tokens (8 x 32), hidden sizes and
# the byte vocabulary (<= 256), times the GEMM kernels' partial sums: n = 1024 bounds them all.
TERMS = 1024
# sum|t_i| of one gradient entry: products of activations (layer-normed, O(1)) with the loss's
# per-token gradients (each <= 1 / tokens in magnitude, summing to <= 1): at most a few.
GRADIENT_SCALE = 4.0


def sum_reorder_bound(
    dtype: torch.dtype = torch.float64, terms: int = TERMS, scale: float = GRADIENT_SCALE
) -> float:
    """The most a sum of `terms` terms of total magnitude `scale` can change when its order changes."""
    return 2 * (terms - 1) * UNIT_ROUNDOFF[dtype] * scale


def one_pass_tolerance(dtype: torch.dtype = torch.float64) -> float:
    """Bound for one forward and backward without an optimizer: each output or gradient entry is a sum of
    <= TERMS products of inputs ~N(0, 1) (|x| <= 4) and weights or layer-normed activations (<= 1), so
    sum|t_i| <= 4 TERMS; about 9e-10 in float64."""
    return sum_reorder_bound(dtype, scale=4.0 * TERMS)


def sgd_tolerance(
    steps: int, lr: float, momentum: float, dtype: torch.dtype = torch.float64, clip_gain: float = 1.0
) -> float:
    """Bound on the weights' difference after `steps` SGD steps whose gradients differ by reordering;
    `clip_gain` bounds how much a gradient-norm clip scales a difference (2 c / |g| for clip norm c)."""
    return steps * lr / (1 - momentum) * clip_gain * sum_reorder_bound(dtype)


def adam_tolerance(steps: int, lr: float, eps: float, dtype: torch.dtype = torch.float64) -> float:
    """Bound on the weights' difference after `steps` Adam(W) steps: lr / eps amplification per step."""
    return steps * lr / eps * sum_reorder_bound(dtype)


@contextmanager
def float64() -> Iterator[None]:
    """Build and run models in float64 (the default dtype), restoring the previous default after."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
