"""A stable argsort of integer keys that is several times faster than numpy's on millions of keys.

numpy's stable argsort of 64-bit integers is a timsort/mergesort over (key, index) pairs; on a 16.8 M
message schedule it dominates compiling. When the keys' range times the number of keys fits in 63 bits,
each key becomes the one integer (key - min) x 2^b + position (b bits hold every position), all distinct,
and one plain in-place sort of those (numpy's fastest, SIMD where the CPU has it) orders them by key and,
among equal keys, by position: exactly the stable order. Its low b bits are then the permutation.
"""

from __future__ import annotations

import numpy as np

_MIN_FAST = 4096  # below this numpy's own stable sort is as fast


def stable_argsort(keys: np.ndarray) -> np.ndarray:
    """`np.argsort(keys, kind="stable")` (int64 positions), by one sort of packed keys when they fit."""
    keys = np.asarray(keys)
    n = len(keys)
    if n >= _MIN_FAST and keys.ndim == 1 and keys.dtype.kind in "iu":
        low, high = int(keys.min()), int(keys.max())
        bits = (n - 1).bit_length()
        if high < (1 << 63) and (high - low) < (1 << (63 - bits)):
            packed = keys.astype(np.int64)
            packed -= low
            packed <<= bits
            packed |= np.arange(n, dtype=np.int64)
            packed.sort()
            packed &= (1 << bits) - 1
            return packed
    return np.argsort(keys, kind="stable")
