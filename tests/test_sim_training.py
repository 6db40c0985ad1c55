"""The training-step simulator: memory and FLOPs formulas, pipeline bubbles, errors, planner and CLI."""

from __future__ import annotations

import json

import pytest

from commlab.cli import main
from commlab.errors import InvalidArgumentError
from commlab.sim.training.clusters import cluster_spec
from commlab.sim.training.compute import Efficiency, model_flops
from commlab.sim.training.memory import activation_peaks, bytes_per_parameter, layer_activation_bytes
from commlab.sim.training.pipeline import peak_in_flight, run_pipeline, schedule_order
from commlab.sim.training.planner import plan_layouts
from commlab.sim.training.step import make_timer, simulate_training
from commlab.sim.training.workload import Layout, ModelSpec, check_layout, from_gpt_config, model_spec

GPT175 = model_spec("gpt-175b")
SBH = 2048 * 1 * 12288  # s b h of gpt-175b at micro batch 1


def _layout(**kw) -> Layout:
    base = dict(dp=1, tp=8, pp=8, micro_batch=1, global_batch=64)
    return Layout(**{**base, **kw})


# ------------------------------------------------------------------------------------------------ memory


@pytest.mark.parametrize(
    ("tp", "checkpoint", "sp", "expected"),
    [
        # s b h (34 + 5 a s / h) with a s / h = 96 x 2048 / 12288 = 16: 34 + 80 = 114
        (1, "none", False, 114 * SBH),
        # s b h (10 + 24/8 + 5 x 16 / 8) = 23 s b h
        (8, "none", False, 23 * SBH),
        # with sequence parallelism everything is split: 114 / 8
        (8, "none", True, 114 * SBH / 8),
        # selective: s b h (10 + 24/8) = 13 s b h; with sequence parallelism 34 s b h / 8
        (8, "selective", False, 13 * SBH),
        (8, "selective", True, 34 * SBH / 8),
        # full: the layer input only, 2 s b h (split by t under sequence parallelism)
        (8, "full", False, 2 * SBH),
        (8, "full", True, 2 * SBH / 8),
    ],
)
def test_layer_activations_match_korthikanti(tp, checkpoint, sp, expected):
    assert layer_activation_bytes(GPT175, 1, tp, checkpoint, sp) == pytest.approx(expected, rel=1e-12)


def test_bytes_per_parameter_mixed_precision_adam_and_zero():
    assert sum(bytes_per_parameter(_layout())) == 16
    assert sum(bytes_per_parameter(_layout(fp32_grads=True))) == 18
    assert bytes_per_parameter(_layout(dp=4, zero=1)) == (2.0, 2.0, 3.0)
    assert bytes_per_parameter(_layout(dp=4, zero=2)) == (2.0, 0.5, 3.0)


@pytest.mark.parametrize(("p", "v", "m"), [(4, 1, 8), (4, 1, 2), (8, 1, 32), (4, 2, 8), (8, 3, 16)])
def test_in_flight_microbatches_follow_the_schedule(p, v, m):
    schedule = "interleaved" if v > 1 else "1f1b"
    # 1F1B: rank d holds min(p - d, m) microbatches; interleaved: rank 0 holds p (1 + (p-1)/(p v))
    # microbatches' worth of its layers (Korthikanti et al. sec. 4.2.3), i.e. p v + p - 1 chunks.
    for d in range(p):
        peak = peak_in_flight(schedule_order(schedule, d, p, m, v), [1.0] * v)
        if v == 1:
            assert peak == min(p - d, m)
    peak0 = peak_in_flight(schedule_order(schedule, 0, p, m, v), [1.0 / v] * v)
    if v > 1:
        assert peak0 == pytest.approx(p * (1 + (p - 1) / (p * v)))
    assert peak_in_flight(schedule_order("gpipe", 0, p, m), [1.0]) == m


def test_memory_report_by_hand():
    model = model_spec("gpt-22b")
    layout = Layout(dp=1, tp=8, pp=1, micro_batch=1, global_batch=4, checkpoint="full")
    r = simulate_training(model, layout, "dgx-a100")
    h, s, a, t, v = 6144, 2048, 64, 8, 51200
    layer = 12 * h * h + 13 * h
    params = (48 * layer + v * h) / t + s * h + 2 * h  # layers and table split by TP; positions, final norm
    assert r.memory.parameters == pytest.approx(params)
    assert (r.memory.weights, r.memory.gradients, r.memory.optimizer) == pytest.approx(
        (2 * params, 2 * params, 12 * params)
    )
    sbh = s * h
    activations = (
        48 * 2 * sbh  # one microbatch in flight (pp = 1): each layer's input
        + sbh  # embedding dropout mask
        + sbh * (10 + 24 / t + 5 * a * s / (h * t))  # the layer being recomputed
        + 4 * sbh / t * (1 + v / h)  # output layer
    )
    assert r.memory.activations == pytest.approx(activations)
    assert r.memory.total == pytest.approx(16 * params + activations + Efficiency().reserved_memory)
    assert r.memory.fits


def test_a_layout_that_cannot_fit_is_reported(capsys):
    model = model_spec("gpt-1t")
    r = simulate_training(model, Layout(dp=1, tp=8, pp=8, micro_batch=1, global_batch=8), "dgx-a100")
    assert not r.memory.fits and r.memory.headroom < 0
    assert r.to_dict()["memory_bytes"]["fits"] is False
    args = [
        "sim",
        "train",
        "--model",
        "gpt-1t",
        "--gpus",
        "64",
        "--tp",
        "8",
        "--pp",
        "8",
        "--global-batch",
        "8",
    ]
    assert main(args) == 0
    assert "OUT OF MEMORY" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ time, FLOPs


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize(("p", "m"), [(2, 1), (4, 4), (4, 16), (8, 3), (8, 64)])
def test_bubble_on_uniform_stages(schedule, p, m):
    orders = [schedule_order(schedule, d, p, m) for d in range(p)]
    run = run_pipeline(orders, [1.0] * p, [2.0] * p, [0.0] * (p - 1), [0.0] * (p - 1), m)
    assert run.bubble_fraction() == pytest.approx((p - 1) / (m + p - 1), rel=1e-12)
    assert run.makespan == pytest.approx((m + p - 1) * 3.0)


@pytest.mark.parametrize(("p", "v", "m"), [(2, 2, 4), (4, 2, 8), (8, 3, 16)])
def test_interleaved_bubble_shrinks_by_v(p, v, m):
    orders = [schedule_order("interleaved", d, p, m, v) for d in range(p)]
    stages = p * v
    zero = [0.0] * (stages - 1)
    run = run_pipeline(orders, [1.0 / v] * stages, [2.0 / v] * stages, zero, zero, m)
    assert run.bubble_fraction() == pytest.approx((p - 1) / (v * m + p - 1), rel=1e-9)


def test_point_to_point_time_lengthens_the_pipeline():
    p, m = 4, 8
    orders = [schedule_order("1f1b", d, p, m) for d in range(p)]
    free = run_pipeline(orders, [1.0] * p, [2.0] * p, [0.0] * 3, [0.0] * 3, m)
    slow = run_pipeline(orders, [1.0] * p, [2.0] * p, [0.25] * 3, [0.25] * 3, m)
    assert slow.makespan > free.makespan + 2 * 3 * 0.25 - 1e-9  # at least fill and drain pay the transfers


@pytest.mark.parametrize("name", ["gpt-22b", "gpt-175b"])
def test_flops_per_step_match_megatron_formula_under_full_recompute(name):
    model = model_spec(name)
    B, s, l, h, V = 16, model.seq_len, model.layers, model.hidden, model.vocab  # noqa: E741
    layout = Layout(dp=2, tp=8, pp=2, micro_batch=2, global_batch=B, checkpoint="full")
    r = simulate_training(model, layout, "dgx-a100", fidelity="analytic")
    assert r.hardware_flops == pytest.approx(
        96 * B * s * l * h * h * (1 + s / (6 * h) + V / (16 * l * h)), rel=1e-9
    )
    assert r.model_flops == pytest.approx(
        72 * B * s * l * h * h * (1 + s / (6 * h) + V / (12 * l * h)), rel=1e-9
    )
    assert r.mfu < r.hfu


def test_gpt_config_converts_to_the_simulated_model():
    from commlab.models.gpt import GPTConfig, parameter_count, training_flops_per_token

    for preset in ("tiny", "small", "gpt3-125m"):
        config = GPTConfig.preset(preset)
        spec = from_gpt_config(config, preset)
        assert spec.parameter_count() == parameter_count(config)
        layout = Layout(dp=1, tp=1, pp=1, micro_batch=1, global_batch=2)
        tokens = 2 * config.seq_len
        # models.gpt counts 6 FLOPs per parameter including the norm weights; the simulator counts the
        # matmuls exactly, so the two differ by the norms' 6 x (2 n_layer + 1) x d_model.
        norms = (2 * config.n_layer + 1) * config.d_model
        assert model_flops(spec, layout) / tokens == training_flops_per_token(config) - 6 * norms


def test_validation_rows_within_15_percent():
    """Korthikanti et al. 2022, Table 5, on Selene: the constants are Efficiency()'s defaults."""
    rows = [
        ("gpt-22b", 1, 1, 4, 1.42, 1.10),
        ("gpt-175b", 8, 3, 64, 18.13, 13.75),
        ("gpt-530b", 35, 3, 280, 49.05, 37.83),
        ("gpt-1t", 64, 1, 512, 94.42, 71.49),
    ]
    for name, pp, v, batch, full, selective in rows:
        for mode, published in (("full", full), ("selective", selective)):
            schedule = "interleaved" if v > 1 else "1f1b"
            sp = mode == "selective"
            layout = Layout(1, 8, pp, 1, batch, v, schedule, checkpoint=mode, sequence_parallel=sp)
            r = simulate_training(
                model_spec(name), layout, "dgx-a100", separate_p2p=False, keep_timeline=False
            )
            assert abs(r.step_time / published - 1) < 0.15, (name, mode, r.step_time, published)


def test_collective_times_are_cached_by_group_shape():
    spec = cluster_spec("dgx-a100")
    timer = make_timer(spec, 64, Efficiency())
    first = timer.collective("allreduce", tuple(range(8)), 1 << 24)
    assert timer.collective("allreduce", tuple(range(8, 16)), 1 << 24) == first
    assert timer.simulated == 1
    # 16 GPUs on 2 nodes: in-node reduce-scatter, 8 rails across, in-node allgather beats one flat ring
    two_nodes = tuple(range(16))
    hierarchical = timer.collective("allreduce", two_nodes, 1 << 28)
    flat = timer._flat("allreduce", two_nodes, 1 << 28, timer.shape(two_nodes))
    assert hierarchical < flat


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("layout", "gpus", "match"),
    [
        (_layout(tp=5), None, r"tp=5 .*divisor of heads=96"),
        (_layout(tp=16, pp=4), None, r"tp=16 .*8 GPUs of a node"),
        (_layout(pp=5), None, r"pp=5 .*divisor of layers=96"),
        (_layout(pp=8, virtual_stages=5, schedule="interleaved"), None, r"pp x virtual_stages=40"),
        (_layout(dp=2, global_batch=63), None, r"global_batch=63 .*micro_batch x dp"),
        (_layout(dp=2), 64, r"dp=2 .*dp x tp x pp == gpus"),
        (_layout(dp=1), 100, r"gpus=100 .*multiple of tp x pp"),
        (_layout(virtual_stages=2), None, r"schedule='1f1b' .*interleaved"),
        (_layout(pp=8, virtual_stages=2, schedule="interleaved", global_batch=12), None, r"global_batch=12"),
        (_layout(checkpoint="some"), None, r"checkpoint='some' .*'none', 'selective', 'full'"),
        (_layout(zero=3), None, r"zero=3"),
    ],
)
def test_bad_layouts_name_the_argument(layout, gpus, match):
    with pytest.raises(InvalidArgumentError, match=match):
        check_layout(GPT175, layout, gpus, 8)


def test_bad_models_and_presets():
    with pytest.raises(InvalidArgumentError, match=r"hidden=100 .*multiple of heads=3"):
        ModelSpec("x", layers=2, hidden=100, heads=3)
    with pytest.raises(InvalidArgumentError, match=r"model='gpt-9t' .*gpt-175b"):
        model_spec("gpt-9t")
    with pytest.raises(InvalidArgumentError, match="cluster='dgx-z'"):
        cluster_spec("dgx-z")


def test_cli_errors_exit_2(capsys):
    assert main(["sim", "train", "--model", "gpt-175b", "--gpus", "64", "--tp", "3"]) == 2
    assert "tp=3 is not accepted" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- CLI and planner


def test_sim_train_json_and_trace(tmp_path, capsys):
    trace = tmp_path / "step.json"
    args = ["sim", "train", "--model", "gpt-175b", "--gpus", "128", "--tp", "8", "--pp", "8", "--dp", "2"]
    args += ["--micro-batch", "1", "--global-batch", "32", "--checkpoint", "selective", "--sequence-parallel"]
    assert main([*args, "--json", "--trace", str(trace)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["gpus"] == 128 and data["layout"]["dp"] == 2
    assert 0 < data["mfu"] < 1 and data["step_time_s"] > 0
    assert data["communication_s"]["data_parallel"]["total"] > 0
    events = json.loads(trace.read_text())["traceEvents"]
    slices = [e for e in events if e["ph"] == "X"]
    assert {e["pid"] for e in slices} == set(range(8))
    assert {e["tid"] for e in slices} == {0, 1, 2, 3}  # compute, TP, p2p, DP tracks
    assert all(e["dur"] >= 0 for e in slices)


def test_sim_train_toml_model_and_table(tmp_path, capsys):
    toml = tmp_path / "mine.toml"
    toml.write_text("layers = 4\nhidden = 512\nheads = 8\nseq_len = 512\nvocab = 1024\n")
    assert (
        main(["sim", "train", "--model", str(toml), "--gpus", "2", "--tp", "2", "--global-batch", "4"]) == 0
    )
    out = capsys.readouterr().out
    assert "mine" in out and "step time" in out and "fits" in out


def test_plan_small_case_is_exact_and_prints(capsys):
    model = model_spec("gpt3-1.3b")
    options = {"micro_batches": (1, 2), "checkpoints": ("none", "full")}
    result = plan_layouts(model, 8, "dgx-a100", global_batch=16, top=3, **options)
    assert 0 < len(result.entries) <= 3 and result.simulated <= result.fitting <= result.enumerated
    times = [e.result.step_time for e in result.entries]
    assert times == sorted(times) and all(e.result.memory.fits for e in result.entries)
    # Branch and bound returns the true best: compare with simulating every layout that fits.
    from commlab.sim.training.planner import enumerate_layouts

    every = [
        simulate_training(
            model, lay, "dgx-a100", fidelity="analytic", separate_p2p=False, keep_timeline=False
        )
        for lay in enumerate_layouts(model, 8, 16, 8, *options.values())
    ]
    assert times[0] == pytest.approx(min(r.step_time for r in every if r.memory.fits), rel=1e-9)
    args = ["plan", "--model", "gpt3-1.3b", "--gpus", "16", "--global-batch", "32", "--top", "3"]
    assert main([*args, "--micro-batches", "1,2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# commlab plan: gpt3-1.3b on 16 GPUs") and "bubble" in out and "memory" in out


def test_plan_reports_when_nothing_fits(capsys):
    assert main(["plan", "--model", "gpt-1t", "--gpus", "8", "--global-batch", "8"]) == 1
    assert "no layout fits in memory" in capsys.readouterr().out


def test_activation_peaks_of_every_rank_are_largest_on_the_first():
    layout = _layout(global_batch=64, checkpoint="selective", sequence_parallel=True)
    peaks = activation_peaks(GPT175, layout)
    assert max(peaks, key=peaks.get) == 0
