"""The network simulator: the collectives' own schedules executed on modelled networks.

    from commlab.sim.network import Topology, fat_tree, simulate_collective
    result = simulate_collective("allreduce", "ring", Topology(fat_tree(8)), 1 << 30, fidelity="flow")
    result.time, result.busbw, result.busiest_link()

Modules, bottom up:
- `units` (sizes, times, bandwidths in text), `hardware` (GPU, NVLink and NIC presets with sources),
  `profile` (software costs: alpha, gamma, launch, efficiency, or a calibrated profile).
- `routing` (shortest-path ECMP and friends on compiled graphs), `topology` (graph builders and
  `Topology`), `topology_io` (builder specs, TOML/YAML/JSON files, ASTRA-sim network.yml).
- `compiled` (`CompiledSchedule`: a schedule as arrays, matched messages and chunks).
- the engines: `engine` (what they share: the routed schedule, `MessageCosts`, `Timing`, `SimResult`,
  rendezvous rounds), `costs` (per-message prices under a calibrated profile), `analytic`
  (closed-form), `congestion` (rendezvous rounds), `flow` (event-driven max-min flows, with `maxmin`).
- `collective` (`simulate`, `simulate_collective`: the fidelity table dispatching to the engines).
- `channels` and `nccl` (modelling NCCL's channels, rings and trees), `trace` (Chrome traces), `plots`
  (PNG, matplotlib imported lazily), `cli` (`commlab sim collective`, `commlab sim topology`).

Imports `commlab.collectives` and `commlab.shared` only. This package's own names below are the
interface the training simulator uses (it imports nothing else from here).
"""

from commlab.sim.network import hardware
from commlab.sim.network.analytic import link_model
from commlab.sim.network.collective import FIDELITIES, simulate, simulate_collective
from commlab.sim.network.engine import SimResult
from commlab.sim.network.hardware import Accelerator, Link
from commlab.sim.network.profile import IDEAL, Profile
from commlab.sim.network.topology import (
    Topology,
    cluster,
    dgx_node,
    fat_tree,
    fully_connected,
    ring,
    switch,
    torus,
)
from commlab.sim.network.topology_io import load_topology, parse_topology

__all__ = [
    "FIDELITIES",
    "IDEAL",
    "Accelerator",
    "Link",
    "Profile",
    "SimResult",
    "Topology",
    "cluster",
    "dgx_node",
    "fat_tree",
    "fully_connected",
    "hardware",
    "link_model",
    "load_topology",
    "parse_topology",
    "ring",
    "simulate",
    "simulate_collective",
    "switch",
    "torus",
]
