"""Fault matrix: kill a rank of checkpointed training at every dangerous point; each case must end in an
exact resume (final model and optimizer shards bitwise equal to an uninterrupted run) or a clear error.

    python benchmarks/faults.py [--cases start,step,...] [--json out/faults.json]

Training is examples/ddp.py (2 gloo ranks) or examples/train_3d.py (dp 2 x pp 2, 4 ranks) on the tiny GPT,
8 steps, a checkpoint every 2, under `torchrun --max-restarts=3`. Faults are injected with COMMLAB_FAULT
(commlab/parallel/faults.py: SIGKILL at a named phase, step, rank and torchrun attempt); damaged
checkpoints are made by this script between a crashed run (no restarts) and a manual relaunch, as a job
scheduler would restart it. A case FAILS if it ends in neither outcome: a run that finishes with different
weights (lost or corrupted state), or that fails without a CheckpointError naming the problem.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
STEPS, SAVE_EVERY = 8, 2
TINY = [
    "--preset",
    "tiny",
    "--batch-size",
    "8",
    "--eval-every",
    "0",
    "--sample-tokens",
    "0",
    "--log-every",
    "1",
]
TINY += ["--eval-batches", "1", f"--steps={STEPS}", f"--save-every={SAVE_EVERY}"]
SCRIPTS = {"ddp": (["examples/ddp.py"], 2), "3d": (["examples/train_3d.py", "--pp", "2"], 4)}


@dataclass(frozen=True)
class Case:
    """fault: COMMLAB_FAULT for the run; damage: what this script does to the newest checkpoint of a run
    killed at step 7 (no restarts) before relaunching it; relaunch: extra flags of the relaunch."""

    name: str
    what: str
    script: str = "ddp"
    fault: str = ""
    damage: str = ""
    relaunch: tuple[str, ...] = ()


CASES = [
    Case("start", "rank 1 killed at start-up, before loading", fault="start:0:1"),
    Case("step", "rank 1 killed at the start of step 5", fault="step:5:1"),
    Case("collective", "rank 1 killed in step 5's gradient allreduce", fault="collective:5:1"),
    Case(
        "save-temp", "rank 1 killed saving step 6: shard in its temp file, not renamed", fault="save-temp:6:1"
    ),
    Case(
        "save-manifest", "rank 0 killed saving step 6: shards on disk, no manifest", fault="save-manifest:6:0"
    ),
    Case(
        "load",
        "rank 1 killed at step 5; rank 0 killed loading step 4 on restart",
        fault="step:5:1,load:4:0:1",
    ),
    Case("corrupt-shard", "step 6's model shard has a flipped byte; relaunched", damage="corrupt"),
    Case("missing-shard", "step 6's optimizer shard deleted; relaunched", damage="missing-shard"),
    Case("missing-manifest", "step 6's manifest deleted; relaunched", damage="no-manifest"),
    Case("3d-collective", "dp2 x pp2: rank 2 killed in step 5's backward", "3d", fault="collective:5:2"),
    Case(
        "3d-layout",
        "dp2 x pp2 checkpoint relaunched as dp4 x pp1",
        "3d",
        damage="none",
        relaunch=("--pp", "1"),
    ),
]


def train(script: str, directory: Path, restarts: int, fault: str = "", extra: tuple[str, ...] = ()) -> tuple:
    """Run the training under torchrun; returns (exit status, output, seconds)."""
    args, ranks = SCRIPTS[script]
    if extra:  # the relaunch's flags replace the script's own layout flags
        args = args[:1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COMMLAB_FAULT": fault}
    command = [str(TORCHRUN), "--standalone", "--nproc-per-node", str(ranks), f"--max-restarts={restarts}"]
    command += [str(ROOT / args[0]), *args[1:], *extra, *TINY, f"--checkpoint-dir={directory}"]
    start = time.monotonic()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def final_state(directory: Path) -> dict[str, object]:
    """The model and optimizer shards of the last checkpoint (step STEPS)."""
    step_dir = directory / f"step-{STEPS:08d}"
    files = sorted(step_dir.glob("model-*.pt")) + sorted(step_dir.glob("optimizer-*.pt"))
    return {p.name: torch.load(p, weights_only=True) for p in files}


def equal(a: object, b: object) -> bool:
    """Bitwise equality of nested state (tensors compared with torch.equal)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(equal, a, b))
    return a == b


def damage(directory: Path, how: str) -> None:
    """Damage the newest checkpoint (step 6) as the case says."""
    step_dir = directory / "step-00000006"
    if how == "corrupt":
        path = step_dir / "model-pp0-tp0.pt"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "missing-shard":
        (step_dir / "optimizer-pp0-tp0.pt").unlink()
    elif how == "no-manifest":
        (step_dir / "manifest.json").unlink()


def run_case(case: Case, reference: dict, work: Path) -> dict:
    """Run one case; returns its row: what happened, the outcome, seconds."""
    directory = work / case.name
    seconds = 0.0
    if case.damage:
        code, out, took = train(case.script, directory, 0, fault="step:7:1")
        seconds += took
        if code == 0 or not (directory / "step-00000006" / "manifest.json").exists():
            return {"outcome": "FAILED", "detail": f"the crashed run did not leave step 6:\n{out[-1500:]}"}
        damage(directory, case.damage)
        code, out, took = train(case.script, directory, 0, extra=case.relaunch)
    else:
        code, out, took = train(case.script, directory, 3, fault=case.fault)
    seconds += took
    restarts = len(re.findall(r"\[fault\] SIGKILL", out))
    resumed = re.findall(r"resumed from \S+ \(step (\d+)\)", out)
    skipped = re.findall(r"skipping checkpoint: (.*)", out)
    happened = ["killed at step 7 (no restart), damaged, relaunched"] if case.damage else []
    happened += [f"{restarts} SIGKILL(s), torchrun restarted the group"] if restarts else []
    happened += [f"warned: {skipped[0].replace(str(directory), '<dir>')}"] if skipped else []
    happened += (
        [f"resumed from step {resumed[-1]}"] if resumed else (["started from scratch"] if code == 0 else [])
    )
    if code == 0:
        exact = equal(reference, final_state(directory))
        outcome = "exact resume" if exact else "FAILED: final state differs from the uninterrupted run"
        return {"happened": "; ".join(happened), "outcome": outcome, "seconds": seconds}
    error = re.search(r"(CheckpointError: .*)", out)
    if error:
        text = error.group(1).replace(str(directory), "<dir>")
        return {"happened": "; ".join(happened), "outcome": f"clear error: {text}", "seconds": seconds}
    return {
        "happened": "; ".join(happened),
        "outcome": f"FAILED (exit {code}):\n{out[-2000:]}",
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", help=f"comma-separated subset of: {', '.join(c.name for c in CASES)}")
    parser.add_argument("--json", default="out/faults.json", help="result file (default: out/faults.json)")
    args = parser.parse_args()
    names = args.cases.split(",") if args.cases else [c.name for c in CASES]
    unknown = set(names) - {c.name for c in CASES}
    if unknown:
        parser.error(f"--cases {sorted(unknown)} unknown; accepted: {', '.join(c.name for c in CASES)}")
    cases = [c for c in CASES if c.name in names]
    rows = []
    with tempfile.TemporaryDirectory(prefix="commlab-faults-") as tmp:
        work = Path(tmp)
        references = {}
        for script in sorted({c.script for c in cases}):
            code, out, took = train(script, work / f"reference-{script}", 2)
            if code != 0:
                raise SystemExit(f"the uninterrupted {script} run failed:\n{out[-3000:]}")
            references[script] = final_state(work / f"reference-{script}")
            print(f"reference {script}: {took:.1f} s", flush=True)
        for case in cases:
            row = {"case": case.name, "what": case.what, **run_case(case, references[case.script], work)}
            rows.append(row)
            print(
                f"{case.name}: {row['outcome'].splitlines()[0]} ({row.get('seconds', 0):.1f} s)", flush=True
            )
            shutil.rmtree(work / case.name, ignore_errors=True)
    print("\n| case | injected | what happened | outcome | time |\n|---|---|---|---|---|")
    for row in rows:
        cells = [row["case"], row["what"], row.get("happened", ""), row["outcome"].splitlines()[0]]
        print("| " + " | ".join(cells) + f" | {row.get('seconds', 0):.0f} s |")
    record = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "torch": torch.__version__,
        "rows": rows,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    if any(row["outcome"].startswith("FAILED") for row in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
