"""Attention over transformers' tensors without a paged cache: the dense or variable-length flash kernels, or the
plain-PyTorch reference where the kernels do not apply.

:func:`attention` is the ``"hf_efficient"`` attention once the paged-cache case is ruled out (used by
:mod:`.hf_integration` and, for prefill, by :mod:`.paged_hf`): no padding runs the dense kernel; a 2-D padding
mask or a padding-free packed batch is unpadded (:mod:`.varlen`) and runs the variable-length kernel.
:func:`run` picks kernel or reference for one call. A kernel that raises falls back to the reference with one
warning; a custom 4-D mask falls back to SDPA with one warning.
"""

from __future__ import annotations

import logging

import torch

from ..ops.attention_ref import attention_ref, attention_varlen_ref
from .varlen import Varlen, packed_varlen, varlen_from_mask

__all__ = ["attention", "kernel_ok", "run", "warn_once"]

logger = logging.getLogger(__name__)
_warned: set[str] = set()

def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def kernel_ok(q: torch.Tensor) -> bool:
    """The flash kernels take ``q``: CUDA, fp16/bf16, head dim at most 256 (others than multiples of 8 are
    zero-padded inside)."""
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and 0 < q.shape[-1] <= 256


def run(dense: bool, q, k, v, varlen: Varlen | None, opts: dict):
    """One attention call. Dense: q ``(b, sq, h, d)``, k/v ``(b, sk, hk, d)``; varlen: q ``(total_q, h, d)``,
    k/v ``(total_k, hk, d)`` described by ``varlen``. ``opts``: flash-attn keyword arguments (softmax_scale,
    causal, window_size, softcap, dropout_p). Returns out like q. Kernel on CUDA half precision, reference
    otherwise."""
    if kernel_ok(q):
        try:
            from . import flash_api

            if dense:
                return flash_api.flash_attn_func(q, k, v, **opts)
            if varlen.covers is not None:  # cu_seqlens built here: no contents check (no host sync)
                return flash_api.flash_attn_varlen_prechecked(
                    q, k, v, varlen.cu_q, varlen.cu_k, varlen.max_q, varlen.max_k, covers=varlen.covers, **opts
                )
            return flash_api.flash_attn_varlen_func(
                q, k, v, varlen.cu_q, varlen.cu_k, varlen.max_q, varlen.max_k, **opts
            )
        except (ImportError, RuntimeError) as err:  # a broken kernel must not kill a training run
            warn_once("kernel", f"hf_efficient attention kernel failed ({err}); using the reference path")
    opts = dict(opts)
    dropout_p = opts.pop("dropout_p", 0.0)
    if dropout_p > 0:
        opts["dropout_p"] = dropout_p
        opts["dropout_mask"] = _dropout_masks(dense, q, k, varlen, dropout_p)
    if dense:
        return attention_ref(q, k, v, **opts)
    return attention_varlen_ref(q, k, v, varlen.cu_q, varlen.cu_k, **opts)


def _dropout_masks(dense, q, k, varlen, p):
    if dense:
        b, sq, h, _ = q.shape
        return torch.rand(b, h, sq, k.shape[1], device=q.device) >= p
    cq, ck = varlen.cu_q.tolist(), varlen.cu_k.tolist()
    h = q.shape[1]
    return [
        torch.rand(h, cq[i + 1] - cq[i], ck[i + 1] - ck[i], device=q.device) >= p for i in range(len(cq) - 1)
    ]


def _fallback_sdpa(module, query, key, value, attention_mask, reason: str, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    warn_once(reason, f"hf_efficient attention: {reason}; falling back to SDPA")
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def attention(
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
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention (``AttentionInterface`` signature) for every case but a paged cache.

    Args:
        query: ``(batch, nheads, seqlen_q, headdim)``.
        key, value: ``(batch, nheads_k, seqlen_k, headdim)``.
        attention_mask: ``None``, a ``(batch, L)`` bool padding mask, or a custom 4-D mask (SDPA fallback).

    Returns:
        ``(out, None)`` with ``out`` ``(batch, seqlen_q, nheads, headdim)`` in ``query.dtype``.
    """
    cache = kwargs.get("cache")
    if cache is not None and type(cache).__name__ == "PagedAttentionCache":
        return _fallback_sdpa(
            module, query, key, value, attention_mask, "transformers' paged cache is served by SDPA",
            dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs,
        )
    if attention_mask is not None and attention_mask.dim() == 4:
        if softcap:
            raise ValueError("a custom 4-D attention_mask together with softcap is not supported; use 'eager'")
        return _fallback_sdpa(
            module, query, key, value, attention_mask, "a custom 4-D attention mask was given",
            dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs,
        )

    batch, _, seqlen_q, _ = query.shape
    seqlen_k = key.shape[2]
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    if seqlen_q == 1 and attention_mask is None:
        causal = False  # one query sees the whole cache; same result, cheaper
    window = (-1, -1)
    if sliding_window is not None and seqlen_k > sliding_window:
        window = (sliding_window - 1, sliding_window - 1)
    opts = dict(
        softmax_scale=scaling,
        causal=causal,
        window_size=window,
        softcap=float(softcap) if softcap else 0.0,
        dropout_p=float(dropout),
    )
    q = query.transpose(1, 2)  # (b, s, h, d)
    k = key.transpose(1, 2)
    v = value.transpose(1, 2)

    varlen = None
    if attention_mask is not None:
        varlen = varlen_from_mask(attention_mask, seqlen_q, seqlen_k)
    elif batch == 1:
        varlen = packed_varlen(kwargs.get("position_ids"), kwargs, seqlen_q)
        if varlen is not None and seqlen_q != seqlen_k:
            raise ValueError(
                "packed (padding-free) batches are supported for training and prefill only (no KV cache); got "
                f"seqlen_q={seqlen_q}, seqlen_k={seqlen_k}"
            )

    if varlen is None:
        return run(True, q, k, v, None, opts), None

    heads, dim = q.shape[2], q.shape[3]
    qf = q.reshape(batch * seqlen_q, heads, dim)
    kf = k.reshape(batch * seqlen_k, k.shape[2], dim)
    vf = v.reshape(batch * seqlen_k, v.shape[2], v.shape[3])
    if varlen.idx_q is not None:
        qf = qf.index_select(0, varlen.idx_q)
    if varlen.idx_k is not None:
        kf, vf = kf.index_select(0, varlen.idx_k), vf.index_select(0, varlen.idx_k)
    out = run(False, qf.contiguous(), kf.contiguous(), vf.contiguous(), varlen, opts)
    if varlen.idx_q is not None:
        full = out.new_zeros(batch * seqlen_q, heads, out.shape[-1])
        out = full.index_copy(0, varlen.idx_q, out)
    return out.reshape(batch, seqlen_q, heads, out.shape[-1]), None
