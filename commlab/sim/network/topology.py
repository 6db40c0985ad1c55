"""Networks to simulate: builders of networkx graphs, and `Topology`, a graph with rank placement and routing.

A topology graph is a `networkx.DiGraph` whose every edge (link, one direction) has `bandwidth` (bytes/s)
and `latency` (s). Nodes with `kind="npu"` are endpoints, where ranks sit; other nodes (`"switch"`,
`"nic"`) only forward. A graph with no `kind` attributes at all has every node an endpoint. The graph
attribute `endpoints_forward` (default True) says whether traffic may pass through an endpoint, as in a
torus, where every NPU is also a router. An undirected graph is taken as full-duplex links.

The builders below return such graphs; `Topology(graph)` validates one (any user-built graph too), places
ranks on its endpoints (in order, or as given) and routes between them (shortest path, or ECMP by flow hash
where shortest paths tie). An endpoint's optional `host` attribute names the host it sits in (ranks of one
DGX node, of `local`, of a torus row): `Topology.host_map` groups ranks by it for the topology-aware
algorithms.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import networkx as nx
import numpy as np

from commlab.collectives.hosts import HostMap
from commlab.errors import TopologyError, invalid
from commlab.sim.network import hardware
from commlab.sim.network.routing import ROUTINGS, CompiledGraph, Router, Routes, distances_to

NPU = "npu"
SWITCH = "switch"
NIC = "nic"
HOST = "host"  # endpoint attribute: the host (node) an endpoint sits in

DEFAULT_BANDWIDTH = hardware.IB_NDR.bandwidth  # a 400 Gb/s link, per direction
DEFAULT_LATENCY = hardware.IB_NDR.latency / 2  # per link: a switch hop is two links


# ----------------------------------------------------------------------------------------------- builders


def _check_count(name: str, value: object, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise invalid(name, value, f"an integer >= {low}")
    return int(value)


def _check_link(bandwidth: object, latency: object) -> tuple[float, float]:
    if not isinstance(bandwidth, numbers.Real) or not math.isfinite(bandwidth) or bandwidth <= 0:
        raise invalid("bandwidth", bandwidth, "bytes per second > 0")
    if not isinstance(latency, numbers.Real) or not math.isfinite(latency) or latency < 0:
        raise invalid("latency", latency, "seconds >= 0")
    return float(bandwidth), float(latency)


def _new_graph(name: str, endpoints_forward: bool) -> nx.DiGraph:
    graph = nx.DiGraph(name=name, endpoints_forward=endpoints_forward)
    return graph


def _link(graph: nx.DiGraph, a: object, b: object, bandwidth: float, latency: float, kind: str = "") -> None:
    """A full-duplex link: one edge each way with the same bandwidth and latency."""
    graph.add_edge(a, b, bandwidth=bandwidth, latency=latency, kind=kind)
    graph.add_edge(b, a, bandwidth=bandwidth, latency=latency, kind=kind)


def _links(graph: nx.DiGraph, pairs: list, bandwidth: float, latency: float, kind: str = "") -> None:
    """`_link` for many (a, b) pairs at once (both nodes already in the graph): the same edges in the same
    order, in one `add_edges_from` instead of two `add_edge` calls per link."""
    graph.add_edges_from(
        (edge for a, b in pairs for edge in ((a, b), (b, a))), bandwidth=bandwidth, latency=latency, kind=kind
    )


def torus(
    dims: Sequence[int], bandwidth: float = DEFAULT_BANDWIDTH, latency: float = DEFAULT_LATENCY
) -> nx.DiGraph:
    """A torus of NPUs (any number of dimensions): each NPU links to its +-1 neighbour in every dimension.

    NPU i has coordinates in row-major order with dimension 0 fastest. A dimension of size 2 has one link
    between its two NPUs, and a dimension of size 1 none.
    """
    dims = tuple(_check_count("dims", d) for d in dims)
    if not dims:
        raise invalid("dims", dims, "one or more dimension sizes")
    bandwidth, latency = _check_link(bandwidth, latency)
    graph = _new_graph("torus " + "x".join(map(str, dims)), endpoints_forward=True)
    size = math.prod(dims)
    strides = [math.prod(dims[:d]) for d in range(len(dims))]
    for i in range(size):
        coord = tuple((i // strides[d]) % dims[d] for d in range(len(dims)))
        row = coord[1:] if len(dims) > 1 else None  # a dimension-0 ring: the "host" of the 2D ring
        graph.add_node(f"npu{i}", kind=NPU, layer=0, coord=coord, **({"host": row} if row else {}))
    for i in range(size):
        for d, n in enumerate(dims):
            if n == 1:
                continue
            c = (i // strides[d]) % n
            j = i + (((c + 1) % n) - c) * strides[d]
            _link(graph, f"npu{i}", f"npu{j}", bandwidth, latency)
    return graph


def ring(n: int, bandwidth: float = DEFAULT_BANDWIDTH, latency: float = DEFAULT_LATENCY) -> nx.DiGraph:
    """n NPUs in a bidirectional ring: NPU i links to i+1 (mod n)."""
    graph = torus((_check_count("n", n),), bandwidth, latency)
    graph.graph["name"] = f"ring {n}"
    return graph


def fully_connected(
    n: int, bandwidth: float = DEFAULT_BANDWIDTH, latency: float = DEFAULT_LATENCY
) -> nx.DiGraph:
    """n NPUs with a direct link between every pair."""
    n = _check_count("n", n)
    bandwidth, latency = _check_link(bandwidth, latency)
    graph = _new_graph(f"fully connected {n}", endpoints_forward=True)
    for i in range(n):
        graph.add_node(f"npu{i}", kind=NPU, layer=0)
    for i in range(n):
        for j in range(i + 1, n):
            _link(graph, f"npu{i}", f"npu{j}", bandwidth, latency)
    return graph


def switch(n: int, bandwidth: float = DEFAULT_BANDWIDTH, latency: float = DEFAULT_LATENCY) -> nx.DiGraph:
    """n NPUs on one non-blocking switch, one link each."""
    n = _check_count("n", n)
    bandwidth, latency = _check_link(bandwidth, latency)
    graph = _new_graph(f"switch {n}", endpoints_forward=False)
    for i in range(n):
        graph.add_node(f"npu{i}", kind=NPU, layer=0)
    graph.add_node("switch", kind=SWITCH, layer=1)
    for i in range(n):
        _link(graph, f"npu{i}", "switch", bandwidth, latency)
    return graph


LOCAL_BANDWIDTH = 10e9  # bytes/s per rank and direction: a placeholder; a calibrated profile sets the speed


def local(n: int, bandwidth: float = LOCAL_BANDWIDTH, latency: float = 0.0) -> nx.DiGraph:
    """n ranks on one host: each rank's send port and receive port (a link each way) to a `host` node.

    The host node is the shared memory between processes. Under a calibrated profile (`commlab
    calibrate`) a message alone takes its calibrated time whatever `bandwidth` says; the ports make two
    messages a rank sends (or receives) at once share its port, as they share its process's time.
    """
    n = _check_count("n", n)
    bandwidth, latency = _check_link(bandwidth, latency)
    graph = _new_graph(f"local {n}", endpoints_forward=False)
    for i in range(n):
        graph.add_node(f"rank{i}", kind=NPU, layer=0, host="local")
    graph.add_node("host", kind=SWITCH, layer=1)
    for i in range(n):
        _link(graph, f"rank{i}", "host", bandwidth, latency, "port")
    return graph


def fat_tree(
    k: int,
    bandwidth: float = DEFAULT_BANDWIDTH,
    latency: float = DEFAULT_LATENCY,
    oversubscription: float = 1,
) -> nx.DiGraph:
    """A three-level k-ary fat-tree (Al-Fares et al., SIGCOMM 2008) of hosts, edge, aggregation, core.

    k pods of k/2 edge and k/2 aggregation switches, (k/2)^2 core switches, all links alike. Each edge
    switch serves `oversubscription` x k/2 hosts over its k/2 uplinks, so the edge layer is
    oversubscription:1 (1 gives the full-bisection k^3/4-host tree).
    """
    k = _check_count("k", k, 2)
    if k % 2:
        raise invalid("k", k, "an even integer >= 2")
    bandwidth, latency = _check_link(bandwidth, latency)
    half = k // 2
    ratio = oversubscription
    hosts_per_edge = half * ratio if isinstance(ratio, numbers.Real) and ratio > 0 else 0
    if not float(hosts_per_edge).is_integer() or hosts_per_edge < 1:
        raise invalid(
            "oversubscription", ratio, f"a ratio > 0 that makes k/2 x ratio (k/2={half}) an integer"
        )
    hosts_per_edge = int(hosts_per_edge)
    graph = _new_graph(f"fat-tree k={k}" + (f" {ratio:g}:1" if ratio != 1 else ""), endpoints_forward=False)
    host = 0
    pairs = []  # full-duplex links in the order they are made (the graph's edge order follows it)
    for pod in range(k):
        for e in range(half):
            edge = f"edge{pod}.{e}"
            graph.add_node(edge, kind=SWITCH, layer=1)
            for _ in range(hosts_per_edge):
                graph.add_node(f"h{host}", kind=NPU, layer=0)
                pairs.append((f"h{host}", edge))
                host += 1
        for a in range(half):
            graph.add_node(f"agg{pod}.{a}", kind=SWITCH, layer=2)
            for e in range(half):
                pairs.append((f"edge{pod}.{e}", f"agg{pod}.{a}"))
    for a in range(half):
        for c in range(half):
            core = f"core{a}.{c}"
            graph.add_node(core, kind=SWITCH, layer=3)
            for pod in range(k):
                pairs.append((f"agg{pod}.{a}", core))
    _links(graph, pairs, bandwidth, latency)
    return graph


@dataclass(frozen=True)
class NodeLinks:
    """Bandwidth and latency per link of a DGX-style node: GPU-NVSwitch, GPU-NIC (PCIe), NIC-fabric."""

    nvlink_bandwidth: float
    nvlink_latency: float
    pcie_bandwidth: float
    pcie_latency: float
    nic_bandwidth: float
    nic_latency: float

    @classmethod
    def of(
        cls,
        gpu: str | hardware.Accelerator = "a100",
        nic: str | hardware.Link = "hdr",
        nvlink_bandwidth: float | None = None,
        nic_bandwidth: float | None = None,
    ) -> NodeLinks:
        """Links from presets; `nvlink_bandwidth` (per GPU, all its links) and `nic_bandwidth` override."""
        acc, port = hardware.accelerator(gpu), hardware.nic(nic)
        nv = acc.nvlink_bandwidth if nvlink_bandwidth is None else nvlink_bandwidth
        nb = port.bandwidth if nic_bandwidth is None else nic_bandwidth
        _check_link(nv, 0.0)
        _check_link(nb, 0.0)
        # Each link carries half a hop's latency: GPU -> NVSwitch -> GPU is one NVLink hop.
        return cls(
            nv, acc.nvlink.hop_latency / 2, acc.pcie.bandwidth, acc.pcie.latency / 2, nb, port.latency / 2
        )


def _add_dgx(graph: nx.DiGraph, prefix: str, gpus: int, links: NodeLinks) -> None:
    nvswitch = f"{prefix}nvswitch"
    graph.add_node(nvswitch, kind=SWITCH, layer=1)
    for i in range(gpus):
        gpu, nic = f"{prefix}gpu{i}", f"{prefix}nic{i}"
        graph.add_node(gpu, kind=NPU, layer=0, host=prefix or "node")
        graph.add_node(nic, kind=NIC, layer=1)
        _link(graph, gpu, nvswitch, links.nvlink_bandwidth, links.nvlink_latency, "nvlink")
        _link(graph, gpu, nic, links.pcie_bandwidth, links.pcie_latency, "pcie")


def dgx_node(
    gpu: str | hardware.Accelerator = "a100",
    nic: str | hardware.Link = "hdr",
    gpus: int = 8,
    nvlink_bandwidth: float | None = None,
) -> nx.DiGraph:
    """One DGX-style node: `gpus` GPUs on an NVSwitch, each with its own NIC behind a PCIe link.

    The NVSwitch is one switch node; a GPU's link to it carries all its NVLinks (e.g. 12 x 25 GB/s per
    direction for an A100). The NICs lead nowhere in a single node; `cluster` joins nodes through them.
    """
    gpus = _check_count("gpus", gpus)
    links = NodeLinks.of(gpu, nic, nvlink_bandwidth)
    graph = _new_graph(f"dgx {hardware.accelerator(gpu).name} x{gpus}", endpoints_forward=False)
    _add_dgx(graph, "", gpus, links)
    return graph


def cluster(
    nodes: int,
    gpu: str | hardware.Accelerator = "a100",
    nic: str | hardware.Link = "hdr",
    gpus_per_node: int = 8,
    leaf_ports: int = 32,
    spines: int | None = None,
    nvlink_bandwidth: float | None = None,
    nic_bandwidth: float | None = None,
) -> nx.DiGraph:
    """DGX-style nodes on a rail-optimized leaf/spine fabric: NIC i of every node is on rail i.

    Each rail has its own leaf switches, `leaf_ports` nodes per leaf; every leaf links once to each of
    `spines` spine switches (default `leaf_ports`: non-blocking), which also carry cross-rail traffic.
    All fabric links run at the NIC's speed. GPUs do not forward traffic: a message between GPUs of
    different rails on different nodes crosses a spine.
    """
    nodes = _check_count("nodes", nodes)
    gpus_per_node = _check_count("gpus_per_node", gpus_per_node)
    leaf_ports = _check_count("leaf_ports", leaf_ports)
    spines = leaf_ports if spines is None else _check_count("spines", spines)
    links = NodeLinks.of(gpu, nic, nvlink_bandwidth, nic_bandwidth)
    name = f"cluster {nodes} x dgx {hardware.accelerator(gpu).name} x{gpus_per_node}"
    graph = _new_graph(name, endpoints_forward=False)
    for n in range(nodes):
        _add_dgx(graph, f"n{n}.", gpus_per_node, links)
    leaves = -(-nodes // leaf_ports)
    for s in range(spines):
        graph.add_node(f"spine{s}", kind=SWITCH, layer=3)
    for rail in range(gpus_per_node):
        for leaf in range(leaves):
            name = f"rail{rail}.leaf{leaf}"
            graph.add_node(name, kind=SWITCH, layer=2)
            for s in range(spines):
                _link(graph, name, f"spine{s}", links.nic_bandwidth, links.nic_latency, "ib")
        for n in range(nodes):
            leaf = f"rail{rail}.leaf{n // leaf_ports}"
            _link(graph, f"n{n}.nic{rail}", leaf, links.nic_bandwidth, links.nic_latency, "ib")
    return graph


# ----------------------------------------------------------------------------------------------- Topology


def _directed(graph: object) -> nx.DiGraph:
    if isinstance(graph, nx.MultiGraph):
        raise TopologyError(
            "multigraphs are not supported: merge parallel links into one with their bandwidth"
        )
    if isinstance(graph, nx.DiGraph):
        return graph
    if isinstance(graph, nx.Graph):
        return graph.to_directed()
    raise invalid("graph", type(graph).__name__, "a networkx DiGraph or Graph")


def _link_attributes(graph: nx.DiGraph) -> tuple[list, list, list, list]:
    """Edge endpoints, bandwidths and latencies, with a clear error for any missing or invalid value.

    Plain float/int attributes are checked as whole arrays (a k=64 fat-tree has 393 k links); anything
    else, or any invalid value, goes through the edge-by-edge check that names the offending link."""
    edges = list(graph.edges(data=True))
    bandwidth = [data.get("bandwidth") for _, _, data in edges]
    latency = [data.get("latency") for _, _, data in edges]
    plain = {float, int}
    if set(map(type, bandwidth)) <= plain and set(map(type, latency)) <= plain:
        bw, lat = np.asarray(bandwidth, float), np.asarray(latency, float)
        valid = np.all(np.isfinite(bw) & (bw > 0)) and np.all(np.isfinite(lat) & (lat >= 0))
        if valid and nx.number_of_selfloops(graph) == 0:
            return [a for a, _, _ in edges], [b for _, b, _ in edges], bw.tolist(), lat.tolist()
    return _link_attributes_checked(edges)


def _link_attributes_checked(edges: list) -> tuple[list, list, list, list]:
    """`_link_attributes` edge by edge: raises on the first invalid link, naming it."""
    src, dst, bandwidth, latency = [], [], [], []
    for a, b, data in edges:
        if a == b:
            raise TopologyError(f"link {a!r} -> {b!r} is a self-loop")
        bw, lat = data.get("bandwidth"), data.get("latency")
        if isinstance(bw, bool) or not isinstance(bw, numbers.Real) or not math.isfinite(bw) or bw <= 0:
            raise TopologyError(f"link {a!r} -> {b!r} has bandwidth={bw!r}; accepted: bytes per second > 0")
        if isinstance(lat, bool) or not isinstance(lat, numbers.Real) or not math.isfinite(lat) or lat < 0:
            raise TopologyError(f"link {a!r} -> {b!r} has latency={lat!r}; accepted: seconds >= 0")
        src.append(a)
        dst.append(b)
        bandwidth.append(float(bw))
        latency.append(float(lat))
    return src, dst, bandwidth, latency


class Topology:
    """A validated network: its graph, the endpoint each rank sits on, and routes between ranks.

    `placement` lists the endpoint of rank 0, 1, ... (default: every endpoint, in graph order);
    `routing` is "ecmp" (hash each flow over equal shortest paths) or "shortest" (always the first).
    """

    def __init__(
        self,
        graph: nx.DiGraph | nx.Graph,
        placement: Sequence[object] | None = None,
        routing: str = "ecmp",
        name: str | None = None,
    ) -> None:
        graph = _directed(graph)
        if routing not in ROUTINGS:
            raise invalid("routing", routing, ROUTINGS)
        if graph.number_of_nodes() == 0:
            raise TopologyError("the topology graph has no nodes")
        labels = tuple(graph.nodes)
        index = {label: i for i, label in enumerate(labels)}
        kinds = [graph.nodes[v].get("kind") for v in labels]
        if all(k is None for k in kinds):
            endpoint = np.ones(len(labels), bool)
        else:
            endpoint = np.array([k == NPU for k in kinds], bool)
        if not endpoint.any():
            raise TopologyError(f'no endpoint in the graph: no node has kind="{NPU}"')
        src, dst, bandwidth, latency = _link_attributes(graph)
        if len(labels) > 1 and not nx.is_weakly_connected(graph):
            parts = list(nx.weakly_connected_components(graph))
            sample = ", ".join(repr(next(iter(p))) for p in parts[:3])
            raise TopologyError(
                f"the topology graph is disconnected: {len(parts)} parts (e.g. around {sample})"
            )
        forwards = bool(graph.graph.get("endpoints_forward", True))
        forwarding = ~endpoint | forwards
        self.graph = graph
        self.name = name or graph.graph.get("name") or "custom"
        self.routing = routing
        self.compiled = CompiledGraph.build(
            labels,
            np.fromiter(map(index.__getitem__, src), np.int64, len(src)),
            np.fromiter(map(index.__getitem__, dst), np.int64, len(dst)),
            np.asarray(bandwidth, float),
            np.asarray(latency, float),
            forwarding,
        )
        self.endpoints: tuple = tuple(v for v, e in zip(labels, endpoint, strict=True) if e)
        self.placement: tuple = self._placement(placement, index, endpoint)
        self.rank_nodes = np.fromiter((index[v] for v in self.placement), np.int64, len(self.placement))
        self._index = index
        self._router = Router(self.compiled, routing)
        self._ring: dict[int, tuple[float, float, int]] = {}

    def _placement(self, placement: Sequence[object] | None, index: dict, endpoint: np.ndarray) -> tuple:
        if placement is None:
            return self.endpoints
        if isinstance(placement, (str, bytes)) or not isinstance(placement, Sequence):
            raise invalid("placement", placement, "a sequence of endpoint nodes, one per rank")
        seen = set()
        for rank, node in enumerate(placement):
            if node not in index or not endpoint[index[node]]:
                raise invalid(f"placement[{rank}]", node, "an endpoint (kind='npu') of the graph")
            if node in seen:
                raise invalid(f"placement[{rank}]", node, "an endpoint no other rank sits on")
            seen.add(node)
        if not placement:
            raise invalid("placement", placement, "a sequence of endpoint nodes, one per rank")
        return tuple(placement)

    @property
    def num_ranks(self) -> int:
        """How many ranks the placement holds: the largest world size this topology runs."""
        return len(self.placement)

    def with_placement(self, placement: Sequence[object]) -> Topology:
        """The same network with ranks placed differently (a new Topology; routes are recomputed)."""
        return Topology(self.graph, placement, self.routing, self.name)

    def host_map(self, world_size: int | None = None) -> HostMap:
        """Which of ranks 0..p-1 share a host: the endpoints' `host` attribute (the node of a DGX-style
        cluster, the one host of `local`, a dimension-0 ring of a torus), else each endpoint its own."""
        p = self.num_ranks if world_size is None else world_size
        self.check_world_size(p)
        nodes = self.graph.nodes
        return HostMap.from_labels([nodes[v].get(HOST, ("endpoint", v)) for v in self.placement[:p]])

    def check_world_size(self, world_size: int) -> None:
        """Raise unless `world_size` ranks fit on the placement."""
        if not 1 <= world_size <= self.num_ranks:
            raise invalid("world_size", world_size, f"1..{self.num_ranks} (the ranks placed on {self.name})")

    def routes(self, src_ranks: np.ndarray, dst_ranks: np.ndarray) -> Routes:
        """Routes (link ids) from each source rank to the matching destination rank."""
        return self._router.routes(self.rank_nodes[src_ranks], self.rank_nodes[dst_ranks])

    def link_label(self, link: int) -> tuple[object, object]:
        """The (from, to) nodes of a link id."""
        c = self.compiled
        return c.labels[c.link_src[link]], c.labels[c.link_dst[link]]

    def ring_bottleneck(self, world_size: int) -> tuple[float, float, int]:
        """(bandwidth, latency, link) of the ring through ranks 0..p-1 in order: its slowest route's
        bandwidth and its longest route latency, and the link that limits the bandwidth (-1 for one rank).

        This is the link model of the analytic fidelity.
        """
        self.check_world_size(world_size)
        if world_size not in self._ring:
            if world_size == 1:
                self._ring[1] = (math.inf, 0.0, -1)
            else:
                ranks = np.arange(world_size)
                routes = self.routes(ranks, (ranks + 1) % world_size)
                worst = int(np.argmin(routes.bandwidth))
                links = routes.links_of(worst)
                slowest = int(links[np.argmin(self.compiled.bandwidth[links])])
                self._ring[world_size] = (
                    float(routes.bandwidth[worst]),
                    float(routes.latency.max()),
                    slowest,
                )
        return self._ring[world_size]

    def summary(self, bisection: bool = True) -> dict:
        """Counts, link bandwidth range, bisection bandwidth of the placement-order split, and diameter."""
        c = self.compiled
        info = {
            "name": self.name,
            "nodes": c.num_nodes,
            "endpoints": len(self.endpoints),
            "ranks": self.num_ranks,
            "switches": c.num_nodes - len(self.endpoints),
            "links": c.num_links,
            "min_link_bandwidth": float(c.bandwidth.min()) if c.num_links else 0.0,
            "max_link_bandwidth": float(c.bandwidth.max()) if c.num_links else 0.0,
            "diameter_hops": self.diameter(),
            "bisection_bandwidth": self.bisection_bandwidth() if bisection else None,
        }
        return info

    def diameter(self) -> int:
        """The most hops on a route between two placed ranks (0 for one rank)."""
        if self.num_ranks < 2:
            return 0
        c = self.compiled
        nodes = self.rank_nodes
        attach = self._router._attach[nodes]
        collapse = (attach >= 0) & c.forwarding[np.maximum(attach, 0)]
        targets = np.where(collapse, attach, nodes)
        extra = collapse.astype(np.int64)
        unique, inverse = np.unique(targets, return_inverse=True)
        last_hop = np.zeros(len(unique), np.int64)  # 1 where some rank is reached over a collapsed link
        np.maximum.at(last_hop, inverse, extra)
        best = 0
        per_block = max(1, (1 << 24) // c.num_nodes)
        for start in range(0, len(unique), per_block):
            block = distances_to(c, unique[start : start + per_block])[:, nodes].astype(np.int64)
            if np.any(block < 0):
                row = int(np.flatnonzero((block < 0).any(axis=1))[0])
                raise TopologyError(f"some ranks cannot reach {c.labels[unique[start + row]]!r}")
            best = max(best, int((block.max(axis=1) + last_hop[start : start + len(block)]).max()))
        return best

    def bisection_bandwidth(self) -> float:
        """Max flow (bytes/s) from the first half of the ranks to the second half, in placement order."""
        if self.num_ranks < 2:
            return 0.0
        half = self.num_ranks // 2
        first, second = set(self.placement[:half]), set(self.placement[half : 2 * half])
        flow = nx.DiGraph()
        forwards = bool(self.graph.graph.get("endpoints_forward", True))
        endpoints = set(self.endpoints)
        for a, b, data in self.graph.edges(data=True):
            if not forwards and ((b in endpoints and b not in second) or (a in endpoints and a not in first)):
                continue  # endpoints that do not forward only send (first half) or receive (second)
            flow.add_edge(a, b, capacity=data["bandwidth"])
        for v in first:
            flow.add_edge("__source__", v)
        for v in second:
            flow.add_edge(v, "__sink__")
        if "__source__" not in flow or "__sink__" not in flow:
            return 0.0
        return float(nx.maximum_flow_value(flow, "__source__", "__sink__"))

    def __repr__(self) -> str:
        c = self.compiled
        return (
            f"Topology({self.name!r}, ranks={self.num_ranks}, nodes={c.num_nodes}, links={c.num_links}, "
            f"routing={self.routing!r})"
        )


def as_topology(value: Topology | nx.DiGraph | nx.Graph) -> Topology:
    """A Topology from a Topology or a networkx graph."""
    return value if isinstance(value, Topology) else Topology(value)


BUILDERS = {
    "ring": ring,
    "torus": torus,
    "fully-connected": fully_connected,
    "switch": switch,
    "local": local,
    "fat-tree": fat_tree,
    "dgx": dgx_node,
    "cluster": cluster,
}
