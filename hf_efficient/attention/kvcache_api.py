"""``flash_attn_with_kvcache`` with flash-attn 2.x semantics, on the paged decode op.

Steps, as in flash-attn: (1) rotary embedding of q and the new k when ``rotary_cos``/``rotary_sin``
are given; (2) the new k/v are written into the cache in place at positions
``cache_seqlens[b] ..`` (``cache_seqlens`` is the length *before* appending); (3) attention of q
over the cache (``cache_seqlens + seqlen_new`` keys, bottom-right causal alignment).

Like flash-attn (its ``mha_fwd_kvcache`` bounds check), the contents of ``cache_seqlens``,
``block_table``, ``cache_batch_idx`` and ``cache_leftpad`` are checked first (:func:`check_paged_values`,
plus the rotary table's length): one device->host sync per call, a ``ValueError`` naming the argument
when a length is negative, exceeds the cache (``block_table.shape[1] * block_size`` keys when paged) or
a used block id lies outside the pool. While tracing (``torch.compile``) or capturing a CUDA graph the
check is skipped and every step is a device op without host sync; the steps then clamp their indices
instead (an out-of-range append writes nothing, out-of-range keys are not read: see ``paged_decode``),
so bad values give wrong numbers for their sequence but never touch memory outside the tensors.
q with more than 16 tokens (prefill) runs the Triton paged kernel instead of the CUDA one.
"""

from __future__ import annotations

import torch

from ..ops._common import is_fake, window_pair
from ..ops.paged_decode import check_paged_inputs, check_paged_values, paged_decode_op


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                 interleaved: bool) -> torch.Tensor:
    """Rotate the first ``2 * cos.shape[1]`` dims of ``x`` (batch, seqlen, heads, head_dim).

    cos/sin: (seqlen_ro, rotary_dim / 2); positions: (batch, seqlen) int64 rows of cos/sin.
    interleaved: pairs (0, 1), (2, 3), ... (GPT-J); else (i, i + rotary_dim / 2) (GPT-NeoX).
    Computed in fp32, returned in x.dtype.
    """
    rd = 2 * cos.shape[1]
    c = cos[positions].unsqueeze(2).float()  # (batch, seqlen, 1, rd/2)
    s = sin[positions].unsqueeze(2).float()
    xr = x[..., :rd].float()
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rot = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., : rd // 2], xr[..., rd // 2:]
        rot = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((rot.to(x.dtype), x[..., rd:]), dim=-1)


def kv_cache_append(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    cache_seqlens: torch.Tensor, block_table: torch.Tensor | None = None,
                    cache_batch_idx: torch.Tensor | None = None) -> None:
    """Write k/v (batch, seqlen_new, nheads_k, head_dim) into the cache at ``cache_seqlens[b] + i``.

    Paged: page ``block_table[b, pos // block_size]``, slot ``pos % block_size``; contiguous: row
    ``cache_batch_idx[b]`` (default b). In place, no host sync. Positions should lie inside the
    sequence's pages (:func:`check_paged_values` checks that, with a sync); one that does not (a
    position outside the table or cache, a page or row id outside the pool) is written nowhere: its
    index is clamped into range and the value already there is written back.
    """
    B, Tn = k.shape[:2]
    pos = cache_seqlens.long().unsqueeze(1) + torch.arange(Tn, device=k.device)
    n_rows, length = k_cache.shape[0], k_cache.shape[1]
    if n_rows == 0 or length == 0:
        return
    if block_table is not None:
        cols = block_table.shape[1]
        if cols == 0:
            return
        col = torch.div(pos, length, rounding_mode="floor")
        ok = (pos >= 0) & (col < cols)
        rows = block_table.long().gather(1, col.clamp(0, cols - 1))
        slots = pos.remainder(length)
    else:
        rows = cache_batch_idx.long() if cache_batch_idx is not None else torch.arange(B, device=k.device)
        rows = rows.unsqueeze(1).expand(B, Tn)
        ok = (pos >= 0) & (pos < length)
        slots = pos.clamp(0, length - 1)
    ok = ok & (rows >= 0) & (rows < n_rows)
    rows = rows.clamp(0, n_rows - 1)
    keep = ok.view(B, Tn, 1, 1)
    for cache, new in ((k_cache, k), (v_cache, v)):
        cache[rows, slots] = torch.where(keep, new.to(cache.dtype), cache[rows, slots])


def _check_new_kv(q, k_cache, k, v, rotary_cos, rotary_sin):
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together")
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != q.dtype:
                raise TypeError(f"{name} dtype {t.dtype} must match q dtype {q.dtype}")
            if t.device != q.device:
                raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
            want = (q.shape[0], k.shape[1], k_cache.shape[2], k_cache.shape[3])
            if t.dim() != 4 or tuple(t.shape) != want:
                raise ValueError(f"{name} must have shape (batch, seqlen_new, nheads_k, head_dim) = {want}, "
                                 f"got {tuple(t.shape)}")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if rotary_cos is not None:
        if k is None:
            raise ValueError("rotary_cos/rotary_sin need k and v (rotary is applied to the new tokens)")
        for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor")
            if t.dim() != 2 or tuple(t.shape) != tuple(rotary_cos.shape) or t.device != q.device:
                raise ValueError(f"{name} must be (seqlen_ro, rotary_dim / 2) on {q.device}, got {tuple(t.shape)}")
        if rotary_cos.shape[0] < 1:
            raise ValueError("rotary_cos/rotary_sin must hold at least one position")
        if 2 * rotary_cos.shape[1] > q.shape[-1]:
            raise ValueError(f"rotary_dim {2 * rotary_cos.shape[1]} exceeds head_dim {q.shape[-1]}")


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """Attention over a KV cache, appending new k/v first (flash-attn 2.x ``flash_attn_with_kvcache``).

    Arguments:
        q: (batch, seqlen_q, nheads, head_dim) float16/bfloat16; head_dim 1..256 (64, 128 and 256 run the CUDA
            decode kernel, other sizes the Triton kernel, which masks the head dim instead of padding the cache).
        k_cache, v_cache: (batch_cache, seqlen_cache, nheads_k, head_dim) without ``block_table``, or
            (num_blocks, block_size, nheads_k, head_dim) with it (paged). Updated in place when k/v given.
        k, v: optional (batch, seqlen_new, nheads_k, head_dim), written at ``cache_seqlens[b] ..``.
        rotary_cos, rotary_sin: optional (seqlen_ro, rotary_dim / 2); rotate q and the new k. The new
            k at positions cache_seqlens + i; q the same when causal or local, else all at
            cache_seqlens. Needs k/v.
        cache_seqlens: int or (batch,) int32, cache length before appending (default: the full
            cache, seqlen_cache, for a contiguous cache; required for a paged one).
        cache_batch_idx: (batch,) int32 rows of a contiguous cache. cache_leftpad: (batch,) int32
            first valid key of a contiguous cache.
        block_table: (batch, max_blocks_per_seq) int32.
        softmax_scale: default head_dim ** -0.5. causal: bottom-right aligned. window_size: (left,
            right), -1 unbounded; any int-like pair (tuple/list of ints, numpy integers, integer
            tensors). softcap: > 0 applies cap * tanh(s / cap). alibi_slopes: (nheads,) or
            (batch, nheads) fp32. num_splits: split-KV factor, 0 = heuristic.
        return_softmax_lse: also return lse (batch, nheads, seqlen_q) fp32.
    Returns:
        out (batch, seqlen_q, nheads, head_dim) [, softmax_lse].
    """
    window_size = window_pair(window_size)
    if cache_seqlens is None:
        if block_table is not None or k is not None:
            raise ValueError("cache_seqlens is required with block_table or new k/v")
        cache_seqlens = k_cache.shape[1] if isinstance(k_cache, torch.Tensor) and k_cache.dim() == 4 else 0
    args = list(check_paged_inputs(q, k_cache, v_cache, cache_seqlens, block_table, cache_batch_idx,
                                   cache_leftpad, alibi_slopes, softmax_scale, causal, window_size, softcap,
                                   num_splits))
    _check_new_kv(q, k_cache, k, v, rotary_cos, rotary_sin)
    cache_seqlens = args[3]
    n_new = k.shape[1] if k is not None else 0
    capacity = block_table.shape[1] * k_cache.shape[1] if block_table is not None else k_cache.shape[1]
    if n_new > capacity:
        raise ValueError(f"k seqlen_new {n_new} exceeds the cache capacity {capacity}")
    local = causal or window_size != (-1, -1)
    if not (torch.compiler.is_compiling() or is_fake(q) or is_fake(cache_seqlens)
            or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())):
        check_paged_values(cache_seqlens, args[4], args[5], args[6], k_cache, n_new)
        if rotary_cos is not None and cache_seqlens.numel():
            need = int(cache_seqlens.max()) + max(n_new, q.shape[1] if local else 1)
            if need > rotary_cos.shape[0]:
                raise ValueError(f"rotary_cos/rotary_sin have {rotary_cos.shape[0]} positions but position "
                                 f"{need - 1} is needed (cache_seqlens + new tokens)")
    if n_new:
        args[3] = cache_seqlens + n_new
    q = args[0]
    if rotary_cos is not None:
        base = cache_seqlens.long().unsqueeze(1)
        ar_q = torch.arange(q.shape[1], device=q.device)
        pos_q = base + ar_q if local else base.expand(-1, q.shape[1])
        last = rotary_cos.shape[0] - 1  # clamped: unchecked (captured) calls must not index past the table
        q = apply_rotary(q, rotary_cos, rotary_sin, pos_q.clamp(0, last), rotary_interleaved)
        pos_k = (base + torch.arange(n_new, device=q.device)).clamp(0, last)
        k = apply_rotary(k, rotary_cos, rotary_sin, pos_k, rotary_interleaved)
    if n_new:
        kv_cache_append(k_cache, v_cache, k, v, cache_seqlens, block_table, cache_batch_idx)
    out, lse = paged_decode_op(q, *args[1:])
    return (out, lse) if return_softmax_lse else out
