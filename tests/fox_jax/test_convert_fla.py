"""Import of flash-linear-attention's ForgettingTransformer, checked against its PyTorch model.

fla's model calls Triton kernels (forgetting attention, group/RMS norms, SwiGLU), which need
a GPU. Inside these tests they are replaced with plain torch code computing the same
functions, so the PyTorch model runs on the CPU in float32; everything else (projections,
residuals, GQA layout, gates, the LM head) is fla's own code.

Needs the ``torch-test`` extra (torch, triton, flash-linear-attention).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the torch-test extra (PyTorch)")
pytest.importorskip("fla", reason="needs the torch-test extra (flash-linear-attention)")

import jax.numpy as jnp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from flax import nnx  # noqa: E402

import fla.layers.forgetting_attn as fla_attn  # noqa: E402
import fla.modules as fla_modules  # noqa: E402
import fla.modules.mlp as fla_mlp  # noqa: E402
from fla.models import ForgettingTransformerConfig, ForgettingTransformerForCausalLM  # noqa: E402
from fla.ops.forgetting_attn.naive import naive_forgetting_attn  # noqa: E402

from fox_jax import cli, convert  # noqa: E402
from tests.tolerances import IMPORTED_LOGITS_F32, error_ratios  # noqa: E402

VOCAB, B, T = 97, 2, 19

# Config A: fla's defaults (fused norm and SwiGLU paths) with GQA, QK-norm, output gate.
# Config B: the unfused paths, tied embeddings, an explicit MLP width, no QK-norm or gate.
CONFIGS = {
    "H4-HKV2-qknorm-ogate-fused": dict(num_heads=4, num_kv_heads=2, qk_norm=True,
                                       use_output_gate=True),
    "H4-tied-unfused": dict(num_heads=4, tie_word_embeddings=True, intermediate_size=96,
                            fuse_norm=False, fuse_swiglu=False),
}


def _attention(q, k, v, g, scale=None, window_size=None, cu_seqlens=None):
  assert window_size is None and cu_seqlens is None
  return naive_forgetting_attn(q, k, v, g, scale).to(q.dtype)  # [B, T, HQ, D]


def _rms(x, weight, eps):
  xf = x.float()
  return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight


def _group_norm(self, x, residual=None, prenorm=False, residual_in_fp32=False):
  assert residual is None and not prenorm and self.is_rms_norm and self.bias is None
  groups = x.unflatten(-1, (self.num_groups, -1))  # [..., G, hidden / G]
  weight = self.weight.unflatten(-1, (self.num_groups, -1))  # [G, hidden / G]
  return _rms(groups, weight, self.eps).flatten(-2).to(x.dtype)


def _rms_norm(self, x, residual=None, prenorm=False, residual_in_fp32=False):
  assert self.bias is None
  if residual is not None:
    x = x + residual
  y = _rms(x, self.weight, self.eps).to(x.dtype)
  return (y, x) if prenorm else y


def _swiglu(x, y):
  return F.silu(x.float()).to(x.dtype) * y


def _swiglu_linear(x, y, weight, bias):
  return F.linear(_swiglu(x, y), weight, bias)


@pytest.fixture
def torch_kernels(monkeypatch):
  """fla's Triton kernels on the forward path replaced with torch equivalents."""
  monkeypatch.setattr(fla_attn, "parallel_forgetting_attn", _attention)
  monkeypatch.setattr(fla_modules.GroupNorm, "forward", _group_norm)
  monkeypatch.setattr(fla_modules.RMSNorm, "forward", _rms_norm)
  monkeypatch.setattr(fla_mlp, "swiglu", _swiglu)
  monkeypatch.setattr(fla_mlp, "swiglu_linear", _swiglu_linear)


def make_fla_model(seed, **options):
  config = ForgettingTransformerConfig(
      vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, norm_eps=1e-6,
      initializer_range=0.2, fuse_cross_entropy=False, **options)
  torch.manual_seed(seed)
  model = ForgettingTransformerForCausalLM(config).eval()
  # Norm scales start at 1 and gate biases at 0: move them so that every mapping matters.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or name.endswith("f_proj.bias"):
        p.add_(0.3 * torch.randn_like(p))
  return model


def torch_logits(model, ids):
  with torch.no_grad():
    return model(input_ids=torch.as_tensor(ids, dtype=torch.long), use_cache=False).logits.numpy()


def jax_logits(model, ids):
  return np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids)))


def assert_logits_match(actual, expected, name):
  rms, mx = error_ratios(actual, expected)
  rms_tol, max_tol = IMPORTED_LOGITS_F32
  assert rms <= rms_tol and mx <= max_tol, (
      f"{name}: rms error ratio {rms:.3g} (tol {rms_tol:g}), max {mx:.3g} (tol {max_tol:g})")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fla_model_logits(name, torch_kernels):
  options = CONFIGS[name]
  torch_model = make_fla_model(0, **options)
  ids = np.random.default_rng(0).integers(0, VOCAB, size=(B, T)).astype(np.int32)
  expected = torch_logits(torch_model, ids)
  cfg, model = convert.load_fla_model(torch_model, attn_impl="xla")
  assert cfg.num_kv_heads == options.get("num_kv_heads", options["num_heads"])
  assert cfg.tie_embeddings == options.get("tie_word_embeddings", False)
  assert (model.lm_head is None) == cfg.tie_embeddings
  assert_logits_match(jax_logits(model, ids), expected, name)


def test_fla_state_dict_and_saved_directory(torch_kernels, tmp_path):
  torch_model = make_fla_model(1, num_heads=4, num_kv_heads=2, qk_norm=True,
                               use_output_gate=True)
  ids = np.random.default_rng(1).integers(0, VOCAB, size=(B, T)).astype(np.int32)
  expected = torch_logits(torch_model, ids)
  _, from_dict = convert.load_fla_model(dict(torch_model.state_dict()),
                                        torch_model.config.to_dict(), attn_impl="reference")
  assert_logits_match(jax_logits(from_dict, ids), expected, "state dict + config dict")
  torch_model.save_pretrained(str(tmp_path))
  assert cli.convert_main([str(tmp_path), str(tmp_path / "converted")]) == 0
  _, converted = convert.load_converted(str(tmp_path / "converted"), attn_impl="reference")
  assert_logits_match(jax_logits(converted, ids), expected, "save_pretrained + fox-convert")


def test_fla_missing_tensor(torch_kernels):
  torch_model = make_fla_model(2, num_heads=4, use_output_gate=True)
  state = dict(torch_model.state_dict())
  del state["model.layers.1.attn.g_proj.weight"]
  with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.attn\.g_proj\.weight'"):
    convert.load_fla_model(state, torch_model.config)
