"""Fault injection for the fault-tolerance tests and `benchmarks/faults.py`: SIGKILL at a named point.

    COMMLAB_FAULT="phase:step:rank[:attempt],..."   e.g. "save-temp:4:1" or "step:5:1:0,load:4:0:1"

Each entry kills the process of global rank `rank` with SIGKILL when it reaches `phase` at training step
`step`, on torchrun attempt `attempt` (TORCHELASTIC_RESTART_COUNT, default 0; 0 outside torchrun), so a
restarted group does not die again at the same point unless told to. Phases:

- `start`: after the process group is up, before the checkpoint is loaded (step is ignored: use 0);
- `step`: at the beginning of training step `step` (0-based), between two steps' collectives;
- `collective`: during step `step`'s backward, once the last gradient exists, while this rank's gradient
  allreduces are in flight (the examples hook it into the parameter whose gradient comes last);
- `save-temp`: saving the checkpoint of `step`, after a shard's temporary file is written and fsynced,
  before its rename (the step directory then has no manifest);
- `save-manifest`: saving the checkpoint of `step`, after every shard is on disk, before the manifest;
- `load`: loading the checkpoint of `step`, after its shards are read and verified, before they are used.

Without COMMLAB_FAULT every call is a dictionary lookup that finds nothing.
"""

from __future__ import annotations

import os
import signal
import sys

from commlab.errors import invalid

FAULT_ENV = "COMMLAB_FAULT"
PHASES = ("start", "step", "collective", "save-temp", "save-manifest", "load")


def parse_faults(spec: str) -> set[tuple[str, int, int, int]]:
    """The (phase, step, rank, attempt) entries of a COMMLAB_FAULT value; InvalidArgumentError if bad."""
    faults = set()
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        fields = entry.split(":")
        if len(fields) not in (3, 4) or fields[0] not in PHASES or not all(f.isdigit() for f in fields[1:]):
            raise invalid(
                FAULT_ENV, entry, f"phase:step:rank[:attempt] with phase one of {', '.join(PHASES)}"
            )
        step, rank, attempt = (int(f) for f in [*fields[1:], "0"][:3])
        faults.add((fields[0], step, rank, attempt))
    return faults


_FAULTS = parse_faults(os.environ.get(FAULT_ENV, ""))
_ATTEMPT = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def fault_planned(phase: str) -> bool:
    """Whether COMMLAB_FAULT has an entry for `phase` on this attempt (to skip setting up a hook)."""
    return any(p == phase and a == _ATTEMPT for p, _, _, a in _FAULTS)


def fault_point(phase: str, step: int, rank: int) -> None:
    """Kill this process (SIGKILL, no clean-up of any kind) if COMMLAB_FAULT names this point."""
    if (phase, step, rank, _ATTEMPT) in _FAULTS:
        where = f"{phase}:{step} (attempt {_ATTEMPT})"
        print(f"[fault] SIGKILL rank {rank} at {where}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
