"""Parallel training on commlab's collectives: data parallel (bucketed, overlapped) and ZeRO-1."""

from commlab.parallel.data import DataParallel
from commlab.parallel.zero import ZeroOptimizer

__all__ = ["DataParallel", "ZeroOptimizer"]
