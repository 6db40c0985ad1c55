"""Topology-aware schedules: the host map, the symbolic checker on random and uneven host maps, the bytes
each host sends across, and the two-level cost formulas."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from commlab.cli import main
from commlab.collectives.algorithms import ALGORITHMS, build_schedule, get_algorithm
from commlab.collectives.algorithms.hierarchical import channel_orders
from commlab.collectives.cost import CostModel
from commlab.collectives.hosts import HostMap, host_map_from_env, most_local_ranks
from commlab.collectives.schedule import ROOTED_OPS, Schedule, verify
from commlab.collectives.tuning import choose
from commlab.errors import InvalidArgumentError
from commlab.sim.network.collective import simulate_collective
from commlab.sim.network.topology_io import load_topology, parse_topology

TOPOLOGY_AWARE = [(name, op) for name, a in ALGORITHMS.items() if a.topology_aware for op in a.ops]
FAST = settings(max_examples=25, deadline=None, derandomize=True, database=None)


@st.composite
def host_maps(draw: st.DrawFn) -> HostMap:
    """1-5 hosts of 1-4 ranks each, ranks dealt to hosts in a random order."""
    sizes = draw(st.lists(st.integers(1, 4), min_size=1, max_size=5))
    ranks = draw(st.permutations(range(sum(sizes))))
    hosts, start = [], 0
    for size in sizes:
        hosts.append(tuple(ranks[start : start + size]))
        start += size
    return HostMap(tuple(hosts))


@pytest.mark.parametrize(("name", "op"), TOPOLOGY_AWARE, ids=[f"{n}-{o}" for n, o in TOPOLOGY_AWARE])
@FAST
@given(hosts=host_maps(), data=st.data())
def test_verifies_on_random_and_uneven_host_maps(name: str, op: str, hosts: HostMap, data) -> None:
    p = hosts.world_size
    root = data.draw(st.integers(0, p - 1), label="root") if op in ROOTED_OPS else None
    segments = data.draw(st.integers(1, 4), label="segments")  # pipelined hierarchical allreduce
    schedule = build_schedule(op, name, p, root, segments, hosts)
    assert (schedule.algorithm, schedule.op, schedule.world_size) == (name, op, p)
    verify(schedule)


def cross_host_bytes(schedule: Schedule, hosts: HostMap, nbytes: float) -> Counter:
    """Bytes each host sends to other hosts when the op moves `nbytes` (per rank; total for blocked ops)."""
    chunk = nbytes / schedule.num_chunks
    sent: Counter = Counter()
    for rank, steps in enumerate(schedule.steps):
        for step in steps:
            for send in step.sends:
                if hosts.host_of(send.peer) != hosts.host_of(rank):
                    sent[hosts.host_of(rank)] += len(send.chunks) * chunk
    return sent


def test_pipelined_hierarchical_allreduce_overlaps_the_levels() -> None:
    """2x2 in 3 segments: segment s starts its phases 2 slots after s-1 (the cross-host phase is 2 steps,
    each intra-host one 1), so ranks work 2 x 2 + 4 = 8 steps (not 3 x 4 = 12), and in the middle steps
    a rank sends inside its host and across at once; the bytes across stay n per host."""
    hosts = HostMap.parse("2x2")
    schedule = build_schedule("allreduce", "hierarchical", 4, None, 3, hosts)
    assert all(len(steps) == 8 for steps in schedule.steps)
    both = [
        step
        for step in schedule.steps[0]
        if {hosts.host_of(s.peer) == 0 for s in step.sends} == {True, False}
    ]
    assert len(both) == 4  # steps 2..5: one segment across beside another's intra-host phase
    assert cross_host_bytes(schedule, hosts, 1.0) == Counter({0: pytest.approx(1.0), 1: pytest.approx(1.0)})


def test_hierarchical_allreduce_sends_n_across_where_the_flat_ring_sends_one_and_a_half_n() -> None:
    hosts, n = HostMap.uniform(2, 2), 1.0
    ring = cross_host_bytes(build_schedule("allreduce", "ring", 4), hosts, n)
    hierarchical = cross_host_bytes(build_schedule("allreduce", "hierarchical", 4, hosts=hosts), hosts, n)
    assert ring == {0: 1.5, 1: 1.5}  # 2(p-1)/p n on each host's one crossing edge
    assert hierarchical == {0: 1.0, 1: 1.0}  # 2(H-1)/H n/l per rail, l rails per host


def test_multiring_crosses_hosts_on_every_local_rank() -> None:
    hosts = HostMap.uniform(2, 4)
    orders = channel_orders(hosts)
    assert len(orders) == 4 and all(sorted(o) == list(range(8)) for o in orders)
    crossings = [(o[3], o[4]) for o in orders]  # leaving host 0 for host 1
    assert sorted(a for a, _ in crossings) == [0, 1, 2, 3] and sorted(b for _, b in crossings) == [4, 5, 6, 7]
    schedule = build_schedule("allreduce", "multiring", 8, hosts=hosts)
    senders = {
        rank
        for rank, steps in enumerate(schedule.steps)
        for step in steps
        for send in step.sends
        if hosts.host_of(send.peer) != hosts.host_of(rank)
    }
    assert senders == set(range(8))  # every local rank's NIC carries one channel


def test_one_host_and_one_rank_per_host_reduce_to_the_flat_ring() -> None:
    flat = build_schedule("allreduce", "ring", 5)
    for hosts in (HostMap.flat(5), HostMap.uniform(5, 1)):
        schedule = build_schedule("allreduce", "hierarchical", 5, hosts=hosts)
        assert schedule.num_messages() == flat.num_messages()
        assert max(len(s) for s in schedule.steps) == max(len(s) for s in flat.steps)


def test_host_map_forms_and_errors() -> None:
    assert HostMap.parse("2x4") == HostMap.uniform(2, 4) and HostMap.parse("2x4").spec() == "2x4"
    uneven = HostMap.parse("3, 2,3")
    assert uneven.hosts == ((0, 1, 2), (3, 4), (5, 6, 7)) and uneven.spec() == "3,2,3"
    assert uneven.host_of(4) == 1 and uneven.local_rank(4) == 1 and uneven.rail_member(1, 2) == 3
    assert HostMap.from_labels(["b", "a", "b", "a"]).hosts == ((0, 2), (1, 3))
    for bad in ("2x", "two", "0x3", "1,0"):
        with pytest.raises(InvalidArgumentError, match="hosts"):
            HostMap.parse(bad)
    with pytest.raises(InvalidArgumentError, match="every rank"):
        HostMap(((0, 1), (1, 2)))
    with pytest.raises(InvalidArgumentError, match="4 ranks"):
        build_schedule("allreduce", "hierarchical", 4, hosts=HostMap.uniform(2, 3))


def test_host_map_from_the_launchers_environment() -> None:
    assert host_map_from_env([0, 1, 2, 3], {"LOCAL_WORLD_SIZE": "2"}) == HostMap.uniform(2, 2)
    assert host_map_from_env([1, 3], {"LOCAL_WORLD_SIZE": "2"}) == HostMap.uniform(2, 1)  # a subgroup
    assert host_map_from_env([0, 1, 2], {"COMMLAB_HOSTS": "1,2"}).hosts == ((0,), (1, 2))
    assert host_map_from_env([0, 1], {}) is None
    # the busiest host's rank count, the same on every rank: on 3 + 1 hosts torchrun's LOCAL_WORLD_SIZE
    # is 3 on one host and 1 on the other, and a setting taken from it (the pieces) made ranks disagree
    assert most_local_ranks({"COMMLAB_HOSTS": "3,1", "LOCAL_WORLD_SIZE": "1"}) == 3
    assert most_local_ranks({"LOCAL_WORLD_SIZE": "2"}) == 2 and most_local_ranks({}) is None
    with pytest.raises(InvalidArgumentError, match="COMMLAB_HOSTS"):
        host_map_from_env([0, 5], {"COMMLAB_HOSTS": "2x2"})


def test_two_level_formulas_and_auto_across_hosts() -> None:
    """Fast inside hosts, slow between them: hierarchical and multiring beat the flat ring at large sizes,
    and auto takes a topology-aware algorithm there; on one host it never weighs them."""
    network = CostModel(alpha=5e-6, beta=1 / 12.5e9)  # 100 Gb/s per rank
    model = CostModel(alpha=2e-6, beta=1 / 300e9, inter=network)  # NVLink-class inside hosts
    hosts, n = HostMap.uniform(2, 8), 1 << 30
    ring = get_algorithm("ring").cost("allreduce", 16, n, model, hosts=hosts)
    hierarchical = get_algorithm("hierarchical").cost("allreduce", 16, n, model, 1, hosts)
    multiring = get_algorithm("multiring").cost("allreduce", 16, n, model, hosts=hosts)
    assert ring == pytest.approx(get_algorithm("ring").cost("allreduce", 16, n, network))
    # hierarchical: each rail carries n/8 across, 2(H-1)/H of it: n/8 bytes at 12.5 GB/s
    assert hierarchical == pytest.approx(
        2 * 7 * 2e-6 + 2 * (n * 7 / 8) / 300e9 + 2 * 5e-6 + (n / 8) / 12.5e9, rel=1e-9
    )
    assert ring > 5 * hierarchical and ring > 5 * multiring
    # pipelined over S segments: the phases A, B, C on n/S, A + B + C + (S - 1) max(B, A + C)
    a = 7 * 2e-6 + (n / 4 * 7 / 8) / 300e9
    b = 2 * 5e-6 + (n / 4 / 8) / 12.5e9
    piped = get_algorithm("hierarchical").cost("allreduce", 16, n, model, 4, hosts)
    assert piped == pytest.approx(2 * a + b + 3 * max(b, 2 * a), rel=1e-9)
    assert get_algorithm("hierarchical").cost("allreduce", 16, n, model, hosts=hosts) <= hierarchical
    assert choose("allreduce", 16, n, model, hosts).algorithm in ("hierarchical", "multiring")
    assert choose("allreduce", 16, n, model).algorithm not in ("hierarchical", "multiring")


def test_simulated_two_dgx_h100_nodes_topology_aware_beats_the_flat_ring() -> None:
    """2 x 8 H100 with one 400 Gb/s NIC per GPU, 1 GiB allreduce, flow fidelity: one flat ring funnels
    every byte through one NIC pair; one ring per NIC (multiring) and the hierarchical schedule spread it.
    The bound: a ring-based allreduce's busbw is at most min(NVLink per GPU, the node's NICs together)
    = min(450, 8 x 50) = 400 GB/s."""
    topology = parse_topology("cluster:nodes=2,gpu=h100,nic=ndr")
    assert topology.host_map() == HostMap.uniform(2, 8)
    n = 1 << 30
    busbw = {
        name: simulate_collective("allreduce", name, topology, n).busbw
        for name in ("ring", "hierarchical", "multiring")
    }
    assert busbw["multiring"] >= 5 * busbw["ring"] and busbw["hierarchical"] >= 5 * busbw["ring"], busbw
    assert 0.85 * 400e9 <= busbw["multiring"] <= 400e9 * 1.001, busbw


def test_torus_rows_are_the_hosts_of_the_2d_ring() -> None:
    topology = parse_topology("torus:dims=4x2")
    assert topology.host_map().hosts == ((0, 1, 2, 3), (4, 5, 6, 7))
    schedule = build_schedule("allreduce", "hierarchical", 8, hosts=topology.host_map())
    verify(schedule)
    result = simulate_collective("allreduce", "hierarchical", topology, 1 << 20, fidelity="congestion")
    assert result.time > 0 and result.busbw > 0


def test_tune_show_prints_auto_per_host_map(capsys) -> None:
    assert main(["tune", "--show", "--op", "allreduce", "--hosts", "2x2;3,1"]) == 0
    out = capsys.readouterr().out
    assert "2 hosts (2x2)" in out and "2 hosts (3,1)" in out and "(formulas)" in out
    with pytest.raises(SystemExit):
        main(["tune", "--show", "--hosts", "2y"])
    assert "HxL" in capsys.readouterr().err


def test_topology_files_keep_the_host_of_each_endpoint(tmp_path) -> None:
    """A topology file's `host` names (as `commlab testbed up` writes them) make the host map."""
    path = tmp_path / "two_hosts.toml"
    nodes = "".join(
        f'[[nodes]]\nname = "h{h}.r{r}"\nkind = "npu"\nhost = "h{h}"\n' for h in (0, 1) for r in (0, 1)
    )
    links = "".join(
        f'[[links]]\nsrc = "h{h}.r{r}"\ndst = "sw"\nbandwidth = "1Gb/s"\nlatency = "1us"\n'
        for h in (0, 1)
        for r in (0, 1)
    )
    path.write_text('name = "two hosts"\n[[nodes]]\nname = "sw"\nkind = "switch"\n' + nodes + links)
    assert load_topology(path).host_map() == HostMap.uniform(2, 2)
