"""Fused projections for small-batch decode: fewer, larger kernels per decoder layer.

At batch 1-16 a decoder layer is launch-latency bound: transformers' modules issue ~17 kernels per layer (norms,
three projections, rotary, cache write, attention, output projection, residual adds, MLP), each a few microseconds
of mostly idle GPU. These ops merge them into four, each reading the layer's weights once:

* :func:`norm_linear` — RMSNorm of the rows folded into the prologue of one or more projections that share the
  input (q/k/v, or gate/up), written side by side into one output, optional biases. The weights stay separate
  tensors (the model's own parameters, no concatenated copy).
* :func:`linear_residual` — a projection whose input is optionally ``silu(gate) * up`` (computed on the fly from
  the ``[gate | up]`` output of :func:`norm_linear`) and whose output is added to the residual stream in place.
* :func:`rope_store` — rotary embedding of q and k computed from the positions and ``inv_freq`` in the kernel,
  rotated q written out, rotated k and v written to their paged-cache slots.

At one to ``GEMV_MAX_M`` rows (decode at batch 1-2) the first two run as one-row kernels (:func:`gemv_plan`): whole
weight rows per program, read once for all the rows, products and sums on the CUDA cores, no split of K; more rows
run as tensor-core tiles with a deterministic split-K.

Rounding follows transformers' module order (norm in fp32, cast, times weight; SiLU output rounded before the
product; the projection rounded before the residual add), so results match the modules to bf16 noise.

Every op has a plain-PyTorch reference (CPU path and test oracle). Shapes: ``M`` rows (tokens), ``K`` input
features, ``N`` output features; weights are ``(N, K)`` like ``nn.Linear``.
"""

from __future__ import annotations

import torch

from .. import tuning
from . import precompile
from ._common import new_output, num_sms, pdl_enabled
from .rmsnorm import fusable

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - Linux installs carry triton
    triton = None

__all__ = [
    "norm_linear", "norm_linear_reference", "linear_residual", "linear_residual_reference",
    "rope_store", "rope_store_reference", "norm_linear_rope", "kernels_usable",
]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def kernels_usable(*tensors: torch.Tensor) -> bool:
    """The Triton kernels can take these tensors: CUDA fp16/bf16 (float32 keeps cuBLAS's full-precision GEMMs), or
    CPU under the interpreter (fp32/fp16, which is how CI checks the kernels)."""
    if triton is None or not fusable(*tensors):
        return False
    return tensors[0].device.type != "cuda" or all(t.dtype != torch.float32 for t in tensors)


# ----------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def norm_linear_reference(x, weights, norm_weight=None, eps=1e-6, biases=None):
    """``cat([rms_norm(x) @ W.T + b for W, b in zip(weights, biases)], -1)``; x ``(M, K)``."""
    h = _rms(x, norm_weight, eps) if norm_weight is not None else x
    biases = biases or [None] * len(weights)
    return torch.cat([torch.nn.functional.linear(h, w, b) for w, b in zip(weights, biases)], dim=-1)


def linear_residual_reference(x, weight, residual=None, silu_mul=False):
    """``residual + act(x) @ W.T`` where act is identity, or ``silu(x[:, :K]) * x[:, K:]`` when ``silu_mul``."""
    if silu_mul:
        k = x.shape[-1] // 2
        x = torch.nn.functional.silu(x[..., :k]) * x[..., k:]
    y = torch.nn.functional.linear(x, weight)
    return y if residual is None else residual + y


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


def rope_store_reference(qkv, positions, inv_freq, scaling, nheads, nheads_k, k_pool, v_pool, slots):
    """Returns rotated q ``(M, nheads, D)``; writes rotated k and v rows to the pools at ``slots``."""
    m = qkv.shape[0]
    d = k_pool.shape[-1]
    freqs = positions.float()[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = (emb.cos() * scaling).to(qkv.dtype)[:, None, :]
    sin = (emb.sin() * scaling).to(qkv.dtype)[:, None, :]
    q = qkv[:, : nheads * d].view(m, nheads, d)
    k = qkv[:, nheads * d: (nheads + nheads_k) * d].view(m, nheads_k, d)
    v = qkv[:, (nheads + nheads_k) * d: (nheads + 2 * nheads_k) * d].view(m, nheads_k, d)
    k_pool.view(-1, nheads_k, d).index_copy_(0, slots, _rotate(k, cos, sin).to(k_pool.dtype))
    v_pool.view(-1, nheads_k, d).index_copy_(0, slots, v.to(v_pool.dtype))
    return _rotate(q, cos, sin)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _mma(acc, x, w, IEEE: tl.constexpr):
        """acc += x @ w.T (fp32 inputs in full precision when IEEE)."""
        if IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
        return acc

    @triton.jit
    def _weight_tile(w_ptr, rn, n_ok, kk, k_hi, K):
        """Rows ``rn``, columns ``kk`` (below ``k_hi``) of a row-major (N, K) weight; zeros outside."""
        return tl.load(w_ptr + rn[:, None] * K + kk[None, :], mask=n_ok[:, None] & (kk < k_hi)[None, :], other=0.0)

    @triton.jit
    def _pdl_enter(PDL: tl.constexpr):
        """Programmatic dependent launch: wait for the previous kernel (and its memory), then let the next one
        launch. Everything before this call may only read data no earlier kernel of the step writes (weights)."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _split_reduce(acc, WS, CNT, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Split-K fix-up over grid (m tiles, n tiles, SPLIT): every split stores its partial tile; the last split
        to arrive (atomic counter) sums the partials in split order (deterministic) and resets the counter.
        Returns (whether this program writes the output, the full sum). SPLIT == 1: (True, acc)."""
        if SPLIT == 1:
            last = tl.program_id(2) == 0  # the only split
        else:
            tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
            pid_s = tl.program_id(2)
            num_tiles = tl.num_programs(0) * tl.num_programs(1)
            offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
            size = BLOCK_M * BLOCK_N
            tl.store(WS + (pid_s * num_tiles + tile) * size + offs, acc)
            old = tl.atomic_add(CNT + tile, 1, sem="acq_rel")
            last = old == SPLIT - 1
            if last:
                acc = tl.load(WS + tile * size + offs, cache_modifier=".cg")
                for s in range(1, SPLIT):
                    acc += tl.load(WS + (s * num_tiles + tile) * size + offs, cache_modifier=".cg")
                tl.atomic_xchg(CNT + tile, 0)
        return last, acc

    @triton.jit(do_not_specialize=["M"])
    def _norm_linear_kernel(
        X, NW, W0, W1, W2, B0, B1, B2, Y, WS, CNT,
        M, K, N0, N1, T0, T1, N2, sxm, sym, eps, K_SPLIT,
        POS, INV, KP, VP, SLOTS, scaling, HK,
        HAS_NORM: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, SPLIT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ONE_TILE: tl.constexpr,
        PDL: tl.constexpr, ROPE: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_s = tl.program_id(2)
        # Output tiles run over W0's rows, then W1's, then W2's; a tile never straddles two weights.
        w_ptr, b_ptr, tile, n_size, col0 = _side_by_side(pid_n, T0, T1, N0, N1, N2, W0, W1, W2, B0, B1, B2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < M
        n_ok = rn < n_size
        dt = Y.dtype.element_ty
        k_lo = pid_s * K_SPLIT
        k_hi = tl.minimum(K, k_lo + K_SPLIT)
        if ONE_TILE:  # this program's whole weight tile, fetched before waiting for the previous kernel
            w1 = _weight_tile(w_ptr, rn, n_ok, k_lo + rk, k_hi, K)
        _pdl_enter(PDL)
        if HAS_NORM:  # the full row's mean square, whatever part of K this program multiplies
            ss = tl.zeros([BLOCK_M], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + rk
                x = tl.load(X + rm[:, None] * sxm + kk[None, :], mask=m_ok[:, None] & (kk < K)[None, :], other=0.0)
                xf = x.to(tl.float32)
                ss += tl.sum(xf * xf, axis=1)
            r = 1.0 / tl.sqrt(ss / K + eps)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < k_hi
            x = tl.load(X + rm[:, None] * sxm + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if HAS_NORM:
                nw = tl.load(NW + kk, mask=k_ok, other=0.0)
                xn = (x.to(tl.float32) * r[:, None]).to(dt)
                x = (nw.to(tl.float32)[None, :] * xn.to(tl.float32)).to(dt)
            if ONE_TILE:
                w = w1
            else:
                w = _weight_tile(w_ptr, rn, n_ok, kk, k_hi, K)
            acc = _mma(acc, x, w, IEEE)
        last, acc = _split_reduce(acc, WS, CNT, SPLIT, BLOCK_M, BLOCK_N)
        if last:
            if HAS_BIAS:
                b = tl.load(b_ptr + rn, mask=n_ok, other=0.0)
                acc += b.to(tl.float32)[None, :]
            if ROPE:  # q/k/v epilogue: one head per tile (BLOCK_N == head_dim), see norm_linear_rope
                _rope_epilogue(acc.to(dt).to(tl.float32), rm, m_ok, tile, pid_n < T0, pid_n < T0 + T1, Y, sym,
                               POS, INV, KP, VP, SLOTS, scaling, HK, dt, BLOCK_M, BLOCK_N)
            else:
                tl.store(Y + rm[:, None] * sym + (col0 + rn)[None, :], acc.to(dt),
                         mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _rotate_pair(x1, x2, ang, scaling, dt):
        """Rotary embedding of the pairs (x1, x2) = (x[j], x[j + D/2]) (fp32 values of model-dtype numbers) at
        angles ``ang``, rounded like transformers' ``q * cos + rotate_half(q) * sin`` (cos/sin and each product
        rounded to the model dtype). Returns the two halves in the model dtype."""
        c = (tl.cos(ang) * scaling).to(dt).to(tl.float32)
        s = (tl.sin(ang) * scaling).to(dt).to(tl.float32)
        o1 = ((x1 * c).to(dt).to(tl.float32) + (-x2 * s).to(dt).to(tl.float32)).to(dt)
        o2 = ((x2 * c).to(dt).to(tl.float32) + (x1 * s).to(dt).to(tl.float32)).to(dt)
        return o1, o2

    @triton.jit
    def _rope_epilogue(val, rm, m_ok, head, is_q, is_qk, QO, sqm, POS, INV, KP, VP, SLOTS, scaling, HK, dt,
                       BLOCK_M: tl.constexpr, D: tl.constexpr):
        """Rotary embedding of a q or k head tile (rounded like transformers' rotate_half path, as in
        _rope_store_kernel), written to q's output or to the paged K cache; a v head tile goes to the V cache."""
        HALF: tl.constexpr = D // 2
        rd = tl.arange(0, D)
        if is_qk:
            pos = tl.load(POS + rm, mask=m_ok, other=0).to(tl.float32)
            ang = pos[:, None] * tl.load(INV + tl.arange(0, HALF)).to(tl.float32)[None, :]
            x1, x2 = tl.split(tl.permute(tl.reshape(val, [BLOCK_M, 2, HALF]), (0, 2, 1)))
            o1, o2 = _rotate_pair(x1, x2, ang, scaling, dt)
            out = tl.reshape(tl.permute(tl.join(o1, o2), (0, 2, 1)), [BLOCK_M, D])
        else:
            out = val.to(dt)
        if is_q:
            tl.store(QO + rm[:, None] * sqm + head * D + rd[None, :], out, mask=m_ok[:, None])
        else:
            slot = tl.load(SLOTS + rm, mask=m_ok, other=0)
            offs = (slot[:, None] * HK + head) * D + rd[None, :]
            if is_qk:
                tl.store(KP + offs, out.to(KP.dtype.element_ty), mask=m_ok[:, None])
            else:
                tl.store(VP + offs, out.to(VP.dtype.element_ty), mask=m_ok[:, None])

    @triton.jit(do_not_specialize=["M"])
    def _linear_residual_kernel(
        X, W, R, Y, WS, CNT, M, K, N, sxm, srm, sym, K_SPLIT,
        SILU_MUL: tl.constexpr, HAS_RES: tl.constexpr, IEEE: tl.constexpr, SPLIT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ONE_TILE: tl.constexpr,
        PDL: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_s = tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < M
        n_ok = rn < N
        dt = Y.dtype.element_ty
        k_lo = pid_s * K_SPLIT
        k_hi = tl.minimum(K, k_lo + K_SPLIT)
        if ONE_TILE:  # this program's whole weight tile, fetched before waiting for the previous kernel
            w1 = _weight_tile(W, rn, n_ok, k_lo + rk, k_hi, K)
        _pdl_enter(PDL)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < k_hi
            xm = m_ok[:, None] & k_ok[None, :]
            x = tl.load(X + rm[:, None] * sxm + kk[None, :], mask=xm, other=0.0)
            if SILU_MUL:
                up = tl.load(X + rm[:, None] * sxm + K + kk[None, :], mask=xm, other=0.0)
                g = x.to(tl.float32)
                act = (g / (1.0 + tl.exp(-g))).to(dt)
                x = (act.to(tl.float32) * up.to(tl.float32)).to(dt)
            if ONE_TILE:
                w = w1
            else:
                w = _weight_tile(W, rn, n_ok, kk, k_hi, K)
            acc = _mma(acc, x, w, IEEE)
        last, acc = _split_reduce(acc, WS, CNT, SPLIT, BLOCK_M, BLOCK_N)
        if last:
            out = acc.to(dt)
            mask = m_ok[:, None] & n_ok[None, :]
            if HAS_RES:
                res = tl.load(R + rm[:, None] * srm + rn[None, :], mask=mask, other=0.0)
                out = (out.to(tl.float32) + res.to(tl.float32)).to(dt)
            tl.store(Y + rm[:, None] * sym + rn[None, :], out, mask=mask)

    @triton.jit
    def _gemv_rows(w_ptr, rows, r_ok, K, BLOCK_K: tl.constexpr):
        """Whole rows ``rows`` of a row-major (N, K) weight, zero-padded to BLOCK_K columns (rows off ``r_ok`` zero)."""
        kk = tl.arange(0, BLOCK_K)
        return tl.load(w_ptr + rows[:, None] * K + kk[None, :], mask=r_ok[:, None] & (kk < K)[None, :], other=0.0)

    @triton.jit
    def _gemv_dot(w, x):
        """fp32 ``w @ x`` of a (rows, BLOCK_K) tile and a (BLOCK_K,) vector: products and sums on the CUDA cores,
        no shared-memory staging of the weights (they stay in the registers they were loaded into)."""
        return tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)

    @triton.jit
    def _side_by_side(t, T0, T1, N0, N1, N2, W0, W1, W2, B0, B1, B2):
        """Output tile ``t`` of up to three weights side by side (T0 tiles of W0, then T1 of W1, then W2's): its
        weight, bias, tile index within that weight, the weight's rows and its first output column."""
        if t < T0:
            w_ptr = W0
            b_ptr = B0
        elif t < T0 + T1:
            w_ptr = W1
            b_ptr = B1
        else:
            w_ptr = W2
            b_ptr = B2
        in1 = t >= T0
        in2 = t >= T0 + T1
        tile = t - tl.where(in2, T0 + T1, tl.where(in1, T0, 0))
        n_size = tl.where(in2, N2, tl.where(in1, N1, N0))
        col0 = tl.where(in2, N0 + N1, tl.where(in1, N0, 0))
        return w_ptr, b_ptr, tile, n_size, col0

    @triton.jit
    def _gemv_biased(w, x, b_ptr, rows, ok, HAS_BIAS: tl.constexpr):
        """:func:`_gemv_dot` plus the rows' biases (fp32)."""
        acc = _gemv_dot(w, x)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rows, mask=ok, other=0.0).to(tl.float32)
        return acc

    @triton.jit
    def _gemv_input(X, nw, kk, k_ok, K, eps, HAS_NORM: tl.constexpr, dt):
        """One input row at X (K columns, padded with zeros), RMS-normalised with ``nw`` when HAS_NORM."""
        x = tl.load(X + kk, mask=k_ok, other=0.0)
        if HAS_NORM:
            xf = x.to(tl.float32)
            r = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / K + eps)
            x = (nw.to(tl.float32) * (xf * r).to(dt).to(tl.float32)).to(dt)
        return x

    @triton.jit
    def _gemv_norm_kernel(
        X, NW, W0, W1, W2, B0, B1, B2, Y, K, N0, N1, T0, T1, N2, eps, sxm, sym,
        POS, INV, KP, VP, SLOTS, scaling, HK,
        HAS_NORM: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
        PDL: tl.constexpr, ROPE: tl.constexpr, HALF: tl.constexpr, PERSIST: tl.constexpr, ROWS: tl.constexpr,
    ):
        """ROWS input rows (1 to ``GEMV_MAX_M``: decode at small batches): RMSNorm then W0/W1/W2 side by side,
        each program BLOCK_R whole weight rows, fetched before waiting for the previous kernel and used for every
        input row; no split of K, so no fix-up. With ROPE (q/k/v), a program holds BLOCK_R rotary pairs of one
        head, rows j and j + HALF, and writes q or the K/V cache slot itself.
        PERSIST (ROWS == 1, not with ROPE): each program walks tiles pid, pid + programs, ..., loading the next
        tile's weights while it multiplies the current one. Otherwise the input rows come one after another."""
        pid = tl.program_id(0)
        w_ptr, b_ptr, tile, n_size, col0 = _side_by_side(pid, T0, T1, N0, N1, N2, W0, W1, W2, B0, B1, B2)
        dt = Y.dtype.element_ty
        if ROPE:
            per_head: tl.constexpr = HALF // BLOCK_R
            head = tile // per_head
            j = (tile % per_head) * BLOCK_R + tl.arange(0, BLOCK_R)
            ra = head * (2 * HALF) + j
        else:
            ra = tile * BLOCK_R + tl.arange(0, BLOCK_R)
        ok = ra < n_size
        kk = tl.arange(0, BLOCK_K)
        k_ok = kk < K
        wa = _gemv_rows(w_ptr, ra, ok, K, BLOCK_K)
        if ROPE:
            wb = _gemv_rows(w_ptr, ra + HALF, ok, K, BLOCK_K)
        nw = wa  # a placeholder: _gemv_input reads it only with HAS_NORM
        if HAS_NORM:
            nw = tl.load(NW + kk, mask=k_ok, other=0.0)
        _pdl_enter(PDL)
        if PERSIST:
            tl.static_assert(ROWS == 1)
            x = _gemv_input(X, nw, kk, k_ok, K, eps, HAS_NORM, dt)
            n_tiles = T0 + T1 + tl.cdiv(N2, BLOCK_R)
            step = tl.num_programs(0)
            for t in range(pid, n_tiles, step):
                # the next tile's weights first (in flight while this tile is multiplied and stored)
                wn_ptr, _, tile_n, n_size_n, _ = _side_by_side(t + step, T0, T1, N0, N1, N2, W0, W1, W2, B0, B1, B2)
                rn = tile_n * BLOCK_R + tl.arange(0, BLOCK_R)
                # past the last tile: rows past the last weight's end (masked)
                w_next = _gemv_rows(wn_ptr, rn, rn < n_size_n, K, BLOCK_K)
                w_ptr, b_ptr, tile, n_size, col0 = _side_by_side(t, T0, T1, N0, N1, N2, W0, W1, W2, B0, B1, B2)
                ra = tile * BLOCK_R + tl.arange(0, BLOCK_R)
                ok = ra < n_size
                tl.store(Y + col0 + ra, _gemv_biased(wa, x, b_ptr, ra, ok, HAS_BIAS).to(dt), mask=ok)
                wa = w_next
        else:
            for i in tl.static_range(ROWS):
                x = _gemv_input(X + i * sxm, nw, kk, k_ok, K, eps, HAS_NORM, dt)
                if ROPE:
                    acc = _gemv_biased(wa, x, b_ptr, ra, ok, HAS_BIAS)
                    acc_b = _gemv_biased(wb, x, b_ptr, ra + HALF, ok, HAS_BIAS)
                    _gemv_rope_store(acc.to(dt).to(tl.float32), acc_b.to(dt).to(tl.float32), pid, T0, T1, head, j,
                                     Y + i * sym, POS + i, INV, KP, VP, SLOTS + i, scaling, HK, HALF, dt)
                else:
                    tl.store(Y + i * sym + col0 + ra, _gemv_biased(wa, x, b_ptr, ra, ok, HAS_BIAS).to(dt), mask=ok)

    @triton.jit
    def _gemv_rope_store(x1, x2, pid, T0, T1, head, j, Y, POS, INV, KP, VP, SLOTS, scaling, HK, HALF: tl.constexpr,
                         dt):
        """Rotary pairs (x1, x2) of one head of one row: q into Y, k and v into their cache slot (one program's
        part of the q/k/v epilogue of ``_gemv_norm_kernel``)."""
        D: tl.constexpr = 2 * HALF
        if pid < T0 + T1:  # q or k: rotate
            ang = tl.load(POS).to(tl.float32) * tl.load(INV + j).to(tl.float32)
            o1, o2 = _rotate_pair(x1, x2, ang, scaling, dt)
        else:
            o1 = x1.to(dt)
            o2 = x2.to(dt)
        if pid < T0:
            dst = Y + head * D + j
            tl.store(dst, o1)
            tl.store(dst + HALF, o2)
        else:
            offs = (tl.load(SLOTS) * HK + head) * D + j
            if pid < T0 + T1:
                tl.store(KP + offs, o1.to(KP.dtype.element_ty))
                tl.store(KP + offs + HALF, o2.to(KP.dtype.element_ty))
            else:
                tl.store(VP + offs, o1.to(VP.dtype.element_ty))
                tl.store(VP + offs + HALF, o2.to(VP.dtype.element_ty))

    @triton.jit
    def _gemv_residual_kernel(
        X, W, R, Y, K, N, sxm, srm, sym,
        SILU_MUL: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
        PDL: tl.constexpr, PERSIST: tl.constexpr, ROWS: tl.constexpr,
    ):
        """ROWS input rows (1 to ``GEMV_MAX_M``) of :func:`linear_residual`: BLOCK_R whole weight rows per program,
        fetched before waiting for the previous kernel and used for every input row; no split of K.
        PERSIST (ROWS == 1): as in ``_gemv_norm_kernel``."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        ok = rows < N
        kk = tl.arange(0, BLOCK_K)
        k_ok = kk < K
        dt = Y.dtype.element_ty
        w = _gemv_rows(W, rows, ok, K, BLOCK_K)
        _pdl_enter(PDL)
        if PERSIST:
            tl.static_assert(ROWS == 1)
            x = _gemv_act(X, kk, k_ok, K, SILU_MUL, dt)
            step = tl.num_programs(0)
            for t in range(pid, tl.cdiv(N, BLOCK_R), step):
                rn = (t + step) * BLOCK_R + tl.arange(0, BLOCK_R)
                w_next = _gemv_rows(W, rn, rn < N, K, BLOCK_K)  # in flight while this tile is finished
                rows = t * BLOCK_R + tl.arange(0, BLOCK_R)
                _gemv_residual_store(w, x, R, Y, rows, rows < N, HAS_RES, dt)
                w = w_next
        else:
            for i in tl.static_range(ROWS):
                x = _gemv_act(X + i * sxm, kk, k_ok, K, SILU_MUL, dt)
                _gemv_residual_store(w, x, R + i * srm, Y + i * sym, rows, ok, HAS_RES, dt)

    @triton.jit
    def _gemv_act(X, kk, k_ok, K, SILU_MUL: tl.constexpr, dt):
        """One input row of ``_gemv_residual_kernel``: x, or silu(gate) * up of ``[gate | up]``."""
        x = tl.load(X + kk, mask=k_ok, other=0.0)
        if SILU_MUL:
            x = _silu_mul(x, tl.load(X + K + kk, mask=k_ok, other=0.0), dt)
        return x

    @triton.jit
    def _silu_mul(gate, up, dt):
        """silu(gate) * up, each rounded to the model dtype like transformers' modules."""
        g = gate.to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(dt)
        return (act.to(tl.float32) * up.to(tl.float32)).to(dt)

    @triton.jit
    def _gemv_residual_store(w, x, R, Y, rows, ok, HAS_RES: tl.constexpr, dt):
        out = _gemv_dot(w, x).to(dt)
        if HAS_RES:
            res = tl.load(R + rows, mask=ok, other=0.0)
            out = (out.to(tl.float32) + res.to(tl.float32)).to(dt)
        tl.store(Y + rows, out, mask=ok)

    @triton.jit
    def _rope_store_kernel(
        QKV, POS, INV, QO, KP, VP, SLOTS, sqm, scaling, H, HK,
        D: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, PDL: tl.constexpr,
    ):
        _pdl_enter(PDL)
        m = tl.program_id(0)
        h = tl.program_id(1)  # 0..H-1: q heads, H..H+HK-1: k heads (and the v head of the same index)
        dt = QKV.dtype.element_ty
        j = tl.arange(0, BLOCK_HALF)
        j_ok = j < HALF
        pos = tl.load(POS + m).to(tl.float32)
        ang = pos * tl.load(INV + j, mask=j_ok, other=0.0).to(tl.float32)
        src = QKV + m * sqm + h * D
        x1 = tl.load(src + j, mask=j_ok, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + j, mask=j_ok, other=0.0).to(tl.float32)
        o1, o2 = _rotate_pair(x1, x2, ang, scaling, dt)
        if h < H:
            dst = QO + (m * H + h) * D
            tl.store(dst + j, o1, mask=j_ok)
            tl.store(dst + HALF + j, o2, mask=j_ok)
        else:
            hk = h - H
            slot = tl.load(SLOTS + m)
            kdst = KP + (slot * HK + hk) * D
            tl.store(kdst + j, o1.to(KP.dtype.element_ty), mask=j_ok)
            tl.store(kdst + HALF + j, o2.to(KP.dtype.element_ty), mask=j_ok)
            vsrc = QKV + m * sqm + (H + HK + hk) * D
            vdst = VP + (slot * HK + hk) * D
            v1 = tl.load(vsrc + j, mask=j_ok, other=0.0)
            v2 = tl.load(vsrc + HALF + j, mask=j_ok, other=0.0)
            tl.store(vdst + j, v1.to(VP.dtype.element_ty), mask=j_ok)
            tl.store(vdst + HALF + j, v2.to(VP.dtype.element_ty), mask=j_ok)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def tiles(m: int, n: int, k: int, device: torch.device, n_tiles: int | None = None,
          prefetch: bool = False, block_n: int | None = None) -> tuple[int, ...]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, split, k_per_split) for an (m x k) @ (k x n) projection.

    Small m is a weight stream, bound by how many bytes are in flight: about four programs per SM,
    splitting K (deterministic split-K fix-up) when the output has too few tiles. Larger m is a GEMM tile.
    ``n_tiles``: output tiles when ``n`` is several weights side by side (each weight's rows tile separately).
    ``prefetch`` (programmatic dependent launch): when the projection fits, every program multiplies a single
    weight tile (``k_per_split == BLOCK_K``), which it loads before waiting for the previous kernel.
    ``block_n``: a fixed BLOCK_N (one attention head per tile for the rotary epilogue).
    """
    sms = num_sms(device)
    if m > 16:  # GEMM tiles; K split too when the tiles alone leave SMs idle (short prefills)
        bm, bn, bk = (32 if m <= 32 else 64), block_n or 64, max(16, min(64, triton.next_power_of_2(k)))
        tiles_mn = triton.cdiv(m, bm) * (n_tiles(bn) if callable(n_tiles) else triton.cdiv(n, bn))
        split = max(1, min(triton.cdiv(2 * sms, tiles_mn), triton.cdiv(k, 4 * bk), MAX_SPLIT))
        return bm, bn, bk, 4, 3, *_k_runs(k, split, bk)
    bn = block_n or (64 if triton.cdiv(n, 64) >= 2 * sms else 32 if n >= 32 else 16)
    tiles_n = n_tiles(bn) if callable(n_tiles) else triton.cdiv(n, bn)
    if prefetch:
        bk = max(16, min(triton.next_power_of_2(k), tuning.get().prefetch_tile // bn))
        split = triton.cdiv(k, bk)
        if split <= MAX_SPLIT and tiles_n * split <= 8 * sms:
            return 16, bn, bk, 4 if bn * bk <= 8192 else 8, 1, split, bk
    bk = max(16, min(128, triton.next_power_of_2(k)))
    split = max(1, min(triton.cdiv(4 * sms, tiles_n), triton.cdiv(k, 2 * bk), MAX_SPLIT))
    return 16, bn, bk, 4, 4, *_k_runs(k, split, bk)


def _k_runs(k: int, split: int, bk: int) -> tuple[int, int]:
    """(splits, K per split): ``split`` runs of whole BLOCK_K tiles, fewer when rounding leaves some empty."""
    k_per = triton.cdiv(triton.cdiv(k, split), bk) * bk
    return triton.cdiv(k, k_per), k_per


MAX_SPLIT = 16
#: Weight elements one program holds in registers while it waits (64 per thread at 4 warps); the default of the
#: ``prefetch_tile`` knob.
PREFETCH_TILE = tuning.DEFAULTS.prefetch_tile
_WORKSPACE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_RETIRED: list[tuple[torch.Tensor, torch.Tensor]] = []


def _workspace(device: torch.device, split: int, tiles: int, tile_elems: int):
    """Split-K partials (fp32) and per-tile arrival counters (int32, kept at zero by the kernels).

    Cached per device and grown on demand: allocate it outside CUDA-graph capture (the engine's warm-up steps do).
    Kernels using it must run in stream order (one stream per device), as the engine's steps do."""
    if split == 1:
        return None, None
    key = (device.type, device.index)
    ws, cnt = _WORKSPACE.get(key, (None, None))
    need_ws, need_cnt = split * tiles * tile_elems, tiles
    if ws is None or ws.numel() < need_ws or cnt.numel() < need_cnt:
        if torch.cuda.is_available() and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("decode_linear split-K workspace must be allocated before CUDA-graph capture")
        size_ws = max(need_ws, ws.numel() if ws is not None else 0)
        size_cnt = max(need_cnt, cnt.numel() if cnt is not None else 0)
        if ws is not None:  # captured graphs may still point at the old buffers: keep them alive
            _RETIRED.append((ws, cnt))
        ws = torch.empty(size_ws, dtype=torch.float32, device=device)
        cnt = torch.zeros(size_cnt, dtype=torch.int32, device=device)
        _WORKSPACE[key] = (ws, cnt)
    return ws, cnt


def _check_2d(name, t, k=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2 or t.stride(-1) != 1:
        raise ValueError(f"{name} must be 2-D with a unit last stride, got shape {tuple(t.shape)}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if k is not None and t.shape[1] != k:
        raise ValueError(f"{name} must have {k} columns, got shape {tuple(t.shape)}")


def norm_linear(x: torch.Tensor, weights: list[torch.Tensor], norm_weight: torch.Tensor | None = None,
                eps: float = 1e-6, biases: list[torch.Tensor | None] | None = None) -> torch.Tensor:
    """RMSNorm (optional) then one to three projections of the same input, side by side.

    Arguments:
        x: (M, K), unit last stride.
        weights: 1-3 tensors (N_i, K), contiguous, dtype of x.
        norm_weight: (K,) RMSNorm weight, or None for no norm. eps: RMSNorm epsilon.
        biases: None, or one (N_i,) tensor or None per weight.
    Returns:
        (M, sum N_i) in x's dtype.
    """
    biases = _check_norm_linear(x, weights, norm_weight, biases)
    extra = [t for t in [norm_weight, *biases] if t is not None]
    if not kernels_usable(x, *weights, *extra):
        return norm_linear_reference(x, weights, norm_weight, eps, biases if any(b is not None for b in biases)
                                     else None)
    ns = [w.shape[0] for w in weights] + [0] * (3 - len(weights))
    y = new_output((x.shape[0], sum(ns)), x.dtype, x.device)
    return _launch_norm_linear(x, weights, norm_weight, eps, biases, y, ns)


def _check_norm_linear(x, weights, norm_weight, biases) -> list:
    """Validates norm_linear's arguments; returns the biases as a list (None per weight without one)."""
    _check_2d("x", x)
    if not 1 <= len(weights) <= 3:
        raise ValueError(f"weights must hold 1 to 3 tensors, got {len(weights)}")
    k = x.shape[1]
    for i, w in enumerate(weights):
        _check_2d(f"weights[{i}]", w, k)
        if w.dtype != x.dtype or not w.is_contiguous():
            raise ValueError(f"weights[{i}] must be contiguous {x.dtype}, got {w.dtype}")
    if norm_weight is not None and tuple(norm_weight.shape) != (k,):
        raise ValueError(f"norm_weight must have shape ({k},), got {tuple(norm_weight.shape)}")
    biases = list(biases) if biases is not None else [None] * len(weights)
    if len(biases) != len(weights):
        raise ValueError(f"biases must hold one entry per weight ({len(weights)}), got {len(biases)}")
    for i, (b, w) in enumerate(zip(biases, weights)):
        if b is not None and tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"biases[{i}] must have shape ({w.shape[0]},), got {tuple(b.shape)}")
    return biases


#: Weight elements (zero padding included) one one-row program holds, and its least warps: the defaults of the
#: ``gemv_tile`` and ``gemv_warps`` knobs (chosen by probe sweeps, docs/benchmarks/NOTES.md).
GEMV_TILE = tuning.DEFAULTS.gemv_tile
GEMV_WARPS = tuning.DEFAULTS.gemv_warps
GEMV_WARP_ELEMENTS = 4096  # at most this many per warp (128 per thread): more warps for longer rows
GEMV_MAX_K = 16384
#: Input rows the one-row kernels serve (decode batches 1-2; the default of the ``gemv_max_m`` knob); more rows use
#: the GEMM tiles. Each further row adds its own post-wait chain (input load, norm and row sums, each a barrier
#: round) to every kernel, so from 3-4 rows on the tile kernels are faster (measured: docs/benchmarks/NOTES.md).
GEMV_MAX_M = tuning.DEFAULTS.gemv_max_m


def gemv_max_m() -> int:
    """Most input rows the one-row kernels take: the ``gemv_max_m`` knob (default ``GEMV_MAX_M``), or 0 with the
    ``gemv`` knob off."""
    t = tuning.get()
    return t.gemv_max_m if t.gemv else 0


def gemv_plan(m: int, k: int, pairs: bool = False) -> tuple[int, int, int] | None:
    """(BLOCK_R, BLOCK_K, num_warps) of the one-row kernels (``m`` up to :func:`gemv_max_m`: decode at batch 1
    and small batches), or None when the GEMM tiles are used instead (more rows, ``K`` above ``GEMV_MAX_K``, or
    the ``gemv`` knob off).

    Each program holds BLOCK_R whole weight rows (K padded to a power of two), ``2 * BLOCK_R`` rows when ``pairs``
    (the rotary pairs of the q/k/v epilogue), about ``GEMV_TILE`` elements: the whole tile is fetched before the
    wait for the previous kernel, and after it only the input rows, the products and a sum across each row remain
    (no split of K to fix up, no shared-memory staging of the weights for the tensor cores); each weight element
    is read once for all ``m`` rows.
    The ``gemv_tile`` and ``gemv_warps`` (the least warps) knobs override the defaults (tuning)."""
    if not 1 <= m <= gemv_max_m() or k > GEMV_MAX_K:
        return None
    t = tuning.get()
    bk = triton.next_power_of_2(k)
    per_row = bk * (2 if pairs else 1)
    rows = max(1, t.gemv_tile // per_row)
    warps = max(t.gemv_warps, rows * per_row // GEMV_WARP_ELEMENTS)
    return rows, bk, warps


GEMV_PERSISTENT_PER_SM = 2


def _gemv_programs(tiles: int, device: torch.device, allowed: bool = True) -> tuple[int, bool]:
    """(programs, persistent) for ``tiles`` one-row tiles: for one input row (not the q/k/v kernel), at most
    ``GEMV_PERSISTENT_PER_SM`` programs per SM, each walking several tiles and loading the next one's weights while
    it multiplies the current one (the ``gemv_persistent`` knob off: one program per tile). On by default: faster
    where a projection has many more tiles than SMs (a large LM head), level elsewhere (docs/benchmarks/NOTES.md)."""
    if not allowed or not tuning.get().gemv_persistent:
        return tiles, False
    programs = min(tiles, GEMV_PERSISTENT_PER_SM * num_sms(device))
    return programs, programs < tiles


def _launch_norm_linear(x, weights, norm_weight, eps, biases, y, ns, rope=None):
    m, k = x.shape
    if m == 0:
        return y
    nw = [n for n in ns if n]
    pdl = pdl_enabled(x.device)
    gemv = gemv_plan(m, k, pairs=rope is not None)
    if gemv is not None:
        return _launch_gemv_norm(x, weights, norm_weight, eps, biases, y, ns, rope, pdl, *gemv)
    bm, bn, bk, warps, stages, split, k_per = tiles(
        m, max(ns), k, x.device, n_tiles=lambda b: sum(triton.cdiv(n, b) for n in nw), prefetch=_prefetch(x.device),
        block_n=rope["head_dim"] if rope else None)
    t0, t1, t2 = (triton.cdiv(n, bn) for n in ns)
    ws, has_bias, bs = _side_by_side_args(weights, biases, x.dtype, x.device)
    grid = (triton.cdiv(m, bm), t0 + t1 + t2, split)
    work, cnt = _workspace(x.device, split, grid[0] * grid[1], bm * bn)
    r = rope or {}
    precompile.run(
        _norm_linear_kernel, grid,
        x, norm_weight if norm_weight is not None else x, *ws, *bs, y,
        work if work is not None else y, cnt if cnt is not None else y,
        m, k, ns[0], ns[1], t0, t1, ns[2], x.stride(0), y.stride(0), float(eps), k_per,
        r.get("positions", y), r.get("inv_freq", y), r.get("k_pool", y), r.get("v_pool", y), r.get("slots", y),
        float(r.get("scaling", 1.0)), int(r.get("nheads_k", 1)),
        HAS_NORM=norm_weight is not None, HAS_BIAS=has_bias, IEEE=x.dtype == torch.float32, SPLIT=split,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, ONE_TILE=k_per == bk, **_pdl_kw(pdl), ROPE=rope is not None,
        num_warps=warps, num_stages=stages,
    )
    return y


def _side_by_side_args(weights, biases, dtype, device) -> tuple[list[torch.Tensor], bool, list[torch.Tensor]]:
    """(three weight pointers, has_bias, three bias pointers) of the norm-linear kernels: unused weight slots
    repeat the first weight; a weight without bias gets a zero one when others have one (rare: mixed biases);
    without any bias the bias pointers are placeholders."""
    ws = list(weights) + [weights[0]] * (3 - len(weights))
    if not any(b is not None for b in biases):
        return ws, False, [ws[0]] * 3
    return ws, True, [b if b is not None else torch.zeros(w.shape[0], dtype=dtype, device=device)
                      for b, w in zip(list(biases) + [None] * (3 - len(biases)), ws)]


def _launch_gemv_norm(x, weights, norm_weight, eps, biases, y, ns, rope, pdl, rows, bk, warps):
    """:func:`_launch_norm_linear` for 1 to ``GEMV_MAX_M`` rows: the ``_gemv_norm_kernel`` (plan from
    :func:`gemv_plan`)."""
    m, k = x.shape
    if rope:
        d = rope["head_dim"]
        rows = min(rows, d // 2)
        t0, t1, t2 = (n // d * (d // 2 // rows) for n in ns)
    else:
        t0, t1, t2 = (triton.cdiv(n, rows) for n in ns)
    ws, has_bias, bs = _side_by_side_args(weights, biases, x.dtype, x.device)
    r = rope or {}
    programs, persist = _gemv_programs(t0 + t1 + t2, x.device, allowed=rope is None and m == 1)
    precompile.run(
        _gemv_norm_kernel, (programs,),
        x, norm_weight if norm_weight is not None else x, *ws, *bs, y,
        k, ns[0], ns[1], t0, t1, ns[2], float(eps), x.stride(0), y.stride(0),
        r.get("positions", y), r.get("inv_freq", y), r.get("k_pool", y), r.get("v_pool", y), r.get("slots", y),
        float(r.get("scaling", 1.0)), int(r.get("nheads_k", 1)),
        HAS_NORM=norm_weight is not None, HAS_BIAS=has_bias, BLOCK_R=rows, BLOCK_K=bk, **_pdl_kw(pdl),
        ROPE=rope is not None, HALF=r.get("head_dim", 2) // 2, PERSIST=persist, ROWS=m, num_warps=warps,
        num_stages=1,
    )
    return y


def norm_linear_rope(x, weights, norm_weight, eps, biases, positions, inv_freq, scaling, nheads, nheads_k, k_pool,
                     v_pool, slots) -> torch.Tensor:
    """:func:`norm_linear` of the q/k/v projections with :func:`rope_store` as its epilogue: one kernel instead of
    two. Same arguments and result as ``rope_store(norm_linear(x, weights, norm_weight, eps, biases), positions,
    inv_freq, scaling, nheads, nheads_k, k_pool, v_pool, slots)``, same rounding. Head dims 16-256 (powers of
    two) run fused; others, CPU without the interpreter, and the ``fused_rope`` knob off (for comparisons) run the
    two ops."""
    d = k_pool.shape[-1]
    if len(weights) != 3 or [w.shape[0] for w in weights] != [nheads * d, nheads_k * d, nheads_k * d]:
        raise ValueError(f"weights must be the q, k, v projections with {nheads * d}, {nheads_k * d} and "
                         f"{nheads_k * d} rows, got {[tuple(w.shape) for w in weights]}")
    biases = _check_norm_linear(x, weights, norm_weight, biases)
    extra = [t for t in [norm_weight, *biases] if t is not None]
    if (d not in (16, 32, 64, 128, 256) or not tuning.get().fused_rope
            or not kernels_usable(x, *weights, *extra, k_pool, v_pool)):
        qkv = norm_linear(x, weights, norm_weight, eps, biases)
        return rope_store(qkv, positions, inv_freq, scaling, nheads, nheads_k, k_pool, v_pool, slots)
    m = x.shape[0]
    qkv_like = torch.empty((m, (nheads + 2 * nheads_k) * d), dtype=x.dtype, device="meta")
    _check_rope(qkv_like, positions, inv_freq, nheads, nheads_k, k_pool, v_pool, slots)
    q = new_output((m, nheads, d), x.dtype, x.device)
    rope = dict(head_dim=d, positions=positions, inv_freq=inv_freq, k_pool=k_pool, v_pool=v_pool, slots=slots,
                scaling=scaling, nheads_k=nheads_k)
    _launch_norm_linear(x, weights, norm_weight, eps, biases, q.view(m, nheads * d),
                        [w.shape[0] for w in weights], rope)
    return q


def _prefetch(device: torch.device) -> bool:
    """Single-tile programs that fetch their weights before waiting: worth it when kernels launch early (PDL)."""
    return pdl_enabled(device)


def _pdl_kw(pdl: bool) -> dict:
    return {"PDL": True, "launch_pdl": True} if pdl else {"PDL": False}


def linear_residual(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None,
                    silu_mul: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """``residual + act(x) @ weight.T`` in one kernel.

    Arguments:
        x: (M, K), or (M, 2K) ``[gate | up]`` when ``silu_mul`` (act = ``silu(gate) * up``); unit last stride.
        weight: (N, K) contiguous. residual: (M, N) or None.
        out: optional (M, N) output; may be ``residual`` itself (in-place update of the residual stream).
    Returns:
        (M, N) in x's dtype (``out`` when given).
    """
    _check_2d("x", x)
    m = x.shape[0]
    k = x.shape[1] // 2 if silu_mul else x.shape[1]
    if silu_mul and x.shape[1] % 2:
        raise ValueError(f"x must hold [gate | up] (an even number of columns) with silu_mul, got {tuple(x.shape)}")
    _check_2d("weight", weight, k)
    if weight.dtype != x.dtype or not weight.is_contiguous():
        raise ValueError(f"weight must be contiguous {x.dtype}, got {weight.dtype}")
    n = weight.shape[0]
    for name, t in (("residual", residual), ("out", out)):
        if t is not None:
            _check_2d(name, t)
            if tuple(t.shape) != (m, n) or t.dtype != x.dtype:
                raise ValueError(f"{name} must be ({m}, {n}) {x.dtype}, got {tuple(t.shape)} {t.dtype}")
    tensors = [x, weight] + [t for t in (residual, out) if t is not None]
    if not kernels_usable(*tensors):
        y = linear_residual_reference(x, weight, residual, silu_mul)
        return out.copy_(y) if out is not None else y
    y = out if out is not None else new_output((m, n), x.dtype, x.device)
    if m == 0:
        return y
    pdl = pdl_enabled(x.device)
    gemv = gemv_plan(m, k)
    if gemv is not None:
        rows, bk, warps = gemv
        programs, persist = _gemv_programs(triton.cdiv(n, rows), x.device, allowed=m == 1)
        precompile.run(
            _gemv_residual_kernel, (programs,), x, weight, residual if residual is not None else y, y,
            k, n, x.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0),
            SILU_MUL=silu_mul, HAS_RES=residual is not None, BLOCK_R=rows, BLOCK_K=bk, **_pdl_kw(pdl),
            PERSIST=persist, ROWS=m, num_warps=warps, num_stages=1,
        )
        return y
    bm, bn, bk, warps, stages, split, k_per = tiles(m, n, k, x.device, prefetch=_prefetch(x.device))
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), split)
    work, cnt = _workspace(x.device, split, grid[0] * grid[1], bm * bn)
    precompile.run(
        _linear_residual_kernel, grid,
        x, weight, residual if residual is not None else y, y,
        work if work is not None else y, cnt if cnt is not None else y, m, k, n,
        x.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0), k_per,
        SILU_MUL=silu_mul, HAS_RES=residual is not None, IEEE=x.dtype == torch.float32, SPLIT=split,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, ONE_TILE=k_per == bk, **_pdl_kw(pdl), num_warps=warps,
        num_stages=stages,
    )
    return y


def rope_store(qkv: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float, nheads: int,
               nheads_k: int, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (transformers' ``rotate_half`` convention) fused with the paged K/V write.

    Arguments:
        qkv: (M, (nheads + 2 * nheads_k) * D), unit last stride: q heads, then k heads, then v heads.
        positions: (M,) int positions. inv_freq: (D/2,) fp32 rotary frequencies. scaling: cos/sin factor.
        k_pool, v_pool: (num_blocks, block_size, nheads_k, D) contiguous. slots: (M,) int64 flat slot per token.
    Returns:
        rotated q (M, nheads, D) in qkv's dtype.
    """
    _check_2d("qkv", qkv)
    m, d = qkv.shape[0], k_pool.shape[-1]
    _check_rope(qkv, positions, inv_freq, nheads, nheads_k, k_pool, v_pool, slots)
    if not kernels_usable(qkv, k_pool, v_pool):
        return rope_store_reference(qkv, positions, inv_freq, scaling, nheads, nheads_k, k_pool, v_pool, slots)
    q = new_output((m, nheads, d), qkv.dtype, qkv.device)
    if m == 0:
        return q
    precompile.run(
        _rope_store_kernel, (m, nheads + nheads_k),
        qkv, positions, inv_freq, q, k_pool, v_pool, slots, qkv.stride(0), float(scaling), nheads, nheads_k,
        D=d, HALF=d // 2, BLOCK_HALF=triton.next_power_of_2(d // 2), **_pdl_kw(pdl_enabled(qkv.device)), num_warps=1,
    )
    return q


def _check_rope(qkv, positions, inv_freq, nheads, nheads_k, k_pool, v_pool, slots):
    m, d = qkv.shape[0], k_pool.shape[-1]
    if qkv.shape[1] != (nheads + 2 * nheads_k) * d or d % 2:
        raise ValueError(f"qkv must have (nheads + 2 * nheads_k) * head_dim = {(nheads + 2 * nheads_k) * d} "
                         f"columns (even head_dim), got {tuple(qkv.shape)}")
    if tuple(inv_freq.shape) != (d // 2,):
        raise ValueError(f"inv_freq must have shape ({d // 2},), got {tuple(inv_freq.shape)}")
    if positions.shape != (m,) or slots.shape != (m,) or slots.dtype != torch.int64:
        raise ValueError(f"positions must be ({m},) and slots int64 ({m},), got {tuple(positions.shape)}, "
                         f"{slots.dtype} {tuple(slots.shape)}")
    if k_pool.shape[2:] != (nheads_k, d) or v_pool.shape != k_pool.shape or not (
            k_pool.is_contiguous() and v_pool.is_contiguous()):
        raise ValueError(f"k_pool/v_pool must be contiguous (blocks, block_size, {nheads_k}, {d}), got "
                         f"{tuple(k_pool.shape)} / {tuple(v_pool.shape)}")
