"""Starting, watching and stopping the testbed's delay-line relays (commlab.testbed.delay).

A relay is started as its own session (Ctrl-C on `commlab testbed up` does not reach it; the testbed
outlives `up`), its pid goes into the run's state file, and `down` stops it. A pid is only ever signalled
after /proc shows it is still that run's relay, so a recycled pid is never killed.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from commlab.errors import TestbedError
from commlab.testbed import delay

RELAY = (sys.executable, delay.__file__)  # run as a file: importing commlab (torch) takes seconds
START_TIMEOUT = 15.0  # s for a relay to create its two devices
STOP_TIMEOUT = 5.0  # s for a relay to exit on SIGTERM before SIGKILL
_children: dict[int, subprocess.Popen] = {}  # relays this process started, reaped when stopped


def start(
    home: str,
    a: tuple[str, str],
    b: tuple[str, str],
    latency_ab: float,
    latency_ba: float,
    log: Path,
) -> int:
    """Start a relay joining TAP `a` = (namespace, device) to TAP `b`, living in namespace `home`; its pid
    once both devices exist. Its stderr goes to `log`."""
    argv = [*RELAY, home, f"{a[0]}:{a[1]}", f"{b[0]}:{b[1]}", repr(latency_ab), repr(latency_ba)]
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, start_new_session=True
        )
    _children[proc.pid] = proc
    ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT)
    line = proc.stdout.readline().decode().strip() if ready else ""
    proc.stdout.close()
    if line != "ready":
        stop([proc.pid], home)
        tail = log.read_text(errors="replace").strip()[-500:] if log.exists() else ""
        raise TestbedError(
            f"the delay line {a[1]} ({a[0]}) <-> {b[1]} ({b[0]}) did not start within {START_TIMEOUT:g} s"
            f": {tail or 'no message'}"
        )
    return proc.pid


def alive(pid: int, run: str) -> bool:
    """Whether `pid` is a running (not zombie) relay of the run named `run`."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    if state in ("Z", "X"):
        return False
    return delay.__file__.encode() in cmdline and any(arg.startswith(run.encode()) for arg in cmdline)


def stop(pids: list[int], run: str) -> None:
    """SIGTERM the relays among `pids` that are still the run's, wait for them, SIGKILL what remains."""
    mine = [pid for pid in pids if alive(pid, run)]
    for pid in mine:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    for pid in mine:
        while alive(pid, run) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.02)
        if alive(pid, run):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for pid in pids:
        proc = _children.pop(pid, None)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=STOP_TIMEOUT)


def _reap(pid: int) -> None:
    proc = _children.get(pid)
    if proc is not None:
        proc.poll()
