"""Calibration: the fits, the profile file, the simulator and auto under a profile, and the commands."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from commlab.calibrate.fit import fit_gamma, fit_line, fit_piecewise
from commlab.cli import main
from commlab.collectives.algorithms import algorithms_for, get_algorithm
from commlab.collectives.calibration import (
    PROFILE_ENV,
    AlgorithmTimes,
    Calibration,
    Level,
    LinkFit,
    PiecewiseCostModel,
    RateCurve,
    Segment,
    api_copies,
    default_profile_path,
)
from commlab.collectives.schedule import OPS
from commlab.collectives.tuning import choose
from commlab.errors import InvalidArgumentError
from commlab.sim import Topology
from commlab.sim.network.collective import simulate_collective
from commlab.sim.network.profile import Profile
from commlab.sim.network.topology import local

ROOT = Path(__file__).resolve().parent.parent
SIZES = [8 * 4**i for i in range(12)]  # 8 B .. 32 MiB


def synthetic(alpha: float, beta: float, gamma: float = 0.0, launch: float = 0.0) -> Calibration:
    """A calibration whose every level is one line alpha + beta x m."""
    link = LinkFit((Segment(math.inf, alpha, beta),))
    levels = {p: Level(p, link, launch, (("float32", gamma),), 1e-10, 1e-10) for p in (2, 3, 4)}
    return Calibration("gloo", levels, link, {"hostname": "synthetic"}, source="synthetic")


def test_fit_line_recovers_alpha_and_beta() -> None:
    times = [20e-6 + s / 3e9 for s in SIZES]
    alpha, beta = fit_line(SIZES, times)
    assert alpha == pytest.approx(20e-6, rel=1e-9) and beta == pytest.approx(1 / 3e9, rel=1e-9)
    fit = fit_piecewise(SIZES, times)
    assert len(fit.segments) == 1 and fit.max_relative_error < 1e-9 and fit.r2 == pytest.approx(1.0)


def test_fit_piecewise_finds_an_eager_rendezvous_switch() -> None:
    def truth(s: float) -> float:  # eager below 64 KiB, rendezvous (more latency, more bandwidth) above
        return 5e-6 + s / 1e9 if s <= 64 << 10 else 40e-6 + s / 6e9

    fit = fit_piecewise(SIZES, [truth(s) for s in SIZES])
    assert len(fit.segments) == 2
    low, high = fit.segments
    assert 32 << 10 < low.max_bytes < 128 << 10  # between the last eager and the first rendezvous size
    assert low.alpha == pytest.approx(5e-6, rel=1e-6) and low.beta == pytest.approx(1e-9, rel=1e-6)
    assert high.alpha == pytest.approx(40e-6, rel=1e-6) and high.beta == pytest.approx(1 / 6e9, rel=1e-6)
    assert fit.max_relative_error < 1e-6


def test_fit_keeps_coefficients_non_negative_and_finds_gamma() -> None:
    alpha, beta = fit_line([8, 16, 32], [1.2e-5, 1.1e-5, 1e-5])  # falling: beta pinned at 0
    assert beta == 0.0 and 1e-5 < alpha < 1.2e-5
    alpha, beta = fit_line([1 << 20, 1 << 21], [1e-3, 2.5e-3])  # through the origin and below: alpha 0
    assert alpha == 0.0 and beta > 0
    assert fit_gamma(
        [1 << 16, 1 << 20, 1 << 24], [s / 5e9 for s in (1 << 16, 1 << 20, 1 << 24)]
    ) == pytest.approx(1 / 5e9)
    with pytest.raises(InvalidArgumentError, match="times"):
        fit_line([8, 16], [1e-5, -1.0])


def test_fits_on_noisy_timings_stay_close_and_valid() -> None:
    """What a loaded host gives, seeded: 10% log-normal noise on every size, then a burst in which busy
    cores slow three sizes 20x. The fit logic is judged here on synthetic timings; the live calibrations
    below check only the profile's structure, since their fit depends on what else the machine runs."""
    rng = np.random.default_rng(0)
    truth = np.array([20e-6 + s / 3e9 for s in SIZES])
    noisy = truth * rng.lognormal(0.0, 0.1, len(SIZES))
    alpha, beta = fit_line(SIZES, noisy)  # relative least squares: each size weighs alike
    assert alpha == pytest.approx(20e-6, rel=0.2) and beta == pytest.approx(1 / 3e9, rel=0.2)
    burst = noisy.copy()
    burst[[2, 5, 9]] *= 20
    fit = fit_piecewise(SIZES, burst)
    assert 1 <= len(fit.segments) <= 3 and fit.segments[-1].max_bytes == math.inf
    assert all(seg.alpha >= 0 and seg.beta >= 0 for seg in fit.segments)
    assert all(fit.time(n) > 0 for n in SIZES) and math.isfinite(fit.max_relative_error)


def test_profile_round_trip_and_piecewise_model(tmp_path) -> None:
    low, high = Segment(4096.0, 10e-6, 1e-9), Segment(math.inf, 30e-6, 2e-10)
    link = LinkFit((low, high), 0.99, 0.05)
    level = Level(2, link, 7e-6, (("float32", 2e-10), ("float64", 1e-10)), 5e-11, 4e-11)
    original = Calibration("mpi", {2: level}, link, {"hostname": "h", "logical_cores": 2}, {"quick": True})
    path = tmp_path / "profile.json"
    original.save(path)
    loaded = Calibration.load(path)
    assert loaded.levels[2] == level and loaded.pingpong == link and loaded.backend == "mpi"
    assert loaded.machine["hostname"] == "h" and loaded.level(8) == level  # beyond: the last level
    model = loaded.cost_model(2, "float64")
    assert isinstance(model, PiecewiseCostModel) and model.gamma == 1e-10
    assert model.time(2, 2 * 1000) == pytest.approx(2 * (10e-6 + 1000e-9))  # two 1000 B messages: low range
    assert model.time(1, 1 << 20, 1 << 20) == pytest.approx(30e-6 + (1 << 20) * (2e-10 + 1e-10))
    assert loaded.cost_model(2, "int8").gamma == 2e-10  # an unmeasured dtype takes float32's
    assert api_copies("reduce_scatter", 1000, 4) == (0.0, 1250.0) and api_copies("allreduce", 8, 2) == (
        0,
        0,
    )


def test_step_cost_makes_one_step_of_many_messages_cheaper_than_many_steps() -> None:
    from commlab.calibrate.profile import step_latency
    from commlab.collectives.algorithms import get_algorithm

    link = LinkFit((Segment(math.inf, 100e-6, 1e-9),))
    # a step of one message costs 100 us, a step of 3 messages 160 us: 70 us per step, 30 us per message
    step = step_latency({"8": 160e-6}, {"8": 100e-6}, 3, link)
    assert step == pytest.approx(70e-6)
    assert step_latency({}, {"8": 100e-6}, 3, link) == 0.0  # no fan measurement: all of alpha per message
    assert step_latency({"8": 50e-6}, {"8": 100e-6}, 3, link) == pytest.approx(100e-6)  # at most alpha
    model = PiecewiseCostModel.of(link, 0.0, step=step)
    assert model.time(1, 1000) == pytest.approx(link.time(1000))  # one message, one step: the fitted time
    assert model.time(3, 3000, steps=1) == pytest.approx(70e-6 + 3 * 30e-6 + 3000e-9)
    ring, direct = get_algorithm("ring"), get_algorithm("direct")
    assert direct.cost("reduce_scatter", 4, 1 << 16, model) < ring.cost("reduce_scatter", 4, 1 << 16, model)
    flat = PiecewiseCostModel.of(link, 0.0)  # without a step cost they tie, as before
    assert direct.cost("reduce_scatter", 4, 1 << 16, flat) == pytest.approx(
        ring.cost("reduce_scatter", 4, 1 << 16, flat)
    )


def test_a_segment_whose_alpha_is_below_the_step_pays_its_alpha_per_step() -> None:
    """The step is measured on small messages and capped only by their segments' alpha; a large-size
    segment with a smaller alpha (a fit's intercept) pays that alpha per step and nothing per message,
    so every segment's one-message step is its fitted time, and small messages keep their own split."""
    from commlab.calibrate.profile import step_latency

    link = LinkFit((Segment(65536.0, 9e-3, 8e-8), Segment(math.inf, 6e-3, 8e-8)))
    # small fan steps of 3 messages: 9.2 ms against 9 ms for one, so the step is 8.9 ms (not capped at 6)
    step = step_latency({"4096": 9.2e-3}, {"4096": 9e-3}, 3, link)
    assert step == pytest.approx(8.9e-3)
    model = PiecewiseCostModel.of(link, 0.0, step=step)
    assert model.time(3, 3 * 4096, steps=1) == pytest.approx(8.9e-3 + 3 * 0.1e-3 + 3 * 4096 * 8e-8)
    assert model.time(1, 1 << 20) == pytest.approx(link.time(1 << 20))  # large: the fitted time
    assert model.time(2, 2 << 20, steps=1) == pytest.approx(6e-3 + 2 * (1 << 20) * 8e-8)
    assert model.time(1, 4096) == pytest.approx(link.time(4096))


def test_simulator_charges_the_step_cost_once_per_step(tmp_path) -> None:
    link = LinkFit((Segment(math.inf, 100e-6, 0.0),))
    levels = {p: Level(p, link, 0.0, (("float32", 0.0),), 0.0, 0.0, 70e-6) for p in (2, 3, 4)}
    profile = Profile.from_calibration(Calibration("gloo", levels, link, source="synthetic"))
    topology = local(4)
    direct = simulate_collective("allgather", "direct", topology, 8 << 10, profile=profile, fidelity="flow")
    ring = simulate_collective("allgather", "ring", topology, 8 << 10, profile=profile, fidelity="flow")
    assert ring.time == pytest.approx(3 * 100e-6, rel=1e-6)  # 3 steps of one message
    assert direct.time == pytest.approx(70e-6 + 3 * 30e-6, rel=1e-6)  # 1 step, 3 messages posted in turn


def test_concurrency_gain_is_fitted_from_the_large_fan_and_priced_alike_by_auto_and_simulator() -> None:
    from commlab.calibrate.profile import concurrency_gain

    sizes = [1 << (10 + i) for i in range(8)]  # 1 KiB .. 128 KiB: the fan's large sizes are 16 and 32 KiB
    link, step, k, gain = LinkFit((Segment(math.inf, 100e-6, 1e-9),)), 70e-6, 3, 1.5
    ring = {str(m): 100e-6 + m * 1e-9 for m in sizes}
    fan = {str(m): step + k * 30e-6 + k * m * 1e-9 / gain for m in sizes}
    assert concurrency_gain(fan, ring, k, link, step) == pytest.approx(gain)
    assert concurrency_gain({}, ring, k, link, step) == 1.0  # not measured: no gain
    slow = {m: 10 * t for m, t in fan.items()}  # slower than one after another: clamped to 1
    assert concurrency_gain(slow, ring, k, link, step) == 1.0
    model = PiecewiseCostModel.of(link, 0.0, step=step, concurrency=gain)
    assert model.time(1, 1000) == pytest.approx(link.time(1000))  # one message per step: no gain
    assert model.time(3, 3000, steps=1) == pytest.approx(70e-6 + 3 * 30e-6 + 3000e-9 / gain)
    assert model.time(2, 2000, steps=1) == pytest.approx(70e-6 + 2 * 30e-6 + 2000e-9 / gain)  # min(k, c)
    with pytest.raises(InvalidArgumentError, match="concurrency"):
        PiecewiseCostModel.of(link, 0.0, concurrency=0.5)
    # the simulator: 3 messages a rank sends at once share its port, together 1.5x one message's speed
    levels = {p: Level(p, link, 0.0, (("float32", 0.0),), 0.0, 0.0, step, gain) for p in (2, 3, 4)}
    profile = Profile.from_calibration(Calibration("gloo", levels, link, source="synthetic"))
    n = 3 << 20  # allgather total on 4 ranks: one step of three 1 MiB messages per rank
    for fidelity in ("analytic", "congestion", "flow"):
        result = simulate_collective("allgather", "direct", local(4), 4 * (1 << 20), profile=profile,
                                     fidelity=fidelity)  # fmt: skip
        assert result.time == pytest.approx(step + 3 * 30e-6 + n * 1e-9 / gain, rel=1e-6), fidelity
    ring_time = simulate_collective("allgather", "ring", local(4), 4 << 20, profile=profile).time
    assert ring_time == pytest.approx(3 * (100e-6 + (1 << 20) * 1e-9), rel=1e-6)  # one at a time: no gain


def test_reduction_and_copy_costs_follow_the_buffer_size() -> None:
    curve = RateCurve.from_times(
        {"65536": 65536 / 10e9, str(1 << 20): (1 << 20) / 20e9, str(64 << 20): (64 << 20) / 5e9}
    )
    assert curve.at(1 << 20) == pytest.approx(1 / 20e9) and curve.at(8) == pytest.approx(1 / 10e9)
    assert curve.at(1 << 30) == pytest.approx(1 / 5e9)  # beyond the measured sizes: the nearest one
    assert curve.at(8 << 20) == pytest.approx((1 / 20e9 + 1 / 5e9) / 2)  # halfway in log(size)
    sizes = [8, 65536, 300000, 1 << 20, 8 << 20, 64 << 20, 1 << 30]
    assert curve.at_sizes(np.array(sizes, float)) == pytest.approx([curve.at(n) for n in sizes])
    with pytest.raises(InvalidArgumentError, match="points"):
        RateCurve(((2.0, 1e-9), (1.0, 1e-9)))
    link = LinkFit((Segment(math.inf, 10e-6, 1e-9),), 1.0, 0.0)
    level = Level(2, link, 0.0, (("float32", 1 / 5e9),), 1e-9, 1 / 5e9, 0.0, 1.0, (("float32", curve),),
                  None, curve)  # fmt: skip
    cal = Calibration("mpi", {2: level}, link, source="synthetic")
    assert Calibration.from_dict(json.loads(json.dumps(cal.to_dict()))).levels[2] == level  # round trip
    model = cal.cost_model(2, "float64")  # an unmeasured dtype takes float32's curve
    assert model.time(1, 1 << 20, 1 << 20) == pytest.approx(10e-6 + (1 << 20) * (1e-9 + 1 / 20e9))
    assert model.time(1, 64 << 20, 64 << 20) == pytest.approx(10e-6 + (64 << 20) * (1e-9 + 1 / 5e9))
    assert level.local_copy_time("allgather", 2 << 20, 2) == pytest.approx((1 << 20) / 20e9)
    # the simulator reduces each received message at its size's rate, as auto prices it
    profile = Profile.from_calibration(cal)
    for n in (2 << 20, 128 << 20):
        expected = get_algorithm("ring").cost("allreduce", 2, n, model)
        for fidelity in ("analytic", "congestion", "flow"):
            result = simulate_collective("allreduce", "ring", local(2), n, profile=profile, fidelity=fidelity)
            assert result.time == pytest.approx(expected, rel=1e-9), (n, fidelity)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON"),
        ('{"format": "other"}', "not a commlab calibration"),
        (
            '{"format": "commlab-calibration", "version": 1, "backend": "nccl", "levels": {}}',
            "backend='nccl'",
        ),
        ('{"format": "commlab-calibration", "version": 1, "backend": "gloo", "levels": {}}', "levels"),
        (
            '{"format": "commlab-calibration", "version": 1, "backend": "gloo", "levels": {"2": {"link": '
            '{"segments": [{"max_bytes": null, "alpha": -1, "beta": 0}]}}}}',
            "alpha",
        ),
        (
            '{"format": "commlab-calibration", "version": 1, "backend": "gloo", "levels": {"2": {"link": '
            '{"segments": [{"max_bytes": 100, "alpha": 0, "beta": 0}]}}}}',
            "last one unbounded",
        ),
        (
            '{"format": "commlab-calibration", "version": 1, "backend": "gloo", "levels": {"2": {"link": '
            '{"segments": [{"max_bytes": null, "alpha": 0, "beta": 0}]}, "concurrency": 0.5}}}',
            "concurrency",
        ),
        (
            '{"format": "commlab-calibration", "version": 1, "backend": "gloo", "levels": {"2": {"link": '
            '{"segments": [{"max_bytes": null, "alpha": 0, "beta": 0}]}, "gamma_by_size": '
            '{"float32": {"big": 1e-9}}}}}',
            "gamma_by_size.float32",
        ),
        (
            '{"format": "commlab-calibration", "version": 1, "backend": "gloo", "levels": {"2": {"link": '
            '{"segments": [{"max_bytes": null, "alpha": 0, "beta": 0}]}, "algorithms": '
            '{"allreduce": {"ring": {"1024": -1}}}}}}',
            "algorithms.allreduce.ring",
        ),
    ],
)
def test_bad_profile_files_are_clear_errors(tmp_path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(InvalidArgumentError, match=message):
        Calibration.load(path)
    if "commlab-calibration" in content:  # the simulator reads calibration files through the same checks
        with pytest.raises(InvalidArgumentError, match=message):
            Profile.load(path)
    with pytest.raises(InvalidArgumentError, match="cannot read"):
        Calibration.load(tmp_path / "missing.json")


def test_simulator_prices_messages_by_the_calibration(tmp_path) -> None:
    cal = synthetic(alpha=10e-6, beta=1e-9, gamma=0.0, launch=3e-6)
    path = tmp_path / "cal.json"
    cal.save(path)
    profile = Profile.load(path)
    assert profile.calibration is not None and profile.to_dict()["calibration"]["world_sizes"] == [2, 3, 4]
    net = Topology(local(3))
    n = 3 << 20  # allgather total: 1 MiB blocks
    expected = 3e-6 + 1e-10 * n / 3 + 2 * (10e-6 + (n / 3) * 1e-9)  # launch + block copy + (p-1) steps
    for fidelity in ("analytic", "congestion", "flow"):
        result = simulate_collective("allgather", "ring", net, n, fidelity=fidelity, profile=profile)
        assert result.time == pytest.approx(expected, rel=1e-9), fidelity
    # two messages a rank sends at once share its port: the double binary tree is slower than alone
    tree = simulate_collective("allreduce", "tree", net, 1 << 20, segments=1, profile=profile)
    assert tree.time > 3e-6 + 2 * (10e-6 + (1 << 19) * 1e-9)


def test_sim_collective_cli_on_a_local_host(tmp_path, capsys) -> None:
    path = tmp_path / "cal.json"
    synthetic(20e-6, 1 / 2e9, 1 / 4e9).save(path)
    argv = ["sim", "collective", "--profile", str(path), "--topology", "local:3", "--size", "64K,1M"]
    assert main([*argv, "--algorithm", "ring,tree,halving_doubling"]) == 0
    out = capsys.readouterr().out
    assert "local 3, 3 ranks" in out and "profile calibrated gloo on synthetic" in out
    assert sum(1 for line in out.splitlines() if line.strip() and not line.startswith("#")) == 6
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["profile"]["calibration"]["backend"] == "gloo"


def test_tune_show_prints_the_decision_table(tmp_path, capsys) -> None:
    path = tmp_path / "cal.json"
    cal = synthetic(50e-6, 1 / 2e9, 1 / 4e9)
    cal.save(path)
    assert main(["tune", "--show", "--profile", str(path), "--ranks", "2,3", "--op", "allreduce"]) == 0
    out = capsys.readouterr().out
    assert "allreduce" in out and "  2 ranks" in out and "  3 ranks" in out
    small, large = (
        choose("allreduce", 3, 8, cal.cost_model(3)),
        choose("allreduce", 3, 1 << 30, cal.cost_model(3)),
    )
    section = out.split("  3 ranks")[1]
    assert "8 B .. " in section.splitlines()[1] and small.algorithm in section.splitlines()[1]
    assert "1 GiB" in section.splitlines()[-1] and large.algorithm in section.splitlines()[-1]
    assert main(["tune", "--show", "--profile", str(tmp_path / "none.json")]) == 2
    assert "cannot read calibration profile" in capsys.readouterr().err


def test_measured_algorithm_times_decide_auto_where_measured(tmp_path, capsys) -> None:
    cal = synthetic(alpha=50e-6, beta=1 / 2e9, gamma=1 / 4e9)
    formula_small = choose("allreduce", 3, 4 << 10, cal.cost_model(3)).algorithm
    formula_large = choose("allreduce", 3, 64 << 20, cal.cost_model(3)).algorithm
    # measured: tree is fastest up to 64 KiB, ring beyond; the crossover lies between 64 KiB and 1 MiB
    times = {"ring": {"4096": 4e-3, "65536": 5e-3, "1048576": 6e-3}, "tree": {"4096": 1e-3, "65536": 2e-3,
             "1048576": 20e-3}}  # fmt: skip
    cal.levels[3] = Level(
        3, cal.levels[3].link, 0.0, (("float32", 1 / 4e9),), algorithms=AlgorithmTimes.from_dict(
            {"allreduce": times}, "test")
    )  # fmt: skip
    path = tmp_path / "measured.json"
    cal.save(path)
    cal = Calibration.load(path)  # the times survive the file
    assert cal.levels[3].algorithms.to_dict() == {"allreduce": times}
    model = cal.cost_model(3)
    pick = {n: choose("allreduce", 3, n, model).algorithm for n in (8, 4 << 10, 64 << 10, 1 << 20, 1 << 30)}
    assert pick == {8: "tree", 4 << 10: "tree", 64 << 10: "tree", 1 << 20: "ring", 1 << 30: "ring"}
    # log-log interpolation: tree 2 ms -> 20 ms and ring 5 -> 6 ms cross near 64 KiB x 16^0.42 = 207 KiB
    assert choose("allreduce", 3, 160 << 10, model).algorithm == "tree"
    assert choose("allreduce", 3, 256 << 10, model).algorithm == "ring"
    choice = choose("allreduce", 3, 1 << 20, model)  # segments and the predicted time still by the formula
    assert choice.predicted_time == pytest.approx(get_algorithm("ring").cost("allreduce", 3, 1 << 20, model))
    # ops and world sizes without measurements: the formulas decide
    assert choose("allreduce", 2, 4 << 10, cal.cost_model(2)).algorithm == formula_small
    assert choose("allreduce", 4, 4 << 10, cal.cost_model(4)).algorithm == formula_small
    assert model.measured_choice("allgather", 4 << 10, ("ring", "direct")) is None
    assert cal.levels[3].algorithms.fastest("allreduce", 4 << 10, among=("ring",)) == "ring"
    # one slow sample cannot flip a decision: times are made non-decreasing in size before comparing
    noisy = AlgorithmTimes.from_dict(
        {"allgather": {"ring": {"1024": 1e-3, "4096": 5e-3, "16384": 2e-3, "65536": 6e-3},
                       "bruck": {"1024": 2e-3, "4096": 2.5e-3, "16384": 3e-3, "65536": 7e-3}}}, "test"
    )  # fmt: skip
    assert noisy.fastest("allgather", 1024) == "ring" and noisy.fastest("allgather", 16384) == "bruck"
    assert dict(noisy.smoothed["allgather"]["ring"]) == {1024: 1e-3, 4096: 3.5e-3, 16384: 3.5e-3, 65536: 6e-3}
    assert noisy.to_dict()["allgather"]["ring"]["16384"] == 2e-3  # the file keeps what was measured
    argv = ["tune", "--show", "--profile", str(path), "--ranks", "2,3", "--op", "allreduce"]
    assert main(argv) == 0
    three = capsys.readouterr().out.split("  3 ranks")[1].splitlines()[1:]
    assert "tree" in three[0] and "(measured)" in three[0] and "ring" in three[-1]
    assert main([*argv, "--formulas"]) == 0
    three = capsys.readouterr().out.split("  3 ranks")[1].splitlines()[1:]
    assert formula_small in three[0] and formula_large in three[-1] and "(formulas)" in three[-1]
    assert "(measured)" not in "\n".join(three)


def auto_choices(latency_profile: str, bandwidth_profile: str) -> tuple[str, str, float]:
    """On every rank: auto's allreduce under $COMMLAB_PROFILE and under the profile= argument, and a
    correct sum computed with auto (argument check on: the ranks agree)."""
    import torch

    import commlab
    from commlab.collectives.transport import TorchTransport
    from commlab.collectives.tuning import resolve

    saved = os.environ.get(PROFILE_ENV)
    os.environ[PROFILE_ENV] = latency_profile
    try:
        by_env = commlab.Communicator(TorchTransport(), check=True)
    finally:
        os.environ.pop(PROFILE_ENV) if saved is None else os.environ.__setitem__(PROFILE_ENV, saved)
    by_arg = commlab.Communicator(TorchTransport(), check=True, profile=bandwidth_profile)
    nbytes = 1 << 20
    env_choice = resolve("allreduce", "auto", 2, nbytes, by_env.cost_model_for(torch.float32), 0).algorithm
    arg_choice = resolve("allreduce", "auto", 2, nbytes, by_arg.cost_model_for(torch.float32), 0).algorithm
    x = torch.full((nbytes // 4,), float(by_env.rank + 1))
    commlab.all_reduce(x, group=by_env)
    commlab.all_reduce(x, group=by_arg)
    by_env.close()
    by_arg.close()
    return env_choice, arg_choice, float(x[0])


@pytest.mark.timing
def test_auto_uses_the_environment_profile_and_the_argument(tmp_path, rank_pools) -> None:
    latency, bandwidth = tmp_path / "latency.json", tmp_path / "bandwidth.json"
    synthetic(alpha=1.0, beta=1e-12).save(latency)  # messages cost everything: fewest messages wins
    synthetic(alpha=0.0, beta=1e-9, gamma=1e-9).save(bandwidth)  # bytes cost everything
    results = rank_pools(2).run(auto_choices, str(latency), str(bandwidth))
    by_bandwidth = choose("allreduce", 2, 1 << 20, Calibration.load(bandwidth).cost_model(2)).algorithm
    assert by_bandwidth != "recursive_doubling"  # it moves the whole buffer in its one step
    assert results == [("recursive_doubling", by_bandwidth, 6.0)] * 2


def calibrate(backend: str, tmp_path: Path) -> Calibration:
    path = tmp_path / f"{backend}.json"
    command = [sys.executable, "-m", "commlab.cli", "calibrate", "--backend", backend, "-n", "2", "--quick",
               "-o", str(path), "--no-progress"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (
        "ring 2 (one message per rank and step): R^2" in done.stdout and "profile written to" in done.stdout
    )
    cal = Calibration.load(path)
    assert cal.backend == backend and cal.world_sizes == (2,) and cal.machine["ranks"] == 2
    assert cal.machine["hostname"] and cal.machine["torch"] and cal.machine["time"]
    level = cal.levels[2]
    # Structure only: under load the fitted line may come out flat (beta 0), so no monotonic time or fit
    # quality is asked. Non-negative fits of positive times are positive, so these hold on any machine.
    assert level.link.segments and all(seg.alpha >= 0 and seg.beta >= 0 for seg in level.link.segments)
    assert level.link.time(8) > 0 and level.link.time(1 << 20) > 0
    assert level.gamma_of("float32") > 0 and level.clone > 0
    assert set(cal.measurements["ring"]["2"]) == {str(8 * 4**i) for i in range(10) if 8 * 4**i <= 1 << 20}
    profile = Profile.load(path)
    result = simulate_collective("allreduce", "ring", Topology(local(2)), 1 << 20, profile=profile)
    assert result.time > 0
    # every algorithm of every op timed at 1 KiB, 16 KiB, 256 KiB and 1 MiB; auto decides by them
    timed = level.algorithms
    assert timed is not None and set(timed.times) == set(OPS)
    for op in OPS:
        assert set(timed.times[op]) == set(algorithms_for(op, topology_aware=False)), op
        for points in timed.times[op].values():
            assert [n for n, _ in points] == [1 << 10, 16 << 10, 256 << 10, 1 << 20] and all(
                t > 0 for _, t in points
            )
    fastest = timed.fastest("allgather", 16 << 10)
    assert choose("allgather", 2, 16 << 10, cal.cost_model(2)).algorithm == fastest
    return cal


@pytest.mark.timing
def test_calibrate_gloo_end_to_end_and_refit(tmp_path, capsys) -> None:
    cal = calibrate("gloo", tmp_path)
    refitted = tmp_path / "refitted.json"
    assert main(["calibrate", "--refit", str(tmp_path / "gloo.json"), "-o", str(refitted)]) == 0
    assert "ring 2 (one message per rank and step)" in capsys.readouterr().out
    again = Calibration.load(refitted)  # the same measurements through the same fits: the same profile
    assert again.measurements == cal.measurements and again.settings == cal.settings
    assert again.levels[2].algorithms.to_dict() == cal.levels[2].algorithms.to_dict()
    assert (
        again.levels[2].link.segments == cal.levels[2].link.segments
        and again.levels[2].step == cal.levels[2].step
    )
    synthetic(1e-6, 1e-9).save(tmp_path / "bare.json")  # a profile without measurements: a clear error
    assert main(["calibrate", "--refit", str(tmp_path / "bare.json")]) == 2
    assert "holds no measurements" in capsys.readouterr().err


@pytest.mark.timing
def test_calibrate_mpi_end_to_end(tmp_path) -> None:
    pytest.importorskip("mpi4py")
    calibrate("mpi", tmp_path)


def test_shipped_profiles_load() -> None:
    for backend in ("gloo", "mpi"):
        path = default_profile_path(backend)
        assert path is not None, f"commlab/profiles/{backend}.json is missing"
        cal = Calibration.load(path)
        assert cal.backend == backend and set(cal.world_sizes) >= {2, 3, 4}


def test_simulator_prices_a_transfer_alone_by_the_pingpong_fit() -> None:
    from commlab.collectives.algorithms import build_schedule
    from commlab.sim.network.compiled import compile_schedule
    from commlab.sim.network.costs import busy_ranks

    plan = compile_schedule(build_schedule("allgather", "halving_doubling", 3))
    busy = busy_ranks(plan)
    # fold in (rank 2 -> 0) alone, doubling between ranks 0 and 1, fold out (rank 0 -> 2) alone
    assert sorted(set(busy.tolist())) == [1, 2]
    assert busy_ranks(compile_schedule(build_schedule("allgather", "ring", 3))).tolist() == [3] * 6
    slow, fast = LinkFit((Segment(math.inf, 0.0, 1e-9),)), LinkFit((Segment(math.inf, 0.0, 1e-10),))
    levels = {p: Level(p, slow, 0.0, (("float32", 0.0),)) for p in (2, 3)}
    alone_fast = Profile.from_calibration(Calibration("gloo", levels, fast, source="synthetic"))
    alone_slow = Profile.from_calibration(Calibration("gloo", levels, slow, source="synthetic"))
    times = [
        simulate_collective(
            "allgather", "halving_doubling", local(3), 3 << 20, profile=p, fidelity="flow"
        ).time
        for p in (alone_fast, alone_slow)
    ]
    assert times[0] < 0.7 * times[1]  # the fold transfers take the ping-pong speed


def test_ranks_crowding_the_cores_post_a_round_at_its_messages_per_rank() -> None:
    from commlab.collectives.algorithms import build_schedule
    from commlab.sim.network.compiled import compile_schedule
    from commlab.sim.network.costs import posting_alphas, round_load

    plan = compile_schedule(build_schedule("allreduce", "tree", 4, segments=1))
    busy, share = round_load(plan)
    # the first round: 4 messages among 4 ranks, though ranks 1 and 2 each receive two of them
    first = plan.msg_recv_pos.argmax()
    assert plan.msg_recv_pos[first] == 1 and share[first] == 1.0 and busy[first] == 4
    send, recv = posting_alphas(plan, busy, share, cores=2)
    assert recv[first] == 1.0 and np.all(recv <= np.maximum(share, 1.0))
    for cores in (0, 4):  # unknown, or a core per rank: each message waits for its own rank's earlier ones
        send, recv = posting_alphas(plan, busy, share, cores=cores)
        assert recv[first] == 2.0 and np.array_equal(send, plan.msg_send_pos + 1.0)
    link = LinkFit((Segment(math.inf, 100e-6, 1e-10),))
    levels = {4: Level(4, link, 0.0, (("float32", 0.0),))}

    def tree_time(cores: int) -> float:
        cal = Calibration("gloo", levels, None, {"logical_cores": cores}, source="synthetic")
        profile = Profile.from_calibration(cal)
        return simulate_collective("allreduce", "tree", local(4), 4096, segments=1, profile=profile).time

    assert tree_time(2) < tree_time(64)  # two receives in a step: one alpha each when ranks share cores


def test_algorithm_sizes_option(capsys) -> None:
    """--algorithm-sizes sets where the algorithms are timed (what the testbed's calibration uses to time
    them at the sizes auto is judged at); a bad list is a clear error naming the option."""
    import argparse

    from commlab.calibrate.cli import add_parser, config_from_args

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["calibrate", "--quick", "--algorithm-sizes", "64K,1M,16M"])
    assert config_from_args(args, None).algorithm_sizes() == [64 << 10, 1 << 20, 16 << 20]
    args = parser.parse_args(["calibrate", "--quick", "--no-algorithms", "--algorithm-sizes", "64K"])
    assert config_from_args(args, None).algorithm_sizes() == []
    assert config_from_args(parser.parse_args(["calibrate", "--quick"]), None).algorithm_sizes() == [
        1 << 10,
        16 << 10,
        256 << 10,
        1 << 20,
    ]
    for bad in ("1M,64K", "64K,64K", "64Q"):
        assert main(["calibrate", "--algorithm-sizes", bad]) == 2
        assert "--algorithm-sizes" in capsys.readouterr().err
