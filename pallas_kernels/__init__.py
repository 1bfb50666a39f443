"""Pallas and XLA kernels for forget-gated (FoX) softmax attention, with their references.

Importable on its own: nothing here depends on ``fox_jax``.
"""

from pallas_kernels.forgetting_attention import (
    AttentionStats,
    BlockSizes,
    Pruning,
    QKNormBound,
    forgetting_attention,
    forgetting_attention_reference,
    plain_attention,
)

__all__ = [
    "AttentionStats",
    "BlockSizes",
    "Pruning",
    "QKNormBound",
    "forgetting_attention",
    "forgetting_attention_reference",
    "plain_attention",
]
