"""A BERT-style encoder (Devlin et al. 2019) trained by masked language modelling on bytes.

Token embeddings (+ optional segment embeddings, + learned positions or RoPE) -> bidirectional blocks
-> final norm -> the MLM head (dense, GELU, norm, then logits tied to the token embedding). Built from
gpt.py's Block and parallel/layers.py's Layers, so tensor parallelism (column/row-parallel linears, the
vocabulary-parallel embedding, tied logits and cross-entropy), sequence parallelism, pipelines (embed /
blocks / head / loss / stage_parts) and activation checkpointing apply unchanged. Attention is softmax
or linear.

Pre-LN, not BERT's post-LN: the blocks are x + f(norm(x)). Post-LN (norm after the residual add) has
large gradients near the output at initialisation and needs a learning-rate warm-up to train at all
(Xiong et al. 2020, "On Layer Normalization in the Transformer Architecture"); pre-LN trains at the
learning rates the GPT demo uses, and it is the block GPT and ViT already share, so every parallelism
that handles them handles this one. The price is the final norm before the head (as GPT-2 has).

Vocabulary: the 256 bytes, [MASK] = 256, padded to 264 (a multiple of 8, so it splits over tp 2, 4, 8 as
Megatron-LM pads its vocabulary). Masking and the loss on masked positions only: mlm.py.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from commlab.errors import invalid
from commlab.models.gpt import (
    Block,
    check_token_model_config,
    config_from_preset,
    init_weights,
    make_norm,
    rope_frequencies,
)
from commlab.models.mlm import IGNORE_INDEX
from commlab.parallel.layers import Layers

POSITIONS = ("rope", "learned")
MASK_ID = 256  # the byte vocabulary's [MASK]


@dataclass(frozen=True)
class BERTConfig:
    """The shape of a BERT encoder, validated on construction; d_ff defaults to 4 * d_model."""

    vocab_size: int
    seq_len: int
    n_layer: int
    n_head: int
    d_model: int
    d_ff: int | None = None  # None: 4 * d_model
    dropout: float = 0.0
    norm: str = "layernorm"
    positions: str = "rope"  # or "learned": a seq_len x d_model table added to the embeddings
    rope_base: float = 10000.0
    n_segments: int = 0  # 0: no segment embeddings; BERT's sentence pairs: 2
    mask_id: int = MASK_ID
    checkpoint: str = "none"
    attention: str = "softmax"  # or "linear" (attention.py), non-causal

    def __post_init__(self) -> None:
        check_token_model_config(self)
        if self.positions not in POSITIONS:
            raise invalid("positions", self.positions, POSITIONS)
        if self.positions == "rope" and self.head_dim % 2:
            raise invalid("d_model // n_head", self.head_dim, "an even head size (RoPE rotates pairs)")
        if not isinstance(self.n_segments, int) or self.n_segments < 0:
            raise invalid("n_segments", self.n_segments, "an int >= 0")
        if not isinstance(self.mask_id, int) or not 0 <= self.mask_id < self.vocab_size:
            raise invalid("mask_id", self.mask_id, f"an id in [0, vocab_size={self.vocab_size})")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> BERTConfig:
        """A named shape from BERT_PRESETS, e.g. BERTConfig.preset("tiny", attention="linear")."""
        return config_from_preset(cls, BERT_PRESETS, name, overrides)


BERT_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=264, seq_len=32, n_layer=2, n_head=2, d_model=32),  # unit tests
    "small": dict(vocab_size=264, seq_len=64, n_layer=4, n_head=4, d_model=128),  # CPU demo, byte-level
}


class BERT(nn.Module):
    """Bidirectional encoder with a masked-language-model head tied to the token embedding.

    forward(ids, targets=None, segments=None) -> (logits (B, T, vocab), loss over masked positions).
    Pipeline stages can be cut from embed(), blocks and head(); tensor parallelism passes its own Layers.
    """

    def __init__(self, config: BERTConfig, layers: Layers | None = None) -> None:
        super().__init__()
        self.config, self.factories = config, layers or Layers()
        c = config
        self.tok_embed = self.factories.embedding(c.vocab_size, c.d_model)
        self.pos_embed = nn.Embedding(c.seq_len, c.d_model) if c.positions == "learned" else None
        self.seg_embed = nn.Embedding(c.n_segments, c.d_model) if c.n_segments else None
        self.drop = nn.Dropout(c.dropout)
        rope = rope_frequencies(c.head_dim, c.seq_len, c.rope_base) if c.positions == "rope" else None
        self.blocks = nn.ModuleList(Block(c, self.factories, False, rope) for _ in range(c.n_layer))
        self.norm = make_norm(c.norm, c.d_model)
        self.head_dense = nn.Linear(c.d_model, c.d_model)  # BERT's MLM transform, replicated under TP
        self.head_norm = make_norm(c.norm, c.d_model)
        init_weights(self, c.n_layer)
        self.set_checkpoint(c.checkpoint)

    def set_checkpoint(self, mode: str) -> None:
        """Switch activation checkpointing of every block: 'none', 'full' or 'selective'."""
        for block in self.blocks:
            block.set_checkpoint(mode)
        self.config = replace(self.config, checkpoint=mode)

    def embed(self, idx: Tensor, segments: Tensor | None = None) -> Tensor:
        """Token ids (B, T) (and segment ids (B, T), default all 0) -> residual stream (B, T, d_model).

        Under sequence parallelism the token embedding returns this rank's block of the sequence; the
        position and segment embeddings added to it are that block's rows.
        """
        length = idx.shape[-1]
        if length > self.config.seq_len:
            raise invalid("sequence length", length, f"at most seq_len={self.config.seq_len}")
        x = self.tok_embed(idx)
        local = x.shape[1]
        start = 0 if local == length else self.tok_embed.comm.rank * local
        if self.pos_embed is not None:
            x = x + self.pos_embed.weight[start : start + local]
        if self.seg_embed is not None:
            if segments is None:
                x = x + self.seg_embed.weight[0]
            else:
                if segments.shape != idx.shape:
                    raise invalid("segments.shape", tuple(segments.shape), f"the ids' {tuple(idx.shape)}")
                x = x + self.seg_embed(segments[:, start : start + local])
        return self.drop(x)

    def head(self, x: Tensor) -> Tensor:
        """Residual stream (B, T, d_model) -> logits (B, T, vocab): final norm, the MLM transform, then
        the tied output (a vocabulary shard under tensor parallelism)."""
        x = self.head_norm(F.gelu(self.head_dense(self.norm(x))))
        return self.factories.tied_logits(x, self.tok_embed)

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy in nats over the masked positions (targets != IGNORE_INDEX) only."""
        keep = targets.flatten() != IGNORE_INDEX
        return self.factories.cross_entropy(logits.flatten(0, -2)[keep], targets.flatten()[keep])

    def stage_parts(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Attributes the first pipeline stage needs (embeddings) and the last (head, tied embedding)."""
        first = ("tok_embed",) + (("pos_embed",) if self.config.positions == "learned" else ())
        first += ("seg_embed",) if self.config.n_segments else ()
        return first, ("norm", "head_dense", "head_norm", "tok_embed")

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, segments: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        x = self.embed(idx, segments)
        for block in self.blocks:
            x = block(x)
        logits = self.head(x)
        return logits, None if targets is None else self.loss(logits, targets)
