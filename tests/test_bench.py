"""`commlab bench`: argument errors, the size sweep, and short real sweeps on gloo and MPI ranks.

Sweeps are tiny (a few sizes, one repetition): these tests check the table, the JSON, the plot and the
data check (#wrong), never the speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from commlab.bench.config import BenchConfig, parse_size
from commlab.bench.launch import free_port
from commlab.bench.worker import expected, pattern
from commlab.cli import main

ROOT = Path(__file__).resolve().parent.parent
TINY = ["-b", "1K", "-e", "16K", "-f", "16", "--iters", "2", "--warmup", "1", "--repeats", "1"]


def bench(*args: str, timeout: float = 180, env: dict | None = None) -> str:
    """stdout of `python -m commlab.cli bench ARGS` (it launches its own ranks)."""
    command = [sys.executable, "-m", "commlab.cli", "bench", *args, "--no-progress"]
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env=env or dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr[-4000:]}"
    return done.stdout


def rows_of(table: str) -> list[list[str]]:
    return [line.split() for line in table.splitlines() if line and not line.startswith("#")]


def test_sizes_and_units() -> None:
    assert parse_size("8") == 8 and parse_size("4K") == 4096 and parse_size("64M") == 64 << 20
    assert BenchConfig(min_bytes=8, max_bytes=64, factor=2).sizes() == [8, 16, 32, 64]
    assert BenchConfig(min_bytes=1024, max_bytes=1024, factor=1).sizes() == [1024]


@pytest.mark.parametrize("redop", ["sum", "max", "min", "prod", "avg"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.uint8, torch.int8, torch.int64])
def test_expected_values_are_exact_reductions(redop: str, dtype: torch.dtype) -> None:
    if redop == "avg" and not dtype.is_floating_point:
        return
    world = 5
    inputs = torch.stack([pattern(r, 3, 100, redop, dtype).double() for r in range(world)])
    reduce = {"sum": inputs.sum(0), "avg": inputs.mean(0), "max": inputs.max(0).values,
              "min": inputs.min(0).values, "prod": inputs.prod(0)}[redop]  # fmt: skip
    assert torch.equal(expected(world, 3, 100, redop, dtype), reduce.to(dtype))
    assert inputs.abs().max() <= 10  # small integers: every reduction above is exact in every dtype


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "allreduce", "--algorithm", "bruck"], "--algorithm='bruck'"),
        (["bench", "allreduce", "-b", "1M", "-e", "1K"], "-e/--maxbytes"),
        (["bench", "allreduce", "--dtype", "int32", "--op", "avg"], "--op='avg'"),
    ],
)
def test_bad_arguments_name_the_value_and_what_is_accepted(argv: list[str], message: str, capsys) -> None:
    assert main(argv) == 2  # one line on stderr, no traceback
    err = capsys.readouterr().err
    assert err.startswith("commlab bench: error:") and "accepted" in err and message in err


def test_bad_size_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["bench", "allreduce", "-b", "lots"])
    assert info.value.code == 2
    assert "accepted: a byte count like 8, 4K, 64M, 1G" in capsys.readouterr().err


@pytest.mark.timing
def test_gloo_sweep_of_every_algorithm_with_json_and_plot(tmp_path) -> None:
    path, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    try:
        import matplotlib  # noqa: F401

        plotting = ["--plot", str(plot)]
    except ImportError:  # --plot needs matplotlib, which commlab does not depend on
        plotting = []
    out = bench("allreduce", *TINY, "--algorithm", "all", "-n", "3", "--json", str(path), *plotting)
    rows = rows_of(out)
    assert len(rows) == 2 * 8  # two sizes x (auto + seven algorithms)
    assert "# Out of bounds values : 0 OK" in out and "(native)" in out
    document = json.loads(path.read_text())
    assert document["config"]["world_size"] == 3 and document["machine"]["logical_cores"] >= 1
    for row in document["rows"]:
        assert row["wrong"] == 0 and row["time_us"] > 0 and row["native_time_us"] > 0
        assert row["busbw"] == pytest.approx(row["algbw"] * 2 * 2 / 3)
        assert row["ratio"] == pytest.approx(row["native_time_us"] / row["time_us"])
    assert {r["algorithm"] for r in document["rows"]} == {
        "auto", "ring", "tree", "halving_doubling", "recursive_doubling", "direct",
        "hierarchical", "multiring",
    }  # fmt: skip
    if plotting:
        assert plot.stat().st_size > 1000


@pytest.mark.timing
def test_mpi_sweeps_launched_by_bench(tmp_path) -> None:
    pytest.importorskip("mpi4py")
    path = tmp_path / "mpi.json"
    out = bench("broadcast", *TINY, "--backend", "mpi", "-n", "3", "--root", "2", "--json", str(path))
    assert "backend mpi" in out and "# Out of bounds values : 0 OK" in out
    rows = json.loads(path.read_text())["rows"]
    assert all(r["wrong"] == 0 and r["root"] == 2 and "native_time_us" in r for r in rows)
    out = bench("reduce", *TINY, "--backend", "mpi", "-n", "2", "--dtype", "bfloat16", "--algorithm", "tree")
    assert "n/a" in out and "# Out of bounds values : 0 OK" in out  # MPI has no bfloat16 reduction


@pytest.mark.timing
def test_runs_inside_mpiexec_and_torchrun_style_launchers() -> None:
    pytest.importorskip("mpi4py")
    from commlab.bench.launch import find_mpiexec

    command = [find_mpiexec(), "-n", "2", sys.executable, "-m", "commlab.cli", "bench", "allgather", *TINY,
               "--algorithm", "bruck", "--no-progress"]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "2 ranks, backend mpi" in done.stdout and "# Out of bounds values : 0 OK" in done.stdout
    rows = rows_of(done.stdout)
    assert rows[0][0] == "1024" and rows[0][1] == "128"  # allgather: total bytes, elements per rank
    # torchrun's environment: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    port = str(free_port())
    env = dict(os.environ, OMP_NUM_THREADS="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    argv = [sys.executable, "-m", "commlab.cli", "bench", "allreduce", *TINY, "--no-progress"]
    procs = [
        subprocess.Popen(argv, cwd=ROOT, env=dict(env, RANK=str(r)), stdout=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert "2 ranks, backend gloo" in outs[0] and "# Out of bounds values : 0 OK" in outs[0]
    assert outs[1] == ""  # only rank 0 prints
