"""Every implementation of the op, in one table: adding one costs a module and a line here.

Each blockwise module exposes ``forward`` and ``backward`` on the cumulative gate (see
``api``) and optionally ``default_block_sizes(head_dim)`` (its tuned tiles). A module may
expose the chunk kernels of the sequence-parallel ring (``forward_chunk``,
``row_terms_chunk``, ``backward_chunk`` on ``common.Rows`` x ``common.Cols``; ``chunks=True``
in its line, which the sequence-parallel op reads without importing the module): every
blockwise one does, and the element-wise ``reference`` too (float64 under x64, the oracle of
the others' chunk kernels, a float64 ring). Every list of implementations
(the public op's ``impl`` values, model configs, the command-line choices, the tests)
derives from :data:`REGISTRY`.
"""

from __future__ import annotations

import importlib
from typing import NamedTuple, Optional

from pallas_kernels.forgetting_attention.common import BlockSizes


class Impl(NamedTuple):
  name: str
  module: str  # the implementation's module
  blockwise: bool  # has ``forward`` / ``backward`` on the cumulative gate (not the reference)
  backend: Optional[str]  # the backend a Pallas impl compiles for (elsewhere: interpret=True)
  platforms: tuple[str, ...]  # the lowering platforms of that backend
  small_tiles: Optional[BlockSizes]  # the smallest tiles it takes (for tests on short sequences)
  chunks: bool  # has the chunk kernels of the sequence-parallel ring


REGISTRY: dict[str, Impl] = {i.name: i for i in (
    Impl("reference", "pallas_kernels.forgetting_attention.reference", False, None, (), None,
         True),
    Impl("xla", "pallas_kernels.forgetting_attention.xla", True, None, (), BlockSizes(16, 16),
         True),
    Impl("pallas_gpu", "pallas_kernels.forgetting_attention.gpu", True, "gpu", ("cuda", "rocm"),
         BlockSizes(16, 16), True),
    Impl("pallas_tpu", "pallas_kernels.forgetting_attention.tpu", True, "tpu", ("tpu",),
         BlockSizes(16, 128, 32, 128), True),
)}

IMPLS = tuple(REGISTRY)  # every implementation
BLOCKWISE = tuple(n for n, i in REGISTRY.items() if i.blockwise)
PALLAS = tuple(n for n, i in REGISTRY.items() if i.backend is not None)


def module(name: str):
  """The implementation's module (imported on first use)."""
  return importlib.import_module(REGISTRY[name].module)


def default_block_sizes(name: str, head_dim: int) -> BlockSizes:
  """The implementation's tuned tiles (its ``default_block_sizes(head_dim)``), else the
  generic ones."""
  tuned = getattr(module(name), "default_block_sizes", None)
  return BlockSizes() if tuned is None else tuned(head_dim)


def chunk_impls() -> tuple[str, ...]:
  """The implementations with the chunk kernels a sequence-parallel ring runs."""
  return tuple(n for n, i in REGISTRY.items() if i.chunks)
