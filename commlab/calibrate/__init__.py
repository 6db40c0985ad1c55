"""`commlab calibrate`: measure a live transport on this host and save a profile for the simulator and auto.

    commlab calibrate --backend gloo -n 4 [-o gloo.json] [--quick]

Launched on its own it starts `-n` ranks (gloo: local processes on a TCP rendezvous; mpi: `mpiexec -n`);
under torchrun or mpiexec it runs in the ranks it finds. The ranks time messages through commlab's own
executor (`measure`), rank 0 fits alpha, beta (piecewise by size) and gamma (`fit`, `profile`), writes the
profile (`commlab.collectives.calibration` is its format) and prints the fit quality.

Modules: `config` (the configuration), `cli` (the command line), `measure` (what every rank runs),
`fit` (least squares), `profile` (measurements -> Calibration, the quality report), `worker` (the rank
entry point), `tune` (`commlab tune --show`).
"""
