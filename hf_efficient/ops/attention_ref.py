"""Plain-PyTorch attention with flash-attn 2.x semantics.

This is the CPU path of the library and the oracle every kernel is tested against, so it favours being
obviously right over being fast: it materialises the (seqlen_q, seqlen_k) score matrix per sequence.

Semantics (shared with the kernels):

* layout ``(batch, seqlen, nheads, headdim)``; GQA/MQA when k/v have fewer heads (``nheads % nheads_k == 0``,
  query head ``h`` reads k/v head ``h // (nheads // nheads_k)``);
* ``causal`` is aligned to the bottom-right corner when ``seqlen_q != seqlen_k``: query ``i`` sees key ``j``
  iff ``j <= i + seqlen_k - seqlen_q``;
* ``window_size=(left, right)`` keeps keys with ``i + sk - sq - left <= j <= i + sk - sq + right``; ``-1``
  means unbounded on that side; ``causal`` sets ``right = 0``;
* ``softcap > 0`` maps scores ``s -> softcap * tanh(s / softcap)`` before masking;
* ``alibi_slopes`` (fp32, ``(nheads,)`` or ``(batch, nheads)``) adds ``-slope * |i + sk - sq - j|``;
* rows that see no key return 0, and their log-sum-exp is ``+inf`` (flash-attn's convention).
"""

from __future__ import annotations

import math

import torch

from ._common import window_pair

__all__ = ["attention_ref", "attention_varlen_ref", "visible_mask"]


def visible_mask(
    seqlen_q: int,
    seqlen_k: int,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    device: torch.device | str | None = None,
) -> torch.Tensor | None:
    """Boolean ``(seqlen_q, seqlen_k)`` mask of the keys each query sees, or ``None`` when it sees all."""
    left, right = window_pair(window_size)
    if causal:
        right = 0
    if left < 0 and right < 0:
        return None
    i = torch.arange(seqlen_q, device=device)[:, None] + (seqlen_k - seqlen_q)
    j = torch.arange(seqlen_k, device=device)[None, :]
    keep = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if right >= 0:
        keep &= j <= i + right
    if left >= 0:
        keep &= j >= i - left
    return keep


def _attend_one(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool,
    window_size: tuple[int, int],
    softcap: float,
    slopes: torch.Tensor | None,
    keep: torch.Tensor | None,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence. q (sq, h, d), k/v (sk, hk, d[v]); keep (h, sq, sk) dropout keep-mask or None.

    Returns out (sq, h, dv) and lse (h, sq), both in q.dtype.
    """
    sq, nheads, _ = q.shape
    sk, nheads_k, _ = k.shape
    if sk == 0:  # no keys at all: zeros (kept in the graph so gradients are defined) and lse +inf
        out = q.new_zeros(sq, nheads, v.shape[-1]) + 0 * q.sum()
        return out, torch.full((nheads, sq), float("inf"), dtype=q.dtype, device=q.device)
    groups = nheads // nheads_k
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if slopes is not None:
        i = torch.arange(sq, device=q.device)[:, None] + (sk - sq)
        j = torch.arange(sk, device=q.device)[None, :]
        dist = (i - j).abs().to(scores.dtype)
        scores = scores - slopes.to(scores.dtype)[:, None, None] * dist
    vis = visible_mask(sq, sk, causal, window_size, device=q.device)
    if vis is not None:
        scores = scores.masked_fill(~vis, float("-inf"))
    # Softmax written out so that rows which see no key give zeros (and finite gradients), not NaN.
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = row_max.masked_fill(torch.isneginf(row_max), 0.0)
    expd = torch.exp(scores - row_max)
    denom = expd.sum(dim=-1, keepdim=True)
    empty = denom == 0
    probs = expd / denom.masked_fill(empty, 1.0)
    if keep is not None:
        probs = probs * keep.to(probs.dtype) / (1.0 - dropout_p)
    out = torch.einsum("hqk,khd->qhd", probs, v)
    lse = (row_max + torch.log(denom.masked_fill(empty, 1.0))).masked_fill(empty, float("inf")).squeeze(-1)
    return out, lse


def _prepare(q, k, v, softmax_scale, window_size, alibi_slopes, dropout_p, dropout_mask):
    if q.dim() != k.dim() or k.dim() != v.dim():
        raise ValueError(f"q, k, v must have the same rank, got {q.dim()}, {k.dim()}, {v.dim()}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share head_dim, got {q.shape[-1]} and {k.shape[-1]}")
    nheads, nheads_k = q.shape[-2], k.shape[-2]
    if v.shape[-2] != nheads_k or nheads % nheads_k != 0:
        raise ValueError(
            f"nheads ({nheads}) must be a multiple of nheads_k ({nheads_k}) and v must have nheads_k heads "
            f"(got {v.shape[-2]})"
        )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0 and dropout_mask is None:
        raise ValueError("the reference needs an explicit dropout_mask when dropout_p > 0")
    window = window_pair(window_size)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if alibi_slopes is not None and alibi_slopes.shape[-1] != nheads:
        raise ValueError(f"alibi_slopes must have shape (nheads,) or (batch, nheads), got {tuple(alibi_slopes.shape)}")
    return scale, window


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    dropout_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
):
    """Attention over padded batches, computed in ``q.dtype`` (pass float64 inputs for an oracle).

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``.
        k: ``(batch, seqlen_k, nheads_k, headdim)``.
        v: ``(batch, seqlen_k, nheads_k, headdim_v)``.
        softmax_scale: defaults to ``1 / sqrt(headdim)``.
        dropout_mask: bool keep-mask ``(batch, nheads, seqlen_q, seqlen_k)``, applied after the softmax with
            ``1 / (1 - dropout_p)`` scaling.
        alibi_slopes: float ``(nheads,)`` or ``(batch, nheads)``.

    Returns:
        ``out`` ``(batch, seqlen_q, nheads, headdim_v)`` in ``q.dtype``; with ``return_lse`` also
        ``lse`` ``(batch, nheads, seqlen_q)`` in float32 (``+inf`` for rows that see no key).
    """
    scale, window = _prepare(q, k, v, softmax_scale, window_size, alibi_slopes, dropout_p, dropout_mask)
    if q.dim() != 4:
        raise ValueError(f"q must be (batch, seqlen_q, nheads, headdim), got shape {tuple(q.shape)}")
    if k.shape[0] != q.shape[0] or v.shape[:2] != k.shape[:2]:
        raise ValueError(f"batch/seqlen mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    outs, lses = [], []
    for b in range(q.shape[0]):
        slopes = None
        if alibi_slopes is not None:
            slopes = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b]
        keep = dropout_mask[b] if dropout_mask is not None else None
        o, lse = _attend_one(q[b], k[b], v[b], scale, causal, window, softcap, slopes, keep, dropout_p)
        outs.append(o)
        lses.append(lse)
    out = torch.stack(outs)
    if return_lse:
        return out, torch.stack(lses).float()
    return out


def attention_varlen_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    dropout_mask: list[torch.Tensor] | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
):
    """Attention over packed variable-length sequences (flash-attn's varlen layout).

    Args:
        q: ``(total_q, nheads, headdim)``; sequence ``b`` is ``q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]``.
        k, v: ``(total_k, nheads_k, headdim[_v])``.
        cu_seqlens_q, cu_seqlens_k: int ``(batch + 1,)``, non-decreasing, starting at 0. Empty sequences allowed.
        max_seqlen_q, max_seqlen_k: accepted for API parity; not needed here.
        dropout_mask: optional list (one per sequence) of bool ``(nheads, seqlen_q_b, seqlen_k_b)`` keep-masks.

    Returns:
        ``out`` ``(total_q, nheads, headdim_v)``; with ``return_lse`` also ``lse`` float32 ``(nheads, total_q)``.
    """
    scale, window = _prepare(q, k, v, softmax_scale, window_size, alibi_slopes, dropout_p, dropout_mask)
    if q.dim() != 3:
        raise ValueError(f"q must be (total_q, nheads, headdim), got shape {tuple(q.shape)}")
    cq = [int(x) for x in cu_seqlens_q.tolist()]
    ck = [int(x) for x in cu_seqlens_k.tolist()]
    if len(cq) != len(ck) or len(cq) < 1:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must both be (batch + 1,), got {len(cq)} and {len(ck)}")
    if cq[-1] > q.shape[0] or ck[-1] > k.shape[0]:
        raise ValueError("cu_seqlens point past the end of q/k")
    pieces, lse_pieces = [], []
    for b in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if q1 < q0 or k1 < k0:
            raise ValueError(f"cu_seqlens must be non-decreasing (sequence {b})")
        slopes = None
        if alibi_slopes is not None:
            slopes = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b]
        keep = dropout_mask[b] if dropout_mask is not None else None
        o, l_b = _attend_one(q[q0:q1], k[k0:k1], v[k0:k1], scale, causal, window, softcap, slopes, keep, dropout_p)
        pieces.append(o)
        lse_pieces.append(l_b.float())
    # Tokens outside [cu_seqlens_q[0], cu_seqlens_q[-1]) belong to no sequence: zeros, lse +inf.
    head, tail = cq[0], q.shape[0] - cq[-1]
    pieces = [q.new_zeros(head, q.shape[1], v.shape[-1]), *pieces, q.new_zeros(tail, q.shape[1], v.shape[-1])]
    inf = torch.full((q.shape[1], 1), float("inf"), device=q.device)
    lse_pieces = [inf.expand(-1, head), *lse_pieces, inf.expand(-1, tail)]
    out, lse = torch.cat(pieces), torch.cat(lse_pieces, dim=1)
    if return_lse:
        return out, lse
    return out
