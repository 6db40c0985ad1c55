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


def train_and_resume(directory: str, zero: bool) -> tuple[list, list]:
    """4 steps straight vs 2 steps, save, fresh model and optimizer, load, 2 more: returns both results."""
    from commlab.models import GPT, GPTConfig
    from commlab.parallel import DataParallel, ZeroOptimizer
    from commlab.parallel.checkpoint import load_training, save_training

    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(7)
    batches = [torch.randint(0, 256, (4, 17), generator=g) for _ in range(4)]

    def build():
        torch.manual_seed(rank)
        module = GPT(GPTConfig.preset("tiny"))
        if zero:
            return module, ZeroOptimizer(module.parameters(), torch.optim.AdamW, lr=1e-2)
        model = DataParallel(module)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    def train(model, opt, steps):
        for step in steps:
            tokens = batches[step][rank * 2 : (rank + 1) * 2]
            model(tokens[:, :-1], tokens[:, 1:])[1].backward()
            opt.step()
            opt.zero_grad()

    model, opt = build()
    train(model, opt, range(4))
    straight = [p.detach().clone() for p in model.parameters()]

    manager = CheckpointManager(directory)
    model, opt = build()
    train(model, opt, range(2))
    save_training(manager, 2, model, opt, {"dp": world}, extra={"position": 2})
    model, opt = build()
    step, extra = load_training(manager, model, opt, {"dp": world})
    assert (step, extra) == (2, {"position": 2})
    train(model, opt, range(2, 4))
    return straight, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("zero", [False, True])
def test_resumed_training_is_bitwise_equal_to_uninterrupted(rank_pools, tmp_path, zero):
    for straight, resumed in rank_pools(2).run(train_and_resume, str(tmp_path), zero):
        for a, b in zip(straight, resumed, strict=True):
            assert torch.equal(a, b)
