"""The MPI transport under mpiexec: tests/mpi_suite.py on 2, 3 and 4 ranks, one launch per world size.

The suite compares every collective x algorithm with MPI's own collectives (all eight dtypes on 2 ranks,
four dtypes on 3 and 4 ranks to keep `make test` short on small machines) and checks layouts, numpy
arrays, async handles, sub-communicators, mismatches and timeouts. Rank 0 reports every rank's failures.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mpi4py")

from commlab.bench.launch import find_mpiexec

pytestmark = pytest.mark.timing

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 240


def run_under_mpiexec(world_size: int, module: str, *args: str, timeout: float = TIMEOUT_S) -> str:
    """stdout of `mpiexec -n N python -m module args` (killed as a process group on timeout)."""
    command = [find_mpiexec(), "-n", str(world_size), sys.executable, "-m", module, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"mpiexec -n {world_size} {module} did not finish in {timeout} s:\n{out}\n{err[-4000:]}")
    assert proc.returncode == 0, f"mpiexec -n {world_size} exited {proc.returncode}:\n{out}\n{err[-4000:]}"
    return out


@pytest.mark.parametrize(("world_size", "scope"), [(2, "full"), (3, "--reduced"), (4, "--reduced")])
def test_mpi_suite(world_size: int, scope: str) -> None:
    out = run_under_mpiexec(world_size, "tests.mpi_suite", *([] if scope == "full" else [scope]))
    lines = [line for line in out.splitlines() if line.startswith("MPI_SUITE ")]
    assert lines, f"no report from rank 0:\n{out}"
    report = json.loads(lines[-1].removeprefix("MPI_SUITE "))
    assert report["world_size"] == world_size
    assert not report["failures"], "\n".join(report["failures"][:40])


def test_data_parallel_trains_alike_under_mpiexec_and_torchrun() -> None:
    """DataParallel on the MPI transport (mpiexec -n 2) gives the losses of the gloo run (torchrun)."""
    mpi = run_under_mpiexec(2, "tests.mpi_ddp", "--backend", "mpi")
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [
        str(torchrun),
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "tests.mpi_ddp",
        "--backend",
        "gloo",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    gloo = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert gloo.returncode == 0, gloo.stderr[-4000:]

    def losses(out: str) -> list[float]:
        return json.loads(
            next(line for line in out.splitlines() if line.startswith("LOSSES ")).split(" ", 1)[1]
        )

    under_mpi, under_torchrun = losses(mpi), losses(gloo.stdout)
    assert len(under_mpi) == len(under_torchrun) == 6
    assert under_mpi == pytest.approx(under_torchrun, rel=1e-6), (under_mpi, under_torchrun)
    assert under_mpi[-1] < under_mpi[0]  # it trains
