"""The network engine: closed forms, agreement of fidelities, fair sharing, conservation, symmetry."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest

from commlab.collectives.algorithms import ALGORITHMS, algorithms_for, build_schedule
from commlab.collectives.cost import CostModel
from commlab.collectives.schedule import OPS, ScheduleBuilder, verify
from commlab.errors import InvalidArgumentError
from commlab.shared.ops import bus_factor
from commlab.sim.network import topology as topo
from commlab.sim.network.analytic import analytic_time
from commlab.sim.network.channels import merge_channels, relabel
from commlab.sim.network.collective import FIDELITIES, simulate, simulate_collective
from commlab.sim.network.engine import routed_plan
from commlab.sim.network.flow import run_flow
from commlab.sim.network.maxmin import max_min_rates
from commlab.sim.network.nccl import NcclCluster, NcclSystem, simulate_nccl_allreduce
from commlab.sim.network.profile import Profile
from commlab.sim.network.topology import Topology

BW, LAT = 50e9, 1e-6
PROFILE = Profile(alpha=3e-6, gamma=1 / 200e9)


@pytest.fixture(scope="module")
def uniform_ring():
    return Topology(topo.ring(8, bandwidth=BW, latency=LAT))


@pytest.mark.parametrize("op", OPS)
def test_analytic_equals_the_closed_forms(uniform_ring, op):
    model = CostModel(PROFILE.alpha + LAT, 1 / BW, PROFILE.gamma)
    for name in algorithms_for(op):
        for nbytes in (8 * 1024, 1 << 24):
            result = simulate_collective(op, name, uniform_ring, nbytes, fidelity="analytic", profile=PROFILE)
            expected = ALGORITHMS[name].cost(op, 8, result.nbytes, model, result.segments)
            assert result.time == pytest.approx(expected, rel=1e-12)
            assert result.busbw == pytest.approx(result.nbytes / result.time * bus_factor(op, 8))


def test_analytic_takes_the_bottleneck_of_the_ring_through_the_ranks():
    cluster = Topology(topo.cluster(2, nic="hdr"))
    result = simulate_collective("allreduce", "ring", cluster, 1 << 30, fidelity="analytic")
    assert result.busiest_link()[0][0].startswith("n0.nic7") or "rail" in str(result.busiest_link()[0])
    share = 2 * 15 / 16 * result.nbytes
    assert result.time == pytest.approx(share / 25e9, rel=1e-3)  # the NIC bounds the ring


@pytest.mark.parametrize("world", [2, 5, 8])
@pytest.mark.parametrize("nbytes", [4096, 3 << 20])
def test_fidelities_agree_on_a_uniform_ring(world, nbytes):
    t = Topology(topo.ring(world, bandwidth=BW, latency=LAT))
    times = [
        simulate_collective("allreduce", "ring", t, nbytes, fidelity=f, profile=PROFILE).time
        for f in FIDELITIES
    ]
    assert max(times) / min(times) - 1 < 0.01


def _two_flow_schedule():
    builder = ScheduleBuilder("allgather", "pairs", 4, 4)
    builder.transfer(0, 0, 1, [0], reduce=False)
    builder.transfer(0, 2, 3, [2], reduce=False)
    return builder.build()


def _dumbbell(shared: bool) -> nx.DiGraph:
    g = nx.DiGraph(endpoints_forward=False)
    for v in "abcd":
        g.add_node(v, kind="npu")
    edges = [("a", "s1"), ("c", "s1"), ("s2", "b"), ("s2", "d"), ("s1", "s2")]
    if not shared:  # a second core link: the two flows' routes are disjoint
        edges = [("a", "s1"), ("s1", "s2"), ("s2", "b"), ("c", "s3"), ("s3", "s4"), ("s4", "d"), ("s1", "s3")]
    for v in {x for e in edges for x in e} - set("abcd"):
        g.add_node(v, kind="switch")
    for u, v in edges:
        g.add_edge(u, v, bandwidth=BW, latency=0.0)
        g.add_edge(v, u, bandwidth=BW, latency=0.0)
    return g


@pytest.mark.parametrize("shared", [True, False])
def test_flows_share_a_link_fairly(shared):
    t = Topology(_dumbbell(shared), placement=["a", "b", "c", "d"])
    nbytes = 4 * (1 << 20)  # 1 MiB per block
    result = simulate(_two_flow_schedule(), t, nbytes, fidelity="flow")
    duration = result.msg_end - result.msg_start
    rate = result.msg_bytes / duration
    assert np.allclose(rate, BW / 2 if shared else BW)
    assert result.time == pytest.approx((1 << 20) / (BW / 2 if shared else BW))


def test_max_min_rates_textbook_case():
    # Link 0 (capacity 1) carries flows 0, 1, 2; link 1 (capacity 10) carries flows 2, 3.
    rates = max_min_rates(np.array([0, 1, 2, 2, 3]), np.array([0, 0, 0, 1, 1]), np.array([1.0, 10.0]), 4)
    assert rates == pytest.approx([1 / 3, 1 / 3, 1 / 3, 10 - 1 / 3])


@pytest.mark.parametrize("fidelity", ["congestion", "flow"])
@pytest.mark.parametrize("algorithm", ["ring", "tree", "halving_doubling", "direct"])
def test_bytes_sent_equal_bytes_received(fidelity, algorithm):
    t = Topology(topo.fat_tree(4))
    result = simulate_collective("allreduce", algorithm, t, 1 << 20, fidelity=fidelity)
    plan = result.routed.plan
    sent = np.bincount(plan.msg_src, weights=result.msg_bytes, minlength=16)
    received = np.bincount(plan.msg_dst, weights=result.msg_bytes, minlength=16)
    assert sent.sum() == pytest.approx(received.sum())
    # every link of every route carries its messages: link bytes add up to bytes x hops
    hops = result.routed.routes.hops[result.routed.msg_pair]
    assert result.link_bytes.sum() == pytest.approx((result.msg_bytes * hops).sum())
    if algorithm in ("ring", "halving_doubling", "direct"):  # bandwidth-optimal: 2(p-1)/p n per rank each way
        assert np.allclose(sent, 2 * 15 / 16 * result.nbytes)
        assert np.allclose(received, 2 * 15 / 16 * result.nbytes)


@pytest.mark.parametrize("fidelity", FIDELITIES)
def test_relabelling_ranks_on_symmetric_topologies(fidelity):
    rng = np.random.default_rng(0)
    cases = [
        (topo.switch(8), [list(rng.permutation(8)) for _ in range(2)]),
        (topo.fully_connected(6), [list(rng.permutation(6)) for _ in range(2)]),
        (topo.ring(8), [[(i + 3) % 8 for i in range(8)], [(-i) % 8 for i in range(8)]]),
    ]
    for graph, perms in cases:
        base = Topology(graph, routing="shortest")
        names = base.placement
        for algorithm in ("ring", "tree", "halving_doubling"):
            reference = simulate_collective("allreduce", algorithm, base, 1 << 20, fidelity=fidelity).time
            for perm in perms:
                moved = base.with_placement([names[i] for i in perm])
                if graph.graph["name"].startswith("ring") and algorithm != "ring":
                    continue  # other algorithms' peers are not rotation-invariant in rank numbers
                time = simulate_collective("allreduce", algorithm, moved, 1 << 20, fidelity=fidelity).time
                assert time == pytest.approx(reference, rel=1e-9), (graph.graph["name"], algorithm, perm)


@pytest.mark.parametrize("algorithm", ["ring", "tree", "halving_doubling", "direct"])
def test_flow_fast_path_matches_event_engine(algorithm):
    for graph in (topo.fat_tree(4), topo.cluster(2), topo.torus((2, 4))):
        t = Topology(graph)
        schedule = build_schedule(
            "allreduce", algorithm, t.num_ranks, segments=3 if algorithm == "tree" else 1
        )
        routed = routed_plan(schedule, t)
        plan = routed.plan
        msg_bytes = plan.message_bytes(plan.chunk_bytes(1 << 20, 4)).astype(float)
        fast = run_flow(routed, msg_bytes, t, PROFILE)
        slow = run_flow(routed, msg_bytes, t, PROFILE, events=True)
        assert fast.time == pytest.approx(slow.time, rel=1e-9)
        assert np.allclose(fast.step_end, slow.step_end, rtol=1e-9)


@pytest.mark.parametrize("op", OPS)
def test_every_op_and_algorithm_runs_at_every_fidelity(op):
    t = Topology(topo.torus((3, 3)))
    for name in algorithms_for(op):
        times = [simulate_collective(op, name, t, 96 * 1024, fidelity=f).time for f in FIDELITIES]
        assert all(x > 0 for x in times)


def test_all_to_all_on_a_switch_shares_each_port():
    t = Topology(topo.switch(8))
    flow = simulate_collective("allreduce", "direct", t, 1 << 24, fidelity="flow")
    congestion = simulate_collective("allreduce", "direct", t, 1 << 24, fidelity="congestion")
    assert flow.time == pytest.approx(congestion.time, rel=0.05)
    # each port carries 7 of the 8 blocks each phase: 2 x 7/8 x n over the port's bandwidth
    assert flow.time == pytest.approx(2 * 7 / 8 * flow.nbytes / topo.DEFAULT_BANDWIDTH, rel=0.02)


def test_timeline_and_link_results():
    t = Topology(topo.ring(4, bandwidth=BW, latency=LAT))
    result = simulate_collective("allreduce", "ring", t, 1 << 20, fidelity="flow", profile=PROFILE)
    plan = result.routed.plan
    assert np.all(result.step_end >= result.step_start)
    assert result.step_end.max() == pytest.approx(result.time)
    assert np.all(np.diff(result.step_start[plan.step_ptr[0] : plan.step_ptr[1]]) > 0)
    link, util = result.busiest_link()
    assert link is not None and 0 < util <= 1
    summary = result.to_dict()
    assert summary["busbw_GBps"] == pytest.approx(result.busbw / 1e9)


def test_argument_errors(uniform_ring):
    with pytest.raises(InvalidArgumentError, match="fidelity='exact'"):
        simulate_collective("allreduce", "ring", uniform_ring, 1024, fidelity="exact")
    with pytest.raises(InvalidArgumentError, match="dtype='float128'"):
        simulate_collective("allreduce", "ring", uniform_ring, 1024, dtype="float128")
    with pytest.raises(InvalidArgumentError, match="world_size=9"):
        simulate_collective("allreduce", "ring", uniform_ring, 1024, world_size=9)
    with pytest.raises(InvalidArgumentError, match="efficiency=0"):
        Profile(efficiency=0)


def test_profile_loads_from_file(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('name = "gloo"\nalpha = "20us"\ngamma = 2.5e-10\nlaunch = 1e-6\nefficiency = 0.9\n')
    p = Profile.load(path)
    assert (p.alpha, p.gamma, p.launch, p.efficiency, p.name) == pytest.approx(
        (20e-6, 2.5e-10, 1e-6, 0.9, "gloo")
    )
    assert analytic_time("allreduce", "ring", 1, 1024, BW, LAT, p) == p.launch


def test_channels_merge_is_a_correct_schedule():
    base = build_schedule("allreduce", "tree", 8, segments=2)
    channels = [relabel(base, [(i + c) % 8 for i in range(8)]) for c in range(3)]
    merged = merge_channels(channels)
    verify(merged)
    assert merged.num_chunks == 3 * base.num_chunks
    with pytest.raises(InvalidArgumentError, match="order="):
        relabel(base, [0, 0, 1, 2, 3, 4, 5, 6])


def test_nccl_tuner_switches_protocol_and_algorithm():
    one_node = NcclSystem(nranks=8, nnodes=1, channels=12, speed=20.0)
    assert one_node.choose(1 << 10)[1] == "LL"
    assert one_node.choose(1 << 30) == ("ring", "Simple")
    small = NcclCluster(1).system()
    assert small.channels == 12 and small.speed == pytest.approx(20.0)
    result, algorithm, protocol = simulate_nccl_allreduce(NcclCluster(2), 1 << 24, fidelity="congestion")
    assert (algorithm, protocol) == ("ring", "LL128")
    assert result.world_size == 16 and result.busbw > 0
