"""Flash attention as ``torch.library`` custom ops (``hf_efficient::flash_attn_fwd`` / ``_bwd``).

The ops wrap the Triton launchers of ``flash_fwd`` and ``flash_bwd``. Each has a fake (meta)
implementation, so ``torch.compile(fullgraph=True)`` traces them without graph breaks, and the
forward op carries its backward through ``torch.library.register_autograd``.

``check_inputs`` validates everything the kernels rely on (devices, dtypes, ranks, head_dim,
strides, GQA head counts, cu_seqlens, window, block_table) and raises ``TypeError``/``ValueError``
naming the argument. It only looks at metadata, so it also runs on fake tensors;
``check_seqlen_values`` looks at the *contents* of cu_seqlens / block_table (one device->host
sync) and is skipped while tracing or capturing a CUDA graph.
"""
from __future__ import annotations

import os
import weakref

import torch

from ._common import check_scalars, interpreting, is_fake, window_pair
from .flash_bwd import flash_bwd
from .flash_fwd import flash_fwd

__all__ = ["check_inputs", "check_seqlen_values", "check_window", "flash_attn", "flash_attn_bwd",
           "flash_attn_fwd"]

_DTYPES = (torch.float16, torch.bfloat16)
#: Largest head dim the kernels take; :func:`flash_attn` zero-pads others to a multiple of HEAD_DIM_ALIGN.
MAX_HEAD_DIM = 256
HEAD_DIM_ALIGN = 8


def check_window(window_size) -> tuple[int, int]:
    """``window_size`` as ``(left, right)`` ints; any int-like pair flash-attn accepts (see ``window_pair``)."""
    return window_pair(window_size)


_checked: dict = {}  # tensor signatures _check_tensors accepted (bounded; cleared when full)
_CHECKED_MAX = 4096


def check_inputs(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                 max_seqlen_k=None, *, dropout_p=0.0, softmax_scale=None, window_size=(-1, -1),
                 softcap=0.0, alibi_slopes=None, block_table=None) -> tuple[int, int]:
    """Validate kernel inputs; raise ``TypeError``/``ValueError`` naming the offending argument.
    Returns the window as ``(left, right)``.

    The tensor checks depend on metadata only (shape, strides, dtype, device), so a signature
    that passed once is remembered and not re-checked: repeated calls (every layer, every step)
    pay one dictionary lookup instead.
    """
    tensors = (q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, block_table)
    key = None
    if all(t is None or type(t) is torch.Tensor for t in tensors):
        key = tuple(None if t is None else (t.shape, t.stride(), t.dtype, t.device) for t in tensors)
        if q.device.type == "cpu":  # allowed only while interpreting, which a test may switch off
            key += (os.environ.get("TRITON_INTERPRET", "0"),)
    if key is None or key not in _checked:
        _check_tensors(*tensors)
        if key is not None:
            if len(_checked) >= _CHECKED_MAX:
                _checked.clear()
            _checked[key] = True
    if cu_seqlens_q is not None:
        for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
            if not isinstance(m, int) or isinstance(m, bool) or m < 0:
                raise TypeError(f"{name} must be a non-negative int, got {m!r}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    check_scalars(softmax_scale, softcap)
    return check_window(window_size)


def _check_tensors(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, block_table) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float16 or bfloat16, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    device = q.device
    for name, t in (("k", k), ("v", v), ("cu_seqlens_q", cu_seqlens_q),
                    ("cu_seqlens_k", cu_seqlens_k), ("alibi_slopes", alibi_slopes),
                    ("block_table", block_table)):
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but q is on {device}; all inputs must share a device")
    if device.type == "cpu" and not interpreting():
        raise ValueError("q, k, v are CPU tensors: the flash kernels need a CUDA device "
                         "(CPU tensors run only under TRITON_INTERPRET=1)")
    if device.type not in ("cuda", "cpu", "meta"):
        raise ValueError(f"q, k, v must be CUDA tensors, got device {device}")
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    paged = block_table is not None
    if varlen and (cu_seqlens_q is None or cu_seqlens_k is None):
        raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together")
    if paged and not varlen:
        raise ValueError("block_table is supported by flash_attn_varlen_func only")
    q_rank = 3 if varlen else 4
    kv_rank = 4 if paged else q_rank
    layout = "(total_q, nheads, headdim)" if varlen else "(batch, seqlen_q, nheads, headdim)"
    if q.dim() != q_rank:
        raise ValueError(f"q must be {layout}, got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dim() != kv_rank:
            want = ("(num_blocks, block_size, nheads_k, headdim)" if paged else
                    "(total_k, nheads_k, headdim)" if varlen else
                    "(batch, seqlen_k, nheads_k, headdim)")
            raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim:
        raise ValueError(f"q and k/v must share headdim, got {head_dim} and {k.shape[-1]}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim (the last dimension of q, k, v) must be between 1 and {MAX_HEAD_DIM} "
                         f"(at most 256), got {head_dim}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{name} must be contiguous in its last dimension (stride {t.stride(-1)})")
    nheads, nheads_k = q.shape[-2], k.shape[-2]
    if nheads_k == 0 or nheads % nheads_k != 0:
        raise ValueError(f"nheads ({nheads}) must be a multiple of nheads_k ({nheads_k})")
    if varlen:
        for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != 1:
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise TypeError(f"{name} must be a 1-D int32 tensor (batch + 1,), got {got}")
            if t.shape[0] < 1:
                raise ValueError(f"{name} must have batch + 1 >= 1 entries")
            if t.stride(0) != 1 and t.shape[0] > 1:
                raise ValueError(f"{name} must be contiguous")
        if cu_seqlens_q.shape[0] != cu_seqlens_k.shape[0]:
            raise ValueError(f"cu_seqlens_q and cu_seqlens_k must both be (batch + 1,), got "
                             f"{cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}")
    else:
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"q and k/v must share the batch size, got {q.shape[0]} and {k.shape[0]}")
    batch = cu_seqlens_q.shape[0] - 1 if varlen else q.shape[0]
    if paged:
        if block_table.dtype != torch.int32 or block_table.dim() != 2:
            raise TypeError(f"block_table must be a 2-D int32 tensor (batch, max_blocks_per_seq), got "
                            f"{block_table.dtype} {tuple(block_table.shape)}")
        if block_table.shape[0] != batch:
            raise ValueError(f"block_table must have batch = {batch} rows, got {block_table.shape[0]}")
        if block_table.stride(1) != 1 and block_table.shape[1] > 1:
            raise ValueError("block_table must be contiguous in its last dimension")
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor) or alibi_slopes.dtype != torch.float32:
            raise TypeError("alibi_slopes must be a float32 tensor of shape (nheads,) or (batch, nheads)")
        if alibi_slopes.shape not in ((nheads,), (batch, nheads)):
            raise ValueError(f"alibi_slopes must have shape ({nheads},) or ({batch}, {nheads}), "
                             f"got {tuple(alibi_slopes.shape)}")
        if alibi_slopes.stride(-1) != 1 and nheads > 1:
            raise ValueError("alibi_slopes must be contiguous in its last dimension")


def _tracing_or_capturing(*tensors) -> bool:
    if torch.compiler.is_compiling():
        return True
    if any(is_fake(t) for t in tensors if t is not None):
        return True
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return True
    return False


_last_checked: tuple | None = None  # (key, weakrefs, covers) of the last device cu_seqlens that passed


def _remember_key(tensors, *ints) -> tuple | None:
    """Key under which a passing check of ``tensors`` may be remembered, or None when it must not be.

    Host (CPU) tensors are checked every call: that is cheap (no device sync), so a contents change can never
    be missed. Device tensors are remembered by identity, address, shape and in-place version counter, so the
    layers of one model step share one sync. Inference tensors (created under ``torch.inference_mode()``) keep
    no version counter, so an in-place change could not be seen: they are checked every call too.
    """
    given = [t for t in tensors if t is not None]
    if all(t.device.type == "cpu" for t in given) or any(t.is_inference() for t in given):
        return None
    return (tuple((t.data_ptr(), t._version, tuple(t.shape)) if t is not None else None for t in tensors), *ints)


def check_seqlen_values(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, total_q, total_k,
                        block_table=None, num_blocks=0, block_size=0) -> bool | None:
    """Check cu_seqlens (and block_table) contents with a single device->host sync.

    cu_seqlens_q/k: int32 (batch + 1,); block_table: int32 (batch, max_blocks) or None; the rest host ints.
    Returns whether the sequences cover every token of q (and of k/v) -- then no padding rows
    need filling -- or None when nothing was checked: under ``torch.compile`` tracing, on fake
    tensors and during CUDA graph capture. Raises ``ValueError`` naming the argument otherwise.
    A passing set of CUDA tensors with version counters is remembered (by identity and in-place
    version counter), so the layers of one model step share one sync; CPU tensors and inference
    tensors are checked on every call. Works under ``torch.inference_mode()``, ``no_grad`` and
    with grad enabled.
    """
    global _last_checked
    tensors = (cu_seqlens_q, cu_seqlens_k, block_table)
    if _tracing_or_capturing(*tensors):
        return None
    key = _remember_key(tensors, max_seqlen_q, max_seqlen_k, total_q, total_k, num_blocks, block_size)
    if key is not None and _last_checked is not None and _last_checked[0] == key and all(
            (r is None and t is None) or (r is not None and r() is t)
            for r, t in zip(_last_checked[1], tensors)):
        return _last_checked[2]
    zero = cu_seqlens_q.new_zeros(())
    dq = cu_seqlens_q.diff() if cu_seqlens_q.numel() > 1 else zero[None]
    dk = cu_seqlens_k.diff() if cu_seqlens_k.numel() > 1 else zero[None]
    stats = [dq.min(), dk.min(), dq.max(), dk.max(), cu_seqlens_q[0], cu_seqlens_q[-1],
             cu_seqlens_k[0], cu_seqlens_k[-1]]
    if block_table is not None and block_table.numel() > 0:
        stats += [block_table.min(), block_table.max()]
    vals = [int(x) for x in torch.stack(stats).tolist()]
    if vals[0] < 0 or vals[1] < 0:
        raise ValueError("cu_seqlens_q and cu_seqlens_k must be non-decreasing")
    if vals[2] > max_seqlen_q or vals[3] > max_seqlen_k:
        raise ValueError(f"max_seqlen_q/max_seqlen_k ({max_seqlen_q}, {max_seqlen_k}) are smaller than the "
                         f"longest sequence in cu_seqlens_q/cu_seqlens_k ({vals[2]}, {vals[3]})")
    if vals[4] < 0 or vals[5] > total_q:
        raise ValueError(f"cu_seqlens_q must lie in [0, total_q={total_q}], got [{vals[4]}, {vals[5]}]")
    if block_table is None:
        if vals[6] < 0 or vals[7] > total_k:
            raise ValueError(f"cu_seqlens_k must lie in [0, total_k={total_k}], got [{vals[6]}, {vals[7]}]")
    else:
        if vals[3] > block_table.shape[1] * block_size:
            raise ValueError(f"a sequence of {vals[3]} keys does not fit in block_table "
                             f"({block_table.shape[1]} blocks of {block_size})")
        if len(vals) > 8 and (vals[8] < 0 or vals[9] >= num_blocks):
            raise ValueError(f"block_table entries must lie in [0, {num_blocks}), got [{vals[8]}, {vals[9]}]")
    covers = vals[4] == 0 and vals[5] == total_q and (
        block_table is not None or (vals[6] == 0 and vals[7] == total_k))
    if key is not None:
        _last_checked = (key, tuple(weakref.ref(t) if t is not None else None for t in tensors), covers)
    return covers


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------


def _lse_shape(q, cu_seqlens_q):
    if cu_seqlens_q is not None:
        return (q.shape[1], q.shape[0])
    return (q.shape[0], q.shape[2], q.shape[1])


@torch.library.custom_op("hf_efficient::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None,
                   max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, causal: bool,
                   window_left: int, window_right: int, softcap: float,
                   alibi_slopes: torch.Tensor | None, dropout_p: float,
                   rng_seed: torch.Tensor | None, block_table: torch.Tensor | None,
                   deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward op. Returns ``out`` (like q) and float32 ``lse`` ((B, H, Sq) or (H, Tq)).

    ``deterministic`` is unused here; it travels to the backward through the autograd context.
    """
    check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                 dropout_p=dropout_p, softmax_scale=softmax_scale,
                 window_size=(window_left, window_right), softcap=softcap,
                 alibi_slopes=alibi_slopes, block_table=block_table)
    if dropout_p > 0 and (rng_seed is None or rng_seed.dtype != torch.int64 or rng_seed.numel() < 1):
        raise ValueError("dropout_p > 0 needs rng_seed, an int64 tensor of one element")
    return flash_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     softmax_scale=softmax_scale, causal=causal,
                     window_size=(window_left, window_right), softcap=softcap,
                     alibi_slopes=alibi_slopes, dropout_p=dropout_p, rng_seed=rng_seed,
                     block_table=block_table)


@flash_attn_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
      window_left, window_right, softcap, alibi_slopes, dropout_p, rng_seed, block_table,
      deterministic):
    check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                 dropout_p=dropout_p, softmax_scale=softmax_scale,
                 window_size=(window_left, window_right), softcap=softcap,
                 alibi_slopes=alibi_slopes, block_table=block_table)
    return torch.empty_like(q), q.new_empty(_lse_shape(q, cu_seqlens_q), dtype=torch.float32)


@torch.library.custom_op("hf_efficient::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor | None,
                   cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int,
                   softmax_scale: float, causal: bool, window_left: int, window_right: int,
                   softcap: float, alibi_slopes: torch.Tensor | None, dropout_p: float,
                   rng_seed: torch.Tensor | None, deterministic: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward op. Returns ``dq, dk, dv`` shaped like q, k, v."""
    check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                 dropout_p=dropout_p, softmax_scale=softmax_scale,
                 window_size=(window_left, window_right), softcap=softcap,
                 alibi_slopes=alibi_slopes)
    if dout.shape != q.shape or out.shape != q.shape:
        raise ValueError(f"dout/out must have q's shape {tuple(q.shape)}")
    if dout.dtype != q.dtype:
        dout = dout.to(q.dtype)
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    return flash_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                     max_seqlen_k, softmax_scale=softmax_scale, causal=causal,
                     window_size=(window_left, window_right), softcap=softcap,
                     alibi_slopes=alibi_slopes, dropout_p=dropout_p, rng_seed=rng_seed,
                     deterministic=deterministic)


@flash_attn_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
      softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, dropout_p,
      rng_seed, deterministic):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    (q, k, v, cu_q, cu_k, max_sq, max_sk, scale, causal, wl, wr, softcap, alibi, dropout_p,
     rng_seed, block_table, deterministic) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, alibi, rng_seed)
    ctx.params = (max_sq, max_sk, scale, causal, wl, wr, softcap, dropout_p, deterministic)
    ctx.paged = block_table is not None


def _backward(ctx, dout, dlse):
    if ctx.paged:
        raise ValueError("flash attention with block_table (paged K/V) is forward-only: no backward")
    q, k, v, out, lse, cu_q, cu_k, alibi, rng_seed = ctx.saved_tensors
    max_sq, max_sk, scale, causal, wl, wr, softcap, dropout_p, deterministic = ctx.params
    dq, dk, dv = flash_attn_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_sq, max_sk, scale, causal,
                                wl, wr, softcap, alibi, dropout_p, rng_seed, deterministic)
    return dq, dk, dv, *([None] * 14)


flash_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


class _FlashAttnFunction(torch.autograd.Function):
    """Eager-mode twin of the custom op: the same launchers with far less dispatch overhead.

    A ``torch.library`` op with Python autograd costs more host time per call than the whole
    kernel runs at short sequence lengths (docs/benchmarks/NOTES.md); eager calls therefore come here.
    The non-tensor arguments travel as one tuple (``apply`` pays per argument).
    """

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, alibi, rng_seed, block_table, params):
        max_sq, max_sk, scale, causal, wl, wr, softcap, dropout_p, deterministic, fill = params
        out, lse = flash_fwd(q, k, v, cu_q, cu_k, max_sq, max_sk, softmax_scale=scale,
                             causal=causal, window_size=(wl, wr), softcap=softcap,
                             alibi_slopes=alibi, dropout_p=dropout_p, rng_seed=rng_seed,
                             block_table=block_table, fill=fill)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, alibi, rng_seed)
        ctx.params = params
        ctx.paged = block_table is not None
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        if ctx.paged:
            raise ValueError("flash attention with block_table (paged K/V) is forward-only: no backward")
        q, k, v, out, lse, cu_q, cu_k, alibi, rng_seed = ctx.saved_tensors
        max_sq, max_sk, scale, causal, wl, wr, softcap, dropout_p, deterministic, fill = ctx.params
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        dq, dk, dv = flash_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_sq, max_sk,
                               softmax_scale=scale, causal=causal, window_size=(wl, wr),
                               softcap=softcap, alibi_slopes=alibi, dropout_p=dropout_p,
                               rng_seed=rng_seed, deterministic=deterministic, fill=fill)
        return dq, dk, dv, None, None, None, None, None, None


def flash_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
               causal, window_left, window_right, softcap, alibi_slopes, dropout_p, rng_seed,
               block_table, deterministic, fill=True):
    """Differentiable flash attention on inputs already checked by :func:`check_inputs`.

    Under ``torch.compile`` this is the ``hf_efficient::flash_attn_fwd`` op (traced through its
    fake implementation, no graph break); in eager mode an ``autograd.Function`` calling the
    same launchers. Returns ``(out, lse)`` as the op does. ``fill=False`` (eager only) skips
    zeroing varlen rows outside every sequence; pass it when ``check_seqlen_values`` said the
    sequences cover all tokens.

    A head dim that is not a multiple of 8 (flash-attn accepts any up to 256) is zero-padded to
    the next multiple of 8 for the kernels, as flash-attn does: zero columns change no ``q . k``
    product and give zero output columns, which are sliced off (``out`` is then a view of the
    padded result); gradients flow back through the padding. ``softmax_scale`` is used as given
    (callers pass ``1 / sqrt(original head_dim)`` by default). With ``block_table`` the padding
    copies the whole paged K/V pool on every call.
    """
    head_dim = q.shape[-1]
    pad = -head_dim % HEAD_DIM_ALIGN
    if pad:
        q, k, v = (torch.nn.functional.pad(t, (0, pad)) for t in (q, k, v))
    out, lse = _flash_attn_aligned(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                                   causal, window_left, window_right, softcap, alibi_slopes, dropout_p, rng_seed,
                                   block_table, deterministic, fill)
    return (out[..., :head_dim], lse) if pad else (out, lse)


def _flash_attn_aligned(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                        causal, window_left, window_right, softcap, alibi_slopes, dropout_p, rng_seed,
                        block_table, deterministic, fill):
    if torch.compiler.is_compiling() or is_fake(q) or is_fake(k) or is_fake(v):
        return flash_attn_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                              softmax_scale, causal, window_left, window_right, softcap, alibi_slopes,
                              dropout_p, rng_seed, block_table, deterministic)
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        # nothing to differentiate (inference, generation prefill): skip the autograd node
        return flash_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         softmax_scale=softmax_scale, causal=causal, window_size=(window_left, window_right),
                         softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p, rng_seed=rng_seed,
                         block_table=block_table, fill=fill)
    return _FlashAttnFunction.apply(
        q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, rng_seed, block_table,
        (max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right, softcap,
         dropout_p, deterministic, fill))
