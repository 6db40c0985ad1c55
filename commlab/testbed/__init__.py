"""The emulated cluster: simulator topologies built as network namespaces, bridges and shaped veth pairs.

    commlab testbed up --topology switch:n=2,bandwidth=200Mb/s
    commlab testbed run -- commlab bench allreduce -b 1M -e 64M
    commlab testbed down

Modules: `plan` (a topology -> hosts, switches, wires, addresses; pure data), `system` (the `ip`/`tc`
commands, only ever inside the run's own namespaces), `testbed` (`Testbed`: build, state file, teardown,
byte counters, wire and host faults), `delay` and `delay_line` (a wire's latency from a user-space relay
between two TAP devices, where the kernel has no netem), `probe` and `check` (per-wire TCP throughput
and round trips), `launch` (exec, torchrun multi-node, mpiexec across hosts), `faults` (faults injected
into running jobs), `cli` (`commlab testbed`). Imports the simulator's topology modules, never its engines.
"""
