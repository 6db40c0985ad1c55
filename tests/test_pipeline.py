"""Pipeline schedules: GPipe and 1F1B give identical gradients, 1F1B's activation memory is bounded by the
pipeline depth (measured), stage partitioning, point-to-point timeouts and argument errors."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from commlab.errors import CollectiveTimeoutError, InvalidArgumentError
from commlab.models import GPT, GPTConfig
from commlab.parallel import Mesh, Pipeline, PipelineStage
from commlab.parallel.p2p import PointToPoint
from commlab.parallel.pipeline import balanced_partition, schedule_actions
from tests.numerics import float64, one_pass_tolerance
from tests.test_tensor_parallel import mesh_of

MICRO = 8


@float64()
def one_step(schedule: str) -> dict:
    """Runs on every rank of a 4-stage pipeline: one training step, its gradients and memory figures."""
    mesh = mesh_of(1, dist.get_world_size(), 1)
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", n_layer=4))
    pipeline = Pipeline(model, mesh, micro_batches=MICRO, schedule=schedule, measure_memory=True)
    tokens = torch.randint(0, 256, (2 * MICRO, 33), generator=torch.Generator().manual_seed(1))
    loss = pipeline.train_step(tokens[:, :-1], tokens[:, 1:])
    assert pipeline.meter.bytes == 0  # everything saved for backward was released
    return {
        "loss": None if loss is None else loss.item(),
        "grads": {name: p.grad.clone() for name, p in pipeline.named_parameters()},
        "peak_in_flight": pipeline.peak_in_flight,
        "peak_bytes": pipeline.meter.peak,
    }


@pytest.mark.numerics
def test_gpipe_and_1f1b_give_identical_gradients_and_1f1b_holds_at_most_pp_microbatches(rank_pools):
    pool = rank_pools(4)
    gpipe, one_f_one_b = pool.run(one_step, "gpipe"), pool.run(one_step, "1f1b")
    # The reference: one process, the whole batch (the 1/m-scaled microbatch losses sum to its loss), in
    # float64 like the stages, compared at the bound of one forward and backward (tests/numerics.py).
    with float64():
        torch.manual_seed(0)
        model = GPT(GPTConfig.preset("tiny", n_layer=4))
        tokens = torch.randint(0, 256, (2 * MICRO, 33), generator=torch.Generator().manual_seed(1))
        loss = model(tokens[:, :-1], tokens[:, 1:])[1]
        loss.backward()
    reference = dict(model.named_parameters())
    tol = one_pass_tolerance()
    torch.testing.assert_close(one_f_one_b[-1]["loss"], loss.item(), rtol=tol, atol=tol)
    pp = 4
    for stage, (a, b) in enumerate(zip(gpipe, one_f_one_b, strict=True)):
        assert a["grads"].keys() == b["grads"].keys()
        for name, grad in a["grads"].items():
            assert torch.equal(grad, b["grads"][name]), name  # same microbatch order: bit for bit
            torch.testing.assert_close(grad, reference[name].grad, rtol=tol, atol=tol, msg=name)
        assert a["peak_in_flight"] == MICRO
        assert b["peak_in_flight"] == pp - stage <= pp
        per_micro_batch = a["peak_bytes"] / MICRO  # GPipe holds every microbatch at its peak
        assert b["peak_bytes"] <= (pp - stage) * per_micro_batch * 1.01, (stage, a, b)
    assert one_f_one_b[0]["peak_bytes"] < gpipe[0]["peak_bytes"] / 1.9


def test_schedules_order_every_forward_before_its_backward():
    for stages in (1, 2, 4):
        for m in (1, 3, 8):
            for stage in range(stages):
                for schedule in ("gpipe", "1f1b"):
                    actions = schedule_actions(schedule, stage, stages, m)
                    assert sorted(actions) == sorted(
                        [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
                    )
                    assert [i for k, i in actions if k == "B"] == list(range(m))
                    for i in range(m):
                        assert actions.index(("F", i)) < actions.index(("B", i))
    assert schedule_actions("1f1b", 0, 4, 6)[:5] == [("F", 0), ("F", 1), ("F", 2), ("F", 3), ("B", 0)]
    assert schedule_actions("1f1b", 3, 4, 6)[:4] == [("F", 0), ("B", 0), ("F", 1), ("B", 1)]


def test_balanced_partition_by_parameter_count():
    assert balanced_partition([1] * 8, 4) == [2, 2, 2, 2]
    assert balanced_partition([1] * 8, 4, first=2, last=2) == [1, 3, 3, 1]
    assert balanced_partition([5, 1, 1, 1, 1, 1], 2) == [1, 5]
    assert balanced_partition([1, 1, 1, 1, 1, 5], 2) == [5, 1]
    assert balanced_partition([3, 3, 3], 3) == [1, 1, 1]
    with pytest.raises(InvalidArgumentError, match="pp=4"):
        balanced_partition([1, 1, 1], 4)


def test_stage_keeps_its_blocks_embedding_and_head():
    torch.manual_seed(0)
    names = [
        dict(PipelineStage(GPT(GPTConfig.preset("tiny", n_layer=4)), s, 3).named_parameters())
        for s in range(3)
    ]
    first, middle, last = ({n.removeprefix("model.") for n in stage} for stage in names)
    assert "tok_embed.weight" in first and "tok_embed.weight" in last and "norm.weight" in last
    assert not any(n.startswith(("tok_embed", "norm.")) for n in middle)
    torch.manual_seed(0)
    stage = PipelineStage(GPT(GPTConfig.preset("tiny", n_layer=4)), 1, 2, layers_per_stage=[3, 1])
    assert stage.first_layer == 3 and len(stage.model.blocks) == 1
    assert stage.global_name("model.blocks.0.attn.qkv.weight") == "blocks.3.attn.qkv.weight"
    with pytest.raises(InvalidArgumentError, match="layers_per_stage"):
        PipelineStage(GPT(GPTConfig.preset("tiny", n_layer=4)), 0, 2, layers_per_stage=[3, 2])


def bad_pipelines() -> list[str]:
    mesh = mesh_of(1, 2, 1)
    messages = []
    for build in (
        lambda: Pipeline(GPT(GPTConfig.preset("tiny")), mesh, schedule="zigzag"),
        lambda: Pipeline(GPT(GPTConfig.preset("tiny")), mesh, micro_batches=0),
        lambda: Pipeline(GPT(GPTConfig.preset("tiny")), mesh, micro_batches=3).train_step(
            torch.zeros(4, 8, dtype=torch.long), torch.zeros(4, 8, dtype=torch.long)
        ),
        lambda: Pipeline(torch.nn.Linear(2, 2), mesh),
        lambda: Mesh(dp=1, pp=3, tp=1),
    ):
        try:
            build()
            messages.append("no error")
        except InvalidArgumentError as error:
            messages.append(str(error))
    return messages


def test_bad_arguments_give_clear_errors(rank_pools):
    messages = rank_pools(2).run(bad_pipelines)[0]
    assert "no error" not in messages, messages
    assert "'zigzag'" in messages[0] and "'1f1b'" in messages[0]
    assert "micro_batches=0" in messages[1]
    assert "micro_batches=3" in messages[2] and "batch size 4" in messages[2]
    assert "GPT or ViT" in messages[3]
    assert "1 x 3 x 1 = 3" in messages[4] and "world size 2" in messages[4]


def silent_peer() -> str:
    """Stage 1 waits for an activation stage 0 never sends: a clear timeout, not a hang."""
    group = mesh_of(1, 2, 1).pp_group
    if group.rank == 0:
        return "silent"
    try:
        PointToPoint(group, timeout=1.0).recv((4,), torch.float32, torch.device("cpu"), 0, 5, "activation")
    except CollectiveTimeoutError as error:
        return str(error)
    return "no error"


@pytest.mark.timing
def test_a_missing_activation_times_out_with_a_clear_error(rank_pools):
    message = rank_pools(2).run(silent_peer, breaks_group=True)[1]
    assert "activation of microbatch 5 from stage 0" in message and "1 s" in message, message


def late_sender() -> float:
    """Stage 0 sends 1 s late: stage 1's receive counts that wait as idle time (the bubble's measure).
    The test asks for half of it, so a rank that the scheduler starts up to 0.5 s late still passes."""
    p2p = PointToPoint(mesh_of(1, 2, 1).pp_group, timeout=10.0)
    if p2p.rank == 0:
        time.sleep(1.0)
        p2p.send(torch.ones(4), 1, 0, "activation")
    else:
        p2p.recv((4,), torch.float32, torch.device("cpu"), 0, 0, "activation")
    p2p.flush()
    return p2p.waited_s


@pytest.mark.timing
def test_time_blocked_on_a_peer_is_counted_as_idle(rank_pools):
    sender, receiver = rank_pools(2).run(late_sender)
    assert receiver >= 0.5 and sender < receiver, (sender, receiver)
