"""Model configuration and the papers' named presets.

``ModelConfig`` is one frozen dataclass holding every architectural option of the FoX and
Transformer families (LLaMA and Pro blocks), the attention implementation and ACP pruning,
and the dtypes. It is validated when constructed, with errors naming the offending field.

Presets (``PRESETS``, ``get_preset``) follow the FoX paper (arXiv 2503.02130), section 3 of
REFERENCE.md and the authors' experiment configs:

  family               forget gate  QK-norm  out gate  out norm  KV-shift  RoPE   MLP ratio
  fox_llama            full         -        -         -         -         -      4
  fox_pro              full         yes      yes       yes       yes       -      3.5
  transformer_llama    none         -        -         -         -         500k   4
  transformer_pro      none         yes      yes       yes       yes       500k   3.5

  size    layers  d_model  FoX heads x dim  Transformer heads x dim
  125m    12      768      12 x 64          12 x 64
  360m    24      1024     16 x 64          16 x 64
  760m    24      1536     24 x 64          12 x 128
  tiny    2       64       4 x 16           4 x 16      (tests and CPU runs; float32 compute)

The paper-sized presets use the LongCrawl64 vocabulary (GPT-2 tiktoken, 50257) and QK-norm
scales shared across heads, as in the authors' experiments and released checkpoints. The MLP
width is 256 * ceil((2/3) * ratio * d_model / 256).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import jax.numpy as jnp

from pallas_kernels.forgetting_attention.api import IMPLS
from pallas_kernels.forgetting_attention.common import BlockSizes
from pallas_kernels.forgetting_attention.pruning import Pruning
from pallas_kernels.forgetting_attention.registry import PLAIN_IMPLS
from pallas_kernels.sequence_parallel.api import STRATEGIES

FORGET_GATES = ("full", "bias_only", "fixed", "none")
ATTN_IMPLS = ("auto",) + IMPLS  # every implementation of the op, one list
# Plain causal attention for forget_gate 'none' (registry.PLAIN), or "forgetting": the
# forgetting op with log f = 0 under attn_impl.
PLAIN_ATTN_IMPLS = ("auto",) + PLAIN_IMPLS + ("forgetting",)
DTYPES = ("float32", "bfloat16", "float16")
ACTIVATIONS = ("sigmoid", "silu")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Every option of the decoder LM. Defaults are FoX (LLaMA) at 125M.

  Attributes:
    vocab_size: number of token ids.
    d_model: residual stream width.
    num_layers: number of blocks.
    num_heads: query heads.
    num_kv_heads: key/value heads (GQA); None means num_heads.
    head_dim: per-head width; None means d_model // num_heads. num_heads * head_dim must
      equal d_model (the output projection maps heads back to d_model).
    mlp_ratio: MLP width rule 256 * ceil((2/3) * mlp_ratio * d_model / 256).
    mlp_hidden: explicit MLP width, overriding the rule.
    mlp_act: SwiGLU gate activation, "silu" (SwiGLU) or "sigmoid" (GLU).
    forget_gate: "full" (data-dependent, sigmoid(W x + b)), "bias_only" (learned per-head
      bias), "fixed" (constant per-head bias), "none" (f = 1: plain causal attention).
    decay_time_min, decay_time_max: for "bias_only" / "fixed", initial per-head gate biases
      with decay times -1 / log f log-spaced between these; required for "fixed", optional
      for "bias_only" (default bias 0), not allowed for "full" / "none".
    qk_norm: per-head RMSNorm on q and k.
    qk_norm_shared_across_heads: one [head_dim] scale shared by all heads (as in the
      authors' experiments and checkpoints) instead of one per head.
    output_gate: o <- o * act(W_g x).
    output_gate_act: the output gate's activation ("sigmoid", or "silu" without output norm).
    output_norm: per-head RMSNorm on the attention output (before the gate).
    kv_shift: data-dependent shift on both keys and values (k_t = a_t k~_{t-1} + (1-a_t) k~_t).
    k_shift, v_shift: shift keys / values separately; None means ``kv_shift``.
    rope: rotary position embedding on q and k (the Transformer baselines).
    rope_base: RoPE theta.
    tie_embeddings: logits from the input embedding matrix (no separate lm_head).
    norm_eps: RMSNorm epsilon (block norms, final norm, output norm).
    qk_norm_eps: QK-norm epsilon; 1e-5 as in the authors' and fla's QK-norm, which keep
      their norm library's default rather than ``norm_eps``.
    attn_impl: implementation of ``forgetting_attention``: "auto" | "xla" | "reference" |
      "pallas_gpu" | "pallas_tpu".
    plain_attn_impl: what forget gate "none" (log f = 0) runs, so that a Transformer pays
      for no decay: a plain causal attention of ``pallas_kernels.forgetting_attention.plain``
      ("auto": cuDNN or JAX's Pallas flash attention on a GPU, splash attention on a TPU,
      the blockwise XLA kernel elsewhere; or "xla" | "cudnn" | "pallas_gpu" | "pallas_tpu"),
      each at its default tiles, or "forgetting": the forgetting op with a zero gate under
      ``attn_impl`` (as before this field; the same function, equal up to float32
      rounding). Must stay "auto" for the other forget gates. With ``pruning``, a forget
      gate "none" model on a plain kernel prunes nothing, as the forgetting op did (D = 0
      is never below the threshold), and reports no tile counts; context parallelism and
      cached decoding always run the forgetting op with a zero gate.
    block_sizes: tile sizes for the blockwise implementations of ``forgetting_attention``
      (None: their default).
    pruning: ACP settings (a ``pallas_kernels.Pruning`` or a dict of its fields), or None.
    context_strategy: how attention runs when the mesh in scope splits the sequence over a
      'context' axis (``fox_jax.context``): "zigzag" | "striped" | "ring" | "ulysses".
      Without such an axis it changes nothing.
    context_stripe: tokens per stripe of the "striped" strategy (1: token i on device
      i mod P; wider stripes cut the key/value shift's halo to one token per stripe).
    dtype: compute dtype of activations and matmuls.
    param_dtype: storage dtype of the parameters.
    remat: rematerialise each block in the backward pass (activation checkpointing).
    seq_chunk: None, or tokens per chunk (per 'context' shard) in which the token-wise
      layers run: the MLP, and the LM head together with the cross-entropy of
      ``DecoderLM.token_losses``; each chunk is rematerialised in the backward pass, so no
      [B, T, V] logits or [B, T, F] MLP hidden is ever whole (``fox_jax.seqchunk``). The
      same math; the sequence length must be a multiple of seq_chunk x the mesh's context
      size.
    init_std: standard deviation of every weight matrix and the embedding at init.
  """

  vocab_size: int = 50257
  d_model: int = 768
  num_layers: int = 12
  num_heads: int = 12
  num_kv_heads: Optional[int] = None
  head_dim: Optional[int] = None
  mlp_ratio: float = 4.0
  mlp_hidden: Optional[int] = None
  mlp_act: str = "silu"
  forget_gate: str = "full"
  decay_time_min: Optional[float] = None
  decay_time_max: Optional[float] = None
  qk_norm: bool = False
  qk_norm_shared_across_heads: bool = False
  output_gate: bool = False
  output_gate_act: str = "sigmoid"
  output_norm: bool = False
  kv_shift: bool = False
  k_shift: Optional[bool] = None
  v_shift: Optional[bool] = None
  rope: bool = False
  rope_base: float = 500000.0
  tie_embeddings: bool = False
  norm_eps: float = 1e-6
  qk_norm_eps: float = 1e-5
  attn_impl: str = "auto"
  plain_attn_impl: str = "auto"
  block_sizes: Optional[BlockSizes] = None
  pruning: Optional[Pruning] = None
  context_strategy: str = "zigzag"
  context_stripe: int = 1
  dtype: str = "bfloat16"
  param_dtype: str = "float32"
  remat: bool = False
  seq_chunk: Optional[int] = None
  init_std: float = 0.02

  def __post_init__(self):
    # Normalise derived and dict-valued fields first, so that validation sees final values.
    set_ = lambda name, value: object.__setattr__(self, name, value)
    if isinstance(self.block_sizes, Mapping):
      set_("block_sizes", BlockSizes(**self.block_sizes))
    if isinstance(self.pruning, Mapping):
      set_("pruning", Pruning(**self.pruning))
    for name in ("dtype", "param_dtype"):
      value = getattr(self, name)
      if not isinstance(value, str):
        set_(name, jnp.dtype(value).name)
    _check_positive_int(self, "vocab_size", "d_model", "num_layers", "num_heads")
    if self.num_kv_heads is None:
      set_("num_kv_heads", self.num_heads)
    if self.k_shift is None:
      set_("k_shift", bool(self.kv_shift))
    if self.v_shift is None:
      set_("v_shift", bool(self.kv_shift))
    if self.head_dim is None:
      if self.d_model % self.num_heads:
        raise ValueError(f"head_dim: num_heads ({self.num_heads}) must divide d_model "
                         f"({self.d_model}) to derive the head dim")
      set_("head_dim", self.d_model // self.num_heads)
    self._validate()

  def _validate(self):
    _check_positive_int(self, "num_kv_heads", "head_dim")
    if self.num_heads * self.head_dim != self.d_model:
      raise ValueError(f"head_dim: num_heads * head_dim = {self.num_heads} * {self.head_dim} "
                       f"must equal d_model ({self.d_model}); the head dim must divide d_model")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_kv_heads: num_heads ({self.num_heads}) must be a multiple of "
                       f"num_kv_heads ({self.num_kv_heads}) for grouped-query attention")
    if self.seq_chunk is not None:
      _check_positive_int(self, "seq_chunk")
    if self.mlp_hidden is not None:
      _check_positive_int(self, "mlp_hidden")
    elif not self.mlp_ratio > 0:
      raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio!r}")
    _check_choice(self, "forget_gate", FORGET_GATES)
    _check_choice(self, "attn_impl", ATTN_IMPLS)
    _check_choice(self, "plain_attn_impl", PLAIN_ATTN_IMPLS)
    if self.plain_attn_impl != "auto" and self.forget_gate != "none":
      raise ValueError(f"plain_attn_impl applies to forget_gate 'none' only, got "
                       f"plain_attn_impl={self.plain_attn_impl!r} with {self.forget_gate!r}")
    _check_choice(self, "dtype", DTYPES)
    _check_choice(self, "context_strategy", tuple(STRATEGIES))
    _check_positive_int(self, "context_stripe")
    if self.context_stripe != 1 and self.context_strategy != "striped":
      raise ValueError(f"context_stripe applies to context_strategy 'striped' only, got "
                       f"context_stripe={self.context_stripe} with {self.context_strategy!r}")
    _check_choice(self, "param_dtype", DTYPES)
    _check_choice(self, "mlp_act", ("silu", "sigmoid"))
    _check_choice(self, "output_gate_act", ACTIVATIONS)
    if self.output_norm and self.output_gate and self.output_gate_act != "sigmoid":
      raise ValueError("output_gate_act must be 'sigmoid' when output_norm is on "
                       f"(got {self.output_gate_act!r})")
    times = (self.decay_time_min, self.decay_time_max)
    if self.forget_gate == "fixed" and None in times:
      raise ValueError("decay_time_min and decay_time_max are required with forget_gate='fixed'")
    if self.forget_gate in ("full", "none") and times != (None, None):
      raise ValueError(f"decay_time_min / decay_time_max only apply to forget_gate 'bias_only' "
                       f"or 'fixed', not {self.forget_gate!r}")
    if (times[0] is None) != (times[1] is None):
      raise ValueError("decay_time_min and decay_time_max must be given together")
    if times[0] is not None and not (0 < times[0] <= times[1]):
      raise ValueError(f"decay_time_min must satisfy 0 < decay_time_min <= decay_time_max, "
                       f"got {times}")
    if not self.rope_base > 0:
      raise ValueError(f"rope_base must be > 0, got {self.rope_base!r}")
    if self.rope and self.head_dim % 2:
      raise ValueError(f"head_dim must be even with rope, got {self.head_dim}")
    for name in ("norm_eps", "qk_norm_eps"):
      if not getattr(self, name) > 0:
        raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
    if not self.init_std > 0:
      raise ValueError(f"init_std must be > 0, got {self.init_std!r}")
    if self.block_sizes is not None and not isinstance(self.block_sizes, BlockSizes):
      raise ValueError(f"block_sizes must be a BlockSizes, a dict or None, got {type(self.block_sizes)}")
    if self.pruning is not None:
      if not isinstance(self.pruning, Pruning):
        raise ValueError(f"pruning must be a Pruning, a dict or None, got {type(self.pruning)}")
      if not isinstance(self.pruning.qk_bound, (str, int, float)):
        raise ValueError("pruning.qk_bound must be 'auto' or a float in a model config")

  @property
  def mlp_width(self) -> int:
    """Hidden width of the SwiGLU MLP."""
    if self.mlp_hidden is not None:
      return self.mlp_hidden
    return 256 * math.ceil(int(self.d_model * self.mlp_ratio * 2 / 3) / 256)

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def params_dtype(self):
    return jnp.dtype(self.param_dtype)

  def replace(self, **overrides) -> "ModelConfig":
    """A copy with some fields changed (validated again)."""
    fields = self.to_dict()
    # Derived fields follow their sources unless overridden explicitly.
    if "kv_shift" in overrides:
      fields["k_shift"] = fields["v_shift"] = None
    if "num_heads" in overrides or "d_model" in overrides:
      fields["head_dim"] = None
      if "num_kv_heads" not in overrides and fields["num_kv_heads"] == self.num_heads:
        fields["num_kv_heads"] = None
    fields.update(overrides)
    return ModelConfig(**fields)

  def to_dict(self) -> dict[str, Any]:
    """Plain JSON-serialisable fields (``from_dict`` inverts it)."""
    out = {}
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
      out[f.name] = value
    return out

  @classmethod
  def from_dict(cls, fields: Mapping[str, Any]) -> "ModelConfig":
    unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
    return cls(**fields)


def _check_positive_int(cfg, *names):
  for name in names:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_choice(cfg, name, choices):
  value = getattr(cfg, name)
  if value not in choices:
    raise ValueError(f"{name} must be one of {choices}, got {value!r}")


# Architecture of each family (REFERENCE.md section 3).
_FAMILIES = {
    "fox_llama": dict(forget_gate="full", mlp_ratio=4.0),
    "fox_pro": dict(forget_gate="full", qk_norm=True, output_gate=True, output_norm=True,
                    kv_shift=True, mlp_ratio=3.5),
    "transformer_llama": dict(forget_gate="none", rope=True, mlp_ratio=4.0),
    "transformer_pro": dict(forget_gate="none", rope=True, qk_norm=True, output_gate=True,
                            output_norm=True, kv_shift=True, mlp_ratio=3.5),
}

# (layers, d_model, FoX heads, Transformer heads) per size.
_SIZES = {
    "125m": (12, 768, 12, 12),
    "360m": (24, 1024, 16, 16),
    "760m": (24, 1536, 24, 12),
}

_TINY = dict(vocab_size=259, num_layers=2, d_model=64, num_heads=4, dtype="float32")


def _build_presets() -> dict[str, ModelConfig]:
  presets = {}
  for family, arch in _FAMILIES.items():
    for size, (layers, d_model, fox_heads, tf_heads) in _SIZES.items():
      heads = fox_heads if family.startswith("fox") else tf_heads
      presets[f"{family}_{size}"] = ModelConfig(
          num_layers=layers, d_model=d_model, num_heads=heads,
          qk_norm_shared_across_heads=bool(arch.get("qk_norm")), **arch)
    presets[f"{family}_tiny"] = ModelConfig(**_TINY, **arch)
  return presets


PRESETS: dict[str, ModelConfig] = _build_presets()


def get_preset(name: str, **overrides) -> ModelConfig:
  """The named preset with some fields replaced, e.g. ``get_preset('fox_pro_tiny', vocab_size=97)``."""
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
