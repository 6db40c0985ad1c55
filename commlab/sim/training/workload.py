"""What a simulated training step trains, and how it is split: a transformer's shape and a parallel layout.

`ModelSpec` is a GPT-style decoder (layers, hidden size, heads, sequence length, vocabulary) or a
BERT-style encoder (causal = false), with softmax or linear attention, with presets for the models of
Korthikanti et al. 2022 (gpt-22b ... gpt-1t), the GPT-3 family and BERT, or read from a TOML file.
`Layout` is DP x TP x PP with microbatches, virtual stages, ZeRO, activation checkpointing and
sequence parallelism; `check_layout` rejects layouts that cannot run, naming the argument.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from commlab.errors import invalid
from commlab.shared.attention import ATTENTIONS
from commlab.shared.layout import CHECKPOINT_MODES
from commlab.shared.pipeline_order import SCHEDULES

ZERO_STAGES = (0, 1, 2)
NORMS = ("layernorm", "rmsnorm")


@dataclass(frozen=True)
class ModelSpec:
    """A transformer: `ffn_hidden` defaults to 4 x hidden; parameters as Megatron-LM's GPT (biases,
    LayerNorm, learned positions, tied embeddings) unless the flags say otherwise.

    causal: a decoder (True) or a bidirectional encoder (False). The simulator counts softmax attention's
    two products over the full s x s scores either way (as Megatron-LM and Korthikanti et al. do: the mask
    picks which entries count, the kernels counted do the whole square), so an encoder of one shape costs
    what the decoder does; the field says what the model is. attention: "softmax" or "linear"
    (Katharopoulos et al. 2020), which replaces the s x s products by two of 2 s d^2 FLOPs per head and the
    s x s activations by the feature maps (compute.py, memory.py). An encoder's segment table and its MLM
    head's transform are not counted (about 0.6% of BERT-base's parameters).
    """

    name: str
    layers: int
    hidden: int
    heads: int
    seq_len: int = 2048
    vocab: int = 51200
    ffn_hidden: int = 0  # 0: 4 x hidden
    biases: bool = True
    norm: str = "layernorm"
    position_embedding: bool = True
    tied_embeddings: bool = True
    causal: bool = True
    attention: str = "softmax"

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "heads", "seq_len", "vocab"):
            _check_positive(name, getattr(self, name))
        if self.ffn_hidden == 0:
            object.__setattr__(self, "ffn_hidden", 4 * self.hidden)
        _check_positive("ffn_hidden", self.ffn_hidden)
        if self.hidden % self.heads:
            raise invalid("hidden", self.hidden, f"a multiple of heads={self.heads}")
        if self.norm not in NORMS:
            raise invalid("norm", self.norm, NORMS)
        if self.attention not in ATTENTIONS:
            raise invalid("attention", self.attention, ATTENTIONS)
        if not isinstance(self.causal, bool):
            raise invalid("causal", self.causal, "true (a decoder) or false (an encoder)")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def layer_parameters(self) -> int:
        """Parameters of one transformer layer: QKV, output projection, two MLP matrices, norms, biases."""
        h, f = self.hidden, self.ffn_hidden
        norms = 2 * (2 * h if self.norm == "layernorm" else h)
        biases = (3 * h + h + f + h) if self.biases else 0
        return 4 * h * h + 2 * h * f + norms + biases

    def embedding_parameters(self) -> int:
        """Token embedding (and learned positions); the output head shares the token table when tied."""
        return self.vocab * self.hidden + (self.seq_len * self.hidden if self.position_embedding else 0)

    def head_parameters(self) -> int:
        """The final norm, plus an untied output projection."""
        norm = 2 * self.hidden if self.norm == "layernorm" else self.hidden
        return norm + (0 if self.tied_embeddings else self.vocab * self.hidden)

    def parameter_count(self) -> int:
        """All parameters: 12 l h^2 + 13 l h + (V + s) h + 2h for Megatron's GPT with ffn 4h."""
        return self.layers * self.layer_parameters() + self.embedding_parameters() + self.head_parameters()

    def to_dict(self) -> dict:
        return asdict(self)


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise invalid(name, value, "a positive integer")


def _korthikanti(name: str, hidden: int, layers: int, heads: int) -> ModelSpec:
    return ModelSpec(name, layers, hidden, heads, seq_len=2048, vocab=51200)


def _gpt3(name: str, layers: int, hidden: int, heads: int) -> ModelSpec:
    return ModelSpec(name, layers, hidden, heads, seq_len=2048, vocab=50257)


def _bert(name: str, layers: int, hidden: int, heads: int) -> ModelSpec:
    return ModelSpec(name, layers, hidden, heads, seq_len=512, vocab=30522, causal=False)


# Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", Table 3:
# (hidden, layers, heads), sequence 2048, vocabulary 51200.
# GPT-3 family: Brown et al. 2020, "Language Models are Few-Shot Learners", Table 2.1 (n_layer, d_model,
# n_head), n_ctx 2048, GPT-2 BPE vocabulary 50257. As in commlab.models.gpt.GPT_PRESETS, two rows keep
# d_head = 128 where the table breaks d_model = n_head x d_head: 1.3B has 16 heads, 13B d_model 5120.
# BERT: Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers", sec. 3: BASE (L 12,
# H 768, A 12) and LARGE (L 24, H 1024, A 16), WordPiece vocabulary 30522, sequences of 512, learned
# positions, encoders (causal = false).
MODEL_PRESETS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        _korthikanti("gpt-22b", 6144, 48, 64),
        _korthikanti("gpt-175b", 12288, 96, 96),
        _korthikanti("gpt-530b", 20480, 105, 128),
        _korthikanti("gpt-1t", 25600, 128, 160),
        _gpt3("gpt3-125m", 12, 768, 12),
        _gpt3("gpt3-350m", 24, 1024, 16),
        _gpt3("gpt3-760m", 24, 1536, 16),
        _gpt3("gpt3-1.3b", 24, 2048, 16),
        _gpt3("gpt3-2.7b", 32, 2560, 32),
        _gpt3("gpt3-6.7b", 32, 4096, 32),
        _gpt3("gpt3-13b", 40, 5120, 40),
        _gpt3("gpt3-175b", 96, 12288, 96),
        _bert("bert-base", 12, 768, 12),
        _bert("bert-large", 24, 1024, 16),
    )
}


def model_spec(
    name_or_path: str | ModelSpec, seq_len: int | None = None, vocab: int | None = None
) -> ModelSpec:
    """A preset by name or a TOML file (keys: ModelSpec's fields), with sequence or vocabulary overridden."""
    if isinstance(name_or_path, ModelSpec):
        spec = name_or_path
    elif str(name_or_path).lower() in MODEL_PRESETS:
        spec = MODEL_PRESETS[str(name_or_path).lower()]
    elif str(name_or_path).endswith(".toml"):
        spec = load_model_spec(name_or_path)
    else:
        raise invalid("model", name_or_path, f"a preset ({', '.join(MODEL_PRESETS)}) or a .toml file")
    changes = {k: v for k, v in (("seq_len", seq_len), ("vocab", vocab)) if v is not None}
    return replace(spec, **changes) if changes else spec


def from_gpt_config(config: Any, name: str = "gpt") -> ModelSpec:
    """A `commlab.models.GPTConfig` (read by its fields, so this module needs no torch) as a ModelSpec:
    bias-free linears and rotary positions (no learned position table), its attention (softmax or
    linear), so `commlab sim train` simulates what commlab's GPT trains."""
    return ModelSpec(
        name,
        layers=config.n_layer,
        hidden=config.d_model,
        heads=config.n_head,
        seq_len=config.seq_len,
        vocab=config.vocab_size,
        ffn_hidden=config.d_ff,
        biases=False,
        norm=config.norm,
        position_embedding=False,
        tied_embeddings=config.tie_embeddings,
        attention=getattr(config, "attention", "softmax"),
    )


def load_model_spec(path: str | Path) -> ModelSpec:
    """Read a model from TOML: `layers`, `hidden`, `heads` required; `name` defaults to the file's stem."""
    import tomllib

    path = Path(path)
    if not path.is_file():
        raise invalid("model", str(path), "an existing .toml file or a preset name")
    with path.open("rb") as handle:
        data = tomllib.load(handle)
    known = {f.name for f in fields(ModelSpec)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise invalid(f"{path}: key", unknown[0], sorted(known))
    missing = [k for k in ("layers", "hidden", "heads") if k not in data]
    if missing:
        raise invalid(f"{path}: key", missing[0], "layers, hidden and heads must all be given")
    return ModelSpec(**{"name": path.stem, **data})


@dataclass(frozen=True)
class Layout:
    """How a step is split over dp x tp x pp GPUs: microbatches, schedule, ZeRO, checkpointing.

    `virtual_stages` > 1 (model chunks per GPU) needs the interleaved schedule. `fp32_grads` keeps fp32
    main gradients (Megatron-LM's default: 18 bytes/parameter with Adam instead of 16).
    """

    dp: int
    tp: int
    pp: int
    micro_batch: int
    global_batch: int
    virtual_stages: int = 1
    schedule: str = "1f1b"
    zero: int = 0
    checkpoint: str = "none"
    sequence_parallel: bool = False
    fp32_grads: bool = False
    bucket_bytes: int = 25_000_000  # gradient bucket for the data-parallel reduction (PyTorch DDP's 25 MB)

    @property
    def gpus(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def microbatches(self) -> int:
        """Microbatches per data-parallel replica per step."""
        return self.global_batch // (self.micro_batch * self.dp)

    @property
    def virtual_pipeline(self) -> int:
        """Pipeline stages counted over model chunks: pp x virtual stages."""
        return self.pp * self.virtual_stages

    def describe(self) -> str:
        parts = [f"dp{self.dp} tp{self.tp} pp{self.pp}"]
        if self.virtual_stages > 1:
            parts.append(f"v{self.virtual_stages}")
        parts.append(f"mb{self.micro_batch}")
        parts.append(self.checkpoint)
        if self.sequence_parallel:
            parts.append("sp")
        if self.zero:
            parts.append(f"zero{self.zero}")
        if self.schedule == "gpipe":
            parts.append("gpipe")
        return " ".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_layout(model: ModelSpec, layout: Layout, gpus: int | None = None, gpus_per_node: int = 0) -> None:
    """Raise InvalidArgumentError, naming the argument and what is accepted, if `layout` cannot run."""
    for name in ("dp", "tp", "pp", "micro_batch", "global_batch", "virtual_stages", "bucket_bytes"):
        _check_positive(name, getattr(layout, name))
    if layout.schedule not in SCHEDULES:
        raise invalid("schedule", layout.schedule, SCHEDULES)
    if layout.checkpoint not in CHECKPOINT_MODES:
        raise invalid("checkpoint", layout.checkpoint, CHECKPOINT_MODES)
    if layout.zero not in ZERO_STAGES:
        raise invalid("zero", layout.zero, ZERO_STAGES)
    if model.heads % layout.tp:
        raise invalid("tp", layout.tp, f"a divisor of heads={model.heads}: {_divisors(model.heads)}")
    if model.ffn_hidden % layout.tp:
        raise invalid("tp", layout.tp, f"a divisor of ffn_hidden={model.ffn_hidden}")
    if gpus_per_node and (layout.tp > gpus_per_node or gpus_per_node % layout.tp):
        raise invalid(
            "tp", layout.tp, f"a divisor of the {gpus_per_node} GPUs of a node (TP stays in a node)"
        )
    if gpus is not None and layout.gpus != gpus:
        if gpus % (layout.tp * layout.pp):
            raise invalid("gpus", gpus, f"a multiple of tp x pp = {layout.tp} x {layout.pp}")
        raise invalid(
            "dp", layout.dp, f"gpus / (tp x pp) = {gpus} / ({layout.tp} x {layout.pp}) (dp x tp x pp == gpus)"
        )
    if layout.global_batch % (layout.micro_batch * layout.dp):
        raise invalid(
            "global_batch",
            layout.global_batch,
            f"a multiple of micro_batch x dp = {layout.micro_batch} x {layout.dp}",
        )
    if layout.virtual_stages > 1 and layout.schedule != "interleaved":
        raise invalid("schedule", layout.schedule, "'interleaved' when virtual_stages > 1")
    if layout.schedule == "interleaved":
        if layout.pp < 2 or layout.virtual_stages < 2:
            raise invalid(
                "virtual_stages",
                layout.virtual_stages,
                "an integer >= 2 with pp >= 2 for the interleaved schedule",
            )
        if layout.microbatches % layout.pp:
            raise invalid(
                "global_batch",
                layout.global_batch,
                f"a multiple of micro_batch x dp x pp = {layout.micro_batch * layout.dp * layout.pp} "
                "(the interleaved schedule runs microbatches in groups of pp)",
            )
    if model.layers % layout.virtual_pipeline:
        accepted = [d for d in _divisors(model.layers)]
        name = "pp" if layout.virtual_stages == 1 else "pp x virtual_stages"
        raise invalid(name, layout.virtual_pipeline, f"a divisor of layers={model.layers}: {accepted}")


def layers_per_chunk(model: ModelSpec, layout: Layout) -> int:
    """Transformer layers in each model chunk (virtual stage)."""
    return model.layers // layout.virtual_pipeline


def padded_vocab(model: ModelSpec, tp: int, multiple: int = 128) -> int:
    """The vocabulary padded to a multiple of `multiple` x tp, as Megatron-LM pads it for vocab-parallel
    layers."""
    step = multiple * tp
    return math.ceil(model.vocab / step) * step
