"""Array builders of the regular algorithms (ring, tree): the same transfers as their object builders,
computed with numpy, as an `ArraySchedule`.

The object builders (`ring.py`, `tree.py`) stay the definition: the tests prove, for every world size
1..64, that `ArraySchedule.to_schedule()` of these rows equals the object-built `Schedule` step for step
(and the checker proves both). The rows come in whatever order makes the simulator's compile cheapest,
provided every rank's sends and receives within one slot keep the object builder's order (the only order
`ScheduleBuilder` keeps): the ring and chain rows are sender-major; the tree rows are sorted by
(slot, sender, receiver, reduce), the order `tree._Transfers` emits. `build_array_schedule` is the
registry's entry point for the simulator: the array form where a family has one, else the object form.
"""

from __future__ import annotations

import functools

import numpy as np

from commlab.collectives.algorithms import build_schedule, get_algorithm
from commlab.collectives.array_schedule import ArraySchedule, single_chunk_rows
from commlab.collectives.hosts import HostMap
from commlab.collectives.schedule import Schedule


def _ring_phase(p: int, first_slot: int, shift: int) -> tuple[np.ndarray, np.ndarray]:
    """(slot, chunk) of rank r's p-1 ring steps, shape (p, p-1): at step t rank r sends chunk (r-t-shift)."""
    t = np.arange(p - 1)
    r = np.arange(p)[:, None]
    return np.broadcast_to(first_slot + t, (p, p - 1)), (r - t - shift) % p


def ring_rows(op: str, world_size: int, root: int | None = None, segments: int = 1) -> ArraySchedule:
    """The ring family's `op` as rows (see `ring.py` for the algorithms)."""
    p = world_size
    if op in ("allreduce", "reduce_scatter", "allgather"):
        phases = {"allreduce": ((0, 1, True), (p - 1, 0, False)), "reduce_scatter": ((0, 1, True),),
                  "allgather": ((0, 0, False),)}[op]  # fmt: skip
        parts = [(*_ring_phase(p, first, shift), reduce) for first, shift, reduce in phases]
        slot = np.concatenate([s for s, _, _ in parts], axis=1).ravel()
        chunk = np.concatenate([c for _, c, _ in parts], axis=1).ravel()
        reduce = np.concatenate([np.full((p, p - 1), red) for _, _, red in parts], axis=1).ravel()
        src = np.repeat(np.arange(p), len(parts) * (p - 1))
        return single_chunk_rows(op, "ring", p, p, slot, src, (src + 1) % p, chunk, reduce)
    k = segments
    i = np.repeat(np.arange(p - 1), k)  # chain position of the sender (broadcast) or receiver (reduce)
    j = np.tile(np.arange(k), p - 1)
    if op == "broadcast":
        return single_chunk_rows(op, "ring", p, k, j + i, (root + i) % p, (root + i + 1) % p, j, False, root)
    if op == "reduce":
        i = i + 1
        return single_chunk_rows(op, "ring", p, k, j + p - 1 - i, (root + i) % p, (root + i - 1) % p, j,
                                 True, root)  # fmt: skip
    raise ValueError(op)


def inorder_parents(world_size: int) -> np.ndarray:
    """Tree 1's parent of every rank (-1 at the root, rank 0): `tree.inorder_parent`, vectorized."""
    r = np.arange(world_size, dtype=np.int64)
    low = r & -r
    up = (r ^ low) | (low << 1)
    parent = np.where(up < world_size, up, r ^ low)
    parent[:1] = -1
    return parent


def depths(parent: np.ndarray) -> np.ndarray:
    """Each rank's depth below the root (parent -1), one vectorized hop per level."""
    depth = np.zeros(len(parent), np.int64)
    cur = parent.copy()
    alive = np.flatnonzero(cur >= 0)
    while len(alive):
        depth[alive] += 1
        cur[alive] = parent[cur[alive]]
        alive = alive[cur[alive] >= 0]
    return depth


def relabel(parent: np.ndarray, role: np.ndarray) -> np.ndarray:
    """`Tree.relabel`: rank r plays the part of rank role[r] (a permutation)."""
    rank_of = np.empty_like(role)
    rank_of[role] = np.arange(len(role))
    up = parent[role]
    return np.where(up >= 0, rank_of[np.maximum(up, 0)], -1)


def _tree_keys(
    parent: np.ndarray, first_chunk: int, up: bool, height: int, start: int, code: tuple
) -> np.ndarray:
    """The entries of the reduction up (`tree._reduce_up`) or broadcast down (`tree._broadcast_down`) of
    chunks first_chunk.. over a tree, one per edge and segment, each as one integer (see `_merge_tree`):
    segment j of an edge is its segment 0 shifted by j slots and j chunks, so the keys are one outer sum."""
    depth = depths(parent)
    child = np.flatnonzero(parent >= 0)
    k, p, chunks = code
    if up:
        slot, src, dst = height - depth[child], child, parent[child]
    else:
        slot, src, dst = start + depth[child] - 1, parent[child], child
    base = (((slot * p + src) * p + dst) * 2 + up) * chunks + first_chunk
    shift = np.arange(k, dtype=np.int64) * (p * p * 2 * chunks + 1)  # one slot later, one chunk further
    return (base[:, None] + shift[None, :]).ravel()


def _merge_tree(op: str, p: int, num_chunks: int, keys: list, root: int | None) -> ArraySchedule:
    """`tree._Transfers.emit`: entries of one (slot, src, dst, reduce) become one transfer, in key order,
    their chunks in the order they were added.

    Each entry is the integer (((slot x p + src) x p + dst) x 2 + reduce) x num_chunks + chunk, so one
    plain sort orders them by transfer and, within a transfer, by chunk id. That is the add order: two
    entries share a transfer only when the two trees of an allreduce use one edge in one direction at one
    slot, and tree 1 (chunks 0..k-1) adds its entries before tree 2 (chunks k..2k-1); within one tree an
    edge and direction has one entry per slot. (The tests prove the rows equal to the object builder's.)
    Everything stays one int64 array until it is decoded: a 65,536-rank tree has 16.8 M entries.
    """
    entries = np.concatenate(keys) if len(keys) > 1 else keys[0]
    entries.sort()
    chunk = entries % num_chunks
    key = entries // num_chunks
    del entries
    first = np.empty(len(key), bool)
    first[:1] = True
    np.not_equal(key[1:], key[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    del first
    ptr = np.r_[starts, len(key)].astype(np.int64)
    key = key[starts]
    reduce = (key & 1).astype(bool)
    key >>= 1
    dst = key % p
    key //= p
    src = key % p
    key //= p
    return ArraySchedule(op, "tree", p, num_chunks, key, src, dst, reduce, ptr, chunk, root)


def tree_rows(op: str, world_size: int, root: int | None = None, segments: int = 1) -> ArraySchedule:
    """The tree family's `op` as rows (see `tree.py`)."""
    p, k = world_size, segments
    first = inorder_parents(p)
    if op == "allreduce":
        r = np.arange(p)
        role = p - 1 - r if p % 2 == 0 else (r - 1) % p
        keys = []
        for index, parent in enumerate((first, relabel(first, role))):
            height = int(depths(parent).max())
            code = (k, p, 2 * k)
            keys.append(_tree_keys(parent, index * k, True, height, 0, code))
            keys.append(_tree_keys(parent, index * k, False, height, height, code))
        return _merge_tree(op, p, 2 * k, keys, None)
    parent = relabel(first, (np.arange(p) - root) % p)
    code = (k, p, k)
    if op == "broadcast":
        return _merge_tree(op, p, k, [_tree_keys(parent, 0, False, 0, 0, code)], root)
    if op == "reduce":
        height = int(depths(parent).max())
        return _merge_tree(op, p, k, [_tree_keys(parent, 0, True, height, 0, code)], root)
    raise ValueError(op)


ARRAY_BUILDERS = {"ring": ring_rows, "tree": tree_rows}


def build_array_schedule(
    op: str,
    algorithm: str,
    world_size: int,
    root: int | None = None,
    segments: int = 1,
    hosts: HostMap | None = None,
) -> ArraySchedule | Schedule:
    """`build_schedule`'s schedule as rows where the family has an array builder (validated the same way,
    memoized); the object-built `Schedule` otherwise."""
    entry = get_algorithm(algorithm)
    if entry.name not in ARRAY_BUILDERS:
        return build_schedule(op, algorithm, world_size, root, segments, hosts)
    return _cached_rows(entry.name, *entry._arguments(op, world_size, root, segments))


@functools.lru_cache(maxsize=4)  # a 1024-rank ring is ~100 MB of rows: keep few
def _cached_rows(algorithm: str, op: str, world_size: int, root: int | None, segments: int) -> ArraySchedule:
    return ARRAY_BUILDERS[algorithm](op, world_size, root, segments)
