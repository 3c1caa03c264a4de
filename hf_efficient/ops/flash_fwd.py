"""Flash attention forward (FlashAttention-2 algorithm) as Triton kernels, plus its launcher.

One program handles one block of ``BLOCK_M`` query rows of one (batch, head) pair and streams the
key/value blocks it can see through shared memory, keeping the softmax running max ``m`` and sum
``l`` in registers (online softmax, base-2 exponentials with ``log2(e)`` folded into the scale).
The key range of a query block is cut into three loops: masked blocks on the left edge of a
sliding window, blocks that need no mask at all, and masked blocks on the right edge (causal
diagonal, window, end of the sequence). Only the edge loops evaluate the mask.

The score modifiers (softcap, ALiBi, causal/window masks, dropout) live in small ``@triton.jit``
helpers shared with the backward kernels (``flash_bwd``) and with the kernel that materialises
the attention probabilities for tests (``attn_probs``), so the three always agree.

Layouts: padded ``q (B, Sq, H, D)``, ``k/v (B, Sk, Hk, D)``; variable length ``q (Tq, H, D)``,
``k/v (Tk, Hk, D)`` with ``cu_seqlens`` offsets; paged ``k/v (num_blocks, page, Hk, D)`` with a
``block_table (B, max_pages)``. ``lse`` is float32 ``(B, H, Sq)`` (padded) or ``(H, Tq)`` (varlen).
"""
from __future__ import annotations

import functools
import warnings

import torch
import triton
import triton.language as tl

from .. import tuning
from . import precompile
from ._common import interpreting, new_output

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def autotune_enabled() -> bool:
    """Autotuning is on by default on GPUs; the ``flash_autotune`` knob off (``HF_EFFICIENT_FLASH_AUTOTUNE=0``) uses
    fixed blocks."""
    return tuning.get().flash_autotune and not interpreting()


def _tma_allocator(size: int, alignment: int, stream):
    # Global scratch for device-side tensor descriptors.
    return torch.empty(size, dtype=torch.int8, device="cpu" if interpreting() else "cuda")


_allocator_set = False


def use_tma(*tensors) -> bool:
    """Load K/V through device-side TMA descriptors (Hopper+): the ``flash_tma`` knob (``HF_EFFICIENT_FLASH_TMA``).

    Needs 16-byte aligned base pointers and 16-byte multiple strides; falls back otherwise.
    """
    global _allocator_set
    if not tuning.get().flash_tma:
        return False
    if not interpreting():
        if not torch.cuda.is_available() or torch.cuda.get_device_capability(tensors[0].device)[0] < 9:
            return False
    for t in tensors:
        if t.data_ptr() % 16 != 0 or any(st % 8 != 0 for st in t.stride()[:-1]):
            return False
    if not _allocator_set:
        triton.set_allocator(_tma_allocator)
        _allocator_set = True
    return True


# ----------------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    # tanh(x) = 1 - 2 / (exp(2x) + 1); saturates correctly at +-inf.
    return 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)


@triton.jit
def score_mod(qk, i, j, diag, seqlen_k, qk_scale, cap_in, cap_out, slope2, win_left, win_right,
              MASKED: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Raw ``q.k`` products -> scores in the log2 domain, and tanh values for the softcap grad.

    ``i`` (query rows) and ``j`` (key columns) are index tensors that broadcast against ``qk``,
    so the same helper serves ``S`` (rows x cols) and ``S^T`` (cols x rows). Key ``j`` is visible
    to query ``i`` when ``i + diag - win_left <= j <= i + diag + win_right`` with
    ``diag = seqlen_k - seqlen_q`` (bottom-right alignment); causal is ``win_right = 0``.
    """
    if HAS_SOFTCAP:
        t = _tanh(qk * cap_in)
        s = t * cap_out
    else:
        t = qk
        s = qk * qk_scale
    if HAS_ALIBI:
        s = s - slope2 * tl.abs((i + diag - j).to(tl.float32))
    if MASKED:
        keep = j < seqlen_k
        if HAS_RIGHT:
            keep = keep & (j <= i + diag + win_right)
        if HAS_LEFT:
            keep = keep & (j >= i + diag - win_left)
        s = tl.where(keep, s, float("-inf"))
    return s, t


@triton.jit
def dropout_keep(seed, i, j, seqlen_k, dropout_p):
    """Keep-mask of dropout for query rows ``i`` and key columns ``j`` (broadcastable)."""
    return tl.rand(seed, i * seqlen_k + j) >= dropout_p


@triton.jit
def seq_bounds(pid_bh, nheads, group, CuQ, CuK, seqlen_q, seqlen_k, total_q, total_k,
               IS_VARLEN: tl.constexpr, PAGED: tl.constexpr):
    """(batch, head, kv head, first q token, first k token, seqlen_q, seqlen_k) of a program.

    Varlen: the rows come from cu_seqlens, clamped into the tensors (``total_q`` query rows, ``total_k`` key rows,
    or with ``PAGED`` the ``total_k`` keys a block-table row holds). The host check of cu_seqlens can be skipped
    (CUDA graphs, torch.compile, a cached check that missed an in-place change), so its contents are never
    trusted for addressing: out-of-range or decreasing offsets give a sequence clipped to the tensor (possibly
    empty) -- wrong numbers for bad input, never an access outside the tensors.
    """
    b = pid_bh // nheads
    h = pid_bh % nheads
    hk = h // group
    if IS_VARLEN:
        q_start = tl.minimum(tl.maximum(tl.load(CuQ + b), 0), total_q)
        seqlen_q = tl.minimum(tl.maximum(tl.load(CuQ + b + 1), q_start), total_q) - q_start
        if PAGED:
            k_start = q_start * 0
            seqlen_k = tl.minimum(tl.maximum(tl.load(CuK + b + 1) - tl.load(CuK + b), 0), total_k)
        else:
            k_start = tl.minimum(tl.maximum(tl.load(CuK + b), 0), total_k)
            seqlen_k = tl.minimum(tl.maximum(tl.load(CuK + b + 1), k_start), total_k) - k_start
    else:
        q_start = b * 0
        k_start = b * 0
    return b, h, hk, q_start, k_start, seqlen_q, seqlen_k


@triton.jit
def key_ranges(m0, diag, seqlen_k, win_left, win_right, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Key blocks seen by query rows ``[m0, m0 + BLOCK_M)``: ``lo <= full_lo <= full_hi <= hi``.

    ``[lo, full_lo)`` and ``[full_hi, hi)`` need masking; ``[full_lo, full_hi)`` needs none.
    ``lo``, ``full_lo`` and ``full_hi`` are multiples of ``BLOCK_N``.
    """
    lo = m0 * 0
    hi = seqlen_k + m0 * 0
    full_lo = lo
    full_hi = (seqlen_k // BLOCK_N) * BLOCK_N + m0 * 0
    if HAS_LEFT:
        lo = tl.maximum(m0 + diag - win_left, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
        first_full = tl.maximum(m0 + BLOCK_M - 1 + diag - win_left, 0)
        full_lo = ((first_full + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    if HAS_RIGHT:
        hi = tl.minimum(tl.maximum(m0 + BLOCK_M + diag + win_right, 0), seqlen_k)
        end_full = tl.maximum(m0 + diag + win_right + 1, 0)
        full_hi = tl.minimum(full_hi, (end_full // BLOCK_N) * BLOCK_N)
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(full_lo, hi)
    full_lo = tl.maximum(full_lo, lo)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def load_kv_tile(base, start_n, offs_n, offs_d, seqlen_k, stride_s, BT_row, stride_page, num_pages,
                 HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr,
                 PAGED: tl.constexpr, PAGE: tl.constexpr):
    """Rows ``start_n + offs_n`` of a K or V head as a ``(BLOCK_N, BLOCK_D)`` tile.

    Paged: a block id outside ``[0, num_pages)`` reads as zeros (the block table's contents are not checked on
    the device path), so no id makes the load leave the K/V pool. ``num_pages`` is unused otherwise.
    """
    cols = start_n + offs_n
    if PAGED:
        page = tl.load(BT_row + cols // PAGE, mask=cols < seqlen_k, other=0)
        page_ok = (page >= 0) & (page < num_pages) & (cols < seqlen_k)
        row = page.to(tl.int64) * stride_page + (cols % PAGE) * stride_s
        ptrs = base + row[:, None] + offs_d[None, :]
        if EVEN_D:
            tile = tl.load(ptrs, mask=page_ok[:, None], other=0.0)
        else:
            tile = tl.load(ptrs, mask=page_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        ptrs = base + tl.cast(start_n, tl.int64) * stride_s + offs_n[:, None] * stride_s + offs_d[None, :]
        if MASKED:
            if EVEN_D:
                tile = tl.load(ptrs, mask=cols[:, None] < seqlen_k, other=0.0)
            else:
                tile = tl.load(ptrs, mask=(cols[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        else:
            if EVEN_D:
                tile = tl.load(ptrs)
            else:
                tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return tile


# ----------------------------------------------------------------------------------------------
# Forward kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, K_head, V_head, lo, hi, offs_m, offs_n, offs_d, diag, seqlen_k,
               sks, svs, BT_row, stride_kpage, stride_vpage, num_pages, qk_scale, cap_in, cap_out, slope2,
               win_left, win_right, seed, dropout_p,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
               EVEN_D: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_DROPOUT: tl.constexpr,
               PAGED: tl.constexpr, PAGE: tl.constexpr, USE_TMA: tl.constexpr):
    PLAIN: tl.constexpr = not (MASKED or HAS_SOFTCAP or HAS_ALIBI)
    for start_n in range(lo, hi, BLOCK_N):
        if USE_TMA:
            k = K_head.load([start_n, 0])
        else:
            k = load_kv_tile(K_head, start_n, offs_n, offs_d, seqlen_k, sks, BT_row, stride_kpage, num_pages,
                             HEAD_DIM, MASKED, EVEN_D, PAGED, PAGE)
        qk = tl.dot(q, tl.trans(k))
        cols = start_n + offs_n
        if PLAIN:
            # No mask, no score modifier: fold the scale into one FMA before exp2.
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk * qk_scale - m_new[:, None])
        else:
            s, _t = score_mod(qk, offs_m[:, None], cols[None, :], diag, seqlen_k, qk_scale,
                              cap_in, cap_out, slope2, win_left, win_right, MASKED, HAS_SOFTCAP,
                              HAS_ALIBI, HAS_LEFT, HAS_RIGHT)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            if MASKED:
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            else:
                m_use = m_new
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, offs_m[:, None], cols[None, :], seqlen_k, dropout_p)
            p = tl.where(keep, p, 0.0)
        if USE_TMA:
            v = V_head.load([start_n, 0])
        else:
            v = load_kv_tile(V_head, start_n, offs_n, offs_d, seqlen_k, svs, BT_row, stride_vpage, num_pages,
                             HEAD_DIM, MASKED, EVEN_D, PAGED, PAGE)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(Q, K, V, Out, LSE, CuQ, CuK, Slopes, Seed, BlockTable,
                sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh, slb, slh,
                s_slope_b, s_bt_b, stride_kpage, stride_vpage,
                seqlen_q, seqlen_k, total_q, total_k, num_pages, nheads, group, sm_scale, cap_in, cap_out,
                dropout_p, win_left, win_right,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                HAS_ALIBI: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                HAS_DROPOUT: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr,
                USE_TMA: tl.constexpr):
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    # Heaviest query blocks first (they see the most keys under a causal mask).
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h, hk, q_start, k_start, seqlen_q, seqlen_k = seq_bounds(
        pid_bh, nheads, group, CuQ, CuK, seqlen_q, seqlen_k, total_q, total_k, IS_VARLEN, PAGED)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    diag = seqlen_k - seqlen_q
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seqlen_q
    d_ok = offs_d < HEAD_DIM

    Q_head = Q + b.to(tl.int64) * sqb + h * sqh + q_start.to(tl.int64) * sqs
    q_ptrs = Q_head + offs_m[:, None] * sqs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if PAGED:
        K_head = K + hk * skh
        V_head = V + hk * svh
        BT_row = BlockTable + b.to(tl.int64) * s_bt_b
    else:
        K_head = K + b.to(tl.int64) * skb + hk * skh + k_start.to(tl.int64) * sks
        V_head = V + b.to(tl.int64) * svb + hk * svh + k_start.to(tl.int64) * svs
        BT_row = BlockTable
        if USE_TMA:
            # Device-side TMA descriptors bounded by this sequence: rows past seqlen_k and
            # columns past HEAD_DIM read as zeros.
            K_head = tl.make_tensor_descriptor(K_head, shape=[seqlen_k, HEAD_DIM], strides=[sks, 1],
                                               block_shape=[BLOCK_N, BLOCK_D])
            V_head = tl.make_tensor_descriptor(V_head, shape=[seqlen_k, HEAD_DIM], strides=[svs, 1],
                                               block_shape=[BLOCK_N, BLOCK_D])

    qk_scale = sm_scale * 1.4426950408889634
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(Slopes + b * s_slope_b + h) * 1.4426950408889634
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed) + pid_bh

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    lo, full_lo, full_hi, hi = key_ranges(m0, diag, seqlen_k, win_left, win_right, BLOCK_M,
                                          BLOCK_N, HAS_LEFT, HAS_RIGHT)
    if HAS_LEFT:
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K_head, V_head, lo, full_lo, offs_m, offs_n,
                                   offs_d, diag, seqlen_k, sks, svs, BT_row, stride_kpage,
                                   stride_vpage, num_pages, qk_scale, cap_in, cap_out, slope2, win_left,
                                   win_right, seed, dropout_p, HEAD_DIM, BLOCK_N, True, EVEN_D,
                                   HAS_SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, HAS_DROPOUT,
                                   PAGED, PAGE, USE_TMA)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K_head, V_head, full_lo, full_hi, offs_m, offs_n,
                               offs_d, diag, seqlen_k, sks, svs, BT_row, stride_kpage,
                               stride_vpage, num_pages, qk_scale, cap_in, cap_out, slope2, win_left,
                               win_right, seed, dropout_p, HEAD_DIM, BLOCK_N, False, EVEN_D,
                               HAS_SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, HAS_DROPOUT,
                               PAGED, PAGE, USE_TMA)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K_head, V_head, full_hi, hi, offs_m, offs_n,
                               offs_d, diag, seqlen_k, sks, svs, BT_row, stride_kpage,
                               stride_vpage, num_pages, qk_scale, cap_in, cap_out, slope2, win_left,
                               win_right, seed, dropout_p, HEAD_DIM, BLOCK_N, True, EVEN_D,
                               HAS_SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, HAS_DROPOUT,
                               PAGED, PAGE, USE_TMA)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if HAS_DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    O_head = Out + b.to(tl.int64) * sob + h * soh + q_start.to(tl.int64) * sos
    o_ptrs = O_head + offs_m[:, None] * sos + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    lse_ptrs = LSE + b.to(tl.int64) * slb + h.to(tl.int64) * slh + q_start + offs_m
    tl.store(lse_ptrs, lse, mask=row_ok)


# ----------------------------------------------------------------------------------------------
# Attention probabilities (testing aid, flash-attn's S_dmask)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _probs_kernel(Q, K, LSE, P, CuQ, CuK, Slopes, Seed,
                  sqb, sqs, sqh, skb, sks, skh, slb, slh, spb, sph, sps, s_slope_b,
                  seqlen_q, seqlen_k, total_q, total_k, nheads, group, sm_scale, cap_in, cap_out, dropout_p,
                  win_left, win_right,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                  HAS_ALIBI: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                  HAS_DROPOUT: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b, h, hk, q_start, k_start, seqlen_q, seqlen_k = seq_bounds(
        pid_bh, nheads, group, CuQ, CuK, seqlen_q, seqlen_k, total_q, total_k, IS_VARLEN, False)
    m0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    if (m0 >= seqlen_q) | (n0 >= seqlen_k):
        return
    diag = seqlen_k - seqlen_q
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seqlen_q
    d_ok = offs_d < HEAD_DIM
    Q_head = Q + b.to(tl.int64) * sqb + h * sqh + q_start.to(tl.int64) * sqs
    q = tl.load(Q_head + offs_m[:, None] * sqs + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    K_head = K + b.to(tl.int64) * skb + hk * skh + k_start.to(tl.int64) * sks
    k = load_kv_tile(K_head, n0, offs_n, offs_d, seqlen_k, sks, K_head, 0, 0, HEAD_DIM, True,
                     False, False, 1)
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(Slopes + b * s_slope_b + h) * 1.4426950408889634
    cols = n0 + offs_n
    s, _t = score_mod(tl.dot(q, tl.trans(k)), offs_m[:, None], cols[None, :], diag, seqlen_k,
                      sm_scale * 1.4426950408889634, cap_in, cap_out, slope2, win_left, win_right,
                      True, HAS_SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT)
    lse = tl.load(LSE + b.to(tl.int64) * slb + h.to(tl.int64) * slh + q_start + offs_m,
                  mask=row_ok, other=float("inf"))
    p = tl.exp2(s - lse[:, None] * 1.4426950408889634)
    if HAS_DROPOUT:
        keep = dropout_keep(tl.load(Seed) + pid_bh, offs_m[:, None], cols[None, :], seqlen_k,
                            dropout_p)
        p = tl.where(keep, p, -p)
    p_ptrs = P + b.to(tl.int64) * spb + h.to(tl.int64) * sph + offs_m[:, None] * sps + cols[None, :]
    tl.store(p_ptrs, p, mask=row_ok[:, None] & (cols[None, :] < seqlen_k))


@triton.jit
def _fill_uncovered_kernel(X, Cu, batch, total, C, stride_t, stride_c, value,
                           BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Write ``value`` into the rows ``t`` of X (t < Cu[0] or t >= Cu[batch]) no sequence owns."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    first = tl.load(Cu)
    last = tl.load(Cu + batch)
    uncovered = ((offs_t < first) | (offs_t >= last)) & (offs_t < total)
    if tl.max(uncovered.to(tl.int32), 0) == 0:
        return
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        ptrs = X + offs_t.to(tl.int64)[:, None] * stride_t + offs_c[None, :].to(tl.int64) * stride_c
        vals = tl.full([BLOCK_T, BLOCK_C], value, dtype=tl.float32)
        tl.store(ptrs, vals.to(X.dtype.element_ty), mask=uncovered[:, None] & (offs_c[None, :] < C))


def fill_uncovered(x: torch.Tensor, cu_seqlens: torch.Tensor, token_dim: int, value: float) -> None:
    """In place: rows of ``x`` along ``token_dim`` outside ``[cu[0], cu[-1])`` get ``value``.

    Varlen tensors may hold tokens that belong to no sequence (padding after ``cu[-1]``, e.g. for
    static shapes under CUDA graphs); their outputs and gradients are defined as 0 (lse ``+inf``).
    Runs on the device without a host sync. ``x`` is (T, ...) contiguous or (H, T) for lse.
    """
    total = x.shape[token_dim]
    if total == 0 or x.numel() == 0:
        return
    if token_dim == 0:
        cols, stride_t, stride_c = x.numel() // total, x.stride(0), 1
    else:
        cols, stride_t, stride_c = x.shape[0], x.stride(1), x.stride(0)
    block_t = 16 if interpreting() else 64
    block_c = 64 if interpreting() else 256
    grid = (triton.cdiv(total, block_t),)
    precompile.run(_fill_uncovered_kernel, grid, x, cu_seqlens, cu_seqlens.shape[0] - 1, total, cols, stride_t,
                   stride_c, float(value), BLOCK_T=block_t, BLOCK_C=block_c)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def tune_bench(fn, quantiles=None):
    """Short timing for autotuning (the defaults spend ~125 ms per config)."""
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per head-dim class; the first is the untuned default.
# Chosen from a wider search on an H100 (bf16, 16k tokens, S = 512 ... 16k): small tiles win at
# short sequences (more programs), 128x128 with 8 warps at long ones.
FWD_SHAPES = {
    64: [(128, 64, 4, 3), (64, 64, 4, 4), (128, 64, 4, 4)],
    128: [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
    256: [(64, 64, 4, 2), (128, 32, 8, 2), (128, 64, 8, 2)],
}
# Wider search (the ``flash_tune_wide`` knob), used to choose the lists above.
FWD_SHAPES_WIDE = {
    64: FWD_SHAPES[64] + [(128, 128, 8, 3), (128, 128, 4, 3), (128, 128, 8, 2)],
    128: FWD_SHAPES[128] + [(128, 64, 4, 3), (128, 128, 8, 2), (128, 64, 8, 4)],
    256: FWD_SHAPES[256],
}


def shape_class(block_d: int) -> int:
    return 64 if block_d <= 64 else (128 if block_d <= 128 else 256)


def make_configs(*tables):
    shapes = []
    for table in tables:
        for lst in table.values():
            shapes.extend(x for x in lst if x not in shapes)
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
            for bm, bn, w, st in shapes]


def make_pruner(table, wide_table):
    """Autotune pruner keeping the configs listed for the call's head-dim class."""
    def prune(configs, named_args=None, **kwargs):
        named_args = named_args or {}
        bd = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 128))
        keep = (wide_table if tuning.get().flash_tune_wide else table)[shape_class(bd)]
        out = [c for c in configs
               if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in keep]
        return out or configs[:1]
    return prune


def make_heuristic(table):
    """Fixed launch config when autotuning is off (interpreter: smallest tiles tl.dot accepts)."""
    def pick(head_dim):
        if interpreting():
            return {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
        bm, bn, w, st = table[shape_class(block_d(head_dim))][0]
        return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st}
    return pick


_fwd_kernel_tuned = triton.autotune(
    configs=make_configs(FWD_SHAPES, FWD_SHAPES_WIDE),
    key=["HEAD_DIM", "IS_VARLEN", "HAS_LEFT", "HAS_RIGHT", "HAS_SOFTCAP", "HAS_ALIBI",
         "HAS_DROPOUT", "PAGED", "USE_TMA", "seqlen_q", "seqlen_k"],
    do_bench=tune_bench,
    prune_configs_by={"early_config_prune": make_pruner(FWD_SHAPES, FWD_SHAPES_WIDE)},
)(_fwd_kernel)
fwd_heuristic = make_heuristic(FWD_SHAPES)


_best_configs: dict = {}


def _seqlen_class(n: int) -> int:
    """Autotuning class of a sequence length: the next power of two (at least 16).

    Tuning once per class instead of once per length matters for packed (varlen) training,
    where every batch brings a new ``max_seqlen``.
    """
    return 16 if n <= 16 else 1 << (int(n) - 1).bit_length()


def _call(tuned, plain, grid_fn, args, consts, head_dim, heuristic, key):
    """Launch ``plain`` with the autotuned config for ``key`` (tuning on first sight).

    ``key`` should hold length classes (``_seqlen_class``), not raw lengths: the autotuner runs
    once per class. After that first call the autotuner is bypassed: its per-call bookkeeping
    over ~50 arguments costs more host time than a short kernel runs.
    """
    if not autotune_enabled():
        cfg = heuristic(head_dim)
        launch(plain, grid_fn(cfg), args, consts, cfg)
        return
    full_key = (id(tuned), tuple(consts.items()), key)
    cfg = _best_configs.get(full_key)
    if cfg is None and precompile.active():  # dry pass: compile every config the autotuner will time
        prune = getattr(tuned, "early_config_prune", None)
        configs = prune(tuned.configs, **consts) if prune is not None else tuned.configs
        for c in configs:
            kw = c.all_kwargs()
            precompile.warmup(plain, grid_fn(kw), args, {**consts, **kw})
        return
    if cfg is None:
        tuned[grid_fn](*args, **consts)
        _best_configs[full_key] = tuned.best_config.all_kwargs()
    else:
        launch(plain, grid_fn(cfg), args, consts, cfg)


_compiled: dict = {}  # launch signature -> (compiled kernel, constexpr values in signature order)
_COMPILED_MAX = 2048
_leading_pointers: dict = {}
DIRECT_LAUNCHES = {"hits": 0, "misses": 0}
_direct_failed = False


def direct_launch_enabled() -> bool:
    """Repeated launches go straight to the compiled kernel (the ``direct_launch`` knob off:
    ``HF_EFFICIENT_DIRECT_LAUNCH=0``)."""
    return not _direct_failed and tuning.get().direct_launch and not interpreting()


def launch(plain, grid, args, consts, cfg) -> None:
    """``plain[grid](*args, **consts, **cfg)``, with the JIT's per-call work skipped on repeats.

    Triton's launcher binds and specialises ~50 arguments per call (several microseconds of
    host time, as much as a short attention kernel runs). The kernel it returns is kept under
    everything its specialisation depends on: constexprs and options, every scalar argument
    (integers specialise on value), the pointers' dtypes and 16-byte alignment, and the device;
    the next call with the same signature launches that kernel directly. Pointer arguments must
    come first in ``args``. A failure of the direct path disables it with one warning.
    """
    global _direct_failed
    if precompile.active():
        precompile.warmup(plain, grid, args, {**consts, **cfg})
        return
    if not direct_launch_enabled():
        plain[grid](*args, **consts, **cfg)
        return
    n = _leading_pointers.get(plain)
    if n is None:
        n = next((i for i, a in enumerate(args) if not isinstance(a, torch.Tensor)), len(args))
        _leading_pointers[plain] = n
    ptrs = args[:n]
    key = (plain, tuple(consts.items()), tuple(cfg.items()), args[n:],
           tuple(t.dtype for t in ptrs), tuple(t.data_ptr() % 16 == 0 for t in ptrs),
           torch.cuda.current_device())
    hit = _compiled.get(key)
    if hit is not None:
        kernel, run, function, metadata, extra = hit
        try:
            if _hooks_off():
                # what CompiledKernel[grid](...) does, minus its per-call closure and hook lookups
                run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
                    torch._C._cuda_getCurrentRawStream(key[-1]), function, metadata, None, None, None,
                    *args, *extra)
            else:  # a profiler's launch hooks are installed: let Triton call them
                kernel[(*grid, 1, 1)[:3]](*args, *extra)
            DIRECT_LAUNCHES["hits"] += 1
            return
        except Exception as e:  # a Triton version whose compiled-kernel launcher differs
            _direct_failed = True
            warnings.warn(f"hf_efficient: direct kernel launch failed ({type(e).__name__}: {e}); "
                          "using Triton's regular launcher from now on", RuntimeWarning, stacklevel=2)
    kernel = plain[grid](*args, **consts, **cfg)
    DIRECT_LAUNCHES["misses"] += 1
    if kernel is not None and all(hasattr(kernel, a) for a in ("run", "function", "packed_metadata")):
        merged = {**consts, **cfg}
        names = plain.arg_names[len(args):]
        if all(name in merged for name in names):
            if len(_compiled) >= _COMPILED_MAX:
                _compiled.clear()
            _compiled[key] = (kernel, kernel.run, kernel.function, kernel.packed_metadata,
                              tuple(merged[name] for name in names))


def _hooks_off() -> bool:
    """No launch hook is installed (None, or an empty hook chain in newer Triton versions)."""
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if runtime is None:
        return False
    return all(h is None or getattr(h, "calls", None) == []
               for h in (runtime.launch_enter_hook, runtime.launch_exit_hook))


def _window_consts(causal: bool, window_size) -> tuple[int, int, bool, bool]:
    left, right = int(window_size[0]), int(window_size[1])
    if causal:
        right = 0
    return max(left, 0), max(right, 0), left >= 0, right >= 0


def _common(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_size,
            softcap, alibi_slopes, dropout_p):
    varlen = cu_seqlens_q is not None
    if varlen:
        batch = cu_seqlens_q.shape[0] - 1
        nheads, head_dim = q.shape[1], q.shape[2]
        nheads_k = k.shape[-2]
    else:
        batch, _, nheads, head_dim = q.shape
        nheads_k = k.shape[2]
    s_slope_b = alibi_slopes.stride(0) if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0
    consts, scalars = score_args(head_dim, varlen, causal, tuple(window_size), float(softcap),
                                 alibi_slopes is not None, float(softmax_scale), float(dropout_p))
    return batch, nheads, nheads_k, head_dim, consts, scalars, s_slope_b


def score_args(head_dim, varlen, causal, window_size, softcap, has_alibi, softmax_scale, dropout_p):
    """Constexprs and trailing scalar arguments shared by the forward, backward and probability kernels.

    Returns ``(consts, scalars)``; ``scalars`` is (sm_scale, cap_in, cap_out, dropout_p, win_left,
    win_right) in the kernels' argument order.
    """
    left, right, has_left, has_right = _window_consts(causal, window_size)
    has_softcap = softcap > 0.0
    consts = dict(HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), IS_VARLEN=varlen,
                  HAS_SOFTCAP=has_softcap, HAS_ALIBI=has_alibi, HAS_LEFT=has_left,
                  HAS_RIGHT=has_right, HAS_DROPOUT=dropout_p > 0.0)
    scalars = (float(softmax_scale), float(softmax_scale / softcap) if has_softcap else 0.0,
               float(softcap * LOG2E) if has_softcap else 0.0, float(dropout_p), left, right)
    return consts, scalars


def bsh(stride, varlen) -> tuple[int, int, int]:
    """(batch, seq, head) strides from the strides of a (B, S, H, D) or (T, H, D) tensor."""
    return (0, stride[0], stride[1]) if varlen else (stride[0], stride[1], stride[2])


def _lse_strides(lse_stride, varlen):
    return (0, lse_stride[0]) if varlen else (lse_stride[0], lse_stride[1])


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))


@functools.lru_cache(maxsize=1024)
def _fwd_plan(varlen, paged, q_shape, q_stride, k_shape, k_stride, v_stride, bt_stride, bt_cols, alibi_stride,
              max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_size, softcap, dropout_p):
    """Everything the forward launch derives from metadata alone, cached per argument signature.

    Returns ``(lse_shape, ints, consts, programs, rows, tune_key)``: the launch's non-tensor
    arguments after the ten pointers, its constexprs (without ``USE_TMA``, which also depends on
    pointer alignment), the grid's second axis, the query rows its first axis tiles, and the
    autotuning key. Repeated calls with the same shapes then skip this Python work.
    """
    head_dim = q_shape[-1]
    nheads, nheads_k = q_shape[-2], k_shape[-2]
    consts, scalars = score_args(head_dim, varlen, causal, window_size, softcap, alibi_stride is not None,
                                 softmax_scale, dropout_p)
    consts.update(PAGED=paged, PAGE=k_shape[1] if paged else 1)
    if varlen:
        seqlen_q, seqlen_k = max_seqlen_q, max_seqlen_k
        lse_shape = (nheads, q_shape[0])
    else:
        seqlen_q, seqlen_k = q_shape[1], k_shape[1]
        lse_shape = (q_shape[0], nheads, seqlen_q)
    if paged:
        sk, sv = (0, *k_stride[1:3]), (0, *v_stride[1:3])
        pages = (bt_stride, k_stride[0], v_stride[0])
        # device-side bounds: query rows, keys a block-table row holds, pool size
        bounds = (q_shape[0], bt_cols * k_shape[1], k_shape[0])
    else:
        sk, sv = bsh(k_stride, varlen), bsh(v_stride, varlen)
        pages = (0, 0, 0)
        bounds = (q_shape[0], k_shape[0], 0) if varlen else (0, 0, 0)
    s_slope_b = alibi_stride[0] if alibi_stride is not None and len(alibi_stride) == 2 else 0
    ints = (*bsh(q_stride, varlen), *sk, *sv, *bsh(_contiguous_strides(q_shape), varlen),
            *_lse_strides(_contiguous_strides(lse_shape), varlen), s_slope_b, *pages, seqlen_q, seqlen_k,
            *bounds, nheads, nheads // nheads_k, *scalars)
    tune_key = (_seqlen_class(seqlen_q), _seqlen_class(seqlen_k))
    return lse_shape, ints, consts, nheads, max(seqlen_q, 0), tune_key


def flash_fwd(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0, *,
              softmax_scale, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
              dropout_p=0.0, rng_seed=None, block_table=None, fill=True):
    """Launch the forward kernel on already validated inputs.

    q: (B, Sq, H, D) or (Tq, H, D) fp16/bf16; k, v: (B, Sk, Hk, D), (Tk, Hk, D) or, with
    ``block_table`` (B, max_pages) int32, (num_pages, page, Hk, D).
    cu_seqlens_q/k: (B + 1,) int32 or None. rng_seed: int64 (1,) on q's device when dropout_p > 0.
    fill: write 0 / +inf into varlen rows outside ``[cu_seqlens_q[0], cu_seqlens_q[-1])``
    (pass False only when the caller knows the sequences cover every token).
    Returns ``out`` like q and float32 ``lse`` (B, H, Sq) or (H, Tq).
    """
    varlen = cu_seqlens_q is not None
    paged = block_table is not None
    lse_shape, ints, consts, nheads, rows, tune_key = _fwd_plan(
        varlen, paged, q.shape, q.stride(), k.shape, k.stride(), v.stride(),
        block_table.stride(0) if paged else 0, block_table.shape[1] if paged else 0,
        alibi_slopes.stride() if alibi_slopes is not None else None,
        int(max_seqlen_q) if varlen else 0, int(max_seqlen_k) if varlen else 0,
        float(softmax_scale), bool(causal), tuple(window_size), float(softcap), float(dropout_p))
    batch = cu_seqlens_q.shape[0] - 1 if varlen else q.shape[0]
    lse = new_output(lse_shape, torch.float32, q.device)
    out = new_output(q.shape, q.dtype, q.device)
    dummy = q  # stands in for absent optional pointers; never dereferenced
    args = (q, k, v, out, lse,
            cu_seqlens_q if varlen else dummy, cu_seqlens_k if varlen else dummy,
            alibi_slopes if alibi_slopes is not None else dummy,
            rng_seed if rng_seed is not None else dummy,
            block_table if paged else dummy, *ints)
    if batch * nheads > 0 and rows > 0:
        if not paged and use_tma(k, v):
            consts = dict(consts, USE_TMA=True)
        else:
            consts = dict(consts, USE_TMA=False)
        _call(_fwd_kernel_tuned, _fwd_kernel,
              lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), batch * nheads),
              args, consts, consts["HEAD_DIM"], fwd_heuristic, (*tune_key, q.dtype))
    if varlen and fill:
        fill_uncovered(out, cu_seqlens_q, 0, 0.0)
        fill_uncovered(lse, cu_seqlens_q, 1, float("inf"))
    return out, lse


def attn_probs(q, k, lse, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0, *,
               softmax_scale, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
               dropout_p=0.0, rng_seed=None) -> torch.Tensor:
    """Materialise softmax probabilities, float32 (B, H, max_seqlen_q, max_seqlen_k).

    Entries that dropout zeroes are returned negated (flash-attn's ``S_dmask`` sign convention),
    so ``probs >= 0`` is the keep-mask; positions outside a sequence stay 0. For tests only:
    this is quadratic in memory.
    """
    varlen = cu_seqlens_q is not None
    batch, nheads, nheads_k, head_dim, consts, scalars, s_slope_b = _common(
        q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_size,
        softcap, alibi_slopes, dropout_p)
    if not varlen:
        max_seqlen_q, max_seqlen_k = q.shape[1], k.shape[1]
    probs = torch.zeros((batch, nheads, max_seqlen_q, max_seqlen_k), dtype=torch.float32,
                        device=q.device)
    if probs.numel() == 0:
        return probs
    dummy = q
    sqb, sqs, sqh = bsh(q.stride(), varlen)
    skb, sks, skh = bsh(k.stride(), varlen)
    slb, slh = _lse_strides(lse.stride(), varlen)
    bm = 16 if interpreting() else 64
    grid = (triton.cdiv(max_seqlen_q, bm), triton.cdiv(max_seqlen_k, bm), batch * nheads)
    _probs_kernel[grid](
        q, k, lse, probs, cu_seqlens_q if varlen else dummy, cu_seqlens_k if varlen else dummy,
        alibi_slopes if alibi_slopes is not None else dummy,
        rng_seed if rng_seed is not None else dummy,
        sqb, sqs, sqh, skb, sks, skh, slb, slh, probs.stride(0), probs.stride(1),
        probs.stride(2), s_slope_b, max_seqlen_q, max_seqlen_k, q.shape[0] if varlen else 0,
        k.shape[0] if varlen else 0, nheads, nheads // nheads_k,
        *scalars, BLOCK_M=bm, BLOCK_N=bm, **consts)
    return probs
