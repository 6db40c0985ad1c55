"""Hardware presets for the simulator: accelerators, NVLink generations, PCIe and InfiniBand links.

Every number carries its source in a comment. Bandwidths are bytes/s per direction (GB/s = 1e9 bytes/s),
latencies seconds, FLOP/s dense (no sparsity). Where a figure is an assumption rather than a datasheet
value the comment says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from commlab.errors import invalid

GB = 1e9
US = 1e-6
NS = 1e-9


@dataclass(frozen=True)
class Link:
    """A class of link: bandwidth per direction (bytes/s) and the latency of one hop over it (s)."""

    name: str
    bandwidth: float
    latency: float


@dataclass(frozen=True)
class NVLink:
    """An NVLink generation: bandwidth per link and direction, and what NCCL's model expects of a link.

    `nccl_link_bandwidth` is the per-link figure NCCL's topology code uses for its tuning model (protocol
    overhead included); the simulator's NCCL model uses it, datasheet-level models use `link_bandwidth`.
    """

    name: str
    link_bandwidth: float
    nccl_link_bandwidth: float
    hop_latency: float


@dataclass(frozen=True)
class Accelerator:
    """A GPU: dense bf16 FLOP/s, HBM bandwidth and size, NVLink generation and link count, PCIe link."""

    name: str
    bf16_flops: float
    hbm_bandwidth: float
    hbm_bytes: float
    nvlink: NVLink
    nvlink_links: int
    pcie: Link

    @property
    def nvlink_bandwidth(self) -> float:
        """All NVLinks of the GPU together, per direction (bytes/s): what it can push into an NVSwitch."""
        return self.nvlink_links * self.nvlink.link_bandwidth

    @property
    def nccl_nvlink_bandwidth(self) -> float:
        """The same aggregate as NCCL's tuning model counts it (its per-link figure x links)."""
        return self.nvlink_links * self.nvlink.nccl_link_bandwidth


# NVLink 3/4: 25 GB/s per link and direction (50 GB/s bidirectional per link): NVIDIA A100 datasheet
# ("600 GB/s" over 12 links) and H100 datasheet ("900 GB/s" over 18 links), both bidirectional totals.
# NVLink 5: 50 GB/s per link and direction, 18 links, 1.8 TB/s bidirectional (NVIDIA Blackwell datasheet).
# NCCL's per-link model figures: SM80_NVLINK_BW 20.0 and SM90_NVLINK_BW 20.6 GB/s, NVIDIA/nccl
# src/graph/topo.h; SM100 40.1 GB/s in NCCL 2.23+ (same file).
# Hop latency: assumed 0.5 us, the order of NCCL's per-hop NVLink latency for the LL protocol (0.47 us for
# rings in NVIDIA/nccl src/graph/tuning.cc); it includes software and is an upper bound on the wire's.
NVLINK3 = NVLink("nvlink3", 25 * GB, 20.0 * GB, 0.5 * US)
NVLINK4 = NVLink("nvlink4", 25 * GB, 20.6 * GB, 0.5 * US)
NVLINK5 = NVLink("nvlink5", 50 * GB, 40.1 * GB, 0.5 * US)

# PCIe x16: Gen4 16 GT/s and Gen5 32 GT/s per lane, 128b/130b encoding, 16 lanes: 31.5 and 63.0 GB/s per
# direction (PCI-SIG PCI Express Base Specification 4.0 and 5.0). Latency: assumed 1 us through a PCIe
# switch (NCCL's PCI hop latency for rings with the LL protocol is 1.0 us, NVIDIA/nccl tuning.cc).
PCIE_GEN4 = Link("pcie-gen4", 31.5 * GB, 1.0 * US)
PCIE_GEN5 = Link("pcie-gen5", 63.0 * GB, 1.0 * US)

# InfiniBand line rates per port and direction: HDR 200 Gb/s (ConnectX-6), NDR 400 Gb/s (ConnectX-7),
# XDR 800 Gb/s (ConnectX-8): NVIDIA networking product briefs. Latency per hop: assumed 0.5 us (NIC and
# switch port-to-port, order of the "sub-600ns" ConnectX-6 and ~130 ns Quantum switch figures in NVIDIA's
# product briefs).
IB_HDR = Link("ib-hdr", 200e9 / 8, 0.5 * US)
IB_NDR = Link("ib-ndr", 400e9 / 8, 0.5 * US)
IB_XDR = Link("ib-xdr", 800e9 / 8, 0.5 * US)
# RoCE v2 Ethernet NICs: ConnectX-6 Dx 200 GbE and ConnectX-7 400 GbE (NVIDIA Ethernet adapter product
# briefs). Latency per hop: assumed 1 us (RoCE through an Ethernet switch; no per-hop figure is published).
ROCE_200 = Link("roce-200", 200e9 / 8, 1.0 * US)
ROCE_400 = Link("roce-400", 400e9 / 8, 1.0 * US)
# AWS Elastic Fabric Adapter, per EFA device: 100 Gb/s (EFA v1/v2: p4d/p4de have 4 x 100 Gb/s = 400 Gbps
# per node, p5 32 x 100 Gb/s = 3,200 Gbps; AWS EC2 P4 and P5 instance pages) and 200 Gb/s (EFAv3 on p5en:
# 16 x 200 Gb/s = 3,200 Gbps, AWS EC2 P5 instance page). Latency: assumed 5 us per hop (SRD over AWS's
# fabric; AWS publishes no per-hop figure, its EFA documentation calls it "lower and more consistent" than
# TCP).
EFA_100 = Link("efa-100", 100e9 / 8, 5.0 * US)
EFA_200 = Link("efa-200", 200e9 / 8, 5.0 * US)

# A100 SXM4: 312 TFLOP/s dense bf16; 40 GB HBM2 at 1,555 GB/s, 80 GB HBM2e at 2,039 GB/s; 12 NVLink3 links;
# PCIe Gen4 (NVIDIA A100 Tensor Core GPU datasheet).
A100_40GB = Accelerator("a100-40gb", 312e12, 1555 * GB, 40e9, NVLINK3, 12, PCIE_GEN4)
A100_80GB = Accelerator("a100-80gb", 312e12, 2039 * GB, 80e9, NVLINK3, 12, PCIE_GEN4)
# H100 SXM5: 989 TFLOP/s dense bf16 (1,979 with sparsity), 80 GB HBM3 at 3.35 TB/s, 18 NVLink4 links, PCIe
# Gen5 (NVIDIA H100 Tensor Core GPU datasheet).
H100 = Accelerator("h100", 989e12, 3350 * GB, 80e9, NVLINK4, 18, PCIE_GEN5)
# H200 SXM: 989 TFLOP/s dense bf16 (1,979 with sparsity), 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s (18
# NVLink4 links), PCIe Gen5 (NVIDIA H200 Tensor Core GPU datasheet).
H200 = Accelerator("h200", 989e12, 4800 * GB, 141e9, NVLINK4, 18, PCIE_GEN5)
# B200 (HGX B200 / DGX B200): 2.25 PFLOP/s dense bf16 per GPU (HGX B200 datasheet: 36 PFLOPS FP16/BF16
# for 8 GPUs with sparsity, i.e. 4.5 per GPU, half dense), 180 GB HBM3e at 8 TB/s (DGX B200 datasheet:
# 1,440 GB for 8 GPUs, 64 TB/s), 18 NVLink5 links (1.8 TB/s bidirectional), PCIe Gen5 to the host.
B200 = Accelerator("b200", 2.25e15, 8000 * GB, 180e9, NVLINK5, 18, PCIE_GEN5)
# GB200 in an NVL72 rack: 2.5 PFLOP/s dense bf16 per GPU (GB200 NVL72 datasheet: 360 PFLOPS FP16/BF16 with
# sparsity over 72 GPUs, i.e. 5 per GPU, half dense), 186 GB HBM3e at 8 TB/s (13.4 TB and 576 TB/s over 72),
# 18 NVLink5 links into the rack's NVLink switch trays (130 TB/s over 72 GPUs), PCIe Gen5 (C2C to Grace
# is not modelled).
GB200 = Accelerator("gb200", 2.5e15, 8000 * GB, 186e9, NVLINK5, 18, PCIE_GEN5)

ACCELERATORS: dict[str, Accelerator] = {
    "a100": A100_80GB,
    "a100-40gb": A100_40GB,
    "a100-80gb": A100_80GB,
    "h100": H100,
    "h200": H200,
    "b200": B200,
    "gb200": GB200,
}
NVLINKS: dict[str, NVLink] = {n.name: n for n in (NVLINK3, NVLINK4, NVLINK5)}
NICS: dict[str, Link] = {
    "hdr": IB_HDR,
    "ndr": IB_NDR,
    "xdr": IB_XDR,
    "roce-200": ROCE_200,
    "roce-400": ROCE_400,
    "efa-100": EFA_100,
    "efa-200": EFA_200,
}
PCIE: dict[str, Link] = {"gen4": PCIE_GEN4, "gen5": PCIE_GEN5}


def accelerator(name: str | Accelerator) -> Accelerator:
    """The accelerator preset called `name` (an Accelerator passes through)."""
    if isinstance(name, Accelerator):
        return name
    key = str(name).lower()
    if key not in ACCELERATORS:
        raise invalid("gpu", name, list(ACCELERATORS))
    return ACCELERATORS[key]


def nic(name: str | Link) -> Link:
    """The NIC preset (InfiniBand, RoCE, EFA) called `name` (a Link passes through)."""
    if isinstance(name, Link):
        return name
    key = str(name).lower()
    if key not in NICS:
        raise invalid("nic", name, list(NICS))
    return NICS[key]
