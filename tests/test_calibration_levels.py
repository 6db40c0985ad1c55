"""Calibrated profiles with intra-host and inter-host levels: the format (old profiles still load), the
three-level cost model `auto` prices by (hand-computed cases), the schedules `commlab calibrate` times
across hosts, the simulator's wire floor under a calibrated profile, and (as root) `commlab calibrate`
run across two emulated hosts."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from commlab.calibrate.measure import host_schedules
from commlab.collectives.algorithms import ALGORITHMS, algorithms_for
from commlab.collectives.calibration import Calibration, Level, LinkFit, Segment, default_profile_path
from commlab.collectives.cost import CostModel
from commlab.collectives.hosts import HostMap
from commlab.collectives.tuning import choose
from commlab.errors import InvalidArgumentError
from commlab.sim.network.collective import simulate_collective
from commlab.sim.network.profile import Profile
from commlab.sim.network.topology_io import parse_topology
from commlab.testbed import system

ROOT = Path(__file__).resolve().parents[1]


def level(p: int, alpha: float, beta: float) -> Level:
    return Level(p, LinkFit((Segment(math.inf, alpha, beta),)), 1e-4, (("float32", 1e-10),))


def across_hosts() -> Calibration:
    """A 2x2 calibration: flat rings at 8 ns/B (a 1 Gbit/s wire), one host at 1 ns/B, rails at 16 ns/B."""
    levels = {p: level(p, 50e-6, 8e-9) for p in (2, 3, 4)}
    return Calibration(
        "gloo", levels, intra_host={2: level(2, 30e-6, 1e-9)}, inter_host=level(4, 60e-6, 16e-9), hosts="2x2"
    )


def test_levels_round_trip_and_old_profiles_load() -> None:
    cal = across_hosts()
    data = cal.to_dict()
    assert data["inter_host"]["hosts"] == "2x2" and set(data["intra_host"]) == {"2"}
    back = Calibration.from_dict(data, "round trip")
    assert back.hosts == "2x2" and back.intra_host[2].link == cal.intra_host[2].link
    assert back.inter_host is not None and back.inter_host.link == cal.inter_host.link
    shipped = default_profile_path("gloo")
    assert shipped is not None
    old = Calibration.load(shipped)  # written before the levels existed
    assert old.intra_host == {} and old.inter_host is None and old.hosts is None
    model = old.cost_model(4, hosts=HostMap.parse("2x2"))
    assert model.inter is None and model.intra is None  # nothing measured across hosts: one level


def test_bad_inter_host_names_the_field() -> None:
    data = across_hosts().to_dict()
    del data["inter_host"]["hosts"]
    with pytest.raises(InvalidArgumentError, match="inter_host"):
        Calibration.from_dict(data, "bad")
    data["inter_host"]["hosts"] = "2y"
    with pytest.raises(InvalidArgumentError, match=r"inter_host\.hosts"):
        Calibration.from_dict(data, "bad")


def test_cost_model_across_hosts_has_three_levels() -> None:
    cal, hosts = across_hosts(), HostMap.parse("2x2")
    model = cal.cost_model(4, hosts=hosts)
    assert model.beta == 8e-9  # flat schedules: the flat rings measured across hosts
    assert model.within_host().beta == 1e-9 and model.between_hosts().beta == 16e-9
    assert model.flat_across_hosts() is model
    one_host = cal.cost_model(4)
    assert one_host.intra is None and one_host.inter is None


def test_auto_with_levels_hand_computed() -> None:
    """2 hosts x 2 ranks, n = 1e6 B, no alpha or gamma. Flat ring: 6 steps of n/4 at 8 ns/B = 12 ms.
    Hierarchical: intra reduce-scatter n/2 at 1 ns/B (0.5 ms), two rails messages of n/4 at 16 ns/B
    (8 ms), intra allgather 0.5 ms = 9 ms. Multiring: 6 steps of max(n/8 at 16 ns/B, n/8 at 1 ns/B)
    = 12 ms."""
    hosts, n = HostMap.parse("2x2"), 1e6
    flat = CostModel(0.0, 8e-9)
    model = CostModel(0.0, 8e-9, intra=CostModel(0.0, 1e-9), inter=CostModel(0.0, 16e-9))
    assert ALGORITHMS["ring"].cost("allreduce", 4, n, model, None, hosts) == pytest.approx(12e-3)
    assert ALGORITHMS["hierarchical"].cost("allreduce", 4, n, model, None, hosts) == pytest.approx(9e-3)
    assert ALGORITHMS["multiring"].cost("allreduce", 4, n, model, None, hosts) == pytest.approx(12e-3)
    choice = choose("allreduce", 4, int(n), model, hosts)
    assert choice.algorithm == "hierarchical" and choice.predicted_time == pytest.approx(9e-3)
    # a slow host (10 ns/B inside): hierarchical 5 + 8 + 5 = 18 ms, a flat 12 ms schedule wins
    slow = CostModel(0.0, 8e-9, intra=CostModel(0.0, 10e-9), inter=CostModel(0.0, 16e-9))
    choice = choose("allreduce", 4, int(n), slow, hosts)
    assert choice.algorithm != "hierarchical" and choice.predicted_time == pytest.approx(12e-3)
    # two levels only (no `intra`): flat schedules go at the level between hosts, 6 x n/4 x 16 ns = 24 ms
    two_level = CostModel(0.0, 1e-9, inter=CostModel(0.0, 16e-9))
    assert ALGORITHMS["ring"].cost("allreduce", 4, n, two_level, None, hosts) == pytest.approx(24e-3)
    assert flat.flat_across_hosts() is flat


def test_auto_across_hosts_breaks_ties_by_fewer_messages() -> None:
    """4 hosts x 1 rank, alpha 1 ms, n beta = 6 ms, no gamma. Halving-doubling: 4 messages and 1.5 n
    bytes = 4 + 9 = 13 ms; recursive doubling: 2 messages of n = 2 + 12 = 14 ms, 7.7% more, within
    TIE_TOLERANCE (15%), with 2 messages against 4: auto takes recursive doubling. On one host the
    cheapest stands. With n beta = 12 ms: 22 ms against 26 ms (18% more), no tie: halving-doubling."""
    from commlab.collectives.tuning import TIE_TOLERANCE, Choice, critical_messages

    assert TIE_TOLERANCE == 0.15
    hosts, n = HostMap.uniform(4, 1), 1_250_000
    model = CostModel(1e-3, 6e-3 / n, inter=CostModel(1e-3, 6e-3 / n))
    names = [a for a in ALGORITHMS if "allreduce" in ALGORITHMS[a].ops]
    times = {a: ALGORITHMS[a].cost("allreduce", 4, n, model, None, hosts) for a in names}
    assert times["halving_doubling"] == pytest.approx(13e-3)
    assert times["recursive_doubling"] == pytest.approx(14e-3)
    assert min(times, key=times.__getitem__) == "halving_doubling"
    assert critical_messages("allreduce", Choice("recursive_doubling", 1, 0.0), 4, n, hosts) == 2
    assert critical_messages("allreduce", Choice("halving_doubling", 1, 0.0), 4, n, hosts) == 4
    picked = choose("allreduce", 4, n, model, hosts)
    assert picked.algorithm == "recursive_doubling" and picked.predicted_time == pytest.approx(14e-3)
    assert choose("allreduce", 4, n, model).algorithm == "halving_doubling"  # one host: no tie rule
    slow = CostModel(1e-3, 12e-3 / n, inter=CostModel(1e-3, 12e-3 / n))
    assert choose("allreduce", 4, n, slow, hosts).algorithm == "halving_doubling"


def test_auto_across_hosts_takes_the_times_measured_on_that_host_map() -> None:
    """A 2x2 calibration whose 4-rank level holds algorithm times measured across those hosts: at 1 MiB
    ring 10 ms, hierarchical 12 ms, tree 20 ms. The formulas (flat rings 8 ns/B, one host 1 ns/B, rails
    16 ns/B) price hierarchical cheapest, but on the map the times were taken on (2x2) auto takes the
    measured fastest, the ring, with the segments and time its formula gives on that map. On another
    map (4x1), or asked about one host, those times do not apply: the formulas decide (hierarchical, or
    on one host the flat cheapest), as without them."""
    import dataclasses

    from commlab.collectives.calibration import AlgorithmTimes

    cal = across_hosts()
    timed = {"ring": ((1 << 20, 10e-3),), "hierarchical": ((1 << 20, 12e-3),), "tree": ((1 << 20, 20e-3),)}
    four = dataclasses.replace(cal.levels[4], algorithms=AlgorithmTimes({"allreduce": timed}))
    cal = dataclasses.replace(cal, levels={**cal.levels, 4: four})
    hosts, n = HostMap.parse("2x2"), 1 << 20
    plain = across_hosts().cost_model(4, hosts=hosts)
    assert choose("allreduce", 4, n, plain, hosts).algorithm == "hierarchical"
    model = cal.cost_model(4, hosts=hosts)
    picked = choose("allreduce", 4, n, model, hosts)
    assert picked.algorithm == "ring"
    assert picked.predicted_time == pytest.approx(ALGORITHMS["ring"].cost("allreduce", 4, n, model, 1, hosts))
    assert choose("allreduce", 4, 4 * n, model, hosts).algorithm == "ring"  # beyond: the nearest size holds
    from commlab.calibrate.tune import decision_table

    table = decision_table(cal, "allreduce", 4, max_bytes=n, hosts=hosts)
    assert table[-1]["algorithm"] == "ring" and table[-1]["source"] == "measured"  # `commlab tune --show`
    other = HostMap.uniform(4, 1)
    assert cal.cost_model(4, hosts=other).measured_choice("allreduce", n, ("ring", "tree")) is None
    assert decision_table(cal, "allreduce", 4, max_bytes=n, hosts=other)[-1]["source"] == "formulas"
    one_host = Calibration("gloo", {**across_hosts().levels, 4: four})  # the same times taken on one host
    assert one_host.cost_model(4).measured_choice("allreduce", n, ("ring", "tree")) == "ring"
    assert one_host.cost_model(4, hosts=hosts).measured_choice("allreduce", n, ("ring", "tree")) is None
    assert cal.cost_model(4).measured_choice("allreduce", n, ("ring", "tree")) is None


def test_calibrate_schedules_across_hosts() -> None:
    """On 2x2 (hosts (0,1) and (2,3)): `intra 2` rings ranks 0 and 1; `rails` pairs 0-2 and 1-3."""
    found = host_schedules(HostMap.parse("2x2"), steps=2)
    assert set(found) == {"intra 2", "rails"}
    peers = {r: steps[0].sends[0].peer for r, steps in enumerate(found["rails"].steps)}
    assert peers == {0: 2, 1: 3, 2: 0, 3: 1}
    intra = found["intra 2"].steps
    assert intra[0][0].sends[0].peer == 1 and intra[1][0].sends[0].peer == 0 and not intra[2] and not intra[3]
    assert host_schedules(HostMap.parse("1x4"), 2) == {} and host_schedules(None, 2) == {}


def test_calibrate_schedules_on_uneven_hosts() -> None:
    """3+1 (hosts (0,1,2) and (3,)): `intra 2` and `intra 3` ring the big host's ranks; `rails` pairs the
    ranks of local index 0 only (0-3), the one index every host has. 1,3,2: the intra rings on the
    largest host (1,2,3); the rails on local indices 0 and 1 of every host, host to next host."""
    found = host_schedules(HostMap.parse("3,1"), steps=2)
    assert set(found) == {"intra 2", "intra 3", "rails"}
    peers = {r: steps[0].sends[0].peer for r, steps in enumerate(found["rails"].steps) if steps}
    assert peers == {0: 3, 3: 0}
    ring3 = {r: steps[0].sends[0].peer for r, steps in enumerate(found["intra 3"].steps) if steps}
    assert ring3 == {0: 1, 1: 2, 2: 0}
    found = host_schedules(HostMap.parse("2,3,2"), steps=1)  # hosts (0,1), (2,3,4), (5,6)
    assert set(found) == {"intra 2", "intra 3", "rails"}
    assert {r for r, steps in enumerate(found["intra 3"].steps) if steps} == {2, 3, 4}
    peers = {r: steps[0].sends[0].peer for r, steps in enumerate(found["rails"].steps) if steps}
    assert peers == {0: 2, 1: 3, 2: 5, 3: 6, 5: 0, 6: 1}


def synthetic_measurements(hosts: str, flat: float, inside: float, rails: float) -> dict:
    """What `measure` returns on `hosts` (no alpha; `flat`, `inside`, `rails` seconds per byte of the
    ring p, intra p and rails variants), as exact lines, so the fits recover them."""
    host_map = HostMap.parse(hosts)
    sizes = [1 << k for k in range(3, 21, 2)]
    line = {str(s): 20e-6 + flat * s for s in sizes}
    levels = [str(p) for p in range(2, host_map.world_size + 1)]
    per_byte = {str(s): 1e-10 * s for s in (65536, 1 << 20, 4 << 20)}
    intra = [name for name in host_schedules(host_map, 2) if name != "rails"]
    return {
        "pingpong": dict(line),
        "ring": {p: dict(line) for p in levels},
        "launch": {p: {} for p in levels},
        "fan": {p: {} for p in levels},
        "reduce": {p: {"float32": dict(per_byte)} for p in levels},
        "clone": {p: dict(per_byte) for p in levels},
        "copy": {p: dict(per_byte) for p in levels},
        "hosts": host_map.spec(),
        "rails": {str(s): 30e-6 + rails * s for s in sizes},
        "intra": {name.split()[1]: {str(s): 10e-6 + inside * s for s in sizes} for name in intra},
    }


def test_uneven_host_levels_fit_store_and_price() -> None:
    """A 3+1 calibration gets intra-host levels for 2 and 3 ranks and a rails level, stored with "3,1";
    auto prices the topology-aware algorithms on 3+1 from them. Hand-computed, n = 1.2 MB, alphas 0 in
    the model below (the fitted ones are checked apart): inside a host 1 ns/B, across hosts 8 ns/B (one
    stream at 1 Gbit/s), flat rings 8 ns/B.
    - hierarchical: host 0 reduce-scatters the 3 rails in 2 steps of n/3 (0.8 ms at 1 ns/B); rank 3
      carries all 3 rails, each a ring of 2 carriers over 2 sub-chunks: reduce-scatter then allgather,
      3 messages of n/6 per step, 2 steps = n bytes from host 1 at 8 ns/B (9.6 ms); allgather 0.8 ms:
      11.2 ms.
    - flat ring: 6 steps of n/4 at 8 ns/B = 14.4 ms (host 1's link carries 1.5 n).
    - multiring (3 channels): every channel leaves and enters host 1 through rank 3, so each of the 6
      steps moves 3 chunks of n/12 across hosts from one rank (2.4 ms): 14.4 ms, no better than the flat
      ring (priced with one crossing message per step it came out 4.8 ms, 3x too fast)."""
    from commlab.calibrate.config import CalibrateConfig
    from commlab.calibrate.profile import build_calibration

    measured = synthetic_measurements("3,1", flat=8e-9, inside=1e-9, rails=8e-9)
    cal = build_calibration(CalibrateConfig(ranks=4), measured, {"hostname": "synthetic"})
    assert cal.hosts == "3,1" and set(cal.intra_host) == {2, 3} and cal.inter_host is not None
    assert cal.intra_host[3].link.segments[0].beta == pytest.approx(1e-9, rel=1e-6)
    assert cal.inter_host.link.segments[0].beta == pytest.approx(8e-9, rel=1e-6)
    assert cal.inter_host.link.segments[0].alpha == pytest.approx(30e-6, rel=1e-6)
    back = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())), "round trip")
    assert back.hosts == "3,1" and set(back.intra_host) == {2, 3}
    hosts, n = HostMap.parse("3,1"), 1.2e6
    model = back.cost_model(4, hosts=hosts)
    assert model.within_host().beta == pytest.approx(1e-9, rel=1e-6)
    assert model.between_hosts().beta == pytest.approx(8e-9, rel=1e-6)
    bare = CostModel(0.0, 8e-9, intra=CostModel(0.0, 1e-9), inter=CostModel(0.0, 8e-9))
    cost = {name: ALGORITHMS[name].cost("allreduce", 4, n, bare, None, hosts) for name in ALGORITHMS
            if "allreduce" in ALGORITHMS[name].ops}  # fmt: skip
    assert cost["hierarchical"] == pytest.approx(11.2e-3)
    assert cost["ring"] == pytest.approx(14.4e-3) and cost["multiring"] == pytest.approx(14.4e-3)
    assert min(cost, key=cost.__getitem__) == "hierarchical"
    assert choose("allreduce", 4, int(n), bare, hosts).algorithm == "hierarchical"
    assert choose("allreduce", 4, int(n), model, hosts).algorithm == "hierarchical"


def test_calibrated_profile_never_beats_the_wire() -> None:
    """The shipped loopback profile (about 1 GB/s per message) on two hosts joined by 1 Gbit/s: a ring
    allreduce of n bytes on 2 ranks sends n bytes over each host's wire each way, so it takes at least
    n / 125 MB/s, whatever the profile says about loopback."""
    shipped = default_profile_path("gloo")
    assert shipped is not None
    profile = Profile.load(shipped)
    topology = parse_topology("switch:n=2,bandwidth=1Gb/s")
    n = 8 << 20
    time = simulate_collective("allreduce", "ring", topology, n, profile=profile, fidelity="flow").time
    assert time >= n / 125e6


needs_root = pytest.mark.skipif(
    not system.is_privileged(), reason="commlab testbed needs root (network namespaces); CI runs as root"
)


@needs_root
def test_calibrate_across_two_emulated_hosts(tmp_path) -> None:
    """`commlab testbed run -- commlab calibrate` on 2 uneven hosts (3 + 1 ranks) writes the intra-host
    levels (2 and 3 ranks) and the rails level, with the host map the launcher gave ($COMMLAB_HOSTS, since
    the hosts' LOCAL_WORLD_SIZE differ); auto then has three levels. Every algorithm, the topology-aware
    ones included, is timed on all 4 ranks of that map (not on sub-groups), and auto on that map takes the
    measured fastest; on another map it prices by the formulas. (2 x 2 is calibrated the same way by
    benchmarks/testbed_validation.py; its variants are checked above.)"""
    from commlab.testbed.testbed import Testbed

    out = tmp_path / "testbed.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COMMLAB_TESTBED_DIR": str(tmp_path)}
    with Testbed.up("switch:n=2,bandwidth=1Gb/s", "3,1", directory=tmp_path) as testbed:
        command = ["commlab", "calibrate", "--quick", "--algorithm-sizes", "4K,64K", "--dtypes", "float32",
                   "-e", "64K", "--no-progress", "-o", str(out)]  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", "commlab.cli", "testbed", "run", "--run", testbed.run, "--timeout", "200",
             "--", *command],
            capture_output=True, text=True, timeout=260, env=env, cwd=ROOT,
        )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    cal = Calibration.load(out)
    assert cal.hosts == "3,1" and set(cal.intra_host) == {2, 3} and cal.inter_host is not None
    assert set(cal.levels) == {2, 3, 4} and set(cal.measurements["intra"]) == {"2", "3"}
    model = cal.cost_model(4, hosts=HostMap.parse("3,1"))
    assert model.intra is not None and model.inter is not None
    assert choose("allreduce", 4, 16 << 20, model, HostMap.parse("3,1")).predicted_time > 0
    timed = cal.levels[4].algorithms
    assert timed is not None and set(cal.levels) == {2, 3, 4} and cal.levels[2].algorithms is None
    assert set(timed.times["allreduce"]) == set(algorithms_for("allreduce", topology_aware=True))
    assert all([n for n, _ in points] == [4 << 10, 64 << 10] for points in timed.times["allreduce"].values())
    fastest = timed.fastest("allreduce", 64 << 10)
    assert choose("allreduce", 4, 64 << 10, model, HostMap.parse("3,1")).algorithm == fastest
    elsewhere = cal.cost_model(4, hosts=HostMap.parse("2x2"))
    assert elsewhere.measured_choice("allreduce", 64 << 10, ("ring",)) is None


def test_route_latency_counted_once_and_the_argument_check_priced_as_a_message_of_the_profile() -> None:
    """Two hosts of one rank on a switch with 2 ms per link (a 4 ms route). A profile calibrated there (one
    rank per host) has fits that already hold the route's latency: its 10 ms alpha is the whole one-way
    message, so a 2-rank ring allreduce of 8 bytes (2 steps, one message each) takes 2 x 10 ms, not
    2 x (10 + 4) ms. gloo's argument check across hosts is the direct exchange of the signatures (on 2
    ranks one step of one message each way). Uncalibrated, its message crosses the route twice (gloo's
    ready notice, then the data): 2 x 4 ms. Calibrated, it is one message of the profile, posted through
    the same executor as a schedule's, whose fit already holds both trips: 10 ms (were the notice added
    again, 14 ms; were the software left out, 8 ms). The call's launch is not paid twice."""
    topology = parse_topology("switch:n=2,bandwidth=1Gb/s,latency=2ms")
    one_step = Level(2, LinkFit((Segment(math.inf, 10e-3, 0.0),)), 1e-3, (("float32", 0.0),))
    calibration = Calibration("gloo", {2: one_step}, inter_host=one_step, hosts="2x1")
    assert calibration.levels_include_wire
    # the signature's wire time (a few dozen bytes at 1 Gbit/s, under 1 us) is within rel=1e-2
    calibrated = Profile.from_calibration(calibration)
    cases = ((calibrated, 2 * 10e-3 + 1e-3, 10e-3), (Profile(), 2 * 4e-3, 2 * 4e-3))
    for profile, steps, check in cases:
        plain = simulate_collective("allreduce", "ring", topology, 8, profile=profile, fidelity="flow")
        assert plain.time == pytest.approx(steps, rel=1e-3)  # calibrated: was 2 x 14 ms (latency twice)
        checked = simulate_collective(
            "allreduce", "ring", topology, 8, profile=profile, fidelity="flow", argument_check=True
        )
        assert checked.time - plain.time == pytest.approx(check, rel=1e-2)
