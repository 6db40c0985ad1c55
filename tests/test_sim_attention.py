"""The training simulator's encoders and linear attention: what `commlab sim train` counts for them.

Exact arithmetic on integers and the formulas' own terms: no timing, no tolerance beyond float rounding.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from commlab.cli import main
from commlab.errors import InvalidArgumentError
from commlab.models import BERTConfig, GPTConfig
from commlab.models.bert import BERT
from commlab.models.gpt import training_flops_per_token
from commlab.sim.training.compute import core_attention, flops_of, layer_forward, model_flops
from commlab.sim.training.memory import core_attention_bytes, layer_activation_bytes
from commlab.sim.training.workload import MODEL_PRESETS, Layout, ModelSpec, from_gpt_config, model_spec

SPEC = ModelSpec("m", layers=4, hidden=256, heads=8, seq_len=1024, vocab=1000)


def test_bert_presets_are_encoders_of_the_paper_shapes():
    base, large = model_spec("bert-base"), model_spec("bert-large")
    assert not base.causal and not large.causal
    assert (base.layers, base.hidden, base.heads, base.seq_len, base.vocab) == (12, 768, 12, 512, 30522)
    assert (large.layers, large.hidden, large.heads) == (24, 1024, 16)
    # Devlin et al. report 110M and 340M; the spec leaves out the segment table and the MLM transform.
    assert 108e6 < base.parameter_count() < 110e6 and 333e6 < large.parameter_count() < 340e6
    assert all(spec.causal for name, spec in MODEL_PRESETS.items() if name.startswith("gpt"))


def test_an_encoder_counts_the_decoders_flops_and_memory():
    encoder = replace(SPEC, causal=False)
    layout = Layout(dp=1, tp=1, pp=1, micro_batch=1, global_batch=4)
    assert model_flops(encoder, layout) == model_flops(SPEC, layout)
    assert layer_activation_bytes(encoder, 1, 2, "none", False) == layer_activation_bytes(
        SPEC, 1, 2, "none", False
    )


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_core_attention_flops(tp):
    """Softmax: q k^T and scores x v, 2 s^2 d each per head; linear: phi(K)^T V and phi(Q) S, 2 s d^2 each."""
    s, d, heads = SPEC.seq_len, SPEC.head_dim, 2 * SPEC.heads / tp  # micro-batch 2
    assert flops_of(core_attention(SPEC, 2, tp)) == 4 * heads * s * s * d
    assert flops_of(core_attention(replace(SPEC, attention="linear"), 2, tp)) == 4 * heads * s * d * d


def test_linear_attention_step_flops_match_the_model_count():
    """model_flops per token for linear attention equals models.gpt's 6 N + 12 n_layer d_model d_head (the
    norms aside, which the model counts as parameters and the simulator as no matmul)."""
    config = GPTConfig.preset("small", attention="linear", seq_len=256)
    spec = from_gpt_config(config)
    assert spec.attention == "linear"
    layout = Layout(dp=1, tp=1, pp=1, micro_batch=1, global_batch=2)
    norms = (2 * config.n_layer + 1) * config.d_model
    assert model_flops(spec, layout) / (2 * config.seq_len) == training_flops_per_token(config) - 6 * norms


def test_linear_attention_activations_have_no_square_term():
    linear = replace(SPEC, attention="linear")
    s, b, h, d, a = SPEC.seq_len, 2, SPEC.hidden, SPEC.head_dim, SPEC.heads
    for tp in (1, 2):
        assert core_attention_bytes(SPEC, b, tp) == 5 * a * s * s * b / tp
        assert core_attention_bytes(linear, b, tp) == (4 * s * b * h + 2 * b * h * d) / tp
        for sp in (False, True):
            full = layer_activation_bytes(SPEC, b, tp, "none", sp) - layer_activation_bytes(
                linear, b, tp, "none", sp
            )
            assert full == pytest.approx(
                core_attention_bytes(SPEC, b, tp) - core_attention_bytes(linear, b, tp)
            )
            # selective recomputation drops the core either way
            selective = [layer_activation_bytes(m, b, tp, "selective", sp) for m in (SPEC, linear)]
            assert selective[0] == selective[1]
    doubled = replace(linear, seq_len=2 * s)
    assert (
        layer_activation_bytes(doubled, b, 1, "none", False)
        == 2 * layer_activation_bytes(linear, b, 1, "none", False) - 2 * b * h * d
    )


def test_layer_forward_has_the_linear_ops():
    names = [item.name for item in layer_forward(replace(SPEC, attention="linear"), 1, 2, True)]
    assert "linear attention state" in names and "attention scores" not in names


def test_spec_fields_are_validated():
    with pytest.raises(InvalidArgumentError, match="attention"):
        replace(SPEC, attention="cosine")
    with pytest.raises(InvalidArgumentError, match="causal"):
        replace(SPEC, causal="no")


def test_sim_train_cli_takes_encoder_and_linear_attention(capsys):
    args = ["sim", "train", "--model", "gpt3-125m", "--gpus", "8", "--cluster", "dgx-a100", "--tp", "2"]
    assert main([*args, "--json"]) == 0
    softmax = json.loads(capsys.readouterr().out)
    assert main([*args, "--attention", "linear", "--encoder", "--json"]) == 0
    linear = json.loads(capsys.readouterr().out)
    assert linear["model"]["attention"] == "linear" and linear["model"]["causal"] is False
    assert softmax["model"]["attention"] == "softmax" and softmax["model"]["causal"] is True
    assert linear["model_flops"] < softmax["model_flops"]  # seq 2048 > d_head 64: s^2 d > s d^2
    assert main(["sim", "train", "--model", "bert-base", "--gpus", "8", "--cluster", "dgx-a100"]) == 0
    assert "encoder, softmax attention" in capsys.readouterr().out.splitlines()[0]


def test_bert_model_and_its_spec_agree_on_the_encoder_stack():
    """The simulator's layer parameters are BERT's blocks (bias-free linears, LayerNorm)."""
    config = BERTConfig.preset("small")
    spec = ModelSpec("b", layers=config.n_layer, hidden=config.d_model, heads=config.n_head, biases=False)
    block = sum(p.numel() for p in BERT(config).blocks[0].parameters())
    assert spec.layer_parameters() == block
