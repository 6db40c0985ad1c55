"""Node presets for the NCCL model: GPUs per NVLink domain, NICs per node, with their sources.

A `NodePreset` is one node as NCCL sees it: `gpus` GPUs on one NVSwitch (or, for GB200 NVL72, the 72 GPUs
of a rack's NVLink domain, which NCCL >= 2.19 treats as one node for NVLS through multi-node NVLink) and
`nics` NICs as NCCL sees them (net devices), each `ports` physical ports of one preset fused by the net
plugin (AWS's aws-ofi-nccl plugin stripes each GPU's traffic over its 4 EFA devices on p5 and 2 on p5en
and presents one NCCL device per GPU; an assumption from the plugin's multi-rail design). Link rates come
from `hardware` (datasheets); the figures here are the counts.
"""

from __future__ import annotations

from dataclasses import dataclass

from commlab.errors import invalid
from commlab.sim.network import hardware


@dataclass(frozen=True)
class NodePreset:
    """One node: GPU and NIC presets, how many of each, whether an NVSwitch joins the GPUs, the CPU vendor
    (NCCL's LL ceilings and net overhead depend on it), the net plugin's extra latency (us, NCCL's
    `latencyInter`), and where the figures come from."""

    name: str
    gpu: str
    gpus: int
    nic: str
    nics: int
    ports: int = 1
    nvswitch: bool = True
    cpu_vendor: str = "intel"
    net_latency_us: float = 0.0
    source: str = ""

    def accelerator(self) -> hardware.Accelerator:
        return hardware.accelerator(self.gpu)

    def nic_link(self) -> hardware.Link:
        """One NCCL net device: the NIC preset's link times the ports fused into it."""
        port = hardware.nic(self.nic)
        return hardware.Link(f"{port.name}x{self.ports}", port.bandwidth * self.ports, port.latency)


SYSTEMS: dict[str, NodePreset] = {
    p.name: p
    for p in (
        NodePreset(
            "dgx-a100",
            "a100-80gb",
            8,
            "hdr",
            8,
            cpu_vendor="amd",
            source="NVIDIA DGX A100 datasheet: 8x A100 80GB, 8x ConnectX-6 200 Gb/s HDR, AMD EPYC",
        ),
        NodePreset(
            "azure-nd-a100-v4",
            "a100-40gb",
            8,
            "hdr",
            8,
            cpu_vendor="amd",
            source="Azure ND A100 v4 docs: 8x A100 40GB on NVSwitch, 8x 200 Gb/s HDR InfiniBand, AMD EPYC",
        ),
        NodePreset(
            "p4d",
            "a100-40gb",
            8,
            "efa-100",
            4,
            source="AWS EC2 P4 page: p4d.24xlarge, 8x A100 40GB, 400 Gbps EFA (4x 100 Gb/s), Intel",
        ),
        NodePreset(
            "p4de",
            "a100-80gb",
            8,
            "efa-100",
            4,
            source="AWS EC2 P4 page: p4de.24xlarge, 8x A100 80GB, 400 Gbps EFA (4x 100 Gb/s), Intel",
        ),
        NodePreset(
            "dgx-h100",
            "h100",
            8,
            "ndr",
            8,
            source="NVIDIA DGX H100 datasheet: 8x H100 SXM5, 4 NVSwitch, 8x ConnectX-7 400 Gb/s NDR, Intel",
        ),
        NodePreset(
            "hgx-h200",
            "h200",
            8,
            "ndr",
            8,
            source="NVIDIA HGX H200 datasheet: 8x H200 SXM on NVSwitch (900 GB/s); 8x 400 Gb/s NDR assumed",
        ),
        NodePreset(
            "p5",
            "h100",
            8,
            "efa-100",
            8,
            ports=4,
            source="AWS EC2 P5 page: p5.48xlarge, 8x H100, 3,200 Gbps EFA (32x 100 Gb/s), AMD EPYC",
            cpu_vendor="amd",
        ),
        NodePreset(
            "p5en",
            "h200",
            8,
            "efa-200",
            8,
            ports=2,
            source="AWS EC2 P5 page: p5en.48xlarge, 8x H200, 3,200 Gbps EFAv3 (16x 200 Gb/s), Intel",
        ),
        NodePreset(
            "a3-mega",
            "h100",
            8,
            "roce-200",
            8,
            source="Google Cloud A3 Mega docs: 8x H100, 8x 200 Gbps GPU NICs (GPUDirect-TCPXO, Ethernet)",
        ),
        NodePreset(
            "dgx-b200",
            "b200",
            8,
            "ndr",
            8,
            source="NVIDIA DGX B200 datasheet: 8x B200, 2 NVSwitch (NVLink5), 8x ConnectX-7 400 Gb/s, Intel",
        ),
        NodePreset(
            "gb200-nvl72",
            "gb200",
            72,
            "ndr",
            72,
            cpu_vendor="arm",
            source="NVIDIA GB200 NVL72 datasheet: 72 Blackwell GPUs in one NVLink domain (130 TB/s), "
            "one 400 Gb/s ConnectX-7 per GPU for the scale-out fabric",
        ),
    )
}


def system(name: str | NodePreset) -> NodePreset:
    """The node preset called `name` (a NodePreset passes through)."""
    if isinstance(name, NodePreset):
        return name
    key = str(name).lower()
    if key not in SYSTEMS:
        raise invalid("system", name, list(SYSTEMS))
    return SYSTEMS[key]
