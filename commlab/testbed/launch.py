"""Starting programs on the emulated hosts: one command on one host, or a distributed job on all of them.

- `execute(testbed, host, cmd)`: the command in the host's namespace under its hostname.
- `run(testbed, cmd, launcher="torchrun")`: torchrun on every host, multi-node with a static rendezvous
  on the first host's address (`--nnodes H --node-rank i --nproc-per-node R_i`: host i runs the R_i
  ranks after those of hosts 0..i-1, the placement the topology file gives the simulator);
  `GLOO_SOCKET_IFNAME=eth0`, so gloo's connections leave through the shaped interface. Where hosts run
  different numbers of ranks, $COMMLAB_HOSTS holds the layout ('3,1'): torchrun's LOCAL_WORLD_SIZE
  alone would tell each host only its own count, and the ranks would build different host maps.
- `run(..., launcher="mpi")`: the mpich wheel's hydra `mpiexec`, started on the first host, reaches the
  others through `-launcher ssh -launcher-exec SCRIPT`, where SCRIPT (written per run) drops the
  ssh-style options and runs the proxy in the named host's namespace. `UCX_TLS=tcp`: MPICH's UCX netmod
  otherwise finds the other namespaces' ranks through shared memory (same machine) and bypasses the wire.

`commlab ...` as the command runs this interpreter's `-m commlab.cli`, `python` this interpreter; a `.py`
file runs under torchrun's Python, anything else under `torchrun --no-python`. Every process is in its own
session and is stopped (SIGTERM, then SIGKILL with all it started) when one host fails, on timeout, and
on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time

from commlab.collectives.hosts import HOSTS_ENV
from commlab.errors import TestbedError, invalid
from commlab.testbed.plan import HOST_DEVICE, NetworkPlan
from commlab.testbed.testbed import Testbed

LAUNCHERS = ("torchrun", "mpi")
MASTER_PORT = 29500
DEFAULT_TIMEOUT = 3600.0


def resolve(command: list[str]) -> list[str]:
    """`commlab ARGS` -> this Python's `-m commlab.cli ARGS` (the console script may not be on PATH or
    may belong to another installation), `python ARGS` -> this Python; other commands unchanged."""
    if not command:
        raise invalid("command", command, "a program and its arguments after --")
    if command[0] == "commlab":
        return [sys.executable, "-m", "commlab.cli", *command[1:]]
    if command[0] in ("python", "python3"):
        return [sys.executable, *command[1:]]
    return list(command)


def rank_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["GLOO_SOCKET_IFNAME"] = HOST_DEVICE
    env["TP_SOCKET_IFNAME"] = HOST_DEVICE
    env.update(extra or {})
    return env


def torchrun_commands(testbed: Testbed, command: list[str], max_restarts: int = 0) -> list[list[str]]:
    """One argv per host: torchrun multi-node (static rendezvous on host 0) in the host's namespace."""
    plan = testbed.plan
    first = plan.hosts[0]
    program = command if command and command[0].endswith(".py") else ["--no-python", *resolve(command)]
    argvs = []
    for index, host in enumerate(plan.hosts):
        torchrun = [
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes", str(len(plan.hosts)), "--node-rank", str(index),
            "--nproc-per-node", str(len(host.ranks)),
            "--master-addr", first.hostname, "--master-port", str(MASTER_PORT),
            "--max-restarts", str(max_restarts), *program,
        ]  # fmt: skip
        argvs.append(testbed.command(host, torchrun))
    return argvs


def launcher_script(testbed: Testbed) -> str:
    """The path of the per-run script hydra calls instead of ssh: `SCRIPT [options] HOST COMMAND...`."""
    path = testbed.directory / f"{testbed.run}.launch"
    cases = "\n".join(f"  {h.hostname}|{h.address}) ns={testbed.namespace(h)};;" for h in testbed.plan.hosts)
    path.write_text(
        "#!/bin/sh\n"
        "# hydra's ssh launcher for a commlab testbed: drop ssh options, run in the host's namespace\n"
        'while [ $# -gt 0 ]; do case "$1" in -*) shift;; *) break;; esac; done\n'
        'host="$1"; shift\n'
        'case "$host" in\n'
        f"{cases}\n"
        '  *) echo "commlab testbed: unknown host $host" >&2; exit 255;;\n'
        "esac\n"
        'exec ip netns exec "$ns" unshare --uts -- sh -c \'hostname "$0" && exec sh -c "$*"\' "$host" "$@"\n'
    )
    path.chmod(0o755)
    return str(path)


def mpi_command(testbed: Testbed, command: list[str], mpiexec: str | None = None) -> list[str]:
    """argv running `command` on every host's ranks under hydra, started in host 0's namespace."""
    plan = testbed.plan
    mpiexec = mpiexec or find_mpiexec()
    if plan.uniform:
        hosts = [",".join(h.hostname for h in plan.hosts), "-ppn", str(plan.ranks_per_host)]
    else:  # hydra's host:count form places each host's own number of ranks
        hosts = [",".join(f"{h.hostname}:{len(h.ranks)}" for h in plan.hosts)]
    argv = [
        mpiexec, "-launcher", "ssh", "-launcher-exec", launcher_script(testbed),
        "-hosts", *hosts, "-n", str(plan.world_size), *resolve(command),
    ]  # fmt: skip
    return testbed.command(plan.hosts[0], argv)


MPI_ENVIRONMENT = {"UCX_TLS": "tcp", "UCX_NET_DEVICES": HOST_DEVICE}


def find_mpiexec() -> str:
    """mpiexec beside this Python (the mpich wheel installs it in the venv), else on PATH."""
    import shutil

    here = os.path.dirname(sys.executable)
    found = shutil.which("mpiexec", path=here) or shutil.which("mpiexec")
    if not found:
        raise TestbedError("mpiexec not found beside the Python interpreter or on PATH: pip install mpich")
    return found


def run(
    testbed: Testbed,
    command: list[str],
    launcher: str = "torchrun",
    timeout: float = DEFAULT_TIMEOUT,
    env: dict[str, str] | None = None,
    max_restarts: int = 0,
) -> int:
    """Run `command` on every host (see the module docstring); the exit status of the first failure,
    124 on timeout, 130 on Ctrl-C."""
    if launcher not in LAUNCHERS:
        raise invalid("launcher", launcher, LAUNCHERS)
    if launcher == "mpi":
        argvs = [mpi_command(testbed, command)]
        env = {**MPI_ENVIRONMENT, **(env or {})}
    else:
        argvs = torchrun_commands(testbed, command, max_restarts)
    return wait_all(start(argvs, rank_environment(layout_environment(testbed.plan, env))), timeout)


def layout_environment(plan: NetworkPlan, env: dict[str, str] | None) -> dict[str, str]:
    """`env` with $COMMLAB_HOSTS set to the layout where hosts run different numbers of ranks (the
    caller's own value wins)."""
    return dict(env or {}) if plan.uniform else {HOSTS_ENV: plan.host_spec, **(env or {})}


def execute(testbed: Testbed, host: str, command: list[str], timeout: float = DEFAULT_TIMEOUT) -> int:
    """Run `command` on one host; its exit status."""
    argv = testbed.command(host, resolve(command))
    return wait_all(start([argv], rank_environment()), timeout)


def start(argvs: list[list[str]], env: dict[str, str]) -> list[subprocess.Popen]:
    """Start every argv in its own session (so its whole process tree can be stopped)."""
    procs: list[subprocess.Popen] = []
    try:
        for argv in argvs:
            procs.append(subprocess.Popen(argv, env=env, start_new_session=True))
    except BaseException:
        stop(procs)
        raise
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float) -> int:
    """Wait for every process; on the first failure, timeout or Ctrl-C, stop the rest."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                stop(procs)
                return failed[0]
            if all(c == 0 for c in codes):
                return 0
            if time.monotonic() > deadline:
                stop(procs)
                print(f"commlab testbed: stopped after the {timeout:g} s timeout", file=sys.stderr)
                return 124
            time.sleep(0.05)
    except KeyboardInterrupt:
        stop(procs)
        return 130


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc): torchrun starts its workers in sessions of their own, so
    signalling the launcher's process group alone would orphan them."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop(procs: list[subprocess.Popen], grace: float = 10.0) -> None:
    """SIGTERM each process's session, then SIGKILL it and everything it started that is left after
    `grace` seconds."""
    alive = [p for p in procs if p.poll() is None]
    trees = {p.pid: descendants(p.pid) for p in alive}
    for proc in alive:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    end = time.monotonic() + grace
    for proc in alive:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, end - time.monotonic()))
    for proc in alive:
        for pid in [proc.pid, *trees[proc.pid], *descendants(proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for proc in procs:
        if proc.poll() is None:
            proc.wait()


def describe(argv: list[str]) -> str:
    return shlex.join(argv)
