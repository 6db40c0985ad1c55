"""The layer factories a model is built from: the default single-device parts, and the dataclass that
tensor parallelism (`tensor.tensor_parallel_layers`) and sequence parallelism
(`sequence.sequence_parallel_layers`) fill with their sharded parts. The models (`commlab.models`) take
a `Layers` and never import the parallel layers themselves, so parallel/ sits below models/.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn


def linear(in_features: int, out_features: int) -> nn.Module:
    """The default projection: a bias-free nn.Linear."""
    return nn.Linear(in_features, out_features, bias=False)


def tied_logits(x: Tensor, embedding: nn.Module) -> Tensor:
    """Output head tied to the token embedding: logits = x @ embedding.weight^T."""
    return F.linear(x, embedding.weight)


def full_logits(logits: Tensor) -> Tensor:
    """The default head already gives full-vocabulary logits (tensor parallelism gathers its shards)."""
    return logits


@dataclass(frozen=True)
class Layers:
    """Factories for the parts tensor parallelism replaces; the defaults build a single-device model.

    Linears are asked for by their full (logical) sizes. column_linear may split its output features
    across ranks (qkv, MLP up, untied head), row_linear its input features (attention out, MLP down).
    """

    column_linear: Callable[[int, int], nn.Module] = linear
    row_linear: Callable[[int, int], nn.Module] = linear
    embedding: Callable[[int, int], nn.Module] = nn.Embedding
    tied_logits: Callable[[Tensor, nn.Module], Tensor] = tied_logits
    cross_entropy: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy  # (N, V) logits, (N,) targets
    gather_logits: Callable[[Tensor], Tensor] = full_logits  # head output -> full-vocabulary logits
