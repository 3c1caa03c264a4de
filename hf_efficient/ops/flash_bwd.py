"""Flash attention backward (FlashAttention-2 algorithm) as Triton kernels, plus its launcher.

Every kernel recomputes the probabilities ``P`` from ``q``, ``k`` and the forward's ``lse``.
Default ("split", atomic-free, bitwise reproducible), two launches:

1. ``_bwd_dq_kernel``: one program per (query block, batch, head) first computes
   ``delta_i = sum_d dO_id * O_id`` (float32, laid out like ``lse``; stored for step 2), then
   accumulates ``dQ_i = sum_j dS_ij K_j`` in registers over the key blocks it sees.
2. ``_bwd_dkdv_kernel``: one program per (key block, batch, kv head) holds ``K_j``/``V_j`` and
   accumulates ``dV_j = sum_i P_ij^T dO_i`` and ``dK_j = sum_i dS_ij^T Q_i`` over the query
   blocks that see it, for every query head of its GQA group (no atomics).

The split recomputes ``QK^T`` and ``dO V^T`` in the dQ kernel (7 matmuls instead of 5) and is the
default because it measured faster (docs/benchmarks/NOTES.md) than the alternative ("atomic", the
``flash_bwd`` knob): ``_bwd_preprocess`` for delta, then the dK/dV kernel also adds ``dS_ij K_j``
into a float32 dQ buffer with atomics (not bit-reproducible).

``dS = P * (dP - delta)`` with ``dP = dO V^T`` (dropout-masked and rescaled when dropout is on),
times ``1 - tanh^2`` under softcap. Masks, softcap, ALiBi and dropout come from the same helpers
as the forward kernel (``flash_fwd.score_mod``, ``flash_fwd.dropout_keep``).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import tuning
from ._common import interpreting, new_output
from .flash_fwd import (
    _call,
    _contiguous_strides,
    _lse_strides,
    _seqlen_class,
    bsh,
    dropout_keep,
    fill_uncovered,
    key_ranges,
    load_kv_tile,
    make_configs,
    make_heuristic,
    make_pruner,
    score_args,
    score_mod,
    seq_bounds,
    tune_bench,
)


@triton.jit
def _bwd_preprocess(Out, DO, Delta, CuQ, sob, sos, soh, sdb, sds, sdh, slb, slh, seqlen_q, total_q, nheads,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    IS_VARLEN: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h, _hk, q_start, _ks, seqlen_q, _sk = seq_bounds(pid_bh, nheads, 1, CuQ, CuQ, seqlen_q, 0, total_q,
                                                        total_q, IS_VARLEN, False)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    if pid_m * BLOCK_M >= seqlen_q:
        return
    mask = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    rows = q_start.to(tl.int64) + offs_m
    o = tl.load(Out + b.to(tl.int64) * sob + h * soh + rows[:, None] * sos + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b.to(tl.int64) * sdb + h * sdh + rows[:, None] * sds + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    tl.store(Delta + b.to(tl.int64) * slb + h.to(tl.int64) * slh + rows, delta,
             mask=offs_m < seqlen_q)


@triton.jit
def query_ranges(n0, diag, seqlen_q, seqlen_k, win_left, win_right, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Query blocks that see keys ``[n0, n0 + BLOCK_N)``: ``lo <= full_lo <= full_hi <= hi``.

    ``[full_lo, full_hi)`` are whole query blocks inside ``seqlen_q`` that see every key of a
    key block lying inside ``seqlen_k``: no mask needed there.
    """
    lo = n0 * 0
    hi = seqlen_q + n0 * 0
    full_lo = lo
    full_hi = (seqlen_q // BLOCK_M) * BLOCK_M + n0 * 0
    if HAS_RIGHT:
        lo = tl.maximum(n0 - diag - win_right, 0)
        lo = (lo // BLOCK_M) * BLOCK_M
        first_full = tl.maximum(n0 + BLOCK_N - 1 - diag - win_right, 0)
        full_lo = ((first_full + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    if HAS_LEFT:
        hi = tl.minimum(tl.maximum(n0 + BLOCK_N - diag + win_left, 0), seqlen_q)
        end_full = tl.maximum(n0 + win_left - diag + 1, 0)
        full_hi = tl.minimum(full_hi, (end_full // BLOCK_M) * BLOCK_M)
    if n0 + BLOCK_N > seqlen_k:
        full_hi = lo
    hi = tl.maximum(hi, lo)
    full_lo = tl.maximum(tl.minimum(full_lo, hi), lo)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _dkdv_inner(dk, dv, k, v, Q_head, DO_head, LSE_head, D_head, DQ_head, lo, hi, offs_m, offs_n,
                offs_d, n0, diag, seqlen_q, seqlen_k, sqs, sdos, sdqs, qk_scale, sm_scale, cap_in,
                cap_out, slope2, win_left, win_right, seed, dropout_p,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
                EVEN_D: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                ATOMIC_DQ: tl.constexpr):
    cols = n0 + offs_n
    rdp = 1.0 / (1.0 - dropout_p)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        q = load_kv_tile(Q_head, start_m, offs_m, offs_d, seqlen_q, sqs, Q_head, 0, 0, HEAD_DIM,
                         MASKED, EVEN_D, False, 1)
        do = load_kv_tile(DO_head, start_m, offs_m, offs_d, seqlen_q, sdos, DO_head, 0, 0, HEAD_DIM,
                          MASKED, EVEN_D, False, 1)
        if MASKED:
            lse = tl.load(LSE_head + rows, mask=rows < seqlen_q, other=float("inf"))
            delta = tl.load(D_head + rows, mask=rows < seqlen_q, other=0.0)
        else:
            lse = tl.load(LSE_head + rows)
            delta = tl.load(D_head + rows)
        qkT = tl.dot(k, tl.trans(q))
        sT, tT = score_mod(qkT, rows[None, :], cols[:, None], diag, seqlen_k, qk_scale, cap_in,
                           cap_out, slope2, win_left, win_right, MASKED, HAS_SOFTCAP, HAS_ALIBI,
                           HAS_LEFT, HAS_RIGHT)
        pT = tl.exp2(sT - lse[None, :] * 1.4426950408889634)
        dpT = tl.dot(v, tl.trans(do))
        if HAS_DROPOUT:
            keepT = dropout_keep(seed, rows[None, :], cols[:, None], seqlen_k, dropout_p)
            dv += tl.dot(tl.where(keepT, pT * rdp, 0.0).to(do.dtype), do)
            dpT = tl.where(keepT, dpT * rdp, 0.0)
        else:
            dv += tl.dot(pT.to(do.dtype), do)
        dsT = pT * (dpT - delta[None, :])
        if HAS_SOFTCAP:
            dsT = dsT * (1.0 - tT * tT)
        dk += tl.dot(dsT.to(q.dtype), q)
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(dsT.to(k.dtype)), k) * sm_scale
            dq_ptrs = DQ_head + tl.cast(start_m, tl.int64) * sdqs + offs_m[:, None] * sdqs + offs_d[None, :]
            if MASKED or not EVEN_D:
                tl.atomic_add(dq_ptrs, dq, mask=(rows[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM),
                              sem="relaxed")
            else:
                tl.atomic_add(dq_ptrs, dq, sem="relaxed")
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, Delta, DK, DV, DQ, CuQ, CuK, Slopes, Seed,
                     sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdob, sdos, sdoh,
                     sdkb, sdks, sdkh, sdvb, sdvs, sdvh, sdqb, sdqs, sdqh, slb, slh, s_slope_b,
                     seqlen_q, seqlen_k, total_q, total_k, nheads, group, sm_scale, cap_in, cap_out, dropout_p,
                     win_left, win_right,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                     HAS_ALIBI: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                     HAS_DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    pid_n = tl.program_id(0)
    pid_bhk = tl.program_id(1)
    nheads_k = nheads // group
    b, hk, _hk, q_start, k_start, seqlen_q, seqlen_k = seq_bounds(
        pid_bhk, nheads_k, 1, CuQ, CuK, seqlen_q, seqlen_k, total_q, total_k, IS_VARLEN, False)
    n0 = pid_n * BLOCK_N
    if n0 >= seqlen_k:
        return
    diag = seqlen_k - seqlen_q
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    cols = n0 + offs_n
    kv_mask = (cols[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
    K_head = K + b.to(tl.int64) * skb + hk * skh + k_start.to(tl.int64) * sks
    V_head = V + b.to(tl.int64) * svb + hk * svh + k_start.to(tl.int64) * svs
    k = tl.load(K_head + cols[:, None] * sks + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V_head + cols[:, None] * svs + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    lo, full_lo, full_hi, hi = query_ranges(n0, diag, seqlen_q, seqlen_k, win_left, win_right,
                                            BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    for g in range(0, group):
        h = hk * group + g
        Q_head = Q + b.to(tl.int64) * sqb + h * sqh + q_start.to(tl.int64) * sqs
        DO_head = DO + b.to(tl.int64) * sdob + h * sdoh + q_start.to(tl.int64) * sdos
        DQ_head = DQ + b.to(tl.int64) * sdqb + h * sdqh + q_start.to(tl.int64) * sdqs
        LSE_head = LSE + b.to(tl.int64) * slb + h.to(tl.int64) * slh + q_start
        D_head = Delta + b.to(tl.int64) * slb + h.to(tl.int64) * slh + q_start
        slope2 = 0.0
        if HAS_ALIBI:
            slope2 = tl.load(Slopes + b * s_slope_b + h) * 1.4426950408889634
        seed = 0
        if HAS_DROPOUT:
            seed = tl.load(Seed) + b * nheads + h
        if HAS_RIGHT:
            dk, dv = _dkdv_inner(dk, dv, k, v, Q_head, DO_head, LSE_head, D_head, DQ_head, lo,
                                 full_lo, offs_m, offs_n, offs_d, n0, diag, seqlen_q, seqlen_k, sqs,
                                 sdos, sdqs, qk_scale, sm_scale, cap_in, cap_out, slope2, win_left,
                                 win_right, seed, dropout_p, HEAD_DIM, BLOCK_M, True, EVEN_D,
                                 HAS_SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, HAS_DROPOUT,
                                 ATOMIC_DQ)
        dk, dv = _dkdv_inner(dk, dv, k, v, Q_head, DO_head, LSE_head, D_head, DQ_head, full_lo,
                             full_hi, offs_m, offs_n, offs_d, n0, diag, seqlen_q, seqlen_k, sqs,
                             sdos, sdqs, qk_scale, sm_scale, cap_in, cap_out, slope2, win_left,
                             win_right, seed, dropout_p, HEAD_DIM, BLOCK_M, False, EVEN_D,
                             HAS_SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, HAS_DROPOUT, ATOMIC_DQ)
        dk, dv = _dkdv_inner(dk, dv, k, v, Q_head, DO_head, LSE_head, D_head, DQ_head, full_hi, hi,
                             offs_m, offs_n, offs_d, n0, diag, seqlen_q, seqlen_k, sqs, sdos, sdqs,
                             qk_scale, sm_scale, cap_in, cap_out, slope2, win_left, win_right,
                             seed, dropout_p, HEAD_DIM, BLOCK_M, True, EVEN_D, HAS_SOFTCAP,
                             HAS_ALIBI, HAS_LEFT, HAS_RIGHT, HAS_DROPOUT, ATOMIC_DQ)
    DK_head = DK + b.to(tl.int64) * sdkb + hk * sdkh + k_start.to(tl.int64) * sdks
    DV_head = DV + b.to(tl.int64) * sdvb + hk * sdvh + k_start.to(tl.int64) * sdvs
    tl.store(DK_head + cols[:, None] * sdks + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
             mask=kv_mask)
    tl.store(DV_head + cols[:, None] * sdvs + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=kv_mask)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, K_head, V_head, lo, hi, offs_m, offs_n, offs_d, diag,
              seqlen_k, sks, svs, qk_scale, cap_in, cap_out, slope2, win_left, win_right, seed,
              dropout_p, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
              EVEN_D: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    rdp = 1.0 / (1.0 - dropout_p)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = load_kv_tile(K_head, start_n, offs_n, offs_d, seqlen_k, sks, K_head, 0, 0, HEAD_DIM,
                         MASKED, EVEN_D, False, 1)
        v = load_kv_tile(V_head, start_n, offs_n, offs_d, seqlen_k, svs, V_head, 0, 0, HEAD_DIM,
                         MASKED, EVEN_D, False, 1)
        qk = tl.dot(q, tl.trans(k))
        s, t = score_mod(qk, offs_m[:, None], cols[None, :], diag, seqlen_k, qk_scale, cap_in,
                         cap_out, slope2, win_left, win_right, MASKED, HAS_SOFTCAP, HAS_ALIBI,
                         HAS_LEFT, HAS_RIGHT)
        p = tl.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v))
        if HAS_DROPOUT:
            keep = dropout_keep(seed, offs_m[:, None], cols[None, :], seqlen_k, dropout_p)
            dp = tl.where(keep, dp * rdp, 0.0)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += tl.dot(ds.to(k.dtype), k)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, Out, DO, LSE, Delta, DQ, CuQ, CuK, Slopes, Seed,
                   sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh, sdob, sdos, sdoh,
                   sdqb, sdqs, sdqh,
                   slb, slh, s_slope_b, seqlen_q, seqlen_k, total_q, total_k, nheads, group, sm_scale, cap_in,
                   cap_out, dropout_p, win_left, win_right,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                   HAS_ALIBI: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                   HAS_DROPOUT: tl.constexpr):
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h, hk, q_start, k_start, seqlen_q, seqlen_k = seq_bounds(
        pid_bh, nheads, group, CuQ, CuK, seqlen_q, seqlen_k, total_q, total_k, IS_VARLEN, False)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    diag = seqlen_k - seqlen_q
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seqlen_q
    mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b.to(tl.int64) * sqb + h * sqh + (q_start + offs_m).to(tl.int64)[:, None] * sqs
                + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * sdob + h * sdoh
                 + (q_start + offs_m).to(tl.int64)[:, None] * sdos + offs_d[None, :],
                 mask=mask, other=0.0)
    lse_off = b.to(tl.int64) * slb + h.to(tl.int64) * slh + q_start + offs_m
    lse2 = tl.load(LSE + lse_off, mask=row_ok, other=float("inf")) * 1.4426950408889634
    # delta = rowsum(dO * O), computed here and stored for the dK/dV kernel that runs next.
    o = tl.load(Out + b.to(tl.int64) * sob + h * soh + (q_start + offs_m).to(tl.int64)[:, None] * sos
                + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + lse_off, delta, mask=row_ok)
    K_head = K + b.to(tl.int64) * skb + hk * skh + k_start.to(tl.int64) * sks
    V_head = V + b.to(tl.int64) * svb + hk * svh + k_start.to(tl.int64) * svs
    qk_scale = sm_scale * 1.4426950408889634
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(Slopes + b * s_slope_b + h) * 1.4426950408889634
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed) + pid_bh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = key_ranges(m0, diag, seqlen_k, win_left, win_right, BLOCK_M,
                                          BLOCK_N, HAS_LEFT, HAS_RIGHT)
    if HAS_LEFT:
        dq = _dq_inner(dq, q, do, lse2, delta, K_head, V_head, lo, full_lo, offs_m, offs_n, offs_d,
                       diag, seqlen_k, sks, svs, qk_scale, cap_in, cap_out, slope2, win_left,
                       win_right, seed, dropout_p, HEAD_DIM, BLOCK_N, True, EVEN_D, HAS_SOFTCAP,
                       HAS_ALIBI, HAS_LEFT, HAS_RIGHT, HAS_DROPOUT)
    dq = _dq_inner(dq, q, do, lse2, delta, K_head, V_head, full_lo, full_hi, offs_m, offs_n, offs_d,
                   diag, seqlen_k, sks, svs, qk_scale, cap_in, cap_out, slope2, win_left,
                   win_right, seed, dropout_p, HEAD_DIM, BLOCK_N, False, EVEN_D, HAS_SOFTCAP,
                   HAS_ALIBI, HAS_LEFT, HAS_RIGHT, HAS_DROPOUT)
    dq = _dq_inner(dq, q, do, lse2, delta, K_head, V_head, full_hi, hi, offs_m, offs_n, offs_d,
                   diag, seqlen_k, sks, svs, qk_scale, cap_in, cap_out, slope2, win_left,
                   win_right, seed, dropout_p, HEAD_DIM, BLOCK_N, True, EVEN_D, HAS_SOFTCAP,
                   HAS_ALIBI, HAS_LEFT, HAS_RIGHT, HAS_DROPOUT)
    tl.store(DQ + b.to(tl.int64) * sdqb + h * sdqh + (q_start + offs_m).to(tl.int64)[:, None] * sdqs
             + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per head-dim class; the first is the untuned default.
# Chosen from a wider search on an H100 (bf16, 16k tokens, S = 512 ... 16k).
DKDV_SHAPES = {
    64: [(64, 64, 4, 3), (64, 128, 8, 2), (32, 128, 4, 3)],
    128: [(64, 128, 8, 3), (32, 64, 4, 3), (64, 128, 8, 2)],
    256: [(32, 64, 4, 2), (32, 128, 8, 1), (64, 64, 8, 1)],
}
DQ_SHAPES = {
    64: [(128, 64, 4, 3), (64, 64, 4, 3), (128, 64, 8, 2)],
    128: [(128, 64, 8, 3), (64, 64, 4, 2), (128, 64, 8, 2)],
    256: [(64, 32, 4, 2), (64, 64, 8, 1), (128, 32, 8, 1)],
}
DKDV_SHAPES_WIDE = {
    64: DKDV_SHAPES[64] + [(64, 128, 4, 2), (32, 128, 8, 3), (128, 128, 8, 2)],
    128: DKDV_SHAPES[128] + [(32, 128, 8, 2), (64, 64, 4, 2), (32, 128, 4, 2)],
    256: DKDV_SHAPES[256],
}
DQ_SHAPES_WIDE = {
    64: DQ_SHAPES[64] + [(128, 128, 8, 2), (64, 128, 4, 2), (128, 32, 4, 3)],
    128: DQ_SHAPES[128] + [(128, 32, 8, 2), (64, 128, 8, 2), (128, 128, 8, 2)],
    256: DQ_SHAPES[256],
}

_KEY = ["HEAD_DIM", "IS_VARLEN", "HAS_LEFT", "HAS_RIGHT", "HAS_SOFTCAP", "HAS_ALIBI",
        "HAS_DROPOUT", "seqlen_q", "seqlen_k"]
_dkdv_tuned = triton.autotune(configs=make_configs(DKDV_SHAPES, DKDV_SHAPES_WIDE),
                              key=_KEY + ["ATOMIC_DQ"], do_bench=tune_bench,
                              prune_configs_by={"early_config_prune": make_pruner(DKDV_SHAPES, DKDV_SHAPES_WIDE)},
                              reset_to_zero=["DQ"])(_bwd_dkdv_kernel)
_dq_tuned = triton.autotune(configs=make_configs(DQ_SHAPES, DQ_SHAPES_WIDE), key=_KEY,
                            do_bench=tune_bench,
                            prune_configs_by={"early_config_prune": make_pruner(DQ_SHAPES, DQ_SHAPES_WIDE)},
                            )(_bwd_dq_kernel)
dkdv_heuristic = make_heuristic(DKDV_SHAPES)
dq_heuristic = make_heuristic(DQ_SHAPES)


def bwd_scheme(deterministic: bool) -> str:
    """``"split"`` (separate atomic-free dQ kernel) or ``"atomic"`` (dQ via float32 atomics).

    ``deterministic=True`` always gives ``"split"``. Otherwise the ``flash_bwd`` knob
    (``HF_EFFICIENT_FLASH_BWD=split|atomic``) picks; the default is ``split``.
    """
    return "split" if deterministic else tuning.get().flash_bwd


@functools.lru_cache(maxsize=1024)
def _bwd_plan(varlen, q_shape, q_stride, k_shape, k_stride, v_stride, out_stride, dout_stride, lse_stride,
              alibi_stride, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_size, softcap, dropout_p):
    """The backward launches' metadata-derived arguments, cached per argument signature (like ``_fwd_plan``).

    Returns ``(consts, strides, tail, seqlen_q, seqlen_k, nheads, nheads_k, tune_key)``: ``strides`` maps each
    tensor role to its (batch, seq, head) strides -- the outputs dq/dk/dv (and the atomic scheme's float32 dQ
    accumulator) are contiguous in the shapes of q/k/v -- and ``tail`` is (lse strides, ALiBi batch stride).
    """
    nheads, nheads_k = q_shape[-2], k_shape[-2]
    consts, common = score_args(q_shape[-1], varlen, causal, window_size, softcap, alibi_stride is not None,
                                softmax_scale, dropout_p)
    strides = {"q": bsh(q_stride, varlen), "k": bsh(k_stride, varlen), "v": bsh(v_stride, varlen),
               "out": bsh(out_stride, varlen), "dout": bsh(dout_stride, varlen),
               "dq": bsh(_contiguous_strides(q_shape), varlen), "dk": bsh(_contiguous_strides(k_shape), varlen),
               "dv": bsh(_contiguous_strides(k_shape), varlen)}
    lse_strides = _lse_strides(lse_stride, varlen)
    s_slope_b = alibi_stride[0] if alibi_stride is not None and len(alibi_stride) == 2 else 0
    seqlen_q, seqlen_k = (max_seqlen_q, max_seqlen_k) if varlen else (q_shape[1], k_shape[1])
    tune_key = (_seqlen_class(seqlen_q), _seqlen_class(seqlen_k))
    return consts, strides, (lse_strides, s_slope_b, common), seqlen_q, seqlen_k, nheads, nheads_k, tune_key


def flash_bwd(dout, q, k, v, out, lse, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0,
              max_seqlen_k=0, *, softmax_scale, causal=False, window_size=(-1, -1), softcap=0.0,
              alibi_slopes=None, dropout_p=0.0, rng_seed=None, deterministic=False, fill=True):
    """Launch the backward kernels on already validated inputs.

    dout, out: like q; lse: float32 (B, H, Sq) or (H, Tq) from the forward.
    Returns dq, dk, dv with the shapes and dtypes of q, k, v (contiguous).
    """
    varlen = cu_seqlens_q is not None
    consts, st, (lse_st, s_slope_b, common), seqlen_q, seqlen_k, nheads, nheads_k, tune_key = _bwd_plan(
        varlen, q.shape, q.stride(), k.shape, k.stride(), v.stride(), out.stride(), dout.stride(), lse.stride(),
        alibi_slopes.stride() if alibi_slopes is not None else None,
        int(max_seqlen_q) if varlen else 0, int(max_seqlen_k) if varlen else 0, float(softmax_scale),
        bool(causal), tuple(window_size), float(softcap), float(dropout_p))
    batch = cu_seqlens_q.shape[0] - 1 if varlen else q.shape[0]
    max_seqlen_q, max_seqlen_k = seqlen_q, seqlen_k
    # varlen: the row counts cu_seqlens are clamped to on the device (0 = unused by padded batches)
    total_q, total_k = (q.shape[0], k.shape[0]) if varlen else (0, 0)
    head_dim = consts["HEAD_DIM"]
    tune_key = (*tune_key, q.dtype)
    scheme = bwd_scheme(deterministic)
    dq = new_output(q.shape, q.dtype, q.device)
    dk = new_output(k.shape, k.dtype, k.device)
    dv = new_output(v.shape, v.dtype, v.device)
    delta = torch.empty_like(lse)
    dummy = q
    cu_q = cu_seqlens_q if varlen else dummy
    cu_k = cu_seqlens_k if varlen else dummy
    slopes = alibi_slopes if alibi_slopes is not None else dummy
    seed = rng_seed if rng_seed is not None else dummy
    sqb, sqs, sqh = st["q"]
    skb, sks, skh = st["k"]
    svb, svs, svh = st["v"]
    sob, sos, soh = st["out"]
    sdob, sdos, sdoh = st["dout"]
    slb, slh = lse_st
    bd = consts["BLOCK_D"]
    atomic = scheme == "atomic"
    # The dK/dV kernel's DQ argument: float32 accumulator (atomic scheme) or an unused stand-in
    # (never read without ATOMIC_DQ; kept apart from the real outputs).
    dq_acc = (torch.zeros(q.shape, dtype=torch.float32, device=q.device) if atomic
              else torch.empty((1,), dtype=torch.float32, device=q.device))
    sdqb, sdqs, sdqh = st["dq"]
    sdkb, sdks, sdkh = st["dk"]
    sdvb, sdvs, sdvh = st["dv"]
    have_q = batch * nheads > 0 and max_seqlen_q > 0
    if have_q and atomic:
        pre_m = 16 if interpreting() else 64
        _bwd_preprocess[(triton.cdiv(max_seqlen_q, pre_m), batch * nheads)](
            out, dout, delta, cu_q, sob, sos, soh, sdob, sdos, sdoh, slb, slh, seqlen_q, total_q, nheads,
            HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_M=pre_m, IS_VARLEN=varlen)
    elif have_q:
        # dQ first: it also computes delta, which the dK/dV kernel reads.
        args = (q, k, v, out, dout, lse, delta, dq, cu_q, cu_k, slopes, seed,
                sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh, sdob, sdos, sdoh,
                sdqb, sdqs, sdqh, slb, slh, s_slope_b, seqlen_q, seqlen_k, total_q, total_k, nheads,
                nheads // nheads_k, *common)
        _call(_dq_tuned, _bwd_dq_kernel,
              lambda meta: (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), batch * nheads),
              args, consts, head_dim, dq_heuristic, tune_key)
    if batch * nheads_k > 0 and max_seqlen_k > 0:
        args = (q, k, v, dout, lse, delta, dk, dv, dq_acc, cu_q, cu_k, slopes, seed,
                sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdob, sdos, sdoh,
                sdkb, sdks, sdkh, sdvb, sdvs, sdvh, sdqb, sdqs, sdqh, slb, slh, s_slope_b,
                seqlen_q, seqlen_k, total_q, total_k, nheads, nheads // nheads_k, *common)
        _call(_dkdv_tuned, _bwd_dkdv_kernel,
              lambda meta: (triton.cdiv(max_seqlen_k, meta["BLOCK_N"]), batch * nheads_k),
              args, dict(consts, ATOMIC_DQ=atomic), head_dim, dkdv_heuristic,
              tune_key)
    if atomic:
        dq.copy_(dq_acc)
    if varlen and fill:
        fill_uncovered(dq, cu_seqlens_q, 0, 0.0)
        fill_uncovered(dk, cu_seqlens_k, 0, 0.0)
        fill_uncovered(dv, cu_seqlens_k, 0, 0.0)
    return dq, dk, dv
