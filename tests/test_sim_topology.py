"""Topologies: builders, validation errors, placement, routing (shortest and ECMP), summaries, files."""

from __future__ import annotations

import json

import networkx as nx
import numpy as np
import pytest

from commlab.errors import InvalidArgumentError, TopologyError
from commlab.sim.network import topology as topo
from commlab.sim.network.topology import Topology
from commlab.sim.network.topology_io import load_topology, parse_topology


@pytest.mark.parametrize(
    ("graph", "nodes", "endpoints", "links"),
    [
        (topo.ring(8), 8, 8, 16),
        (topo.torus((4, 4)), 16, 16, 64),
        (topo.torus((2, 3, 4)), 24, 24, 2 * 24 * 2 + 24 * 2 - 24),  # size-2 dimension: one link per pair
        (topo.fully_connected(5), 5, 5, 20),
        (topo.switch(6), 7, 6, 12),
        (topo.fat_tree(4), 36, 16, 96),
        (topo.fat_tree(4, oversubscription=2), 52, 32, 128),
        (topo.dgx_node(), 17, 8, 32),
        (topo.cluster(2), 16 + 16 + 2 + 8 + 32, 16, 2 * (16 + 16 + 16 + 8 * 32)),
    ],
)
def test_builders_shape(graph, nodes, endpoints, links):
    t = Topology(graph)
    assert (t.compiled.num_nodes, len(t.endpoints), t.compiled.num_links) == (nodes, endpoints, links)
    assert all(d["bandwidth"] > 0 and d["latency"] >= 0 for _, _, d in graph.edges(data=True))


def test_summary_bisection_and_diameter():
    assert Topology(topo.ring(8)).summary()["bisection_bandwidth"] == pytest.approx(
        2 * topo.DEFAULT_BANDWIDTH
    )
    fat = Topology(topo.fat_tree(4)).summary()
    assert fat["bisection_bandwidth"] == pytest.approx(8 * topo.DEFAULT_BANDWIDTH)  # full bisection
    assert fat["diameter_hops"] == 6
    over = Topology(topo.fat_tree(4, oversubscription=2)).summary()
    assert over["bisection_bandwidth"] == pytest.approx(8 * topo.DEFAULT_BANDWIDTH)  # 16 hosts per half
    cl = Topology(topo.cluster(2, nic="hdr")).summary()
    assert cl["bisection_bandwidth"] == pytest.approx(8 * 25e9)  # eight NICs per node
    assert Topology(topo.switch(5)).summary()["diameter_hops"] == 2


def test_user_graph_undirected_without_kinds_works():
    g = nx.Graph()
    g.add_edge("a", "b", bandwidth=1e9, latency=1e-6)
    g.add_edge("b", "c", bandwidth=2e9, latency=1e-6)
    t = Topology(g)
    assert t.placement == ("a", "b", "c")
    routes = t.routes(np.array([0]), np.array([2]))
    assert [t.link_label(int(link)) for link in routes.links] == [("a", "b"), ("b", "c")]
    assert routes.bandwidth[0] == 1e9
    assert routes.latency[0] == pytest.approx(2e-6)


@pytest.mark.parametrize(
    ("attrs", "message"),
    [
        ({"bandwidth": 0, "latency": 0.0}, "bandwidth=0"),
        ({"bandwidth": -5e9, "latency": 0.0}, "bandwidth=-5"),
        ({"bandwidth": 1e9}, "latency=None"),
        ({"bandwidth": 1e9, "latency": -1.0}, "latency=-1.0"),
        ({"bandwidth": "fast", "latency": 0.0}, "bandwidth='fast'"),
    ],
)
def test_bad_link_attributes_are_clear_errors(attrs, message):
    g = nx.DiGraph()
    g.add_edge("a", "b", **attrs)
    with pytest.raises(TopologyError, match=message):
        Topology(g)


def test_disconnected_graph_is_an_error():
    g = topo.ring(4)
    g.add_edge("x", "y", bandwidth=1e9, latency=0.0)
    g.nodes["x"]["kind"] = g.nodes["y"]["kind"] = "npu"
    with pytest.raises(TopologyError, match="disconnected: 2 parts"):
        Topology(g)


def test_unreachable_pair_is_an_error():
    g = nx.DiGraph()
    g.add_edge("a", "b", bandwidth=1e9, latency=0.0)  # one direction only
    t = Topology(g)
    with pytest.raises(TopologyError, match="no path from 'b' to 'a'"):
        t.routes(np.array([1]), np.array([0]))


def test_placement_validation_and_world_size():
    g = topo.switch(4)
    with pytest.raises(InvalidArgumentError, match=r"placement\[0\]='switch'"):
        Topology(g, placement=["switch", "npu1"])
    with pytest.raises(InvalidArgumentError, match=r"placement\[1\]='npu0'"):
        Topology(g, placement=["npu0", "npu0"])
    t = Topology(g, placement=["npu3", "npu1"])
    assert t.num_ranks == 2
    with pytest.raises(InvalidArgumentError, match="world_size=3"):
        t.check_world_size(3)


def test_builder_argument_errors():
    with pytest.raises(InvalidArgumentError, match="k=5"):
        topo.fat_tree(5)
    with pytest.raises(InvalidArgumentError, match=r"oversubscription=0\.3"):
        topo.fat_tree(4, oversubscription=0.3)
    with pytest.raises(InvalidArgumentError, match="bandwidth=0"):
        topo.ring(4, bandwidth=0)
    with pytest.raises(InvalidArgumentError, match="gpu='b100'"):
        topo.dgx_node(gpu="b100")


def test_ecmp_spreads_tied_paths_and_shortest_does_not():
    g = topo.fat_tree(4)
    hosts = 16
    src = np.repeat(np.arange(hosts), hosts)
    dst = np.tile(np.arange(hosts), hosts)
    keep = src != dst
    src, dst = src[keep], dst[keep]
    for routing, expect_spread in (("ecmp", True), ("shortest", False)):
        t = Topology(g, routing=routing)
        routes = t.routes(src, dst)
        assert routes.hops.max() == 6 and routes.hops.min() == 2
        core_links = {int(link) for link in routes.links if t.link_label(int(link))[1].startswith("core")}
        assert (len(core_links) == 16) == expect_spread  # 4 core switches x 4 aggregation uplinks
        again = t.routes(src, dst)
        assert np.array_equal(again.links, routes.links)  # deterministic per flow


def test_ring_routes_go_the_short_way():
    t = Topology(topo.ring(8))
    routes = t.routes(np.array([0, 0]), np.array([3, 6]))
    assert list(routes.hops) == [3, 2]


def test_rail_cluster_routes_cross_spine_only_between_rails():
    t = Topology(topo.cluster(2))
    same_rail = t.routes(np.array([0]), np.array([8]))
    cross_rail = t.routes(np.array([7]), np.array([8]))
    labels = [t.link_label(int(link)) for link in cross_rail.links]
    assert same_rail.hops[0] == 6 - 2 and cross_rail.hops[0] == 6
    assert any(str(b).startswith("spine") for _, b in labels)
    assert not any(str(a).startswith("n0.gpu") and a != "n0.gpu7" for a, _ in labels)  # GPUs don't forward


def test_specs_and_errors():
    assert parse_topology("fat-tree:k=4,oversubscription=2").num_ranks == 32
    assert parse_topology("torus:dims=2x2x2,bandwidth=100GB/s,latency=1us").compiled.bandwidth.max() == 100e9
    assert parse_topology("cluster:nodes=2,gpu=h100,nic=ndr").num_ranks == 16
    with pytest.raises(InvalidArgumentError, match="ring with n="):
        parse_topology("ring")
    with pytest.raises(InvalidArgumentError, match="keys n, bandwidth, latency"):
        parse_topology("ring:q=3")
    with pytest.raises(InvalidArgumentError, match="topology='mesh'"):
        parse_topology("mesh")


def test_load_toml_yaml_json(tmp_path):
    toml = tmp_path / "net.toml"
    toml.write_text(
        'name = "two hosts"\nendpoints_forward = false\nplacement = ["b", "a"]\n'
        '[[nodes]]\nname = "a"\n[[nodes]]\nname = "b"\n[[nodes]]\nname = "s"\nkind = "switch"\n'
        '[[links]]\nsrc = "a"\ndst = "s"\nbandwidth = "100Gb/s"\nlatency = "500ns"\n'
        '[[links]]\nsrc = "b"\ndst = "s"\nbandwidth = 12.5e9\nlatency = 5e-7\n'
    )
    t = load_topology(toml)
    assert t.placement == ("b", "a") and t.name == "two hosts"
    assert set(t.compiled.bandwidth.tolist()) == {12.5e9}
    data = {"links": [{"src": "x", "dst": "y", "bandwidth": 1e9, "latency": 0, "duplex": False}]}
    (tmp_path / "net.json").write_text(json.dumps(data))
    assert load_topology(tmp_path / "net.json").compiled.num_links == 1
    (tmp_path / "net.yaml").write_text("links:\n  - {src: x, dst: y, bandwidth: 50GB/s, latency: 1us}\n")
    assert load_topology(tmp_path / "net.yaml").compiled.num_links == 2


def test_load_astra_sim_network_yml(tmp_path):
    path = tmp_path / "network.yml"
    path.write_text(
        "topology: [ Ring, FullyConnected, Switch ]\nnpus_count: [ 2, 8, 4 ]\n"
        "bandwidth: [ 200.0, 100.0, 50.0 ]  # GB/s\nlatency: [ 50.0, 500.0, 2000.0 ]  # ns\n"
    )
    t = load_topology(path)
    assert t.num_ranks == 64
    # ring of 2: one link pair per group (32 groups); fully connected 8: 28 pairs x 8 groups; switch: 4 x 16
    assert t.compiled.num_links == 2 * (32 + 28 * 8 + 4 * 16)
    assert set(np.unique(t.compiled.bandwidth / 2**30).tolist()) == {50.0, 100.0, 200.0}
    assert t.summary(bisection=False)["diameter_hops"] == 1 + 1 + 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("links: [ {src: a, dst: b, latency: 1} ]", "lacks bandwidth"),
        ("links: [ {src: a, dst: b, bandwidth: -3, latency: 1} ]", "bandwidth=-3"),
        ("links: []", "non-empty list of links"),
        (
            "nodes: [ {name: a} ]\nlinks: [ {src: a, dst: c, bandwidth: 1, latency: 0} ]",
            "dst='c' is not a declared",
        ),
        ("topology: [ Ring ]\nnpus_count: [ 4 ]\nbandwidth: [ 0 ]\nlatency: [ 1 ]", r"bandwidth\[0\]=0"),
        ("topology: [ Mesh ]\nnpus_count: [ 4 ]\nbandwidth: [ 1 ]\nlatency: [ 1 ]", "Mesh"),
        (
            "topology: [ Ring, Ring ]\nnpus_count: [ 4 ]\nbandwidth: [ 1 ]\nlatency: [ 1 ]",
            "one value per dimension",
        ),
        ("links: [ {src: a, dst: b, bandwidth: 1, latency: 0, colour: red} ]", "unknown keys"),
        ("[unclosed", "not valid YAML"),
    ],
)
def test_malformed_files_are_clear_errors(tmp_path, text, message):
    path = tmp_path / "bad.yml"
    path.write_text(text)
    with pytest.raises(TopologyError, match=message):
        load_topology(path)


def test_missing_file_and_bad_suffix(tmp_path):
    with pytest.raises(TopologyError, match="cannot read"):
        load_topology(tmp_path / "nope.toml")
    with pytest.raises(InvalidArgumentError, match="ending in"):
        load_topology(tmp_path / "net.txt")
