"""The sampler's processing of a logits batch, as tensor ops on per-row parameters (no state, no host sync).

Processing order of one row (the same as transformers' ``generate``)::

    repetition penalty -> temperature -> top-k -> top-p -> min-p -> draw

Every filter becomes a per-row threshold on the processed logit (min-p from the row max; top-k and top-p from one
descending sort of the row, or a ``torch.topk`` when every row's top-k is bounded, or nothing when no row uses
them), so the kept set is ``{token: logit >= threshold}`` (ties at a boundary are kept). The draw is an inverse-CDF
lookup of one uniform number in the float64 cumulative sum, in token order, of the kept probabilities
(:func:`_block_search` over :func:`_block_cdf`). See ``docs/sampling.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["process_logits"]

_BLOCK = 128  # width of the blocks of the two-level cumulative sums


def _block_cdf(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` (B, W) non-negative float32 as blocks (B, nb, _BLOCK) (zero padded) and their float64 cumulative sums
    (B, nb). A full-width float64 scan is slow on GPUs; block sums plus one in-block scan are cheap."""
    pad = (-w.shape[1]) % _BLOCK
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    blocks = w.view(w.shape[0], -1, _BLOCK)
    return blocks, torch.cumsum(blocks.sum(dim=-1, dtype=torch.float64), dim=-1)


def _block_search(
    blocks: torch.Tensor, bcdf: torch.Tensor, target: torch.Tensor, right: bool, width: int, arange: torch.Tensor
) -> torch.Tensor:
    """First index whose inclusive cumulative sum is ``> target`` (``right``) or ``>= target``, as (B, 1) int64.

    The result is clamped to the last positive weight of its block (and to ``width - 1``): with a target below
    the total, the index always has a positive weight even where float64 rounding of the two levels disagrees.
    """
    nb = blocks.shape[1]
    b = torch.searchsorted(bcdf, target, right=right).clamp_(max=nb - 1)
    before = torch.where(b > 0, bcdf.gather(1, (b - 1).clamp(min=0)), torch.zeros_like(target))
    inner = blocks.gather(1, b[:, :, None].expand(-1, 1, _BLOCK)).squeeze(1)
    icdf = before + torch.cumsum(inner, dim=-1, dtype=torch.float64)
    j = torch.searchsorted(icdf, target, right=right)
    last = torch.where(inner > 0, arange, -1).amax(dim=-1, keepdim=True).clamp_(min=0)
    return (b * _BLOCK + torch.minimum(j, last)).clamp_(max=width - 1)


# Columns of the packed per-slot parameter tensors.
_F_TEMP, _F_TOP_P, _F_MIN_P, _F_PENALTY = range(4)
_I_TOP_K, _I_KEY, _I_STEP, _I_MAX_TOKENS = range(4)


@dataclass
class _Processed:
    """Per-row results of the processing pipeline shared by ``sample`` and the distribution queries."""

    scaled: torch.Tensor  # (B, V) float32 logits after penalty and temperature (temperature 1 for greedy rows)
    greedy: torch.Tensor  # (B,) bool
    greedy_tokens: torch.Tensor  # (B,) int64 argmax of the penalized logits
    top: torch.Tensor | None = None  # (B, 1) float32 row max of `scaled`
    threshold: torch.Tensor | None = None  # (B, 1) float32: the kept tokens are those with scaled >= threshold
    blocks: torch.Tensor | None = None  # (B, nb, _BLOCK) float32 exp(scaled - top) of kept tokens, 0 elsewhere
    bcdf: torch.Tensor | None = None  # (B, nb) float64 cumulative block sums of `blocks`
    mass: torch.Tensor | None = None  # (B, 1) float64 sum of exp(scaled - top) over the kept tokens (>= 1)


def process_logits(
    logits: torch.Tensor,
    fp: torch.Tensor,
    ip: torch.Tensor,
    seen: torch.Tensor,
    *,
    skip_penalty: bool,
    greedy_only: bool,
    candidates: int | None,
    block_ar: torch.Tensor,
) -> _Processed:
    """The processing pipeline of :meth:`BatchSampler.sample <hf_efficient.generation.sampling.BatchSampler.sample>`
    and its distribution queries, up to (not including) the draw.

    Args:
        logits: ``(B, V)`` floating point; processed in float32.
        fp: ``(B, 4)`` float32 per-row parameters, columns ``_F_*`` (temperature 0 for greedy rows).
        ip: ``(B, 4)`` int64 per-row parameters, columns ``_I_*`` (top-k in ``[1, V]``).
        seen: ``(B, V)`` bool, tokens the repetition penalty applies to.
        skip_penalty, greedy_only, candidates: the fast-path flags of ``BatchSampler.sample``.
        block_ar: ``arange(_BLOCK)`` int64 on the logits' device.
    """
    x = logits.to(torch.float32)
    if not skip_penalty:
        pen = fp[:, _F_PENALTY : _F_PENALTY + 1]
        x = torch.where(seen, torch.where(x < 0, x * pen, x / pen), x)
    temp = fp[:, _F_TEMP]
    greedy = temp == 0
    out = _Processed(scaled=x, greedy=greedy, greedy_tokens=x.argmax(dim=-1))
    if greedy_only:
        return out
    t = torch.where(greedy, torch.ones_like(temp), temp)
    s = x / t[:, None]
    top = s.amax(dim=-1, keepdim=True)
    e = torch.exp(s - top)
    # min-p: p_i >= min_p * p_max  <=>  s_i >= s_max + log(min_p).
    thr = top + torch.log(fp[:, _F_MIN_P : _F_MIN_P + 1])
    if candidates is None or candidates > 0:
        # The most likely tokens in descending order: all of them (sort), or the top `candidates` when every
        # sampled row's top_k is at most that. Both give the same thresholds.
        if candidates is None or candidates >= logits.shape[1]:
            vals = torch.sort(s, dim=-1, descending=True).values
        else:
            vals = torch.topk(s, candidates, dim=-1, sorted=True).values
        width = vals.shape[1]
        # top-k: the k-th largest value; ties with it are kept.
        k = ip[:, _I_TOP_K : _I_TOP_K + 1].clamp(max=width)
        thr_k = vals.gather(1, k - 1)
        mass_k = torch.where(s >= thr_k, e, 0.0).sum(dim=-1, keepdim=True, dtype=torch.float64)
        # top-p on the top-k distribution: the value where the descending cumulative mass reaches p * mass_k
        # (the whole tie group at the boundary is kept). When the candidates do not reach it, the cut lies at
        # or below the top-k threshold, which then decides.
        p = fp[:, _F_TOP_P : _F_TOP_P + 1]
        blocks, bcdf = _block_cdf(torch.exp(vals - top))
        target = p.to(torch.float64) * mass_k
        j_p = _block_search(blocks, bcdf, target, False, width, block_ar)
        thr_p = torch.where(p >= 1.0, torch.full_like(p, -math.inf), vals.gather(1, j_p))
        thr = torch.maximum(thr, torch.maximum(thr_k, thr_p))
    blocks, bcdf = _block_cdf(torch.where(s >= thr, e, 0.0))
    out.scaled, out.top, out.threshold = s, top, thr
    out.blocks, out.bcdf, out.mass = blocks, bcdf, bcdf[:, -1:].contiguous()
    return out
