"""The DP x PP x TP grid of process groups over the world, TP innermost.

Rank r sits at (dp_rank, pp_rank, tp_rank) with r = (dp_rank * pp + pp_rank) * tp + tp_rank
(`commlab.shared.layout`, the order the training simulator uses too), so the ranks of one TP group are
neighbours (on a real cluster: the GPUs of one node, joined by NVLink), a pipeline's stages are tp ranks
apart, and a data-parallel group strides over whole model replicas.

`Mesh(dp, pp, tp)` builds one communicator per axis for this rank, on torch.distributed (every rank
creates every group, in the same order) or on an MPI communicator (`Mesh(..., world=MPI.COMM_WORLD)`,
one `Split` per axis). Each is a commlab `Communicator`, accepted as `group=` by every collective and by
`DataParallel`. The pipeline group carries only the pipeline's point-to-point messages; with pp > 1 an
extra two-rank `embedding_group` joins the first and last stage, which both hold a tied embedding.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from commlab.collectives.api import communicator
from commlab.collectives.communicator import Communicator
from commlab.errors import CommlabError, InvalidArgumentError, invalid
from commlab.shared.layout import AXES, coordinates, rank_at


def check_layout(world_size: int, dp: int, pp: int, tp: int) -> None:
    """Each size a positive int and dp x pp x tp == world_size, else a clear error."""
    for name, value in (("dp", dp), ("pp", pp), ("tp", tp)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise invalid(name, value, "a positive int")
    if dp * pp * tp != world_size:
        raise InvalidArgumentError(
            f"dp x pp x tp = {dp} x {pp} x {tp} = {dp * pp * tp} is not accepted; accepted: a layout whose "
            f"product is the world size {world_size}"
        )


def axis_groups(dp: int, pp: int, tp: int) -> dict[str, list[list[int]]]:
    """Every group of every axis as sorted global ranks, in the order all ranks create them.

    One grid `arange(world).view(dp, pp, tp)` (rank order of `commlab.shared.layout`), sliced per axis
    as picotron does: a TP group is a row of the last dimension, a PP group a column of the middle one,
    a DP group a fibre of the first; groups come in the order of the other two coordinates.
    'embedding' (pp > 1 only): the first and last stage of each pipeline, for tied embedding weights.
    """
    grid = torch.arange(dp * pp * tp).view(dp, pp, tp)
    groups = {
        "tp": grid.reshape(-1, tp).tolist(),
        "pp": grid.permute(0, 2, 1).reshape(-1, pp).tolist(),
        "dp": grid.permute(1, 2, 0).reshape(-1, dp).tolist(),
    }
    if pp > 1:
        groups["embedding"] = [[ranks[0], ranks[-1]] for ranks in groups["pp"]]
    return groups


def check_model(config: Any, tp: int, pp: int) -> None:
    """Raise if a GPT or ViT config cannot be split tp ways (heads, d_ff, vocabulary) into pp stages."""
    for name in ("n_head", "d_ff", "vocab_size"):
        value = getattr(config, name, None)
        if value is not None and value % tp:
            raise invalid(f"config.{name}", value, f"a multiple of tp={tp}")
    if config.n_layer < pp:
        raise invalid("pp", pp, f"at most config.n_layer={config.n_layer} (each stage holds a block)")


def _mpi_world() -> Any:
    """MPI.COMM_WORLD when the program runs on MPI (it initialized mpi4py.MPI), else a clear error."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        return mpi.COMM_WORLD
    raise CommlabError(
        "torch.distributed is not initialized and MPI is not running: call "
        "torch.distributed.init_process_group() first (or launch with torchrun), or run under mpiexec"
    )


def world_timeout() -> timedelta | None:
    """The default group's timeout (init_process_group(timeout=...)), for the mesh's groups: torch gives a
    new group its backend's default (30 minutes for gloo) instead, so a short timeout set for the job
    would not reach the pipeline's receives or DataParallel's allreduces. None where it cannot be read."""
    try:
        return dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout
    except (AttributeError, RuntimeError):
        return None


class Mesh:
    """This rank's place in the dp x pp x tp grid and a communicator per axis.

    world: None for torch.distributed's default group (or MPI.COMM_WORLD when the program runs on MPI
    without torch.distributed), or an mpi4py communicator. Attributes: dp, pp, tp
    (sizes); rank, world_size; dp_rank, pp_rank, tp_rank; dp_group, pp_group, tp_group, embedding_group
    (None when pp == 1); prev_stage / next_stage (pipeline-group ranks, None at the ends).
    """

    def __init__(self, dp: int = 1, pp: int = 1, tp: int = 1, world: Any = None) -> None:
        if world is None and not (dist.is_available() and dist.is_initialized()):
            world = _mpi_world()
        self.backend = "torch" if world is None else "mpi"
        if self.backend == "torch":
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        else:
            if not callable(getattr(world, "Split", None)):
                raise invalid("world", type(world).__name__, "None (torch.distributed) or an mpi4py Comm")
            self.rank, self.world_size = world.Get_rank(), world.Get_size()
        check_layout(self.world_size, dp, pp, tp)
        self.dp, self.pp, self.tp = dp, pp, tp
        self.dp_rank, self.pp_rank, self.tp_rank = coordinates(self.rank, pp, tp)
        self.groups = axis_groups(dp, pp, tp)
        made = {axis: self._make(lists, world) for axis, lists in self.groups.items()}
        self.tp_group: Communicator = made["tp"]
        self.pp_group: Communicator = made["pp"]
        self.dp_group: Communicator = made["dp"]
        self.embedding_group: Communicator | None = made.get("embedding")
        self.world_group: Communicator = communicator(None) if world is None else communicator(world)
        if self.pp_rank not in (0, pp - 1):
            self.embedding_group = None

    def _make(self, lists: list[list[int]], world: Any) -> Communicator | None:
        """Create every group in `lists` (all ranks, same order); return this rank's, or None."""
        mine = [i for i, ranks in enumerate(lists) if self.rank in ranks]
        if self.backend == "torch":
            timeout = world_timeout()
            made = [dist.new_group(ranks, timeout=timeout) for ranks in lists]
            return communicator(made[mine[0]]) if mine else None
        from mpi4py import MPI

        sub = world.Split(mine[0] if mine else MPI.UNDEFINED, self.rank)
        return None if sub == MPI.COMM_NULL else communicator(sub)

    @property
    def sizes(self) -> tuple[int, int, int]:
        return self.dp, self.pp, self.tp

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def prev_stage(self) -> int | None:
        return self.pp_rank - 1 if self.pp_rank > 0 else None

    @property
    def next_stage(self) -> int | None:
        return self.pp_rank + 1 if self.pp_rank < self.pp - 1 else None

    def ranks(self, axis: str) -> list[int]:
        """Global ranks of this rank's group along `axis` ('dp', 'pp', 'tp')."""
        if axis not in AXES:
            raise invalid("axis", axis, AXES)
        return next(ranks for ranks in self.groups[axis] if self.rank in ranks)

    def rank_of(self, dp_rank: int, pp_rank: int, tp_rank: int) -> int:
        """The global rank at a position of this mesh."""
        names = ("dp_rank", "pp_rank", "tp_rank")
        for name, value, size in zip(names, (dp_rank, pp_rank, tp_rank), self.sizes, strict=True):
            if not 0 <= value < size:
                raise invalid(name, value, f"an int in [0, {size})")
        return rank_at(dp_rank, pp_rank, tp_rank, self.pp, self.tp)

    def check_model(self, config: Any) -> None:
        """Raise a clear error if `config` (GPTConfig or ViTConfig) does not split over this mesh."""
        check_model(config, self.tp, self.pp)

    def describe(self) -> str:
        return f"dp {self.dp} x pp {self.pp} x tp {self.tp}"

    def __repr__(self) -> str:
        return (
            f"Mesh({self.describe()}; rank {self.rank} at dp {self.dp_rank}, pp {self.pp_rank}, "
            f"tp {self.tp_rank})"
        )


def layout_from(world_size: int, tp: int = 1, pp: int = 1, dp: int | None = None) -> tuple[int, int, int]:
    """(dp, pp, tp) with dp defaulting to world_size / (tp * pp); checked against the world size."""
    if dp is None:
        for name, value in (("tp", tp), ("pp", pp)):
            if not isinstance(value, int) or value < 1:
                raise invalid(name, value, "a positive int")
        if world_size % (tp * pp):
            raise invalid("tp x pp", tp * pp, f"a divisor of the world size {world_size}")
        dp = world_size // (tp * pp)
    check_layout(world_size, dp, pp, tp)
    return dp, pp, tp
