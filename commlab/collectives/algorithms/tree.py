"""Binary trees, pipelined: NCCL-style double binary tree allreduce, and tree broadcast and reduce.

Tree 1 is the in-order tree of bit patterns over 0..p-1: rank r with lowest set bit b has parent
(r - b) | 2b, or r - b when that is out of range; rank 0 is the root, with a single child. For allreduce a
second tree carries the other half of the buffer: the mirror (r plays p-1-r) for even p, tree 1 shifted by
one rank for odd p, so a leaf of one tree is an inner node of the other and every rank sends about n per
phase. Each half is reduced up its tree and broadcast back down, pipelined over k segments with slot
alignment: a node at depth d sends segment j up at slot j+H-d (H the height) and, from the root at depth 0,
down at slot j+H+d, so the reduction of later segments overlaps the broadcast of earlier ones.

Cost (p ranks, n bytes, k segments, H the height, m the most messages a rank handles per slot and phase,
c the most partial sums a rank adds per slot; m = c = 2 for p >= 4):
    allreduce  2(H+k-1) (step + m alpha + m (n/2k) beta) + (H+k-1) c (n/2k) gamma   (two overlapped phases)
    broadcast  (H+k-1) (step + m alpha + m (n/k) beta)                              (m = most children)
    reduce     (H+k-1) (step + m alpha + m (n/k) (beta + gamma))
(`step` is the model's per-step cost; the other families have one message per step, so their formulas
count it with alpha.)
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from commlab.collectives.cost import CostModel
from commlab.collectives.schedule import Schedule, ScheduleBuilder
from commlab.errors import invalid

NAME = "tree"
OPS = ("allreduce", "broadcast", "reduce")
PIPELINED_OPS = OPS


@dataclass(frozen=True)
class Tree:
    """A rooted tree over ranks 0..p-1: each rank's parent (None at the root), children and depth."""

    parent: tuple[int | None, ...]
    children: tuple[tuple[int, ...], ...]
    depth: tuple[int, ...]

    @property
    def root(self) -> int:
        return self.parent.index(None)

    @property
    def height(self) -> int:
        return max(self.depth)

    def relabel(self, role: Sequence[int]) -> Tree:
        """The same shape where rank r plays the part of rank role[r] (a permutation of the ranks)."""
        rank_of = {v: r for r, v in enumerate(role)}
        parent = tuple(None if self.parent[v] is None else rank_of[self.parent[v]] for v in role)
        return _tree_from_parents(parent)


def _tree_from_parents(parent: Sequence[int | None]) -> Tree:
    """Children as the inverse of the parent function, and depths by walking up."""
    p = len(parent)
    children: list[list[int]] = [[] for _ in range(p)]
    for rank, up in enumerate(parent):
        if up is not None:
            children[up].append(rank)
    depth = [-1] * p
    for rank in range(p):
        path = []
        node = rank
        while depth[node] < 0 and parent[node] is not None:
            path.append(node)
            node = parent[node]
        if depth[node] < 0:
            depth[node] = 0
        for d, n in enumerate(reversed(path), start=depth[node] + 1):
            depth[n] = d
    return Tree(tuple(parent), tuple(tuple(c) for c in children), tuple(depth))


def inorder_parent(rank: int, world_size: int) -> int | None:
    """Tree 1's parent of `rank`: clear its lowest set bit b and set 2b, or just clear b if out of range."""
    if rank == 0:
        return None
    low = rank & -rank
    up = (rank ^ low) | (low << 1)
    return up if up < world_size else rank ^ low


@functools.lru_cache(maxsize=64)
def inorder_tree(world_size: int) -> Tree:
    """Tree 1: the in-order binary tree of bit patterns, rooted at rank 0."""
    return _tree_from_parents([inorder_parent(r, world_size) for r in range(world_size)])


@functools.lru_cache(maxsize=64)
def double_binary_tree(world_size: int) -> tuple[Tree, Tree]:
    """Tree 1 and its complement: the mirror for even p, tree 1 shifted by one rank for odd p."""
    p = world_size
    first = inorder_tree(p)
    role = [p - 1 - r for r in range(p)] if p % 2 == 0 else [(r - 1) % p for r in range(p)]
    return first, first.relabel(role)


def rooted_tree(world_size: int, root: int) -> Tree:
    """Tree 1 over virtual ranks v = (r - root) mod p, so `root` is the root."""
    return inorder_tree(world_size).relabel([(r - root) % world_size for r in range(world_size)])


class _Transfers:
    """Transfers keyed by (slot, src, dst, reduce): chunks sent to one peer in one slot share a message."""

    def __init__(self) -> None:
        self._chunks: dict[tuple[int, int, int, bool], list[int]] = defaultdict(list)

    def add(self, slot: int, src: int, dst: int, chunk: int, reduce: bool) -> None:
        self._chunks[(slot, src, dst, reduce)].append(chunk)

    def emit(self, builder: ScheduleBuilder) -> Schedule:
        for (slot, src, dst, reduce), chunks in sorted(self._chunks.items()):
            builder.transfer(slot, src, dst, chunks, reduce)
        return builder.build()


def _reduce_up(transfers: _Transfers, tree: Tree, chunks: Sequence[int], height: int) -> None:
    """Partial sums flow to the root: a node at depth d sends segment j up at slot j+height-d."""
    for rank, up in enumerate(tree.parent):
        if up is None:
            continue
        for j, chunk in enumerate(chunks):
            transfers.add(j + height - tree.depth[rank], rank, up, chunk, reduce=True)


def _broadcast_down(transfers: _Transfers, tree: Tree, chunks: Sequence[int], start: int) -> None:
    """The root's values flow to the leaves: a node at depth d forwards segment j at slot start+j+d."""
    for rank, below in enumerate(tree.children):
        for child in below:
            for j, chunk in enumerate(chunks):
                transfers.add(start + j + tree.depth[rank], rank, child, chunk, reduce=False)


def double_tree_allreduce(world_size: int, segments: int = 1) -> Schedule:
    """Tree 1 reduces and broadcasts chunks 0..k-1, tree 2 chunks k..2k-1, in the same slots."""
    transfers = _Transfers()
    for index, tree in enumerate(double_binary_tree(world_size)):
        chunks = range(index * segments, (index + 1) * segments)
        _reduce_up(transfers, tree, chunks, tree.height)
        _broadcast_down(transfers, tree, chunks, tree.height)
    return transfers.emit(ScheduleBuilder("allreduce", NAME, world_size, 2 * segments))


def tree_broadcast(world_size: int, root: int, segments: int = 1) -> Schedule:
    """Tree 1 rooted at `root`, pipelined over `segments` chunks: height+segments-1 slots."""
    transfers = _Transfers()
    _broadcast_down(transfers, rooted_tree(world_size, root), range(segments), 0)
    return transfers.emit(ScheduleBuilder("broadcast", NAME, world_size, segments, root))


def tree_reduce(world_size: int, root: int, segments: int = 1) -> Schedule:
    """Partial sums up tree 1 rooted at `root`, pipelined over `segments` chunks: height+segments-1 slots."""
    tree = rooted_tree(world_size, root)
    transfers = _Transfers()
    _reduce_up(transfers, tree, range(segments), tree.height)
    return transfers.emit(ScheduleBuilder("reduce", NAME, world_size, segments, root))


def build(op: str, world_size: int, root: int | None = None, segments: int = 1) -> Schedule:
    """The tree schedule for `op` (arguments already validated by the registry)."""
    if op == "allreduce":
        return double_tree_allreduce(world_size, segments)
    if op == "broadcast":
        return tree_broadcast(world_size, root, segments)
    if op == "reduce":
        return tree_reduce(world_size, root, segments)
    raise invalid("op", op, OPS)


@functools.lru_cache(maxsize=64)
def _shape(world_size: int, double: bool) -> tuple[int, int, int]:
    """(height, m, c) of the formulas: m messages a rank handles per slot and phase, c sums it adds."""
    trees = double_binary_tree(world_size) if double else (inorder_tree(world_size),)
    fan_in = [sum(len(t.children[r]) for t in trees) for r in range(world_size)]
    fan_out = [sum(t.parent[r] is not None for t in trees) for r in range(world_size)]
    messages = max(max(a, b) for a, b in zip(fan_in, fan_out, strict=True))
    return trees[0].height, messages, max(fan_in)


def cost(op: str, world_size: int, nbytes: float, model: CostModel, segments: int = 1) -> float:
    """Seconds for the tree `op` on p ranks moving n bytes (the formulas in this module's docstring)."""
    if op not in OPS:
        raise invalid("op", op, OPS)
    if world_size == 1:
        return 0.0
    n, k = nbytes, segments
    if op == "allreduce":
        height, m, c = _shape(world_size, double=True)
        piece = n / (2 * k)
        slot = model.time(m, m * piece, steps=1)
        return 2 * (height + k - 1) * slot + (height + k - 1) * c * piece * model.gamma
    height, _, c = _shape(world_size, double=False)
    m = max(c, 1)
    if op == "broadcast":
        return (height + k - 1) * model.time(m, m * n / k, steps=1)
    return (height + k - 1) * model.time(m, m * n / k, m * n / k, steps=1)
