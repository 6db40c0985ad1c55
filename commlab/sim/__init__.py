"""The simulator, two subjects in two subpackages:

- `commlab.sim.network`: the collectives' own schedules executed on modelled networks (topologies,
  hardware presets, routing, the compiled schedule, the analytic / congestion / flow engines behind one
  fidelity table, the NCCL model, traces and plots).
- `commlab.sim.training`: one training step under DP x TP x PP (workload, compute, memory, pipeline
  schedules, the step) and the layout planner; it times collectives through the network side's
  interface (`commlab.sim.network`'s own names) by one `CollectiveTimer`.

`commlab.sim.cli` joins both under `commlab sim`. The names below are the network simulator's, kept here
so `from commlab.sim import Topology, fat_tree, simulate_collective` reads as before:

    from commlab.sim import Topology, fat_tree, simulate_collective
    result = simulate_collective("allreduce", "ring", Topology(fat_tree(8)), 1 << 30, fidelity="flow")
    result.time, result.busbw, result.busiest_link()
"""

from commlab.sim.network import (
    FIDELITIES,
    Profile,
    SimResult,
    Topology,
    cluster,
    dgx_node,
    fat_tree,
    fully_connected,
    load_topology,
    parse_topology,
    ring,
    simulate,
    simulate_collective,
    switch,
    torus,
)

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
