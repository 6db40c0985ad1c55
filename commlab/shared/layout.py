"""Where a rank sits in the dp x pp x tp mesh, and the activation checkpointing modes.

Rank r sits at (dp_rank, pp_rank, tp_rank) with r = (dp_rank x pp + pp_rank) x tp + tp_rank: TP varies
fastest, so a TP group is neighbouring ranks (one node's GPUs on a real cluster), a pipeline's stages are
tp ranks apart, and a DP group strides over whole model replicas. `parallel.Mesh` builds its groups in
this order and the training simulator places its groups on the cluster by it.

Checkpointing modes (Korthikanti et al. 2022): `none` keeps every activation, `selective` recomputes the
attention core, `full` keeps only each block's input and recomputes the block.
"""

from __future__ import annotations

AXES = ("dp", "pp", "tp")  # slowest to fastest
CHECKPOINT_MODES = ("none", "selective", "full")


def rank_at(dp_rank: int, pp_rank: int, tp_rank: int, pp: int, tp: int) -> int:
    """The global rank at a mesh position."""
    return (dp_rank * pp + pp_rank) * tp + tp_rank


def coordinates(rank: int, pp: int, tp: int) -> tuple[int, int, int]:
    """(dp_rank, pp_rank, tp_rank) of a global rank (the inverse of `rank_at`)."""
    return rank // (pp * tp), rank // tp % pp, rank % tp
