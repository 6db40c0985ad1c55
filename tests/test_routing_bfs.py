"""The bit-parallel breadth-first search (`routing.distances_to`) against a plain one-target-at-a-time BFS.

Hop distances are integers, so the two must agree exactly: on graphs where endpoints do not forward
(fat-trees, clusters: a route may start or end at one but never cross it), where they do (tori, rings),
on target sets of more than 64 targets (several words per node), with repeated targets, and none.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from commlab.sim.network import topology as topo
from commlab.sim.network.routing import distances_to
from commlab.sim.network.topology import Topology


def reference(graph, target: int) -> np.ndarray:
    """Hops from every node to `target`, expanding only the target and forwarding nodes."""
    dist = np.full(graph.num_nodes, -1, np.int16)
    dist[target] = 0
    queue = deque([target])
    while queue:
        v = queue.popleft()
        if v != target and not graph.forwarding[v]:
            continue
        for link in graph.in_links[graph.in_ptr[v] : graph.in_ptr[v + 1]]:
            u = int(graph.link_src[link])
            if dist[u] < 0:
                dist[u] = dist[v] + 1
                queue.append(u)
    return dist


@pytest.mark.parametrize(
    "graph",
    [
        topo.fat_tree(4),
        topo.fat_tree(8, oversubscription=2),
        topo.torus((4, 4, 3)),
        topo.ring(9),
        topo.switch(5),
        topo.cluster(nodes=3),
        topo.local(4),
    ],
    ids=lambda g: g.graph.get("name", "graph"),
)
def test_bit_parallel_bfs_equals_one_search_per_target(graph):
    compiled = Topology(graph).compiled
    n = compiled.num_nodes
    rng = np.random.default_rng(0)
    for targets in (np.arange(n), rng.integers(0, n, 5), np.array([1, 1, 0]), np.zeros(0, np.int64)):
        got = distances_to(compiled, targets)
        assert got.shape == (len(targets), n)
        for row, target in enumerate(targets.tolist()):
            assert np.array_equal(got[row], reference(compiled, target)), (target,)
