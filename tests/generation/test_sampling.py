"""BatchSampler / SamplingParams / StopStringMatcher.

The sampler is checked against an independent float64 reference of the processing pipeline (support of
top-k/top-p/min-p, target distribution), against transformers' repetition penalty, statistically (chi-square
goodness of fit of the drawn tokens: the sampler is lossless), for per-request seed reproducibility, and for the
absence of host synchronisation (Dynamo full-graph tracing on CPU, CUDA-graph capture on GPU).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_efficient.generation.sampling import (
    SAMPLING_EPS,
    BatchSampler,
    SamplingParams,
    StopMatch,
    StopStringMatcher,
    counter_uniform,
    counter_uniform_reference,
    stream_key,
)

# ---------------------------------------------------------------------------------------------------- helpers


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


# ---------------------------------------------------------------------------------------------------- params


@pytest.mark.parametrize(
    "name,value",
    [
        ("n", 0),
        ("n", 1.5),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("top_k", -2),
        ("top_k", 2.0),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("min_p", -0.01),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("max_tokens", 0),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", 5),
        ("stop", [""]),
        ("stop", [3]),
        ("ignore_eos", 1),
        ("seed", 1.0),
        ("seed", "7"),
        ("logprobs", "yes"),
    ],
)
def test_invalid_params_raise_naming_the_field(name, value):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{name} must be"):
        SamplingParams(**{name: value})
    with pytest.raises(ValueError, match=rf"SamplingParams\.{name} must be"):
        SamplingParams().replace(**{name: value})


def test_params_normalization_and_help():
    p = SamplingParams(top_k=-1, stop="###", stop_token_ids=(2, 3), temperature=1)
    assert p.top_k == 0 and p.stop == ["###"] and p.stop_token_ids == [2, 3]
    assert isinstance(p.temperature, float)
    assert SamplingParams(temperature=0).greedy and SamplingParams(temperature=SAMPLING_EPS / 2).greedy
    assert not SamplingParams(temperature=SAMPLING_EPS).greedy
    import dataclasses

    for f in dataclasses.fields(SamplingParams):
        assert f.metadata.get("help"), f.name


def test_from_generation_config_mapping():
    from transformers import GenerationConfig

    p = SamplingParams.from_generation_config(GenerationConfig())
    assert p.greedy and p.top_k == 0 and p.repetition_penalty == 1.0 and p.max_tokens == 16 and p.n == 1
    p = SamplingParams.from_generation_config(GenerationConfig(do_sample=True))
    assert p.temperature == 1.0 and p.top_k == 50 and p.top_p == 1.0 and p.min_p == 0.0  # transformers' defaults
    gc = GenerationConfig(
        do_sample=True, temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
        max_new_tokens=99, eos_token_id=[2, 3], num_return_sequences=4, stop_strings=["\n\n"],
    )
    p = SamplingParams.from_generation_config(gc)
    assert (p.temperature, p.top_k, p.top_p, p.min_p) == (0.7, 20, pytest.approx(0.9), pytest.approx(0.05))
    assert p.repetition_penalty == pytest.approx(1.1) and p.max_tokens == 99 and p.n == 4
    assert p.stop_token_ids == [2, 3] and p.stop == ["\n\n"]
    p = SamplingParams.from_generation_config(gc, max_new_tokens=7, seed=11, logprobs=True)
    assert p.max_tokens == 7 and p.seed == 11 and p.logprobs
    # Greedy ignores the sampling fields but keeps the repetition penalty.
    p = SamplingParams.from_generation_config(
        GenerationConfig(do_sample=False, top_k=5, repetition_penalty=1.3, eos_token_id=0)
    )
    assert p.greedy and p.top_k == 0 and p.repetition_penalty == pytest.approx(1.3) and p.stop_token_ids == [0]
    # Neutral values of unsupported fields are fine.
    SamplingParams.from_generation_config(GenerationConfig(num_beams=1, typical_p=1.0, no_repeat_ngram_size=0))


@pytest.mark.parametrize(
    "kwargs,names",
    [
        ({"num_beams": 4}, ["num_beams"]),
        ({"do_sample": True, "typical_p": 0.9}, ["typical_p"]),
        ({"penalty_alpha": 0.6, "top_k": 4}, ["penalty_alpha"]),
        ({"no_repeat_ngram_size": 3}, ["no_repeat_ngram_size"]),
        ({"bad_words_ids": [[5]]}, ["bad_words_ids"]),
        ({"min_new_tokens": 3}, ["min_new_tokens"]),
        ({"num_beams": 2, "do_sample": True, "epsilon_cutoff": 3e-4}, ["num_beams", "epsilon_cutoff"]),
    ],
)
def test_from_generation_config_unsupported_fields(kwargs, names):
    from transformers import GenerationConfig

    gc = GenerationConfig()
    for k, v in kwargs.items():  # set after construction: skip transformers' own validation
        setattr(gc, k, v)
    with pytest.raises(ValueError, match="not supported") as err:
        SamplingParams.from_generation_config(gc)
    for name in names:
        assert name in str(err.value)


def test_from_generation_config_greedy_with_several_sequences_raises():
    from transformers import GenerationConfig

    gc = GenerationConfig()
    gc.num_return_sequences = 3
    with pytest.raises(ValueError, match="num_return_sequences"):
        SamplingParams.from_generation_config(gc)


# ---------------------------------------------------------------------------------------------------- RNG


def test_counter_uniform_matches_reference_and_is_uniform():
    g = torch.Generator().manual_seed(0)
    keys = torch.randint(-(2**63), 2**63 - 1, (64,), generator=g, dtype=torch.int64)
    steps = torch.randint(0, 2**40, (64,), generator=g, dtype=torch.int64)
    got = counter_uniform(keys, steps)
    want = [counter_uniform_reference(int(k), int(s)) for k, s in zip(keys, steps)]
    assert got.dtype == torch.float64 and got.tolist() == want
    assert stream_key(5, 0) != stream_key(5, 1) != stream_key(6, 0)
    # Uniformity over keys x steps (consecutive steps of consecutive seeds: the worst case for a weak hash).
    k = torch.tensor([stream_key(s) for s in range(200)]).repeat_interleave(250)
    t = torch.arange(250).repeat(200)
    u = counter_uniform(k, t)
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    counts = torch.bincount((u * 50).long(), minlength=50).tolist()
    assert chi2_pvalue(counts, [1 / 50] * 50) > 1e-3
    lag = (u[1:] - 0.5) * (u[:-1] - 0.5)  # serial correlation along a stream
    assert abs(float(lag.mean())) < 0.005


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
    from hf_efficient.generation.sampling import _BLOCK, _block_cdf, _block_search

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


# ---------------------------------------------------------------------------------------------------- seeds


def _run_request(params, logits_seq, slot, batch, neighbour_seed, slots_perm=False, prompt=(3, 4)):
    """Tokens drawn by one request placed in ``slot`` of a batch of ``batch`` rows with random neighbours."""
    v = logits_seq.shape[-1]
    g = torch.Generator().manual_seed(neighbour_seed)
    sampler = BatchSampler(batch + 2, v, generator=g)
    for s in range(batch):
        if s != slot:
            sampler.set_slot(s, SamplingParams(temperature=1.3, repetition_penalty=1.5), [s])
    sampler.set_slot(slot, params, list(prompt))
    perm = torch.randperm(batch, generator=g) if slots_perm else torch.arange(batch)
    out = []
    for logits in logits_seq:
        rows = torch.randn(batch, v, generator=g)
        rows[(perm == slot).nonzero().item()] = logits
        tok, lp = sampler.sample(rows, slots=perm if slots_perm else None)
        out.append((int(tok[(perm == slot).nonzero().item()]), float(lp[(perm == slot).nonzero().item()])))
    return out


def test_seeded_request_reproducible_across_slots_and_neighbours():
    v = 40
    logits_seq = torch.randn(30, v, generator=torch.Generator().manual_seed(5)) * 2
    params = SamplingParams(temperature=0.9, top_p=0.95, repetition_penalty=1.2, seed=1234)
    a = _run_request(params, logits_seq, slot=0, batch=2, neighbour_seed=1)
    b = _run_request(params, logits_seq, slot=5, batch=8, neighbour_seed=2)
    c = _run_request(params, logits_seq, slot=3, batch=6, neighbour_seed=3, slots_perm=True)
    assert a == b == c
    assert len({t for t, _ in a}) > 5  # it really samples
    d = _run_request(params.replace(seed=1235), logits_seq, slot=0, batch=2, neighbour_seed=1)
    assert [t for t, _ in d] != [t for t, _ in a]


def test_samples_of_one_request_use_distinct_streams():
    v = 50
    logits = torch.zeros(4, v)
    sampler = BatchSampler(4, v)
    p = SamplingParams(seed=7)
    for i in range(4):
        sampler.set_slot(i, p, sample_index=i)
    draws = torch.stack([sampler.sample(logits)[0] for _ in range(20)], 1)
    assert len({tuple(r) for r in draws.tolist()}) == 4


def test_unseeded_requests_follow_torch_generator():
    v = 50
    logits = torch.zeros(3, v)

    def run():
        s = make_sampler([SamplingParams()] * 3, v)
        return torch.stack([s.sample(logits)[0] for _ in range(10)]).tolist()

    torch.manual_seed(0)
    a = run()
    torch.manual_seed(0)
    assert run() == a
    assert run() != a


def test_move_slot_and_resume_keep_the_stream():
    v = 30
    logits_seq = torch.randn(12, v, generator=torch.Generator().manual_seed(6))
    params = SamplingParams(temperature=1.0, repetition_penalty=1.4, seed=99)
    ref = make_sampler([params], v, prompts=[[1, 2]])
    want = [int(ref.sample(lg[None])[0]) for lg in logits_seq]

    s = BatchSampler(4, v)
    s.set_slot(3, params, [1, 2])
    got = []
    for lg in logits_seq[:6]:
        rows = torch.randn(4, v)
        rows[3] = lg
        got.append(int(s.sample(rows)[0][3]))
    s.move_slot(3, 1)
    assert s.slot_params[3] is None and s.slot_params[1] is params
    for lg in logits_seq[6:9]:
        got.append(int(s.sample(lg[None].expand(2, v).contiguous())[0][1]))
    # Preempted: a new sampler resumes from the context with seed_offset = tokens drawn so far.
    r = BatchSampler(2, v)
    r.set_slot(0, params, [1, 2, *got], seed_offset=len(got))
    for lg in logits_seq[9:]:
        got.append(int(r.sample(lg[None])[0][0]))
    assert got == want


# ---------------------------------------------------------------------------------------------------- engine helpers


def test_logprobs_modes():
    g = torch.Generator().manual_seed(7)
    v = 100
    logits = torch.randn(3, v, generator=g)
    params = [SamplingParams(temperature=0.5, top_k=10, seed=1), SamplingParams(seed=2), SamplingParams(temperature=0)]
    s = make_sampler(params, v)
    state = s.save_state()
    proc_full = s.processed_logprobs(logits)
    tok, proc, raw = s.sample(logits, logprobs="both")
    torch.testing.assert_close(proc, proc_full.gather(1, tok[:, None]).squeeze(1))
    torch.testing.assert_close(raw, torch.log_softmax(logits, -1).gather(1, tok[:, None]).squeeze(1))
    assert proc.dtype == raw.dtype == torch.float32 and tok.dtype == torch.int64
    assert float(proc[2]) == 0.0
    s.restore_state(state)
    tok2, raw2 = s.sample(logits, logprobs="raw")
    assert torch.equal(tok, tok2) and torch.equal(raw, raw2)
    with pytest.raises(ValueError, match="logprobs"):
        s.sample(logits, logprobs="scores")


def test_save_restore_state():
    v = 20
    s = make_sampler([SamplingParams(seed=1, repetition_penalty=1.5)] * 2, v, prompts=[[0], [1]])
    logits = torch.randn(2, v)
    state = s.save_state()
    a = [s.sample(logits)[0] for _ in range(5)]
    assert s.steps[:2].tolist() == [5, 5]
    s.restore_state(state)
    assert s.steps[:2].tolist() == [0, 0] and s.seen[:, 2:].sum() == 0
    b = [s.sample(logits)[0] for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_check_stop():
    v = 10
    params = [
        SamplingParams(stop_token_ids=[2, 3], max_tokens=5),
        SamplingParams(stop_token_ids=[2], ignore_eos=True, max_tokens=3),
        SamplingParams(max_tokens=1),
    ]
    s = make_sampler(params, v, max_stop_ids=8)
    s.sample(torch.zeros(3, v))
    assert s.check_stop(torch.tensor([3, 2, 0])).tolist() == [True, False, True]
    assert s.check_stop(torch.tensor([4, 2, 0])).tolist() == [False, False, True]
    s.sample(torch.zeros(3, v))
    s.sample(torch.zeros(3, v))
    assert s.check_stop(torch.tensor([4, 2, 0])).tolist() == [False, True, True]
    assert s.check_stop(torch.tensor([2, 4]), slots=torch.tensor([0, 1])).tolist() == [True, True]
    with pytest.raises(ValueError, match="max_stop_ids"):
        s.set_slot(0, SamplingParams(stop_token_ids=list(range(9))))
    s.set_slot(0, SamplingParams(stop_token_ids=list(range(9)), ignore_eos=True))  # not stored: fine


def test_set_slot_errors_and_flags():
    s = BatchSampler(2, 10)
    with pytest.raises(ValueError, match="slot"):
        s.set_slot(2, SamplingParams())
    with pytest.raises(ValueError, match="prompt_ids"):
        s.set_slot(0, SamplingParams(), [10])
    with pytest.raises(TypeError):
        s.set_slot(0, {"temperature": 1.0})
    with pytest.raises(ValueError, match="shape"):
        s.sample(torch.zeros(2, 11))
    with pytest.raises(ValueError, match="rows"):
        s.sample(torch.zeros(3, 10))
    s.set_slot(0, SamplingParams(temperature=0, top_p=0.5))
    assert s.static_flags(2) == {"greedy_only": True, "skip_penalty": True, "candidates": 0}  # slot 1 is free
    s.set_slot(1, SamplingParams(repetition_penalty=1.1))
    assert s.static_flags([0]) == {"greedy_only": True, "skip_penalty": True, "candidates": 0}
    assert s.static_flags([0, 1]) == {"greedy_only": False, "skip_penalty": False, "candidates": 0}
    s.set_slot(1, SamplingParams(top_k=50, top_p=0.9))
    assert s.static_flags([0, 1])["candidates"] == 64
    s.set_slot(1, SamplingParams(top_k=65))
    assert s.static_flags([0, 1])["candidates"] == 1024
    assert s.static_flags([0, 1], candidate_buckets=(8, 100))["candidates"] == 100
    s.set_slot(1, SamplingParams(top_k=2000))
    assert s.static_flags([0, 1])["candidates"] is None
    s.set_slot(1, SamplingParams(top_p=0.9))
    assert s.static_flags([0, 1])["candidates"] is None
    s.clear_slot(1)
    assert s.static_flags(2)["greedy_only"]
    s.set_slot(1, SamplingParams(), torch.tensor([[1, 2], [3, 9]]))  # tensor prompt, any shape
    assert s.seen[1].nonzero().flatten().tolist() == [1, 2, 3, 9]


def test_top_k_larger_than_vocab_and_single_token_vocab():
    s = make_sampler([SamplingParams(top_k=1000, seed=0), SamplingParams(top_p=0.1, seed=1)], 1)
    tok, lp = s.sample(torch.tensor([[0.3], [-5.0]]))
    assert tok.tolist() == [0, 0] and lp.tolist() == [0.0, 0.0]


# ---------------------------------------------------------------------------------------------------- no host sync


def test_sample_traces_as_one_graph_on_cpu():
    """Dynamo full-graph tracing fails on any .item()/.tolist()/data-dependent branch: the sampler has none."""
    torch._dynamo.reset()
    v, b = 64, 6
    params = [SamplingParams(temperature=0.0), SamplingParams(top_k=5, seed=1), SamplingParams(top_p=0.7),
              SamplingParams(min_p=0.1, repetition_penalty=1.3), SamplingParams(), SamplingParams(seed=3)]
    s = make_sampler(params, v, prompts=[[1, 2]] * b, max_batch=8)
    logits = torch.randn(b, v)
    slots = torch.tensor([7, 0, 1, 2, 3, 4])
    s.set_slot(7, SamplingParams(seed=5))

    def step(lg):
        tok, lp, raw = s.sample(lg, logprobs="both")
        done = s.check_stop(tok)
        tok2, lp2 = s.sample(lg, slots, observe=False)
        s.observe(tok2, slots)
        g, _ = s.sample(lg, greedy_only=True, skip_penalty=True, observe=False)
        tok3, _ = s.sample(lg, candidates=8, observe=False)
        tok4, _ = s.sample(lg, candidates=0, skip_penalty=True, observe=False)
        return tok, lp, raw, done, tok2, lp2, g, tok3, tok4, s.processed_logprobs(lg)

    state = s.save_state()
    want = step(logits)
    s.restore_state(state)
    compiled = torch.compile(step, backend="eager", fullgraph=True)
    got = compiled(logits)
    for x, y in zip(got, want):
        assert torch.equal(x, y)
    torch._dynamo.reset()


@pytest.mark.gpu
def test_cuda_graph_capture_and_no_sync():
    dev = torch.device("cuda")
    v, b = 151_936, 16
    params = [SamplingParams(temperature=0.0), SamplingParams(top_k=50, seed=1), SamplingParams(top_p=0.9),
              SamplingParams(min_p=0.05, repetition_penalty=1.3)] * 4
    cpu_ids = [[1, 2, 3]] * b
    s = make_sampler(params, v, prompts=cpu_ids, device=dev, max_batch=32)
    static_logits = torch.randn(b, v, device=dev) * 3
    slots = torch.arange(b, device=dev).flip(0)

    def body():
        tok, lp, raw = s.sample(static_logits, logprobs="both")
        tok2, _ = s.sample(static_logits, slots)
        tok3, _ = s.sample(static_logits, candidates=64, observe=False)
        tok4, _ = s.sample(static_logits, candidates=0, skip_penalty=True, observe=False)
        return tok, lp, raw, s.check_stop(tok), tok2, tok3, tok4

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        state = s.save_state()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            want = [x.clone() for x in body()]  # warm-up, and the eager reference; raises on any sync
            s.restore_state(state)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = body()
        s.restore_state(state)
        graph.replay()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    for x, y in zip(out, want):
        assert torch.equal(x, y)
    assert s.steps[:b].tolist() == [4] * b
    # Fast paths draw the same tokens on the GPU too (bf16 logits of a real-size vocab: many ties).
    params = [SamplingParams(temperature=0.7, top_k=40 + i, top_p=0.9, seed=i) for i in range(b)]
    s = make_sampler(params, v, device=dev)
    logits = (torch.randn(b, v, device=dev) * 4).to(torch.bfloat16)
    state = s.save_state()
    full = [s.sample(logits) for _ in range(4)]
    s.restore_state(state)
    fast = [s.sample(logits, **s.static_flags(b)) for _ in range(4)]
    assert s.static_flags(b)["candidates"] == 64
    for (t0, l0), (t1, l1) in zip(full, fast):
        assert torch.equal(t0, t1) and torch.equal(l0, l1)
    # The device hash equals the host reference.
    keys = torch.tensor([stream_key(i) for i in range(64)])
    steps = torch.arange(64) * 1_000_003
    assert counter_uniform(keys.to(dev), steps.to(dev)).cpu().tolist() == counter_uniform(keys, steps).tolist()


# ---------------------------------------------------------------------------------------------------- stop strings


_CORPUS = [
    "the quick brown fox jumps over the lazy dog. ",
    "stop here: END of story\n\n### next\n",
    "日本語のテキスト、絵文字 😀🎉 and café naïve ",
    "def f(x):\n    return x + 1\n",
] * 20


@pytest.fixture(scope="module")
def bpe_tokenizers():
    """Two small real tokenizers trained in memory: byte-level BPE (GPT-2 style) and Metaspace (SentencePiece style)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    byte = Tokenizer(models.BPE())
    byte.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte.decoder = decoders.ByteLevel()
    byte.train_from_iterator(_CORPUS, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"],
        show_progress=False,
    ))
    meta = Tokenizer(models.BPE(unk_token="<unk>"))
    meta.pre_tokenizer = pre_tokenizers.Metaspace()
    meta.decoder = decoders.Metaspace()
    meta.train_from_iterator(_CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "</s>"], show_progress=False,
    ))
    return [
        PreTrainedTokenizerFast(tokenizer_object=byte, eos_token="<eos>"),
        PreTrainedTokenizerFast(tokenizer_object=meta, eos_token="</s>", unk_token="<unk>"),
    ]


def _brute_force_stop(tokenizer, ids, stops):
    for m in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:m], skip_special_tokens=True)
        hits = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
        if hits:
            end, _, stop = min(hits)
            return StopMatch(stop=stop, num_tokens=m, trailing_chars=len(text) - end)
    return None


_STOP_TEXTS = [
    ("the quick brown fox jumps over the lazy dog. " * 6 + "END of story", ["END"]),
    ("the lazy dog " * 8 + "story\n\n### next", ["\n\n###", "xyz"]),
    ("café naïve 日本語のテキスト 😀🎉 and more", ["😀", "never"]),
    ("return x + 1\n" * 5 + "絵文字", ["文字"]),
    ("the quick brown fox", ["nothing here"]),
    ("over the lazy dog", ["dog", "lazy dog", "the"]),  # several stops: the one completed first wins
    ("a" * 30 + "b", ["aab", "ab"]),
]


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("case", range(len(_STOP_TEXTS)))
def test_stop_string_matcher_incremental(bpe_tokenizers, which, case):
    tokenizer = bpe_tokenizers[which]
    text, stops = _STOP_TEXTS[case]
    ids = tokenizer.encode(text)
    if which == 0:
        ids = ids[:5] + [tokenizer.eos_token_id] + ids[5:]  # special tokens are skipped in the text
    matcher = StopStringMatcher(tokenizer, stops)
    want = _brute_force_stop(tokenizer, ids, stops)
    got = None
    for m in range(1, len(ids) + 1):  # as the engine calls it: after each new token
        got = matcher.find(ids[:m])
        if got is not None:
            break
    assert got == want
    assert matcher.find(ids, num_new=len(ids)) == want  # one scan of everything
    if want is not None:
        assert matcher.check(ids[: want.num_tokens]) == want.num_tokens
        full = tokenizer.decode(ids[: want.num_tokens], skip_special_tokens=True)
        cut, stop = matcher.truncate(full)
        assert stop == want.stop
        assert cut == full[: len(full) - want.trailing_chars - len(want.stop)]
        # Several new tokens at once (e.g. after a multi-step sync) locate the completing token too.
        k = min(4, want.num_tokens)
        last = min(len(ids), want.num_tokens + 2)
        assert matcher.find(ids[:last], num_new=last - want.num_tokens + k) == want


def test_stop_string_matcher_decodes_only_the_tail(bpe_tokenizers):
    tokenizer = bpe_tokenizers[0]
    calls = []

    class Spy:
        def decode(self, ids, skip_special_tokens=True):
            calls.append(len(ids))
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tokenizer.encode("the quick brown fox jumps over the lazy dog. " * 40)
    matcher = StopStringMatcher(Spy(), ["### next"])
    assert matcher.find(ids) is None
    assert max(calls) <= len("### next") + 8 + 1
    assert StopStringMatcher(tokenizer, []).find(ids) is None
    with pytest.raises(ValueError):
        StopStringMatcher(tokenizer, [""])


@pytest.mark.slow
def test_stop_string_matcher_smollm2(smollm2_tokenizer):
    text = "Sure! Here is the answer:\n\nThe capital of France is Paris.<|im_end|>\nUser: thanks"
    ids = smollm2_tokenizer.encode(text, add_special_tokens=False)
    stops = ["\nUser:", "Paris."]
    matcher = StopStringMatcher(smollm2_tokenizer, stops)
    got = next(m for i in range(1, len(ids) + 1) if (m := matcher.find(ids[:i])) is not None)
    assert got == _brute_force_stop(smollm2_tokenizer, ids, stops)
    assert got.stop == "Paris."


@pytest.mark.gpu
def test_h2d_staging_reuses_buffers_only_after_their_copy():
    """Many host->device copies queued behind GPU work: each arrives with its own values (a staging buffer is not
    rewritten while a queued copy still reads it), and the staging pool stays bounded."""
    from hf_efficient.generation import sampling

    dev = torch.device("cuda")
    busy = torch.randn(4096, 4096, device=dev)
    outs = []
    for i in range(3 * sampling._STAGING_MAX):
        if i % 16 == 0:
            busy = busy @ busy / 64  # keep the stream busy so copies queue up
        outs.append(sampling.h2d([i, i + 1, i + 2], torch.long, dev))
    torch.cuda.synchronize()
    for i, out in enumerate(outs):
        assert out.tolist() == [i, i + 1, i + 2]
    assert len(sampling._STAGING[torch.cuda.current_device()]) <= sampling._STAGING_MAX
