"""Calibrated profiles shipped with commlab: `gloo.json` and `mpi.json`, one per backend.

Written by `commlab calibrate --backend gloo|mpi -n 4 -o commlab/profiles/<backend>.json` on the
development machine (its description is inside each file); `algorithm="auto"` uses them unless
$COMMLAB_PROFILE names another (see `commlab.collectives.calibration`).
"""
