"""A Vision Transformer classifier (Dosovitskiy et al. 2021) built from gpt.py's blocks, non-causal."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from commlab.errors import invalid
from commlab.models.gpt import (
    Block,
    check_transformer_config,
    config_from_preset,
    init_weights,
    make_norm,
)
from commlab.parallel.layers import Layers


@dataclass(frozen=True)
class ViTConfig:
    """The shape of a ViT, validated on construction; d_ff defaults to 4 * d_model."""

    image_size: int
    patch_size: int
    in_channels: int
    num_classes: int
    n_layer: int
    n_head: int
    d_model: int
    d_ff: int | None = None  # None: 4 * d_model
    dropout: float = 0.0
    norm: str = "layernorm"
    checkpoint: str = "none"
    attention: str = "softmax"  # or "linear" (attention.py), non-causal

    def __post_init__(self) -> None:
        if self.d_ff is None:
            object.__setattr__(self, "d_ff", 4 * self.d_model)
        for name in ("image_size", "patch_size", "in_channels", "num_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise invalid(name, value, "a positive int")
        if self.image_size % self.patch_size:
            raise invalid("image_size", self.image_size, f"a multiple of patch_size={self.patch_size}")
        check_transformer_config(self)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ViTConfig:
        """A named shape from VIT_PRESETS, e.g. ViTConfig.preset("digits", checkpoint="selective")."""
        return config_from_preset(cls, VIT_PRESETS, name, overrides)


VIT_PRESETS: dict[str, dict[str, Any]] = {
    # unit tests: 8x8 single-channel images, 4 patches
    "tiny": dict(image_size=8, patch_size=4, in_channels=1, num_classes=10, n_layer=2, n_head=2, d_model=32),
    # scikit-learn's 8x8 digits upsampled to 16x16: 16 patches of 4x4, trains in seconds on a CPU
    "digits": dict(
        image_size=16, patch_size=4, in_channels=1, num_classes=10, n_layer=4, n_head=4, d_model=64
    ),
}


class ViT(nn.Module):
    """Patch embedding + class token + learned positions -> encoder blocks -> norm -> linear classifier."""

    def __init__(self, config: ViTConfig, layers: Layers | None = None) -> None:
        super().__init__()
        self.config, self.factories = config, layers or Layers()
        c = config
        self.patch_embed = nn.Conv2d(c.in_channels, c.d_model, kernel_size=c.patch_size, stride=c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.d_model))
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_patches + 1, c.d_model))
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c, self.factories, False, None) for _ in range(c.n_layer))
        self.norm = make_norm(c.norm, c.d_model)
        self.classifier = nn.Linear(c.d_model, c.num_classes)
        init_weights(self, c.n_layer)
        self.set_checkpoint(c.checkpoint)

    def set_checkpoint(self, mode: str) -> None:
        """Switch activation checkpointing of every block: 'none', 'full' or 'selective'."""
        for block in self.blocks:
            block.set_checkpoint(mode)
        self.config = replace(self.config, checkpoint=mode)

    def embed(self, images: Tensor) -> Tensor:
        """Images (B, C, H, W) -> tokens (B, 1 + num_patches, d_model), class token first."""
        c = self.config
        expected = (c.in_channels, c.image_size, c.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise invalid("images.shape", tuple(images.shape), f"(batch, {', '.join(map(str, expected))})")
        patches = self.patch_embed(images).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(images.shape[0], -1, -1)
        return self.drop(torch.cat((cls, patches), dim=1) + self.pos_embed)

    def head(self, x: Tensor) -> Tensor:
        """Tokens (B, T, d_model) -> class logits (B, num_classes), read from the class token."""
        return self.classifier(self.norm(x[:, 0]))

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy of the class logits in nats."""
        return F.cross_entropy(logits, labels)

    def stage_parts(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Attributes the first pipeline stage needs (embed) and the last (head, loss); blocks aside."""
        return ("patch_embed", "cls_token", "pos_embed"), ("norm", "classifier")

    def forward(self, images: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        x = self.embed(images)
        for block in self.blocks:
            x = block(x)
        logits = self.head(x)
        return logits, None if labels is None else self.loss(logits, labels)
