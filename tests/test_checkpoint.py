"""Sharded checkpoints: round trip, verification errors, incomplete saves skipped, pruning, RNG state."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist

from commlab.parallel.checkpoint import CheckpointError, CheckpointManager, rng_state, set_rng_state

pytestmark = pytest.mark.numerics

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

    rank = dist.get_rank()
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
    save_training(manager, 2, model, opt, extra={"position": 2})
    model, opt = build()
    step, extra = load_training(manager, model, opt)
    assert (step, extra) == (2, {"position": 2})
    train(model, opt, range(2, 4))
    return straight, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("zero", [False, True])
def test_resumed_training_is_bitwise_equal_to_uninterrupted(rank_pools, tmp_path, zero):
    for straight, resumed in rank_pools(2).run(train_and_resume, str(tmp_path), zero):
        for a, b in zip(straight, resumed, strict=True):
            assert torch.equal(a, b)


def build_dp(zero: bool) -> tuple[torch.nn.Module, object]:
    """A tiny GPT with DataParallel and AdamW, or ZeRO-1 AdamW, over the pool's ranks."""
    from commlab.models import GPT, GPTConfig
    from commlab.parallel import DataParallel, ZeroOptimizer

    torch.manual_seed(0)
    module = GPT(GPTConfig.preset("tiny"))
    if zero:
        return module, ZeroOptimizer(module.parameters(), torch.optim.AdamW, lr=1e-2)
    model = DataParallel(module)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def save_under_dp(directory: str, zero: bool) -> tuple[dict, dict]:
    """Two steps on this pool's ranks (each its share of a global batch of 4), then a checkpoint of step 2;
    returns the parameters and this rank's optimizer state as saved."""
    from commlab.parallel.checkpoint import save_training

    rank, world = dist.get_rank(), dist.get_world_size()
    model, opt = build_dp(zero)
    g = torch.Generator().manual_seed(7)
    for _ in range(2):
        tokens = torch.randint(0, 256, (4, 17), generator=g).chunk(world)[rank]
        model(tokens[:, :-1], tokens[:, 1:])[1].backward()
        opt.step()
        opt.zero_grad()
    save_training(CheckpointManager(directory), 2, model, opt, extra={"data": {"position": 2}})
    module = getattr(model, "module", model)
    return {n: p.detach().clone() for n, p in module.named_parameters()}, opt.state_dict()


def load_under_dp(directory: str, zero: bool) -> tuple[int, dict, dict, dict]:
    """A fresh model and optimizer on this pool's ranks, restored from the newest checkpoint."""
    from commlab.parallel.checkpoint import load_training

    model, opt = build_dp(zero)
    step, extra = load_training(CheckpointManager(directory), model, opt)
    module = getattr(model, "module", model)
    return step, extra, {n: p.detach().clone() for n, p in module.named_parameters()}, opt.state_dict()


def flat_state(states: list[dict], key: str, numel: int) -> torch.Tensor:
    """The whole flat ZeRO state `key` of dtype group 0, from every rank's shard, without the padding."""
    return torch.cat([s["optimizer"]["state"][0][key] for s in states])[:numel]


@pytest.mark.parametrize("zero", [False, True], ids=["adamw", "zero"])
@pytest.mark.parametrize("new_dp", [1, 4])
def test_resume_under_another_dp_size_restores_the_saved_state(rank_pools, tmp_path, zero, new_dp):
    saved = rank_pools(2).run(save_under_dp, str(tmp_path), zero)
    loaded = rank_pools(new_dp).run(load_under_dp, str(tmp_path), zero)
    params, _ = saved[0]
    for step, extra, got, _ in loaded:
        assert (step, extra) == (2, {"data": {"position": 2}})
        assert got.keys() == params.keys()
        assert all(torch.equal(got[n], params[n]) for n in params)
    if not zero:  # replicated AdamW: every rank loads the state rank 0 saved
        expected = saved[0][1]["state"]
        for *_, state in loaded:
            assert state["state"].keys() == expected.keys()
            for index, entry in expected.items():
                for key, value in entry.items():
                    assert torch.equal(state["state"][index][key], value), (index, key)
        return
    numel = sum(p.numel() for p in params.values())
    for key in ("exp_avg", "exp_avg_sq"):
        whole = flat_state([state for _, state in saved], key, numel)
        assert whole.abs().sum() > 0
        assert torch.equal(flat_state([state for *_, state in loaded], key, numel), whole), key
    for rank, (*_, state) in enumerate(loaded):
        assert (state["world_size"], state["rank"]) == (new_dp, rank)
        assert torch.equal(
            state["optimizer"]["state"][0]["step"], saved[0][1]["optimizer"]["state"][0]["step"]
        )


def test_data_position_is_the_step_under_any_dp_size():
    """Step k's global batch does not depend on dp: resuming at step k under another dp size trains on the
    global batches the saved run would have (each rank its 1/dp of the rows)."""
    from commlab.models import lm_batch

    data = torch.arange(5000) % 251
    for step in (0, 7):
        whole = lm_batch(data, step, 8, 16, seed=3)
        for world in (2, 4):
            shares = [lm_batch(data, step, 8, 16, 3, rank, world) for rank in range(world)]
            assert torch.equal(torch.cat([x for x, _ in shares]), whole[0])
            assert torch.equal(torch.cat([y for _, y in shares]), whole[1])


def test_layout_mismatch_in_pp_or_tp_is_a_clear_error(rank_pools, tmp_path):
    (message,) = rank_pools(1).run(save_and_load_other_layout, str(tmp_path))
    assert "saved with layout {'dp': 1, 'pp': 2, 'tp': 1, 'zero': 0}" in message, message
    assert "pp differ" in message, message


def save_and_load_other_layout(directory: str) -> str:
    """A checkpoint recorded as pp=2 (one rank standing in for stage 0), loaded by a pp=1 run."""
    from commlab.models import GPT, GPTConfig
    from commlab.parallel.checkpoint import Layout, load_training, save_training

    module = GPT(GPTConfig.preset("tiny"))
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    manager = CheckpointManager(directory)
    save_training(manager, 1, module, opt, Layout(pp=2))
    try:
        load_training(manager, module, opt, Layout())
    except CheckpointError as error:
        return str(error)
    return "loaded"
