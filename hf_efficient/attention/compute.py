"""Attention over transformers' tensors without a paged cache: the dense or variable-length flash kernels, or
PyTorch's ``scaled_dot_product_attention`` where the kernels do not apply (CPU, float32).

:func:`attention` is the ``"hf_efficient"`` attention once the paged-cache case is ruled out (used by
:mod:`.hf_integration` and, for prefill, by :mod:`.paged_hf`): no padding runs the dense kernel; a 2-D padding
mask or a padding-free packed batch is unpadded (:mod:`.varlen`) and runs the variable-length kernel.
:func:`run` picks kernel or the SDPA path for one call. A kernel that raises falls back to the SDPA path with one
warning; a custom 4-D mask falls back to transformers' SDPA attention with one warning.

Without the kernels (CPU, or float32 / head dims the kernels do not take) :func:`sdpa_attention` runs: padded
batches stay padded and go to SDPA with a boolean mask (key padding, bottom-right causal, sliding window) built
for a chunk of queries at a time, so memory stays linear in the sequence length; softcap, which SDPA cannot
express, runs a plain softmax over the same query chunks; dropout runs the reference.
"""

from __future__ import annotations

import logging

import torch

from ..ops.attention_ref import attention_ref, attention_varlen_ref
from .varlen import Varlen, packed_varlen, varlen_from_mask

__all__ = ["attention", "kernel_ok", "run", "sdpa_attention", "warn_once"]

# Elements of one query chunk's mask (batch x queries x keys booleans) or, with softcap, of its scores (x heads,
# float32): bounds the extra memory of a call independently of the sequence length.
CHUNK_ELEMENTS = 1 << 22

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
            warn_once("kernel", f"hf_efficient attention kernel failed ({err}); using the SDPA path")
    opts = dict(opts)
    dropout_p = opts.pop("dropout_p", 0.0)
    if dropout_p > 0:  # training with dropout off the kernels: the reference draws the masks
        opts["dropout_p"] = dropout_p
        opts["dropout_mask"] = _dropout_masks(dense, q, k, varlen, dropout_p)
        if dense:
            return attention_ref(q, k, v, **opts)
        return attention_varlen_ref(q, k, v, varlen.cu_q, varlen.cu_k, **opts)
    sdpa_opts = dict(
        scale=opts.get("softmax_scale"), causal=opts.get("causal", False),
        window=opts.get("window_size", (-1, -1)), softcap=opts.get("softcap", 0.0),
    )
    if dense:
        return sdpa_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **sdpa_opts).transpose(1, 2)
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    cq, ck = varlen.cu_q.tolist(), varlen.cu_k.tolist()
    for i in range(len(cq) - 1):
        if cq[i + 1] == cq[i]:
            continue
        qi = q[cq[i] : cq[i + 1]].transpose(0, 1).unsqueeze(0)
        ki = k[ck[i] : ck[i + 1]].transpose(0, 1).unsqueeze(0)
        vi = v[ck[i] : ck[i + 1]].transpose(0, 1).unsqueeze(0)
        out[cq[i] : cq[i + 1]] = sdpa_attention(qi, ki, vi, **sdpa_opts)[0].transpose(0, 1)
    return out


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    causal: bool = False,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    key_mask: torch.Tensor | None = None,
    query_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention with ``torch.nn.functional.scaled_dot_product_attention`` (any device), memory linear in length.

    Args:
        q: ``(batch, nheads, seqlen_q, headdim)``.
        k, v: ``(batch, nheads_k, seqlen_k, headdim)`` (``nheads`` a multiple of ``nheads_k``).
        causal, window: flash-attn semantics, aligned bottom-right (query ``i`` sits at key position
            ``i + seqlen_k - seqlen_q``); ``window = (left, right)``, -1 for unbounded.
        softcap: ``softcap * tanh(scores / softcap)`` before the softmax (0: none).
        key_mask: bool ``(batch, seqlen_k)``, the keys that exist (``None``: all).
        query_mask: bool ``(batch, seqlen_q)``, the queries that are real; the others' output is zero.

    Returns:
        ``(batch, nheads, seqlen_q, headdim_v)`` in ``q.dtype``.
    """
    batch, heads, sq, _ = q.shape
    sk, heads_k = k.shape[2], k.shape[1]
    left, right = window
    if causal:
        right = 0
    if sq == 1:
        right = -1  # bottom-right: the one query is the last position, no key lies after it
    if left >= sk - 1:
        left = -1  # the window reaches the first key from every query
    need_mask = key_mask is not None or left >= 0 or (right >= 0 and not (right == 0 and sq == sk))
    if not softcap and not need_mask:
        # The common prefill / unpadded case: one fused call (is_causal is bottom-right here since sq == sk).
        gqa = dict(enable_gqa=True) if heads != heads_k else {}
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=right == 0, scale=scale, **gqa
        )
    else:
        if heads != heads_k:
            k = k.repeat_interleave(heads // heads_k, dim=1)
            v = v.repeat_interleave(heads // heads_k, dim=1)
        per_query = batch * sk * (heads if softcap else 1)
        chunk = max(1, min(sq, CHUNK_ELEMENTS // max(per_query, 1)))
        out = q.new_empty(batch, heads, sq, v.shape[-1])
        kpos = torch.arange(sk, device=q.device)
        for start in range(0, sq, chunk):
            end = min(sq, start + chunk)
            qpos = torch.arange(start, end, device=q.device)[:, None] + (sk - sq)
            keep = torch.ones(end - start, sk, dtype=torch.bool, device=q.device)
            if right >= 0:
                keep &= kpos <= qpos + right
            if left >= 0:
                keep &= kpos >= qpos - left
            keep = keep.expand(batch, end - start, sk)
            if key_mask is not None:
                keep = keep & key_mask[:, None, :]
            # a query that sees no key (padding before the first real key) attends to all; its output is
            # discarded below, and this keeps NaN out of it
            keep = keep | ~keep.any(-1, keepdim=True)
            mask = keep[:, None]
            qc = q[:, :, start:end]
            if softcap:
                out[:, :, start:end] = _softcap_attention(qc, k, v, mask, scale, softcap)
            else:
                out[:, :, start:end] = torch.nn.functional.scaled_dot_product_attention(
                    qc, k, v, attn_mask=mask, scale=scale
                )
    if query_mask is not None:
        out = out.masked_fill(~query_mask[:, None, :, None], 0)
    return out


def _softcap_attention(q, k, v, mask, scale, softcap):
    """Plain attention with a tanh soft cap on the scores (what SDPA cannot express), float32 softmax."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)


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
    packed = attention_mask is None and batch == 1 and (
        kwargs.get("cu_seq_lens_q") is not None or kwargs.get("position_ids") is not None
    )
    if not kernel_ok(query) and not opts["dropout_p"] and not packed:
        return _sdpa_padded(query, key, value, attention_mask, opts), None

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


def _sdpa_padded(query, key, value, attention_mask, opts) -> torch.Tensor:
    """The SDPA path on transformers' padded layout: query ``(b, h, sq, d)``, key/value ``(b, hk, sk, d)``, a
    ``(b, L)`` padding mask or ``None``. Returns ``(b, sq, h, dv)``. Keys past the last used mask column (empty
    static-cache slots) are dropped and queries end at that column, as in :func:`.varlen.varlen_from_mask`."""
    seqlen_q, seqlen_k = query.shape[2], key.shape[2]
    key_mask = query_mask = None
    if attention_mask is not None:
        mask = attention_mask.bool()
        kv_len = min(mask.shape[1], seqlen_k)
        mask = mask[:, :kv_len]
        if seqlen_q != kv_len and seqlen_q > 1:
            cols = torch.arange(kv_len, device=mask.device)
            kv_len = int(torch.where(mask, cols + 1, 0).max())
            mask = mask[:, :kv_len]
        if kv_len < seqlen_k:
            key, value = key[:, :, :kv_len], value[:, :, :kv_len]
        if not bool(mask.all()):
            key_mask = mask
            if seqlen_q > 1:
                query_mask = mask[:, kv_len - seqlen_q : kv_len]
    out = sdpa_attention(
        query, key, value, scale=opts["softmax_scale"], causal=opts["causal"], window=opts["window_size"],
        softcap=opts["softcap"], key_mask=key_mask, query_mask=query_mask,
    )
    return out.transpose(1, 2)
