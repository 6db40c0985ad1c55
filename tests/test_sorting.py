"""`stable_argsort` must be exactly numpy's stable argsort (ties in position order) for every integer
dtype, range and length, including ranges too wide to pack (numpy's own sort then runs)."""

from __future__ import annotations

import numpy as np
import pytest

from commlab.shared.sorting import stable_argsort


@pytest.mark.parametrize("n", [0, 1, 2, 4095, 4096, 5000, 70_000])
@pytest.mark.parametrize(
    ("dtype", "low", "high"),
    [(np.int64, 0, 3), (np.int64, -50, 50), (np.int32, 0, 1 << 30), (np.uint16, 0, 60_000),
     (np.int64, -(1 << 62), 1 << 62), (np.int64, 0, 1 << 45), (np.uint8, 0, 255)],
)  # fmt: skip
def test_equals_numpy_stable_argsort(n, dtype, low, high):
    keys = np.random.default_rng(n).integers(low, high, n, endpoint=True).astype(dtype)
    got = stable_argsort(keys)
    assert got.dtype == np.int64
    assert np.array_equal(got, np.argsort(keys, kind="stable"))


def test_sorted_and_constant_keys():
    for keys in (np.arange(10_000), np.full(10_000, 7), np.arange(10_000)[::-1].copy()):
        assert np.array_equal(stable_argsort(keys), np.argsort(keys, kind="stable"))
