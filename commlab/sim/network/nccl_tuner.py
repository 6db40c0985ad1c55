"""NCCL 2.27's tuner: which algorithm and protocol NCCL runs for a collective, and the time it predicts.

A re-implementation, from reading the source, of what NVIDIA/nccl v2.27.7-1 does when it picks how to run a
collective:
- `src/graph/tuning.cc`, `ncclTopoTuneModel`: for every function (broadcast, reduce, allgather,
  reduce-scatter, allreduce), algorithm (tree, ring, CollNet Direct, CollNet Chain, NVLS, NVLS tree, PAT)
  and protocol (LL, LL128, Simple) a bandwidth (GB/s, already converted from bus to algorithm bandwidth)
  and a latency (us), from the topology search's graphs (channels x GB/s per channel) and constant tables;
- `src/graph/tuning.cc`, `ncclTopoGetAlgoTime`: time = latency + bytes / (1000 x bandwidth), with the tree
  correction factors and the ring "plateau" latency;
- `src/enqueue.cc`, `updateCollCostTable` and `topoGetAlgoInfo`: which algorithms are candidates (CollNet
  only with SHARP, NVLS only on NVSwitch systems, NVLS across nodes only with CollNet) and the first
  (algorithm, protocol) of least time.
The graphs (`Graph`: channels, per-channel bandwidth intra and inter node) come from NCCL's topology search
(`src/graph/search.cc`); `graphs_for` models that search's outcome on regular DGX-style nodes rather than
running it (documented on the function). All-to-all is not tuned by NCCL (it is grouped send/receive).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from commlab.errors import invalid

PROTOCOLS = ("LL", "LL128", "Simple")
# NCCL's algorithm order (src/include/device.h NCCL_ALGO_*): ties go to the first, as in topoGetAlgoInfo.
ALGORITHMS = ("tree", "ring", "collnet_direct", "collnet_chain", "nvls", "nvls_tree", "pat")
FUNCTIONS = ("broadcast", "reduce", "allgather", "reduce_scatter", "allreduce")
ARCHES = ("volta", "ampere", "hopper", "blackwell")

# --- Constants of NVIDIA/nccl v2.27.7-1 src/graph/tuning.cc (microseconds, GB/s) ---
# baseLat[algorithm][protocol]; only tree and ring have a base latency.
BASE_LATENCY = {"tree": (6.8, 14.0, 8.4), "ring": (6.6, 14.0, 8.4)}
# hwLat[NVLINK|PCI|NET][algorithm][protocol] (LL, LL128, Simple).
HW_LATENCY = {
    "nvlink": {
        "tree": (0.6, 1.25, 4.0),
        "ring": (0.6, 1.9, 3.4),
        "collnet_direct": (0.0, 0.0, 3.7),
        "collnet_chain": (0.0, 0.0, 2.8),
        "nvls": (0.0, 0.0, 25.0),
        "nvls_tree": (0.0, 0.0, 25.0),
        "pat": (0.0, 0.0, 0.0),
    },
    "pci": {
        "tree": (1.0, 1.9, 4.0),
        "ring": (1.0, 2.5, 5.7),
        "collnet_direct": (0.0, 0.0, 3.7),
        "collnet_chain": (0.0, 0.0, 2.8),
        "nvls": (0.0, 0.0, 0.0),
        "nvls_tree": (0.0, 0.0, 0.0),
        "pat": (0.0, 0.0, 0.0),
    },
    "net": {
        "tree": (5.0, 8.5, 14.0),
        "ring": (2.7, 4.0, 14.0),
        "collnet_direct": (0.0, 0.0, 31.0),
        "collnet_chain": (0.0, 0.0, 30.0),
        "nvls": (0.0, 0.0, 18.0),
        "nvls_tree": (0.0, 0.0, 14.0),
        "pat": (0.0, 0.0, 0.0),
    },
}
# Per architecture (Volta, Ampere, Hopper, Blackwell), indexed by nodes: 1, 2, more (index2 in the file).
# llMaxBws: the LL ceiling; single node by GPU architecture, multi-node by CPU vendor (row 0 Intel, 1 AMD).
LL_MAX_BW = {
    "volta": (39.0, 39.0, 20.4),
    "ampere": (87.7, 22.5, 19.0),
    "hopper": (141.0, 45.0, 35.0),
    "blackwell": (2 * 141.0, 2 * 45.0, 2 * 35.0),
}
PER_CHANNEL_RING_LL128 = {
    "volta": (20.0, 20.0, 20.0),
    "ampere": (20.0, 20.0, 20.0),
    "hopper": (36.7, 36.7, 36.7),
    "blackwell": (2 * 36.7, 2 * 36.7, 2 * 36.7),
}
PER_CHANNEL_TREE_LL128 = {
    "volta": (20.0, 20.0, 20.0),
    "ampere": (20.0, 20.0, 20.0),
    "hopper": (36.7, 36.7, 29.0),
    "blackwell": (2 * 36.7, 2 * 36.7, 2 * 29.0),
}
PER_CHANNEL_TREE = {
    "volta": (26.5, 18.5, 10.0),
    "ampere": (24.0, 23.6, 17.8),
    "hopper": (38.7, 41.4, 36.0),
    "blackwell": (2 * 38.7, 2 * 41.4, 2 * 36.0),
}
# treeCorrectionFactor[protocol][log2(bytes / 64)], 64 B .. 256 MiB (23 entries), allreduce trees only.
TREE_CORRECTION = {
    protocol: tuple(int(tenths) / 10 for tenths in row.split())
    for protocol, row in {
        "LL": "10 10 10 10 9 8 7 7 7 7 6 5 4 4 5 6 7 8 9 10 10 10 10",
        "LL128": "10 10 10 10 10 9 8 8 8 7 6 6 6 6 6 6 8 9 9 9 9 10 10",
        "Simple": "9 9 9 9 9 9 9 8 7 6 6 5 5 5 5 6 7 8 7 7 8 9 9",
    }.items()
}
# getNetOverhead: 1 us on Intel x86 CPUs (2 on AMD, 1 on others), x3 for Simple on inter-node rings.
NET_OVERHEAD_US = {"intel": 1.0, "amd": 2.0}
# src/include/device.h: NCCL_MAX_NVLS_ARITY 32, NCCL_MAX_DIRECT_ARITY 7.
MAX_NVLS_ARITY = 32
MAX_DIRECT_ARITY = 7

# --- src/graph/search.cc v2.27.7-1: the per-channel speeds the topology search tries, highest first ---
SPEEDS_INTRA = {
    "ampere": (40.0, 30.0, 20.0, 18.0, 15.0, 12.0, 10.0, 9.0, 7.0, 6.0, 5.0, 4.0, 3.0),
    "hopper": (60.0, 50.0, 40.0, 30.0, 24.0, 20.0, 15.0, 12.0, 11.0, 6.0, 3.0),
    "blackwell": (90.0, 80.0, 70.0, 60.0, 50.0, 40.0, 30.0, 24.0, 20.0, 19.0, 18.0),
}
SPEEDS_INTER = {
    "ampere": (
        48.0,
        30.0,
        28.0,
        24.0,
        20.0,
        18.0,
        15.0,
        12.0,
        10.0,
        9.0,
        7.0,
        6.0,
        5.0,
        4.0,
        3.0,
        2.4,
        1.2,
        0.24,
        0.12,
    ),
    "hopper": (
        48.0,
        45.0,
        42.0,
        40.0,
        30.0,
        24.0,
        22.0,
        20.0,
        17.5,
        15.0,
        12.0,
        6.0,
        3.0,
        2.4,
        1.2,
        0.24,
        0.12,
    ),
    "blackwell": (
        96.0,
        48.0,
        45.1,
        42.0,
        40.0,
        30.0,
        24.0,
        22.0,
        20.0,
        17.5,
        15.0,
        12.0,
        6.0,
        3.0,
        2.4,
        1.2,
        0.24,
        0.12,
    ),
}
SPEEDS_INTRA["volta"], SPEEDS_INTER["volta"] = SPEEDS_INTRA["ampere"], SPEEDS_INTER["ampere"]
MAX_RING_CHANNELS = 16  # MAXCHANNELS / 2 in src/init.cc for the ring and tree graph searches


@dataclass(frozen=True)
class Graph:
    """One topology-search result: channels, GB/s per channel inside a node and between nodes, the
    net's extra latency (us; `graph->latencyInter`, from the net plugin's properties)."""

    channels: int
    bw_intra: float
    bw_inter: float
    latency_inter: float = 0.0


@dataclass(frozen=True)
class TunerInputs:
    """What NCCL's tuner sees of a communicator: ranks, nodes, architecture and the graphs."""

    nranks: int
    nnodes: int
    arch: str
    graphs: dict[str, Graph]
    nvls: bool = False  # NVSwitch with multicast (NVLink SHARP), Hopper or later
    collnet: bool = False  # a CollNet (SHARP) plugin, NCCL_COLLNET_ENABLE=1
    nvlink_intra: bool = True  # graph typeIntra is NVLink (else PCI)
    cpu_vendor: str = "intel"
    algorithms: frozenset[str] = frozenset(ALGORITHMS)  # NCCL_ALGO: the algorithms NCCL may pick
    protocols: frozenset[str] = frozenset(PROTOCOLS)  # NCCL_PROTO: the protocols NCCL may pick
    extra: dict = field(default_factory=dict)

    @property
    def ppn(self) -> float:
        return self.nranks / self.nnodes


def _speed_at_most(speeds: tuple[float, ...], limit: float) -> float:
    """The first (highest) speed of NCCL's array not above `limit` (its lowest if none)."""
    for s in speeds:
        if s <= limit + 1e-9:
            return s
    return speeds[-1]


def _dup_channels(arch: str, graph: Graph, max_channels: int) -> Graph:
    """ncclTopoDupChannels (search.cc): double the channels, halving their speed, on fast links."""
    if graph.bw_intra < 25.0:
        return graph
    if arch in ("hopper", "blackwell") and graph.bw_intra < 50.0 and graph.channels > 4:
        return graph
    dup = min(graph.channels * 2, max_channels)
    div = -(-dup // graph.channels)
    return Graph(dup, graph.bw_intra / div, graph.bw_inter / div, graph.latency_inter)


def graphs_for(
    arch: str,
    gpus_per_node: int,
    nodes: int,
    nvlink_per_gpu: float,
    nic_speed: float,
    nics_per_node: int,
    net_latency: float = 0.0,
    nvswitch: bool = True,
) -> dict[str, Graph]:
    """The graphs NCCL's search finds on `nodes` DGX-style nodes (GB/s in NCCL's units: NVLink per GPU as
    its per-link figure x links, NIC as line rate / 8).

    A model of search.cc's outcome, not the search: pass 1 stops at the first speed of the architecture's
    array that fits a solution (not above the GPU's NVLink bandwidth on one node, the NIC's across nodes),
    with as many channels as that speed fits (one per NIC across nodes, NVLink bandwidth / speed on one node,
    at most 16); ncclTopoDupChannels then doubles them; the NVLS search needs one channel per GPU on one node
    (minChannels = maxChannels) and one per NIC across nodes and is never doubled. Trees search with the
    aggregate bandwidth x n/(n-1) (non-ring patterns). Rings and trees get the same channels
    (search.cc tries to match them). Pass 2 (raising the speed of a found solution) is not modelled.
    """
    if nodes == 1:
        speeds = SPEEDS_INTRA[arch]
        ring_speed = _speed_at_most(speeds, nvlink_per_gpu)
        ring = Graph(
            max(1, min(MAX_RING_CHANNELS, int(nvlink_per_gpu // ring_speed))), ring_speed, ring_speed
        )
        ring = _dup_channels(arch, ring, 2 * MAX_RING_CHANNELS)
        tree_total = nvlink_per_gpu * gpus_per_node / max(1, gpus_per_node - 1)
        tree_speed = _speed_at_most(speeds, nvlink_per_gpu)
        tree = Graph(max(1, min(MAX_RING_CHANNELS, int(tree_total // tree_speed))), tree_speed, tree_speed)
        tree = _dup_channels(arch, tree, 2 * MAX_RING_CHANNELS)
        heads = min(MAX_NVLS_ARITY, gpus_per_node)
        nvls_speed = _speed_at_most(speeds, min(nvlink_per_gpu, tree_total / heads))
        nvls = Graph(heads, nvls_speed, nvls_speed)
    else:
        speeds = SPEEDS_INTER[arch]
        speed = _speed_at_most(speeds, min(nic_speed, nvlink_per_gpu))
        channels = max(1, min(MAX_RING_CHANNELS, nics_per_node))
        ring = _dup_channels(arch, Graph(channels, speed, speed, net_latency), 2 * MAX_RING_CHANNELS)
        tree = ring
        nvls = Graph(min(MAX_NVLS_ARITY, gpus_per_node, nics_per_node), speed, speed, net_latency)
    collnet = Graph(min(MAX_DIRECT_ARITY + 1, ring.channels), ring.bw_intra, ring.bw_inter, net_latency)
    graphs = {"ring": ring, "tree": tree, "pat": tree, "collnet_direct": collnet, "collnet_chain": collnet}
    if nvswitch and arch in ("hopper", "blackwell"):
        graphs["nvls"] = graphs["nvls_tree"] = nvls
    return graphs


_ENV_NAMES = {
    "tree": "tree", "ring": "ring", "collnetdirect": "collnet_direct", "collnetchain": "collnet_chain",
    "nvls": "nvls", "nvlstree": "nvls_tree", "pat": "pat",
    "ll": "LL", "ll128": "LL128", "simple": "Simple",
}  # fmt: skip


def parse_selection(name: str, text: str | None) -> frozenset[str]:
    """The algorithms (name "NCCL_ALGO") or protocols ("NCCL_PROTO") a setting allows, as NCCL reads it.

    `text`: NCCL's syntax, a comma-separated list ("Ring,Tree"), or "^" and a list to exclude ("^LL128");
    case-insensitive; None or "" allows all. (NCCL >= 2.24 also accepts per-function prefixes such as
    "allreduce:tree"; they are not modelled: such a setting raises an error naming it.)"""
    allowed = {"NCCL_ALGO": ALGORITHMS, "NCCL_PROTO": PROTOCOLS}
    if name not in allowed:
        raise invalid("name", name, list(allowed))
    everything = frozenset(allowed[name])
    if text is None or not text.strip():
        return everything
    exclude = text.strip().startswith("^")
    chosen = set()
    for token in text.strip().lstrip("^").split(","):
        key = token.strip().lower().replace("_", "")
        value = _ENV_NAMES.get(key)
        if value is None or value not in everything:
            raise invalid(
                name, text, f"a comma-separated list of {', '.join(allowed[name])}, or ^ and a list"
            )
        chosen.add(value)
    result = everything - chosen if exclude else frozenset(chosen)
    if not result:
        raise invalid(name, text, "a setting that leaves at least one choice")
    return result


def _index2(nnodes: int) -> int:
    return 0 if nnodes == 1 else 1 if nnodes == 2 else 2


def _enabled(t: TunerInputs, op: str, algorithm: str, protocol: str) -> bool:
    """The candidates NCCL considers (tuning.cc loops and enable matrix; enqueue.cc updateCollCostTable)."""
    if algorithm not in t.graphs or algorithm not in t.algorithms or protocol not in t.protocols:
        return False
    if op in ("broadcast", "reduce") and algorithm != "ring":
        return False
    if op in ("allgather", "reduce_scatter") and algorithm not in ("pat", "ring", "nvls", "collnet_direct"):
        return False
    if op == "allreduce" and algorithm == "pat":
        return False
    if algorithm in ("nvls", "nvls_tree", "collnet_direct", "collnet_chain", "pat") and protocol != "Simple":
        return False
    if algorithm == "pat" and t.nnodes != t.nranks:  # ncclPatEnable: one GPU per node only
        return False
    if algorithm in ("nvls", "nvls_tree") and not t.nvls:
        return False
    if algorithm == "nvls_tree" and t.nnodes == 1:
        return False
    if algorithm in ("collnet_direct", "collnet_chain") and not t.collnet:
        return False
    if algorithm == "nvls" and t.nnodes > 1 and not t.collnet:
        return False
    if algorithm == "collnet_direct" and t.ppn > MAX_DIRECT_ARITY + 1:
        return False
    # NVLS and CollNet Direct allgather/reduce-scatter across nodes need the CollNet plugin's iallgather and
    # ireducescatter with one GPU per head; modelled as unavailable.
    return not (
        algorithm in ("nvls", "collnet_direct") and op in ("allgather", "reduce_scatter") and t.nnodes > 1
    )


def bandwidth(t: TunerInputs, op: str, algorithm: str, protocol: str) -> float:
    """comm->bandwidths[op][algorithm][protocol] (GB/s of algorithm bandwidth), 0 where disabled."""
    if not _enabled(t, op, algorithm, protocol) or t.nranks <= 1:
        return 0.0
    g = t.graphs[algorithm]
    ppn, i2 = t.ppn, _index2(t.nnodes)
    ll_row = t.arch if t.nnodes == 1 else ("ampere" if t.cpu_vendor == "amd" else "volta")
    ll_max = LL_MAX_BW[ll_row][i2]
    collnet = algorithm in ("collnet_direct", "collnet_chain")
    bw = g.bw_intra if t.nnodes <= 2 or collnet else g.bw_inter
    if algorithm == "nvls":
        if op == "allreduce":
            bw = min(g.bw_intra, g.bw_inter)
        else:
            bw = min(g.bw_intra * (ppn - 1) / ppn, g.bw_inter * 0.9)
    if algorithm == "nvls_tree":
        bw = min(g.bw_intra, g.bw_inter if t.nnodes <= 2 else g.bw_inter / 2)
    bus = g.channels * bw
    if algorithm == "ring" and protocol == "LL":
        bus = min(ll_max, bus * 0.5)
    if algorithm == "ring" and protocol == "LL128":
        bus = min(bus * 0.92, g.channels * PER_CHANNEL_RING_LL128[t.arch][i2])
    if algorithm == "tree" and op == "allreduce":
        bus = min(bus * 0.92, g.channels * PER_CHANNEL_TREE[t.arch][i2])
    if algorithm == "tree" and protocol == "LL":
        bus = min(bus / 3.8, ll_max)
    if algorithm == "tree" and protocol == "LL128":
        factor = 7.0 / 9.0 if t.nnodes == 1 else 120.0 / 128.0
        bus = min(bus * factor, g.channels * PER_CHANNEL_TREE_LL128[t.arch][i2])
    if algorithm == "pat":
        bus *= 0.75
    if algorithm == "collnet_direct":
        if op in ("allgather", "reduce_scatter"):
            bus = ppn * min(g.bw_intra, g.bw_inter * 0.9)
        else:
            factor = ppn / g.channels  # GPUs per NIC
            factor -= (factor - 1) / 2
            bus /= factor
            if t.arch in ("hopper", "blackwell"):
                bus *= 0.85
    # Bus to algorithm bandwidth, except non-ring allgather/reduce-scatter.
    if algorithm == "ring" or op not in ("allgather", "reduce_scatter"):
        if algorithm == "ring":
            bus *= t.nranks / _steps(op, t.nranks)
        elif algorithm in ("nvls", "nvls_tree"):
            bus *= 5.0 / 6.0
        else:
            bus *= 0.5
    return bus


def _steps(op: str, nranks: int) -> int:
    if op == "allreduce":
        return 2 * (nranks - 1)
    if op in ("allgather", "reduce_scatter"):
        return nranks - 1
    return nranks


def latency(t: TunerInputs, op: str, algorithm: str, protocol: str) -> float:
    """comm->latencies[op][algorithm][protocol] (us)."""
    p = PROTOCOLS.index(protocol)
    g = t.graphs.get(algorithm, Graph(1, 0.0, 0.0))
    intra_hw = "nvlink" if t.nvlink_intra else "pci"
    base = BASE_LATENCY.get(algorithm, (0.0, 0.0, 0.0))[p]
    intra = HW_LATENCY[intra_hw][algorithm][p]
    inter = HW_LATENCY["net"]["tree" if t.ppn == 1 else algorithm][p] + g.latency_inter
    if protocol == "Simple":
        inter += g.latency_inter  # the flush's extra latency
    n, nodes = t.nranks, t.nnodes
    local = n // nodes
    if algorithm == "ring":
        steps = _steps(op, n)
        hop = HW_LATENCY[intra_hw if nodes == 1 else "net"]["ring"][p]
        if op in ("broadcast", "reduce"):
            # sameChannels is 1 for the ring graphs modelled here (search.cc tries it first).
            return base + hop
        overhead = 0.0
        if nodes > 1:
            overhead = NET_OVERHEAD_US.get(t.cpu_vendor, 1.0) * (3 if protocol == "Simple" else 1)
        intra = max(intra, overhead)
        inter_steps = 0 if nodes == 1 else 2 * (nodes - 1) if op == "allreduce" else nodes - 1
        return base + (steps - inter_steps) * intra + inter_steps * inter
    if algorithm == "tree":
        if op == "allreduce":
            return base + 2 * ((local - 1) * intra + _log2i(nodes) * inter)
        return base
    if algorithm == "collnet_direct":
        return base + 2 * (min(1, local - 1) * intra + (local - 1) * 0.4) + inter
    if algorithm == "collnet_chain":
        return base + 2 * (local - 1) * intra + inter
    if algorithm == "nvls":
        return intra + (inter if nodes > 1 else 0.0)
    if algorithm == "nvls_tree":
        return base + intra + 2 * _log2i(nodes) * inter
    # PAT (allgather / reduce-scatter)
    return 8 + _log2i(nodes) * (inter / 3.5) + n * 2.8


def _log2i(n: int) -> int:
    return max(0, int(n).bit_length() - 1)


def time_parts(
    t: TunerInputs, op: str, algorithm: str, protocol: str, nbytes: int
) -> tuple[float, float] | None:
    """ncclTopoGetAlgoTime's two terms: latency (us, with the ring plateau) and bandwidth (GB/s, with the
    tree correction), or None where the combination is disabled."""
    bw = bandwidth(t, op, algorithm, protocol)
    if bw <= 0:
        return None
    lat = latency(t, op, algorithm, protocol)
    log_size = _log2i(nbytes >> 6) if nbytes >= 64 else -1
    if algorithm == "tree" and op == "allreduce" and 0 <= log_size < 23:
        bw *= TREE_CORRECTION[protocol][log_size]
    channels = t.graphs["ring"].channels
    if (
        algorithm == "ring"
        and protocol == "Simple"
        and t.nnodes > 1
        and op == "allreduce"
        and nbytes / (channels * t.nranks) >= 64
    ):
        lat *= 1.9 if t.arch == "volta" else 1.4  # "plateau effect of ring"
    return lat, bw


def predicted_time_us(t: TunerInputs, op: str, algorithm: str, protocol: str, nbytes: int) -> float | None:
    """ncclTopoGetAlgoTime (us) for one operation, or None where the combination is disabled.

    `nbytes`: NCCL's nBytes, the whole buffer for allgather and reduce-scatter (ncclFuncMaxSendRecvCount)."""
    parts = time_parts(t, op, algorithm, protocol, nbytes)
    if parts is None:
        return None
    lat, bw = parts
    return lat + nbytes / (1000 * bw)


def choose(t: TunerInputs, op: str, nbytes: int) -> tuple[str, str, float]:
    """NCCL's pick: the first (algorithm, protocol) of least predicted time, and that time (us)."""
    if op not in FUNCTIONS:
        raise invalid("op", op, FUNCTIONS)
    if t.nranks == 1:
        return "ring", "Simple", 0.0
    best: tuple[float, str, str] | None = None
    for algorithm in ALGORITHMS:
        for protocol in PROTOCOLS:
            time = predicted_time_us(t, op, algorithm, protocol, nbytes)
            if time is not None and (best is None or time < best[0]):
                best = (time, algorithm, protocol)
    if best is None:
        raise invalid("op", op, "a function with an enabled algorithm on this system")
    return best[1], best[2], best[0]


def arch_of(nvlink_generation: str) -> str:
    """NCCL's architecture row for a GPU, from its NVLink generation (3 Ampere, 4 Hopper, 5 Blackwell)."""
    table = {"nvlink2": "volta", "nvlink3": "ampere", "nvlink4": "hopper", "nvlink5": "blackwell"}
    if nvlink_generation not in table:
        raise invalid("nvlink", nvlink_generation, list(table))
    return table[nvlink_generation]
