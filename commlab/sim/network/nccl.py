"""A model of NCCL's allreduce for the simulator: NCCL's own algorithm/protocol choice, then our engine.

NCCL picks, per call, the (algorithm, protocol) its tuning model predicts fastest: time = latency + bytes /
bandwidth for ring and tree with the LL, LL128 and Simple protocols. This module reproduces that tuner
with NCCL 2.7.5's constants (NVIDIA/nccl src/graph/tuning.cc; see shared/reference/collectives-facts.md),
then simulates the chosen algorithm's schedule on a DGX cluster topology with:
- bandwidth: the topology's links scaled by the factor NCCL's tuner applies for that protocol (LL, LL128
  and tree overheads and caps), so the engine sees what the protocol can deliver;
- latency: NCCL's per-hop latency for that algorithm and protocol on the links (NVLink hops inside a node,
  network hops between nodes) and its base latency once per call, plus a launch latency;
- channels: rings run on one channel per NIC across nodes (each channel enters and leaves a node on its
  own rail, alternating direction node by node), as NCCL's rail-aligned rings do; a single node runs one
  ring (all channels share each GPU's NVSwitch link in this model, so their number does not matter);
- trees: the double binary tree over all ranks (commlab's `tree`), pipelined over the segment count its
  cost formula finds best on these links (NCCL pipelines trees in chunks too), one channel per NIC across
  nodes, channel c with every node's GPUs rotated by c so that channels cross between nodes on
  different NICs.
Only allreduce is modelled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from commlab.collectives.algorithms import build_schedule, get_algorithm
from commlab.collectives.schedule import Schedule
from commlab.errors import invalid
from commlab.sim.network import hardware
from commlab.sim.network.analytic import link_model
from commlab.sim.network.channels import merge_channels, relabel
from commlab.sim.network.collective import simulate
from commlab.sim.network.engine import SimResult
from commlab.sim.network.profile import Profile
from commlab.sim.network.topology import Topology, cluster

PROTOCOLS = ("LL", "LL128", "Simple")
ALGORITHMS = ("tree", "ring")
US = 1e-6
# NCCL 2.7.5 tuning constants, microseconds, per protocol (LL, LL128, Simple): NVIDIA/nccl tuning.cc.
BASE_LATENCY = {"tree": (4.4, 4.4, 0.0), "ring": (3.6, 10.0, 8.4)}
HOP_LATENCY = {
    "nvlink": {"tree": (0.52, 1.2, 28.0), "ring": (0.47, 1.9, 3.4)},
    "net": {"tree": (5.0, 8.5, 50.0), "ring": (2.7, 4.0, 9.6)},
}
LL128_MAX_BW_PER_CHANNEL = 16.7  # GB/s, allreduce (same file)
SM80_BUS_BW_CAP = 235.0  # GB/s (same file: "if (compCap80) busBw = std::min(busBw, 235.0f)")
# Tree correction factors per protocol for sizes 64 B .. 128 MiB by powers of two (same file).
TREE_CORRECTION = {
    protocol: tuple(int(tenths) / 10 for tenths in row.split())
    for protocol, row in {
        "LL": "10 10 10 10 9 8 7 7 7 7 6 5 4 4 5 6 7 8 9 10 10 10",
        "LL128": "10 10 10 10 10 9 8 8 8 7 6 6 6 5 6 6 7 7 8 9 9 10",
        "Simple": "9 9 9 9 9 9 9 8 7 6 6 5 5 5 5 5 5 6 6 7 8 9",
    }.items()
}


@dataclass(frozen=True)
class NcclSystem:
    """What NCCL's tuner sees: ranks, nodes, channels, per-channel bandwidth (GB/s), Ampere or not."""

    nranks: int
    nnodes: int
    channels: int
    speed: float  # per channel, GB/s (NCCL's speedIntra; equal to speedInter on these systems)
    sm80: bool = True

    def bus_bandwidth(self, algorithm: str, protocol: str) -> float:
        """NCCL's modelled bus bandwidth (GB/s) for allreduce, before its conversion to algbw."""
        bw = self.channels * self.speed
        if self.sm80:
            bw = min(bw, SM80_BUS_BW_CAP)
        ppn = self.nranks / self.nnodes
        if algorithm == "ring":
            if protocol == "LL":
                bw *= 1 / 4
            elif protocol == "LL128":
                bw = min(bw * (0.7 if ppn < 2 else 0.92), LL128_MAX_BW_PER_CHANNEL * self.channels)
            return bw
        ll128 = self.sm80 and protocol == "LL128"
        max_tree = (105.0 if ll128 else 80.0) if self.nnodes > 2 else (130.0 if ll128 else 110.0)
        bw = min(bw * 0.9, max_tree)
        if protocol == "LL":
            bw *= 1 / 3.8
        elif protocol == "LL128":
            bw = min(
                bw * (7 / 9 if self.nnodes == 1 else 0.915), LL128_MAX_BW_PER_CHANNEL * self.channels * 7 / 9
            )
        return bw

    def latency_us(self, algorithm: str, protocol: str) -> float:
        """NCCL's modelled latency (us) of one allreduce."""
        i = PROTOCOLS.index(protocol)
        intra = HOP_LATENCY["nvlink"][algorithm][i] * (1.8 if self.nnodes > 1 and protocol == "LL" else 1.0)
        inter = HOP_LATENCY["net"][algorithm][i]
        lat = BASE_LATENCY[algorithm][i]
        if algorithm == "ring":
            steps, inter_steps = 2 * (self.nranks - 1), 2 * (self.nnodes - 1)
            return lat + (steps - inter_steps) * intra + inter_steps * inter
        return lat + 2 * ((self.nranks // self.nnodes - 1) * intra + int(math.log2(self.nnodes)) * inter)

    def predicted_time(self, algorithm: str, protocol: str, nbytes: int) -> float:
        """NCCL's own predicted seconds (its tuner's formula, with its tree correction and ring plateau)."""
        bus = self.bus_bandwidth(algorithm, protocol)
        algbw = bus * (0.5 if algorithm == "tree" else self.nranks / (2 * (self.nranks - 1)))
        lat = self.latency_us(algorithm, protocol)
        log_size = int(math.log2(nbytes >> 6)) if nbytes >= 64 else 0
        if algorithm == "tree" and log_size < 22:
            algbw *= TREE_CORRECTION[protocol][log_size]
        if (
            algorithm == "ring"
            and protocol == "Simple"
            and self.nnodes > 1
            and nbytes >= self.nranks / 16 * 65536
        ):
            lat *= 1.9
        return (lat + nbytes / (1000 * algbw)) * US

    def choose(self, nbytes: int) -> tuple[str, str]:
        """The (algorithm, protocol) NCCL's tuner picks for an allreduce of `nbytes`."""
        options = [(self.predicted_time(a, p, nbytes), a, p) for a in ALGORITHMS for p in PROTOCOLS]
        _, algorithm, protocol = min(options)
        return algorithm, protocol


@dataclass(frozen=True)
class NcclCluster:
    """DGX-style nodes and the figures the model needs; bandwidths in bytes/s, launch in seconds."""

    nodes: int
    gpu: str = "a100-40gb"
    nic: str = "hdr"
    gpus_per_node: int = 8
    nvlink_bandwidth: float | None = None  # per GPU; default NCCL's per-link figure x links
    nic_bandwidth: float | None = None  # default the NIC's line rate
    launch: float = 0.0

    @property
    def nranks(self) -> int:
        return self.nodes * self.gpus_per_node

    def nvlink(self) -> float:
        acc = hardware.accelerator(self.gpu)
        return acc.nccl_nvlink_bandwidth if self.nvlink_bandwidth is None else self.nvlink_bandwidth

    def nic_rate(self) -> float:
        return hardware.nic(self.nic).bandwidth if self.nic_bandwidth is None else self.nic_bandwidth

    def system(self) -> NcclSystem:
        """The tuner's view: single node, one channel per NVLink; else one channel per NIC at its speed."""
        acc = hardware.accelerator(self.gpu)
        sm80 = acc.nvlink.name == "nvlink3"
        if self.nodes == 1:
            links = acc.nvlink_links
            return NcclSystem(self.nranks, 1, links, self.nvlink() / links / 1e9, sm80)
        speed = min(self.nic_rate(), self.nvlink() / self.gpus_per_node) / 1e9
        return NcclSystem(self.nranks, self.nodes, self.gpus_per_node, speed, sm80)

    def topology(self, algorithm: str, protocol: str) -> Topology:
        """The cluster with NCCL's hop latencies for (algorithm, protocol) on its links."""
        i = PROTOCOLS.index(protocol)
        intra = HOP_LATENCY["nvlink"][algorithm][i] * (1.8 if self.nodes > 1 and protocol == "LL" else 1.0)
        inter = HOP_LATENCY["net"][algorithm][i]
        graph = cluster(
            self.nodes,
            self.gpu,
            self.nic,
            self.gpus_per_node,
            nvlink_bandwidth=self.nvlink(),
            nic_bandwidth=self.nic_rate(),
        )
        for _, _, data in graph.edges(data=True):
            kind = data.get("kind")
            data["latency"] = {"nvlink": intra / 2, "ib": inter / 2}.get(kind, 0.0) * US
        return Topology(graph, name=f"{graph.graph['name']} (NCCL {algorithm}/{protocol} latencies)")

    def ring_orders(self) -> list[list[int]]:
        """One ring per NIC: channel c enters node 0 at GPU c, leaves at GPU c-1, and alternates direction
        node by node so that every node-to-node hop stays on one rail."""
        g = self.gpus_per_node
        if self.nodes == 1:
            return [list(range(g))]
        orders = []
        for c in range(g):
            forward = [(c + i) % g for i in range(g)]
            backward = [(c - 1 - i) % g for i in range(g)]
            order = []
            for n in range(self.nodes):
                order.extend(n * g + local for local in (forward if n % 2 == 0 else backward))
            orders.append(order)
        return orders

    def schedule(self, algorithm: str, nbytes: int, topology: Topology, profile: Profile) -> Schedule:
        """The allreduce schedule NCCL runs for `algorithm` (rings per channel; one pipelined tree)."""
        if algorithm == "ring":
            base = build_schedule("allreduce", "ring", self.nranks)
            return merge_channels([relabel(base, order) for order in self.ring_orders()])
        channels = 1 if self.nodes == 1 else self.gpus_per_node
        model = link_model(topology, self.nranks, profile)
        segments = get_algorithm("tree").best_segments("allreduce", self.nranks, nbytes / channels, model)
        base = build_schedule("allreduce", "tree", self.nranks, segments=segments)
        if channels == 1:
            return base
        g = self.gpus_per_node
        rotations = [[(i // g) * g + (i % g + c) % g for i in range(self.nranks)] for c in range(channels)]
        return merge_channels([relabel(base, order) for order in rotations])


def simulate_nccl_allreduce(
    system: NcclCluster, nbytes: int, fidelity: str = "flow", dtype: str = "float32"
) -> tuple[SimResult, str, str]:
    """Simulate NCCL's allreduce of `nbytes` on the cluster; returns (result, algorithm, protocol)."""
    if fidelity == "analytic":
        raise invalid("fidelity", fidelity, "'congestion' or 'flow' (the model runs NCCL's schedules)")
    tuner = system.system()
    algorithm, protocol = tuner.choose(nbytes)
    efficiency = tuner.bus_bandwidth(algorithm, protocol) / (tuner.channels * tuner.speed)
    base = BASE_LATENCY[algorithm][PROTOCOLS.index(protocol)] * US
    profile = Profile(launch=system.launch + base, efficiency=min(1.0, efficiency), name=f"nccl {protocol}")
    topology = system.topology(algorithm, protocol)
    result = simulate(
        system.schedule(algorithm, nbytes, topology, profile),
        topology,
        nbytes,
        dtype=dtype,
        fidelity=fidelity,
        profile=profile,
    )
    return result, algorithm, protocol
