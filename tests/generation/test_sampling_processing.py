"""The sampler's processing of logits and its draws.

Checked against an independent float64 reference of the processing pipeline (support of top-k/top-p/min-p, target
distribution), against transformers' repetition penalty, and statistically (chi-square goodness of fit of the drawn
tokens: the sampler is lossless); the fast paths draw the same tokens as the full sort.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sampling_reference import (  # tests/generation is on sys.path (rootdir import mode)
    chi2_pvalue,
    make_sampler,
    ref_probs,
    ref_scaled,
    ref_support,
)

from hf_efficient.generation.sampling import SAMPLING_EPS, BatchSampler, SamplingParams
from hf_efficient.generation.sampling.processing import _BLOCK, _block_cdf, _block_search

# ---------------------------------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_equals_argmax(dtype):
    g = torch.Generator().manual_seed(1)
    b, v = 48, 997
    logits = torch.randn(b, v, generator=g).to(dtype)
    logits[::3] = torch.randint(-3, 3, (16, v), generator=g).to(dtype)  # many ties: lowest index wins
    params = [SamplingParams(temperature=0.0) if i % 2 == 0 else SamplingParams(temperature=0.8) for i in range(b)]
    sampler = make_sampler(params, v)
    tok, lp = sampler.sample(logits)
    want = logits.argmax(-1)
    assert torch.equal(tok[::2], want[::2])
    assert torch.equal(lp[::2], torch.zeros(b // 2))
    greedy = make_sampler([SamplingParams(temperature=0.0)] * b, v)
    assert greedy.static_flags(b) == {"greedy_only": True, "skip_penalty": True, "candidates": 0}
    tok2, lp2 = greedy.sample(logits, **greedy.static_flags(b))
    assert torch.equal(tok2, want) and torch.equal(lp2, torch.zeros(b))
    _, raw = greedy.sample(logits, logprobs="raw")
    want_raw = torch.log_softmax(logits.float(), -1).gather(1, want[:, None]).squeeze(1)
    torch.testing.assert_close(raw, want_raw)


def test_temperature_to_zero_limit():
    g = torch.Generator().manual_seed(2)
    b, v = 256, 50
    logits = torch.randn(b, v, generator=g) * 2
    top2 = logits.topk(2, -1).values
    ok = (top2[:, 0] - top2[:, 1]) > 0.05  # rows with a clear argmax
    prev = None
    for t in (1.0, 0.3, 0.1, 0.03):
        s = make_sampler([SamplingParams(temperature=t)] * b, v)
        p_max = s.processed_logprobs(logits).exp().gather(1, logits.argmax(-1, keepdim=True)).squeeze(1)
        if prev is not None:
            assert torch.all(p_max >= prev - 1e-6)  # mass of the argmax grows as temperature falls
        prev = p_max
    for t in (1e-3, 2 * SAMPLING_EPS, SAMPLING_EPS / 2):
        s = make_sampler([SamplingParams(temperature=t, seed=i) for i in range(b)], v)
        for _ in range(3):
            tok, _ = s.sample(logits)
            assert torch.equal(tok[ok], logits.argmax(-1)[ok])


# ---------------------------------------------------------------------------------------------------- support


def _support(sampler, logits, **flags):
    lp = sampler.processed_logprobs(logits, **flags)
    return [set(torch.nonzero(row > -math.inf).flatten().tolist()) for row in lp]


def _valid_candidates(params_list):
    """Every ``candidates`` value valid for these rows (None always; K >= all top_k; 0 without top-k/top-p)."""
    sampled = [p for p in params_list if not p.greedy]
    out = [None]
    if all(p.top_k > 0 for p in sampled) and sampled:
        k = max(p.top_k for p in sampled)
        out += [k, k + 3]
    if all(p.top_k == 0 and p.top_p == 1.0 for p in sampled):
        out.append(0)
    return out


@pytest.mark.parametrize(
    "probs,params,want",
    [
        ([0.3, 0.25, 0.2, 0.15, 0.1], SamplingParams(top_k=3), {0, 1, 2}),
        ([0.3, 0.2, 0.2, 0.2, 0.1], SamplingParams(top_k=2), {0, 1, 2, 3}),  # ties at the k-th value kept
        ([0.5, 0.3, 0.15, 0.05], SamplingParams(top_p=0.7), {0, 1}),
        ([0.5, 0.3, 0.15, 0.05], SamplingParams(top_p=0.85), {0, 1, 2}),
        ([0.5, 0.3, 0.15, 0.05], SamplingParams(top_p=0.45), {0}),
        ([0.4, 0.3, 0.2, 0.1], SamplingParams(top_k=2, top_p=0.5), {0}),  # top-p on the renormalized top-k
        ([0.4, 0.3, 0.2, 0.1], SamplingParams(top_p=0.5), {0, 1}),
        ([0.5, 0.2, 0.1, 0.05, 0.15], SamplingParams(min_p=0.3), {0, 1, 4}),
        ([0.5, 0.2, 0.1, 0.05, 0.15], SamplingParams(min_p=1.0), {0}),
        ([0.35, 0.2, 0.2, 0.15, 0.1], SamplingParams(top_k=4, top_p=0.6, min_p=0.5), {0, 1, 2}),
        ([0.05, 0.4, 0.3, 0.25], SamplingParams(temperature=0.5, top_p=0.6), {1, 2}),  # 0.51, 0.29, 0.2
    ],
)
def test_crafted_support(probs, params, want):
    logits = torch.tensor([probs]).log() + 3.0
    sampler = make_sampler([params.replace(seed=0)], len(probs))
    for cand in _valid_candidates([params]):
        assert _support(sampler, logits, candidates=cand) == [want], cand
    drawn = {int(sampler.sample(logits, observe=False)[0]) for _ in range(400)}
    assert drawn == want


def test_ties_beyond_the_candidates_are_kept():
    """bf16 logits tie often: a top-k boundary tie group reaching past the topk() candidates is kept whole."""
    v = 30
    logits = torch.zeros(1, v)
    logits[0, 3] = 2.0
    logits[0, [7, 11, 19, 25, 28]] = 1.0  # tie group at the 2nd..6th value
    for params, want in [
        (SamplingParams(top_k=2, seed=0), {3, 7, 11, 19, 25, 28}),
        (SamplingParams(top_k=3, top_p=0.5, seed=0), {3, 7, 11, 19, 25, 28}),
        (SamplingParams(top_k=3, top_p=0.2, seed=0), {3}),
    ]:
        s = make_sampler([params], v)
        for cand in (None, params.top_k, 4):
            assert _support(s, logits, candidates=cand) == [want]


def test_fast_paths_draw_the_same_tokens():
    """Tokens and logprobs do not depend on which valid fast path the batch takes."""
    g = torch.Generator().manual_seed(11)
    b, v = 32, 500
    logits = (torch.randn(b, v, generator=g) * 2).to(torch.bfloat16)  # bf16: ties at boundaries
    groups = [
        [SamplingParams(temperature=0.2 + 0.05 * i, top_k=1 + i % 40, top_p=0.5 + i / 70, seed=i) for i in range(b)],
        [SamplingParams(temperature=0.8, min_p=0.02 * (i % 5), repetition_penalty=1.0, seed=i) for i in range(b)],
        [SamplingParams(temperature=0.0 if i % 3 == 0 else 1.1, top_k=5, seed=i) for i in range(b)],
    ]
    for params in groups:
        s = make_sampler(params, v, prompts=[[1, 2, 3]] * b)
        state = s.save_state()
        flags = s.static_flags(b)
        outs = []
        for cand in _valid_candidates(params):
            for skip in {False, flags["skip_penalty"]}:
                s.restore_state(state)
                outs.append([s.sample(logits, candidates=cand, skip_penalty=skip) for _ in range(3)])
        s.restore_state(state)
        outs.append([s.sample(logits, **flags) for _ in range(3)])
        for other in outs[1:]:
            for (t0, l0), (t1, l1) in zip(outs[0], other):
                assert torch.equal(t0, t1) and torch.equal(l0, l1)


def test_masked_logits_never_drawn():
    v = 64
    logits = torch.randn(4, v)
    logits[:, ::2] = -math.inf
    logits[3, :] = -math.inf
    logits[3, 7] = 0.0
    sampler = make_sampler([SamplingParams(), SamplingParams(top_p=0.999), SamplingParams(min_p=1e-9),
                            SamplingParams(top_k=10)], v)
    for _ in range(200):
        tok, lp = sampler.sample(logits, observe=False)
        assert torch.all(tok % 2 == 1) and int(tok[3]) == 7 and torch.all(torch.isfinite(lp))


_PARAM_GRID = dict(
    temperature=st.sampled_from([0.0, 0.25, 0.7, 1.0, 1.6]),
    top_k=st.sampled_from([0, 1, 2, 3, 7, 40]),
    top_p=st.sampled_from([1.0, 0.95, 0.8, 0.5, 0.3, 0.05]),
    min_p=st.sampled_from([0.0, 0.02, 0.1, 0.4]),
    repetition_penalty=st.sampled_from([1.0, 1.3, 0.8]),
)


@settings(
    max_examples=120, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    data=st.data(),
    vocab=st.integers(1, 24),
    params=st.builds(SamplingParams, seed=st.integers(0, 2**64 - 1), **_PARAM_GRID),
)
def test_property_support_and_draws(data, vocab, params):
    # Logits on a coarse grid: ties at every boundary are common.
    logits = torch.tensor([data.draw(st.lists(st.integers(-24, 24), min_size=vocab, max_size=vocab))]) / 4.0
    seen = data.draw(st.lists(st.integers(0, vocab - 1), max_size=6))
    sampler = make_sampler([params], vocab, prompts=[seen])
    (support,) = _support(sampler, logits)
    for cand in _valid_candidates([params]):
        assert _support(sampler, logits, candidates=cand) == [support]
    s = ref_scaled(logits[0], params, seen)
    if params.greedy:
        assert support == {int(s.argmax())}
    else:
        tol = 1e-4
        small = ref_support(s, params, top_p=params.top_p * (1 - tol), min_p=min(1.0, params.min_p * (1 + tol)))
        big = ref_support(s, params, top_p=min(1.0, params.top_p * (1 + tol)), min_p=params.min_p * (1 - tol))
        assert small <= support <= big
    lp_full = sampler.processed_logprobs(logits)
    assert abs(float(torch.logsumexp(lp_full.double(), -1))) < 1e-5
    for _ in range(8):
        tok, lp = sampler.sample(logits, observe=False)
        t = int(tok)
        assert t in support
        assert float(lp) == pytest.approx(float(lp_full[0, t]), abs=1e-5)


# ---------------------------------------------------------------------------------------------------- penalty


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(3)
    b, v = 4, 300
    logits = torch.randn(b, v, generator=g) * 3
    ids = torch.randint(0, v, (b, 40), generator=g)
    penalties = [1.3, 0.7, 2.0, 1.0]
    sampler = make_sampler([SamplingParams(repetition_penalty=p) for p in penalties], v, prompts=ids.tolist())
    got = sampler.processed_logits(logits)
    for i, pen in enumerate(penalties):
        want = RepetitionPenaltyLogitsProcessor(penalty=pen)(ids[i : i + 1], logits[i : i + 1].clone())
        torch.testing.assert_close(got[i : i + 1], want, rtol=0, atol=0)
    assert sampler.static_flags(b) == {"greedy_only": False, "skip_penalty": False, "candidates": 0}


def test_observe_penalizes_generated_tokens():
    v = 16
    logits = torch.zeros(1, v)
    logits[0, 5] = 4.0
    logits[0, 6] = 3.0
    sampler = make_sampler([SamplingParams(temperature=0.0, repetition_penalty=2.0)], v, prompts=[[1]])
    assert int(sampler.sample(logits)[0]) == 5  # 4 > 3
    assert int(sampler.sample(logits)[0]) == 6  # 5 seen: 4 / 2 = 2 < 3
    assert sampler.seen[0].nonzero().flatten().tolist() == [1, 5, 6]
    sampler.observe(torch.tensor([9]))
    assert bool(sampler.seen[0, 9])


# ---------------------------------------------------------------------------------------------------- distribution


_DIST_CASES = [
    (SamplingParams(), ()),
    (SamplingParams(temperature=0.7, top_k=6), ()),
    (SamplingParams(temperature=1.2, top_p=0.8), ()),
    (SamplingParams(min_p=0.15, repetition_penalty=1.8), (0, 3, 5, 9)),
    (SamplingParams(temperature=0.8, top_k=8, top_p=0.9, min_p=0.05, repetition_penalty=1.3), (1, 2)),
]


@pytest.mark.parametrize("case", range(len(_DIST_CASES)))
def test_sampled_distribution_matches_target(case):
    """Chi-square goodness of fit of 20k draws (100 slots x 200 steps) against the reference distribution."""
    params, seen = _DIST_CASES[case]
    v, slots, steps = 12, 100, 200
    logits_row = torch.tensor([2.0, 1.5, 1.4, -0.3, 0.9, 0.2, 0.0, -1.0, 1.1, 0.5, -0.6, 0.7])
    torch.manual_seed(1234 + case)  # unseeded requests draw their seeds from torch's generator
    plist = [params if i % 2 else params.replace(seed=10_000 * case + i) for i in range(slots)]
    sampler = make_sampler(plist, v, prompts=[list(seen)] * slots)
    logits = logits_row.expand(slots, v)
    counts = torch.zeros(v, dtype=torch.long)
    for _ in range(steps):
        tok, _ = sampler.sample(logits, observe=False)
        counts += torch.bincount(tok, minlength=v)
    want = ref_probs(logits_row, params, seen)
    assert all(w > 0 for w, c in zip(want, counts.tolist()) if c > 0), "drew a token outside the support"
    pval = chi2_pvalue(counts.tolist(), want)
    assert pval > 1e-3, (counts.tolist(), want, pval)
    torch.testing.assert_close(
        sampler.processed_logprobs(logits[:1]).exp().double(), torch.tensor([want], dtype=torch.float64),
        rtol=1e-5, atol=1e-6,
    )


def test_distribution_across_seeds_in_one_step():
    """20k rows with distinct seeds drawn in a single call."""
    v, b = 8, 20_000
    logits_row = torch.tensor([1.0, 0.8, 0.3, 0.0, -0.5, 1.2, -2.0, 0.4])
    params = SamplingParams(temperature=0.9, top_p=0.95)
    sampler = BatchSampler(b, v)
    for i in range(b):
        sampler.set_slot(i, params.replace(seed=i))
    tok, _ = sampler.sample(logits_row.expand(b, v), observe=False)
    want = ref_probs(logits_row, params)
    assert chi2_pvalue(torch.bincount(tok, minlength=v).tolist(), want) > 1e-3


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=1.0), SamplingParams(top_p=0.9), SamplingParams(top_k=9, temperature=1.3)],
    ids=["plain", "top_p", "top_k"],
)
def test_distribution_over_a_multi_block_vocab(params):
    """Mass spread over many blocks of the two-level cumulative sums (vocab 1000, blocks of 128)."""
    v, slots, steps = 1000, 200, 100
    hot = [0, 127, 128, 255, 300, 511, 640, 777, 900, 999]
    logits_row = torch.full((v,), -1.0)
    logits_row[hot] = torch.tensor([3.0, 2.5, 2.9, 1.0, 2.0, 2.2, 1.5, 2.7, 0.5, 2.4])
    flags = {"candidates": 16} if params.top_k else {}
    sampler = make_sampler([params.replace(seed=i) for i in range(slots)], v)
    counts = torch.zeros(v, dtype=torch.long)
    for _ in range(steps):
        tok, _ = sampler.sample(logits_row.expand(slots, v), observe=False, **flags)
        counts += torch.bincount(tok, minlength=v)
    want = ref_probs(logits_row, params)
    assert all(want[t] > 0 for t in torch.nonzero(counts).flatten().tolist())
    other = [t for t in range(v) if t not in hot]
    c = [int(counts[t]) for t in hot] + [int(counts[other].sum())]
    w = [want[t] for t in hot] + [sum(want[t] for t in other)]
    assert chi2_pvalue(c, w) > 1e-3, (c, w)


def test_block_search_matches_brute_force():
    g = torch.Generator().manual_seed(9)
    b, width = 64, 3 * _BLOCK + 17
    w = torch.rand(b, width, generator=g)
    w[w < 0.7] = 0.0  # long zero stretches, whole zero blocks
    w[:8, _BLOCK : 2 * _BLOCK] = 0.0
    w[:, 0] = 1.0
    blocks, bcdf = _block_cdf(w)
    cdf = torch.cumsum(w.double(), -1)
    ar = torch.arange(_BLOCK)
    for frac in (0.0, 0.3, 0.5, 0.999999, 1 - 2**-52):
        target = cdf[:, -1:] * frac
        for right in (True, False):
            got = _block_search(blocks, bcdf, target, right, width, ar)
            want = torch.searchsorted(cdf, target, right=right).clamp(max=width - 1)
            assert torch.all(w.gather(1, got) > 0)
            # Equal except where float64 rounding of the two summation orders could decide.
            near = (cdf.gather(1, got) - target).abs() < 1e-9
            assert torch.all((got == want) | near)
