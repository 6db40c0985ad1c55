"""GPT and ViT: RoPE, exact parameter counts, causality, checkpointing equivalence, learning, bad configs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from commlab.errors import CommlabError
from commlab.models import (
    GPT,
    GPT_PRESETS,
    VIT_PRESETS,
    GPTConfig,
    Layers,
    ViT,
    ViTConfig,
    apply_rope,
    parameter_count,
    rope_frequencies,
    training_flops_per_token,
)
from commlab.models.gpt import Attention
from tests.numerics import float64, one_pass_tolerance

pytestmark = pytest.mark.numerics

ONE_PASS = one_pass_tolerance()  # checkpointing and head shards reorder sums only (tests/numerics.py)


def build_gpt(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig.preset("tiny", **overrides))


def random_tokens(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


def test_rope_scores_depend_only_on_position_offset():
    gen = torch.Generator().manual_seed(0)
    head_dim = 16
    q, k = (
        torch.randn(head_dim, generator=gen, dtype=torch.float64),
        torch.randn(head_dim, dtype=torch.float64),
    )
    cos, sin = rope_frequencies(head_dim, 64)
    cos, sin = cos.double(), sin.double()

    def score(m: int, n: int) -> torch.Tensor:
        return apply_rope(q, cos[m], sin[m]) @ apply_rope(k, cos[n], sin[n])

    for m, n in [(3, 1), (10, 2), (5, 5), (0, 7)]:
        for shift in (1, 13, 40):
            torch.testing.assert_close(score(m, n), score(m + shift, n + shift), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(score(3, 1), score(4, 1))  # the offset does matter
    torch.testing.assert_close(apply_rope(q, cos[9], sin[9]).norm(), q.norm())  # a rotation


def test_rope_frequencies_accept_explicit_positions():
    cos, sin = rope_frequencies(8, torch.tensor([0, 5]))
    full_cos, full_sin = rope_frequencies(8, 6)
    torch.testing.assert_close(cos, full_cos[[0, 5]])
    torch.testing.assert_close(sin, full_sin[[0, 5]])
    assert torch.equal(cos[0], torch.ones(4)) and torch.equal(sin[0], torch.zeros(4))


@pytest.mark.parametrize(
    "overrides",
    [{}, {"norm": "layernorm"}, {"tie_embeddings": False}, {"d_ff": 48, "n_layer": 3}],
    ids=["tiny", "layernorm", "untied", "d_ff"],
)
def test_parameter_count_matches_built_model(overrides):
    config = GPTConfig.preset("tiny", **overrides)
    model = GPT(config)
    assert parameter_count(config) == sum(p.numel() for p in model.parameters())


def test_gpt3_presets_have_their_published_sizes():
    for name, billions in [("gpt3-125m", 0.125), ("gpt3-1.3b", 1.3), ("gpt3-13b", 13), ("gpt3-175b", 175)]:
        assert parameter_count(GPTConfig.preset(name)) == pytest.approx(billions * 1e9, rel=0.03)
    assert GPTConfig.preset("gpt3-175b").head_dim == 128


def test_training_flops_formula():
    c = GPTConfig.preset("tiny")
    assert training_flops_per_token(c) == 6 * parameter_count(c) + 12 * 2 * 32 * 32
    untied = GPTConfig.preset("tiny", tie_embeddings=False)  # one more table, but the input one is a lookup
    assert parameter_count(untied) == parameter_count(c) + 256 * 32
    assert training_flops_per_token(untied) == training_flops_per_token(c)


def test_forward_shapes_and_initial_loss_near_uniform():
    model = build_gpt()
    idx, targets = random_tokens((4, 32)), random_tokens((4, 32), seed=2)
    logits, loss = model(idx, targets)
    assert logits.shape == (4, 32, 256)
    assert abs(loss.item() - math.log(256)) < 0.15
    logits_only, no_loss = model(idx[:, :7])
    assert logits_only.shape == (4, 7, 256) and no_loss is None


def test_same_seed_same_weights():
    a, b = build_gpt(seed=3), build_gpt(seed=3)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.tok_embed.weight, build_gpt(seed=4).tok_embed.weight)


def test_residual_projections_get_scaled_init():
    model = GPT(GPTConfig.preset("tiny", d_model=128, n_head=2, n_layer=8))
    expected = 0.02 / math.sqrt(2 * 8)
    assert model.blocks[0].attn.out_proj.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert model.blocks[0].mlp.fc_out.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_changing_a_future_token_leaves_earlier_logits_unchanged():
    model = build_gpt()
    idx = random_tokens((2, 32))
    changed = idx.clone()
    changed[:, 20] = (changed[:, 20] + 1) % 256
    before, after = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(before[:, :20], after[:, :20], rtol=0, atol=1e-6)
    assert not torch.allclose(before[:, 20:], after[:, 20:])


def test_stages_compose_to_forward():
    model = build_gpt()
    idx = random_tokens((2, 16))
    x = model.embed(idx)
    for block in model.blocks:
        x = block(x)
    torch.testing.assert_close(model.head(x), model(idx)[0], rtol=0, atol=0)


def loss_and_grads(model: nn.Module, *inputs: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    _, loss = model(*inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["full", "selective"])
@float64()
def test_checkpointing_gives_same_loss_and_gradients(mode):
    idx, targets = random_tokens((2, 32)), random_tokens((2, 32), seed=2)
    ref_loss, ref_grads = loss_and_grads(build_gpt(), idx, targets)
    built = build_gpt(checkpoint=mode)  # set at construction
    switched = build_gpt()
    switched.set_checkpoint(mode)  # or after it
    assert switched.config.checkpoint == mode
    for model in (built, switched):
        loss, grads = loss_and_grads(model, idx, targets)
        torch.testing.assert_close(loss, ref_loss, rtol=ONE_PASS, atol=ONE_PASS)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=ONE_PASS, atol=ONE_PASS, msg=name)


@pytest.mark.parametrize(
    ("mode", "attention_calls", "mlp_calls"), [("none", 1, 1), ("selective", 2, 1), ("full", 2, 2)]
)
def test_checkpointing_recomputes_what_it_says(monkeypatch, mode, attention_calls, mlp_calls):
    model = build_gpt(checkpoint=mode, n_layer=1)
    calls = {"attention": 0, "mlp": 0}
    sdpa = F.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls["attention"] += 1
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    model.blocks[0].mlp.register_forward_pre_hook(lambda *_: calls.__setitem__("mlp", calls["mlp"] + 1))
    model(random_tokens((1, 8)), random_tokens((1, 8), seed=2))[1].backward()
    assert calls == {"attention": attention_calls, "mlp": mlp_calls}


def test_tiny_gpt_overfits_a_tiny_batch():
    model = build_gpt()
    text = torch.tensor(list(b"def add(a, b):\n    return a + b\n" * 4), dtype=torch.long)
    x, y = text[:-1][:64].view(2, 32), text[1:][:64].view(2, 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(50):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]


def test_generate_is_reproducible_and_crops_context():
    model = build_gpt()
    prompt = random_tokens((2, 30))
    a = model.generate(prompt, 10, top_k=8, generator=torch.Generator().manual_seed(5))
    b = model.generate(prompt, 10, top_k=8, generator=torch.Generator().manual_seed(5))
    assert a.shape == (2, 40) and torch.equal(a, b) and torch.equal(a[:, :30], prompt)
    greedy = model.generate(prompt, 3, temperature=0)
    assert torch.equal(greedy[:, 30], model(prompt)[0][:, -1].argmax(-1))


@float64()
def test_attention_runs_on_a_head_shard_and_shards_sum_to_the_full_output():
    """The tensor-parallel contract: contiguous column shards of qkv hold whole heads."""
    config = GPTConfig.preset("tiny", n_head=4)
    rope = rope_frequencies(config.head_dim, config.seq_len)
    torch.manual_seed(0)
    full = Attention(config, Layers(), causal=True, rope=rope)
    world = 2

    def column(i, o):
        return nn.Linear(i, o // world, bias=False)

    def row(i, o):
        return nn.Linear(i // world, o, bias=False)

    x = torch.randn(2, 16, config.d_model)
    total = torch.zeros_like(x)
    for rank in range(world):
        shard = Attention(config, Layers(column_linear=column, row_linear=row), causal=True, rope=rope)
        width = 3 * config.d_model // world
        with torch.no_grad():
            shard.qkv.weight.copy_(full.qkv.weight[rank * width : (rank + 1) * width])
            d = config.d_model // world
            shard.out_proj.weight.copy_(full.out_proj.weight[:, rank * d : (rank + 1) * d])
        total += shard(x)  # what the row-parallel all-reduce would sum
    torch.testing.assert_close(total, full(x), rtol=ONE_PASS, atol=ONE_PASS)


def test_layers_hooks_are_used():
    seen = []

    def cross_entropy(logits, targets):
        seen.append(logits.shape)
        return F.cross_entropy(logits, targets)

    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny"), Layers(cross_entropy=cross_entropy))
    model(random_tokens((2, 8)), random_tokens((2, 8), seed=2))
    assert seen == [torch.Size([16, 256])]


@pytest.mark.parametrize("mode", ["none", "full", "selective"])
def test_vit_forward_backward(mode):
    torch.manual_seed(0)
    model = ViT(ViTConfig.preset("tiny", checkpoint=mode))
    images = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    logits, loss = model(images, torch.tensor([0, 4, 9]))
    assert logits.shape == (3, 10) and loss.shape == ()
    assert abs(loss.item() - math.log(10)) < 0.5
    loss.backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())
    assert model.blocks[0].attn.causal is False and model(images)[1] is None


@float64()
def test_vit_checkpointing_matches():
    images, labels = torch.randn(4, 1, 8, 8), torch.tensor([1, 2, 3, 4])
    torch.manual_seed(0)
    ref_loss, ref_grads = loss_and_grads(ViT(ViTConfig.preset("tiny")), images, labels)
    torch.manual_seed(0)
    model = ViT(ViTConfig.preset("tiny"))
    model.set_checkpoint("full")
    loss, grads = loss_and_grads(model, images, labels)
    torch.testing.assert_close(loss, ref_loss, rtol=ONE_PASS, atol=ONE_PASS)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=ONE_PASS, atol=ONE_PASS, msg=name)


def test_presets_build():
    assert {"tiny", "small", "gpt3-125m", "gpt3-175b"} <= set(GPT_PRESETS)
    assert GPTConfig.preset("small").d_ff == 512 and GPTConfig.preset("tiny", d_model=64).d_ff == 256
    assert ViTConfig.preset("digits").num_patches == 16 and set(VIT_PRESETS) == {"tiny", "digits"}


@pytest.mark.parametrize(
    ("build", "words"),
    [
        (lambda: GPTConfig.preset("tiny", n_head=3), ["d_model=32", "multiple of n_head=3"]),
        (lambda: GPTConfig.preset("nope"), ["'nope'", "'tiny'", "'gpt3-175b'"]),
        (lambda: GPTConfig.preset("tiny", checkpoint="some"), ["'some'", "'selective'"]),
        (lambda: GPTConfig.preset("tiny", norm="batchnorm"), ["'batchnorm'", "'rmsnorm'"]),
        (lambda: GPTConfig.preset("tiny", d_model=30, n_head=10), ["3", "even"]),
        (lambda: GPTConfig.preset("tiny", n_layer=0), ["n_layer=0", "positive"]),
        (lambda: GPTConfig.preset("tiny", dropout=1.5), ["dropout=1.5"]),
        (lambda: GPTConfig.preset("tiny", layers=3), ["'layers'", "'vocab_size'"]),
        (lambda: build_gpt().set_checkpoint("half"), ["'half'", "'full'"]),
        (lambda: build_gpt()(random_tokens((1, 33))), ["33", "seq_len=32"]),
        (lambda: build_gpt().generate(random_tokens((1, 3)), 1, temperature=-1), ["temperature=-1"]),
        (lambda: ViTConfig.preset("tiny", patch_size=3), ["image_size=8", "patch_size=3"]),
        (lambda: ViTConfig.preset("cifar"), ["'cifar'", "'digits'"]),
        (
            lambda: ViT(ViTConfig.preset("tiny"))(torch.randn(1, 3, 8, 8)),
            ["(1, 3, 8, 8)", "(batch, 1, 8, 8)"],
        ),
    ],
)
def test_bad_configs_raise_clear_errors(build, words):
    with pytest.raises(CommlabError) as info:
        build()
    assert isinstance(info.value, ValueError)
    for word in words:
        assert word in str(info.value)
