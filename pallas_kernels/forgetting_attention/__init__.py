"""Forgetting attention: reference, blockwise XLA and Pallas GPU implementations, ACP."""

from pallas_kernels.forgetting_attention.api import IMPLS, forgetting_attention
from pallas_kernels.forgetting_attention.common import AttentionStats, BlockSizes
from pallas_kernels.forgetting_attention.pruning import Pruning, QKNormBound
from pallas_kernels.forgetting_attention.reference import forgetting_attention_reference

__all__ = [
    "IMPLS",
    "AttentionStats",
    "BlockSizes",
    "Pruning",
    "QKNormBound",
    "forgetting_attention",
    "forgetting_attention_reference",
]
