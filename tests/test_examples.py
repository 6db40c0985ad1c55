"""examples/ddp.py trains alike under torchrun (gloo) and mpiexec (MPI transport): the same loss lines."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ARGS = [
    "--preset=tiny",
    "--steps=4",
    "--batch-size=8",
    "--eval-every=0",
    "--sample-tokens=0",
    "--log-every=1",
]


def losses(command: list[str]) -> list[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    return re.findall(r"^step +\d+/\d+ +loss +([0-9.]+)", run.stdout, flags=re.MULTILINE)


@pytest.mark.skipif(not (BIN / "mpiexec").exists(), reason="the mpich wheel's mpiexec is not installed")
def test_ddp_example_same_losses_under_mpiexec_and_torchrun():
    script = str(ROOT / "examples" / "ddp.py")
    gloo = losses([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", script, *ARGS])
    mpi = losses([str(BIN / "mpiexec"), "-n", "2", sys.executable, script, "--backend", "mpi", *ARGS])
    # Exact: on 2 ranks every allreduce algorithm computes x0 + x1, and IEEE addition commutes, so the two
    # transports (whose profiles may make auto pick differently) sum bit for bit alike on any CPU.
    assert len(gloo) == 4 and gloo == mpi, (gloo, mpi)
