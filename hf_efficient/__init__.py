"""hf_efficient: fast attention kernels, a paged KV cache and a generation engine for Hugging Face transformers.

Importing this package registers the ``"hf_efficient"`` attention implementation with transformers
(``AttentionInterface`` and ``AttentionMaskInterface``): at once when transformers is already imported, else
right after ``import transformers``. Importing it loads neither torch nor transformers by itself, never compiles
anything and never initialises CUDA: kernels are compiled by Triton (or nvcc, for the CUDA C++ ones) the first
time they run.
"""

from ._registration import register_with_transformers as _register_with_transformers
from ._version import __version__

IMPLEMENTATION_NAME = "hf_efficient"  # the attn_implementation name (hf_efficient.attention.hf_integration)

_register_with_transformers()

__all__ = [
    "IMPLEMENTATION_NAME",
    "__version__",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_with_kvcache",
    "patches",
    "PagedCache",
    "CacheFullError",
    "LLM",
    "SamplingParams",
    "DecodeEngine",
    "engine_generate",
]

_LAZY = {
    "flash_attn_func": "hf_efficient.attention.flash_api",
    "flash_attn_varlen_func": "hf_efficient.attention.flash_api",
    "flash_attn_qkvpacked_func": "hf_efficient.attention.flash_api",
    "flash_attn_kvpacked_func": "hf_efficient.attention.flash_api",
    "flash_attn_varlen_qkvpacked_func": "hf_efficient.attention.flash_api",
    "flash_attn_varlen_kvpacked_func": "hf_efficient.attention.flash_api",
    "flash_attn_with_kvcache": "hf_efficient.attention.kvcache_api",
    "PagedCache": "hf_efficient.cache.paged",
    "LLM": "hf_efficient.generation.llm",
    "SamplingParams": "hf_efficient.generation.sampling",
    "DecodeEngine": "hf_efficient.generation.engine",
    "engine_generate": "hf_efficient.generation.hf_generate",
    "CacheFullError": "hf_efficient.cache.allocator",
}


def __getattr__(name):
    """Kernel entry points import Triton lazily, so ``import hf_efficient`` stays light."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    if name == "patches":
        import importlib

        return importlib.import_module("hf_efficient.patches")
    raise AttributeError(f"module 'hf_efficient' has no attribute {name!r}")
