"""`commlab bench`: nccl-tests-style sweeps of one collective, commlab's algorithms beside the native one.

    commlab bench allreduce -b 8 -e 64M -f 2 --algorithm all --backend gloo -n 4 --check

Launched on its own, it starts `-n` ranks itself (gloo: one process per rank on a local TCP rendezvous;
mpi: `mpiexec -n N`); under torchrun or mpiexec it runs in the ranks it finds. Rank 0 prints the
nccl-tests table (size, count, type, redop, root, time, algbw, busbw, #wrong) plus the native collective's
time and busbw and the ratio native time / commlab time, and an average busbw footer; `--json FILE` keeps
every row and sample with the machine description, `--plot FILE.png` draws busbw against size.

Modules: `config` (the sweep's configuration), `cli` (the command line), `launch` (starting ranks),
`worker` (what every rank runs: buffers, timing, the data check), `report` (table, JSON, plot, machine
description). The busbw factors and element counts are `commlab.shared.ops`'.
"""
