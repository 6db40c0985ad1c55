"""Linear attention (commlab/models/attention.py): the parallel forms against reference einsum code written
here, the causal parallel form against the recurrent form token by token, generation through the recurrence
against re-running the parallel form on every prefix, and activation memory linear in the sequence length.

Numerics run in float64, so the tolerances follow from the arithmetic, not from one CPU's kernels: every
output is a ratio of sums of at most n = 100 products; float64 rounds each operation by u = 1.1e-16, so a
sum of n terms is off by at most n u sum|terms| (Higham, "Accuracy and Stability of Numerical Algorithms",
sec. 4.2). The denominators are sums of positive terms (phi > 0), so no cancellation; the numerators' terms
are at most max|v| <= 6 (randn) times the weights, so the outputs differ by at most about 2 n u max|v| =
1.3e-13 between two summation orders: atol 1e-12, rtol 1e-10 cover that with room for the few extra
roundings of exp and the division, under any SIMD width (ATEN_CPU_CAPABILITY=default, avx2, avx512).
"""

from __future__ import annotations

import pytest
import torch

from commlab.errors import CommlabError
from commlab.models import GPT, BERTConfig, GPTConfig, ViTConfig, linear_attention
from commlab.models.attention import LinearAttentionState, feature_map
from commlab.models.bert import BERT
from commlab.models.vit import ViT
from commlab.parallel.memory import ActivationMeter

pytestmark = pytest.mark.numerics  # float64 comparisons across summation orders: run on every kernel path
TOL = dict(rtol=1e-10, atol=1e-12)
EPS = 1e-6


def qkv(n: int, d: int = 8, e: int = 5, batch: int = 2, heads: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, n, width, generator=g, dtype=torch.float64) for width in (d, d, e))


def reference_causal(q, k, v):
    """The quadratic form: weights phi(q_i) . phi(k_j) for j <= i, normalised by their sum."""
    weights = torch.einsum("bhid,bhjd->bhij", feature_map(q), feature_map(k))
    n = q.shape[-2]
    weights = weights * torch.ones(n, n, dtype=torch.bool).tril()
    return torch.einsum("bhij,bhje->bhie", weights, v) / (weights.sum(-1, keepdim=True) + EPS)


def reference_full(q, k, v):
    weights = torch.einsum("bhid,bhjd->bhij", feature_map(q), feature_map(k))
    return torch.einsum("bhij,bhje->bhie", weights, v) / (weights.sum(-1, keepdim=True) + EPS)


@pytest.mark.parametrize("chunk", [1, 3, 16, 64, 200])
@pytest.mark.parametrize("n", [1, 37, 100])
def test_causal_parallel_form_equals_reference_einsum(n, chunk):
    q, k, v = qkv(n)
    torch.testing.assert_close(
        linear_attention(q, k, v, causal=True, chunk=chunk), reference_causal(q, k, v), **TOL
    )


@pytest.mark.parametrize("n", [1, 37, 100])
def test_non_causal_parallel_form_equals_reference_einsum(n):
    q, k, v = qkv(n)
    torch.testing.assert_close(linear_attention(q, k, v, causal=False), reference_full(q, k, v), **TOL)


def test_causal_parallel_form_equals_recurrent_form_token_by_token():
    q, k, v = qkv(70)
    parallel = linear_attention(q, k, v, causal=True, chunk=16)
    state = LinearAttentionState.zeros((2, 3), 8, 5, q)
    for t in range(70):
        step = state.step(q[..., t, :], k[..., t, :], v[..., t, :])
        torch.testing.assert_close(step, parallel[..., t, :], **TOL, msg=f"token {t}")
    # The state is the prefix sums: S = phi(K)^T V, z = sum phi(K) over every token seen.
    torch.testing.assert_close(state.S, feature_map(k).transpose(-2, -1) @ v, **TOL)
    torch.testing.assert_close(state.z, feature_map(k).sum(-2), **TOL)


def test_gradients_of_parallel_form_equal_reference():
    q, k, v = (t.requires_grad_() for t in qkv(45))
    grads = torch.autograd.grad(linear_attention(q, k, v, causal=True, chunk=8).square().sum(), (q, k, v))
    want = torch.autograd.grad(reference_causal(q, k, v).square().sum(), (q, k, v))
    for got, expected in zip(grads, want, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)


def test_normaliser_epsilon_keeps_outputs_finite():
    """Very negative q, k: phi = elu + 1 -> e^x underflows to 0, the normaliser too; eps keeps y finite."""
    q, k, v = qkv(20)
    out = linear_attention(q - 800.0, k - 800.0, v, causal=True)
    assert torch.isfinite(out).all()
    assert linear_attention(q - 800.0, k - 800.0, v, causal=False).abs().max() == 0.0


@pytest.mark.parametrize(("name", "value"), [("chunk", 0), ("eps", 0.0)])
def test_bad_arguments_are_rejected(name, value):
    q, k, v = qkv(4)
    with pytest.raises(CommlabError, match=name):
        linear_attention(q, k, v, causal=True, **{name: value})


@pytest.mark.parametrize("make", [GPTConfig, BERTConfig, ViTConfig])
def test_attention_option_is_validated(make):
    with pytest.raises(CommlabError, match="attention"):
        make.preset("tiny", attention="cosine")


def gpt(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig.preset("tiny", attention="linear", **overrides)).double().eval()


def test_causal_and_bidirectional_models():
    """GPT's linear attention is causal (a later token leaves earlier logits alone); BERT's and ViT's see
    the whole sequence."""
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (2, 20))
    changed = ids.clone()
    changed[:, -1] = (ids[:, -1] + 1) % 256
    model = gpt()
    torch.testing.assert_close(model(changed)[0][:, :-1], model(ids)[0][:, :-1], **TOL)
    torch.manual_seed(0)
    bert = BERT(BERTConfig.preset("tiny", attention="linear")).double()
    assert not torch.allclose(bert(changed)[0][:, 0], bert(ids)[0][:, 0])
    torch.manual_seed(0)
    vit = ViT(ViTConfig.preset("tiny", attention="linear")).double()
    images = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    logits, loss = vit(images, torch.tensor([1, 2]))
    assert logits.shape == (2, 10) and torch.isfinite(loss)


def test_recurrent_step_logits_equal_parallel_form():
    model = gpt()
    ids = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(2))
    parallel = model(ids)[0]
    states = [None] * len(model.blocks)
    for t in range(ids.shape[1]):
        logits = model.step(ids[:, t : t + 1], states, t)
        torch.testing.assert_close(logits, parallel[:, t], **TOL, msg=f"position {t}")


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_generation_with_recurrent_form_equals_rerunning_parallel_form(temperature):
    """generate() through the recurrence gives the tokens of re-running the parallel form on each prefix."""
    model = gpt(seed=3)
    prompt = torch.tensor([[100, 101, 102, 32], [40, 41, 42, 43]])
    new = model.config.seq_len - prompt.shape[1]
    out = model.generate(prompt, new, temperature=temperature, generator=torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(5)
    idx = prompt
    for _ in range(new):
        logits = model(idx)[0][:, -1, :]
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            nxt = torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator)
        idx = torch.cat((idx, nxt), dim=1)
    assert torch.equal(out, idx)


def test_recurrent_generation_goes_past_seq_len():
    """The recurrence needs no context window: RoPE angles past the table are computed per position."""
    model = gpt()
    out = model.generate(torch.tensor([[1, 2, 3]]), model.config.seq_len + 5, temperature=0)
    assert out.shape == (1, model.config.seq_len + 8)


def activation_bytes(model: torch.nn.Module, n: int) -> int:
    ids = torch.randint(0, 256, (2, n), generator=torch.Generator().manual_seed(0))
    with ActivationMeter(list(model.parameters())) as meter:
        loss = model(ids, ids)[1]
    del loss  # frees the graph
    return meter.peak


def test_linear_attention_activation_memory_grows_linearly():
    """Bytes autograd keeps for backward at n, 2n, 4n tokens (multiples of the chunk, at least two chunks):
    an affine function of n (the constant: the chunk's triangular mask and the like), so no n^2 term; an
    n x n score matrix would add 4x its bytes at every doubling. Exact equality: byte counts of tensors
    whose sizes follow n, nothing measured in time."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", attention="linear", seq_len=512))
    small, middle, large = (activation_bytes(model, n) for n in (128, 256, 512))
    assert large - middle == 2 * (middle - small)
    assert 0 <= 2 * small - middle < small / 10  # the constant is small next to the linear part
