"""Parallel training on commlab's collectives: data parallel (bucketed, overlapped), ZeRO-1, and the
dp x pp x tp mesh with Megatron-style tensor (and sequence) parallelism and GPipe / 1F1B pipelines."""

from commlab.parallel.data import DataParallel
from commlab.parallel.mesh import Mesh
from commlab.parallel.pipeline import Pipeline, PipelineStage
from commlab.parallel.sequence import sequence_parallel_layers
from commlab.parallel.tensor import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    tensor_parallel_layers,
    vocab_parallel_cross_entropy,
)
from commlab.parallel.zero import ZeroOptimizer

__all__ = [
    "ColumnParallelLinear",
    "DataParallel",
    "Mesh",
    "Pipeline",
    "PipelineStage",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "ZeroOptimizer",
    "sequence_parallel_layers",
    "tensor_parallel_layers",
    "vocab_parallel_cross_entropy",
]
