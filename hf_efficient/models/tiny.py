"""Tiny random-init models, one per architecture family the attention path must serve.

Every family shares one shape so tests can be written once and parametrized over families:
hidden 64, 4 query heads over 2 key/value heads (GQA), head_dim 16, vocab 256,
``max_position_embeddings`` 512. Each builds, runs a forward and a backward pass on CPU in
well under a second.

=========  =====================  ==========================================================
family     class                  attention features it exercises
=========  =====================  ==========================================================
llama      LlamaForCausalLM       GQA, RoPE, plain causal attention
mistral    MistralForCausalLM     GQA + sliding window (8) on every layer
qwen2      Qwen2ForCausalLM       GQA, q/k/v projection bias; sliding window off (the default)
qwen3      Qwen3ForCausalLM       GQA, per-head q/k RMSNorm; sliding window off (the default)
gemma2     Gemma2ForCausalLM      GQA, attention-logit softcap (5.0), final-logit softcap
                                  (10.0), softmax scale ``query_pre_attn_scalar**-0.5`` with
                                  24 != head_dim, sliding window (8) on even layers only
jamba      JambaForCausalLM       hybrid: Mamba (SSM) layers 0 and 2, GQA attention layers 1
                                  and 3 (no RoPE); runs on the PyTorch reference SSM path
=========  =====================  ==========================================================

Sliding window semantics (transformers' masks): a query at position ``i`` sees keys ``j`` with
``i - window < j <= i``, i.e. ``window`` keys including itself; in flash-attn terms that is
``window_size=(window - 1, 0)``. Tests that mean to exercise the window must use sequences longer
than :data:`TINY_SLIDING_WINDOW`.

Weights are initialised with ``initializer_range=0.2`` rather than the usual 0.02: at 0.02 the
attention maps of a model this small are uniform to five digits, which hides errors in masking,
scaling and softcapping; at 0.2 they are sharply peaked and such errors change the logits.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    JambaConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
)

__all__ = [
    "TINY_FAMILIES",
    "TINY_FAMILY_FEATURES",
    "TINY_SLIDING_WINDOW",
    "tiny_config",
    "tiny_model",
    "default_attn_implementation",
]

TINY_FAMILIES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "jamba")

#: Sliding window of the "mistral" and "gemma2" tiny configs, in tokens.
TINY_SLIDING_WINDOW = 8

#: Attention features each family exercises (keys of the module docstring's table).
TINY_FAMILY_FEATURES: dict[str, frozenset[str]] = {
    "llama": frozenset({"gqa", "rope"}),
    "mistral": frozenset({"gqa", "rope", "sliding_window"}),
    "qwen2": frozenset({"gqa", "rope", "qkv_bias"}),
    "qwen3": frozenset({"gqa", "rope", "qk_norm"}),
    "gemma2": frozenset({"gqa", "rope", "sliding_window", "softcap", "custom_scale"}),
    "jamba": frozenset({"gqa", "hybrid"}),
}

_SHAPE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    initializer_range=0.2,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _jamba_shape() -> dict:
    shape = {k: v for k, v in _SHAPE.items() if k != "head_dim"}  # Jamba derives it: 64 / 4 = 16
    shape["num_hidden_layers"] = 4
    return shape


# family -> (config class, constructor kwargs)
_FAMILIES: dict[str, tuple[type[PreTrainedConfig], dict]] = {
    "llama": (LlamaConfig, dict(_SHAPE)),
    "mistral": (MistralConfig, dict(_SHAPE, sliding_window=TINY_SLIDING_WINDOW)),
    "qwen2": (Qwen2Config, dict(_SHAPE)),
    "qwen3": (Qwen3Config, dict(_SHAPE)),
    # Gemma2 alternates "sliding_attention" (even layers) and "full_attention" (odd layers).
    "gemma2": (
        Gemma2Config,
        dict(
            _SHAPE,
            sliding_window=TINY_SLIDING_WINDOW,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=10.0,
            query_pre_attn_scalar=24,
        ),
    ),
    "jamba": (
        JambaConfig,
        dict(
            _jamba_shape(),
            attn_layer_period=2,
            attn_layer_offset=1,
            num_experts=1,  # a plain MLP in every layer; MoE routing is not what we test
            mamba_d_state=16,
            mamba_d_conv=4,
            mamba_expand=2,
        ),
    ),
}
assert tuple(_FAMILIES) == TINY_FAMILIES

# transformers refuses SDPA for Gemma2 (SDPA has no softcap), so its reference path is eager.
_DEFAULT_ATTN = {"gemma2": "eager"}


def _check_family(family: str) -> str:
    key = family.lower()
    if key not in _FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")
    return key


def default_attn_implementation(family: str) -> str:
    """The attention implementation transformers accepts as the reference for ``family``.

    ``"sdpa"`` for every family except ``"gemma2"`` (``"eager"``: transformers does not allow SDPA
    with attention-logit softcapping).
    """
    return _DEFAULT_ATTN.get(_check_family(family), "sdpa")


def tiny_config(family: str, **overrides) -> PreTrainedConfig:
    """Config of the tiny ``family`` model (see the module docstring), with ``overrides`` applied.

    Overrides go to the config class's constructor, so derived fields (Gemma2's ``layer_types``,
    Qwen's ``sliding_window`` under ``use_sliding_window``) are derived from them. For example
    ``tiny_config("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1)`` makes
    layer 1 a sliding-window layer, and ``tiny_config("llama", num_hidden_layers=4)`` a deeper model.
    """
    cls, kwargs = _FAMILIES[_check_family(family)]
    return cls(**{**kwargs, **overrides})


def tiny_model(
    family: str,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    seed: int = 0,
    **overrides,
) -> PreTrainedModel:
    """A randomly initialised tiny ``family`` causal LM in eval mode on CPU.

    Args:
        family: one of :data:`TINY_FAMILIES`.
        dtype: parameter dtype. Weights are always initialised in float32 and then cast, so the
            same ``seed`` gives the same weights (up to rounding) in every dtype.
        attn_implementation: any name transformers accepts (``"sdpa"``, ``"eager"``,
            a registered custom one). ``None`` picks :func:`default_attn_implementation`.
        seed: RNG seed for the weights; the global RNG state is left untouched.
        **overrides: config fields, as for :func:`tiny_config`.
    """
    config = tiny_config(family, **overrides)
    attn = attn_implementation or default_attn_implementation(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    return model.to(dtype).eval()
