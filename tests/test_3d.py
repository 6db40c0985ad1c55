"""Training under dp x pp x tp equals one process: losses and final parameters.

Every rank builds the model from seed SEED + dp_rank (so DataParallel's broadcast is exercised; tensor and
pipeline peers of one replica share the seed), keeps its tensor-parallel shard and pipeline stage, and
trains on its data-parallel share of fixed global batches with SGD + momentum and a gradient-norm clip
that is active. The reference trains seed SEED on the whole batches in this process. A rank returns the
losses (rank-averaged) and its parameters by their names in the whole model; shards are compared with
the matching slice of the reference.

Both run in float64 and compare at the bound of 3 SGD steps whose gradients differ only by summation order
(tests/numerics.py), doubled for the clip (it scales a difference by at most 2 CLIP / |g|, < 2 here): about
5e-12. A float32 comparison would depend on the CPU's kernels; a wrong shard or a missed gradient moves
weights by ~lr = 0.1.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import commlab
from commlab.models import GPT, GPTConfig, ViT, ViTConfig
from commlab.parallel import Pipeline, tensor_parallel_layers
from commlab.parallel.sequence import sequence_parallel_layers
from tests.numerics import float64, sgd_tolerance
from tests.test_data_parallel import make_batches, shard
from tests.test_tensor_parallel import mesh_of, my_slice

pytestmark = pytest.mark.numerics

SEED, STEPS, GLOBAL_BATCH = 100, 3, 8
LR, MOMENTUM = 0.1, 0.9
TOLERANCE = sgd_tolerance(STEPS, LR, MOMENTUM, clip_gain=2.0)
ROOT = Path(__file__).resolve().parent.parent
CLIP = 0.5  # below the gradient norms (tiny GPT about 0.61-0.63, ViT 2.2-2.8): every step is clipped


def build(kind: str, seed: int, layers=None, checkpoint: str = "none", n_layer: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "gpt":
        return GPT(GPTConfig.preset("tiny", checkpoint=checkpoint, n_layer=n_layer), layers)
    return ViT(ViTConfig.preset("tiny", checkpoint=checkpoint, n_layer=n_layer), layers)


def optimizer(params) -> torch.optim.Optimizer:
    """SGD with momentum: Adam would divide each gradient entry by its own magnitude, so reduction-order
    differences of 1e-9 on entries near 1e-8 (TP splits matmul sums) would move updates by ~1e-5."""
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=0.01)


@float64()
def reference(kind: str, checkpoint: str = "none") -> tuple[list[float], dict[str, torch.Tensor]]:
    model = build(kind, SEED, checkpoint=checkpoint)
    opt = optimizer(model.parameters())
    losses = []
    for inputs, targets in make_batches(kind):
        loss = model(inputs, targets)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


@float64()
def train_3d(
    kind: str, dp: int, pp: int, tp: int, micro: int = 2, schedule: str = "1f1b", checkpoint: str = "none",
    sequence_parallel: bool = False,
) -> tuple[list[float], dict[str, tuple[torch.Tensor, tuple | None]]]:  # fmt: skip
    """Runs on every rank: train under the layout; returns mean losses and {name: (param, shard_of)}."""
    mesh = mesh_of(dp, pp, tp)
    layers = (sequence_parallel_layers if sequence_parallel else tensor_parallel_layers)(mesh.tp_group)
    model = build(kind, SEED + mesh.dp_rank, layers, checkpoint)
    pipeline = Pipeline(model, mesh, micro_batches=micro, schedule=schedule, bucket_mb=0.01)
    opt = optimizer(pipeline.parameters())
    losses = []
    for batch in make_batches(kind):
        loss = pipeline.train_step(*shard(batch, mesh.dp_rank, dp))
        pipeline.clip_grad_norm_(CLIP)
        opt.step()
        opt.zero_grad()
        report = loss.item() if loss is not None and mesh.tp_rank == 0 else 0.0
        mean = torch.tensor([report / dp], dtype=torch.float64)
        commlab.all_reduce(mean, group=mesh.world_group)
        losses.append(mean.item())
    params = {n: (p.detach().clone(), getattr(p, "shard_of", None)) for n, p in pipeline.named_parameters()}
    return losses, params


def assert_matches(
    results: list, expected: tuple[list[float], dict[str, torch.Tensor]], tolerance: float | None = None
) -> None:
    """Every rank's losses equal the reference; every parameter of the model is held and equal, within
    `tolerance` (default: this module's SGD bound; tests of other optimizers pass their own)."""
    tolerance = TOLERANCE if tolerance is None else tolerance
    want_losses, want_params = expected
    seen = set()
    for losses, params in results:
        torch.testing.assert_close(
            torch.tensor(losses), torch.tensor(want_losses), rtol=tolerance, atol=tolerance
        )
        for name, (param, shard_of) in params.items():
            holder = type("P", (), {"shard_of": shard_of, "shape": param.shape})
            want = my_slice(want_params[name], holder)
            assert param.dtype == want.dtype == torch.float64, name
            torch.testing.assert_close(param, want, rtol=tolerance, atol=tolerance, msg=name)
            seen.add(name)
    assert seen == set(want_params), set(want_params) ^ seen


@pytest.mark.parametrize(
    ("tp", "pp", "dp"), [(2, 1, 1), (1, 2, 1), (1, 2, 2), (2, 1, 2), (2, 2, 1)], ids=lambda v: str(v)
)
def test_gpt_layouts_match_one_process(rank_pools, tp, pp, dp):
    expected = reference("gpt")
    assert_matches(rank_pools(tp * pp * dp).run(train_3d, "gpt", dp, pp, tp), expected)


def test_gpt_on_eight_ranks_dp2_pp2_tp2_gpipe_with_checkpointing(rank_pools):
    expected = reference("gpt")
    results = rank_pools(8).run(train_3d, "gpt", 2, 2, 2, micro=2, schedule="gpipe", checkpoint="full")
    assert_matches(results, expected)


def test_gpt_sequence_parallel_matches_one_process(rank_pools):
    expected = reference("gpt", checkpoint="selective")
    results = rank_pools(4).run(train_3d, "gpt", 1, 2, 2, checkpoint="selective", sequence_parallel=True)
    assert_matches(results, expected)


def test_vit_tensor_and_pipeline_parallel_matches_one_process(rank_pools):
    expected = reference("vit")
    assert_matches(rank_pools(4).run(train_3d, "vit", 1, 2, 2, micro=4, checkpoint="selective"), expected)


def mpiexec() -> str | None:
    found = Path(sys.executable).parent / "mpiexec"
    return str(found) if found.exists() else shutil.which("mpiexec")


@pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None or mpiexec() is None, reason="needs mpi4py")
def test_layout_on_the_mpi_transport_matches_one_process():
    """The mesh on MPI communicators (Split per axis), the pipeline's messages on the MPI transport."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [mpiexec(), "-n", "4", sys.executable, "-m", "tests.test_3d"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "matches one process" in done.stdout


if __name__ == "__main__":  # mpiexec -n 4 python -m tests.test_3d: dp 1 x pp 2 x tp 2 on MPI
    from mpi4py import MPI

    results = MPI.COMM_WORLD.gather(train_3d("gpt", 1, 2, 2))
    if MPI.COMM_WORLD.Get_rank() == 0:
        assert_matches(results, reference("gpt"))
        print(f"MPI mesh dp 1 x pp 2 x tp 2 matches one process: losses {results[0][0]}")
