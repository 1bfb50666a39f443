"""The one place tolerances live. Never loosen one to make a test pass: find the bug.

An implementation's result ``a`` is compared with the float64 reference ``r`` by
  rms error ratio  ||a - r||_2 / ||r||_2   <= rms[dtype]
  max error ratio  max|a - r| / max|r|     <= max[dtype]
where dtype is the dtype the implementation computed from (its inputs' dtype).
"""

import numpy as np

# (rms ratio, max ratio) per input dtype.
TOLERANCES = {
    "float64": (1e-10, 1e-9),
    "float32": (2e-5, 2e-4),
    "float16": (3e-3, 2e-2),
    "bfloat16": (1.5e-2, 6e-2),
}

# (rms ratio, max ratio) of an imported checkpoint's float32 logits against the logits the
# source PyTorch model computes in float32. Both sides only round in float32 (~1e-6
# relative end to end), so this is tighter than TOLERANCES["float32"], which a real import
# bug would pass: QK-norm with eps 1e-6 instead of the authors' 1e-5 is off by ~1e-5 rms.
IMPORTED_LOGITS_F32 = (5e-6, 1e-5)

# Relative tolerance of a float32 scalar formula (a learning rate, a threshold, a gate value)
# against the same formula in float64: a few float32 ulps.
SCALAR_F32_RTOL = 1e-6
# The same where float32 evaluates a quantity that cancels near zero first (1 + cos(pi t)
# late in a cosine schedule, -1 / log f of a gate near 1): a few ulps of the larger terms.
SCALAR_F32_CANCELLING_RTOL = 1e-5
# Float64 against float64 computed in another order: rounding only.
FLOAT64_RTOL = 1e-12


def error_ratios(actual, expected):
  a = np.asarray(actual, dtype=np.float64)
  r = np.asarray(expected, dtype=np.float64)
  if a.shape != r.shape:
    raise AssertionError(f"shape mismatch: {a.shape} vs {r.shape}")
  diff = a - r
  rms = np.sqrt(np.mean(diff ** 2)) / max(np.sqrt(np.mean(r ** 2)), 1e-30)
  mx = np.max(np.abs(diff)) / max(np.max(np.abs(r)), 1e-30)
  return float(rms), float(mx)


def assert_close(actual, expected, dtype, name=""):
  """Asserts ``actual`` matches the float64 ``expected`` within ``dtype``'s tolerances."""
  a = np.asarray(actual, dtype=np.float64)
  if not np.all(np.isfinite(a)):
    raise AssertionError(f"{name}: non-finite values ({np.sum(~np.isfinite(a))} of {a.size})")
  rms_tol, max_tol = TOLERANCES[np.dtype(dtype).name]
  rms, mx = error_ratios(a, expected)
  if rms > rms_tol or mx > max_tol:
    raise AssertionError(
        f"{name}: rms error ratio {rms:.3g} (tol {rms_tol:g}), max error ratio {mx:.3g} "
        f"(tol {max_tol:g}) for {np.dtype(dtype).name}")
