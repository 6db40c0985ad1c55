"""Starting the ranks of a benchmark: gloo processes on a local rendezvous, or `mpiexec -n N`.

The ranks run `python -m commlab.bench.worker` with the configuration in an environment variable. Rank 0
writes the table to the launcher's stdout; the launcher waits for all ranks and stops the rest as soon
as one fails, so a broken rank never leaves the others hanging.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable

from commlab.bench.config import CONFIG_ENV, BenchConfig
from commlab.errors import CommlabError, InvalidArgumentError


def detect_launcher() -> str | None:
    """'gloo' inside torchrun (RANK and WORLD_SIZE set), 'mpi' inside mpiexec, else None."""
    if any(key in os.environ for key in ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK")):
        return "mpi"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return "gloo"
    return None


def backend_for(given: str | None, launched: str | None, command: str) -> str:
    """The backend `commlab <command>` runs on: --backend if given, else the launcher's, else gloo; an error
    when --backend names another backend than the launcher it runs inside."""
    backend = given or ("mpi" if launched == "mpi" else "gloo")
    if launched and backend != launched:
        raise InvalidArgumentError(
            f"--backend {backend} is not accepted inside {'mpiexec' if launched == 'mpi' else 'torchrun'}; "
            f"accepted: --backend {launched} (or run commlab {command} on its own to launch {backend} ranks)"
        )
    return backend


def find_mpiexec() -> str:
    """mpiexec beside this Python (the mpich wheel puts it in the venv), else on PATH."""
    here = os.path.dirname(sys.executable)
    found = shutil.which("mpiexec", path=here) or shutil.which("mpiexec")
    if not found:
        raise CommlabError(
            "mpiexec not found beside the Python interpreter or on PATH: pip install 'commlab[mpi]' "
            "(mpi4py and the mpich wheel, which brings mpiexec)"
        )
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rank_environment(config: BenchConfig) -> dict[str, str]:
    env = dict(os.environ)
    env[CONFIG_ENV] = config.to_env()
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def launch(config: BenchConfig, worker: tuple[str, ...] = ("-m", "commlab.bench.worker")) -> int:
    """Start `config.ranks` ranks running `worker`, wait for them; the exit status of the first failure."""
    return start_ranks(config.backend, config.ranks, worker, rank_environment(config))


def start_ranks(backend: str, ranks: int, worker: tuple[str, ...], env: dict[str, str]) -> int:
    """Run `python *worker` on `ranks` ranks (`mpiexec -n`, or gloo processes with torchrun's variables;
    only rank 0 prints), wait for them all; the exit status of the first failure."""
    command = [sys.executable, *worker]
    if backend == "mpi":
        procs = [subprocess.Popen([find_mpiexec(), "-n", str(ranks), *command], env=env)]
    else:
        env = dict(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(ranks))
        procs = []
        for rank in range(ranks):
            rank_env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(ranks))
            out = None if rank == 0 else subprocess.DEVNULL
            procs.append(subprocess.Popen(command, env=rank_env, stdout=out))
    return wait_for(procs)


def worker_main(run: Callable[[], None]) -> int:
    """A rank process's entry: run, and on any error print the traceback and exit 1 (the launcher then
    stops the other ranks)."""
    try:
        run()
    except Exception:
        traceback.print_exc()
        sys.stderr.flush()
        return 1
    return 0


def wait_for(procs: list[subprocess.Popen]) -> int:
    """Wait for every process; when one fails, stop the others and return its exit status."""
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                _stop(procs)
                return failed[0]
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.05)
    except KeyboardInterrupt:
        _stop(procs)
        return 130


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
