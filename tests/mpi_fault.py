"""A rank that dies in the middle of commlab collectives on the MPI transport, run by tests/test_fault.py.

    mpiexec -disable-auto-cleanup -n 2 python -m tests.mpi_fault exit REPORT  # survivor: timeout error
    mpiexec -n 2 python -m tests.mpi_fault kill REPORT                       # mpiexec ends the job

Both ranks run 4 MiB ring allreduces (timeout TIMEOUT_S each) for up to 60 s; after DIE_AFTER_S rank 1
leaves from a timer thread, so it dies inside a collective: `exit` with os._exit(17), `kill` with SIGKILL.
The survivor writes `MPI_FAULT {json}` (the error it got and how long after the death) to the file REPORT,
not stdout (MPI_Abort may end mpiexec before it forwards the output), then ends the job with MPI_Abort:
MPI_Finalize would wait for the dead peer forever.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from mpi4py import MPI

import commlab
from commlab.errors import CommlabError

TIMEOUT_S = 5.0
DIE_AFTER_S = 0.5


def main() -> None:
    how, report_path = sys.argv[1], sys.argv[2]
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    x = torch.ones(1 << 20)
    commlab.all_reduce(x)  # the communicator and its duplicate exist on both ranks
    comm.Barrier()
    died_at = time.monotonic() + DIE_AFTER_S  # both ranks left the barrier within microseconds
    if rank == 1:
        die = (lambda: os._exit(17)) if how == "exit" else (lambda: os.kill(os.getpid(), signal.SIGKILL))
        threading.Timer(DIE_AFTER_S, die).start()
    calls = 0
    try:
        while time.monotonic() < died_at + 60:
            commlab.all_reduce(x, algorithm="ring", timeout=TIMEOUT_S)
            calls += 1
        report = {"error": None}
    except CommlabError as error:
        report = {"error": f"{type(error).__name__}: {error}"}
    report.update(rank=rank, calls=calls, seconds_after_death=round(time.monotonic() - died_at, 2))
    with open(report_path, "w") as out:
        out.write("MPI_FAULT " + json.dumps(report) + "\n")
        out.flush()
        os.fsync(out.fileno())
    comm.Abort(3)


if __name__ == "__main__":
    main()
