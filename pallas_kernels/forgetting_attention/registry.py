"""Every implementation of the op, in one table: adding one costs a module and a line here.

Each blockwise module exposes ``forward`` and ``backward`` on the cumulative gate (see
``api``) and optionally ``default_block_sizes(head_dim)`` (its tuned tiles) and the chunk
kernels of the sequence-parallel ring (``forward_chunk``, ``row_terms_chunk``,
``backward_chunk`` on ``common.Rows`` x ``common.Cols``). Every list of implementations
(the public op's ``impl`` values, model configs, the command-line choices, the tests)
derives from :data:`REGISTRY`.
"""

from __future__ import annotations

import importlib
from typing import NamedTuple, Optional

from pallas_kernels.forgetting_attention.common import BlockSizes


class Impl(NamedTuple):
  name: str
  module: Optional[str]  # the blockwise module; None for the element-wise reference
  backend: Optional[str]  # the backend a Pallas impl compiles for (elsewhere: interpret=True)
  platforms: tuple[str, ...]  # the lowering platforms of that backend
  small_tiles: Optional[BlockSizes]  # the smallest tiles it takes (for tests on short sequences)


REGISTRY: dict[str, Impl] = {i.name: i for i in (
    Impl("reference", None, None, (), None),
    Impl("xla", "pallas_kernels.forgetting_attention.xla", None, (), BlockSizes(16, 16)),
    Impl("pallas_gpu", "pallas_kernels.forgetting_attention.gpu", "gpu", ("cuda", "rocm"),
         BlockSizes(16, 16)),
    Impl("pallas_tpu", "pallas_kernels.forgetting_attention.tpu", "tpu", ("tpu",),
         BlockSizes(16, 128, 32, 128)),
)}

IMPLS = tuple(REGISTRY)  # every implementation
BLOCKWISE = tuple(n for n, i in REGISTRY.items() if i.module is not None)
PALLAS = tuple(n for n, i in REGISTRY.items() if i.backend is not None)


def module(name: str):
  """The implementation's module (imported on first use)."""
  return importlib.import_module(REGISTRY[name].module)


def default_block_sizes(name: str, head_dim: int) -> BlockSizes:
  """The implementation's tuned tiles (its ``default_block_sizes(head_dim)``), else the
  generic ones."""
  tuned = getattr(module(name), "default_block_sizes", None)
  return BlockSizes() if tuned is None else tuned(head_dim)


def has_chunks(name: str) -> bool:
  """Whether the implementation has the chunk kernels a sequence-parallel ring runs."""
  return REGISTRY[name].module is not None and hasattr(module(name), "backward_chunk")


def chunk_impls() -> tuple[str, ...]:
  return tuple(n for n in BLOCKWISE if has_chunks(n))
