"""Forgetting attention: reference, blockwise XLA and Pallas GPU / TPU implementations, ACP;
plain causal attention (no gate) for the Transformer baselines."""

from pallas_kernels.forgetting_attention.api import IMPLS, forgetting_attention
from pallas_kernels.forgetting_attention.common import AttentionStats, BlockSizes
from pallas_kernels.forgetting_attention.plain import PLAIN_IMPLS, plain_attention
from pallas_kernels.forgetting_attention.pruning import Pruning, QKNormBound
from pallas_kernels.forgetting_attention.reference import forgetting_attention_reference

__all__ = [
    "IMPLS",
    "PLAIN_IMPLS",
    "AttentionStats",
    "BlockSizes",
    "Pruning",
    "QKNormBound",
    "forgetting_attention",
    "forgetting_attention_reference",
    "plain_attention",
]
