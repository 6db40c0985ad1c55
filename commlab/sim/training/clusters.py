"""Clusters for training simulation, and the cache that times their collectives.

A `ClusterSpec` is DGX-style nodes (a hardware preset GPU, NVSwitch, one InfiniBand NIC per GPU) on the
rail-optimized fabric of `commlab.sim.network.cluster`. `CollectiveTimer` times a collective over a
group of global ranks by running the algorithm the cost model picks through the network simulator's
`simulate_collective` on that topology (the one interface the training side uses), and remembers the
answer per (op, bytes, group shape): groups placed alike (same pattern of nodes, GPUs within nodes and
leaf switches) take the same time, so a step with thousands of groups simulates a handful of distinct
collectives.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from commlab.collectives.algorithms import algorithms_for, get_algorithm
from commlab.errors import invalid
from commlab.sim.network import (
    FIDELITIES,
    Profile,
    Topology,
    cluster,
    hardware,
    link_model,
    simulate_collective,
)

FLOW_RANK_LIMIT = 64  # fidelity "auto": the flow engine up to this many ranks in a group, analytic above


@dataclass(frozen=True)
class ClusterSpec:
    """DGX-style nodes: the GPU and NIC presets, GPUs per node, nodes per leaf switch of each rail."""

    name: str
    gpu: hardware.Accelerator
    nic: hardware.Link
    gpus_per_node: int = 8
    leaf_ports: int = 32

    def nodes_for(self, gpus: int) -> int:
        return -(-gpus // self.gpus_per_node)

    def topology(self, gpus: int) -> Topology:
        """The fabric of just enough nodes for `gpus` GPUs."""
        graph = cluster(self.nodes_for(gpus), self.gpu, self.nic, self.gpus_per_node, self.leaf_ports)
        return Topology(graph, name=f"{self.name} x{self.nodes_for(gpus)} nodes")

    def describe(self) -> str:
        return (
            f"{self.name}: {self.gpus_per_node}x {self.gpu.name} per node "
            f"(NVLink {self.gpu.nvlink_bandwidth / 1e9:g} GB/s per GPU), "
            f"{self.gpus_per_node}x {self.nic.name} ({self.nic.bandwidth * 8 / 1e9:g} Gb/s) per node"
        )


# DGX A100 (80 GB): 8 A100-SXM4-80GB on NVSwitch (NVLink3, 600 GB/s bidirectional per GPU), 8 ConnectX-6
# HDR 200 Gb/s compute NICs per node (NVIDIA DGX A100 datasheet; Selene is built of these). DGX H100:
# 8 H100-SXM5 (NVLink4, 900 GB/s), 8 ConnectX-7 NDR 400 Gb/s (NVIDIA DGX H100 datasheet). DGX H200: as
# DGX H100 with H200 GPUs (NVIDIA DGX H200 datasheet).
CLUSTERS: dict[str, ClusterSpec] = {
    c.name: c
    for c in (
        ClusterSpec("dgx-a100", hardware.A100_80GB, hardware.IB_HDR),
        ClusterSpec("dgx-a100-40gb", hardware.A100_40GB, hardware.IB_HDR),
        ClusterSpec("dgx-h100", hardware.H100, hardware.IB_NDR),
        ClusterSpec("dgx-h200", hardware.H200, hardware.IB_NDR),
    )
}


def cluster_spec(name: str | ClusterSpec) -> ClusterSpec:
    """The cluster preset called `name` (a ClusterSpec passes through)."""
    if isinstance(name, ClusterSpec):
        return name
    key = str(name).lower()
    if key not in CLUSTERS:
        raise invalid("cluster", name, list(CLUSTERS))
    return CLUSTERS[key]


@dataclass
class CollectiveTimer:
    """Times collectives and point-to-point transfers between global ranks on a cluster, with a cache."""

    cluster: ClusterSpec
    gpus: int
    profile: Profile
    fidelity: str = "auto"
    topology: Topology = field(init=False, repr=False)
    _times: dict = field(default_factory=dict, init=False, repr=False)
    _placed: dict = field(default_factory=dict, init=False, repr=False)
    _shapes: dict = field(default_factory=dict, init=False, repr=False)
    simulated: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.fidelity != "auto" and self.fidelity not in FIDELITIES:
            raise invalid("fidelity", self.fidelity, ("auto", *FIDELITIES))
        self.topology = self.cluster.topology(self.gpus)

    def shape(self, ranks: tuple[int, ...]) -> tuple:
        """Where a group sits, up to renaming nodes, GPU slots and leaf switches (the fabric's symmetries)."""
        hit = self._shapes.get(ranks)
        if hit is not None:
            return hit
        g, ports = self.cluster.gpus_per_node, self.cluster.leaf_ports
        nodes: dict[int, int] = {}
        slots: dict[int, int] = {}
        leaves: dict[int, int] = {}
        key = []
        for r in ranks:
            node = r // g
            key.append(
                (
                    nodes.setdefault(node, len(nodes)),
                    slots.setdefault(r % g, len(slots)),
                    leaves.setdefault(node // ports, len(leaves)),
                )
            )
        self._shapes[ranks] = shape = tuple(key)
        return shape

    def collective(self, op: str, ranks: tuple[int, ...], nbytes: float) -> float:
        """Seconds for `op` over `ranks` (global ranks, in group order) on a buffer of `nbytes` (bf16):
        the faster of the flat algorithm and, for groups with several GPUs in each of several nodes, the
        hierarchical one (inside nodes, then across nodes on every rail at once, as NCCL's multi-ring)."""
        if len(ranks) == 1 or nbytes <= 0:
            return 0.0
        shape = self.shape(ranks)
        key = (op, int(nbytes), shape)
        hit = self._times.get(key)
        if hit is None:
            hit = self._flat(op, ranks, nbytes, shape)
            split = self._hierarchy(ranks)
            if split is not None:
                hit = min(hit, self._hierarchical(op, *split, nbytes))
            self._times[key] = hit
        return hit

    def _hierarchy(self, ranks: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """(the group's ranks in its first node, one rank per node on the first one's slot) when every
        node holds the same number (> 1) of the group's GPUs and there are several nodes; else None."""
        g = self.cluster.gpus_per_node
        by_node: dict[int, list[int]] = {}
        for r in ranks:
            by_node.setdefault(r // g, []).append(r)
        counts = {len(v) for v in by_node.values()}
        if len(by_node) < 2 or len(counts) != 1 or counts == {1}:
            return None
        first = next(iter(by_node.values()))
        slot = first[0] % g
        if any(n * g + slot not in members for n, members in by_node.items()):
            return None
        return tuple(first), tuple(n * g + slot for n in by_node)

    def _hierarchical(self, op: str, local: tuple[int, ...], across: tuple[int, ...], nbytes: float) -> float:
        """Reduce-scatter in the node, the op across nodes on 1/g of the data (all rails at once),
        allgather in the node; reduce-scatter and allgather keep their halves."""
        share = nbytes / len(local)
        if op == "allreduce":
            return (
                self.collective("reduce_scatter", local, nbytes)
                + self.collective("allreduce", across, share)
                + self.collective("allgather", local, nbytes)
            )
        if op == "reduce_scatter":
            return self.collective("reduce_scatter", local, nbytes) + self.collective(op, across, share)
        if op == "allgather":
            return self.collective(op, across, share) + self.collective("allgather", local, nbytes)
        return float("inf")

    def _flat(self, op: str, ranks: tuple[int, ...], nbytes: float, shape: tuple) -> float:
        """The group's collective run flat, by the algorithm the cost model picks."""
        topology = self._placed.get(shape)
        if topology is None:
            topology = self.topology.with_placement([self.topology.placement[r] for r in ranks])
            self._placed[shape] = topology
        p = len(ranks)
        fidelity = self.fidelity
        if fidelity == "auto":
            fidelity = "flow" if p <= FLOW_RANK_LIMIT else "analytic"
        algorithm = self._choose(op, p, nbytes, topology)
        result = simulate_collective(
            op, algorithm, topology, int(nbytes), dtype="bfloat16", fidelity=fidelity, profile=self.profile
        )
        self.simulated += 1
        return result.time

    def _choose(self, op: str, p: int, nbytes: float, topology: Topology) -> str:
        """The algorithm with the lowest closed-form cost on this group's links (what `auto` would pick)."""
        model = link_model(topology, p, self.profile)
        best, best_time = "ring", float("inf")
        for name in algorithms_for(op, topology_aware=False):  # the validated flat model (docs)
            if name == "direct" and p > 8:
                continue  # all-to-all messages: never chosen at scale, and costly to simulate
            entry = get_algorithm(name)
            segments = entry.best_segments(op, p, nbytes, model)
            time = entry.cost(op, p, nbytes, model, segments)
            if time < best_time:
                best, best_time = name, time
        return best

    def send(self, src: int, dst: int, nbytes: float) -> float:
        """Seconds to move `nbytes` from global rank `src` to `dst` (route latency + bytes over its
        bottleneck link, plus the profile's per-message and launch costs)."""
        if src == dst or nbytes <= 0:
            return 0.0
        key = ("send", int(nbytes), self.shape((src, dst)))
        hit = self._times.get(key)
        if hit is not None:
            return hit
        routes = self.topology.routes(np.array([src]), np.array([dst]))
        bandwidth = float(routes.bandwidth[0]) * self.profile.efficiency
        time = self.profile.launch + self.profile.alpha + float(routes.latency[0]) + nbytes / bandwidth
        self._times[key] = time
        return time
