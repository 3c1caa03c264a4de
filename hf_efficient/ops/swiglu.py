"""Fused SwiGLU gate: ``silu(gate) * up`` in one kernel (``hf_efficient::silu_mul``), forward and backward.

``LlamaMLP.forward`` is ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``; this op is the ``act_fn(g) * u`` part
(two kernels in PyTorch, plus their intermediate tensor). ``silu(g)`` is computed in float32 and rounded to the
input dtype before the product, which is rounded once more, as PyTorch's two ops do, so results are bit-identical
to ``F.silu(g) * u`` up to the ``exp`` implementation.

Backward (float32 math, one kernel): ``dgate = dout * up * sigmoid(g) * (1 + g * (1 - sigmoid(g)))`` and
``dup = dout * silu(g)``.

``gate`` and ``up`` must have one shape and dtype; non-contiguous inputs are copied once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import new_output, use_custom_op

__all__ = ["silu_mul", "silu_mul_backward_op", "silu_mul_op", "silu_mul_reference"]

_BLOCK = 1024


@triton.jit
def _silu_mul_fwd_kernel(G, U, OUT, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(G.dtype.element_ty).to(tl.float32)
    tl.store(OUT + offs, (act * u).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_bwd_kernel(DOUT, G, U, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dout = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    act = g * sig
    dg = dout * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(DG + offs, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dout * act).to(DU.dtype.element_ty), mask=mask)


def _check(gate, up):
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"silu_mul: gate and up must share shape and dtype, got {tuple(gate.shape)} "
                         f"{gate.dtype} and {tuple(up.shape)} {up.dtype}")


def _fwd(gate, up):
    _check(gate, up)
    gate, up = gate.contiguous(), up.contiguous()
    out = new_output(gate.shape, gate.dtype, gate.device)
    n = gate.numel()
    if n:
        _silu_mul_fwd_kernel[(triton.cdiv(n, _BLOCK),)](gate, up, out, n, BLOCK=_BLOCK, num_warps=4)
    return out


def _bwd(dout, gate, up):
    gate, up, dout = gate.contiguous(), up.contiguous(), dout.to(gate.dtype).contiguous()
    dg = new_output(gate.shape, gate.dtype, gate.device)
    du = new_output(gate.shape, gate.dtype, gate.device)
    n = gate.numel()
    if n:
        _silu_mul_bwd_kernel[(triton.cdiv(n, _BLOCK),)](dout, gate, up, dg, du, n, BLOCK=_BLOCK, num_warps=4)
    return dg, du


@torch.library.custom_op("hf_efficient::silu_mul", mutates_args=())
def silu_mul_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``."""
    return _fwd(gate, up)


@silu_mul_op.register_fake
def _(gate, up):
    _check(gate, up)
    return gate.new_empty(gate.shape)


@torch.library.custom_op("hf_efficient::silu_mul_backward", mutates_args=())
def silu_mul_backward_op(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dgate, dup)`` of :func:`silu_mul_op`."""
    return _bwd(dout, gate, up)


@silu_mul_backward_op.register_fake
def _(dout, gate, up):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dout):
    gate, up = ctx.saved_tensors
    return silu_mul_backward_op(dout, gate, up)


silu_mul_op.register_autograd(_backward, setup_context=_setup)


class _SiluMulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _fwd(gate, up)

    @staticmethod
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        return _bwd(dout, gate, up)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Differentiable fused ``F.silu(gate) * up``."""
    if use_custom_op(gate, up):
        return silu_mul_op(gate, up)
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SiluMulFunction.apply(gate, up)
    return _fwd(gate, up)


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch: ``F.silu(gate) * up``."""
    return F.silu(gate) * up
