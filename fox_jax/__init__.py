"""FoX and Transformer language models (LLaMA and Pro blocks) in Flax NNX.

    from fox_jax import DecoderLM, get_preset
    model = DecoderLM(get_preset("fox_pro_tiny"), rngs=nnx.Rngs(0))
"""

from fox_jax.config import PRESETS, ModelConfig, get_preset
from fox_jax.model import DecoderLM

__all__ = ["PRESETS", "DecoderLM", "ModelConfig", "get_preset"]
