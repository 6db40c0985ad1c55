"""A rank of the wire-fault runs: ring allreduces in a loop until one fails; then one JSON line and exit.

    commlab testbed run [--launcher mpi] -- python tests/testbed_fault_job.py DIR TIMEOUT [mpi]

Each rank warms up, writes DIR/ready-<rank>, then loops. The driver (tests/test_testbed.py,
benchmarks/testbed_faults.py) waits for every ready file, breaks the wire or kills a host, and writes
DIR/fault holding the time it did. The first call that fails prints
`FAULT {"rank", "error", "message", "call_seconds", "after_fault"}` and writes it to
DIR/report-<rank>.json (its type, text, how long the failing
call ran, and how long after the fault it gave up) and the process exits at once: after a timeout the
group is unusable, and MPI_Finalize would wait for the lost peer forever.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

import commlab

ELEMENTS = 1 << 18  # 1 MiB of float32: every call is on the wire for tens of milliseconds
LIMIT = 120.0  # seconds the loop runs at most without a fault
START = 120.0  # seconds for joining the group and the warm-up (a loaded machine starts ranks slowly)


def main(folder: str, timeout: float, backend: str) -> int:
    if backend == "mpi":
        from mpi4py import MPI

        from commlab.collectives.mpi import MPITransport

        comm = commlab.Communicator(MPITransport(MPI.COMM_WORLD, timeout=START))
        rank = MPI.COMM_WORLD.Get_rank()
    else:
        import torch.distributed as dist

        dist.init_process_group("gloo", timeout=timedelta(seconds=START))
        comm = commlab.communicator(None)
        rank = dist.get_rank()
    data = torch.ones(ELEMENTS)
    for _ in range(2):
        commlab.all_reduce(data, group=comm, algorithm="ring", timeout=START)  # ranks start unevenly
    Path(folder, f"ready-{rank}").write_text(str(time.time()))
    end = time.monotonic() + LIMIT
    while time.monotonic() < end:
        start = time.monotonic()
        try:  # check=False: the error then names the transfer and the peer, not the argument check
            commlab.all_reduce(data, group=comm, algorithm="ring", timeout=timeout, check=False)
        except Exception as error:  # report whatever it is: the driver judges the type
            fault = Path(folder, "fault")
            injected = float(fault.read_text()) if fault.exists() else float("nan")
            record = {
                "rank": rank,
                "error": type(error).__name__,
                "message": str(error),
                "call_seconds": time.monotonic() - start,
                "after_fault": time.time() - injected,
            }
            # a file too: under mpiexec, a host cut off by the fault cannot send its output to mpiexec
            Path(folder, f"report-{rank}.json").write_text(json.dumps(record))
            print("FAULT " + json.dumps(record), flush=True)
            os._exit(0)
        data.fill_(1.0)
    print(f"FAULT {json.dumps({'rank': rank, 'error': 'none', 'message': 'no failure'})}", flush=True)
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], float(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "gloo"))
