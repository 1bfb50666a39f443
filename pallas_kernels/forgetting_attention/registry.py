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

:data:`PLAIN` is the sibling table of *plain* causal attention (no forget gate: the op with
log f = 0), the Transformer baselines' kernels (``plain.plain_attention``). Each line's module
exposes ``attention(q, k, v, segment_ids, *, sm_scale, block_sizes, interpret) -> o``,
differentiable (its own VJP), on the op's layout (q [B, T, Hq, D] the last T of the S
positions of k, v [B, S, Hkv, D]); optionally ``default_block_sizes(head_dim)`` and
``check(q, k, segment_ids, block_sizes, interpret)``, which raises the one-line ValueError
for inputs the implementation cannot take. The same dispatch (``api._on_platform``) picks
the line for the platform the program is lowered for.
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


class PlainImpl(NamedTuple):
  name: str
  module: str  # the implementation's module (``attention``, see the module docstring)
  backend: Optional[str]  # the backend it compiles for (None: every backend)
  platforms: tuple[str, ...]  # the lowering platforms of that backend
  interpret: bool  # has an interpret mode (Pallas), so that it runs on a CPU for tests
  small_tiles: Optional[BlockSizes]  # the smallest tiles it takes (tests on short sequences)


PLAIN: dict[str, PlainImpl] = {i.name: i for i in (
    PlainImpl("xla", "pallas_kernels.forgetting_attention.plain_xla", None, (), False,
              BlockSizes(16, 16)),
    PlainImpl("cudnn", "pallas_kernels.forgetting_attention.plain_cudnn", "gpu", ("cuda",),
              False, None),
    PlainImpl("pallas_gpu", "pallas_kernels.forgetting_attention.plain_gpu", "gpu",
              ("cuda", "rocm"), True, BlockSizes(16, 16)),
    PlainImpl("pallas_tpu", "pallas_kernels.forgetting_attention.plain_tpu", "tpu", ("tpu",),
              True, BlockSizes(128, 128)),
)}

PLAIN_IMPLS = tuple(PLAIN)  # every plain implementation


def module(name: str, table: dict = REGISTRY):
  """The implementation's module (imported on first use); ``table=PLAIN`` for a plain one."""
  return importlib.import_module(table[name].module)


def default_block_sizes(name: str, head_dim: int, table: dict = REGISTRY) -> BlockSizes:
  """The implementation's tuned tiles (its ``default_block_sizes(head_dim)``), else the
  generic ones."""
  tuned = getattr(module(name, table), "default_block_sizes", None)
  return BlockSizes() if tuned is None else tuned(head_dim)


def chunk_impls() -> tuple[str, ...]:
  """The implementations with the chunk kernels a sequence-parallel ring runs."""
  return tuple(n for n, i in REGISTRY.items() if i.chunks)
