"""Models (GPT with RoPE, ViT, BERT; softmax or linear attention) built from swappable layers, and small real
data sets that need no download."""

from commlab.models.attention import ATTENTIONS, LinearAttentionState, linear_attention
from commlab.models.bert import BERT, BERT_PRESETS, MASK_ID, BERTConfig
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
from commlab.models.mlm import IGNORE_INDEX, mask_tokens, masked_accuracy, mlm_batch
from commlab.models.vit import VIT_PRESETS, ViT, ViTConfig
from commlab.parallel.layers import Layers

__all__ = [
    "ATTENTIONS",
    "BERT",
    "BERT_PRESETS",
    "GPT",
    "GPT_PRESETS",
    "IGNORE_INDEX",
    "MASK_ID",
    "VIT_PRESETS",
    "BERTConfig",
    "Block",
    "ByteCorpus",
    "GPTConfig",
    "ImageSplits",
    "Layers",
    "LinearAttentionState",
    "MissingDependencyError",
    "ShardedBatchSampler",
    "ViT",
    "ViTConfig",
    "apply_rope",
    "linear_attention",
    "lm_batch",
    "load_digits_images",
    "mask_tokens",
    "masked_accuracy",
    "mlm_batch",
    "parameter_count",
    "rope_frequencies",
    "training_flops_per_token",
]
