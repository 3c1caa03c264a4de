"""Triton fallback for paged decode attention (same op and semantics as the CUDA kernel).

Used when the CUDA extension cannot be built (no nvcc, JIT disabled, build failed) and for
q_len > 16 (prefill over a paged cache). One program serves one (sequence, kv head, row chunk,
split): the query rows of all heads of the kv head and of all new tokens, so K/V tiles are loaded
once per program. Split-KV partials (fp32 out, log2-domain LSE) are merged with a few torch ops.
Runs on CPU under ``TRITON_INTERPRET=1`` (fp16 only there: the interpreter mishandles bf16 math).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import new_output

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _paged_decode_kernel(
    Q, K, V, SEQLENS, BT, BIDX, LEFTPAD, ALIBI, OUT, LSE, OP, LP,
    sq_b, sq_t, sq_h, sk_p, sk_t, sk_h, sv_p, sv_t, sv_h, s_bt, s_al,
    batch, q_len, nheads, G, D, block_size, num_pages, cache_len, num_splits, n_chunks, rows_per_chunk,
    scale_log2, softcap_log2, softcap_inv, window_left, window_right,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PAGED: tl.constexpr,
    HAS_BIDX: tl.constexpr, HAS_LEFTPAD: tl.constexpr, HAS_ALIBI: tl.constexpr,
    SOFTCAP: tl.constexpr, SPLIT: tl.constexpr,
):
    split = tl.program_id(0)
    hk = tl.program_id(1) // n_chunks
    chunk = tl.program_id(1) % n_chunks
    b = tl.program_id(2)

    row0 = chunk * rows_per_chunk
    nrows = tl.minimum(rows_per_chunk, q_len * G - row0)
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < nrows
    gr = row0 + tl.minimum(rows, nrows - 1)
    t = gr // G
    hq = hk * G + gr % G
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D

    q = tl.load(Q + b * sq_b + t[:, None] * sq_t + hq[:, None] * sq_h + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    L = tl.load(SEQLENS + b)
    # Memory safety (no host check under CUDA graphs): keys at positions >= cache_len (beyond the block table
    # or the contiguous cache) are not attended to, a negative left pad counts as 0, and keys whose page id
    # (or cache row) lies outside [0, num_pages) read as zero K and V. The CUDA kernel does the same.
    L_kv = tl.minimum(L, cache_len)
    if HAS_LEFTPAD:
        start = tl.maximum(tl.load(LEFTPAD + b), 0)
    else:
        start = L * 0
    qpos = L - q_len + t
    qpos_lo = L - q_len + row0 // G
    qpos_hi = L - q_len + (row0 + nrows - 1) // G
    lo = tl.where(window_left >= 0, tl.maximum(start, qpos_lo - window_left), start)
    hi = tl.where(window_right >= 0, tl.minimum(L_kv, qpos_hi + window_right + 1), L_kv)
    ntiles = (tl.maximum(hi - lo, 0) + BLOCK_N - 1) // BLOCK_N
    tps = (ntiles + num_splits - 1) // num_splits
    tile_begin = split * tps
    tile_end = tl.minimum(ntiles, tile_begin + tps)

    if HAS_BIDX:
        page_const = tl.load(BIDX + b)
    else:
        page_const = b
    if HAS_ALIBI:
        slope = tl.load(ALIBI + b * s_al + hq) * 1.4426950408889634
    else:
        slope = tl.zeros([BLOCK_M], dtype=tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    cols = tl.arange(0, BLOCK_N)
    for tile in range(tile_begin, tile_end):
        pos = lo + tile * BLOCK_N + cols
        pos_ok = pos < hi
        if PAGED:
            page = tl.load(BT + b.to(tl.int64) * s_bt + pos // block_size, mask=pos_ok, other=0).to(tl.int64)
            off = pos % block_size
            page_ok = (page >= 0) & (page < num_pages)
        else:
            page = tl.zeros([BLOCK_N], dtype=tl.int64) + page_const
            off = pos
            page_ok = (page >= 0) & (page < num_pages)
        kv_mask = (pos_ok & page_ok)[:, None] & d_ok[None, :]
        k = tl.load(K + page[:, None] * sk_p + off[:, None] * sk_t + hk * sk_h + d[None, :],
                    mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k))
        if SOFTCAP:
            x = s * softcap_inv
            s = softcap_log2 * (1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0))  # cap * tanh(x), log2 units
        else:
            s = s * scale_log2
        if HAS_ALIBI:
            s -= slope[:, None] * tl.abs((qpos[:, None] - pos[None, :]).to(tl.float32))
        valid = pos_ok[None, :] & (pos[None, :] >= start) & (pos[None, :] < L_kv)
        valid &= (window_left < 0) | (pos[None, :] >= qpos[:, None] - window_left)
        valid &= (window_right < 0) | (pos[None, :] <= qpos[:, None] + window_right)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + page[:, None] * sv_p + off[:, None] * sv_t + hk * sv_h + d[None, :],
                    mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse2 = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    orow = (b * q_len + t) * nheads + hq
    o_mask = row_ok[:, None] & d_ok[None, :]
    if SPLIT:
        prow = split * batch * q_len * nheads + orow
        tl.store(OP + prow[:, None] * D + d[None, :], out, mask=o_mask)
        tl.store(LP + prow, lse2, mask=row_ok)
    else:
        tl.store(OUT + orow[:, None] * D + d[None, :], out.to(OUT.dtype.element_ty), mask=o_mask)
        tl.store(LSE + (b * nheads + hq) * q_len + t, lse2 * 0.6931471805599453, mask=row_ok)


def combine_splits(out_partial: torch.Tensor, lse_partial: torch.Tensor, dtype: torch.dtype):
    """Merge split-KV partials by LSE.

    out_partial: (splits, batch, q_len, nheads, head_dim) fp32, each split normalised.
    lse_partial: (splits, batch, q_len, nheads) fp32, log2 domain, -inf for empty splits.
    Returns out (batch, q_len, nheads, head_dim) in ``dtype`` and lse (batch, nheads, q_len) fp32
    (natural log, -inf for rows that saw no key).
    """
    mx = lse_partial.amax(0)
    mx_safe = torch.where(torch.isinf(mx), torch.zeros_like(mx), mx)
    w = torch.exp2(lse_partial - mx_safe)
    wsum = w.sum(0)
    out = (w.unsqueeze(-1) * out_partial).sum(0) / torch.where(wsum > 0, wsum, 1.0).unsqueeze(-1)
    lse = torch.where(wsum > 0, (mx_safe + torch.log2(torch.where(wsum > 0, wsum, 1.0))) * LN2, -math.inf)
    return out.to(dtype), lse.permute(0, 2, 1).contiguous()


def paged_decode_triton(q, k_cache, v_cache, cache_seqlens, block_table=None, cache_batch_idx=None,
                        cache_leftpad=None, alibi_slopes=None, softmax_scale=1.0, softcap=0.0,
                        window_left=-1, window_right=-1, num_splits=1):
    """Triton paged decode. Arguments as :func:`hf_efficient.ops.paged_decode.paged_decode`
    (already validated; window given as left/right, -1 unbounded; ``num_splits`` >= 1).

    Returns out (batch, q_len, nheads, head_dim) in q.dtype and lse (batch, nheads, q_len) fp32.
    """
    B, Tq, H, D = q.shape
    Hk = k_cache.shape[2]
    G = H // Hk
    rows = Tq * G
    cap = 64 if rows > 16 else 16
    n_chunks = triton.cdiv(rows, cap)
    rows_per_chunk = triton.cdiv(rows, n_chunks)
    block_m = max(16, triton.next_power_of_2(rows_per_chunk))
    block_d = max(16, triton.next_power_of_2(D))
    block_n = 64 if block_d <= 128 else 32
    paged = block_table is not None
    split = num_splits > 1
    dev = q.device
    out = new_output((B, Tq, H, D), q.dtype, dev)
    lse = new_output((B, H, Tq), torch.float32, dev)
    if split:
        op = new_output((num_splits, B, Tq, H, D), torch.float32, dev)
        lp = new_output((num_splits, B, Tq, H), torch.float32, dev)
    else:
        op, lp = out, lse  # unused
    dummy = cache_seqlens
    use_softcap = softcap > 0
    grid = (num_splits, Hk * n_chunks, B)
    _paged_decode_kernel[grid](
        q, k_cache, v_cache, cache_seqlens,
        block_table if paged else dummy,
        cache_batch_idx if cache_batch_idx is not None else dummy,
        cache_leftpad if cache_leftpad is not None else dummy,
        alibi_slopes if alibi_slopes is not None else dummy,
        out, lse, op, lp,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_table.stride(0) if paged else 0,
        alibi_slopes.stride(0) if (alibi_slopes is not None and alibi_slopes.dim() == 2) else 0,
        B, Tq, H, G, D, k_cache.shape[1] if paged else 1, k_cache.shape[0],
        min(block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1], 2**31 - 1),
        num_splits, n_chunks, rows_per_chunk,
        softmax_scale * LOG2E, softcap * LOG2E, (softmax_scale / softcap) if use_softcap else 0.0,
        window_left, window_right,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PAGED=paged,
        HAS_BIDX=cache_batch_idx is not None, HAS_LEFTPAD=cache_leftpad is not None,
        HAS_ALIBI=alibi_slopes is not None, SOFTCAP=use_softcap, SPLIT=split,
        num_warps=4,
    )
    if split:
        return combine_splits(op, lp, q.dtype)
    return out, lse
