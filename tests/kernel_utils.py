"""Inputs and float64 oracles shared by the kernel tests."""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.forgetting_attention import registry
from pallas_kernels.forgetting_attention.api import forgetting_attention
from pallas_kernels.forgetting_attention.reference import forgetting_attention_reference

# Forget-gate regimes: logits of the gate ~ N(mean, std); log f = log_sigmoid(logit).
GATES = {
    "weak": (8.0, 1.0),      # log f ~ -3e-4: almost no forgetting
    "medium": (0.0, 2.0),    # f ~ 0.5, the initial FoX gate
    "strong": (-9.0, 1.0),   # log f < -8 on average: each token nearly forgets the past
    "spread": None,          # per head, decay lengths log-spread from 2 tokens to 4096
}


class Inputs(NamedTuple):
  q: jax.Array
  k: jax.Array
  v: jax.Array
  log_fgate: jax.Array
  segment_ids: Optional[jax.Array]
  do: jax.Array


def make_log_fgate(rng: np.random.Generator, B: int, S: int, H: int, gate: str) -> np.ndarray:
  if gate == "spread":
    # Decay length L per head (f = 1 - 1/L), log-spaced, with some noise per token.
    lengths = np.exp(np.linspace(np.log(2.0), np.log(4096.0), H))
    base = np.log1p(-1.0 / lengths)[None, None, :]
    noise = rng.uniform(0.5, 1.5, size=(B, S, H))
    return (base * noise).astype(np.float32)
  mean, std = GATES[gate]
  logits = rng.normal(mean, std, size=(B, S, H))
  return np.asarray(-np.logaddexp(0.0, -logits), np.float32)


def make_segments(rng: np.random.Generator, B: int, S: int, num_segments: int) -> np.ndarray:
  """Non-decreasing ids with random boundaries (packed documents)."""
  seg = np.zeros((B, S), np.int32)
  for b in range(B):
    cuts = np.sort(rng.choice(np.arange(1, S), size=min(num_segments - 1, S - 1), replace=False))
    for c in cuts:
      seg[b, c:] += 1
  return seg


def make_inputs(B, T, S, Hq, Hkv, D, dtype, gate="medium", segments=0, seed=0,
                qk_scale=1.0) -> Inputs:
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(B, T, Hq, D)) * qk_scale
  k = rng.normal(size=(B, S, Hkv, D)) * qk_scale
  v = rng.normal(size=(B, S, Hkv, D))
  do = rng.normal(size=(B, T, Hq, D))
  lf = make_log_fgate(rng, B, S, Hq, gate)
  seg = make_segments(rng, B, S, segments) if segments else None
  cast = lambda x: jnp.asarray(x, dtype)
  return Inputs(cast(q), cast(k), cast(v), jnp.asarray(lf), None if seg is None else jnp.asarray(seg),
                cast(do))


def reference_f64(inp: Inputs, sm_scale=None, prune_threshold=None, grads=True):
  """Output, lse and (optionally) gradients of sum(o * do) from the float64 reference."""
  with jax.enable_x64(True):
    f64 = lambda x: jnp.asarray(np.asarray(x, np.float64))
    q, k, v, lf, do = map(f64, (inp.q, inp.k, inp.v, inp.log_fgate, inp.do))
    thr = None if prune_threshold is None else f64(prune_threshold)

    def f(q, k, v, lf):
      return forgetting_attention_reference(q, k, v, lf, segment_ids=inp.segment_ids,
                                            sm_scale=sm_scale, prune_threshold=thr)

    (o, lse), vjp = jax.vjp(f, q, k, v, lf)
    out = {"o": np.asarray(o), "lse": np.asarray(lse)}
    if grads:
      dq, dk, dv, dlf = vjp((do, jnp.zeros_like(lse)))
      out.update(dq=np.asarray(dq), dk=np.asarray(dk), dv=np.asarray(dv), dlog_fgate=np.asarray(dlf))
    return out


def interpret_for(impl: str) -> bool:
  """Whether ``impl`` must run in interpret mode here: a Pallas implementation away from the
  backend it compiles for (api's table); never for reference / xla."""
  needs = registry.REGISTRY[impl].backend
  return needs is not None and needs != jax.default_backend()


def case_id(B, T, S, Hq, Hkv, D, dtype, gate, segments):
  seg = f"-SEG{segments}" if segments else ""
  return f"B{B}-T{T}-S{S}-H{Hq}-HKV{Hkv}-D{D}-{np.dtype(dtype).name}-{gate}{seg}"


def grad_fn_to_lower(impl, T, D, Hq=4, Hkv=2, segments=False, pruning=None,
                     dtype=jnp.bfloat16, B=1):
  """A jitted loss-gradient function of ``impl`` at its default tiles, and shape structs for
  it (no data needed): for lowering to another platform from the CPU through the public op,
  which picks the kernels of the platform it is lowered for."""

  def f(q, k, v, lf, seg):
    def loss(q, k, v, lf):
      o = forgetting_attention(q, k, v, lf, segment_ids=seg if segments else None,
                               pruning=pruning, impl=impl)
      return jnp.sum(o.astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, lf)

  sd = jax.ShapeDtypeStruct
  shapes = (sd((B, T, Hq, D), dtype), sd((B, T, Hkv, D), dtype), sd((B, T, Hkv, D), dtype),
            sd((B, T, Hq), jnp.float32), sd((B, T), jnp.int32))
  return jax.jit(f), shapes
