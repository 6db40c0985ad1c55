"""The NCCL 2.27.7 tuner model against hand-computed cases from NCCL's formulas, presets, and the CLI.

Every expected number below is worked out by hand from NVIDIA/nccl v2.27.7-1 src/graph/tuning.cc
(ncclTopoTuneModel's bandwidth and latency, ncclTopoGetAlgoTime) and src/graph/search.cc (the speed arrays
and ncclTopoDupChannels); the comment by each says which formula. Floats compare with a 1e-9 relative
tolerance: the arithmetic is the same few multiplications in another order.
"""

from __future__ import annotations

import json
import math

import pytest

from commlab.cli import main
from commlab.errors import InvalidArgumentError
from commlab.sim.network import hardware
from commlab.sim.network import nccl_tuner as tuner
from commlab.sim.network.nccl import NcclCluster
from commlab.sim.network.nccl_model import VERSIONS, Calibration, NcclModel, check_version
from commlab.sim.network.systems import SYSTEMS, NodePreset

MIB, GIB = 1 << 20, 1 << 30


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9)


def h100(nodes: int, **kwargs) -> tuner.TunerInputs:
    return NcclModel.of("dgx-h100", nodes, calibration=Calibration(), **kwargs).inputs()


def test_graphs_follow_search_speeds_and_channel_duplication():
    """DGX H100 (18 links x 20.6 GB/s = 370.8 per GPU): on one node the first Hopper intra speed <= 370.8 is
    60, fitting 6 channels; ncclTopoDupChannels doubles them (60 >= 50) to 12 x 30. NVLS needs one channel
    per GPU: 8 x s <= 370.8 x 8/7 = 423.8 gives s = 50. Across nodes the first inter speed <= 50 (NDR) is
    48, one channel per NIC, not doubled (48 < 50 with more than 4 channels on Hopper)."""
    one = h100(1).graphs
    assert (one["ring"].channels, one["ring"].bw_intra) == (12, 30.0)
    assert (one["nvls"].channels, one["nvls"].bw_intra) == (8, 50.0)
    two = h100(2).graphs
    assert (two["ring"].channels, two["ring"].bw_intra, two["ring"].bw_inter) == (8, 48.0, 48.0)
    # A100 (12 x 20.0 = 240): Ampere speed 40 fits 6 channels, doubled (40 >= 25) to 12 x 20; no NVLS.
    a100 = NcclModel.of("dgx-a100", 1).inputs().graphs
    assert (a100["ring"].channels, a100["ring"].bw_intra) == (12, 20.0)
    assert "nvls" not in a100


def test_single_node_bandwidths_are_ncclTopoTuneModel():
    t = h100(1)
    ratio = 8 / 14  # ring: nRanks / nsteps, nsteps = 2(n-1) for allreduce
    # busBw = nChannels x bw = 12 x 30 = 360
    assert close(tuner.bandwidth(t, "allreduce", "ring", "Simple"), 360 * ratio)
    # ring LL: min(llMaxBw[Hopper][N1] = 141, busBw x 0.5)
    assert close(tuner.bandwidth(t, "allreduce", "ring", "LL"), 141 * ratio)
    # ring LL128: min(busBw x 0.92, nChannels x perChMaxRingLL128Bw[Hopper] = 12 x 36.7)
    assert close(tuner.bandwidth(t, "allreduce", "ring", "LL128"), 360 * 0.92 * ratio)
    # tree (14 channels x 30): min(420 x 0.92, 14 x 38.7) = 386.4, then x 0.5 (tree: bus to algorithm)
    assert close(tuner.bandwidth(t, "allreduce", "tree", "Simple"), 386.4 * 0.5)
    # NVLS allreduce: nChannels x min(bwIntra, bwInter) = 8 x 50, x 5/6
    assert close(tuner.bandwidth(t, "allreduce", "nvls", "Simple"), 400 * 5 / 6)
    # NVLS allgather: 8 x min(50 x 7/8, 50 x 0.9) = 350, no conversion for non-ring allgather
    assert close(tuner.bandwidth(t, "allgather", "nvls", "Simple"), 350.0)
    # broadcast: rings only, nsteps = nRanks so the ratio is 1
    assert close(tuner.bandwidth(t, "broadcast", "ring", "Simple"), 360.0)
    assert tuner.bandwidth(t, "broadcast", "tree", "Simple") == 0.0
    # NVLS has no LL/LL128; PAT needs one GPU per node
    assert tuner.bandwidth(t, "allreduce", "nvls", "LL") == 0.0
    assert tuner.bandwidth(t, "allgather", "pat", "Simple") == 0.0


def test_latencies_are_ncclTopoTuneModel():
    one, two, four = h100(1), h100(2), h100(4)
    # ring allreduce on NVLink: baseLat + nsteps x hwLat[NVLINK][RING]
    assert close(tuner.latency(one, "allreduce", "ring", "Simple"), 8.4 + 14 * 3.4)
    assert close(tuner.latency(one, "allreduce", "ring", "LL"), 6.6 + 14 * 0.6)
    # tree allreduce: baseLat + 2 x ((ppn-1) x intra + log2(nNodes) x inter)
    assert close(tuner.latency(one, "allreduce", "tree", "LL"), 6.8 + 2 * 7 * 0.6)
    # NVLS on one node: the NVLink hwLat alone (25 us)
    assert close(tuner.latency(one, "allreduce", "nvls", "Simple"), 25.0)
    # broadcast ring with sameChannels: baseLat + one hop
    assert close(tuner.latency(one, "broadcast", "ring", "Simple"), 8.4 + 3.4)
    # 2 nodes, ring Simple: intra = max(3.4, Intel net overhead 1 x 3), 2(nNodes-1) inter steps at 14
    assert close(tuner.latency(two, "allreduce", "ring", "Simple"), 8.4 + 28 * 3.4 + 2 * 14.0)
    # NVLS tree on 4 nodes: intra 25 + 2 x log2(4) x 14
    assert close(tuner.latency(four, "allreduce", "nvls_tree", "Simple"), 25 + 2 * 2 * 14.0)
    # and its bandwidth: 8 x min(48, 48/2) x 5/6 (bwInter halved beyond 2 nodes)
    assert close(tuner.bandwidth(four, "allreduce", "nvls_tree", "Simple"), 8 * 24 * 5 / 6)


def test_time_has_tree_correction_and_ring_plateau():
    one, two = h100(1), h100(2)
    # tree LL at 1 KiB: log2(1024 >> 6) = 4, treeCorrectionFactor[LL][4] = 0.9
    _, bw = tuner.time_parts(one, "allreduce", "tree", "LL", 1024)
    assert close(bw, min(386.4 / 3.8, 141.0) * 0.5 * 0.9)
    # ring Simple across nodes: latency x 1.4 (Hopper) once nBytes/(nChannels x nRanks) >= 64
    lat_small, _ = tuner.time_parts(two, "allreduce", "ring", "Simple", 8 * 16 * 63)
    lat_big, _ = tuner.time_parts(two, "allreduce", "ring", "Simple", 8 * 16 * 64)
    assert close(lat_small, 8.4 + 28 * 3.4 + 28.0)
    assert close(lat_big, (8.4 + 28 * 3.4 + 28.0) * 1.4)
    us = tuner.predicted_time_us(one, "allreduce", "nvls", "Simple", GIB)
    assert close(us, 25.0 + GIB / (1000 * 400 * 5 / 6))


def test_choices_on_h100():
    """8 H100: 1 KiB ring/LL (15.0 us + tiny vs tree/LL 15.2 us + more); 1 GiB NVLS (25 us + 2^30/333 kB/us
    beats ring's 56 us + 2^30/205.7); broadcast always a ring; 2 nodes without SHARP: no NVLS (needs
    CollNet across nodes) but NVLS tree at 1 GiB (320 GB/s beats ring 8 x 48 x 16/30 = 204.8)."""
    assert tuner.choose(h100(1), "allreduce", 1024)[:2] == ("ring", "LL")
    assert tuner.choose(h100(1), "allreduce", GIB)[:2] == ("nvls", "Simple")
    assert tuner.choose(h100(1), "broadcast", GIB)[:2] == ("ring", "Simple")
    assert tuner.choose(h100(1, nvls=False), "allreduce", GIB)[:2] == ("ring", "Simple")
    assert tuner.choose(h100(2), "allreduce", GIB)[:2] == ("nvls_tree", "Simple")
    assert tuner.bandwidth(h100(2), "allreduce", "nvls", "Simple") == 0.0


def test_nccl_algo_and_proto_settings_restrict_the_choice():
    """NCCL_ALGO / NCCL_PROTO as NCCL parses them (case-insensitive list, "^" excludes): the tuner picks the
    least time among what they allow. 8 H100, 1 GiB: NVLS without a setting; with NCCL_ALGO=Ring,Tree the
    ring (56 us + 2^30/205.7 beats the tree); with NCCL_PROTO=^Simple the ring's LL128 (Simple excluded)."""
    assert tuner.parse_selection("NCCL_ALGO", "Ring,Tree") == {"ring", "tree"}
    assert tuner.parse_selection("NCCL_ALGO", "^nvls,NVLSTree") == set(tuner.ALGORITHMS) - {
        "nvls",
        "nvls_tree",
    }
    assert tuner.parse_selection("NCCL_PROTO", None) == set(tuner.PROTOCOLS)
    assert tuner.parse_selection("NCCL_PROTO", "ll128") == {"LL128"}
    assert tuner.choose(h100(1), "allreduce", GIB)[:2] == ("nvls", "Simple")
    assert tuner.choose(h100(1, algorithms="Ring,Tree"), "allreduce", GIB)[:2] == ("ring", "Simple")
    assert tuner.choose(h100(1, algorithms="ring", protocols="^Simple"), "allreduce", GIB)[:2] == (
        "ring",
        "LL128",
    )
    # the allowed set is what the model predicts with, not only what it reports
    ring = NcclModel.of("dgx-h100", 1, algorithms="Ring").predict("allreduce", GIB)
    assert ring.algorithm == "ring" and ring.time > NcclModel.of("dgx-h100", 1).predict("allreduce", GIB).time
    for name, text in (
        ("NCCL_ALGO", "Rung"),
        ("NCCL_PROTO", "LL256"),
        ("NCCL_ALGO", "^" + ",".join(tuner.ALGORITHMS)),
    ):
        with pytest.raises(InvalidArgumentError, match=name):
            tuner.parse_selection(name, text)
    with pytest.raises(InvalidArgumentError, match="NCCL_ALGO"):
        NcclModel.of("dgx-h100", 1, algorithms="Rung")
    with pytest.raises(InvalidArgumentError, match=r"2\.27\.7"):
        NcclModel.of("azure-nd-a100-v4", 1, version="2.7.5", algorithms="Ring")
    # a setting that leaves no algorithm for an op: broadcast runs only as a ring
    with pytest.raises(InvalidArgumentError, match="op"):
        tuner.choose(h100(1, algorithms="Tree"), "broadcast", GIB)


def test_cli_nccl_algo_and_proto(capsys):
    args = ["sim", "collective", "--nccl-version", "2.27.7", "--system", "dgx-h100", "--size", "1G", "--json"]
    assert main([*args, "--nccl-algo", "Ring", "--nccl-proto", "LL128"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["results"][0]["algorithm"], out["results"][0]["protocol"]) == ("ring", "LL128")
    assert main([*args, "--nccl-algo", "Rung"]) != 0
    assert "NCCL_ALGO" in capsys.readouterr().err


def test_collnet_and_pat():
    # CollNet Direct, 2 DGX H100 with SHARP: 8 channels x 48 = 384; GPU/NIC ratio 1 (no penalty); x 0.85 on
    # Hopper; x 0.5. Latency: 2 x (min(1, ppn-1) x 3.7 + (ppn-1) x 0.4) + hwLat[NET][CollNetDirect] 31.
    t = h100(2, collnet=True)
    assert close(tuner.bandwidth(t, "allreduce", "collnet_direct", "Simple"), 384 * 0.85 * 0.5)
    assert close(tuner.latency(t, "allreduce", "collnet_direct", "Simple"), 2 * (3.7 + 7 * 0.4) + 31)
    # NVLS across nodes with CollNet: intra 25 + inter 18
    assert close(tuner.latency(t, "allreduce", "nvls", "Simple"), 25.0 + 18.0)
    assert tuner.bandwidth(h100(2), "allreduce", "collnet_direct", "Simple") == 0.0
    # PAT: 4 nodes of one H100 and one NDR NIC. The 48 GB/s channel is doubled (bwIntra >= 25, one
    # channel) to 2 x 24; PAT: x 0.75, no conversion. Latency: 8 + log2(4) x 14/3.5 + 4 x 2.8 (ppn = 1 uses
    # the tree's net latency).
    single = NodePreset("one-h100", "h100", 1, "ndr", 1)
    t = NcclModel.of(single, 4, calibration=Calibration()).inputs()
    assert close(tuner.bandwidth(t, "allgather", "pat", "Simple"), 2 * 24 * 0.75)
    assert close(tuner.latency(t, "allgather", "pat", "Simple"), 8 + 2 * 14 / 3.5 + 4 * 2.8)
    assert tuner.bandwidth(t, "allreduce", "pat", "Simple") == 0.0


def test_prediction_applies_calibration_and_alltoall_model():
    plain = NcclModel.of("dgx-h100", 1, calibration=Calibration())
    p = plain.predict("allreduce", GIB)
    assert close(p.time, p.nccl_time)  # no fitted constant: NCCL's own model
    cal = Calibration({"nvls": 0.5}, launch=10e-6, latency_scale=2.0)
    q = NcclModel.of("dgx-h100", 1, calibration=cal).predict("allreduce", GIB)
    assert close(q.time, (2 * 25.0 + GIB / (1000 * 400 * 5 / 6 * 0.5)) * 1e-6 + 10e-6)
    # all-to-all, 2 nodes: a rank's 8 off-node blocks over its NIC (50 GB/s) dominate 7 NVLink blocks
    two = NcclModel.of("dgx-h100", 2, calibration=Calibration())
    a2a = two.predict("alltoall", 16 * 1024 * 1024)
    block = 1024 * 1024
    assert close(a2a.time, 14e-6 + block * 8 / 50e9)
    assert a2a.algorithm == "p2p"


def test_launch_scales_with_the_gpus_one_thread_drives(capsys):
    # nccl-tests -g g: one thread launches g kernels per call, so the call costs g launches (3 us each here)
    cal = Calibration(launch=3e-6)
    one = NcclModel.of("dgx-h100", 1, calibration=cal).predict("allreduce", MIB)
    four = NcclModel.of("dgx-h100", 1, calibration=cal, gpus_per_thread=4).predict("allreduce", MIB)
    assert close(four.time - one.time, 9e-6)  # (4 - 1) x 3 us
    assert close(one.time, one.nccl_time + 3e-6)  # Calibration's scale and efficiencies are 1 here
    for bad in (0, 9, True, 2.0):  # a DGX H100 node has 8 GPUs
        with pytest.raises(InvalidArgumentError, match="gpus_per_thread"):
            NcclModel.of("dgx-h100", 1, gpus_per_thread=bad)
    args = ["sim", "collective", "--nccl-version", "2.27.7", "--system", "dgx-h100", "--size", "1M", "--json"]
    assert main([*args, "--gpus-per-thread", "8"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["gpus_per_thread"] == 8


def test_versions_and_errors():
    assert "2.7.5" in VERSIONS and check_version("2.27.7") == "2.27.7"
    with pytest.raises(InvalidArgumentError, match=r"2\.27\.7.*2\.7\.5"):
        NcclModel.of("dgx-h100", 1, version="2.9")
    with pytest.raises(InvalidArgumentError, match="allreduce"):
        NcclModel.of("azure-nd-a100-v4", 1, version="2.7.5").choose("allgather", 1024)
    with pytest.raises(InvalidArgumentError, match="dgx-h100"):
        NcclModel.of("no-such-system", 1)
    with pytest.raises(InvalidArgumentError, match="nodes"):
        NcclModel.of("dgx-h100", 0)
    # the 2.7.5 choice is the earlier module's tuner
    legacy = NcclModel.of("azure-nd-a100-v4", 2, version="2.7.5").choose("allreduce", 1 << 20)
    assert legacy[:2] == NcclCluster(2).system().choose(1 << 20)


@pytest.mark.parametrize("name", list(SYSTEMS))
def test_every_preset_predicts_every_collective(name):
    model = NcclModel.of(name, 2)
    for op in ("allreduce", "allgather", "reduce_scatter", "broadcast", "reduce", "alltoall"):
        p = model.predict(op, 64 << 20)
        assert p.time > 0 and p.busbw > 0, (name, op)


def test_new_hardware_presets_load():
    assert hardware.accelerator("b200").nvlink.name == "nvlink5"
    assert hardware.accelerator("gb200").nvlink_links == 18
    for nic in ("roce-200", "roce-400", "efa-100", "efa-200", "xdr"):
        assert hardware.nic(nic).bandwidth > 0
    assert SYSTEMS["p5"].nic_link().bandwidth == 4 * 100e9 / 8  # 4 EFA devices fused per GPU
    assert SYSTEMS["gb200-nvl72"].gpus == 72


def test_cli_nccl_version(capsys):
    args = ["sim", "collective", "--nccl-version", "2.27.7", "--system", "dgx-h100", "--nodes", "2"]
    assert main([*args, "--op", "allgather", "--size", "1M,1G", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == {"system": "dgx-h100", "nodes": 2, "nccl_version": "2.27.7"}
    assert [r["nbytes"] for r in out["results"]] == [1 << 20, GIB]
    assert out["results"][1]["algorithm"] == "ring"
    assert main([*args, "--size", "1M"]) == 0
    assert "NCCL 2.27.7 model" in capsys.readouterr().out
    topo = ["sim", "collective", "--nccl-version", "2.27.7", "--topology", "cluster:nodes=2,gpu=h100,nic=ndr"]
    assert main([*topo, "--size", "1G"]) == 0
    assert "16 ranks" in capsys.readouterr().out


def test_cli_bad_version_lists_accepted(capsys):
    rc = main(["sim", "collective", "--nccl-version", "2.9", "--system", "dgx-h100", "--size", "1M"])
    assert rc != 0
    err = capsys.readouterr().err
    assert "nccl_version='2.9'" in err and "'2.27.7'" in err and "'2.7.5'" in err
