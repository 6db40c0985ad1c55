"""Sharded checkpoints: round trip, verification errors, incomplete saves skipped, pruning, RNG state."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist

from commlab.parallel.checkpoint import CheckpointError, CheckpointManager, rng_state, set_rng_state

LAYOUT = {"dp": 2, "tp": 1, "pp": 1}


def save_steps(directory: str, steps: list[int], keep: int = 2) -> list[str]:
    """Every rank saves a shard per step; returns the step directories left on disk."""
    rank = dist.get_rank()
    manager = CheckpointManager(directory, keep=keep)
    for step in steps:
        state = {"weight": torch.full((3,), float(step + rank)), "step": step}
        manager.save(step, {f"rank{rank}": state}, LAYOUT)
    return [str(s) for s in manager.steps()]


def load_latest(directory: str) -> tuple[int | None, float]:
    rank = dist.get_rank()
    manager = CheckpointManager(directory)
    step = manager.latest()
    shard = manager.load(step, [f"rank{rank}"], LAYOUT, must_match=("dp",))[f"rank{rank}"]
    return step, shard["weight"][0].item()


def test_save_load_round_trip_and_pruning(rank_pools, tmp_path):
    pool = rank_pools(2)
    kept = pool.run(save_steps, str(tmp_path), [10, 20, 30], keep=2)
    assert kept[0] == ["20", "30"]
    manifest = json.loads((tmp_path / "step-00000030" / "manifest.json").read_text())
    assert manifest["layout"] == LAYOUT and set(manifest["files"]) == {"rank0", "rank1"}
    assert pool.run(load_latest, str(tmp_path)) == [(30, 30.0), (30, 31.0)]


def one_rank(directory: str, damage: str) -> str:
    """Save steps 1 and 2 on a single rank, damage step 2 as told, and report what loading does."""
    manager = CheckpointManager(directory, keep=5)
    for step in (1, 2):
        manager.save(step, {"model": {"w": torch.arange(4.0) + step}}, {"dp": 1})
    step_dir = manager.step_dir(2)
    if damage == "corrupt":
        data = bytearray((step_dir / "model.pt").read_bytes())
        data[-5] ^= 0xFF
        (step_dir / "model.pt").write_bytes(bytes(data))
    elif damage == "missing-file":
        (step_dir / "model.pt").unlink()
    elif damage == "no-manifest":
        (step_dir / "manifest.json").unlink()
    step = manager.latest()
    try:
        manager.load(step, ["model"], {"dp": 4} if damage == "layout" else {"dp": 1}, must_match=("dp",))
    except CheckpointError as error:
        return f"step {step}: {error}"
    if damage == "wrong-name":
        try:
            manager.load(step, ["optimizer"], {"dp": 1})
        except CheckpointError as error:
            return f"step {step}: {error}"
    return f"step {step}: loaded"


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("none", "step 2: loaded"),
        ("corrupt", "corrupted"),
        ("missing-file", "is missing"),
        ("no-manifest", "step 1: loaded"),
        ("layout", "dp=1, this run has dp=4"),
        ("wrong-name", "no shard 'optimizer'"),
    ],
)
def test_damaged_checkpoints_are_named_or_skipped(rank_pools, tmp_path, damage, expected):
    (message,) = rank_pools(1).run(one_rank, str(tmp_path), damage)
    assert expected in message, message


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), np.random.rand(3), random.random())
    torch.testing.assert_close(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2] == expected[2]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        CheckpointManager(tmp_path, keep=0)
