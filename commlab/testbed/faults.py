"""Faults on the wire, injected into a job running on the testbed: a wire taken down or dropping every
frame, or a host's processes killed, while the job's ranks are inside their collectives.

`inject(testbed, fault, command, folder)` starts `command` on every host (torchrun or mpiexec), waits until
every rank has written `folder/ready-<rank>`, injects the fault, writes its time to `folder/fault`, and
collects each rank's report (`folder/report-<rank>.json`, see tests/testbed_fault_job.py: a file, because
under mpiexec the output of a host cut off by the fault never reaches mpiexec). The wire
is mended and every process stopped before it returns; `folder/launchers.json` records each launcher's
exit status just before that (null where it was still running), `folder/host-<i>.log` its output.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from commlab.errors import TestbedError, invalid
from commlab.testbed import launch
from commlab.testbed.testbed import Testbed

FAULTS = ("link-down", "link-drop", "kill-host")


def inject(
    testbed: Testbed,
    fault: str,
    command: list[str],
    folder: Path,
    launcher: str = "torchrun",
    timeout: float = 120.0,
    host: int = 1,
) -> list[dict]:
    """Run `command`, break host `host`'s wire (or kill its processes) once every rank is ready; the
    ranks' reports, in rank order."""
    if fault not in FAULTS:
        raise invalid("fault", fault, FAULTS)
    target = testbed.plan.hosts[host]
    wire = testbed.plan.wire_of(target)
    world = testbed.plan.world_size
    if launcher == "mpi":
        argvs = [launch.mpi_command(testbed, command)]
        env = launch.rank_environment(launch.MPI_ENVIRONMENT)
    else:
        argvs = launch.torchrun_commands(testbed, command)
        env = launch.rank_environment()
    logs = [folder / f"host-{i}.log" for i in range(len(argvs))]
    procs = []
    for argv, log in zip(argvs, logs, strict=True):
        with open(log, "w") as out:  # the child keeps its own descriptor
            procs.append(
                subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            )
    try:
        deadline = time.monotonic() + timeout
        while len(list(folder.glob("ready-*"))) < world:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise TestbedError(f"the ranks did not all start: {_output(logs)[-3000:]}")
            time.sleep(0.05)
        time.sleep(0.2)  # well inside the loop of collectives
        if fault == "kill-host":
            testbed.kill_host(target)
        else:
            testbed.set_wire(wire, "down" if fault == "link-down" else "drop")
        (folder / "fault").write_text(repr(time.time()))
        # every rank off the killed host reports (a wire fault: every rank); then the launchers are
        # stopped: a torchrun agent cut off from the rendezvous store would wait out its own timeouts
        survivors = world - (len(target.ranks) if fault == "kill-host" else 0)
        end = time.monotonic() + timeout
        while time.monotonic() < end and any(p.poll() is None for p in procs):
            if len(list(folder.glob("report-*.json"))) >= survivors:
                break
            time.sleep(0.1)
    finally:
        # how each launcher had ended by then (null: still running, stopped here), for what mpiexec did
        (folder / "launchers.json").write_text(json.dumps([p.poll() for p in procs]))
        launch.stop(procs, grace=5.0)
        testbed.set_wire(wire, "up")
    reports = [json.loads(path.read_text()) for path in folder.glob("report-*.json")]
    return sorted(reports, key=lambda r: r["rank"])


def _output(logs: list[Path]) -> str:
    return "\n".join(log.read_text(errors="replace") for log in logs if log.exists())
