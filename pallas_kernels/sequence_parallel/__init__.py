"""Forgetting attention over a sequence sharded on a mesh axis: ring, zigzag, striped and
Ulysses (``api``), the layouts (``layouts``) and the global cumulative gate (``cumsum``)."""

from pallas_kernels.sequence_parallel.api import (STRATEGIES, SequenceParallelStats,
                                                  sequence_parallel_attention, strategy_layout)
from pallas_kernels.sequence_parallel.layouts import LAYOUTS, Layout, permute, unpermute

__all__ = ["LAYOUTS", "Layout", "STRATEGIES", "SequenceParallelStats", "permute",
           "sequence_parallel_attention", "strategy_layout", "unpermute"]
