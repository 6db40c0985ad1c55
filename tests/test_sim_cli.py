"""`commlab sim collective` and `commlab sim topology`, and the Chrome trace they write."""

from __future__ import annotations

import json

import pytest

from commlab.cli import main
from commlab.sim.network import topology as topo
from commlab.sim.network.collective import simulate_collective
from commlab.sim.network.topology import Topology
from commlab.sim.network.trace import chrome_trace


def test_collective_table(capsys):
    args = ["sim", "collective", "--topology", "fat-tree:k=4", "--algorithm", "ring,tree,halving_doubling"]
    assert main([*args, "--size", "1K:1M:32", "--fidelity", "flow"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("# commlab sim collective: allreduce on fat-tree k=4, 16 ranks, fidelity flow")
    rows = [line.split() for line in out if not line.startswith("#")]
    assert len(rows) == 3 * 3
    assert {r[3] for r in rows} == {"ring", "tree", "halving_doubling"}
    assert [int(r[0]) for r in rows[::3]] == [1024, 32768, 1048576]


def test_collective_json_trace_and_plot(tmp_path, capsys):
    trace, plot = tmp_path / "t.json", tmp_path / "p.png"
    args = ["sim", "collective", "--topology", "ring:n=4", "--op", "reduce_scatter", "--size", "64K,1M"]
    assert (
        main([*args, "--fidelity", "congestion", "--json", "--trace", str(trace), "--plot", str(plot)]) == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert data["topology"]["ranks"] == 4
    assert {r["algorithm"] for r in data["results"]} == {
        "ring", "halving_doubling", "direct", "hierarchical", "multiring"
    }  # fmt: skip
    assert all(r["busbw_GBps"] > 0 for r in data["results"])
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e["ph"] == "X" for e in events) and any(e["ph"] == "C" for e in events)
    pytest.importorskip("matplotlib")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_topology_summary_and_drawing(tmp_path, capsys):
    assert main(["sim", "topology", "--topology", "cluster:nodes=2", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["ranks"], info["bisection_bandwidth"]) == (16, pytest.approx(200e9))
    assert main(["sim", "topology", "--topology", "torus:dims=3x3"]) == 0
    out = capsys.readouterr().out
    assert "diameter        2 hops" in out and "bisection" in out
    pytest.importorskip("matplotlib")
    path = tmp_path / "topo.png"
    assert main(["sim", "topology", "--topology", "fat-tree:k=4", "--plot", str(path)]) == 0
    assert path.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["collective", "--topology", "fat-tree:k=5"], "k=5"),
        (["collective", "--topology", "ring:n=4", "--algorithm", "nope"], "algorithm='nope'"),
        (["collective", "--topology", "ring:n=4", "--size", "1G:1K"], "size='1G:1K'"),
        (["collective", "--topology", "ring:n=4", "--fidelity", "analytic", "--trace", "x.json"], "analytic"),
        (["topology", "--topology", "missing.toml"], "cannot read"),
    ],
)
def test_errors_are_one_line_and_exit_2(capsys, args, message):
    assert main(["sim", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("commlab sim: error:") and message in err


def test_trace_has_a_slice_per_step_with_bytes_and_peers():
    t = Topology(topo.ring(4))
    result = simulate_collective("allreduce", "ring", t, 4096, fidelity="flow")
    events = chrome_trace(result)["traceEvents"]
    slices = [e for e in events if e["ph"] == "X"]
    assert len(slices) == result.routed.plan.num_steps == 4 * 6
    first = next(e for e in slices if e["tid"] == 0 and e["name"] == "step 0")
    assert first["args"] == {"bytes_sent": 1024, "bytes_received": 1024, "peers": [1, 3]}
    names = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert names == {"rank 0", "rank 1", "rank 2", "rank 3"}
