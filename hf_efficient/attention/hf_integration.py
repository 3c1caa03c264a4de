"""The ``"hf_efficient"`` attention implementation for transformers.

Importing :mod:`hf_efficient` registers :func:`attention_forward` with transformers' ``AttentionInterface`` and
:func:`attention_mask` with ``AttentionMaskInterface`` under the key ``"hf_efficient"``, so that::

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="hf_efficient")

runs every attention layer through this module. The mask function hands the attention a 2-D padding mask (or
``None`` when there is no padding), like flash-attn's integration; the attention function then either runs the
dense kernel (no padding), or removes the padding and runs the variable-length kernel (padded batches, and
padding-free packed batches described by ``position_ids`` or ``cu_seq_lens_*``).

On CUDA with fp16/bf16 inputs the Triton flash kernels run; elsewhere (CPU, float32) the plain-PyTorch reference
in :mod:`hf_efficient.ops.attention_ref` does. A kernel that raises falls back to the reference with one warning.

Unsupported requests:

* ``output_attentions=True`` and attention sinks (``s_aux``) raise ``ValueError`` (use ``"eager"``);
* a 4-D (custom) attention mask falls back to SDPA with one warning (``ValueError`` if softcap is also set);
* transformers' continuous-batching paged cache falls back to SDPA with one warning.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch

from ..cache.paged import consume_pending
from ..ops.attention_ref import attention_ref, attention_varlen_ref

logger = logging.getLogger(__name__)

IMPLEMENTATION_NAME = "hf_efficient"
_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


# --------------------------------------------------------------------------------------------------- mask


def attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """Mask function for ``AttentionMaskInterface``: a ``(batch, kv_length)`` bool padding mask or ``None``.

    ``None`` means "every key of every row is real", and the attention then applies causality (and the sliding
    window) itself. A 2-D mask is sliced to the last ``kv_length`` positions (sliding-window caches hold fewer
    keys than the mask has columns).
    """
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:].to(torch.bool)
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


# --------------------------------------------------------------------------------------------------- unpadding


@dataclass
class _Varlen:
    """How a padded or packed batch maps to flash-attn's varlen layout."""

    idx_q: torch.Tensor | None  # (total_q,) indices into the flattened (batch * seqlen_q) queries; None = all
    idx_k: torch.Tensor | None  # (total_k,) indices into the flattened (batch * seqlen_k) keys; None = all
    cu_q: torch.Tensor  # int32 (batch + 1,)
    cu_k: torch.Tensor  # int32 (batch + 1,)
    max_q: int
    max_k: int
    kv_len: int  # keys beyond this column are unused slots (static caches) and are dropped


class _Memo:
    """Per-forward memo: every layer receives the same mask / position_ids tensor, so compute once.

    Keeps a few entries (models alternating full and sliding-window layers pass two masks per forward).
    """

    def __init__(self, size: int = 4):
        self.size = size
        self.entries: list[tuple] = []

    @staticmethod
    def _version(tensor: torch.Tensor) -> int:
        # Inference tensors keep no version counter; within one forward they are not modified in place.
        return -1 if tensor.is_inference() else tensor._version

    def get(self, tensor: torch.Tensor, extra):
        for ref, key, value in self.entries:
            if ref() is tensor and key == (self._version(tensor), extra):
                return value
        return None

    def put(self, tensor: torch.Tensor, extra, value):
        self.entries = [e for e in self.entries if e[0]() is not None][-(self.size - 1) :]
        self.entries.append((weakref.ref(tensor), (self._version(tensor), extra), value))
        return value


_mask_memo, _pos_memo = _Memo(), _Memo()


def _cu_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def _varlen_from_mask(mask: torch.Tensor, seqlen_q: int, seqlen_k: int) -> _Varlen:
    """Padding mask ``(batch, L)`` -> varlen description. Queries are the last ``seqlen_q`` used positions."""
    given = mask
    hit = _mask_memo.get(given, (seqlen_q, seqlen_k))
    if hit is not None:
        return hit
    batch = mask.shape[0]
    kv_len = min(mask.shape[1], seqlen_k)
    mask = mask[:, :kv_len]
    if seqlen_q != kv_len and seqlen_q > 1:
        # Keys past the last used column are empty static-cache slots: queries end at the last used column.
        cols = torch.arange(kv_len, device=mask.device)
        kv_len = int(torch.where(mask, cols + 1, 0).max())
        mask = mask[:, :kv_len]
    if seqlen_q == 1:
        q_mask = torch.ones(batch, 1, dtype=torch.bool, device=mask.device)
    else:
        q_mask = mask[:, kv_len - seqlen_q : kv_len]
    len_q, len_k = q_mask.sum(1, dtype=torch.int32), mask.sum(1, dtype=torch.int32)
    # Key indices are into (batch, seqlen_k) flattened; mask columns index the first kv_len keys.
    full_k = torch.zeros(batch, seqlen_k, dtype=torch.bool, device=mask.device)
    full_k[:, :kv_len] = mask
    info = _Varlen(
        idx_q=q_mask.reshape(-1).nonzero().view(-1),
        idx_k=full_k.reshape(-1).nonzero().view(-1),
        cu_q=_cu_from_lengths(len_q),
        cu_k=_cu_from_lengths(len_k),
        max_q=int(len_q.max()),
        max_k=int(len_k.max()),
        kv_len=kv_len,
    )
    return _mask_memo.put(given, (seqlen_q, seqlen_k), info)


def _packed_varlen(position_ids: torch.Tensor | None, kwargs: dict, total: int) -> _Varlen | None:
    """Padding-free packed batch (batch 1): from ``cu_seq_lens_*`` kwargs or from resets in ``position_ids``."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None:
        max_q = kwargs.get("max_length_q")
        max_k = kwargs.get("max_length_k")
        max_q = int(max_q) if max_q is not None else int((cu_q[1:] - cu_q[:-1]).max())
        max_k = int(max_k) if max_k is not None else int((cu_k[1:] - cu_k[:-1]).max())
        return _Varlen(None, None, cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k, total)
    if position_ids is None or position_ids.shape[0] != 1 or position_ids.shape[-1] <= 1:
        return None
    hit = _pos_memo.get(position_ids, total)
    if hit is not None:
        return hit if hit != "dense" else None
    pos = position_ids.reshape(-1)
    starts = (pos == pos.min()).nonzero().view(-1)
    if starts.numel() <= 1:
        _pos_memo.put(position_ids, total, "dense")
        return None
    cu = torch.cat([starts.to(torch.int32), torch.tensor([pos.numel()], dtype=torch.int32, device=pos.device)])
    max_len = int((cu[1:] - cu[:-1]).max())
    return _pos_memo.put(position_ids, total, _Varlen(None, None, cu, cu, max_len, max_len, total))


# --------------------------------------------------------------------------------------------------- compute


def _kernel_ok(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256


def _run(dense: bool, q, k, v, varlen: _Varlen | None, opts: dict):
    """Dense: q (b, sq, h, d); varlen: q (total, h, d). Kernel on CUDA half precision, reference otherwise."""
    if _kernel_ok(q):
        try:
            from . import flash_api

            if dense:
                return flash_api.flash_attn_func(q, k, v, **opts)
            return flash_api.flash_attn_varlen_func(
                q, k, v, varlen.cu_q, varlen.cu_k, varlen.max_q, varlen.max_k, **opts
            )
        except (ImportError, RuntimeError) as err:  # a broken kernel must not kill a training run
            warn_once("kernel", f"hf_efficient attention kernel failed ({err}); using the reference path")
    opts = dict(opts)
    dropout_p = opts.pop("dropout_p", 0.0)
    if dropout_p > 0:
        opts["dropout_p"] = dropout_p
        opts["dropout_mask"] = _dropout_masks(dense, q, k, varlen, dropout_p)
    if dense:
        return attention_ref(q, k, v, **opts)
    return attention_varlen_ref(q, k, v, varlen.cu_q, varlen.cu_k, **opts)


def _dropout_masks(dense, q, k, varlen, p):
    if dense:
        b, sq, h, _ = q.shape
        return torch.rand(b, h, sq, k.shape[1], device=q.device) >= p
    cq, ck = varlen.cu_q.tolist(), varlen.cu_k.tolist()
    h = q.shape[1]
    return [
        torch.rand(h, cq[i + 1] - cq[i], ck[i + 1] - ck[i], device=q.device) >= p for i in range(len(cq) - 1)
    ]


def _fallback_sdpa(module, query, key, value, attention_mask, reason: str, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    warn_once(reason, f"hf_efficient attention: {reason}; falling back to SDPA")
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function (``AttentionInterface`` signature).

    Args:
        query: ``(batch, nheads, seqlen_q, headdim)``.
        key, value: ``(batch, nheads_k, seqlen_k, headdim)``.
        attention_mask: ``None``, a ``(batch, L)`` bool padding mask from :func:`attention_mask`, or a custom
            4-D mask (SDPA fallback).

    Returns:
        ``(out, None)`` with ``out`` ``(batch, seqlen_q, nheads, headdim)`` in ``query.dtype``.
    """
    if kwargs.get("output_attentions", False):
        raise ValueError(
            "attn_implementation='hf_efficient' does not return attention probabilities "
            "(output_attentions=True); load the model with attn_implementation='eager' for that"
        )
    if s_aux is not None:
        raise ValueError(
            "attn_implementation='hf_efficient' does not support attention sinks (s_aux); use 'eager'"
        )
    paged_layer = consume_pending(key)
    if paged_layer is not None:
        from .paged_hf import paged_attention_forward

        return paged_attention_forward(
            module, paged_layer, query, key, value, attention_mask, scaling, sliding_window, softcap, dropout, kwargs
        )
    cache = kwargs.get("cache")
    if cache is not None and type(cache).__name__ == "PagedAttentionCache":
        return _fallback_sdpa(
            module, query, key, value, attention_mask, "transformers' paged cache is served by SDPA",
            dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs,
        )
    if attention_mask is not None and attention_mask.dim() == 4:
        if softcap:
            raise ValueError("a custom 4-D attention_mask together with softcap is not supported; use 'eager'")
        return _fallback_sdpa(
            module, query, key, value, attention_mask, "a custom 4-D attention mask was given",
            dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs,
        )

    batch, _, seqlen_q, _ = query.shape
    seqlen_k = key.shape[2]
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    if seqlen_q == 1 and attention_mask is None:
        causal = False  # one query sees the whole cache; same result, cheaper
    window = (-1, -1)
    if sliding_window is not None and seqlen_k > sliding_window:
        window = (sliding_window - 1, sliding_window - 1)
    opts = dict(
        softmax_scale=scaling,
        causal=causal,
        window_size=window,
        softcap=float(softcap) if softcap else 0.0,
        dropout_p=float(dropout),
    )
    q = query.transpose(1, 2)  # (b, s, h, d)
    k = key.transpose(1, 2)
    v = value.transpose(1, 2)

    varlen = None
    if attention_mask is not None:
        varlen = _varlen_from_mask(attention_mask, seqlen_q, seqlen_k)
    elif batch == 1:
        varlen = _packed_varlen(kwargs.get("position_ids"), kwargs, seqlen_q)
        if varlen is not None and seqlen_q != seqlen_k:
            raise ValueError(
                "packed (padding-free) batches are supported for training and prefill only (no KV cache); got "
                f"seqlen_q={seqlen_q}, seqlen_k={seqlen_k}"
            )

    if varlen is None:
        return _run(True, q, k, v, None, opts), None

    heads, dim = q.shape[2], q.shape[3]
    qf = q.reshape(batch * seqlen_q, heads, dim)
    kf = k.reshape(batch * seqlen_k, k.shape[2], dim)
    vf = v.reshape(batch * seqlen_k, v.shape[2], v.shape[3])
    if varlen.idx_q is not None:
        qf = qf.index_select(0, varlen.idx_q)
    if varlen.idx_k is not None:
        kf, vf = kf.index_select(0, varlen.idx_k), vf.index_select(0, varlen.idx_k)
    out = _run(False, qf.contiguous(), kf.contiguous(), vf.contiguous(), varlen, opts)
    if varlen.idx_q is not None:
        full = out.new_zeros(batch * seqlen_q, heads, out.shape[-1])
        out = full.index_copy(0, varlen.idx_q, out)
    return out.reshape(batch, seqlen_q, heads, out.shape[-1]), None


def register() -> None:
    """Register ``"hf_efficient"`` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION_NAME, attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION_NAME, attention_mask)
