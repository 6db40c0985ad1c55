"""The simulator: the collectives' own schedules executed on modelled networks.

    from commlab.sim import Topology, fat_tree, simulate_collective
    result = simulate_collective("allreduce", "ring", Topology(fat_tree(8)), 1 << 30, fidelity="flow")
    result.time, result.busbw, result.busiest_link()

Modules: `topology` (graph builders, `Topology`), `topology_io` (specs and files, ASTRA-sim network.yml),
`routing`, `hardware` (presets), `profile` (software costs), `plan` (schedule -> arrays), `network` (the
engine's interface and the analytic fidelity), `congestion`, `flow`, `maxmin`, `channels` and `nccl`
(modelling NCCL), `trace` (Chrome traces), `plots` (PNG), `cli` (`commlab sim`).
"""

from commlab.sim.network import FIDELITIES, SimResult, simulate, simulate_collective
from commlab.sim.profile import Profile
from commlab.sim.topology import (
    Topology,
    cluster,
    dgx_node,
    fat_tree,
    fully_connected,
    ring,
    switch,
    torus,
)
from commlab.sim.topology_io import load_topology, parse_topology

__all__ = [
    "FIDELITIES",
    "Profile",
    "SimResult",
    "Topology",
    "cluster",
    "dgx_node",
    "fat_tree",
    "fully_connected",
    "load_topology",
    "parse_topology",
    "ring",
    "simulate",
    "simulate_collective",
    "switch",
    "torus",
]
