"""The algorithm registry: every family's schedule builder and cost formula, looked up by name.

`build_schedule(op, algorithm, world_size, root, segments, hosts)` is what executors and the simulator
call; it validates the arguments and memoizes the (frozen) schedules. `Algorithm.cost` gives the analytic
time the tuner ranks algorithms by. Topology-aware families (`hierarchical`, `multiring`) build from a
`HostMap` (which ranks share a host) and are priced with the cost model's intra- and inter-host levels;
the flat families ignore the host map, and their time across hosts is priced at the inter-host level
(their every step waits for the slowest link).
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

from commlab.collectives.algorithms import direct, halving_doubling, hierarchical, pairwise, ring, tree
from commlab.collectives.cost import MAX_SEGMENTS, CostModel, best_segment_count
from commlab.collectives.hosts import HostMap
from commlab.collectives.schedule import OPS, ROOTED_OPS, Schedule
from commlab.errors import InvalidArgumentError, invalid

Builder = Callable[..., Schedule]  # (op, world_size, root, segments[, hosts])
Formula = Callable[
    ..., float
]  # (op, world_size, nbytes, model, segments), or (op, hosts, nbytes, intra, inter, segments)


@dataclass(frozen=True)
class Algorithm:
    """One algorithm: the ops it builds, which are pipelined over segments, its builder and formula."""

    name: str
    summary: str
    ops: tuple[str, ...]
    pipelined_ops: tuple[str, ...]
    builder: Builder = field(repr=False)
    formula: Formula = field(repr=False)
    topology_aware: bool = False  # builds from a HostMap; formula (op, hosts, n, intra, inter, segments)
    segment_bytes: int = 0  # best_segments keeps segments at least this large (0: any size)

    @property
    def pipelined(self) -> bool:
        """Whether some op of this algorithm takes a segment count (see `pipelined_ops`)."""
        return bool(self.pipelined_ops)

    def supports(self, op: str) -> bool:
        """Whether this algorithm builds `op`."""
        return op in self.ops

    def build(
        self,
        op: str,
        world_size: int,
        root: int | None = None,
        segments: int = 1,
        hosts: HostMap | None = None,
    ) -> Schedule:
        """This algorithm's schedule for `op` (uncached; `build_schedule` memoizes).

        `segments` is the pipeline depth of the ops in `pipelined_ops`; the other ops do not depend on it.
        `hosts` matters to topology-aware algorithms only (None: all ranks on one host).
        """
        op, world_size, root, segments = self._arguments(op, world_size, root, segments)
        if self.topology_aware:
            return self.builder(op, world_size, root, segments, _host_map(world_size, hosts))
        return self.builder(op, world_size, root, segments)

    def cost(
        self,
        op: str,
        world_size: int,
        nbytes: float,
        model: CostModel,
        segments: int | None = None,
        hosts: HostMap | None = None,
    ) -> float:
        """Predicted seconds for `op` on `world_size` ranks moving `nbytes`, by the family's formula.

        `nbytes` is per rank, or the total for reduce_scatter and allgather. For a pipelined op
        `segments=None` takes `best_segments`; other ops ignore `segments`. With `hosts` spanning several
        hosts, topology-aware formulas price each phase at its level (`model.within_host()` inside hosts,
        `model.between_hosts()` between them) and flat ones at `model.flat_across_hosts()`.
        """
        self._check_op(op)
        world_size = _positive_int("world_size", world_size)
        if not isinstance(nbytes, numbers.Real) or isinstance(nbytes, bool) or not 0 <= nbytes < math.inf:
            raise invalid("nbytes", nbytes, "a number of bytes >= 0")
        if not isinstance(model, CostModel):
            raise invalid("model", type(model).__name__, "a CostModel")
        hosts = _host_map(world_size, hosts)
        if self.topology_aware:
            if op not in self.pipelined_ops:
                segments = 1
            elif segments is None:
                segments = self.best_segments(op, world_size, nbytes, model, hosts)
            else:
                segments = _positive_int("segments", segments)
            return self.formula(op, hosts, nbytes, model.within_host(), model.between_hosts(), segments)
        if hosts.num_hosts > 1:
            model = model.flat_across_hosts()
        if op not in self.pipelined_ops:
            segments = 1
        elif segments is None:
            segments = self.best_segments(op, world_size, nbytes, model)
        else:
            segments = _positive_int("segments", segments)
        return self.formula(op, world_size, nbytes, model, segments)

    def best_segments(
        self, op: str, world_size: int, nbytes: float, model: CostModel, hosts: HostMap | None = None
    ) -> int:
        """The segment count in 1..MAX_SEGMENTS that minimizes the formula (1 for an op not pipelined);
        a topology-aware one's on `hosts`, at the model's levels."""
        self._check_op(op)
        if op not in self.pipelined_ops:
            return 1
        world_size = _positive_int("world_size", world_size)
        most = (
            MAX_SEGMENTS
            if not self.segment_bytes
            else max(1, min(MAX_SEGMENTS, nbytes // self.segment_bytes))
        )
        if self.topology_aware:
            hosts = _host_map(world_size, hosts)
            intra, inter = model.within_host(), model.between_hosts()
            return best_segment_count(lambda k: self.formula(op, hosts, nbytes, intra, inter, k), int(most))
        return best_segment_count(lambda k: self.formula(op, world_size, nbytes, model, k), int(most))

    def _check_op(self, op: str) -> None:
        if op not in OPS:
            raise invalid("op", op, OPS)
        if op not in self.ops:
            raise InvalidArgumentError(
                f"algorithm={self.name!r} does not implement {op}; algorithms that do: "
                + ", ".join(repr(a) for a in algorithms_for(op))
            )

    def _arguments(
        self, op: str, world_size: int, root: int | None, segments: int
    ) -> tuple[str, int, int | None, int]:
        """Validated arguments, with `segments` set to 1 for ops whose schedule does not use it."""
        self._check_op(op)
        world_size = _positive_int("world_size", world_size)
        if op in ROOTED_OPS:
            root = _integer("root", root, 0, world_size - 1, f"a rank in 0..{world_size - 1} for {op}")
        elif root is not None:
            raise invalid("root", root, f"None ({op} has no root)")
        segments = _positive_int("segments", segments)
        if op not in self.pipelined_ops:
            segments = 1
        return op, world_size, root, segments


def _integer(name: str, value: object, low: int, high: float, accepted: str) -> int:
    """`value` as an int in low..high (bools and floats refused), else an InvalidArgumentError."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise invalid(name, value, accepted) from None
    if not low <= number <= high:
        raise invalid(name, value, accepted)
    return number


def _positive_int(name: str, value: object) -> int:
    return _integer(name, value, 1, math.inf, "an integer >= 1")


def _host_map(world_size: int, hosts: HostMap | None) -> HostMap:
    """`hosts`, checked against the world size; one host of every rank if None."""
    if hosts is None:
        return HostMap.flat(world_size)
    if not isinstance(hosts, HostMap):
        raise invalid("hosts", type(hosts).__name__, "a commlab HostMap or None")
    if hosts.world_size != world_size:
        raise invalid("hosts", str(hosts), f"a host map of {world_size} ranks (the world size)")
    return hosts


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm(
            "ring",
            "neighbour-only ring (reduce-scatter + allgather); pipelined chain for broadcast/reduce",
            ring.OPS,
            ring.PIPELINED_OPS,
            ring.build,
            ring.cost,
        ),
        Algorithm(
            "tree",
            "pipelined binary trees: NCCL-style double binary tree allreduce, tree broadcast/reduce",
            tree.OPS,
            tree.PIPELINED_OPS,
            tree.build,
            tree.cost,
        ),
        Algorithm(
            "halving_doubling",
            "Rabenseifner recursive halving/doubling (MPICH fold for any p); binomial broadcast/reduce",
            halving_doubling.OPS,
            (),
            halving_doubling.build,
            halving_doubling.cost,
        ),
        Algorithm(
            "bruck",
            "Bruck allgather and all-to-all: ceil(lg p) rounds for any p",
            halving_doubling.BRUCK_OPS,
            (),
            halving_doubling.build_bruck,
            halving_doubling.bruck_cost,
        ),
        Algorithm(
            "recursive_doubling",
            "recursive doubling allreduce: lg p steps on the whole buffer (MPICH fold for any p)",
            halving_doubling.RECURSIVE_DOUBLING_OPS,
            (),
            halving_doubling.build_recursive_doubling,
            halving_doubling.recursive_doubling_cost,
        ),
        Algorithm(
            "pairwise",
            "pairwise exchange all-to-all: p-1 steps of one message in and one out",
            pairwise.OPS,
            (),
            pairwise.build,
            pairwise.cost,
        ),
        Algorithm(
            "direct",
            "every rank exchanges with every other in one step per phase",
            OPS,
            (),
            direct.build,
            direct.cost,
        ),
        Algorithm(
            hierarchical.HIERARCHICAL,
            "topology-aware: intra-host reduce-scatter, one ring per rail across hosts, intra-host allgather",
            hierarchical.HIERARCHICAL_OPS,
            ("allreduce",),
            hierarchical.build,
            hierarchical.cost,
            topology_aware=True,
            segment_bytes=hierarchical.SEGMENT_BYTES,
        ),
        Algorithm(
            hierarchical.MULTIRING,
            "topology-aware: one ring per local rank (NCCL channels), each on its own NIC across hosts",
            hierarchical.MULTIRING_OPS,
            (),
            hierarchical.build_multiring,
            hierarchical.multiring_cost,
            topology_aware=True,
        ),
    )
}


def get_algorithm(name: str) -> Algorithm:
    """The registered algorithm called `name`."""
    if not isinstance(name, str) or name not in ALGORITHMS:
        raise invalid("algorithm", name, list(ALGORITHMS))
    return ALGORITHMS[name]


def algorithms_for(op: str, topology_aware: bool = True) -> tuple[str, ...]:
    """Names of the algorithms that implement `op`, in registry order (without the topology-aware ones
    if `topology_aware` is False)."""
    if op not in OPS:
        raise invalid("op", op, OPS)
    return tuple(
        name for name, a in ALGORITHMS.items() if op in a.ops and (topology_aware or not a.topology_aware)
    )


def build_schedule(
    op: str,
    algorithm: str,
    world_size: int,
    root: int | None = None,
    segments: int = 1,
    hosts: HostMap | None = None,
) -> Schedule:
    """The schedule of `algorithm` for `op`, validated and memoized (schedules are immutable). `hosts`
    (which ranks share a host) shapes the topology-aware algorithms; the others ignore it."""
    entry = get_algorithm(algorithm)
    arguments = entry._arguments(op, world_size, root, segments)
    hosts = _host_map(world_size, hosts) if entry.topology_aware else None
    return _cached_schedule(entry.name, *arguments, hosts)


@functools.lru_cache(maxsize=256)
def _cached_schedule(
    algorithm: str, op: str, world_size: int, root: int | None, segments: int, hosts: HostMap | None
) -> Schedule:
    entry = ALGORITHMS[algorithm]
    if entry.topology_aware:
        return entry.builder(op, world_size, root, segments, hosts)
    return entry.builder(op, world_size, root, segments)
