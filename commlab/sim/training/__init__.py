"""The training simulator and layout planner: one training step of a GPT-style transformer under DP x TP x
PP on a modelled cluster, and the ranking of every layout that fits (`commlab sim train`, `commlab plan`).

Modules, bottom up:
- `workload` (model specs and presets, `from_gpt_config` for a `commlab.models` GPTConfig, the layout
  and its checks), `compute` (FLOPs and bytes per op, the roofline, the efficiency constants).
- `pipeline` (the dependency simulation of a pipeline schedule; the task orders are
  `commlab.shared.pipeline_order`, the runtime's), `memory` (memory per GPU, Korthikanti et al.).
- `clusters` (cluster presets and the `CollectiveTimer`: the one place that asks the network simulator
  for a collective's time).
- `step` (one training step: compute, collectives, overlap, memory), `step_trace` (Chrome trace).
- `planner` (`plan_layouts` -> `LayoutPlan`), `cli` (`commlab sim train`, `commlab plan`).

Imports `commlab.collectives`, `commlab.shared`, and of the network simulator only the
`commlab.sim.network` package's own names and its hardware presets (tests/test_layers.py checks this).
"""
