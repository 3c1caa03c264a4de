"""Fused RMSNorm (``hf_efficient::rms_norm``, ``hf_efficient::rms_norm_add``), forward and backward in Triton.

One kernel replaces the ~8 elementwise/reduction kernels of transformers' ``LlamaRMSNorm.forward``::

    input_dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(input_dtype)                      # cast_before_weight=True (Llama, Mistral, Qwen2/3)

and, with ``cast_before_weight=False``, the Gemma-style variant ``(h * (offset + weight.float())).to(input_dtype)``
(Gemma/Gemma2 use ``offset=1.0``).

Semantics kept exactly: the sum of squares, ``rsqrt`` and the scaling are float32; in the Llama variant the normalized
row is rounded to the input dtype *before* the multiplication by ``weight`` and the product is rounded once to
``promote_types(x.dtype, weight.dtype)`` (what ``weight * h.to(input_dtype)`` returns, e.g. float32 for an fp32 weight
under bf16 autocast activations). Only the order of the float32 summation and the ``rsqrt`` implementation may
differ from PyTorch's, so results agree to the last bit almost always and otherwise to one rounding of the output
dtype.

:func:`rms_norm_add` also folds the residual add that precedes a norm in a decoder layer:
``s = x + residual`` (rounded to the input dtype, as PyTorch does), returns ``(rms_norm(s), s)``.

Backward: one kernel computes ``dx`` row by row (recomputing ``rstd`` from ``x`` instead of saving it) and, per
program, a float32 partial sum of ``dweight`` over its rows; the partials are summed afterwards (one small
reduction kernel). Gradients follow the straight-through convention for the intermediate rounding (as autograd of
the reference does, with the weight product taken in float32 rather than in the input dtype).

Entry points:

- :func:`rms_norm` / :func:`rms_norm_add`: differentiable; in eager mode an ``autograd.Function`` (low host
  overhead), under ``torch.compile`` the custom ops (traced through their fake implementations, no graph break).
- :func:`rms_norm_reference`: the plain-PyTorch semantics, for tests.

Inputs must live on CUDA (or on CPU under ``TRITON_INTERPRET=1``); any float dtype Triton supports. The last
dimension must be contiguous after ``reshape(-1, hidden)`` (other layouts are copied once).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import interpreting, new_output, num_sms, use_custom_op

__all__ = [
    "MAX_FUSED_HIDDEN",
    "fusable",
    "rms_norm",
    "rms_norm_add",
    "rms_norm_backward_op",
    "rms_norm_op",
    "rms_norm_add_op",
    "rms_norm_reference",
]

#: Rows wider than this are not fused (one program holds a whole row in registers).
MAX_FUSED_HIDDEN = 65536

_FUSABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------
# Dispatch helpers (fusable is also used by decode_linear and the fused-layer patches)
# ----------------------------------------------------------------------------------------------


def fusable(*tensors: torch.Tensor) -> bool:
    """Whether the fused kernels can take these tensors: CUDA (or CPU under the Triton interpreter, where bf16
    is excluded because the interpreter mishandles bf16 arithmetic), fp16/bf16/fp32, all on one device.

    Looks at metadata only, so it is safe inside CUDA-graph capture and on fake tensors while tracing.
    """
    device = tensors[0].device
    for t in tensors:
        if t.device != device or t.dtype not in _FUSABLE_DTYPES:
            return False
    if device.type == "cuda":
        return True
    if device.type == "cpu" and interpreting():
        return all(t.dtype != torch.bfloat16 for t in tensors)
    return False


def num_programs_hint(device: torch.device) -> int:
    """Programs that keep every SM busy (a few per SM); small on the CPU interpreter."""
    return 4 * num_sms(device)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_fwd_kernel(
    X, R, W, Y, S,
    n_rows, N, sx, sr, sy, ss,
    eps, offset,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_RES: tl.constexpr, CAST_BEFORE_W: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)

    x = tl.load(X + rows64[:, None] * sx + cols[None, :], mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(R + rows64[:, None] * sr + cols[None, :], mask=mask, other=0.0)
        # the sum is rounded to the input dtype, as `residual + hidden_states` is
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(S + rows64[:, None] * ss + cols[None, :], x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=1) / N
    rstd = tl.math.rsqrt(var + eps)
    h = xf * rstd[:, None]
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    if CAST_BEFORE_W:
        y = h.to(X.dtype.element_ty).to(tl.float32) * w[None, :]
    else:
        y = h * (w[None, :] + offset)
    tl.store(Y + rows64[:, None] * sy + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, W, DRES, DX, DW,
    n_rows, N, rows_per_program, sdy, sx, sdres, sdx,
    eps, offset,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DRES: tl.constexpr, HAS_DW: tl.constexpr, CAST_BEFORE_W: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    if not CAST_BEFORE_W:
        w = w + offset
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    start = pid * rows_per_program
    end = tl.minimum(start + rows_per_program, n_rows)
    for r0 in range(start, end, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        row_ok = rows < end
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * sx + cols[None, :], mask=mask, other=0.0)
        xf = x.to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(xf * xf, axis=1) / N + eps)
        h = xf * rstd[:, None]
        dy = tl.load(DY + rows64[:, None] * sdy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_DW:
            if CAST_BEFORE_W:
                dw += tl.sum(dy * h.to(X.dtype.element_ty).to(tl.float32), axis=0)
            else:
                dw += tl.sum(dy * h, axis=0)
        g = dy * w[None, :]
        c = tl.sum(g * h, axis=1) / N
        dx = (g - h * c[:, None]) * rstd[:, None]
        if HAS_DRES:
            dx += tl.load(DRES + rows64[:, None] * sdres + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows64[:, None] * sdx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    if HAS_DW:
        tl.store(DW + pid.to(tl.int64) * N + cols, dw, mask=col_ok)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _rows2d(t: torch.Tensor, n: int) -> torch.Tensor:
    t2 = t.reshape(-1, n)
    if t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


def _block(n: int) -> tuple[int, int]:
    block_n = triton.next_power_of_2(n)
    num_warps = 4 if block_n <= 2048 else 8 if block_n <= 8192 else 16
    return block_n, num_warps


def _out_dtype(x: torch.Tensor, weight: torch.Tensor, cast_before_weight: bool) -> torch.dtype:
    return torch.promote_types(x.dtype, weight.dtype) if cast_before_weight else x.dtype


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> None:
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rms_norm: weight must be (hidden,) = ({x.shape[-1]},), got {tuple(weight.shape)}")
    if x.shape[-1] > MAX_FUSED_HIDDEN:
        raise ValueError(f"rms_norm: hidden size {x.shape[-1]} exceeds {MAX_FUSED_HIDDEN}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError("rms_norm_add: residual must have x's shape and dtype, got "
                         f"{tuple(residual.shape)} {residual.dtype} vs {tuple(x.shape)} {x.dtype}")


def _fwd(x, weight, residual, eps, offset, cast_before_weight):
    _check(x, weight, residual)
    n = x.shape[-1]
    x2 = _rows2d(x, n)
    rows = x2.shape[0]
    y = new_output(x.shape, _out_dtype(x, weight, cast_before_weight), x.device)
    s = new_output(x.shape, x.dtype, x.device) if residual is not None else None
    if rows == 0:
        return y, s
    r2 = _rows2d(residual, n) if residual is not None else x2
    y2 = y.view(-1, n)
    s2 = s.view(-1, n) if s is not None else y2
    block_n, num_warps = _block(n)
    rows_per = max(1, min(triton.next_power_of_2(rows), 4096 // block_n, 16))
    grid = (triton.cdiv(rows, rows_per),)
    _rms_norm_fwd_kernel[grid](
        x2, r2, weight, y2, s2,
        rows, n, x2.stride(0), r2.stride(0), y2.stride(0), s2.stride(0),
        float(eps), float(offset),
        ROWS=rows_per, BLOCK_N=block_n, HAS_RES=residual is not None,
        CAST_BEFORE_W=bool(cast_before_weight), num_warps=num_warps,
    )
    return y, s


def _bwd(dy, x, weight, dres, eps, offset, cast_before_weight, need_dw=True):
    n = x.shape[-1]
    x2 = _rows2d(x, n)
    dy2 = _rows2d(dy, n)
    rows = x2.shape[0]
    dx = new_output(x.shape, x.dtype, x.device)
    if rows == 0:
        return dx, torch.zeros_like(weight) if need_dw else None
    dres2 = _rows2d(dres, n) if dres is not None else dy2
    dx2 = dx.view(-1, n)
    block_n, num_warps = _block(n)
    rows_per = max(1, min(triton.next_power_of_2(rows), 2048 // block_n, 8))
    programs = max(1, min(num_programs_hint(x.device), triton.cdiv(rows, rows_per)))
    rows_per_program = triton.cdiv(triton.cdiv(rows, programs), rows_per) * rows_per
    programs = triton.cdiv(rows, rows_per_program)
    dw_part = torch.empty((programs, n), dtype=torch.float32, device=x.device) if need_dw else dx2
    _rms_norm_bwd_kernel[(programs,)](
        dy2, x2, weight, dres2, dx2, dw_part,
        rows, n, rows_per_program, dy2.stride(0), x2.stride(0), dres2.stride(0), dx2.stride(0),
        float(eps), float(offset),
        ROWS=rows_per, BLOCK_N=block_n, HAS_DRES=dres is not None, HAS_DW=need_dw,
        CAST_BEFORE_W=bool(cast_before_weight), num_warps=num_warps,
    )
    dw = dw_part.sum(0).to(weight.dtype) if need_dw else None
    return dx, dw


# ----------------------------------------------------------------------------------------------
# Custom ops (torch.compile / export)
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("hf_efficient::rms_norm", mutates_args=())
def rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float,
                cast_before_weight: bool) -> torch.Tensor:
    """RMSNorm of the last dimension of ``x`` (see the module docstring for the exact semantics)."""
    return _fwd(x, weight, None, eps, offset, cast_before_weight)[0]


@rms_norm_op.register_fake
def _(x, weight, eps, offset, cast_before_weight):
    _check(x, weight)
    return x.new_empty(x.shape, dtype=_out_dtype(x, weight, cast_before_weight))


@torch.library.custom_op("hf_efficient::rms_norm_add", mutates_args=())
def rms_norm_add_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, offset: float,
                    cast_before_weight: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual``; returns ``(rms_norm(s), s)``."""
    return _fwd(x, weight, residual, eps, offset, cast_before_weight)


@rms_norm_add_op.register_fake
def _(x, residual, weight, eps, offset, cast_before_weight):
    _check(x, weight, residual)
    return x.new_empty(x.shape, dtype=_out_dtype(x, weight, cast_before_weight)), x.new_empty(x.shape)


@torch.library.custom_op("hf_efficient::rms_norm_backward", mutates_args=())
def rms_norm_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, dres: torch.Tensor | None,
                         eps: float, offset: float, cast_before_weight: bool
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of both norm ops: ``(dx, dweight)``; ``x`` is the normalized input (the sum ``s`` for
    ``rms_norm_add``, whose gradient ``dres`` is added to ``dx``)."""
    return _bwd(dy, x, weight, dres, eps, offset, cast_before_weight)


@rms_norm_backward_op.register_fake
def _(dy, x, weight, dres, eps, offset, cast_before_weight):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)


def _setup_norm(ctx, inputs, output):
    x, weight, eps, offset, cast = inputs
    ctx.save_for_backward(x, weight)
    ctx.params = (eps, offset, cast)


def _backward_norm(ctx, dy):
    x, weight = ctx.saved_tensors
    dx, dw = rms_norm_backward_op(dy, x, weight, None, *ctx.params)
    return dx, dw, None, None, None


rms_norm_op.register_autograd(_backward_norm, setup_context=_setup_norm)


def _setup_norm_add(ctx, inputs, output):
    x, residual, weight, eps, offset, cast = inputs
    ctx.save_for_backward(output[1], weight)
    ctx.params = (eps, offset, cast)


def _backward_norm_add(ctx, dy, ds):
    s, weight = ctx.saved_tensors
    dx, dw = rms_norm_backward_op(dy, s, weight, ds, *ctx.params)
    return dx, dx, dw, None, None, None


rms_norm_add_op.register_autograd(_backward_norm_add, setup_context=_setup_norm_add)


# ----------------------------------------------------------------------------------------------
# Eager path
# ----------------------------------------------------------------------------------------------


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset, cast):
        y, _ = _fwd(x, weight, None, eps, offset, cast)
        ctx.save_for_backward(x, weight)
        ctx.params = (eps, offset, cast)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx, dw = _bwd(dy, x, weight, None, *ctx.params, need_dw=ctx.needs_input_grad[1])
        return dx, dw, None, None, None


class _RMSNormAddFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps, offset, cast):
        y, s = _fwd(x, weight, residual, eps, offset, cast)
        ctx.save_for_backward(s, weight)
        ctx.params = (eps, offset, cast)
        return y, s

    @staticmethod
    def backward(ctx, dy, ds):
        s, weight = ctx.saved_tensors
        dx, dw = _bwd(dy, s, weight, ds, *ctx.params, need_dw=ctx.needs_input_grad[2])
        return dx, dx, dw, None, None, None


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, offset: float = 0.0,
             cast_before_weight: bool = True) -> torch.Tensor:
    """Differentiable fused RMSNorm over the last dimension.

    ``cast_before_weight=True`` (default): Llama semantics ``weight * normalized.to(x.dtype)``, output dtype
    ``promote_types(x.dtype, weight.dtype)``; ``offset`` is then ignored (must be 0). ``False``: Gemma semantics
    ``(normalized * (offset + weight.float())).to(x.dtype)``.
    """
    if cast_before_weight and offset != 0.0:
        raise ValueError("rms_norm: offset is only supported with cast_before_weight=False")
    if use_custom_op(x, weight):
        return rms_norm_op(x, weight, float(eps), float(offset), bool(cast_before_weight))
    if _needs_grad(x, weight):
        return _RMSNormFunction.apply(x, weight, float(eps), float(offset), bool(cast_before_weight))
    return _fwd(x, weight, None, eps, offset, cast_before_weight)[0]


def rms_norm_add(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
                 offset: float = 0.0, cast_before_weight: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` (rounded to x's dtype) then :func:`rms_norm` of ``s``, in one kernel.

    Returns ``(normed, s)``; ``s`` is the new residual stream.
    """
    if cast_before_weight and offset != 0.0:
        raise ValueError("rms_norm_add: offset is only supported with cast_before_weight=False")
    if use_custom_op(x, residual, weight):
        return rms_norm_add_op(x, residual, weight, float(eps), float(offset), bool(cast_before_weight))
    if _needs_grad(x, residual, weight):
        return _RMSNormAddFunction.apply(x, residual, weight, float(eps), float(offset), bool(cast_before_weight))
    return _fwd(x, weight, residual, eps, offset, cast_before_weight)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, offset: float = 0.0,
                       cast_before_weight: bool = True, residual: torch.Tensor | None = None):
    """Plain-PyTorch RMSNorm with the same semantics (transformers' Llama / Gemma code).

    With ``residual`` returns ``(normed, x + residual)`` like :func:`rms_norm_add`.
    """
    if residual is not None:
        s = x + residual
        return rms_norm_reference(s, weight, eps, offset=offset, cast_before_weight=cast_before_weight), s
    input_dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if cast_before_weight:
        return weight * h.to(input_dtype)
    return (h * (offset + weight.float())).to(input_dtype)
