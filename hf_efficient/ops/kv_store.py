"""Write new K/V tokens into paged-cache pools: one kernel for both tensors, any input strides.

The decode path of :class:`~hf_efficient.cache.PagedCache` stores one token per sequence per layer; doing it with
``transpose -> reshape -> index_copy_`` costs four launches (two copies, two scatters) per layer. This op reads
``key``/``value`` in the layout transformers' attention modules hand over (``(batch, nheads_k, seqlen, headdim)``,
any strides with a unit last stride) and writes each token's heads to its flat pool slot in one launch.
"""

from __future__ import annotations

import torch

from ._common import interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - Linux installs carry triton
    triton = None

__all__ = ["store_kv", "store_kv_reference"]


def store_kv_reference(key, value, k_pool, v_pool, slots) -> None:
    """key/value ``(B, Hk, T, D)``; pools ``(num_blocks, block_size, Hk, D)``; slots int64 ``(B*T,)``, -1 = skip."""
    b, hk, t, d = key.shape
    keep = slots >= 0
    k_rows = key.transpose(1, 2).reshape(b * t, hk, d)[keep]
    v_rows = value.transpose(1, 2).reshape(b * t, hk, value.shape[-1])[keep]
    k_pool.view(-1, hk, d).index_copy_(0, slots[keep], k_rows.to(k_pool.dtype))
    v_pool.view(-1, hk, value.shape[-1]).index_copy_(0, slots[keep], v_rows.to(v_pool.dtype))


if triton is not None:

    @triton.jit
    def _store_kv_kernel(
        k_ptr, v_ptr, kp_ptr, vp_ptr, slot_ptr, T,
        skb, skh, skt, svb, svh, svt, kps, kph, vps, vph,
        D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ):
        row = tl.program_id(0)
        h = tl.program_id(1)
        b = row // T
        t = row % T
        slot = tl.load(slot_ptr + row)
        if slot >= 0:
            d = tl.arange(0, BLOCK_D)
            kx = tl.load(k_ptr + b * skb + h * skh + t * skt + d, mask=d < D)
            tl.store(kp_ptr + slot * kps + h * kph + d, kx.to(kp_ptr.dtype.element_ty), mask=d < D)
            dv = tl.arange(0, BLOCK_DV)
            vx = tl.load(v_ptr + b * svb + h * svh + t * svt + dv, mask=dv < DV)
            tl.store(vp_ptr + slot * vps + h * vph + dv, vx.to(vp_ptr.dtype.element_ty), mask=dv < DV)


def _use_kernel(key: torch.Tensor) -> bool:
    if triton is None:
        return False
    return key.is_cuda or (key.device.type == "cpu" and interpreting())


def store_kv(key, value, k_pool, v_pool, slots) -> None:
    """Store ``key``/``value`` ``(B, Hk, T, D[v])`` into the pools at ``slots`` (int64 ``(B*T,)``, row ``b*T+t``;
    ``-1`` skips a token). Pools are ``(num_blocks, block_size, Hk, D[v])`` and contiguous. No host sync."""
    b, hk, t, d = key.shape
    dv = value.shape[-1]
    if value.shape[:3] != key.shape[:3]:
        raise ValueError(f"value must be (B, Hk, T, Dv) like key {tuple(key.shape)}, got {tuple(value.shape)}")
    if k_pool.shape[2:] != (hk, d) or v_pool.shape[2:] != (hk, dv):
        raise ValueError(f"pools {tuple(k_pool.shape)} / {tuple(v_pool.shape)} do not match heads/head_dim")
    if slots.shape != (b * t,) or slots.dtype != torch.int64:
        raise ValueError(f"slots must be int64 of shape ({b * t},), got {slots.dtype} {tuple(slots.shape)}")
    if not (_use_kernel(key) and key.stride(-1) == 1 and value.stride(-1) == 1
            and k_pool.is_contiguous() and v_pool.is_contiguous()):
        store_kv_reference(key, value, k_pool, v_pool, slots)
        return
    if b * t == 0:
        return
    _store_kv_kernel[(b * t, hk)](
        key, value, k_pool, v_pool, slots, t,
        key.stride(0), key.stride(1), key.stride(2), value.stride(0), value.stride(1), value.stride(2),
        hk * d, d, hk * dv, dv,
        D=d, DV=dv, BLOCK_D=triton.next_power_of_2(d), BLOCK_DV=triton.next_power_of_2(dv),
    )
