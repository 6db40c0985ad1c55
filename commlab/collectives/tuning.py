"""`algorithm="auto"`: rank the algorithms that implement an op by their alpha-beta-gamma cost formulas.

The decision depends only on (op, world size, bytes) and the cost model, so every rank reaches the same
choice without talking. The default model holds constants for loopback gloo on CPU; calibration of the
live transport replaces it later.
"""

from __future__ import annotations

from dataclasses import dataclass

from commlab.collectives.algorithms import ALGORITHMS, algorithms_for, get_algorithm
from commlab.collectives.cost import DEFAULT_COST_MODEL, CostModel


@dataclass(frozen=True)
class Choice:
    """The algorithm to run, its pipeline segment count and its predicted time in seconds."""

    algorithm: str
    segments: int
    predicted_time: float


def segments_for(algorithm: str, op: str, world_size: int, nbytes: int, model: CostModel) -> int:
    """Pipeline segments for a pipelined algorithm (from its cost formula); 1 for the others."""
    entry = get_algorithm(algorithm)
    if not entry.pipelined:
        return 1
    return entry.best_segments(op, world_size, nbytes, model)


def choose(op: str, world_size: int, nbytes: int, model: CostModel = DEFAULT_COST_MODEL) -> Choice:
    """The cheapest algorithm for `op` on `world_size` ranks moving `nbytes` per rank, by its formula."""
    best: Choice | None = None
    for name in algorithms_for(op):
        segments = segments_for(name, op, world_size, nbytes, model)
        time = ALGORITHMS[name].cost(op, world_size, nbytes, model, segments)
        if best is None or time < best.predicted_time:
            best = Choice(name, segments, time)
    assert best is not None  # every op has at least one algorithm
    return best
