"""Reference implementations shared by the sampler's tests: an independent float64 model of the processing pipeline
(support of top-k/top-p/min-p, target distribution), a chi-square goodness-of-fit p-value, and a sampler factory.

Imported as ``from sampling_reference import ...`` (tests/generation is on sys.path: rootdir import mode).
"""

from __future__ import annotations

import math

import torch

from hf_efficient.generation.sampling import BatchSampler, SamplingParams


def make_sampler(params, vocab, prompts=None, device="cpu", max_batch=None, **kw):
    sampler = BatchSampler(max_batch or len(params), vocab, device, **kw)
    for i, p in enumerate(params):
        sampler.set_slot(i, p, prompts[i] if prompts else None)
    return sampler


def ref_scaled(logits_row: torch.Tensor, p: SamplingParams, seen=()) -> torch.Tensor:
    """Penalty then temperature, in float32 exactly like transformers' processors."""
    x = logits_row.to(torch.float32).clone()
    if seen and p.repetition_penalty != 1.0:
        idx = torch.tensor(sorted(set(seen)))
        v = x[idx]
        x[idx] = torch.where(v < 0, v * p.repetition_penalty, v / p.repetition_penalty)
    if p.greedy:
        return x
    return x / torch.tensor(p.temperature, dtype=torch.float32)


def ref_support(s: torch.Tensor, p: SamplingParams, top_p=None, min_p=None) -> set[int]:
    """Tokens kept by top-k -> top-p -> min-p (float64; ties at a boundary are kept)."""
    top_p = p.top_p if top_p is None else top_p
    min_p = p.min_p if min_p is None else min_p
    vals = s.tolist()
    v = len(vals)
    order = sorted(range(v), key=lambda i: -vals[i])
    k = p.top_k if 0 < p.top_k < v else v
    kth = vals[order[k - 1]]
    keep = {i for i in range(v) if vals[i] >= kth}
    mx = max(vals)
    w = {i: math.exp(vals[i] - mx) for i in keep}
    total = sum(w.values())
    if top_p < 1.0:
        keep = {i for i in keep if sum(w[j] for j in keep if vals[j] > vals[i]) / total < top_p}
    if min_p > 0:
        keep = {i for i in keep if math.exp(vals[i] - mx) >= min_p}
    return keep


def ref_probs(logits_row, p: SamplingParams, seen=()) -> list[float]:
    s = ref_scaled(logits_row, p, seen)
    if p.greedy:
        out = [0.0] * s.numel()
        out[int(s.argmax())] = 1.0
        return out
    keep = ref_support(s, p)
    vals = s.tolist()
    mx = max(vals)
    w = [math.exp(vals[i] - mx) if i in keep else 0.0 for i in range(len(vals))]
    total = sum(w)
    return [x / total for x in w]


def chi2_pvalue(counts: list[int], probs: list[float]) -> float:
    """Pearson chi-square goodness-of-fit p-value (bins with expected count < 5 are merged)."""
    n = sum(counts)
    pairs = sorted(((pr * n, c) for pr, c in zip(probs, counts) if pr > 0), reverse=True)
    bins, acc_e, acc_c = [], 0.0, 0
    for e, c in pairs:
        if e >= 5:
            bins.append((e, c))
        else:
            acc_e, acc_c = acc_e + e, acc_c + c
    if acc_e > 0:
        bins.append((acc_e, acc_c))
    stat = sum((c - e) ** 2 / e for e, c in bins)
    df = len(bins) - 1
    if df < 1:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2.0)))
