"""What the runtime and the simulator share, defined once and torch-free (the lowest layer with errors.py).

Modules: `ops` (the collective op table: names, rooted or blocked buffers, element counts, busbw
factors), `pipeline_order` (pipeline schedule names and every stage's task order), `layout` (mesh rank
order over dp x pp x tp and the activation checkpointing modes), `attention` (the attention kinds).
`parallel/`, `models/`, `bench/`, `calibrate/`, the collectives layer and both simulators import these,
so the runtime and the simulator cannot drift apart.
"""
