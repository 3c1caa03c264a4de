"""Fused rotary position embedding for q and k in one kernel (``hf_efficient::rope``).

Replaces transformers' ``apply_rotary_pos_emb(q, k, cos, sin)`` (non-interleaved ``rotate_half`` convention,
``unsqueeze_dim=1``), about ten kernels (``mul``, ``slice``/``neg``/``cat`` of ``rotate_half``, ``mul``, ``add``
for each of q and k), by one launch::

    q_embed = q * cos + rotate_half(q) * sin        rotate_half(x) = cat(-x[..., d/2:], x[..., :d/2])
    k_embed = k * cos + rotate_half(k) * sin

Shapes: ``q`` (batch, heads, seq, head_dim), ``k`` (batch, kv_heads, seq, head_dim), ``cos``/``sin``
(batch or 1, seq, head_dim) as transformers' rotary embedding modules produce them. Any strides (transformers
passes ``.view(...).transpose(1, 2)`` views); outputs are new tensors with the layout of their input (what the
elementwise PyTorch expression returns). Output dtype ``promote_types(q.dtype, cos.dtype)``.

The products and the sum are rounded to the output dtype one by one, as the three PyTorch ops do, so results are
bit-identical to transformers' on GPUs (each op there computes in float32 and rounds once).

Backward: the adjoint of the rotation, ``dq = dout * cos + rotate_half^T(dout * sin)`` (a rotation by ``-sin``
when the two halves of cos/sin are equal, as in every transformers RoPE), computed by the same kernel. ``cos`` and
``sin`` get no gradient (transformers computes them under ``no_grad``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import new_output, use_custom_op

__all__ = ["rope", "rope_op", "rope_reference", "rope_supported"]


@triton.jit
def _rope_heads(X, XO, b, s, nheads, sx_b, sx_h, sx_s, sx_d, so_b, so_h, so_s, so_d, half,
                c1, c2, s1, s2, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    j = tl.arange(0, BLOCK_HALF)
    j_ok = j < half
    hh = tl.arange(0, BLOCK_H)
    xbase = X + b * sx_b + s * sx_s
    obase = XO + b * so_b + s * so_s
    for h0 in range(0, nheads, BLOCK_H):
        h = h0 + hh
        mask = (h < nheads)[:, None] & j_ok[None, :]
        xp = xbase + h[:, None].to(tl.int64) * sx_h + j[None, :] * sx_d
        op = obase + h[:, None].to(tl.int64) * so_h + j[None, :] * so_d
        x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(xp + half * sx_d, mask=mask, other=0.0).to(tl.float32)
        odt = XO.dtype.element_ty
        # first half: x1 * c1 + (-x2) * s1 ; second half: x2 * c2 + x1 * s2 (each product rounded, then the sum)
        a1 = (x1 * c1[None, :]).to(odt).to(tl.float32)
        b1 = (x2 * s1[None, :]).to(odt).to(tl.float32)
        a2 = (x2 * c2[None, :]).to(odt).to(tl.float32)
        b2 = (x1 * s2[None, :]).to(odt).to(tl.float32)
        tl.store(op, (a1 - b1).to(odt), mask=mask)
        tl.store(op + half * so_d, (a2 + b2).to(odt), mask=mask)


@triton.jit
def _rope_kernel(
    Q, K, COS, SIN, QO, KO,
    seqlen, nheads_q, nheads_k, half,
    sq_b, sq_h, sq_s, sq_d, sk_b, sk_h, sk_s, sk_d,
    sqo_b, sqo_h, sqo_s, sqo_d, sko_b, sko_h, sko_s, sko_d,
    sc_b, sc_s, sc_d, ss_b, ss_s, ss_d,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, INVERSE: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // seqlen).to(tl.int64)
    s = (pid % seqlen).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)
    j_ok = j < half
    cp = COS + b * sc_b + s * sc_s + j * sc_d
    sp = SIN + b * ss_b + s * ss_s + j * ss_d
    c1 = tl.load(cp, mask=j_ok, other=0.0).to(tl.float32)
    c2 = tl.load(cp + half * sc_d, mask=j_ok, other=0.0).to(tl.float32)
    s1 = tl.load(sp, mask=j_ok, other=0.0).to(tl.float32)
    s2 = tl.load(sp + half * ss_d, mask=j_ok, other=0.0).to(tl.float32)
    if INVERSE:
        # adjoint: out1 = x1 * c1 + x2 * s2, out2 = x2 * c2 - x1 * s1
        s1, s2 = -s2, -s1
    _rope_heads(Q, QO, b, s, nheads_q, sq_b, sq_h, sq_s, sq_d, sqo_b, sqo_h, sqo_s, sqo_d, half,
                c1, c2, s1, s2, BLOCK_H, BLOCK_HALF)
    _rope_heads(K, KO, b, s, nheads_k, sk_b, sk_h, sk_s, sk_d, sko_b, sko_h, sko_s, sko_d, half,
                c1, c2, s1, s2, BLOCK_H, BLOCK_HALF)


def _shape_error(q, k, cos, sin) -> str | None:
    if q.dim() != 4 or k.dim() != 4:
        return f"q and k must be 4-D (batch, heads, seq, head_dim), got {tuple(q.shape)} and {tuple(k.shape)}"
    b, _, s, d = q.shape
    if k.shape[0] != b or k.shape[2] != s or k.shape[3] != d:
        return f"k {tuple(k.shape)} does not match q {tuple(q.shape)} in batch, seq or head_dim"
    if d % 2:
        return f"head_dim must be even, got {d}"
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[0] not in (1, b) or t.shape[1] != s or t.shape[2] != d:
            return f"{name} must be ({b} or 1, {s}, {d}), got {tuple(t.shape)}"
    if q.dtype != k.dtype:
        return f"q and k must share a dtype, got {q.dtype} and {k.dtype}"
    return None


def rope_supported(q, k, cos, sin) -> bool:
    """Whether :func:`rope` takes these arguments (metadata only)."""
    return _shape_error(q, k, cos, sin) is None


def _out_dtype(q, cos, sin):
    return torch.promote_types(torch.promote_types(q.dtype, cos.dtype), sin.dtype)


def _launch(q, k, cos, sin, inverse: bool):
    err = _shape_error(q, k, cos, sin)
    if err:
        raise ValueError(f"rope: {err}")
    dtype = _out_dtype(q, cos, sin)
    qo = new_output(None, dtype, q.device, like=q)
    ko = new_output(None, dtype, k.device, like=k)
    b, hq, s, d = q.shape
    hk = k.shape[1]
    if q.numel() == 0 and k.numel() == 0:
        return qo, ko
    cos = cos.expand(b, s, d)
    sin = sin.expand(b, s, d)
    half = d // 2
    block_half = triton.next_power_of_2(half)
    block_h = max(1, min(triton.next_power_of_2(max(hq, hk)), max(1, 4096 // block_half)))
    _rope_kernel[(b * s,)](
        q, k, cos, sin, qo, ko,
        s, hq, hk, half,
        *_strides(q), *_strides(k), *_strides(qo), *_strides(ko),
        cos.stride(0), cos.stride(1), cos.stride(2), sin.stride(0), sin.stride(1), sin.stride(2),
        BLOCK_H=block_h, BLOCK_HALF=block_half, INVERSE=bool(inverse),
        num_warps=4 if block_h * block_half <= 2048 else 8,
    )
    return qo, ko


def _strides(t):
    sb, sh, ss, sd = t.stride()
    return sb, sh, ss, sd


@torch.library.custom_op("hf_efficient::rope", mutates_args=())
def rope_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by (cos, sin) (``inverse=True``: by the adjoint, i.e. the backward)."""
    return _launch(q, k, cos, sin, inverse)


@rope_op.register_fake
def _(q, k, cos, sin, inverse):
    err = _shape_error(q, k, cos, sin)
    if err:
        raise ValueError(f"rope: {err}")
    dtype = _out_dtype(q, cos, sin)
    return torch.empty_like(q, dtype=dtype), torch.empty_like(k, dtype=dtype)


def _setup(ctx, inputs, output):
    q, k, cos, sin, inverse = inputs
    ctx.save_for_backward(cos, sin)
    ctx.inverse = inverse
    ctx.dtypes = (q.dtype, k.dtype)


def _backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    gq, gk = rope_op(dq, dk, cos, sin, not ctx.inverse)
    return gq.to(ctx.dtypes[0]), gk.to(ctx.dtypes[1]), None, None, None


rope_op.register_autograd(_backward, setup_context=_setup)


class _RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        qo, ko = _launch(q, k, cos, sin, False)
        ctx.save_for_backward(cos, sin)
        ctx.dtypes = (q.dtype, k.dtype)
        return qo, ko

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors  # undefined output grads arrive as zeros (materialize_grads)
        gq, gk = _launch(dq, dk, cos, sin, True)
        return gq.to(ctx.dtypes[0]), gk.to(ctx.dtypes[1]), None, None


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable fused ``apply_rotary_pos_emb(q, k, cos, sin)`` (unsqueeze_dim=1); see the module docstring.

    Gradients flow to ``q`` and ``k`` only.
    """
    if use_custom_op(q, k, cos, sin):
        return rope_op(q, k, cos, sin, False)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return _RopeFunction.apply(q, k, cos, sin)
    return _launch(q, k, cos, sin, False)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(q, k, cos, sin, unsqueeze_dim: int = 1):
    """Plain-PyTorch ``apply_rotary_pos_emb`` (transformers' Llama code)."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
