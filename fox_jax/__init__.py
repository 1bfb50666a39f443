"""FoX and Transformer language models (LLaMA and Pro blocks) in Flax NNX.

    from fox_jax import DecoderLM, get_preset
    model = DecoderLM(get_preset("fox_pro_tiny"), rngs=nnx.Rngs(0))

The names below are imported on first use, so that light modules (the command line's
argument parsing and signal handling) start without importing JAX.
"""

import importlib

_EXPORTS = {"PRESETS": "fox_jax.config", "ModelConfig": "fox_jax.config",
            "get_preset": "fox_jax.config", "DecoderLM": "fox_jax.model"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'fox_jax' has no attribute {name!r}")
