"""The on-disk distance cache (`route_cache`) and the whole-array link checks of `Topology`.

Routes through a cached table must equal routes computed without one (the table is the same integers), a
damaged cache file must be ignored rather than trusted, and graphs that differ in links or forwarding must
get different cache names. The array check of link attributes must accept exactly what the edge-by-edge
check accepts and leave the errors to it (they name the link).
"""

from __future__ import annotations

import math

import networkx as nx
import numpy as np
import pytest

from commlab.errors import TopologyError
from commlab.sim.network import route_cache
from commlab.sim.network import topology as topo
from commlab.sim.network.topology import Topology, _link_attributes, _link_attributes_checked


def _all_routes(t: Topology):
    p = t.num_ranks
    src, dst = np.divmod(np.arange(p * p), p)
    keep = src != dst
    return t.routes(src[keep], dst[keep])


@pytest.mark.parametrize("graph", [topo.fat_tree(4), topo.torus((3, 4))], ids=["fat-tree", "torus"])
def test_cached_tables_give_the_same_routes(graph, tmp_path, monkeypatch):
    monkeypatch.setenv("COMMLAB_CACHE_DIR", "")
    plain = _all_routes(Topology(graph))
    monkeypatch.setenv("COMMLAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(route_cache, "MIN_WORK", 0)
    first = _all_routes(Topology(graph))  # computes and stores
    files = list(tmp_path.glob("*.npy"))
    assert files
    second = _all_routes(Topology(graph))  # loads
    for f in files:  # a damaged file is recomputed, not trusted
        f.write_bytes(b"not a table")
    third = _all_routes(Topology(graph))
    for routes in (first, second, third):
        for name in ("ptr", "links", "bandwidth", "latency"):
            assert np.array_equal(getattr(routes, name), getattr(plain, name))


def test_cache_names_follow_the_graph():
    g = Topology(topo.fat_tree(4)).compiled
    targets = np.arange(3)
    key = route_cache.table_key(g.link_src, g.link_dst, g.forwarding, targets)
    assert key == route_cache.table_key(g.link_src.copy(), g.link_dst, g.forwarding, targets)
    assert key != route_cache.table_key(g.link_src, g.link_dst, ~g.forwarding, targets)
    assert key != route_cache.table_key(g.link_src, g.link_dst[::-1], g.forwarding, targets)
    assert key != route_cache.table_key(g.link_src, g.link_dst, g.forwarding, targets[:2])


def test_cache_off_and_unwritable_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("COMMLAB_CACHE_DIR", "")
    assert route_cache.cache_dir() is None
    assert route_cache.load("x", (1, 1)) is None
    route_cache.store("x", np.zeros((1, 1), np.int16))  # a no-op
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("COMMLAB_CACHE_DIR", str(blocker / "sub"))  # cannot be made: ignored
    route_cache.store("x", np.zeros((1, 1), np.int16))
    assert route_cache.load("x", (1, 1)) is None


def test_array_link_check_matches_the_edge_by_edge_one():
    g = topo.fat_tree(4)  # plain floats: the array check
    assert _link_attributes(g) == _link_attributes_checked(list(g.edges(data=True)))
    g.add_edge("h0", "edge0.0", bandwidth=np.float64(3e9), latency=np.float32(1e-6))  # numpy scalars
    g.add_edge("edge0.0", "h0", bandwidth=7, latency=0)  # ints
    edges = list(g.edges(data=True))
    fast, checked = _link_attributes(g), _link_attributes_checked(edges)
    assert fast == checked


@pytest.mark.parametrize(
    ("a", "b", "attrs", "message"),
    [
        ("x", "x", {"bandwidth": 1e9, "latency": 0.0}, "self-loop"),
        ("x", "y", {"bandwidth": math.nan, "latency": 0.0}, "bandwidth=nan"),
        ("x", "y", {"bandwidth": math.inf, "latency": 0.0}, "bandwidth=inf"),
        ("x", "y", {"bandwidth": True, "latency": 0.0}, "bandwidth=True"),
        ("x", "y", {"bandwidth": 1e9, "latency": math.inf}, "latency=inf"),
    ],
)
def test_array_link_check_leaves_errors_to_the_named_check(a, b, attrs, message):
    g = nx.DiGraph()
    g.add_edge("y", "x", bandwidth=1e9, latency=0.0)
    g.add_edge(a, b, **attrs)
    with pytest.raises(TopologyError, match=message):
        _link_attributes(g)
