"""Import PyTorch FoX checkpoints into ``fox_jax.model.DecoderLM``.

Two sources:

* the authors' Hugging Face checkpoints (``config.json`` with model type
  ``forgetting_transformer-project_fox`` and ``model.safetensors``):
  ``load_authors_checkpoint(path)``. Only safetensors and numpy are needed, not torch.
* the ``ForgettingTransformerForCausalLM`` of flash-linear-attention (fla), as a torch
  model, a state dict with its config, or a directory saved by its ``save_pretrained``
  (model type ``forgetting_transformer``): ``load_fla_model(...)``, ``load_fla_checkpoint``.

Every option of the source config is either mapped onto ``ModelConfig``, checked to have a
value the import reproduces exactly, or (for options that cannot change the forward pass:
token ids, caching, fused-kernel switches, initialisation) ignored; anything else raises a
ValueError naming the option, as does a missing required option or a value of the wrong
type. Loading checks each tensor's shape, that it is floating point and finite, that every
checkpoint tensor is used and that every model parameter is filled; names and shapes are
checked against the config before any model is built.

Checkpoints are untrusted input. Files are read and validated by ``fox_jax.safetensors_io``
(safetensors headers against the file size, shard names confined to the checkpoint
directory); converted checkpoints are written and read by ``fox_jax.converted``. Every
problem is a one-line ValueError naming the file at fault.

Names (L = layer index; d = d_model, V = vocab, Hq / Hkv = query / key-value heads, D = head
dim, F = MLP width; "W^T" = transpose of the torch ``nn.Linear.weight`` [out, in], then
reshape with heads outermost, the layout of torch's ``(h d)`` feature axis):

  ours (nnx.state path)            authors' checkpoint (model.layers.L. ...)   fla (model.layers.L. ...)
  embed.embedding [V, d]           model.embeddings.weight  (as is)            model.embeddings.weight
  layers[L].attn_norm.scale        attn_norm.weight                            attn_norm.weight
  ...attn.q_proj.kernel [d,Hq,D]   attn.q_proj.weight  W^T                     attn.q_proj.weight
  ...attn.k_proj.kernel [d,Hkv,D]  attn.k_proj.weight, or with key shift       attn.k_proj.weight
                                   attn.k_proj.linear.weight  W^T
  ...attn.k_proj.shift_kernel      attn.k_proj.shift_proj.weight [H, d]  W^T   (no key shift)
  ...attn.v_proj.*                 as k_proj, with v                           attn.v_proj.weight
  ...attn.fgate_proj.kernel [d,Hq] attn.fgate_proj.weight  W^T                 attn.f_proj.weight
  ...attn.fgate_proj.bias [Hq]     attn.fgate_proj.bias                        attn.f_proj.bias
  ...attn.fgate_bias [Hq]          attn.fgate_bias (bias_only: parameter;      (gate 'full' only)
                                   fixed: buffer)
  ...attn.q_norm.scale             attn.q_norm.weight [D] (shared across       attn.q_norm.weight
       [D] or [Hq, D]              heads) or [Hq*D] -> [Hq, D]                 [Hq*D] -> [Hq, D]
  ...attn.k_norm.scale             attn.k_norm.weight (as q_norm)              attn.k_norm.weight [Hkv*D]
  ...attn.output_norm.scale        attn.output_norm.weight [Hq*D] -> [Hq, D]   (no output norm)
  ...attn.ogate_proj.kernel        attn.ogate_proj.weight  W^T                 attn.g_proj.weight
  ...attn.o_proj.kernel [Hq,D,d]   attn.o_proj.weight  W^T                     attn.o_proj.weight
  layers[L].mlp_norm.scale         mlp_norm.weight                             mlp_norm.weight
  ...mlp.gate_proj.kernel [d, F]   mlp.gate_proj.weight rows [0, F)  W^T       mlp.gate_proj.weight
  ...mlp.up_proj.kernel [d, F]     mlp.gate_proj.weight rows [F, 2F) W^T       mlp.up_proj.weight
  ...mlp.down_proj.kernel [F, d]   mlp.down_proj.weight  W^T                   mlp.down_proj.weight
  final_norm.scale                 model.norm.weight                           model.norm.weight
  lm_head.kernel [d, V]            lm_head.weight  W^T (absent when tied)      lm_head.weight

The authors' MLP stores gate and up projections as one [2F, d] matrix (``chunk(2)``: gate
first). Their QK-norm keeps its norm library's eps (1e-5), not ``norm_eps``; so does fla's,
hence ``ModelConfig.qk_norm_eps``. Older authors' configs lack
``qk_norm_share_param_across_head``: the shape of ``q_norm.weight`` then decides.

Command (``fox_jax.cli``): ``fox-convert CHECKPOINT_DIR OUTPUT_DIR`` (:func:`convert_dir`) writes ``OUTPUT_DIR/model_config.json``
and an orbax checkpoint of the parameters in ``OUTPUT_DIR/params``; ``load_converted``
reads them back. OUTPUT_DIR must be new or empty; ``--overwrite`` replaces an earlier
conversion there, recognised by its fox-jax ``model_config.json`` and orbax's files in
``params`` (anything else is refused: ``fox_jax.converted``). Bad input prints one line
``fox-convert: <message>`` on stderr and exits with status 2, leaving no output behind;
SIGTERM or SIGINT also leave nothing and exit with status 128 + the signal's number.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fox_jax.config import ModelConfig
from fox_jax.converted import (check_output_dir, load_converted, save_converted,
                               signals_interrupt, staged_output, write_conversion)
from fox_jax.layers import Constant
from fox_jax.model import DecoderLM
from fox_jax.safetensors_io import (CONFIG_NAME, FLOAT_NUMPY_DTYPES, brief, read_checkpoint_dir,
                                    read_safetensors)

__all__ = [
    "AUTHORS_MODEL_TYPE", "FLA_MODEL_TYPE", "Rule", "authors_config", "authors_rules",
    "build_from_tensors", "fla_config", "fla_rules", "load_authors_checkpoint",
    "convert_dir", "load_converted", "load_fla_checkpoint", "load_fla_model", "read_checkpoint_dir",
    "read_safetensors", "save_converted",
]

AUTHORS_MODEL_TYPE = "forgetting_transformer-project_fox"
FLA_MODEL_TYPE = "forgetting_transformer"

# Keys that every Hugging Face config may carry (generation defaults, labels, bookkeeping)
# and that cannot change a causal LM's logits.
_HF_GENERIC_KEYS = frozenset("""
    _name_or_path architectures auto_map dtype torch_dtype transformers_version model_type
    use_cache bos_token_id eos_token_id pad_token_id sep_token_id decoder_start_token_id
    return_dict output_attentions output_hidden_states output_scores return_dict_in_generate
    torchscript use_bfloat16 tf_legacy_loss pruned_heads chunk_size_feed_forward
    is_encoder_decoder is_decoder add_cross_attention cross_attention_hidden_size
    tie_encoder_decoder id2label label2id problem_type finetuning_task tokenizer_class prefix
    task_specific_params max_length min_length do_sample early_stopping num_beams
    num_beam_groups diversity_penalty temperature top_k top_p typical_p repetition_penalty
    length_penalty no_repeat_ngram_size encoder_no_repeat_ngram_size bad_words_ids
    num_return_sequences forced_bos_token_id forced_eos_token_id remove_invalid_values
    exponential_decay_length_penalty suppress_tokens begin_suppress_tokens
""".split())

# Authors' options with no effect on the forward pass of their model: initialisation,
# fused-kernel switches, and fields their layer stores but never reads.
_AUTHORS_INERT_KEYS = frozenset("""
    initializer_range fuse_norm fuse_cross_entropy fgate_bias_init max_position_embeddings
    window_size attention_bias elementwise_affine
""".split())

# fla options that are kernel or training-loss switches (same logits either way).
_FLA_INERT_KEYS = frozenset("""
    initializer_range fuse_norm fuse_swiglu fuse_cross_entropy fuse_linear_cross_entropy
    use_l2warp elementwise_affine
""".split())

# -- configs ------------------------------------------------------------------------------
# Source configs are JSON from a download: each value is type-checked here, so that a
# missing or mistyped option is a ValueError naming it rather than a KeyError or TypeError,
# and a string "false" is not read as true.

_REQUIRED = object()  # default of an option the config must give


def _check_mapping(hf, source: str) -> None:
  if not isinstance(hf, Mapping):
    raise ValueError(f"{source} config must be a JSON object, got {type(hf).__name__}")


def _check_known_keys(hf: Mapping[str, Any], known: set, source: str) -> None:
  unknown = sorted(set(hf) - known - _HF_GENERIC_KEYS)
  if unknown:
    raise ValueError(f"{source} config: unknown option(s) {unknown}; the import cannot tell "
                     "whether they change the model")


def _require(hf: Mapping[str, Any], key: str, allowed, source: str) -> None:
  value = hf.get(key)
  if value not in allowed:
    raise ValueError(f"{source} config: {key}={brief(value)} cannot be imported "
                     f"(supported: {list(allowed)})")


def _int(hf: Mapping[str, Any], key: str, source: str, default=None):
  """A positive integer option; ``default`` when absent or null, unless ``_REQUIRED``."""
  if default is _REQUIRED and key not in hf:
    raise ValueError(f"{source} config: missing required key {key!r}")
  value = hf.get(key)
  if value is None and default is not _REQUIRED:
    return default
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{source} config: {key} must be a positive integer, got {brief(value)}")
  return value


def _number(hf: Mapping[str, Any], key: str, source: str, default):
  """A finite real option; ``default`` when absent or null."""
  value = hf.get(key)
  if value is None:
    return default
  try:
    ok = not isinstance(value, bool) and math.isfinite(value)
  except (TypeError, OverflowError):  # not a number, or an integer beyond float range
    ok = False
  if not ok:
    raise ValueError(f"{source} config: {key} must be a finite number, got {brief(value)}")
  return float(value)


def _flag(hf: Mapping[str, Any], key: str, source: str, default=False):
  """A boolean option; ``default`` when absent or null."""
  value = hf.get(key)
  if value is None:
    return default
  if not isinstance(value, bool):
    raise ValueError(f"{source} config: {key} must be true or false, got {brief(value)}")
  return value


def _mlp_fields(hf: Mapping[str, Any], source: str) -> dict:
  width = _int(hf, "intermediate_size", source)
  if width is not None:
    return dict(mlp_hidden=width)
  return dict(mlp_ratio=_number(hf, "hidden_ratio", source, 4.0))


class _OverrideError(ValueError):
  """An invalid override: the caller's mistake, not the checkpoint's config file's."""


def _build_config(fields: dict, source: str, overrides: Mapping[str, Any]) -> ModelConfig:
  try:
    cfg = ModelConfig(**fields)
  except ValueError as e:
    raise ValueError(f"{source} config maps to an invalid ModelConfig: {e}") from e
  if not overrides:
    return cfg
  try:
    return ModelConfig(**dict(fields, **overrides))
  except (ValueError, TypeError) as e:  # TypeError: a field ModelConfig does not have
    given = ", ".join(f"{k}={brief(v)}" for k, v in overrides.items())
    raise _OverrideError(f"invalid override {given}: {e}") from e


_AUTHORS_KEYS = _AUTHORS_INERT_KEYS | set("""
    vocab_size hidden_size num_hidden_layers num_heads num_kv_heads hidden_ratio
    intermediate_size hidden_act norm_eps tie_word_embeddings rope_base use_rope
    use_output_gate ogate_act fgate_type decay_time_min decay_time_max use_output_norm qk_norm
    qk_norm_share_param_across_head use_k_shift use_v_shift log_pruning_tolerance
""".split())


def authors_config(hf: Mapping[str, Any], tensors: Optional[Mapping[str, Any]] = None,
                   **overrides) -> ModelConfig:
  """ModelConfig of an authors' ``config.json``; ``overrides`` set our own fields
  (``attn_impl``, ``dtype``, ...). ``tensors`` settles ``qk_norm_share_param_across_head``
  in configs that predate it."""
  src = "authors'"
  _check_mapping(hf, src)
  model_type = hf.get("model_type")
  if model_type != AUTHORS_MODEL_TYPE:
    hint = " (an fla checkpoint: use load_fla_checkpoint)" if model_type == FLA_MODEL_TYPE else ""
    raise ValueError(f"model_type is {brief(model_type)}, expected {AUTHORS_MODEL_TYPE!r}{hint}")
  _check_known_keys(hf, _AUTHORS_KEYS, src)
  # The authors' layer raises on any num_kv_heads (GQA untested there).
  _require(hf, "num_kv_heads", (None,), src)
  _require(hf, "hidden_act", ("swish", "sigmoid"), src)
  _require(hf, "ogate_act", ("sigmoid", "silu", None), src)
  _require(hf, "fgate_type", ("full", "bias_only", "fixed", "none"), src)
  vocab_size, d_model, num_layers, num_heads = (_int(hf, key, src, _REQUIRED) for key in (
      "vocab_size", "hidden_size", "num_hidden_layers", "num_heads"))
  qk_norm = _flag(hf, "qk_norm", src)
  shared = _flag(hf, "qk_norm_share_param_across_head", src, None)
  if shared is None and qk_norm:
    weight = (tensors or {}).get("model.layers.0.attn.q_norm.weight")
    if weight is None:
      raise ValueError("authors' config has qk_norm but no qk_norm_share_param_across_head, "
                       "and no tensor model.layers.0.attn.q_norm.weight to infer it from")
    shared = tuple(weight.shape) != (d_model,)
  gate = hf.get("fgate_type", "full")
  times = {}
  if gate in ("bias_only", "fixed"):
    low, high = (_number(hf, key, src, None) for key in ("decay_time_min", "decay_time_max"))
    if (low, high) != (None, None):  # ModelConfig refuses one without the other
      times = dict(decay_time_min=low, decay_time_max=high)
  pruning = None
  tolerance = _number(hf, "log_pruning_tolerance", src, None)
  if tolerance is not None:
    pruning = dict(log_tolerance=tolerance, qk_bound="auto")
  fields = dict(
      vocab_size=vocab_size, d_model=d_model, num_layers=num_layers, num_heads=num_heads,
      mlp_act="silu" if hf.get("hidden_act", "swish") == "swish" else "sigmoid",
      forget_gate=gate, qk_norm=qk_norm, qk_norm_shared_across_heads=bool(shared),
      output_gate=_flag(hf, "use_output_gate", src),
      output_gate_act=hf.get("ogate_act") or "sigmoid",
      output_norm=_flag(hf, "use_output_norm", src), k_shift=_flag(hf, "use_k_shift", src),
      v_shift=_flag(hf, "use_v_shift", src), rope=_flag(hf, "use_rope", src),
      rope_base=_number(hf, "rope_base", src, 500000.0),
      tie_embeddings=_flag(hf, "tie_word_embeddings", src),
      norm_eps=_number(hf, "norm_eps", src, 1e-6), qk_norm_eps=1e-5, pruning=pruning,
      dtype="float32", param_dtype="float32", **times, **_mlp_fields(hf, src))
  return _build_config(fields, src, overrides)


_FLA_KEYS = _FLA_INERT_KEYS | set("""
    vocab_size hidden_size num_hidden_layers num_heads num_kv_heads qkv_bias qk_norm
    window_size use_output_gate hidden_ratio intermediate_size hidden_act norm_eps
    tie_word_embeddings attnres_block_size
""".split())


def fla_config(hf: Mapping[str, Any], **overrides) -> ModelConfig:
  """ModelConfig of fla's ``ForgettingTransformerConfig`` (as a dict, ``config.to_dict()``)."""
  src = "fla"
  _check_mapping(hf, src)
  if hf.get("model_type", FLA_MODEL_TYPE) != FLA_MODEL_TYPE:
    raise ValueError(f"model_type is {brief(hf.get('model_type'))}, expected "
                     f"{FLA_MODEL_TYPE!r}")
  _check_known_keys(hf, _FLA_KEYS, src)
  _require(hf, "qkv_bias", (False, None), src)
  _require(hf, "window_size", (None,), src)
  _require(hf, "attnres_block_size", (None,), src)
  _require(hf, "hidden_act", ("swish",), src)
  vocab_size, d_model, num_layers, num_heads = (_int(hf, key, src, _REQUIRED) for key in (
      "vocab_size", "hidden_size", "num_hidden_layers", "num_heads"))
  fields = dict(
      vocab_size=vocab_size, d_model=d_model, num_layers=num_layers, num_heads=num_heads,
      num_kv_heads=_int(hf, "num_kv_heads", src, num_heads), forget_gate="full",
      qk_norm=_flag(hf, "qk_norm", src), qk_norm_shared_across_heads=False,
      output_gate=_flag(hf, "use_output_gate", src), output_gate_act="sigmoid",
      tie_embeddings=_flag(hf, "tie_word_embeddings", src),
      norm_eps=_number(hf, "norm_eps", src, 1e-6), qk_norm_eps=1e-5,
      dtype="float32", param_dtype="float32", **_mlp_fields(hf, src))
  return _build_config(fields, src, overrides)


# -- name mapping -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Rule:
  """Fill the model variable at ``target`` from checkpoint tensor ``source``.

  ``source_shape`` is what the config implies; ``transform`` turns the source array into
  the target's layout (the target shape is checked after it).
  """
  target: tuple
  source: str
  source_shape: tuple
  transform: Callable[[np.ndarray], np.ndarray]


def _as_is(x):
  return x


def _linear(*out_shape):
  """torch Linear weight [out, in] -> kernel [in, *out_shape] (x @ kernel)."""
  return lambda w: np.ascontiguousarray(w.T).reshape((w.shape[1],) + out_shape)


def _linear_in_heads(heads, head_dim):
  """torch Linear weight [d, H*D] (input split into heads) -> kernel [H, D, d]."""
  return lambda w: np.ascontiguousarray(w.T).reshape(heads, head_dim, w.shape[0])


def _rows(start, stop, inner):
  return lambda w: inner(w[start:stop])


def _reshape(*shape):
  return lambda x: x.reshape(shape)


def _attention_rules(cfg: ModelConfig, prefix: str, layer: int, names: Mapping[str, str],
                     shift_names: bool) -> list[Rule]:
  """Rules of one attention layer; ``names`` gives the source names of q, k, v, o, the
  forget and output gates, and ``shift_names`` whether k/v with shift use ``.linear``."""
  d, Hq, Hkv, D = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  at = ("layers", layer, "attn")
  rules = [
      Rule(at + ("q_proj", "kernel"), prefix + "q_proj.weight", (Hq * D, d), _linear(Hq, D)),
      Rule(at + ("o_proj", "kernel"), prefix + "o_proj.weight", (d, Hq * D),
           _linear_in_heads(Hq, D)),
  ]
  for name, shifted in (("k_proj", cfg.k_shift), ("v_proj", cfg.v_shift)):
    if shifted and shift_names:
      rules += [
          Rule(at + (name, "kernel"), f"{prefix}{name}.linear.weight", (Hkv * D, d),
               _linear(Hkv, D)),
          Rule(at + (name, "shift_kernel"), f"{prefix}{name}.shift_proj.weight", (Hkv, d),
               _linear(Hkv)),
      ]
    else:
      rules.append(Rule(at + (name, "kernel"), f"{prefix}{name}.weight", (Hkv * D, d),
                        _linear(Hkv, D)))
  if cfg.forget_gate == "full":
    fgate = prefix + names["fgate"]
    rules += [Rule(at + ("fgate_proj", "kernel"), fgate + ".weight", (Hq, d), _linear(Hq)),
              Rule(at + ("fgate_proj", "bias"), fgate + ".bias", (Hq,), _as_is)]
  elif cfg.forget_gate in ("bias_only", "fixed"):
    rules.append(Rule(at + ("fgate_bias",), prefix + "fgate_bias", (Hq,), _as_is))
  if cfg.qk_norm:
    for name, heads in (("q_norm", Hq), ("k_norm", Hkv)):
      if cfg.qk_norm_shared_across_heads:
        rules.append(Rule(at + (name, "scale"), f"{prefix}{name}.weight", (D,), _as_is))
      else:
        rules.append(Rule(at + (name, "scale"), f"{prefix}{name}.weight", (heads * D,),
                          _reshape(heads, D)))
  if cfg.output_norm:
    rules.append(Rule(at + ("output_norm", "scale"), prefix + "output_norm.weight", (Hq * D,),
                      _reshape(Hq, D)))
  if cfg.output_gate:
    rules.append(Rule(at + ("ogate_proj", "kernel"), prefix + names["ogate"] + ".weight",
                      (Hq * D, d), _linear(Hq, D)))
  return rules


def _model_rules(cfg: ModelConfig, attn_names: Mapping[str, str], shift_names: bool,
                 fused_mlp: bool) -> Iterator[Rule]:
  """Rules in checkpoint order, one layer at a time: lazy, so that checking names against
  a checkpoint stops at the first missing layer however many layers the config claims."""
  d, F, V = cfg.d_model, cfg.mlp_width, cfg.vocab_size
  yield Rule(("embed", "embedding"), "model.embeddings.weight", (V, d), _as_is)
  yield Rule(("final_norm", "scale"), "model.norm.weight", (d,), _as_is)
  if not cfg.tie_embeddings:
    yield Rule(("lm_head", "kernel"), "lm_head.weight", (V, d), _linear(V))
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."
    rules = [Rule(("layers", i, "attn_norm", "scale"), p + "attn_norm.weight", (d,), _as_is),
             Rule(("layers", i, "mlp_norm", "scale"), p + "mlp_norm.weight", (d,), _as_is),
             Rule(("layers", i, "mlp", "down_proj", "kernel"), p + "mlp.down_proj.weight",
                  (d, F), _linear(d))]
    mlp = ("layers", i, "mlp")
    if fused_mlp:
      rules += [Rule(mlp + ("gate_proj", "kernel"), p + "mlp.gate_proj.weight", (2 * F, d),
                     _rows(0, F, _linear(F))),
                Rule(mlp + ("up_proj", "kernel"), p + "mlp.gate_proj.weight", (2 * F, d),
                     _rows(F, 2 * F, _linear(F)))]
    else:
      rules += [Rule(mlp + ("gate_proj", "kernel"), p + "mlp.gate_proj.weight", (F, d),
                     _linear(F)),
                Rule(mlp + ("up_proj", "kernel"), p + "mlp.up_proj.weight", (F, d), _linear(F))]
    rules += _attention_rules(cfg, p + "attn.", i, attn_names, shift_names)
    yield from rules


def _authors_rules(cfg: ModelConfig) -> Iterator[Rule]:
  return _model_rules(cfg, dict(fgate="fgate_proj", ogate="ogate_proj"), shift_names=True,
                      fused_mlp=True)


def _fla_rules(cfg: ModelConfig) -> Iterator[Rule]:
  return _model_rules(cfg, dict(fgate="f_proj", ogate="g_proj"), shift_names=False,
                      fused_mlp=False)


def authors_rules(cfg: ModelConfig) -> list[Rule]:
  """Name mapping of the authors' checkpoints (see the module docstring)."""
  return list(_authors_rules(cfg))


def fla_rules(cfg: ModelConfig) -> list[Rule]:
  """Name mapping of fla's ``ForgettingTransformerForCausalLM`` (see the module docstring)."""
  return list(_fla_rules(cfg))


# -- filling a model ----------------------------------------------------------------------

def _key(path) -> tuple:
  return tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)


def _checked_weight(name: str, array, source: str) -> np.ndarray:
  """``array`` in float32; ValueError unless it is floating point and finite in float32."""
  dtype = np.asarray(array).dtype
  if dtype not in FLOAT_NUMPY_DTYPES:
    raise ValueError(f"{source}: tensor {name!r} has dtype {dtype}; weights must be floating "
                     "point")
  with np.errstate(over="ignore", invalid="ignore"):  # float64 beyond float32 range -> inf
    values = np.asarray(array, dtype=np.float32)
  bad = values.size - np.count_nonzero(np.isfinite(values))
  if bad:
    raise ValueError(f"{source}: tensor {name!r} has {bad} non-finite value(s) (NaN or "
                     f"infinite in float32) among {values.size}; they would make the logits NaN")
  return values


def _names(names, limit: int = 5) -> str:
  """The first ``limit`` of ``names`` and how many more (a message stays one short line)."""
  shown = ", ".join(brief(n, 100) for n in names[:limit])
  return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def build_from_tensors(cfg: ModelConfig, tensors: Mapping[str, np.ndarray],
                       rules: Iterable[Rule], source: str = "checkpoint") -> DecoderLM:
  """A DecoderLM of ``cfg`` whose parameters all come from ``tensors`` through ``rules``.

  Tensor names and shapes are checked against the rules (which need only the config)
  before any model is built, so a config claiming far more layers than the checkpoint
  holds fails at once. The model is then built abstractly (no random init), so memory
  holds only the checkpoint and the converted arrays. Raises ValueError for a missing
  tensor, a wrong shape, a tensor that is not floating point or holds non-finite values, a
  tensor no rule uses, or a model variable no rule fills.

  Non-finite weights are refused rather than warned about: a NaN or infinite weight makes
  every logit that depends on it NaN, so a model holding one is useless, and a warning is
  easily lost in a conversion log. The check is on the float32 values the model receives,
  so float64 weights beyond float32's range count as infinite.
  """
  tensors = dict(tensors)
  # Tied checkpoints may still carry the output matrix; accept it when it is the embedding.
  if cfg.tie_embeddings and "lm_head.weight" in tensors:
    emb = tensors.get("model.embeddings.weight")
    if emb is None or not np.array_equal(np.asarray(tensors["lm_head.weight"]), np.asarray(emb)):
      raise ValueError(f"{source}: tie_word_embeddings is set but lm_head.weight differs "
                       "from model.embeddings.weight")
    del tensors["lm_head.weight"]
  # Names and shapes first. Building the model (even abstractly) takes time in proportion
  # to the layers the config claims, minutes for a thousand; the lazy rules stop at the
  # first missing layer.
  checked_rules = []
  for rule in rules:
    if rule.source not in tensors:
      raise ValueError(f"{source}: missing tensor {rule.source!r} (expected shape "
                       f"{rule.source_shape}) for parameter {'.'.join(map(str, rule.target))}")
    array = tensors[rule.source]
    if tuple(array.shape) != tuple(rule.source_shape):
      raise ValueError(f"{source}: tensor {rule.source!r} has shape {tuple(array.shape)}, "
                       f"expected {tuple(rule.source_shape)} from the config")
    checked_rules.append(rule)
  unused = sorted(set(tensors) - {rule.source for rule in checked_rules})
  if unused:
    raise ValueError(f"{source}: {len(unused)} tensor(s) not used by the import (an option "
                     f"the config does not declare?): {_names(unused)}")
  abstract = nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))
  graphdef, filled, rest = nnx.split(abstract, (nnx.Param, Constant), ...)
  if jax.tree_util.tree_leaves(rest):
    raise ValueError(f"model has variables other than parameters and constants: {rest}")
  targets = {_key(path): var for path, var in nnx.to_flat_state(filled)}
  done, checked = set(), set()
  for rule in checked_rules:
    array = tensors[rule.source]
    if rule.target not in targets:
      raise ValueError(f"model has no parameter {'.'.join(map(str, rule.target))} "
                       f"(for tensor {rule.source!r})")
    var = targets[rule.target]
    if rule.source in checked:  # the fused MLP matrix feeds two rules
      value = rule.transform(np.asarray(array, dtype=np.float32))
    else:
      value = rule.transform(_checked_weight(rule.source, array, source))
      checked.add(rule.source)
    if tuple(value.shape) != tuple(var.shape):
      raise ValueError(f"tensor {rule.source!r} maps to shape {value.shape} but parameter "
                       f"{'.'.join(map(str, rule.target))} has shape {tuple(var.shape)}")
    var.set_value(jnp.asarray(value, dtype=var.dtype))
    done.add(rule.target)
  unfilled = sorted(".".join(map(str, t)) for t in set(targets) - done)
  if unfilled:
    raise ValueError(f"model parameters not filled from the {source}: {_names(unfilled)}")
  return nnx.merge(graphdef, filled)


def _import_dir(path: str, hf: dict, tensors: dict, make_config, make_rules,
                overrides: Mapping[str, Any], *config_args) -> tuple[ModelConfig, DecoderLM]:
  """(config, model) of a checkpoint directory already read; config errors name its file."""
  try:
    cfg = make_config(hf, *config_args, **overrides)
  except _OverrideError:
    raise
  except ValueError as e:
    raise ValueError(f"{os.path.join(path, CONFIG_NAME)}: {e}") from None
  return cfg, build_from_tensors(cfg, tensors, make_rules(cfg), source=path)


def load_authors_checkpoint(path: str, **overrides) -> tuple[ModelConfig, DecoderLM]:
  """Loads an authors' checkpoint directory (config.json + model.safetensors).

  ``overrides`` replace ModelConfig fields that the checkpoint does not fix, e.g.
  ``attn_impl="xla"``, ``dtype="bfloat16"``, ``pruning=...``. Returns (config, model).
  Any problem with the checkpoint is a ValueError naming the file at fault.
  """
  hf, tensors = read_checkpoint_dir(path)
  return _import_dir(path, hf, tensors, authors_config, _authors_rules, overrides, tensors)


def load_fla_model(model_or_state_dict, config=None, **overrides) -> tuple[ModelConfig, DecoderLM]:
  """Imports fla's ``ForgettingTransformerForCausalLM``.

  Pass the torch model itself, or its state dict (torch tensors or numpy arrays) with its
  config (a ``ForgettingTransformerConfig`` or its ``to_dict()``). Returns (config, model).
  """
  if hasattr(model_or_state_dict, "state_dict"):
    config = model_or_state_dict.config if config is None else config
    state = model_or_state_dict.state_dict()
  else:
    state = model_or_state_dict
  if config is None:
    raise ValueError("load_fla_model needs the config with a state dict")
  hf = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  tensors = {name: _to_numpy(t) for name, t in state.items()}
  cfg = fla_config(hf, **overrides)
  return cfg, build_from_tensors(cfg, tensors, _fla_rules(cfg), source="fla state dict")


def load_fla_checkpoint(path: str, **overrides) -> tuple[ModelConfig, DecoderLM]:
  """Loads a directory written by fla's ``save_pretrained`` (safetensors)."""
  hf, tensors = read_checkpoint_dir(path)
  return _import_dir(path, hf, tensors, fla_config, _fla_rules, overrides)


def _to_numpy(t) -> np.ndarray:
  if hasattr(t, "detach"):  # a torch tensor; float() also covers bfloat16
    t = t.detach().cpu()
    return (t.float() if t.is_floating_point() else t).numpy()
  return np.asarray(t)


def convert_dir(checkpoint_dir: str, output_dir: str, *, attn_impl: Optional[str] = None,
                overwrite: bool = False) -> tuple[ModelConfig, DecoderLM]:
  """``fox-convert``'s work: reads a PyTorch checkpoint directory (the authors' or fla's
  format), writes its conversion into ``output_dir`` and returns the config and model.

  ValueError / OSError for bad input, and Interrupted on SIGTERM or SIGINT, leave nothing in
  ``output_dir`` (the conversion is staged and moved into place at the end).
  """
  overrides = {} if attn_impl is None else dict(attn_impl=attn_impl)
  out_dir = os.path.abspath(output_dir)
  # SIGTERM / SIGINT become Interrupted, so that staged_output removes its staging
  # directory instead of leaving it to make the output directory look taken.
  with signals_interrupt():
    check_output_dir(out_dir, overwrite)  # before reading a large checkpoint
    hf, tensors = read_checkpoint_dir(checkpoint_dir)
    with staged_output(out_dir, overwrite) as staging:
      if hf.get("model_type") == FLA_MODEL_TYPE:
        cfg, model = _import_dir(checkpoint_dir, hf, tensors, fla_config, _fla_rules,
                                 overrides)
      else:
        cfg, model = _import_dir(checkpoint_dir, hf, tensors, authors_config, _authors_rules,
                                 overrides, tensors)
      write_conversion(staging, cfg, model)
  return cfg, model
