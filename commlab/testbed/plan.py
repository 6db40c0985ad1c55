"""From a simulator topology to what the testbed builds: hosts, switches and wires, with names and addresses.

This is pure data (no root, no commands), so it is testable anywhere. The rules:
- A **host** is an endpoint (kind "npu") with exactly one link, to a switch: one rank. Or a node of kind
  "nic" whose endpoints hang off it alone: that host runs those endpoints' ranks (several ranks per host);
  the links between the nic and its endpoints are inside the host (its local stack), not emulated.
- Every other node is a **switch** (a Linux bridge). Links between switches must form a tree: bridges
  without spanning tree would loop on a cycle (a fat-tree with k > 2, a torus).
- A host's ranks must be consecutive in the placement: torchrun gives node i the ranks after those of
  nodes 0..i-1 (`--nproc-per-node` may differ per host: uneven layouts such as 3 + 1 ranks).
- Each direction of a wire gets the rate and latency of the graph edge in that direction.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import networkx as nx

from commlab.errors import TopologyError, invalid
from commlab.sim.network.topology import HOST, LOCAL_BANDWIDTH, NIC, NPU, SWITCH, Topology

SUBNET = "10.77.0.0/16"  # only ever configured inside the run's own namespaces
HOST_DEVICE = "eth0"  # every host's interface, the same name in every namespace (GLOO_SOCKET_IFNAME)


def host_address(index: int) -> str:
    """The address of host `index` in SUBNET: 10.77.0.1, 10.77.0.2, ..., 10.77.1.1 after 250 hosts."""
    if not 0 <= index < 250 * 250:
        raise invalid("host index", index, "0 .. 62499")
    return f"10.77.{index // 250}.{index % 250 + 1}"


def hostname_of(label: object, used: set[str]) -> str:
    """A valid, unique hostname for a node label: letters, digits and '-' (npu0, n0-nic0, h3)."""
    name = re.sub(r"[^a-z0-9-]+", "-", str(label).lower()).strip("-")[:40] or "host"
    if name[0].isdigit():
        name = "h" + name
    base, k = name, 1
    while name in used:
        name, k = f"{base}-{k}", k + 1
    used.add(name)
    return name


@dataclass(frozen=True)
class Host:
    """An emulated host: its node in the graph, hostname, address and the ranks (placement order) it runs."""

    label: str
    hostname: str
    address: str
    ranks: tuple[int, ...]
    switch: str  # the switch its wire goes to


@dataclass(frozen=True)
class Wire:
    """A full-duplex link to emulate: `a` -> `b` and `b` -> `a` with their own rate (bytes/s) and latency (s).

    `a` is a host or a switch, `b` a switch; `index` numbers the wire (it names the veth ends)."""

    index: int
    a: str
    b: str
    rate_ab: float
    rate_ba: float
    latency_ab: float
    latency_ba: float
    host: bool  # whether `a` is a host (else both ends are switches)


@dataclass(frozen=True)
class NetworkPlan:
    """Everything the testbed builds for one topology, in placement order."""

    name: str
    hosts: tuple[Host, ...]
    switches: tuple[str, ...]
    wires: tuple[Wire, ...]
    ranks_per_host: int  # the most ranks on one host (every host's own count is len(host.ranks))

    @property
    def world_size(self) -> int:
        return sum(len(host.ranks) for host in self.hosts)

    @property
    def uniform(self) -> bool:
        """Whether every host runs as many ranks."""
        return len({len(host.ranks) for host in self.hosts}) == 1

    @property
    def host_spec(self) -> str:
        """The layout as a host map spec (`HostMap.parse`): '2x2', or the counts per host ('3,1')."""
        if self.uniform:
            return f"{len(self.hosts)}x{self.ranks_per_host}"
        return ",".join(str(len(host.ranks)) for host in self.hosts)

    def host(self, name: str) -> Host:
        """A host by hostname or graph label, or by index ('0', '1', ...)."""
        for host in self.hosts:
            if name in (host.hostname, host.label):
                return host
        if name.isdigit() and int(name) < len(self.hosts):
            return self.hosts[int(name)]
        raise invalid("host", name, [h.hostname for h in self.hosts])

    def wire_of(self, host: Host) -> Wire:
        return next(w for w in self.wires if w.host and w.a == host.label)

    def route(self, a: Host, b: Host) -> list[tuple[Wire, bool]]:
        """The wires from host a to host b, each with True where it is crossed a -> b (host/switch side
        first), False where b -> a."""
        tree = nx.Graph()
        for wire in self.wires:
            tree.add_edge(wire.a, wire.b, wire=wire)
        path = nx.shortest_path(tree, a.label, b.label)
        hops = []
        for u, v in itertools.pairwise(path):
            wire = tree.edges[u, v]["wire"]
            hops.append((wire, wire.a == u))
        return hops

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> NetworkPlan:
        return cls(
            data["name"],
            tuple(Host(**{**h, "ranks": tuple(h["ranks"])}) for h in data["hosts"]),
            tuple(data["switches"]),
            tuple(Wire(**w) for w in data["wires"]),
            data["ranks_per_host"],
        )


def _kind(graph: nx.DiGraph, node: object) -> str | None:
    return graph.nodes[node].get("kind")


def _neighbours(graph: nx.DiGraph, node: object) -> set:
    return set(graph.successors(node)) | set(graph.predecessors(node))


def plan_for(topology: Topology) -> NetworkPlan:
    """The hosts, switches and wires that emulate `topology` (rules in the module docstring)."""
    graph = topology.graph
    rank_of = {node: rank for rank, node in enumerate(topology.placement)}
    if len(rank_of) != len(topology.endpoints):
        raise TopologyError(
            f"{topology.name}: the testbed runs a rank on every endpoint; the placement covers "
            f"{len(rank_of)} of {len(topology.endpoints)}"
        )
    groups: dict[object, list[int]] = {}
    for node in topology.placement:
        near = _neighbours(graph, node)
        if len(near) != 1:
            raise TopologyError(
                f"{topology.name}: endpoint {node!r} has {len(near)} links; the testbed emulates hosts "
                "with one link each, to a switch (or ranks behind one 'nic' node)"
            )
        (peer,) = near
        if _kind(graph, peer) == NIC:
            groups.setdefault(peer, []).append(rank_of[node])
        elif _kind(graph, peer) in (SWITCH, None) and peer not in rank_of:
            groups[node] = [rank_of[node]]
        else:
            raise TopologyError(
                f"{topology.name}: endpoint {node!r} links straight to {peer!r}; the testbed emulates "
                "hosts on switches (ring, torus and fully-connected topologies are not supported)"
            )
    hosts_in_order = sorted(groups, key=lambda h: min(groups[h]))
    used: set[str] = set()
    hosts, wires = [], []
    first = 0  # the first rank of the next host
    for index, label in enumerate(hosts_in_order):
        ranks = sorted(groups[label])
        if ranks != list(range(first, first + len(ranks))):
            raise TopologyError(
                f"{topology.name}: host {label!r} runs ranks {ranks}; a host's ranks must be consecutive "
                f"in the placement ({first}..{first + len(ranks) - 1})"
            )
        first += len(ranks)
        members = {n for n in topology.placement if rank_of[n] in ranks}
        out = _neighbours(graph, label) - members
        if len(out) != 1 or _kind(graph, next(iter(out))) not in (SWITCH, None):
            raise TopologyError(
                f"{topology.name}: host {label!r} links to {sorted(map(str, out))}; the testbed needs "
                "exactly one link from a host, to a switch"
            )
        (switch,) = out
        hosts.append(
            Host(str(label), hostname_of(label, used), host_address(index), tuple(ranks), str(switch))
        )
        wires.append(_wire(graph, len(wires), label, switch, host=True))
    host_nodes = set(hosts_in_order) | set(topology.placement)
    switches = [n for n in graph.nodes if n not in host_nodes]
    fabric = nx.Graph()
    fabric.add_nodes_from(switches)
    for a, b in graph.edges:
        if a in fabric and b in fabric and not fabric.has_edge(a, b):
            fabric.add_edge(a, b)
            wires.append(_wire(graph, len(wires), a, b, host=False))
    if not nx.is_forest(fabric):
        cycle = nx.find_cycle(fabric)
        raise TopologyError(
            f"{topology.name}: its switches form a cycle ({' - '.join(str(u) for u, _ in cycle)}); the "
            "testbed's bridges need a tree of switches (fat-tree:k=2, or one or two switches)"
        )
    per_host = max(len(host.ranks) for host in hosts)
    return NetworkPlan(topology.name, tuple(hosts), tuple(map(str, switches)), tuple(wires), per_host)


def _wire(graph: nx.DiGraph, index: int, a: object, b: object, host: bool) -> Wire:
    if not graph.has_edge(a, b) or not graph.has_edge(b, a):
        raise TopologyError(f"link {a!r} - {b!r} is one-way; the testbed emulates full-duplex links")
    ab, ba = graph.edges[a, b], graph.edges[b, a]
    return Wire(index, str(a), str(b), ab["bandwidth"], ba["bandwidth"], ab["latency"], ba["latency"], host)


def with_ranks_per_host(
    topology: Topology, ranks: int | str | Sequence[int], local_bandwidth: float = LOCAL_BANDWIDTH
) -> Topology:
    """`topology` with every endpoint turned into a host ('nic' node) running its ranks ('<host>.r<j>'):
    `ranks` on every host (an int), or one count per endpoint in placement order (a list, or a string
    such as '3,1': uneven hosts).

    The ranks reach their host over links of `local_bandwidth` and no latency: the host's own stack, which
    a profile calibrated on the testbed (`commlab calibrate`) times. 1 returns `topology` unchanged."""
    counts = rank_counts(ranks, len(topology.placement))
    if all(count == 1 for count in counts):
        return topology
    graph = nx.DiGraph(topology.graph)
    placement = []
    for node, count in zip(topology.placement, counts, strict=True):
        graph.nodes[node]["kind"] = NIC
        for j in range(count):
            rank = f"{node}.r{j}"
            graph.add_node(rank, kind=NPU, layer=0, **{HOST: str(node)})  # Topology.host_map groups them
            graph.add_edge(rank, node, bandwidth=local_bandwidth, latency=0.0, kind="port")
            graph.add_edge(node, rank, bandwidth=local_bandwidth, latency=0.0, kind="port")
            placement.append(rank)
    for node in graph.nodes:
        graph.nodes[node].setdefault("kind", SWITCH)
    layout = f"{counts[0]} ranks per host" if len(set(counts)) == 1 else f"{','.join(map(str, counts))} ranks"
    graph.graph["name"] = f"{topology.name}, {layout}"
    return Topology(graph, placement, topology.routing, graph.graph["name"])


def rank_counts(ranks: int | str | Sequence[int], hosts: int) -> list[int]:
    """The ranks of each of `hosts` hosts from an int (the same on all), a '3,1' string or a list."""
    accepted = f"an integer >= 1, or {hosts} counts >= 1 separated by commas (one per host, e.g. '3,1')"
    if isinstance(ranks, str):
        text = ranks.strip()
        if not re.fullmatch(r"\d+(\s*,\s*\d+)*", text):
            raise invalid("ranks_per_host", ranks, accepted)
        ranks = [int(part) for part in text.split(",")]
        ranks = ranks[0] if len(ranks) == 1 else ranks
    if isinstance(ranks, bool) or not isinstance(ranks, (int, Sequence)):
        raise invalid("ranks_per_host", ranks, accepted)
    counts = [ranks] * hosts if isinstance(ranks, int) else list(ranks)
    if len(counts) != hosts or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in counts):
        raise invalid("ranks_per_host", ranks, accepted)
    return counts


def topology_toml(topology: Topology) -> str:
    """`topology` as a commlab topology file (nodes, links, placement): `commlab sim --topology FILE`
    then simulates exactly the network the testbed emulates."""
    graph = topology.graph

    def text(value: object) -> str:
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [
        f"name = {text(topology.name)}",
        f"endpoints_forward = {str(bool(graph.graph.get('endpoints_forward', True))).lower()}",
        "placement = [" + ", ".join(text(p) for p in topology.placement) + "]",
    ]
    endpoint = set(topology.endpoints)
    for node in graph.nodes:
        kind = graph.nodes[node].get("kind") or (NPU if node in endpoint else SWITCH)
        lines += ["[[nodes]]", f"name = {text(node)}", f"kind = {text(kind)}"]
        if HOST in graph.nodes[node]:
            lines.append(f"host = {text(graph.nodes[node][HOST])}")
    for a, b, data in graph.edges(data=True):
        lines += [
            "[[links]]",
            f"src = {text(a)}",
            f"dst = {text(b)}",
            f"bandwidth = {data['bandwidth']!r}",
            f"latency = {data['latency']!r}",
            "duplex = false",
        ]
    return "\n".join(lines) + "\n"
