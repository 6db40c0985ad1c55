"""Calibrated profiles with intra-host and inter-host levels: the format (old profiles still load), the
three-level cost model `auto` prices by (hand-computed cases), the schedules `commlab calibrate` times
across hosts, the simulator's wire floor under a calibrated profile, and (as root) `commlab calibrate`
run across two emulated hosts."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from commlab.calibrate.measure import host_schedules
from commlab.collectives.algorithms import ALGORITHMS
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


def test_calibrate_schedules_across_hosts() -> None:
    """On 2x2 (hosts (0,1) and (2,3)): `intra 2` rings ranks 0 and 1; `rails` pairs 0-2 and 1-3."""
    found = host_schedules(HostMap.parse("2x2"), steps=2)
    assert set(found) == {"intra 2", "rails"}
    peers = {r: steps[0].sends[0].peer for r, steps in enumerate(found["rails"].steps)}
    assert peers == {0: 2, 1: 3, 2: 0, 3: 1}
    intra = found["intra 2"].steps
    assert intra[0][0].sends[0].peer == 1 and intra[1][0].sends[0].peer == 0 and not intra[2] and not intra[3]
    assert host_schedules(HostMap.parse("3,1"), 2) == {} and host_schedules(None, 2) == {}


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
    """`commlab testbed run -- commlab calibrate` on 2 hosts x 2 ranks writes the intra-host and rails
    levels, with the host map the launcher gave; auto then has three levels."""
    from commlab.testbed.testbed import Testbed

    out = tmp_path / "testbed.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COMMLAB_TESTBED_DIR": str(tmp_path)}
    with Testbed.up("switch:n=2,bandwidth=1Gb/s", 2, directory=tmp_path) as testbed:
        command = ["commlab", "calibrate", "--quick", "--no-algorithms", "--dtypes", "float32", "-e", "64K",
                   "--no-progress", "-o", str(out)]  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", "commlab.cli", "testbed", "run", "--run", testbed.run, "--timeout", "200",
             "--", *command],
            capture_output=True, text=True, timeout=260, env=env, cwd=ROOT,
        )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    cal = Calibration.load(out)
    assert cal.hosts == "2x2" and set(cal.intra_host) == {2} and cal.inter_host is not None
    assert set(cal.levels) == {2, 3, 4}
    model = cal.cost_model(4, hosts=HostMap.parse("2x2"))
    assert model.intra is not None and model.inter is not None
