"""Models for tests and benchmarks: the real SmolLM2-135M-Instruct and tiny random configs.

- :func:`load_smollm2`, :func:`smollm2_dense_path`, :func:`resolve_model`: the real model, obtained
  from a GGUF file shipped on PyPI and dequantized once into a cached float32 model directory.
- :func:`tiny_config`, :func:`tiny_model`, :data:`TINY_FAMILIES`: small random models of each
  architecture family the attention path serves (GQA, sliding window, softcap, SSM hybrid).
"""

from .smollm2 import (
    SMOLLM2_GGUF_NAME,
    SMOLLM2_GGUF_SHA256,
    SMOLLM2_PACKAGE,
    ModelUnavailableError,
    cache_root,
    gguf_dense_path,
    load_smollm2,
    load_smollm2_tokenizer,
    resolve_model,
    smollm2_dense_path,
    smollm2_gguf_path,
)
from .tiny import (
    TINY_FAMILIES,
    TINY_FAMILY_FEATURES,
    TINY_SLIDING_WINDOW,
    default_attn_implementation,
    tiny_config,
    tiny_model,
)

__all__ = [
    "SMOLLM2_GGUF_NAME",
    "SMOLLM2_GGUF_SHA256",
    "SMOLLM2_PACKAGE",
    "TINY_FAMILIES",
    "TINY_FAMILY_FEATURES",
    "TINY_SLIDING_WINDOW",
    "ModelUnavailableError",
    "cache_root",
    "default_attn_implementation",
    "gguf_dense_path",
    "load_smollm2",
    "load_smollm2_tokenizer",
    "resolve_model",
    "smollm2_dense_path",
    "smollm2_gguf_path",
    "tiny_config",
    "tiny_model",
]
