"""The oracle itself, against a per-query loop written directly from the definition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.forgetting_attention.reference import forgetting_attention_reference
from tests.kernel_utils import make_inputs
from tests.tolerances import FLOAT64_RTOL


def loop_reference(q, k, v, lf, seg, scale):
  q, k, v, lf = (np.asarray(x, np.float64) for x in (q, k, v, lf))
  B, T, Hq, D = q.shape
  S, Hkv = k.shape[1], k.shape[2]
  o = np.zeros((B, T, Hq, D))
  for b in range(B):
    for h in range(Hq):
      hk = h // (Hq // Hkv)
      for i in range(T):
        p = S - T + i
        js = [j for j in range(p + 1) if seg is None or seg[b, j] == seg[b, p]]
        decay = np.array([lf[b, j + 1:p + 1, h].sum() for j in js])
        s = scale * k[b, js, hk] @ q[b, i, h] + decay
        w = np.exp(s - s.max())
        o[b, i, h] = (w / w.sum()) @ v[b, js, hk]
  return o


@pytest.mark.parametrize("T,S,segments", [(1, 1, 0), (7, 7, 0), (5, 9, 0), (9, 9, 3), (4, 11, 2)],
                         ids=lambda x: str(x))
def test_reference_matches_definition(T, S, segments):
  inp = make_inputs(2, T, S, 4, 2, 8, np.float32, gate="medium", segments=segments, seed=T + S)
  with jax.enable_x64(True):
    f64 = lambda x: jnp.asarray(np.asarray(x, np.float64))
    o, lse = forgetting_attention_reference(f64(inp.q), f64(inp.k), f64(inp.v), f64(inp.log_fgate),
                                            segment_ids=inp.segment_ids)
    assert o.dtype == jnp.float64
  seg = None if inp.segment_ids is None else np.asarray(inp.segment_ids)
  expected = loop_reference(inp.q, inp.k, inp.v, inp.log_fgate, seg, 8 ** -0.5)
  np.testing.assert_allclose(np.asarray(o), expected, rtol=FLOAT64_RTOL, atol=FLOAT64_RTOL)
