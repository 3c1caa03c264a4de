"""The ``"hf_efficient"`` attention implementation for transformers.

Importing :mod:`hf_efficient` registers :func:`attention_forward` with transformers' ``AttentionInterface`` and
:func:`attention_mask` with ``AttentionMaskInterface`` under the key ``"hf_efficient"``, so that::

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="hf_efficient")

runs every attention layer through this module. The mask function hands the attention a 2-D padding mask (or
``None`` when there is no padding), like flash-attn's integration; the attention function then either runs the
dense kernel (no padding), or removes the padding and runs the variable-length kernel (padded batches, and
padding-free packed batches described by ``position_ids`` or ``cu_seq_lens_*``).

On CUDA with fp16/bf16 inputs the Triton flash kernels run; elsewhere (CPU, float32) the plain-PyTorch reference
in :mod:`hf_efficient.ops.attention_ref` does. A kernel that raises falls back to the reference with one warning.

Unsupported requests:

* ``output_attentions=True`` and attention sinks (``s_aux``) raise ``ValueError`` (use ``"eager"``);
* a 4-D (custom) attention mask falls back to SDPA with one warning (``ValueError`` if softcap is also set);
* transformers' continuous-batching paged cache falls back to SDPA with one warning.
"""

from __future__ import annotations

import torch

from ..cache.paged import consume_pending
from .compute import attention
from .paged_hf import paged_attention_forward

IMPLEMENTATION_NAME = "hf_efficient"


# --------------------------------------------------------------------------------------------------- mask


def attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """Mask function for ``AttentionMaskInterface``: a ``(batch, kv_length)`` bool padding mask or ``None``.

    ``None`` means "every key of every row is real", and the attention then applies causality (and the sliding
    window) itself. A 2-D mask is sliced to the last ``kv_length`` positions (sliding-window caches hold fewer
    keys than the mask has columns).
    """
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:].to(torch.bool)
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


# --------------------------------------------------------------------------------------------------- attention


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function (``AttentionInterface`` signature).

    Args:
        query: ``(batch, nheads, seqlen_q, headdim)``.
        key, value: ``(batch, nheads_k, seqlen_k, headdim)``.
        attention_mask: ``None``, a ``(batch, L)`` bool padding mask from :func:`attention_mask`, or a custom
            4-D mask (SDPA fallback).

    Returns:
        ``(out, None)`` with ``out`` ``(batch, seqlen_q, nheads, headdim)`` in ``query.dtype``.
    """
    if kwargs.get("output_attentions", False):
        raise ValueError(
            "attn_implementation='hf_efficient' does not return attention probabilities "
            "(output_attentions=True); load the model with attn_implementation='eager' for that"
        )
    if s_aux is not None:
        raise ValueError(
            "attn_implementation='hf_efficient' does not support attention sinks (s_aux); use 'eager'"
        )
    paged_layer = consume_pending(key)
    if paged_layer is not None:
        return paged_attention_forward(
            module, paged_layer, query, key, value, attention_mask, scaling, sliding_window, softcap, dropout, kwargs
        )
    return attention(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
        sliding_window=sliding_window, softcap=softcap, is_causal=is_causal, **kwargs,
    )


def register() -> None:
    """Register ``"hf_efficient"`` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION_NAME, attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION_NAME, attention_mask)
