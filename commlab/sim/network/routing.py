"""Routing on a compiled graph: hop distances by vectorized breadth-first search, and shortest or ECMP routes.

The graph is compiled once into integer arrays (links sorted by source, with CSR indexes by source and by
destination). Routes are computed for many (source, destination) node pairs at once, hop by hop, in numpy:
at every hop a flow may move to any out-neighbour one hop closer to its destination; `shortest` takes the
first such neighbour, `ecmp` picks among them by a hash of (source, destination, current node), as a switch
hashing a flow's header would, so one flow keeps one path and different flows spread over equal paths.

Two rules keep this fast on large fabrics:
- a destination whose every in-link comes from one node u (a host under its switch) is routed to u and
  then over the last link, so the breadth-first searches run once per switch, not once per host;
- nodes that do not forward traffic (endpoints, when the graph says so) may start or end a route but are
  never crossed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from commlab.errors import TopologyError, invalid
from commlab.shared.sorting import stable_argsort
from commlab.sim.network import route_cache

ROUTINGS = ("ecmp", "shortest")
_UNSET = -1
_MAX_MATRIX = 1 << 25  # entries of one distance block (targets x nodes, int16): 64 MiB


@dataclass(frozen=True)
class CompiledGraph:
    """A directed graph as arrays: node labels, links (sorted by source) with bandwidth and latency, CSRs."""

    labels: tuple
    link_src: np.ndarray
    link_dst: np.ndarray
    bandwidth: np.ndarray
    latency: np.ndarray
    out_ptr: np.ndarray  # links of node u: out_ptr[u]:out_ptr[u+1] (links are sorted by source)
    in_ptr: np.ndarray  # in_links[in_ptr[v]:in_ptr[v+1]] are the links into v
    in_links: np.ndarray
    forwarding: np.ndarray  # bool per node: may carry traffic between two other nodes

    @property
    def num_nodes(self) -> int:
        return len(self.labels)

    @property
    def num_links(self) -> int:
        return len(self.link_src)

    @classmethod
    def build(
        cls,
        labels: tuple,
        src: np.ndarray,
        dst: np.ndarray,
        bandwidth: np.ndarray,
        latency: np.ndarray,
        forwarding: np.ndarray,
    ) -> CompiledGraph:
        """Sort links by (source, destination) and index them both ways."""
        n = len(labels)
        order = np.lexsort((dst, src))
        src, dst = src[order].astype(np.int64), dst[order].astype(np.int64)
        out_ptr = np.zeros(n + 1, np.int64)
        np.cumsum(np.bincount(src, minlength=n), out=out_ptr[1:])
        in_links = np.argsort(dst, kind="stable").astype(np.int64)
        in_ptr = np.zeros(n + 1, np.int64)
        np.cumsum(np.bincount(dst, minlength=n), out=in_ptr[1:])
        return cls(
            labels,
            src,
            dst,
            np.asarray(bandwidth, float)[order],
            np.asarray(latency, float)[order],
            out_ptr,
            in_ptr,
            in_links,
            np.asarray(forwarding, bool),
        )

    def link_index(self, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        """The link id of each (src, dst) node pair, or -1 where there is no direct link."""
        keys = self.link_src * self.num_nodes + self.link_dst  # sorted, as links are
        want = np.asarray(src, np.int64) * self.num_nodes + np.asarray(dst, np.int64)
        pos = np.searchsorted(keys, want)
        pos = np.minimum(pos, len(keys) - 1)
        found = keys[pos] == want if len(keys) else np.zeros(len(want), bool)
        return np.where(found, pos, -1)


def _expand(ptr: np.ndarray, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each node, the positions ptr[node]:ptr[node+1]; returns (owner index per position, positions)."""
    starts = ptr[nodes]
    counts = ptr[nodes + 1] - starts
    owner = np.repeat(np.arange(len(nodes)), counts)
    if len(owner) == 0:
        return owner, owner
    offsets = np.arange(len(owner)) - np.repeat(np.cumsum(counts) - counts, counts)
    return owner, starts[owner] + offsets


def distances_to(graph: CompiledGraph, targets: np.ndarray) -> np.ndarray:
    """Hops from every node to each target (rows: targets; -1 where unreachable), crossing only forwarders.

    One breadth-first search for all the targets at once, bit-parallel: each node keeps a bit per target
    (64 to a word), and a level is one gather of the frontier words over every link and one OR per node
    of its out-links' words. So a level costs (links x targets / 64) word operations, not a search per
    target (a k=64 fat-tree: 2048 edge-switch targets, 330 k links, 7 levels: ~50 s became ~4 s).
    """
    targets = np.asarray(targets, np.int64)
    n, count = graph.num_nodes, len(targets)
    dist = np.full((count, n), _UNSET, np.int16)
    if count == 0:
        return dist
    words = (count + 63) // 64
    rows = np.arange(count)
    frontier = np.zeros((n, words), np.uint64)  # bits of 64 targets a word; set and read as bytes
    seed = frontier.view(np.uint8)  # byte t // 8, bit 7 - t % 8 (numpy's big-endian packing): target t
    np.bitwise_or.at(seed, (targets, rows // 8), (128 >> (rows % 8)).astype(np.uint8))
    reached = frontier.copy()
    dist[rows, targets] = 0
    has_out = np.flatnonzero(np.diff(graph.out_ptr) > 0)
    starts = graph.out_ptr[has_out]
    stop = ~graph.forwarding  # reached, but never crossed (the targets themselves seed the search)
    level = 0
    while frontier.any():
        level += 1
        fresh = np.zeros_like(frontier)
        fresh[has_out] = np.bitwise_or.reduceat(frontier[graph.link_dst], starts, axis=0)
        fresh &= ~reached
        reached |= fresh
        nodes = np.flatnonzero(fresh.any(axis=1))
        hit = np.unpackbits(fresh[nodes].view(np.uint8), axis=1, count=count).T.astype(bool)
        columns = dist[:, nodes]
        columns[hit] = level
        dist[:, nodes] = columns
        fresh[stop] = 0
        frontier = fresh
    return dist


def unique_ints(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values of a small integer array (a sort beats numpy's hashing unique there)."""
    if len(values) < 2:
        return values
    values = np.sort(values)
    return values[np.r_[True, values[1:] != values[:-1]]]


def _mix(values: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: a well-spread 64-bit hash of each value."""
    x = values.astype(np.uint64)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


@dataclass(frozen=True)
class Routes:
    """Routes of many node pairs as a CSR of link ids, with each route's bottleneck bandwidth and latency."""

    ptr: np.ndarray
    links: np.ndarray
    bandwidth: np.ndarray  # the smallest link bandwidth on each route
    latency: np.ndarray  # the sum of link latencies on each route

    @property
    def hops(self) -> np.ndarray:
        return np.diff(self.ptr)

    def links_of(self, pair: int) -> np.ndarray:
        return self.links[self.ptr[pair] : self.ptr[pair + 1]]


class Router:
    """Computes routes on one compiled graph; caches the distance rows of the targets it has seen."""

    def __init__(self, graph: CompiledGraph, routing: str = "ecmp", seed: int = 0) -> None:
        if routing not in ROUTINGS:
            raise invalid("routing", routing, ROUTINGS)
        self.graph = graph
        self.routing = routing
        self.seed = seed
        self._row_of: dict[int, int] = {}
        self._table = np.zeros((0, graph.num_nodes), np.int16)  # row self._row_of[t]: distances to t
        # A node all of whose in-links come from one other node is reached through that node.
        g = graph
        first = np.full(g.num_nodes, -1, np.int64)
        single = np.zeros(g.num_nodes, bool)
        counts = np.diff(g.in_ptr)
        has = counts > 0
        first[has] = g.link_src[g.in_links[g.in_ptr[:-1][has]]]
        src_of_in = g.link_src[g.in_links]
        owner = np.repeat(np.arange(g.num_nodes), counts)
        same = src_of_in == first[owner]
        single[has] = np.bincount(owner, weights=same, minlength=g.num_nodes)[has] == counts[has]
        self._attach = np.where(single, first, -1)

    def _distance_rows(self, targets: np.ndarray) -> np.ndarray:
        """Row index (into the distance table) for each target node, computing missing ones."""
        missing = [t for t in np.unique(targets).tolist() if t not in self._row_of]
        if missing:
            found = self._distances(np.asarray(missing, np.int64))
            for t in missing:
                self._row_of[t] = len(self._row_of)
            self._table = np.concatenate([self._table, found]) if len(self._table) else found
        return np.fromiter(map(self._row_of.__getitem__, targets.tolist()), np.int64, len(targets))

    def _distances(self, targets: np.ndarray) -> np.ndarray:
        """`distances_to` of the targets, in blocks of at most `_MAX_MATRIX` entries, through the on-disk
        cache when the search is large (`route_cache`)."""
        g = self.graph
        large = len(targets) * g.num_links >= route_cache.MIN_WORK
        key = route_cache.table_key(g.link_src, g.link_dst, g.forwarding, targets) if large else ""
        if large:
            table = route_cache.load(key, (len(targets), g.num_nodes))
            if table is not None:
                return table
        per_block = max(1, _MAX_MATRIX // max(g.num_nodes, 1))
        blocks = [distances_to(g, targets[i : i + per_block]) for i in range(0, len(targets), per_block)]
        table = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
        if large:
            route_cache.store(key, table)
        return table

    def routes(self, src: np.ndarray, dst: np.ndarray) -> Routes:
        """Routes from each src node to the matching dst node (arrays of node ids; src != dst)."""
        g = self.graph
        src = np.asarray(src, np.int64)
        dst = np.asarray(dst, np.int64)
        count = len(src)
        if np.any(src == dst):
            i = int(np.flatnonzero(src == dst)[0])
            raise TopologyError(f"a route from node {g.labels[src[i]]!r} to itself was asked for")
        hops: list[list[np.ndarray]] = []  # per hop: (flow ids, link ids)
        direct = g.link_index(src, dst)
        done = direct >= 0
        first_flows = np.flatnonzero(done)
        hops.append([first_flows, direct[done]])
        # The rest: route to the attachment node of dst when it has one, then take the last link.
        todo = np.flatnonzero(~done)
        target = dst[todo].copy()
        attach = self._attach[target]
        # (src can never be that node: it would have a direct link to dst, handled above.)
        collapse = attach >= 0
        collapse[collapse] = g.forwarding[attach[collapse]]
        target[collapse] = attach[collapse]
        last_link = np.full(len(todo), -1, np.int64)
        if np.any(collapse):
            last_link[collapse] = g.link_index(attach[collapse], dst[todo][collapse])
        if len(todo):
            rows = self._distance_rows(target)
            matrix = self._table
            cur = src[todo].copy()
            remaining = matrix[rows, cur].astype(np.int64)
            if np.any(remaining < 0):
                i = int(np.flatnonzero(remaining < 0)[0])
                raise TopologyError(
                    f"no path from {g.labels[src[todo[i]]]!r} to {g.labels[dst[todo[i]]]!r}: "
                    "the graph is disconnected between them (or only through endpoints that do not forward)"
                )
            active = np.arange(len(todo))
            salt = _mix(src[todo] * np.int64(1_000_003) + dst[todo] * np.int64(7919) + self.seed)
            while len(active):
                owner, pos = _expand(g.out_ptr, cur[active])
                cand = g.link_dst[pos]
                flow = active[owner]
                ok = matrix[rows[flow], cand] == (remaining[flow] - 1)
                ok &= g.forwarding[cand] | (cand == target[flow])
                n_ok = np.bincount(owner, weights=ok, minlength=len(active)).astype(np.int64)
                if np.any(n_ok == 0):  # pragma: no cover - distances guarantee a next hop
                    raise TopologyError("routing found no next hop; the distance table is inconsistent")
                if self.routing == "ecmp":
                    h = _mix(salt[active] ^ (cur[active].astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)))
                    pick = (h % n_ok.astype(np.uint64)).astype(np.int64)
                else:
                    pick = np.zeros(len(active), np.int64)
                csum = np.cumsum(ok)
                before = np.zeros(len(active), np.int64)
                group_start = np.searchsorted(owner, np.arange(len(active)))
                nz = group_start > 0
                before[nz] = csum[group_start[nz] - 1]
                rank_in_group = csum - before[owner] - 1
                chosen = ok & (rank_in_group == pick[owner])
                link = pos[chosen]
                hops.append([todo[active], link])
                cur[active] = g.link_dst[link]
                remaining[active] -= 1
                active = active[remaining[active] > 0]
            if np.any(collapse):
                hops.append([todo[collapse], last_link[collapse]])
        # Assemble the CSR in flow order, hops in order.
        flows = np.concatenate([h[0] for h in hops])
        links = np.concatenate([h[1] for h in hops])
        order = stable_argsort(flows)
        flows, links = flows[order], links[order]
        ptr = np.zeros(count + 1, np.int64)
        np.cumsum(np.bincount(flows, minlength=count), out=ptr[1:])
        if count and np.any(np.diff(ptr) == 0):  # pragma: no cover - every pair gets at least one hop
            raise TopologyError("a route came out empty")
        starts = ptr[:-1]
        bandwidth = np.minimum.reduceat(g.bandwidth[links], starts) if count else np.zeros(0)
        latency = np.add.reduceat(g.latency[links], starts) if count else np.zeros(0)
        return Routes(ptr, links, bandwidth, latency)
