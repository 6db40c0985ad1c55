"""Exact resume after a crash: SIGKILL a rank of `torchrun --max-restarts` training, let torchrun restart
the group, resume from the newest checkpoint, and end bitwise equal to an uninterrupted run."""

from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.timing

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
STEPS = 8
TINY = ["--preset", "tiny", "--batch-size", "8", "--eval-every", "0", "--sample-tokens", "0"]
TINY += ["--log-every", "1", "--eval-batches", "1", f"--steps={STEPS}"]
TRAIN = [str(ROOT / "examples" / "ddp.py"), *TINY]
TRAIN_3D = [str(ROOT / "examples" / "train_3d.py"), *TINY]


def launch(extra: list[str], restarts: int = 0, train: list[str] = TRAIN, ranks: int = 2) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [str(TORCHRUN), "--standalone", "--nproc-per-node", str(ranks), f"--max-restarts={restarts}"]
    return subprocess.Popen(
        [*command, *train, *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )


def lines_of(proc: subprocess.Popen) -> queue.Queue:
    """The process's output lines, read by a thread so the test can wait with a deadline."""
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def worker_of_rank(parent: int, rank: int) -> int:
    """The pid of the child of `parent` (torchrun) whose environment says RANK=`rank`."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in environ:
            return int(entry)
    raise AssertionError(f"no worker with RANK={rank} under torchrun pid {parent}")


def finish(
    proc: subprocess.Popen, lines: queue.Queue, deadline: float, kill_at: str | None = None, victim: int = 1
) -> str:
    """Collect output until the process ends; SIGKILL rank `victim` once `kill_at` appears in the output."""
    out = []
    while True:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            proc.kill()
            raise AssertionError("training did not finish in time:\n" + "".join(out)) from None
        if line is None:
            break
        out.append(line)
        if kill_at and line.startswith(kill_at):
            os.kill(worker_of_rank(proc.pid, victim), signal.SIGKILL)
            out.append(f"[test] SIGKILL rank {victim} after '{kill_at}'\n")
            kill_at = None
    assert proc.wait(timeout=30) == 0, "".join(out)
    return "".join(out)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this Python")
def test_killed_rank_resumes_bitwise_equal(tmp_path):
    deadline = time.monotonic() + 240
    # A restart of the reference (a rendezvous timeout on a loaded machine) starts it over: same result.
    reference = launch([f"--save-model={tmp_path / 'reference.pt'}"], restarts=2)
    finish(reference, lines_of(reference), deadline)

    kill_step = random.Random(0).randint(3, STEPS - 2)  # a step between two saves, after the first one
    crashed = launch(
        [
            f"--checkpoint-dir={tmp_path / 'checkpoints'}",
            "--save-every=2",
            f"--save-model={tmp_path / 'resumed.pt'}",
        ],
        restarts=3,
    )
    output = finish(crashed, lines_of(crashed), deadline, kill_at=f"step {kill_step:>5}/{STEPS}")
    assert "SIGKILL" in output and "resumed from" in output, output

    expected = torch.load(tmp_path / "reference.pt", weights_only=True)
    got = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, got[name]), name


def final_shards(directory: Path) -> dict[str, object]:
    """The model and optimizer shards of the last checkpoint (step STEPS) in `directory`."""
    step_dir = directory / f"step-{STEPS:08d}"
    files = sorted(step_dir.glob("model-*.pt")) + sorted(step_dir.glob("optimizer-*.pt"))
    assert files, f"no shards in {step_dir}"
    return {f.name: torch.load(f, weights_only=True) for f in files}


def assert_bitwise_equal(expected: object, got: object, where: str) -> None:
    if isinstance(expected, torch.Tensor):
        assert torch.equal(expected, got), where
    elif isinstance(expected, dict):
        assert expected.keys() == got.keys(), where
        for key in expected:
            assert_bitwise_equal(expected[key], got[key], f"{where}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(got), where
        for i, (a, b) in enumerate(zip(expected, got, strict=True)):
            assert_bitwise_equal(a, b, f"{where}[{i}]")
    else:
        assert expected == got, where


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this Python")
def test_killed_rank_of_a_pipeline_resumes_bitwise_equal(tmp_path):
    """train_3d.py as dp 2 x pp 2 (4 ranks): SIGKILL a random rank at a random step; the final model and
    optimizer shards of every (pp, tp) coordinate equal those of an uninterrupted run bit for bit."""
    deadline = time.monotonic() + 240
    layout = ["--pp", "2", "--save-every", "2"]
    reference = launch([*layout, f"--checkpoint-dir={tmp_path / 'reference'}"], 2, TRAIN_3D, ranks=4)
    finish(reference, lines_of(reference), deadline)

    chance = random.Random(1)
    kill_step, victim = chance.randint(3, STEPS - 2), chance.randrange(4)
    crashed = launch([*layout, f"--checkpoint-dir={tmp_path / 'crashed'}"], 3, TRAIN_3D, ranks=4)
    output = finish(crashed, lines_of(crashed), deadline, f"step {kill_step:>5}/{STEPS}", victim)
    assert "SIGKILL" in output and "resumed from" in output, output
    expected, got = final_shards(tmp_path / "reference"), final_shards(tmp_path / "crashed")
    assert sorted(expected) == [
        "model-pp0-tp0.pt",
        "model-pp1-tp0.pt",
        "optimizer-pp0-tp0.pt",
        "optimizer-pp1-tp0.pt",
    ]
    assert_bitwise_equal(expected, got, "shards")
