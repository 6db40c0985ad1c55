"""A GPT decoder (pre-norm, rotary positions) built through swappable layer factories.

Read top to bottom: config and presets, the layer factories tensor parallelism replaces, rotary
embeddings, the transformer block (shared with vit.py and bert.py), the model, then the analytic parameter
and FLOP counts the simulator uses. Attention is softmax (scaled dot product) or linear (attention.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from commlab.errors import invalid
from commlab.models.attention import ATTENTIONS, LinearAttentionState, linear_attention
from commlab.parallel.layers import Layers
from commlab.shared.layout import CHECKPOINT_MODES

NORMS = ("rmsnorm", "layernorm")


def check_transformer_config(cfg: Any) -> None:
    """Validate the fields GPT, ViT and BERT configs share; raise naming the bad value and what is
    accepted."""
    for name in ("n_layer", "n_head", "d_model", "d_ff"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 1:
            raise invalid(name, value, "a positive int")
    if cfg.d_model % cfg.n_head:
        raise invalid("d_model", cfg.d_model, f"a multiple of n_head={cfg.n_head}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise invalid("dropout", cfg.dropout, "a float in [0, 1)")
    if cfg.norm not in NORMS:
        raise invalid("norm", cfg.norm, NORMS)
    if cfg.checkpoint not in CHECKPOINT_MODES:
        raise invalid("checkpoint", cfg.checkpoint, CHECKPOINT_MODES)
    if cfg.attention not in ATTENTIONS:
        raise invalid("attention", cfg.attention, ATTENTIONS)


def check_token_model_config(cfg: Any) -> None:
    """A token model's config (GPT, BERT): d_ff defaults to 4 d_model; vocab_size and seq_len are
    positive ints; then the fields every transformer config shares."""
    if cfg.d_ff is None:
        object.__setattr__(cfg, "d_ff", 4 * cfg.d_model)
    for name in ("vocab_size", "seq_len"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 1:
            raise invalid(name, value, "a positive int")
    check_transformer_config(cfg)


def config_from_preset(cls: type, presets: dict[str, dict[str, Any]], name: str, overrides: dict) -> Any:
    """Build config class `cls` from the named preset with some fields overridden."""
    if name not in presets:
        raise invalid("preset", name, sorted(presets))
    known = {f.name for f in fields(cls)}
    for key in overrides:
        if key not in known:
            raise invalid("override", key, sorted(known))
    return cls(**{**presets[name], **overrides})


@dataclass(frozen=True)
class GPTConfig:
    """The shape of a GPT decoder, validated on construction; d_ff defaults to 4 * d_model."""

    vocab_size: int
    seq_len: int
    n_layer: int
    n_head: int
    d_model: int
    d_ff: int | None = None  # None: 4 * d_model
    dropout: float = 0.0
    rope_base: float = 10000.0
    norm: str = "rmsnorm"
    tie_embeddings: bool = True
    checkpoint: str = "none"
    attention: str = "softmax"  # or "linear": elu + 1 feature map, O(n) in the sequence (attention.py)

    def __post_init__(self) -> None:
        check_token_model_config(self)
        if self.head_dim % 2:
            raise invalid("d_model // n_head", self.head_dim, "an even head size (RoPE rotates pairs)")
        if not self.rope_base > 0:
            raise invalid("rope_base", self.rope_base, "a positive float")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> GPTConfig:
        """A named shape from GPT_PRESETS, e.g. GPTConfig.preset("tiny", checkpoint="full")."""
        return config_from_preset(cls, GPT_PRESETS, name, overrides)


def _gpt3(n_layer: int, d_model: int, n_head: int) -> dict[str, Any]:
    return dict(vocab_size=50257, seq_len=2048, n_layer=n_layer, d_model=d_model, n_head=n_head)


GPT_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=256, seq_len=32, n_layer=2, n_head=2, d_model=32),  # unit tests
    "small": dict(vocab_size=256, seq_len=64, n_layer=4, n_head=4, d_model=128),  # CPU demo, byte-level
    # GPT-3 family, Brown et al. 2020, "Language Models are Few-Shot Learners", Table 2.1: (n_layer,
    # d_model, n_head), n_ctx 2048, d_ff = 4 d_model, GPT-2 BPE vocabulary of 50257. Two rows of the
    # table break d_model = n_head * d_head; we keep d_head = 128: 1.3B has 16 heads (table: 24), and
    # 13B has d_model 5120 (table: 5140).
    "gpt3-125m": _gpt3(12, 768, 12),
    "gpt3-350m": _gpt3(24, 1024, 16),
    "gpt3-760m": _gpt3(24, 1536, 16),
    "gpt3-1.3b": _gpt3(24, 2048, 16),
    "gpt3-2.7b": _gpt3(32, 2560, 32),
    "gpt3-6.7b": _gpt3(32, 4096, 32),
    "gpt3-13b": _gpt3(40, 5120, 40),
    "gpt3-175b": _gpt3(96, 12288, 96),
}


def rope_frequencies(head_dim: int, positions: int | Tensor, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos and sin of the RoPE angles pos * base^(-2i / head_dim), each (len(positions), head_dim // 2).

    RoPE (Su et al. 2021, RoFormer) rotates pair i of a query or key by that angle, so q.k depends only
    on the offset between their positions. `positions` is a count (0..n-1) or a tensor of positions.
    """
    if head_dim < 2 or head_dim % 2:
        raise invalid("head_dim", head_dim, "a positive even int")
    pos = torch.arange(positions) if isinstance(positions, int) else positions
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = pos.to(torch.float64)[:, None] * inv_freq[None, :]
    dtype = torch.get_default_dtype()  # float32 tables for a float32 model, float64 for a float64 one
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[..., i], x[..., i + d/2]) of x (..., T, d) by the angles in cos, sin (T, d/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class RMSNorm(nn.Module):
    """x / rms(x) * weight (Zhang & Sennrich 2019): LayerNorm without centring or bias."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def make_norm(kind: str, dim: int) -> nn.Module:
    """RMSNorm or LayerNorm by name."""
    return RMSNorm(dim) if kind == "rmsnorm" else nn.LayerNorm(dim)


class Attention(nn.Module):
    """Multi-head self-attention, softmax or linear (cfg.attention); the local head count comes from the
    qkv output width.

    qkv's output is laid out head by head, [q_0 k_0 v_0 | q_1 k_1 v_1 | ...], so a column-parallel qkv
    that keeps a contiguous block of output features holds whole heads and this code runs unchanged.
    Linear attention has no attention-probability matrix, so cfg.dropout does not apply inside it (the
    block's residual dropout still does). With RoPE, q and k are rotated before linear attention's
    feature map: positions enter the features, and the weights stay positive.
    """

    def __init__(self, cfg: Any, layers: Layers, causal: bool, rope: tuple[Tensor, Tensor] | None) -> None:
        super().__init__()
        self.head_dim, self.dropout, self.causal = cfg.d_model // cfg.n_head, cfg.dropout, causal
        self.linear = cfg.attention == "linear"
        self.rope_base = getattr(cfg, "rope_base", 10000.0)
        self.qkv = layers.column_linear(cfg.d_model, 3 * cfg.d_model)
        self.out_proj = layers.row_linear(cfg.d_model, cfg.d_model)
        self.recompute_core = False  # selective checkpointing: recompute core() in backward
        self.rope = rope is not None
        if rope is not None:
            self.register_buffer("rope_cos", rope[0].clone(), persistent=False)
            self.register_buffer("rope_sin", rope[1].clone(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        qkv = self.qkv(x)  # sequence parallelism: x holds part of the sequence, qkv all of it
        batch, seq = qkv.shape[:2]
        n_local_heads = qkv.shape[-1] // (3 * self.head_dim)
        qkv = qkv.view(batch, seq, n_local_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        q, k, v = qkv.unbind(0)  # each (batch, heads, seq, head_dim)
        if self.recompute_core and torch.is_grad_enabled():
            y = checkpoint(self.core, q, k, v, use_reentrant=False)
        else:
            y = self.core(q, k, v)
        return self.out_proj(y.transpose(1, 2).reshape(batch, seq, n_local_heads * self.head_dim))

    def core(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """RoPE, then softmax(q k^T / sqrt(d)) v or linear attention: what selective checkpointing
        recomputes."""
        if self.rope:
            cos, sin = self.rope_cos[: q.shape[-2]], self.rope_sin[: q.shape[-2]]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.linear:
            return linear_attention(q, k, v, self.causal)
        dropout = self.dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=self.causal)

    def step(
        self, x: Tensor, state: LinearAttentionState | None, position: int
    ) -> tuple[Tensor, LinearAttentionState]:
        """Causal linear attention's recurrent form: one token x (B, 1, d_model) at `position` through
        the state (None: no token yet); returns the output (B, 1, d_model) and the updated state."""
        if not (self.linear and self.causal):
            raise invalid("attention", "softmax" if not self.linear else "non-causal linear", "causal linear")
        batch = x.shape[0]
        qkv = self.qkv(x)
        n_local_heads = qkv.shape[-1] // (3 * self.head_dim)
        q, k, v = qkv.view(batch, n_local_heads, 3, self.head_dim).unbind(2)  # each (B, heads, head_dim)
        if self.rope:
            if position < self.rope_cos.shape[0]:
                cos, sin = self.rope_cos[position], self.rope_sin[position]
            else:  # past the table: the same angles, computed for this position
                cos, sin = (
                    t[0] for t in rope_frequencies(self.head_dim, torch.tensor([position]), self.rope_base)
                )
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if state is None:
            state = LinearAttentionState.zeros((batch, n_local_heads), self.head_dim, self.head_dim, q)
        y = state.step(q, k, v)
        return self.out_proj(y.reshape(batch, 1, n_local_heads * self.head_dim)), state


class MLP(nn.Module):
    """d_model -> d_ff -> GELU -> d_model."""

    def __init__(self, d_model: int, d_ff: int, layers: Layers) -> None:
        super().__init__()
        self.fc_in = layers.column_linear(d_model, d_ff)
        self.fc_out = layers.row_linear(d_ff, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_out(F.gelu(self.fc_in(x)))


class Block(nn.Module):
    """Pre-norm transformer block, x + attn(norm(x)) then x + mlp(norm(x)); GPT, ViT and BERT use it.

    cfg is a GPTConfig, ViTConfig or BERTConfig (d_model, n_head, d_ff, dropout, norm, attention); rope is
    the (cos, sin) pair from rope_frequencies, or None for no rotary positions.
    """

    def __init__(self, cfg: Any, layers: Layers, causal: bool, rope: tuple[Tensor, Tensor] | None) -> None:
        super().__init__()
        self.norm1 = make_norm(cfg.norm, cfg.d_model)
        self.attn = Attention(cfg, layers, causal, rope)
        self.norm2 = make_norm(cfg.norm, cfg.d_model)
        self.mlp = MLP(cfg.d_model, cfg.d_ff, layers)
        self.drop = nn.Dropout(cfg.dropout)
        self.checkpoint = "none"

    def set_checkpoint(self, mode: str) -> None:
        """'none', 'full' (recompute the whole block in backward) or 'selective' (only attention's core)."""
        if mode not in CHECKPOINT_MODES:
            raise invalid("checkpoint", mode, CHECKPOINT_MODES)
        self.checkpoint = mode
        self.attn.recompute_core = mode == "selective"

    def forward(self, x: Tensor) -> Tensor:
        if self.checkpoint == "full" and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))

    def step(
        self, x: Tensor, state: LinearAttentionState | None, position: int
    ) -> tuple[Tensor, LinearAttentionState]:
        """One token (B, 1, d_model) through the block with recurrent linear attention (no dropout)."""
        y, state = self.attn.step(self.norm1(x), state, position)
        x = x + y
        return x + self.mlp(self.norm2(x)), state


def fill_(param: Tensor, fill: Callable[[Tensor], Any]) -> None:
    """Apply an in-place init to `param`, or, for a shard, to its full tensor and keep the shard's slice.

    A tensor-parallel shard carries `param.shard_of = (full_shape, dim, start)`: drawing the full tensor
    consumes the RNG exactly as the unsharded model does, so the weights do not depend on the TP size.
    """
    shard = getattr(param, "shard_of", None)
    if shard is None:
        fill(param)
        return
    full_shape, dim, start = shard
    full = torch.empty(full_shape, dtype=param.dtype, device=param.device)
    fill(full)
    param.copy_(full.narrow(dim, start, param.shape[dim]))


@torch.no_grad()
def init_weights(model: nn.Module, n_layer: int, std: float = 0.02) -> None:
    """GPT-2 style init from torch's RNG, in named_parameters order (so a seed fixes the weights).

    Matrices N(0, std); residual projections (attention out, MLP down) N(0, std / sqrt(2 n_layer)) so the
    residual stream's variance does not grow with depth; biases 0; norm scales 1. Tensor-parallel shards
    get their slice of the full tensor (see fill_), so every TP size gets the same weights.
    """
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            residual = name.endswith(("attn.out_proj.weight", "mlp.fc_out.weight"))
            scale = std / math.sqrt(2 * n_layer) if residual else std
            fill_(p, lambda t, scale=scale: nn.init.normal_(t, 0.0, scale))
        elif name.endswith("bias"):
            nn.init.zeros_(p)
        else:
            nn.init.ones_(p)


class GPT(nn.Module):
    """Decoder-only transformer: embed -> blocks -> final norm -> head tied to the embedding.

    Pipeline stages can be cut from embed(), blocks and head(); tensor parallelism passes its own Layers.
    """

    def __init__(self, config: GPTConfig, layers: Layers | None = None) -> None:
        super().__init__()
        self.config, self.factories = config, layers or Layers()
        c = config
        self.tok_embed = self.factories.embedding(c.vocab_size, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        rope = rope_frequencies(c.head_dim, c.seq_len, c.rope_base)
        self.blocks = nn.ModuleList(Block(c, self.factories, True, rope) for _ in range(c.n_layer))
        self.norm = make_norm(c.norm, c.d_model)
        self.lm_head = None if c.tie_embeddings else self.factories.column_linear(c.d_model, c.vocab_size)
        init_weights(self, c.n_layer)
        self.set_checkpoint(c.checkpoint)

    def set_checkpoint(self, mode: str) -> None:
        """Switch activation checkpointing of every block: 'none', 'full' or 'selective'."""
        for block in self.blocks:
            block.set_checkpoint(mode)
        self.config = replace(self.config, checkpoint=mode)

    def embed(self, idx: Tensor) -> Tensor:
        """Token ids (B, T) -> residual stream (B, T, d_model); positions enter later, through RoPE."""
        if idx.shape[-1] > self.config.seq_len:
            raise invalid("sequence length", idx.shape[-1], f"at most seq_len={self.config.seq_len}")
        return self.drop(self.tok_embed(idx))

    def head(self, x: Tensor) -> Tensor:
        """Residual stream (B, T, d_model) -> logits (B, T, vocab): final norm, then the output head."""
        x = self.norm(x)
        return self.factories.tied_logits(x, self.tok_embed) if self.lm_head is None else self.lm_head(x)

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Mean next-token cross-entropy in nats."""
        return self.factories.cross_entropy(logits.flatten(0, -2), targets.flatten())

    def stage_parts(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Attributes the first pipeline stage needs (embed) and the last (head, loss); blocks aside."""
        head = ("norm", "lm_head") if self.lm_head is not None else ("norm", "tok_embed")
        return ("tok_embed",), head

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        logits = self.head(x)
        return logits, None if targets is None else self.loss(logits, targets)

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Append max_new_tokens sampled tokens to idx (B, T); temperature 0 takes the argmax.

        Softmax attention re-runs the model on the context cropped to the last seq_len tokens for every
        token. Linear attention runs its recurrent form instead: the prompt, then each new token, goes
        through the blocks one token at a time, each block's attention keeping its state (S, z), so a
        token costs O(1) in the context length and nothing is cropped (while the whole text fits in
        seq_len, the tokens are those of re-running the parallel form on every prefix). Call model.eval()
        first if dropout is on.
        """
        if temperature < 0:
            raise invalid("temperature", temperature, "a float >= 0")
        if top_k is not None and top_k < 1:
            raise invalid("top_k", top_k, "None or a positive int")
        if self.config.attention == "linear":
            return self._generate_recurrent(idx, max_new_tokens, temperature, top_k, generator)
        for _ in range(max_new_tokens):
            logits = self.factories.gather_logits(self(idx[:, -self.config.seq_len :])[0][:, -1, :])
            idx = torch.cat((idx, _sample(logits, temperature, top_k, generator)), dim=1)
        return idx

    def step(self, token: Tensor, states: list[LinearAttentionState | None], position: int) -> Tensor:
        """Recurrent linear attention: token ids (B, 1) at `position` through every block, updating
        `states` (one per block, None before the first token) in place; returns full logits (B, vocab)."""
        x = self.embed(token)
        for i, block in enumerate(self.blocks):
            x, states[i] = block.step(x, states[i], position)
        return self.factories.gather_logits(self.head(x)[:, -1, :])

    def _generate_recurrent(
        self, idx: Tensor, max_new_tokens: int, temperature: float, top_k: int | None,
        generator: torch.Generator | None,
    ) -> Tensor:  # fmt: skip
        states: list[LinearAttentionState | None] = [None] * len(self.blocks)
        for position in range(idx.shape[1]):  # the prompt, token by token through the recurrence
            logits = self.step(idx[:, position : position + 1], states, position)
        for i in range(max_new_tokens):
            nxt = _sample(logits, temperature, top_k, generator)
            idx = torch.cat((idx, nxt), dim=1)
            if i + 1 < max_new_tokens:
                logits = self.step(nxt, states, idx.shape[1] - 1)
        return idx


def _sample(
    logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> Tensor:
    """Next token ids (B, 1) from logits (B, vocab): argmax at temperature 0, else top-k sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)


def parameter_count(config: GPTConfig) -> int:
    """Exact number of parameters of GPT(config) with the default Layers (bias-free linears)."""
    d = config.d_model
    norm = d if config.norm == "rmsnorm" else 2 * d  # LayerNorm has a bias
    block = 2 * norm + 4 * d * d + 2 * d * config.d_ff  # qkv 3d^2, out d^2, MLP 2 d d_ff
    head = 0 if config.tie_embeddings else config.vocab_size * d
    return config.vocab_size * d + config.n_layer * block + norm + head


def training_flops_per_token(config: GPTConfig) -> int:
    """Model FLOPs to train on one token: 6 N + 12 n_layer d_model seq_len.

    6 N: a multiply-add (2 FLOPs) per matmul parameter in forward, twice that in backward (Kaplan et al.
    2020, "Scaling Laws for Neural Language Models", sec. 2.1). 12 n_layer d_model seq_len: the two
    attention matmuls, q k^T and scores v, over the full context, as in Chowdhery et al. 2022 (PaLM)
    appendix B (Kaplan's Table 1 counts q k^T only). N counts the parameters used in matmuls:
    parameter_count minus an untied input embedding (a lookup); tied, the table is the head's matmul.
    Recomputation from checkpointing is not counted (the MFU convention). Linear attention replaces
    the two attention matmuls by phi(k) v^T into the state and phi(q) against it, 2 d_head^2 FLOPs per
    head each: 12 n_layer d_model d_head (the seq_len of the softmax term becomes d_head).
    """
    untied_input = 0 if config.tie_embeddings else config.vocab_size * config.d_model
    matmul_params = parameter_count(config) - untied_input
    context = config.head_dim if config.attention == "linear" else config.seq_len
    return 6 * matmul_params + 12 * config.n_layer * config.d_model * context
