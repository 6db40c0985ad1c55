"""Faults on the emulated wire: what every surviving rank sees, on gloo and on MPI.

    sudo python benchmarks/testbed_faults.py [--timeout 5]

2 emulated hosts x 2 ranks on one switch (200 Mbit/s), each rank in a loop of 1 MiB ring allreduces
(tests/testbed_fault_job.py) with a short timeout; once every rank is in the loop, host 1's wire goes
down (`ip link set down` on its switch port), or its bridge port drops every frame (what 100% loss looks
like: the link stays up), or every process on host 1 is SIGKILLed. Each surviving rank's error type,
message and the seconds from the fault to the error are printed as a markdown table (pasted into
docs/fault_tolerance.md) and written to benchmarks/results/testbed_faults.json.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def short(message: str) -> str:
    """The commlab part of an error message (gloo's own text after it is cut)."""
    message = re.sub(r"\[/__w/pytorch[^\]]*\] ", "", message)
    return message.split(". This is typically")[0][:170]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=5.0, help="the ranks' collective timeout (s)")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "testbed_faults.json"))
    args = parser.parse_args()
    from commlab.testbed.faults import FAULTS, inject
    from commlab.testbed.testbed import Testbed

    rows = []
    with Testbed.up("switch:n=2,bandwidth=200Mb/s", 2, directory=Path(tempfile.mkdtemp())) as testbed:
        for launcher in ("torchrun", "mpi"):
            for fault in FAULTS:
                folder = Path(tempfile.mkdtemp())
                job = ["python", str(ROOT / "tests" / "testbed_fault_job.py"), str(folder), str(args.timeout)]
                job += ["mpi"] if launcher == "mpi" else []
                reports = inject(testbed, fault, job, folder, launcher=launcher, timeout=120)
                ended = json.loads((folder / "launchers.json").read_text())
                hydra = [line for line in _log(folder).splitlines() if "assert" in line]
                rows.append({"launcher": launcher, "fault": fault, "reports": reports, "launchers": ended,
                             "launcher_error": hydra[0] if hydra else ""})  # fmt: skip
                print(f"{launcher} {fault}: {len(reports)} reports", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=1))
    backend = {"torchrun": "gloo (torchrun)", "mpi": "MPI (mpiexec, UCX_TLS=tcp)"}
    print(
        "| backend | fault on host 1 | ranks reporting | error | seconds after the fault | example message |"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        reports = row["reports"]
        errors = sorted({r["error"] for r in reports}) or [
            f"none: the launcher ended the job first (exit status {row['launchers']})"
        ]
        after = [r["after_fault"] for r in reports if "after_fault" in r]
        timing = f"{min(after):.2f}-{max(after):.2f}" if after else "-"
        ranks = ", ".join(str(r["rank"]) for r in reports) or "-"
        example = short(reports[0]["message"]) if reports else row["launcher_error"] or "-"
        print(f"| {backend[row['launcher']]} | {row['fault']} | {ranks} | {', '.join(errors)} | {timing} | "
              f"`{example}` |")  # fmt: skip
    spread = [r["after_fault"] for row in rows for r in row["reports"] if "after_fault" in r]
    if spread:
        print(
            f"\nmedian seconds from fault to error: {statistics.median(spread):.2f} "
            f"(timeout {args.timeout:g} s)"
        )
    return 0


def _log(folder: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(folder.glob("host-*.log")))


if __name__ == "__main__":
    sys.exit(main())
