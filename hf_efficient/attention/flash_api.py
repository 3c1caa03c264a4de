"""flash-attn 2.x compatible functions on top of the ``hf_efficient::flash_attn_*`` custom ops.

Same signatures, layouts and semantics as ``flash_attn.flash_attn_interface`` (2.6/2.7):
``(batch, seqlen, nheads, headdim)`` tensors, GQA/MQA by giving k/v fewer heads, causal masks
aligned to the bottom-right corner when ``seqlen_q != seqlen_k``, ``window_size=(left, right)``,
``softcap``, ALiBi, dropout, and packed variable-length batches through ``cu_seqlens``.

Differences from flash-attn:

* ``S_dmask`` (third return value with ``return_attn_probs=True``) is ``None`` when
  ``dropout_p == 0``, like flash-attn. With dropout it is float32
  ``(batch, nheads, max_seqlen_q, max_seqlen_k)`` holding the softmax probabilities, negated
  where dropout zeroed them (so ``S_dmask >= 0`` is the keep-mask); it is materialised by a
  separate kernel and meant for tests.
* ``block_table`` (paged K/V) is supported by ``flash_attn_varlen_func`` in the forward only;
  calling backward through it raises ``ValueError``.
* The gradient of ``softmax_lse`` is ignored (as in flash-attn).
"""
from __future__ import annotations

import math

import torch

from ..ops.flash_attn import check_inputs, check_seqlen_values, flash_attn
from ..ops.flash_fwd import attn_probs

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_prechecked",
    "flash_attn_varlen_qkvpacked_func",
]


def _new_seed(device: torch.device) -> torch.Tensor:
    """Dropout seed drawn from torch's generator of ``device`` (so ``torch.manual_seed`` fixes it)."""
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)


def _run(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
         causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
         block_table=None, covers=None):
    left, right = check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               dropout_p=dropout_p, softmax_scale=softmax_scale, window_size=window_size,
                               softcap=softcap, alibi_slopes=alibi_slopes, block_table=block_table)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    if cu_seqlens_q is not None and covers is None:
        paged = block_table is not None
        covers = check_seqlen_values(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q.shape[0],
                            k.shape[0], block_table, k.shape[0] if paged else 0,
                            k.shape[1] if paged else 0)
    if block_table is not None and return_attn_probs and dropout_p > 0:
        raise ValueError("return_attn_probs with dropout is not supported with block_table")
    rng_seed = _new_seed(q.device) if dropout_p > 0 else None
    out, lse = flash_attn(
        q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q or 0), int(max_seqlen_k or 0),
        float(softmax_scale), bool(causal), left, right, float(softcap), alibi_slopes,
        float(dropout_p), rng_seed, block_table, bool(deterministic), fill=covers is not True)
    if not return_attn_probs:
        return out
    s_dmask = None
    if dropout_p > 0:
        with torch.no_grad():
            s_dmask = attn_probs(q, k, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q or 0,
                                 max_seqlen_k or 0, softmax_scale=softmax_scale, causal=causal,
                                 window_size=(left, right), softcap=softcap,
                                 alibi_slopes=alibi_slopes, dropout_p=dropout_p,
                                 rng_seed=rng_seed)
    return out, lse, s_dmask


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Flash attention over a padded batch.

    Arguments:
        q: (batch_size, seqlen_q, nheads, headdim), float16 or bfloat16, on a CUDA device.
        k: (batch_size, seqlen_k, nheads_k, headdim), same dtype; nheads % nheads_k == 0 (GQA/MQA).
        v: (batch_size, seqlen_k, nheads_k, headdim), same dtype.
            headdim is any size from 1 to 256 (sizes that are not a multiple of 8 are zero-padded to
            one internally, as flash-attn does); the last dimension must be contiguous.
        dropout_p: float in [0, 1). Applied whenever > 0 (pass 0.0 at evaluation).
        softmax_scale: float; defaults to 1 / sqrt(headdim).
        causal: bool. Causal mask aligned to the bottom-right corner: query i sees key j iff
            j <= i + seqlen_k - seqlen_q.
        window_size: (left, right) ints >= -1; query i sees keys in
            [i + seqlen_k - seqlen_q - left, i + seqlen_k - seqlen_q + right]; -1 = unbounded.
            ``causal=True`` sets right = 0. Any int-like pair is accepted: tuple or list of ints,
            numpy integers or 0-d integer tensors, a 1-D integer tensor or numpy array of two
            elements (a CUDA tensor costs a sync).
        softcap: float >= 0; when > 0 scores become softcap * tanh(scores / softcap) (before masking).
        alibi_slopes: float32 (nheads,) or (batch_size, nheads); adds
            -slope * |i + seqlen_k - seqlen_q - j| to the scaled scores.
        deterministic: bool; bitwise reproducible backward (atomic-free dQ).
        return_attn_probs: bool; also return the log-sum-exp and the dropout-annotated
            probabilities (testing only).
    Returns:
        out: (batch_size, seqlen_q, nheads, headdim), dtype of q. Rows that see no key are 0.
        softmax_lse [if return_attn_probs]: float32 (batch_size, nheads, seqlen_q), natural-log
            log-sum-exp of each row's (scaled) scores; +inf for rows that see no key.
        S_dmask [if return_attn_probs]: None when dropout_p == 0, else float32
            (batch_size, nheads, seqlen_q, seqlen_k) probabilities, negative where dropped.
    """
    return _run(q, k, v, None, None, None, None, dropout_p, softmax_scale, causal, window_size,
                softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                           softcap=0.0, alibi_slopes=None, deterministic=False,
                           return_attn_probs=False, block_table=None):
    """Flash attention over packed variable-length sequences.

    Arguments:
        q: (total_q, nheads, headdim), float16 or bfloat16; sequence b is
            q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]].
        k: (total_k, nheads_k, headdim), same dtype; or, with ``block_table``,
            (num_blocks, block_size, nheads_k, headdim) paged K.
        v: same shape as k.
        cu_seqlens_q: int32 (batch_size + 1,), non-decreasing offsets into q. Empty sequences allowed.
        cu_seqlens_k: int32 (batch_size + 1,), offsets into k/v (with ``block_table``: only the
            differences, i.e. the per-sequence key counts, are used).
        max_seqlen_q: int >= the longest query sequence.
        max_seqlen_k: int >= the longest key sequence.
        dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
        return_attn_probs: as in :func:`flash_attn_func`, per sequence.
        block_table: optional int32 (batch_size, max_num_blocks_per_seq); key j of sequence b
            lives in k[block_table[b, j // block_size], j % block_size]. Forward only.
    Returns:
        out: (total_q, nheads, headdim), dtype of q. Tokens before cu_seqlens_q[0] or after
            cu_seqlens_q[-1] belong to no sequence and get 0.
        softmax_lse [if return_attn_probs]: float32 (nheads, total_q); +inf for rows that see no key.
        S_dmask [if return_attn_probs]: None when dropout_p == 0, else float32
            (batch_size, nheads, max_seqlen_q, max_seqlen_k), zero outside each sequence.

    Under ``torch.compile`` tracing or CUDA graph capture the contents of cu_seqlens are not
    checked (that needs a device->host sync); elsewhere they are: CPU and inference-mode tensors
    on every call, other CUDA tensors once until they change in place (a ``.data`` write is not
    seen). Unchecked contents cannot make the kernels leave the tensors: each sequence's rows are
    clamped to q/k/v and block ids outside the pool read as zeros, so bad values give wrong numbers.
    """
    return _run(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                return_attn_probs, block_table)


def flash_attn_varlen_prechecked(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, covers,
                                 dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                                 softcap=0.0, alibi_slopes=None, deterministic=False):
    """:func:`flash_attn_varlen_func` for cu_seqlens whose contents the caller built and knows valid.

    Shapes and dtypes as :func:`flash_attn_varlen_func`; the tensors' metadata is still checked, but not the
    contents of cu_seqlens_q/cu_seqlens_k (int32 (batch_size + 1,), non-decreasing, inside [0, total]), nor
    max_seqlen_q/max_seqlen_k against them: that check costs a device->host sync per call. ``covers`` (bool):
    whether cu_seqlens_q runs from 0 to total_q and cu_seqlens_k from 0 to total_k (False zeroes the rows that
    belong to no sequence). Returns out (total_q, nheads, headdim).
    """
    if not isinstance(covers, bool):
        raise TypeError(f"covers must be a bool, got {type(covers).__name__}")
    return _run(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                causal, window_size, softcap, alibi_slopes, deterministic, False, covers=covers)


def _unbind_packed(t, dim, n, name):
    if not isinstance(t, torch.Tensor) or t.dim() <= dim or t.shape[dim] != n:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must have size {n} in dimension {dim}, got {shape}")
    return t.unbind(dim)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False,
                              window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                              deterministic=False, return_attn_probs=False):
    """:func:`flash_attn_func` on qkv (batch_size, seqlen, 3, nheads, headdim), fp16/bf16.

    Returns out (batch_size, seqlen, nheads, headdim) [, softmax_lse, S_dmask].
    """
    q, k, v = _unbind_packed(qkv, 2, 3, "qkv")
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False,
                             window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                             deterministic=False, return_attn_probs=False):
    """:func:`flash_attn_func` with q (batch_size, seqlen_q, nheads, headdim) and
    kv (batch_size, seqlen_k, 2, nheads_k, headdim), fp16/bf16.

    Returns out (batch_size, seqlen_q, nheads, headdim) [, softmax_lse, S_dmask].
    """
    k, v = _unbind_packed(kv, 2, 2, "kv")
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                                     causal=False, window_size=(-1, -1), softcap=0.0,
                                     alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """:func:`flash_attn_varlen_func` on qkv (total, 3, nheads, headdim), fp16/bf16, with
    int32 cu_seqlens (batch_size + 1,) shared by q and k.

    Returns out (total, nheads, headdim) [, softmax_lse (nheads, total), S_dmask].
    """
    q, k, v = _unbind_packed(qkv, 1, 3, "qkv")
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                  dropout_p, softmax_scale, causal, window_size, softcap,
                                  alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    dropout_p=0.0, softmax_scale=None, causal=False,
                                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                                    deterministic=False, return_attn_probs=False):
    """:func:`flash_attn_varlen_func` with q (total_q, nheads, headdim) and
    kv (total_k, 2, nheads_k, headdim), fp16/bf16.

    Returns out (total_q, nheads, headdim) [, softmax_lse (nheads, total_q), S_dmask].
    """
    k, v = _unbind_packed(kv, 1, 2, "kv")
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  dropout_p, softmax_scale, causal, window_size, softcap,
                                  alibi_slopes, deterministic, return_attn_probs)
