"""Models (GPT with RoPE, ViT) built from swappable layers, and small real data sets that need no download."""

from commlab.models.data import (
    ByteCorpus,
    ImageSplits,
    MissingDependencyError,
    ShardedBatchSampler,
    lm_batch,
    load_digits_images,
)
from commlab.models.gpt import (
    GPT,
    GPT_PRESETS,
    Block,
    GPTConfig,
    apply_rope,
    parameter_count,
    rope_frequencies,
    training_flops_per_token,
)
from commlab.models.vit import VIT_PRESETS, ViT, ViTConfig
from commlab.parallel.layers import Layers

__all__ = [
    "GPT",
    "GPT_PRESETS",
    "VIT_PRESETS",
    "Block",
    "ByteCorpus",
    "GPTConfig",
    "ImageSplits",
    "Layers",
    "MissingDependencyError",
    "ShardedBatchSampler",
    "ViT",
    "ViTConfig",
    "apply_rope",
    "lm_batch",
    "load_digits_images",
    "parameter_count",
    "rope_frequencies",
    "training_flops_per_token",
]
