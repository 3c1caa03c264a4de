"""The ``"hf_efficient"`` attention when the model's cache is a :class:`~hf_efficient.cache.PagedCache`.

``PagedLayer.update`` hands the new k/v to the attention unchanged; here they are written into the layer's block
pools (padding dropped) and attention runs over the pages:

* prefill (no tokens stored yet): the variable-length flash path over the new tokens;
* decode / verification (every sequence adds the same 1..16 real tokens): the paged decode op over the block table;
* anything else (chunked prefill, padded new tokens): the stored tokens are gathered per sequence and the
  variable-length path runs with bottom-right causal alignment.
"""

from __future__ import annotations

import torch

from ..cache.paged import PagedLayer
from ..ops.kv_store import store_kv
from .compute import attention, run
from .varlen import Varlen, cu_from_lengths

MAX_DECODE_QUERIES = 16


def _decode_op():
    try:
        from ..ops import paged_decode
    except ImportError:
        return None
    return getattr(paged_decode, "paged_decode_attention", None)


def paged_attention_forward(
    module,
    layer: PagedLayer,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    sliding_window: int | None,
    softcap: float | None,
    dropout: float,
    kwargs: dict,
):
    """query ``(batch, nheads, q_len, d)``, key/value ``(batch, nheads_k, q_len, d)`` (new tokens only)."""
    cache = layer._cache
    batch, heads, q_len, dim = query.shape
    q_mask = attention_mask[:, -q_len:] if attention_mask is not None else None
    if not getattr(cache, "external_plan", False) and (layer.layer_idx == 0 or cache.plan is None):
        plan = cache.plan_step(q_len, q_mask if q_mask is not None else _all(batch, q_len, query.device), query.device)
    else:
        plan = cache.plan
        if plan.q_len != q_len:
            raise RuntimeError(f"PagedCache step planned for {plan.q_len} new tokens, layer got {q_len}")

    nheads_k, dim_v = key.shape[1], value.shape[-1]
    k_flat = layer.k_pool.view(-1, nheads_k, dim)
    v_flat = layer.v_pool.view(-1, nheads_k, dim_v)
    if plan.q_idx is None and plan.write_rows is None:
        # Every new token is real and stored: one launch writes K and V from the module's layout.
        store_kv(key, value, layer.k_pool, layer.v_pool, plan.write_slots)
    else:
        k_new = key.transpose(1, 2).reshape(batch * q_len, nheads_k, dim)
        v_new = value.transpose(1, 2).reshape(batch * q_len, nheads_k, dim_v)
        if plan.q_idx is not None:
            k_new, v_new = k_new.index_select(0, plan.q_idx), v_new.index_select(0, plan.q_idx)
        if plan.write_rows is not None:
            if plan.group_check is not None and layer.layer_idx == 0:
                lead, follow = plan.group_check
                if not torch.allclose(k_new[lead], k_new[follow], rtol=1e-3, atol=1e-3):
                    raise ValueError("PagedCache(prompt_group_size=n) got groups whose prompts differ")
            k_new, v_new = k_new.index_select(0, plan.write_rows), v_new.index_select(0, plan.write_rows)
        k_flat.index_copy_(0, plan.write_slots, k_new.to(k_flat.dtype))
        v_flat.index_copy_(0, plan.write_slots, v_new.to(v_flat.dtype))

    if not any(plan.lens_before):
        # Prefill: nothing stored before, so attention over the new tokens is the whole story.
        return attention(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
            sliding_window=sliding_window, softcap=softcap, is_causal=True, **kwargs,
        )

    window = (sliding_window - 1, sliding_window - 1) if sliding_window else (-1, -1)
    opts = dict(
        softmax_scale=scaling, causal=True, window_size=window, softcap=float(softcap) if softcap else 0.0
    )
    q = query.transpose(1, 2)  # (b, q_len, h, d)
    decode = _decode_op()
    if (
        decode is not None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and plan.q_idx is None
        and q_len <= MAX_DECODE_QUERIES
        and all(n == q_len for n in plan.n_new)
    ):
        out = decode(
            q.contiguous(), layer.k_pool, layer.v_pool, plan.cache_seqlens, plan.block_table,
            max_seqlen_k=plan.max_seqlen, **opts
        )
        return out, None

    slots, cu_k, max_k = cache.gather_index(plan, query.device)
    k_all, v_all = k_flat.index_select(0, slots), v_flat.index_select(0, slots)
    qf = q.reshape(batch * q_len, heads, dim)
    if plan.q_idx is not None:
        qf = qf.index_select(0, plan.q_idx)
    cu_q = cu_from_lengths(torch.tensor(plan.n_new, dtype=torch.int32)).to(query.device)
    # built from the step plan: valid by construction, and the real new tokens / stored tokens are exactly the rows
    varlen = Varlen(None, None, cu_q, cu_k, max(plan.n_new), max_k, 0, covers=True)
    out = run(False, qf.contiguous(), k_all, v_all, varlen, opts)
    if plan.q_idx is not None:
        out = out.new_zeros(batch * q_len, heads, dim_v).index_copy(0, plan.q_idx, out)
    return out.reshape(batch, q_len, heads, dim_v), None


def _all(batch, q_len, device):
    return torch.ones(batch, q_len, dtype=torch.bool, device=device)
