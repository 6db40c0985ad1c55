"""BERT: masking statistics, the masked-only loss, and training under DP, TP (+SP), PP and 3D equal to one
process.

Equivalence runs in float64 with AdamW for 3 steps, so the tolerance follows from the arithmetic and holds
on any CPU (tests/numerics.py). A parallel run sums the same products as one process in another order (TP
splits matmul sums, DP and PP average shard means, SP reduce-scatters, the GEMM kernels block differently
per CPU); a sum of <= 1024 terms then moves by at most 2 x 1023 x 2^-53 x 4 = 9e-13 (Higham, sec. 4.2).
AdamW's update lr m / (sqrt(v) + eps) can amplify a gradient difference by up to lr / eps (1e-2 / 1e-8
= 1e6, an entry whose v is tiny), so after 3 steps the weights differ by at most 3 x 1e6 x 9e-13 = 2.7e-6
(`adam_tolerance`): the bound for losses and every parameter. A real bug moves weights by ~lr = 1e-2. In
fp32 (u = 2^-24) the same amplification reaches ~lr itself, which is why fp32 AdamW multi-step comparisons
at 1e-6 fail on some CPUs (AVX-512 sums in another order than AVX2).
"""

from __future__ import annotations

import math

import pytest
import torch

import commlab
from commlab.errors import CommlabError
from commlab.models import BERT, IGNORE_INDEX, BERTConfig, ByteCorpus, mask_tokens, masked_accuracy, mlm_batch
from commlab.models.mlm import MASK_FRACTION, masked_count
from commlab.parallel import Pipeline, tensor_parallel_layers
from commlab.parallel.sequence import sequence_parallel_layers
from tests.numerics import adam_tolerance
from tests.test_3d import assert_matches
from tests.test_data_parallel import shard
from tests.test_tensor_parallel import mesh_of

SEED, STEPS, GLOBAL_BATCH, SEQ = 100, 3, 8, 32
LR, EPS = 1e-2, 1e-8  # AdamW
TOLERANCE = adam_tolerance(STEPS, LR, EPS)
MASK_ID = 256


# --- masking -----------------------------------------------------------------------------------------


def test_masking_statistics_follow_bert():
    """15% of each sequence's positions exactly; of those, 80% [MASK], 10% random, 10% kept, each within
    5 standard deviations of its binomial count (seeded: the draw is fixed, the bound is the argument that
    a correct sampler passes; a wrong rule, e.g. 70/20/10, is > 30 standard deviations out)."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (400, 128), generator=g)
    inputs, targets = mask_tokens(tokens, MASK_ID, g)
    chosen = targets != IGNORE_INDEX
    k = masked_count(128)
    assert k == round(MASK_FRACTION * 128) == 19
    assert (chosen.sum(dim=1) == k).all()
    assert torch.equal(targets[chosen], tokens[chosen])
    assert torch.equal(inputs[~chosen], tokens[~chosen])  # unchosen positions are never touched
    n = int(chosen.sum())
    masked = int((inputs[chosen] == MASK_ID).sum())
    kept = int((inputs[chosen] == tokens[chosen]).sum())
    replaced = n - masked - kept
    # A random byte equals the original with probability 1/256: it then counts as kept.
    for count, p in ((masked, 0.8), (replaced, 0.1 * 255 / 256), (kept, 0.1 + 0.1 / 256)):
        assert abs(count - n * p) < 5 * math.sqrt(n * p * (1 - p)), (count, n * p)
    # Positions are chosen uniformly: each column's count is binomial(400, k / 128).
    per_column, p = chosen.sum(dim=0).double(), k / 128
    assert (per_column - 400 * p).abs().max() < 5 * math.sqrt(400 * p * (1 - p))
    # Random replacements are bytes, spread over the byte range.
    random_ids = inputs[chosen & (inputs != MASK_ID) & (inputs != tokens)]
    assert random_ids.max() < 256 and len(random_ids.unique()) > 200


def test_mlm_batch_shards_stack_to_the_one_process_batch():
    corpus = ByteCorpus(bytes(range(256)) * 40)
    whole = mlm_batch(corpus.train, 3, 8, 16, MASK_ID, seed=1)
    parts = [mlm_batch(corpus.train, 3, 8, 16, MASK_ID, seed=1, rank=r, world=4) for r in range(4)]
    for i in range(2):
        assert torch.equal(torch.cat([p[i] for p in parts]), whole[i])
    assert not torch.equal(mlm_batch(corpus.train, 4, 8, 16, MASK_ID, seed=1)[0], whole[0])


def test_loss_is_on_masked_positions_only():
    torch.manual_seed(0)
    model = BERT(BERTConfig.preset("tiny")).double()
    ids = torch.randint(0, 256, (2, SEQ))
    targets = torch.full_like(ids, IGNORE_INDEX)
    targets[0, 3], targets[1, 7] = 65, 66
    logits, loss = model(ids, targets)
    want = torch.nn.functional.cross_entropy(logits[[0, 1], [3, 7]], torch.tensor([65, 66]))
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
    assert masked_accuracy(logits, targets)[1] == 2


def test_config_is_validated():
    for field, value in (("positions", "sinusoidal"), ("mask_id", 264), ("n_segments", -1), ("norm", "x")):
        with pytest.raises(CommlabError, match=field):
            BERTConfig.preset("tiny", **{field: value})


def test_segments_and_learned_positions_enter_the_embedding():
    torch.manual_seed(0)
    model = BERT(BERTConfig.preset("tiny", positions="learned", n_segments=2)).double()
    ids = torch.randint(0, 256, (2, SEQ))
    zeros, ones = torch.zeros_like(ids), torch.ones_like(ids)
    torch.testing.assert_close(model(ids)[0], model(ids, segments=zeros)[0], rtol=0, atol=0)
    assert not torch.allclose(model(ids, segments=ones)[0], model(ids)[0])
    with pytest.raises(CommlabError, match="segments"):
        model(ids, segments=zeros[:, :-1])


# --- one process equals every layout ------------------------------------------------------------------


def build(seed: int, layers=None, **overrides) -> BERT:
    torch.manual_seed(seed)
    return BERT(BERTConfig.preset("tiny", **overrides), layers).double()


def make_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    return [
        mask_tokens(torch.randint(0, 256, (GLOBAL_BATCH, SEQ), generator=g), MASK_ID, g) for _ in range(STEPS)
    ]


def optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=LR, eps=EPS, weight_decay=0.01)


def reference(**overrides) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = build(SEED, **overrides)
    opt = optimizer(model.parameters())
    losses = []
    for inputs, targets in make_batches():
        loss = model(inputs, targets)[1]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def train_layout(
    dp: int, pp: int, tp: int, sequence_parallel: bool = False, micro: int = 2, **overrides
) -> tuple[list[float], dict[str, tuple[torch.Tensor, tuple | None]]]:
    """Runs on every rank: BERT under the layout (each dp replica built from its own seed, so DataParallel's
    start-up broadcast is exercised); returns the mean losses and {name: (param, shard_of)}."""
    mesh = mesh_of(dp, pp, tp)
    layers = (sequence_parallel_layers if sequence_parallel else tensor_parallel_layers)(mesh.tp_group)
    model = build(SEED + mesh.dp_rank, layers, **overrides)
    pipeline = Pipeline(model, mesh, micro_batches=micro, bucket_mb=0.01)
    opt = optimizer(pipeline.parameters())
    losses = []
    for batch in make_batches():
        loss = pipeline.train_step(*shard(batch, mesh.dp_rank, dp))
        opt.step()
        opt.zero_grad()
        report = loss.item() if loss is not None and mesh.tp_rank == 0 else 0.0
        mean = torch.tensor([report / dp], dtype=torch.float64)
        commlab.all_reduce(mean, group=mesh.world_group)
        losses.append(mean.item())
    params = {n: (p.detach().clone(), getattr(p, "shard_of", None)) for n, p in pipeline.named_parameters()}
    return losses, params


LAYOUTS = {  # id: (dp, pp, tp, sequence parallel, model overrides)
    "dp2": (2, 1, 1, False, {}),
    "tp2": (1, 1, 2, False, {"checkpoint": "selective"}),
    "tp2-sp-learned-positions-segments": (1, 1, 2, True, {"positions": "learned", "n_segments": 2}),
    "pp2-linear-attention": (1, 2, 1, False, {"attention": "linear", "checkpoint": "full"}),
    "tp2-sp-linear-attention": (1, 1, 2, True, {"attention": "linear"}),
    "dp2-pp2": (2, 2, 1, False, {}),
}


@pytest.mark.numerics
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_bert_layouts_match_one_process(rank_pools, layout):
    dp, pp, tp, sp, overrides = LAYOUTS[layout]
    expected = reference(**overrides)
    assert_matches(
        rank_pools(dp * pp * tp).run(train_layout, dp, pp, tp, sp, **overrides), expected, TOLERANCE
    )


@pytest.mark.numerics
def test_bert_3d_dp2_pp2_tp2_sequence_parallel_matches_one_process(rank_pools):
    expected = reference(checkpoint="selective")
    results = rank_pools(8).run(train_layout, 2, 2, 2, True, checkpoint="selective")
    assert_matches(results, expected, TOLERANCE)
